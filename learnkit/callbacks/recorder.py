"""Recorder: losses, hyper-parameters and the per-epoch results table, kept on the device until read."""
import time

import torch

from ..metrics import AvgLoss, AvgSmoothLoss
from ..records import TensorLog
from .stats import StatsCallback

__all__ = ['Recorder', 'format_time', 'lr_find_curve']


def format_time(t):
    "Seconds as mm:ss (or h:mm:ss), as fastai's results table shows them."
    t = int(t)
    h, m, s = t // 3600, (t // 60) % 60, t % 60
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


class Recorder(StatsCallback):
    """Records the smoothed training loss, lr and mom for every training batch, and one row per epoch:
    `epoch, train_loss, valid_loss, <metrics>, <extra columns>, time`.

    Per batch it only launches two small device kernels and appends two Python floats; every value is
    read back in one transfer at the end of the epoch. `values` holds fastai's rows (train_loss,
    valid_loss, metrics..., extra columns); `log` the last full row; `df` the whole table as a DataFrame.
    Other callbacks add columns by defining `epoch_columns()` returning `{name: value}`. Validation fills
    `valid_loss_accumulator` and the metrics (DistributedCallback refills them from the gathered predictions).
    It follows the statistics protocol (`learnkit.callbacks.stats`): its device records are the per-batch losses.
    In graph mode (`learnkit.graph_mode`) the smoothed loss is written inside the captured step into a buffer row at
    the device-side step index, and the epoch's rows join the records at its end.
    """
    order = 50
    graph_safe = True
    record_schema = {'loss': 'per training batch, the smoothed (debiased) training loss',
                     'batch_loss': "per training batch, that batch's own loss (recovered from the smoothing)"}

    def __init__(self, add_time=True, beta=0.98):
        self.add_time = add_time
        self.smooth_loss = AvgSmoothLoss(beta)
        self.valid_loss_accumulator = AvgLoss()
        self.lrs, self.moms, self.iters, self.values, self.log, self.logs = [], [], [], [], [], []
        self._raw_losses, self._valid_results, self.metric_names = TensorLog(), None, []

    def before_fit(self):
        self.lrs, self.moms, self.iters, self.values, self.logs = [], [], [], [], []
        self._raw_losses = TensorLog()
        self.smooth_loss.reset()
        self._epoch_start, self._valid_results = time.time(), None
        self._extra = [cb for cb in self.learn.cbs if hasattr(cb, 'epoch_columns')]
        extra_names = [k for cb in self._extra for k in cb.epoch_columns()]
        self.metric_names = (['epoch', 'train_loss', 'valid_loss'] + [m.name for m in self.learn.metrics]
                             + extra_names + (['time'] if self.add_time else []))

    def before_epoch(self):
        self._epoch_start = time.time()
        self._valid_results = None

    def before_validate(self):
        self.valid_loss_accumulator.reset()
        for m in self.learn.metrics: m.reset()

    def after_batch(self):
        if self.learn.loss is None: return            # batch cancelled before its loss
        if self.learn.training:
            self.smooth_loss.accumulate(self.learn)
            self._raw_losses.append(self.smooth_loss.val, copy=False)   # lerp made a fresh tensor
            opt = self.learn.opt
            self.lrs.append(opt.get_hyper('lr'))
            if 'mom' in opt.names: self.moms.append(opt.get_hyper('mom'))
        else:
            self.valid_loss_accumulator.accumulate(self.learn)
            for m in self.learn.metrics: m.accumulate(self.learn)

    def graph_setup(self, graph):
        "Graph mode: a row per training step of the fit for the smoothed loss, and the average carried in from before."
        start = self.smooth_loss.val if self.smooth_loss.val is not None else torch.zeros((), device=graph.device)
        self._graph_smooth = graph.buffer(start.detach().float().clone())
        self._graph_losses = graph.buffer(torch.zeros(graph.n_steps, device=graph.device))

    def graph_after_loss(self, graph):
        "Inside the captured step: AvgSmoothLoss's update, written at the step's row."
        self._graph_smooth.copy_(torch.lerp(graph.loss, self._graph_smooth, self.smooth_loss.beta))
        self._graph_losses.index_copy_(0, graph.step.view(1), self._graph_smooth.view(1))

    def graph_epoch_end(self, graph, start, stop):
        "The epoch's rows join the records (a device copy); lrs and moms come from the host's schedule tables."
        self._raw_losses.extend(self._graph_losses[start:stop])
        self.smooth_loss.val, self.smooth_loss.count = self._graph_smooth.clone(), self.smooth_loss.count + stop - start
        self.lrs.extend(graph.hyper_values('lr', start, stop))
        if 'mom' in self.learn.opt.names: self.moms.extend(graph.hyper_values('mom', start, stop))

    def after_validate(self):
        self._valid_results = [self.valid_loss_accumulator.value] + [m.value for m in self.learn.metrics]
        self.before_validate()        # clean accumulators, even if the next validation is cancelled early

    def after_epoch(self):
        n_metrics = len(self.learn.metrics)
        valid = self._valid_results or [None] * (1 + n_metrics)
        numbers = _read_all([self.smooth_loss.value] + valid)  # the one host read of the epoch
        extra = [v for cb in self._extra for v in cb.epoch_columns().values()]
        self.values.append(numbers + extra)
        self.iters.append(len(self.lrs))
        self.log = [self.learn.epoch] + numbers + extra + ([format_time(time.time() - self._epoch_start)]
                                                            if self.add_time else [])
        self.logs.append(self.log)
        self._valid_results = None
        self.learn.logger(self.log)

    def state_dict(self):
        "The history so far (per-batch losses, lrs and moms; per-epoch rows), so a resumed fit continues it."
        smooth = self.smooth_loss
        val = getattr(smooth, 'val', None)
        return {'losses': self._raw_losses.state_dict(), 'smooth_count': getattr(smooth, 'count', 0),
                'smooth_val': None if val is None else val.cpu(),  # sync-ok: checkpoints only
                'lrs': self.lrs, 'moms': self.moms, 'iters': self.iters, 'values': self.values,
                'logs': self.logs, 'metric_names': self.metric_names}

    def load_state_dict(self, state):
        device = self.learn.device if self.learn is not None else None
        self._raw_losses.load_state_dict(state['losses'], device)
        val = state['smooth_val']
        self.smooth_loss.count, self.smooth_loss.val = state['smooth_count'], None if val is None else val.to(device)
        self.lrs, self.moms, self.iters = list(state['lrs']), list(state['moms']), list(state['iters'])
        self.values, self.logs, self.metric_names = list(state['values']), list(state['logs']), list(state['metric_names'])
        self.log = self.logs[-1] if self.logs else []

    @property
    def final_record(self):
        "[valid_loss, *metrics] of the last validation run, as floats."
        return _read_all(self._valid_results) if self._valid_results is not None else None

    @property
    def losses(self):
        "Smoothed (debiased) training loss per batch, as a list of floats (read from the device now)."
        return self.stats['loss'].tolist()  # sync-ok: CPU tensor, read on request

    def device_records(self):
        return {'smooth': self._raw_losses.values()} if len(self._raw_losses) else {}

    def summarize(self, raw):
        "`loss` (smoothed, debiased) and `batch_loss` per training batch, in float64, from the moving average."
        smooth = raw.get('smooth', torch.zeros(0)).double().reshape(-1)
        beta = self.smooth_loss.beta
        steps = torch.arange(1, len(smooth) + 1, dtype=torch.float64)
        previous = torch.cat([smooth.new_zeros(1), smooth[:-1]])  # the average starts at 0 (see AvgSmoothLoss)
        return {'loss': smooth / (1 - beta ** steps), 'batch_loss': (smooth - beta * previous) / (1 - beta)}

    @property
    def df(self):
        "The per-epoch results table as a pandas DataFrame."
        import pandas as pd
        return pd.DataFrame(self.logs, columns=self.metric_names)

    def plot_loss(self, skip_start=5, with_valid=True, ax=None):
        "Smoothed training loss per batch, with the validation loss at the end of each epoch."
        fig, ax = _fig_ax(ax)
        losses = self.losses
        ax.plot(range(skip_start, len(losses)), losses[skip_start:], label='train')
        if with_valid:
            idx = [i for i, v in enumerate(self.values) if v[1] is not None]
            if idx:
                ax.plot([self.iters[i] for i in idx], [self.values[i][1] for i in idx], label='valid')
        ax.set_xlabel('batch'); ax.set_ylabel('loss'); ax.legend()
        return fig

    def plot_sched(self, figsize=None):
        "The learning rate and momentum used at each training batch."
        import matplotlib.pyplot as plt
        hps = {'lr': self.lrs, **({'mom': self.moms} if self.moms else {})}
        fig, axs = plt.subplots(1, len(hps), figsize=figsize or (6 * len(hps), 4), squeeze=False)
        for ax, (name, vals) in zip(axs[0], hps.items()):
            ax.plot(vals); ax.set_xlabel('batch'); ax.set_ylabel(name)
        return fig

    def plot_metrics(self, nrows=None, ncols=None, figsize=None):
        "Each per-epoch column (losses and metrics) against the epoch."
        import matplotlib.pyplot as plt
        import math
        names = self.metric_names[1:len(self.values[0]) + 1] if self.values else []
        if not names: raise ValueError("No epochs recorded yet: call fit first")
        ncols = ncols or min(3, len(names) - 1) or 1
        nrows = nrows or math.ceil((len(names) - 1) / ncols)
        fig, axs = plt.subplots(nrows, ncols, figsize=figsize or (5 * ncols, 3.5 * nrows), squeeze=False)
        axs = axs.flatten()
        epochs = [log[0] for log in self.logs]
        for i, name in enumerate(names[1:]):
            ax = axs[i]
            if i == 0:
                ax.plot(epochs, [v[0] for v in self.values], label='train_loss')
                ax.plot(epochs, [v[1] for v in self.values], label='valid_loss'); ax.set_title('loss'); ax.legend()
            else:
                ax.plot(epochs, [v[i + 1] for v in self.values]); ax.set_title(name)
            ax.set_xlabel('epoch')
        for ax in axs[len(names) - 1:]: ax.set_visible(False)
        return fig

    def plot_lr_find(self, skip_end=5, skip_start=10, suggestions=None, ax=None):
        "Loss against learning rate (log scale) from the last `lr_find`, with suggestions marked."
        fig, ax = _fig_ax(ax)
        lrs, losses = lr_find_curve(self.lrs, self.losses, skip_end, skip_start)
        ax.plot(lrs, losses); ax.set_xscale('log')
        ax.set_xlabel('Learning Rate'); ax.set_ylabel('Loss')
        for (name, lr), color in zip((suggestions or {}).items(), ('C1', 'C2', 'C3', 'C4')):
            ax.axvline(lr, color=color, linestyle='--', label=f'{name}: {lr:.2e}')
        if suggestions: ax.legend()
        return fig


