"""Callbacks that watch training and act on it: keep checkpoints, stop early, stop on a non-finite loss.

`SaveModelCallback` and `EarlyStoppingCallback` read their monitored value from the recorder's row at the
end of each epoch (`learn.recorder.metric_names` / `learn.recorder.log`), where it has already been read
from the device. `TerminateOnNaNCallback` checks the loss on the device and reads the result only every
`check_every` batches, so it adds no host sync to the batch loop.
"""
import operator
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

from ..callback import Callback, CancelFitException
from ..checkpoint_io import (epoch_start_state, is_main_process, load_checkpoint, load_checkpoint_from_rank0,
                             save_checkpoint)

__all__ = ['TrackerCallback', 'SaveModelCallback', 'EarlyStoppingCallback', 'TerminateOnNaNCallback']


class TrackerCallback(Callback):
    """Tracks `monitor` (a column of the results table: 'valid_loss', 'train_loss' or a metric's name) and
    notes each epoch whether it improved by more than `min_delta`. `comp` (e.g. `operator.lt`) says what
    is better; by default lower for names with 'loss' or 'error' in them, higher otherwise."""
    order = 61   # after the Recorder (50) has read the epoch's row, and the progress display has shown it

    def __init__(self, monitor='valid_loss', comp=None, min_delta=0.):
        if comp is None: comp = operator.lt if ('loss' in monitor or 'error' in monitor) else operator.gt
        self.monitor, self.comp, self.min_delta = monitor, comp, abs(min_delta)
        self.best, self.improved = None, False

    def before_fit(self):
        if not hasattr(self.learn, 'recorder'):
            raise ValueError(f"{type(self).__name__} reads the Recorder's results table, and this Learner has no "
                             "Recorder: build it with default_cbs=True or add learnkit.Recorder()")
        names = self.learn.recorder.metric_names
        if self.monitor not in names[1:]:
            raise ValueError(f"{type(self).__name__} monitors {self.monitor!r}, which is not a column of the results "
                             f"table {names[1:]}; pass monitor= one of those (a metric's column is its name)")
        self.best, self.improved = None, False

    def after_epoch(self):
        value = self.learn.recorder.log[self.learn.recorder.metric_names.index(self.monitor)]
        if value is None:
            raise ValueError(f"{type(self).__name__}: {self.monitor!r} has no value at epoch {self.learn.epoch} "
                             "(no validation loader?); monitor 'train_loss' instead")
        lower_is_better = self.comp(0., 1.)
        delta = -self.min_delta if lower_is_better else self.min_delta
        self.improved = self.best is None or self.comp(value - delta, self.best)
        if self.improved: self.best = value

    def state_dict(self): return {'best': self.best}
    def load_state_dict(self, state): self.best = state['best']


