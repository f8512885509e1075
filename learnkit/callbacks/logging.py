"""Loggers: the results table to a CSV file, and losses, metrics, hyper-parameters and activation
histograms to TensorBoard. Both write at the end of each epoch, from values the Recorder has already
read from the device, so they add nothing to the batch loop. Only rank 0 of a distributed run writes."""
import csv
import os
from pathlib import Path

import torch

from ..callback import Callback
from ..checkpoint_io import is_main_process

__all__ = ['CSVLogger', 'TensorBoardCallback']


class CSVLogger(Callback):
    """Writes the results table to `learn.path/fname`, one line per epoch, flushed and fsynced as soon as the
    epoch ends, so a crash keeps every finished epoch.

    With `append=False` the file is rewritten at the first epoch of each fit from the recorder's history:
    for a fit resumed with `resume=...` that history comes from the checkpoint, so the file ends up as an
    uninterrupted run's. With `append=True` lines are added after the existing ones (the header is written
    only to an empty file). `read_log()` returns the file as a DataFrame."""
    order = 51   # after the Recorder (50) has made the epoch's row

    def __init__(self, fname='history.csv', append=False):
        self.fname, self.append = fname, append
        self.path, self._file = None, None

    def before_fit(self):
        self.path = Path(self.learn.path) / self.fname
        self._file = None

    def after_epoch(self):
        if not is_main_process(): return
        rec = self.learn.recorder
        if self._file is None: self._open(rec)
        else: self._write([rec.log])

    def _open(self, rec):
        "At the fit's first epoch end: write the header and this fit's rows so far (all of them, when resumed)."
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.append or not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, 'a' if self.append else 'w', newline='')
        self._write(([rec.metric_names] if fresh else []) + ([rec.log] if self.append else rec.logs))

    def _write(self, rows):
        csv.writer(self._file).writerows(rows)
        self._file.flush()
        os.fsync(self._file.fileno())

    def cleanup_fit(self):
        if self._file is not None: self._file.close()
        self._file = None

    def read_log(self):
        "The CSV file as a pandas DataFrame."
        import pandas as pd
        if self.path is None: raise ValueError("CSVLogger has not written anything yet: add it to a fit first")
        return pd.read_csv(self.path)


class TensorBoardCallback(Callback):
    """Logs to TensorBoard at the end of each epoch: the smoothed training loss, lr and mom of every batch
    (`train/smooth_loss`, `hp/lr`, `hp/mom`, step = batch of the fit), every column of the results table
    (`epoch/<name>`, step = epoch) and, when `ActivationStats` is attached, each hooked layer's mean, std and
    near-zero fraction over the epoch (`activations/<layer>/<stat>`) and, if it records them, its histogram
    summed over the epoch's batches (`activations/<layer>`).

    Needs the `tensorboard` package (`pip install 'learnkit[tensorboard]'`). `log_dir=None` is torch's
    default, `runs/<date>_<host>`. Each fit writes a new event file in `log_dir`."""
    order = 61   # after the Recorder (50) has read the epoch's row

    def __init__(self, log_dir=None):
        try: from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoardCallback needs the tensorboard package: pip install tensorboard "
                              "(or pip install 'learnkit[tensorboard]')") from e
        self._writer_class, self.log_dir, self.writer = SummaryWriter, log_dir, None
        self._first_iter = 0

    def before_fit(self):
        if is_main_process(): self.writer = self._writer_class(log_dir=self.log_dir)

    def before_train(self): self._first_iter = self.learn.train_iter

    def after_epoch(self):
        if self.writer is None: return
        rec, w = self.learn.recorder, self.writer
        done = rec.iters[-2] if len(rec.iters) > 1 else 0      # batches logged at earlier epoch ends
        losses = rec.losses
        for i in range(done, len(rec.lrs)):
            w.add_scalar('train/smooth_loss', losses[i], i)
            w.add_scalar('hp/lr', rec.lrs[i], i)
            if rec.moms: w.add_scalar('hp/mom', rec.moms[i], i)
        for name, value in zip(rec.metric_names, rec.log):
            if name not in ('epoch', 'time') and isinstance(value, (int, float)):
                w.add_scalar(f'epoch/{name}', value, self.learn.epoch)
        act = getattr(self.learn, 'activation_stats', None)
        if act is not None and len(act.iters): self._log_activations(act)
        w.flush()

    def _log_activations(self, act):
        "The epoch's rows of the activation records (`stats` is one host read, cached by ActivationStats)."
        stats = act.stats
        rows = stats['iters'] >= self._first_iter
        if not rows.any(): return
        step = self.learn.epoch
        for i, name in enumerate(stats['layer_names']):
            for k in ('mean', 'std', 'near_zero'):
                value = float(stats[k][rows, i].nanmean())  # sync-ok: CPU tensors from stats, epoch end
                self.writer.add_scalar(f'activations/{name}/{k}', value, step)
            if 'hist' not in stats: continue
            counts = stats['hist'][rows, i].sum(0).double()
            lo, hi = act.hist_range
            edges = torch.linspace(lo, hi, len(counts) + 1, dtype=torch.float64)
            centres = (edges[:-1] + edges[1:]) / 2
            self.writer.add_histogram_raw(f'activations/{name}', min=lo, max=hi,
                                          num=float(counts.sum()),  # sync-ok: CPU tensors, epoch end
                                          sum=float(counts @ centres), sum_squares=float(counts @ centres ** 2),
                                          bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),  # sync-ok: epoch end
                                          global_step=step)

    def after_fit(self): self.cleanup_fit()

    def cleanup_fit(self):
        if self.writer is not None: self.writer.close()
        self.writer = None
