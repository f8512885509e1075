"""Batch-size tools: gradient accumulation, the gradient noise scale, and batch-size schedules.

- `GradientAccumulation(n_acc)` steps the optimizer once per `n_acc` samples: a big batch in small pieces.
- `GradientNoiseScale()` estimates the simple noise scale B_simple = tr(Sigma)/|G|^2 of McCandlish et al. (2018),
  "An Empirical Model of Large-Batch Training": below it, a bigger batch buys almost proportionally fewer
  steps; well above it, extra samples per step are mostly wasted.
- `BatchSizeScheduler(schedule)` changes the training batch size at epoch boundaries (Smith et al. 2017,
  "Don't Decay the Learning Rate, Increase the Batch Size").
"""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..callback import Callback, CancelBatchException
from ..metrics import batch_size
from ..records import TensorLog
from .collectives import all_reduce_mean
from .mixed_precision import MixedPrecision
from .schedule import ParamScheduler
from .stats import StatsCallback

__all__ = ['GradientAccumulation', 'GradientNoiseScale', 'BatchSizeScheduler', 'noise_scale_estimate']


class GradientAccumulation(Callback):
    """Step the optimizer once every `n_acc` training samples, adding up the gradients of the batches between.

    Each batch's loss is weighted by `bs / n_acc` before backward, and `before_step` cancels the batch (which
    skips the step and the Learner's `zero_grad`, as fastai does) until `n_acc` samples are in. When the batch
    sizes do not add up to `n_acc` exactly, the gradient is rescaled to the mean over the samples it holds, so
    with a mean-reduced loss and a model without BatchNorm one step equals one step on the concatenated batch.
    Samples still accumulating when fit ends are dropped. `learn.loss` (and so the recorded loss) stays the
    unweighted batch loss. Read by `GradientNoiseScale`: `loss_weight` (this batch's weight) and
    `step_samples` (the samples behind the last step).
    """
    order, run_valid = 6, False   # fastai's place: before mixed precision, before gradient clipping

    def __init__(self, n_acc=32):
        if not isinstance(n_acc, int) or n_acc < 1:
            raise ValueError(f"GradientAccumulation(n_acc={n_acc!r}): n_acc is a number of samples, a positive int")
        self.n_acc, self.count, self.loss_weight, self.step_samples = n_acc, 0, 1., 0

    def before_fit(self):
        if any(isinstance(cb, MixedPrecision) and cb.dtype == torch.float16 for cb in self.learn.cbs):
            raise ValueError("GradientAccumulation does not work with MixedPrecision(torch.float16), which unscales "
                             "the gradient after every backward: use MixedPrecision(torch.bfloat16) (no loss scaling), "
                             "or drop one of the two")
        self.count = 0

    def steps_after(self, bs):
        "Whether the next training batch, of `bs` samples, completes the accumulation, so that its step runs."
        return self.count + bs >= self.n_acc

    def after_loss(self):
        bs = batch_size(self.learn)
        self.count += bs
        self.loss_weight = bs / self.n_acc
        self.learn.loss_grad = self.learn.loss_grad * self.loss_weight

    def before_step(self):
        if self.count < self.n_acc: raise CancelBatchException()  # no step, and no zero_grad: keep accumulating
        if self.count != self.n_acc:
            torch._foreach_mul_(_grads(self.learn.opt), self.n_acc / self.count)
        self.step_samples, self.count = self.count, 0


def _grads(opt):
    return [p.grad for g in opt.param_groups for p in g['params'] if p.grad is not None]


def _sq_norm(tensors):
    "Squared L2 norm of a list of tensors, as one device scalar (no host read)."
    return torch.stack(torch._foreach_norm(tensors)).float().square().sum()


def noise_scale_estimate(small_sq, big_sq, inv_small, inv_big):
    """McCandlish et al. (2018), appendix A.1: unbiased estimates `(|G|^2, tr(Sigma))` from the mean squared
    norm `small_sq` of mean gradients over small batches and `big_sq` over a big batch.

    `inv_small` is the mean of 1/size over the small batches and `inv_big` is 1/size of the big one; since
    E|G_B|^2 = |G|^2 + tr(Sigma)/B, two sizes give two equations. With one small size b this is the paper's
    |G|^2 = (B|G_B|^2 - b|G_b|^2)/(B - b) and tr(Sigma) = (|G_b|^2 - |G_B|^2)/(1/b - 1/B).
    Works on tensors and floats alike; the ratio tr(Sigma)/|G|^2 is B_simple.
    """
    if not inv_small > inv_big:
        raise ValueError(f"noise_scale_estimate needs small batches smaller than the big one; got mean 1/size "
                         f"{inv_small} for the small ones and {inv_big} for the big one")
    gap = inv_small - inv_big
    return (big_sq * inv_small - small_sq * inv_big) / gap, (small_sq - big_sq) / gap