class SaveModelCallback(TrackerCallback):
    """Checkpoints the full training state (see `learn.save`) under `learn.path/learn.model_dir`:

    - `{fname}.pth` whenever `monitor` improves, or `{fname}_{epoch}.pth` every epoch with `every_epoch=True`;
    - `{fname}_last.pth` at the end of every epoch and, with `every_n_batches=N`, after every N-th training
      batch: the point `fit(..., resume='last')` continues from after a crash.

    At the end of a fit (when not `every_epoch`) the best weights are loaded back, as in fastai. With a
    `TerminateOnNaNCallback` present, no checkpoint is written before the non-finite check has seen every
    batch so far, so the last checkpoint is always a good one. Only rank 0 of a distributed run writes.
    """
    def __init__(self, monitor='valid_loss', comp=None, min_delta=0., fname='model', every_epoch=False,
                 with_opt=True, every_n_batches=None):
        super().__init__(monitor, comp, min_delta)
        if every_n_batches is not None and (not isinstance(every_n_batches, int) or every_n_batches < 1):
            raise ValueError(f"every_n_batches must be a positive int or None; got {every_n_batches!r}")
        self.fname, self.every_epoch, self.with_opt, self.every_n_batches = fname, every_epoch, with_opt, every_n_batches
        self.last_saved, self.last_written, self.saved_best, self._best_written = None, None, False, False
        self._epoch_start = None

    @property
    def last_name(self): return f'{self.fname}_last'

    def before_fit(self):
        super().before_fit()
        self.saved_best = self._best_written = False
        self.last_written = None

    def before_train(self):
        # A plain DataLoader draws its epoch order from the RNG now; mid-epoch checkpoints keep that state
        # so a resumed epoch replays the same order. A resumed epoch began in the interrupted run.
        if self.every_n_batches is None: return
        resumed = self.learn.start_batch and hasattr(self.learn, 'resume')
        self._epoch_start = self.learn.resume.epoch_start if resumed else epoch_start_state(self.learn.dl)

    def after_batch(self):
        n = self.every_n_batches
        if n is not None and self.learn.training and (self.learn.iter + 1) % n == 0:
            self._save(self.last_name, (self.learn.epoch, self.learn.iter + 1))

    def after_epoch(self):
        if not self.every_epoch: super().after_epoch()
        at = (self.learn.epoch + 1, 0)
        self._save(self.last_name, at)
        if self.every_epoch: self._save(f'{self.fname}_{self.learn.epoch}', at)
        elif self.improved:
            self.saved_best = self._save(self.fname, at) or self.saved_best
            self._best_written = True  # by rank 0, whichever rank this is

    def after_fit(self):
        if self.every_epoch or not self._best_written: return
        if isinstance(self.learn.model, DistributedDataParallel):
            # Only rank 0 wrote the file, and the other ranks may not see its files: it sends them the bytes, so
            # that every rank ends with the best weights and the ranks still agree.
            load_checkpoint_from_rank0(self.learn, self.fname, with_opt=self.with_opt, training_state=False)
        elif self.saved_best:
            load_checkpoint(self.learn, self.fname, with_opt=self.with_opt, training_state=False)

    def _save(self, name, resume_at):
        "Write a checkpoint (rank 0 only); True if written."
        for cb in self.learn.cbs:
            if isinstance(cb, TerminateOnNaNCallback): cb.check()   # never checkpoint weights a NaN has reached
        if is_main_process(): self.last_saved = save_checkpoint(self.learn, name, self.with_opt, resume_at,
                                                                self._epoch_start)
        self.last_written = name  # by rank 0, known on every rank: what TerminateOnNaN restores under DDP
        return is_main_process()


