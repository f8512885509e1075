"""Hyper-parameter schedules, 1cycle, flat-cos and the learning-rate finder."""
import bisect
import copy
import itertools
import math
from collections import namedtuple

import numpy as np
import torch

from ..callback import Callback, CancelFitException, CancelValidException
from ..torch_core import listify
from .recorder import lr_find_curve

__all__ = ['SchedLin', 'SchedCos', 'SchedNo', 'SchedExp', 'SchedPoly', 'combine_scheds', 'combined_cos',
           'ParamScheduler', 'LRFinder', 'SuggestedLRs', 'fit_one_cycle', 'fit_flat_cos', 'lr_find',
           'valley', 'minimum', 'steep']


class _Schedule:
    "A function of the position in training, `pos` in [0, 1], from `start` to `end`."
    def __init__(self, start, end): self.start, self.end = _arr(start), _arr(end)
    def __repr__(self): return f"{type(self).__name__}({self.start}, {self.end})"


class SchedLin(_Schedule):
    "Linear from `start` to `end`."
    def __call__(self, pos): return self.start + pos * (self.end - self.start)


class SchedCos(_Schedule):
    "Cosine from `start` to `end` (flat at both ends)."
    def __call__(self, pos): return self.start + (1 + math.cos(math.pi * (1 - pos))) * (self.end - self.start) / 2


class SchedNo(_Schedule):
    "Constant at `start`."
    def __call__(self, pos): return self.start


class SchedExp(_Schedule):
    "Exponential (geometric) from `start` to `end`; both must be positive."
    def __init__(self, start, end):
        super().__init__(start, end)
        if np.any(np.asarray(self.start) <= 0) or np.any(np.asarray(self.end) <= 0):
            raise ValueError(f"SchedExp needs positive start and end; got {start}, {end}")
    def __call__(self, pos): return self.start * (self.end / self.start) ** pos


class SchedPoly(_Schedule):
    "Polynomial `start + (end-start) * pos**power`."
    def __init__(self, start, end, power):
        super().__init__(start, end); self.power = power
    def __call__(self, pos): return self.start + (self.end - self.start) * pos ** self.power


def _arr(v):
    "A float for one value (fast to compute with per batch), a numpy array for one value per group."
    if isinstance(v, (list, tuple, np.ndarray)):
        v = np.asarray(v, dtype=float)
        return float(v.reshape(-1)[0]) if v.size == 1 else v  # sync-ok: a numpy array, not a tensor
    return v


def combine_scheds(pcts, scheds):
    "One schedule made of `scheds` run one after the other, each over its fraction `pcts` of training."
    if len(pcts) != len(scheds): raise ValueError(f"combine_scheds got {len(pcts)} pcts for {len(scheds)} scheds")
    if abs(sum(pcts) - 1) > 1e-6 or min(pcts) < 0:
        raise ValueError(f"combine_scheds: pcts must be >= 0 and sum to 1; got {pcts}")
    # Plain Python floats and bisect: this runs before every batch, where numpy's per-call cost shows.
    pcts = [float(p) for p in pcts]
    starts = list(itertools.accumulate([0.] + pcts[:-1]))

    def sched(pos):
        i = max(bisect.bisect_right(starts, pos) - 1, 0)
        while i > 0 and pcts[i] == 0: i -= 1
        return scheds[i](min(max((pos - starts[i]) / (pcts[i] or 1.), 0.), 1.))
    return sched


def combined_cos(pct, start, middle, end):
    "Cosine from `start` to `middle` over `pct` of training, then cosine from `middle` to `end`."
    return combine_scheds([pct, 1 - pct], [SchedCos(start, middle), SchedCos(middle, end)])


class ParamScheduler(Callback):
    """Sets each hyper-parameter in `scheds` ({name: schedule}) before every training batch from `pct_train`.
    In graph mode the schedules are evaluated for every step of the fit before it starts (`graph_hypers`) and the
    captured step reads them from a device table."""
    order, run_valid = 60, False
    graph_safe = True

    def __init__(self, scheds): self.scheds = scheds

    def before_fit(self): self.hps, self._graph_values = {name: [] for name in self.scheds}, {}

    def graph_hypers(self, positions):
        "Each scheduled hyper-parameter's value at each training position (`pct_train`) in `positions`, for graph mode."
        self._graph_values = {name: [sched(p) for p in positions] for name, sched in self.scheds.items()}
        return self._graph_values

    def graph_epoch_end(self, graph, start, stop):
        for name, values in self._graph_values.items(): self.hps[name].extend(values[start:stop])

    def before_batch(self):
        for name, sched in self.scheds.items():
            v = sched(self.learn.pct_train)
            self.learn.opt.set_hyper(name, v)
            self.hps[name].append(v)