class GradientNoiseScale(StatsCallback):
    """Estimates the simple noise scale B_simple = tr(Sigma)/|G|^2 while training (McCandlish et al. 2018).

    |G|^2 is the squared norm of the true gradient and tr(Sigma) the summed per-sample gradient variance. Both
    come from the paper's unbiased two-size estimator (`noise_scale_estimate`): the squared norms of mean
    gradients over small batches and over the big batch they make up. Each is smoothed by its own debiased EMA
    (`beta`), and B_simple is the ratio of the EMAs (the ratio of noisy estimates would be biased and heavy-tailed).

    Where the small batches come from, and what it costs:
    - With `GradientAccumulation` in the learner, the small batches are the accumulated batches (each one's
      gradient is the growth of `.grad`) and the big one is the step, measured every `every` (default 1)
      optimizer steps. Cost per batch of a measured step: one subtraction, one copy and one norm over the
      parameters, plus one parameter-sized buffer. Needs at least two batches per step (`n_acc` above the
      batch size). `n_micro` must be None.
    - Otherwise, every `every` (default 10) batches, the batch is split into `n_micro` (default 2) contiguous
      chunks and each chunk's mean gradient is taken by backward through the batch's own graph (no second
      forward, so no extra BatchNorm statistics or activation hooks). That is `n_micro` extra backward passes:
      about 2*n_micro/3 of a training step on a measured batch, so with the defaults (2, every 10) about +13%
      time (+12% measured on an H100 for simple_cnn + BN at bs 64, `bench/batch_size.py`).
      With BatchNorm, chunk gradients include the batch coupling; they still average exactly to the batch
      gradient, but are not independent samples, so read B_simple as approximate there (on simple_cnn + BN
      at fixed weights, split batches of 256 gave 865 where 8 accumulated batches of 32, each with its own
      BN statistics as in the paper's data-parallel runs, gave 931).

    Under DDP (torchrun) with GradientAccumulation, the batches that do not step accumulate their gradients
    locally (see DistributedCallback), so they are the small batches, of this rank's size; the batch that steps
    is not one of them, as its gradient arrives already averaged over the ranks; and the big batch is the global
    one, `world_size` times the samples this rank accumulated. So a step needs at least one batch before the
    one that steps, and every rank has its own estimates, which are averaged across ranks once per epoch
    (`combine_ranks`): each is an unbiased estimate of the same |G|^2 and tr(Sigma), so their mean is one with less
    noise, and the EMAs, linear in the estimates, stay consistent with it.

    The loss must be mean-reduced (the default of torch's losses), so a gradient is a mean over samples.
    Nothing is read from the device per batch; `noise_scale` (a DataFrame, one row per measurement),
    `critical_batch_size()` and `plot()` read the record when asked, and the recorder gets a `noise_scale`
    column read once per epoch. Splitting differentiates the unscaled loss, so float16 loss scaling does not
    affect it; with accumulation it reads `.grad` before any other callback's `after_backward` or `before_step`
    (clipping).
    """
    order, run_valid = 7, False   # after GradientAccumulation (it rescales the gradient in before_step)
    record_schema = {'grad_sq': "raw estimate of |G|^2, the squared norm of the true gradient",
                     'trace': "raw estimate of tr(Sigma), the summed per-sample gradient variance",
                     'grad_sq_ema': "debiased EMA of grad_sq", 'trace_ema': "debiased EMA of trace"}

    def __init__(self, n_micro=None, every=None, beta=0.95):
        if n_micro is not None and (not isinstance(n_micro, int) or n_micro < 2):
            raise ValueError(f"GradientNoiseScale(n_micro={n_micro!r}): split each batch into an int >= 2 of chunks")
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"GradientNoiseScale(every={every!r}): measure every `every` batches, a positive int")
        if not 0 <= beta < 1: raise ValueError(f"GradientNoiseScale(beta={beta!r}): beta must be in [0, 1)")
        self.n_micro, self.every, self.beta = n_micro, every, beta
        self._log, self._rows, self._ema, self._n, self._steps, self._acc = TensorLog(), [], None, 0, 0, None

    def before_fit(self):
        self._acc = next((cb for cb in self.learn.cbs if isinstance(cb, GradientAccumulation)), None)
        if self._acc is not None and self.n_micro is not None:
            raise ValueError("GradientNoiseScale(n_micro=...) splits batches, but with GradientAccumulation it uses "
                             "the accumulated batches as the small ones: leave n_micro=None, or remove "
                             "GradientAccumulation")
        reduction = getattr(self.learn.loss_func, 'reduction', 'mean')
        if reduction != 'mean':
            raise ValueError(f"GradientNoiseScale needs a mean-reduced loss (gradients as means over samples); "
                             f"loss_func has reduction={reduction!r}")
        self._every = self.every or (1 if self._acc is not None else 10)
        # DistributedCallback (order 5) has wrapped the model by now.
        self._world = dist.get_world_size() if isinstance(self.learn.model, DistributedDataParallel) else 1
        self._params = [p for p in self.learn.model.parameters() if p.requires_grad]
        self._log, self._rows, self._ema, self._n, self._steps, self._prev = TensorLog(), [], None, 0, 0, None
        if self._acc is not None: self._start_group()

    # ---- splitting the batch (no GradientAccumulation) -----------------------------------------------------
    def before_backward(self):
        if self._acc is not None or self.learn.train_iter % self._every: return
        n, k = batch_size(self.learn), self.n_micro or 2
        if n < 2: return  # a one-sample batch (the end of an epoch) has no smaller batch inside
        chunks = zip(self.learn.pred.tensor_split(min(k, n)), *(y.tensor_split(min(k, n)) for y in self.learn.yb))
        small_sq, big, inv_small, n_chunks = 0., None, 0., 0
        for pred, *yb in chunks:
            b = pred.shape[0]
            grads = torch.autograd.grad(self.learn.loss_func(pred, *yb), self._params, retain_graph=True,
                                        materialize_grads=True)
            small_sq, inv_small, n_chunks = small_sq + _sq_norm(grads), inv_small + 1 / b, n_chunks + 1
            if big is None: big = torch._foreach_mul(grads, b / n)
            else: torch._foreach_add_(big, grads, alpha=b / n)
        self._record(small_sq / n_chunks, inv_small / n_chunks, _sq_norm(big), 1 / n, n)

    # ---- the batches of GradientAccumulation ---------------------------------------------------------------
    def _start_group(self):
        self._measuring = self._steps % self._every == 0
        self._small_sq, self._inv_small, self._n_small = 0., 0., 0
        if self._measuring:
            if self._prev is None: self._prev = [torch.zeros_like(p) for p in self._params]
            else: torch._foreach_zero_(self._prev)

    def after_backward(self):
        if self._acc is None or not self._measuring: return
        # Under DDP only the backward of the batch that steps is all-reduced: its growth of .grad would mix this
        # rank's batch with the others' whole accumulation, so it is left out of the small batches.
        if self._world > 1 and self.learn.model.require_backward_grad_sync: return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        batch_sq = _sq_norm(torch._foreach_sub(grads, self._prev)) / self._acc.loss_weight ** 2
        torch._foreach_copy_(self._prev, grads)
        self._small_sq = self._small_sq + batch_sq
        self._inv_small += 1 / batch_size(self.learn)
        self._n_small += 1

    def before_step(self):
        if self._acc is None: return
        if self._measuring:
            if self._n_small < (2 if self._world == 1 else 1):
                raise ValueError(f"GradientNoiseScale needs at least two batches per optimizer step, but "
                                 f"GradientAccumulation(n_acc={self._acc.n_acc}) stepped after one batch of "
                                 f"{self._acc.step_samples}: raise n_acc above the batch size, or remove "
                                 "GradientAccumulation so that GradientNoiseScale splits the batches instead")
            big_sq = _sq_norm([p.grad for p in self._params if p.grad is not None])
            big = self._acc.step_samples * self._world
            self._record(self._small_sq / self._n_small, self._inv_small / self._n_small, big_sq, 1 / big, big)
        self._steps += 1
        self._start_group()

    # ---- the record ----------------------------------------------------------------------------------------
    def _record(self, small_sq, inv_small, big_sq, inv_big, n):
        raw = torch.stack(noise_scale_estimate(small_sq, big_sq, inv_small, inv_big))
        self._ema = torch.lerp(raw, torch.zeros_like(raw) if self._ema is None else self._ema, self.beta)
        self._n += 1
        self._log.append(torch.cat([raw, self._ema / (1 - self.beta ** self._n)]))
        self._rows.append((self.learn.train_iter, self.learn.epoch, n))

    def epoch_columns(self):
        "The recorder's `noise_scale` column: B_simple at the end of the epoch (one read per epoch)."
        if self._ema is None: return {'noise_scale': None}
        return {'noise_scale': float(self._ema[1] / self._ema[0])}  # sync-ok: once per epoch

    # ---- the statistics protocol (see stats.py) ------------------------------------------------------------
    def device_records(self): return {'records': self._log.values()}

    def summarize(self, raw):
        """`grad_sq`, `trace`, `grad_sq_ema`, `trace_ema` and `noise_scale` (= trace_ema / grad_sq_ema), one value
        per measurement, with its `iter` (training batch), `epoch` and `bs` (the big batch)."""
        rows = raw['records'].reshape(-1, len(self.record_schema)).float()
        out = {k: rows[:, j] for j, k in enumerate(self.record_schema)}
        out['noise_scale'] = out['trace_ema'] / out['grad_sq_ema']
        where = torch.tensor(self._rows, dtype=torch.long).reshape(-1, 3)
        out.update(iter=where[:, 0], epoch=where[:, 1], bs=where[:, 2])
        return out

    def records_mark(self): return len(self._log)

    def combine_ranks(self, since):
        "Average this epoch's estimates, and the EMAs, across ranks (see the class docstring)."
        if len(self._log) == since: return
        rows = self._log.values()[since:]
        rows.copy_(all_reduce_mean(rows))
        self._ema = all_reduce_mean(self._ema)

    def state_dict(self):
        "The measurements so far and the EMAs, so that a resumed fit continues them (one host read, at checkpoints)."
        return {'records': self._log.state_dict()['values'], 'rows': [list(r) for r in self._rows],
                'ema': None if self._ema is None else self._ema.cpu(),  # sync-ok: checkpoint writing
                'n': self._n, 'steps': self._steps}

    def load_state_dict(self, state):
        device = self.learn.device if self.learn is not None else None
        self._log.load_state_dict({'values': state['records']}, device)
        self._rows = [tuple(r) for r in state['rows']]
        self._ema = None if state['ema'] is None else state['ema'].to(device)
        self._n, self._steps = state['n'], state['steps']
        if self._acc is not None: self._start_group()  # the group restarts, as accumulation does

    @property
    def noise_scale(self):
        """One row per measurement: `iter` (training batch), `epoch`, `bs` (the big batch), the raw estimates
        `grad_sq` (|G|^2) and `trace` (tr(Sigma)), their EMAs, and `noise_scale` = trace_ema / grad_sq_ema."""
        import pandas as pd
        s = self.stats
        return pd.DataFrame({k: s[k].numpy() for k in ('iter', 'epoch', 'bs', *self.record_schema,  # sync-ok: CPU
                                                        'noise_scale')})

    def critical_batch_size(self):
        """The latest smoothed B_simple. McCandlish et al. find the critical batch size (where doubling the batch
        stops nearly halving the steps) close to it. Negative or huge values mean |G|^2 is not resolved yet
        from the noise: measure longer, or raise `beta`."""
        if not self._rows:
            raise RuntimeError("GradientNoiseScale has no measurement yet: fit with it first (it measures every "
                               f"{self.every or 'few'} training batches)")
        return float(self.noise_scale.noise_scale.iloc[-1])  # sync-ok: a CPU DataFrame, on request

    def tradeoff(self, batch_sizes=(32, 64, 128, 256, 512, 1024, 2048)):
        """What each batch size would cost, by McCandlish et al.'s model with B_noise ~ `critical_batch_size()`:
        `steps` = 1 + B_noise/B and `samples` = 1 + B/B_noise, each relative to its minimum (reached with huge and
        tiny batches respectively). Near B = B_noise both are about 2x their minimum: the balanced choice."""
        import pandas as pd
        b_noise = self.critical_batch_size()
        if not b_noise > 0:
            raise RuntimeError(f"The noise scale is {b_noise:.3g}, so |G|^2 is not yet resolved from the gradient "
                               "noise: measure over more batches (or a higher beta) before reading the trade-off")
        return pd.DataFrame({'bs': list(batch_sizes), 'steps': [1 + b_noise / b for b in batch_sizes],
                             'samples': [1 + b / b_noise for b in batch_sizes]}).set_index('bs')

    def plot(self, ax=None):
        "B_simple (smoothed) against the training batch, on a log scale, with the batch size used."
        from ..diagnostics.plots import fig_ax
        fig, ax = fig_ax(ax)
        df = self.noise_scale
        positive = df[df.noise_scale > 0]
        ax.plot(positive.iter, positive.noise_scale, label='B_simple (noise scale)')
        ax.step(df.iter, df.bs, where='post', linestyle='--', color='gray', label='batch size')
        ax.set_yscale('log'); ax.set_xlabel('training batch'); ax.set_ylabel('samples'); ax.legend()
        return fig