class EarlyStoppingCallback(TrackerCallback):
    "Stops the fit when `monitor` has not improved by more than `min_delta` for `patience` epochs."
    order = TrackerCallback.order + 1   # after SaveModelCallback has saved the epoch

    def __init__(self, monitor='valid_loss', comp=None, min_delta=0., patience=1):
        super().__init__(monitor, comp, min_delta)
        if not isinstance(patience, int) or patience < 1: raise ValueError(f"patience must be an int >= 1; got {patience!r}")
        self.patience, self.wait, self.stopped_epoch = patience, 0, None

    def before_fit(self):
        super().before_fit()
        self.wait, self.stopped_epoch = 0, None

    def after_epoch(self):
        super().after_epoch()
        self.wait = 0 if self.improved else self.wait + 1
        if self.wait >= self.patience:
            self.stopped_epoch = self.learn.epoch
            if is_main_process():
                print(f"No improvement in {self.monitor} since epoch {self.learn.epoch - self.wait} "
                      f"(best {self.best:.6g}): early stopping")
            raise CancelFitException()

    def state_dict(self): return {'best': self.best, 'wait': self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state['best'], state['wait']


class TerminateOnNaNCallback(Callback):
    """Stops the fit at the first training batch whose loss is NaN or infinite, names that batch, and puts
    back the model and optimizer of the last checkpoint `SaveModelCallback` wrote before it.

    Without a host sync in the batch loop: each batch writes `~isfinite(loss)` into a small device buffer.
    Every `check_every` batches the buffer is copied to pinned host memory without waiting (on a GPU), and
    the copy is read at a later batch once the device has made it; on the CPU it is read at once. So the fit
    stops at most `check_every` batches (plus the GPU's queue) after the bad one, and the batch it names is
    still the first bad one (under DDP, where every rank must stop at the same batch, a copy is read when the
    next one is sent: at most 2 x `check_every` batches after). At the end of each training epoch, and before
    any checkpoint is written, every flag so far is read (waiting for the device), so no checkpoint holds
    weights a bad batch has touched.
    The message is issued as a RuntimeWarning and kept in `message`, the batch in `bad_batch` = (epoch,
    batch). Validation losses are not checked.
    """
    order, run_valid = 55, False

    def __init__(self, check_every=16):
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int; got {check_every!r}")
        self.check_every = check_every
        self.before_fit()

    def before_fit(self):
        self._flags, self._where, self._reads, self._seen = None, [], [], 0
        self.bad_batch = self.message = None

    def after_batch(self):
        loss = self.learn.loss
        if loss is None: return                          # a batch cancelled before its loss
        if self._flags is None: self._flags = torch.zeros(self.check_every, dtype=torch.bool, device=loss.device)
        self._flags[len(self._where)] = ~torch.isfinite(loss).all()
        self._where.append((self.learn.epoch, self.learn.iter, self._seen))
        self._seen += 1
        # Under DDP every rank must stop at the same batch: each copy is read when the next one is sent, a window
        # later (long done by then, so the wait costs nothing), rather than as soon as this rank's device made it.
        ddp = isinstance(self.learn.model, DistributedDataParallel)
        if len(self._where) == self.check_every:
            if ddp: self._receive(wait=True)
            self._send()
        if not ddp: self._receive(wait=False)

    def after_train(self): self.check()

    def check(self):
        "Read every flag so far, waiting for the device; stop the fit if one is set."
        if self._where: self._send()
        self._receive(wait=True)

    def _send(self):
        "Start reading the filled flags to the host; later batches write into a fresh buffer meanwhile."
        flags, n = self._flags, len(self._where)
        if flags.is_cuda:
            host = torch.empty(n, dtype=torch.bool, pin_memory=True)
            host.copy_(flags[:n], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self._flags = torch.zeros_like(flags)
        else: host, copied = flags[:n].clone(), None
        self._reads.append((host, copied, self._where))
        self._where = []

    def _receive(self, wait):
        "Look at the copies the device has finished (all of them with `wait`), oldest first."
        while self._reads:
            host, copied, where = self._reads[0]
            if copied is not None and not copied.query():
                if not wait: return
                copied.synchronize()  # sync-ok: epoch end, before a checkpoint, or (DDP) a window-old copy
            self._reads.pop(0)
            bad = [w for w, flag in zip(where, host.tolist()) if flag]  # sync-ok: periodic, documented
            if bad: self._stop(*bad[0])

    def _stop(self, epoch, batch, seen):
        self.bad_batch = (epoch, batch)
        # Under DDP every rank stops at the same batch (the loss it checks is averaged over the ranks), and rank 0,
        # which alone wrote the checkpoint, sends it to the others; alone, a process restores what it wrote.
        ddp = isinstance(self.learn.model, DistributedDataParallel)
        saver = next((cb for cb in self.learn.cbs if isinstance(cb, SaveModelCallback)
                      and (cb.last_written if ddp else cb.last_saved)), None)
        if saver is not None:
            if ddp: file = load_checkpoint_from_rank0(self.learn, saver.last_written, saver.with_opt, False)
            else: file = load_checkpoint(self.learn, saver.last_saved, with_opt=saver.with_opt, training_state=False)
            kept = f"Restored the model and optimizer from {file}, the last checkpoint before it."
        else:
            kept = ("No checkpoint was written before it, so the weights may now hold NaN/inf: add "
                    "SaveModelCallback(every_n_batches=N) to keep a good one.")
        self.message = (f"TerminateOnNaN: the training loss was NaN or infinite at epoch {epoch}, batch {batch} (the "
                        f"first such batch; the fit stopped {self._seen - seen - 1} batch(es) later). {kept} Likely "
                        "causes: a learning rate too high, or NaN/inf in the inputs or targets.")
        warnings.warn(self.message, RuntimeWarning, stacklevel=2)
        raise CancelFitException()