def fit_one_cycle(learn, n_epoch, lr_max=None, div=25., div_final=1e5, pct_start=0.25, wd=None, moms=None,
                  cbs=None, reset_opt=False, start_epoch=0, resume=None, graph=False):
    """Leslie Smith's 1cycle: lr warms up from lr_max/div to lr_max over `pct_start` of training with a
    cosine, then anneals to lr_max/div_final; momentum moves the other way between `moms`."""
    lr_max = learn.lr if lr_max is None else lr_max
    if lr_max is None:
        raise ValueError("fit_one_cycle needs a learning rate: pass lr_max, or Learner(lr=...). "
                         "learn.lr_find() suggests one.")
    if not 0 <= pct_start <= 1: raise ValueError(f"pct_start must be in [0, 1]; got {pct_start}")
    if learn.opt is None or reset_opt: learn.create_opt()
    lr_max = np.array(learn.lr_values(lr_max), dtype=float)
    moms = moms or learn.moms
    if moms is None or len(moms) != 3:
        raise ValueError(f"moms must be (start, middle, end), e.g. (0.95, 0.85, 0.95); got {moms}")
    scheds = {'lr': combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final),
              'mom': combined_cos(pct_start, *moms)}
    return learn.fit(n_epoch, lr=lr_max.tolist(), cbs=[ParamScheduler(scheds)] + listify(cbs), wd=wd,  # sync-ok: a numpy array, once per fit
                     start_epoch=start_epoch, resume=resume, graph=graph)


def fit_flat_cos(learn, n_epoch, lr=None, div_final=1e5, pct_start=0.75, wd=None, cbs=None, reset_opt=False,
                 start_epoch=0, resume=None, graph=False):
    "Constant lr for `pct_start` of training, then cosine annealing to lr/div_final."
    lr = learn.lr if lr is None else lr
    if lr is None: raise ValueError("fit_flat_cos needs a learning rate: pass lr, or Learner(lr=...)")
    if learn.opt is None or reset_opt: learn.create_opt()
    lr = np.array(learn.lr_values(lr), dtype=float)
    scheds = {'lr': combine_scheds([pct_start, 1 - pct_start], [SchedNo(lr, lr), SchedCos(lr, lr / div_final)])}
    return learn.fit(n_epoch, lr=lr.tolist(), cbs=[ParamScheduler(scheds)] + listify(cbs), wd=wd,  # sync-ok: a numpy array, once per fit
                     start_epoch=start_epoch, resume=resume, graph=graph)




class LRFinder(Callback):
    """Raises the lr geometrically from `start_lr` to `end_lr` over `num_it` batches, and stops once the
    smoothed loss exceeds 4x its minimum. Divergence is checked on the device and read every
    `check_every` batches, so the finder does not sync the GPU on every batch."""
    order, run_valid = 60, False

    def __init__(self, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, check_every=8):
        if not 0 < start_lr < end_lr:
            raise ValueError(f"lr_find needs 0 < start_lr < end_lr; got {start_lr}, {end_lr}")
        self.sched = SchedExp(start_lr, end_lr)
        self.num_it, self.stop_div, self.check_every = num_it, stop_div, check_every

    def before_fit(self):
        self.best = self.diverged = None

    def before_batch(self):
        self.learn.opt.set_hyper('lr', self.sched(self.learn.train_iter / self.num_it))

    def after_batch(self):
        smooth = self.learn.recorder.smooth_loss.value
        self.best = smooth if self.best is None else torch.minimum(self.best, smooth)
        bad = (smooth > 4 * self.best) | ~torch.isfinite(smooth)
        self.diverged = bad if self.diverged is None else self.diverged | bad
        if self.learn.train_iter >= self.num_it: raise CancelFitException()
        if self.stop_div and self.learn.train_iter % self.check_every == 0 and bool(self.diverged):  # sync-ok: every check_every batches
            raise CancelFitException()

    def before_validate(self): raise CancelValidException()


SuggestedLRs = namedtuple('SuggestedLRs', ['valley', 'minimum', 'steep'])


def minimum(lrs, losses):
    "A tenth of the lr at the minimum loss."
    return lrs[int(np.argmin(losses))] / 10


def steep(lrs, losses):
    "The lr where the loss falls fastest (steepest negative slope against log lr)."
    grads = np.gradient(losses, np.log(lrs))
    return lrs[int(np.argmin(grads))]


def valley(lrs, losses):
    "fastai's default: the middle of the longest descending stretch of the loss curve."
    n = len(losses)
    lds, max_start, max_end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1: lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]: max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    return lrs[max_start + int(sections) + int(sections / 2)]


def lr_find(learn, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, show_plot=True, skip_end=5):
    """Train with an exponentially growing lr and return `SuggestedLRs(valley, minimum, steep)`.

    The model and optimizer are restored exactly afterwards, even if the search fails.
    """
    n_batches = len(learn.dls.train)
    if n_batches == 0: raise ValueError("lr_find: the training loader yields no batches")
    model_state = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    opt_state = copy.deepcopy(learn.opt.state_dict()) if learn.opt is not None else None
    had_opt = learn.opt is not None
    try:
        with learn.no_logging():
            learn.fit(num_it // n_batches + 1, lr=start_lr, cbs=LRFinder(start_lr, end_lr, num_it, stop_div))
    finally:
        learn.model.load_state_dict(model_state)
        if had_opt: learn.opt.load_state_dict(opt_state)
        else: learn.opt = None
    lrs, losses = lr_find_curve(learn.recorder.lrs, learn.recorder.losses, skip_end, skip_start=num_it // 10)
    if len(losses) < 3: raise RuntimeError("lr_find stopped after fewer than 3 batches: the loss diverged at "
                                           f"once. Lower start_lr (now {start_lr}).")
    sugg = SuggestedLRs(float(valley(lrs, losses)), float(minimum(lrs, losses)), float(steep(lrs, losses)))
    if show_plot: learn.recorder.plot_lr_find(skip_end=skip_end, skip_start=num_it // 10, suggestions=sugg._asdict())
    return sugg