class BatchSizeScheduler(Callback):
    """Sets the training batch size at the start of each epoch (Smith et al. 2017: grow the batch instead of
    decaying the learning rate).

    `schedule` is a dict `{epoch: bs}` (each size holds from its epoch on; before the first one the loader keeps
    its own) or a function `epoch -> bs`. With `keep_lr_ratio=True` the learning rate is scaled by
    `bs / bs_at_fit_start`, keeping lr/bs constant; this composes with 1cycle and other lr schedules (it scales
    what they set). Needs a training loader whose `bs` can be set, such as learnkit's; plain torch DataLoaders
    fix their batch size when built, so they raise. The recorder gets a `bs` column; the loader's batch size is
    put back when fit ends.
    """
    order, run_valid = 61, False   # before_batch after ParamScheduler (60), so its lr is the one scaled

    def __init__(self, schedule, keep_lr_ratio=False):
        if isinstance(schedule, dict):
            bad = {e: b for e, b in schedule.items() if not (isinstance(e, int) and e >= 0 and _is_bs(b))}
            if bad: raise ValueError(f"BatchSizeScheduler: schedule maps epochs (ints >= 0) to batch sizes "
                                     f"(ints >= 1); these entries are not: {bad}")
        elif not callable(schedule):
            raise TypeError(f"BatchSizeScheduler: schedule is a dict {{epoch: bs}} or a function epoch -> bs; "
                            f"got {type(schedule).__name__}")
        self.schedule, self.keep_lr_ratio = schedule, keep_lr_ratio
        self.bs, self._dl = None, None

    def before_fit(self):
        dl = self.learn.dls.train
        if isinstance(dl, DataLoader) or not hasattr(dl, 'bs'):
            raise TypeError(f"BatchSizeScheduler needs a training loader whose batch size can change between epochs, "
                            f"but dls.train is a {type(dl).__module__}.{type(dl).__name__}, which fixes its batch "
                            "size when it is built. Build the loaders with learnkit's DataLoaders.from_tensors(...) "
                            "or DataLoaders.from_dsets(...), whose `bs` can be set.")
        self._dl, self._base_bs, self.bs = dl, dl.bs, dl.bs
        self._lr_scheduled = any(isinstance(cb, ParamScheduler) and 'lr' in cb.scheds for cb in self.learn.cbs)
        self._base_lrs = [h['lr'] for h in self.learn.opt.hypers]

    def _bs_for(self, epoch):
        if isinstance(self.schedule, dict):
            starts = [e for e in self.schedule if e <= epoch]
            return self.schedule[max(starts)] if starts else self._base_bs
        bs = self.schedule(epoch)
        if not _is_bs(bs): raise ValueError(f"BatchSizeScheduler: schedule({epoch}) returned {bs!r}, not a batch size "
                                            "(an int >= 1)")
        return bs

    def before_train(self):
        self.bs = self._dl.bs = self._bs_for(self.learn.epoch)
        if self.keep_lr_ratio and not self._lr_scheduled: self.learn.opt.set_hyper('lr', self._scaled(self._base_lrs))

    def before_batch(self):
        if self.keep_lr_ratio and self._lr_scheduled:  # the schedule has just set this batch's lr
            self.learn.opt.set_hyper('lr', self._scaled([h['lr'] for h in self.learn.opt.hypers]))

    def _scaled(self, lrs): return [lr * self.bs / self._base_bs for lr in lrs]

    def epoch_columns(self): return {'bs': self.bs}

    def cleanup_fit(self):
        if self._dl is not None: self._dl.bs = self._base_bs
        self._dl = None


def _is_bs(b): return isinstance(b, int) and not isinstance(b, bool) and b >= 1