def lr_find_curve(lrs, losses, skip_end=5, skip_start=0):
    """The lr finder's curve as numpy arrays, cut at the first divergence (loss > 4x its running minimum;
    the device-side check may run a few batches past it), without the first `skip_start` points (the
    smoothed loss is still noisy there) and the last `skip_end`, as fastai does."""
    import numpy as np
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)[:len(lrs)]
    bad = np.nonzero((losses > 4 * np.minimum.accumulate(losses)) | ~np.isfinite(losses))[0]
    n = bad[0] + 1 if len(bad) else len(losses)
    lrs, losses = lrs[:n], losses[:n]
    end = n - skip_end if n > skip_end + skip_start + 2 else n
    start = skip_start if end > skip_start + 2 else 0
    return lrs[start:end], losses[start:end]


def _fig_ax(ax, figsize=(6, 4)):
    import matplotlib.pyplot as plt
    if ax is None: fig, ax = plt.subplots(figsize=figsize)
    else: fig = ax.figure
    return fig, ax


def _read_all(vals):
    "Read a list of device tensors / numbers / None to floats with a single transfer."
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    if tensors:
        dev = tensors[0].device
        read = iter(torch.stack([t.detach().float().reshape(()).to(dev) for t in tensors]).tolist())  # sync-ok: epoch end
    return [next(read) if isinstance(v, torch.Tensor) else (None if v is None else float(v)) for v in vals]
