"""`ResumeCallback`: what `fit(..., resume=...)` adds to continue an interrupted fit from its checkpoint."""
import os
import warnings

import torch

from ..callback import Callback
from ..checkpoint_io import CheckpointError, checkpoint_file, read_checkpoint, restore
from ..rng import set_rng_states

__all__ = ['ResumeCallback']


class _StartedLoader:
    "A plain DataLoader's iterator already moved past the batches a resumed epoch had done."
    def __init__(self, dl, batches): self.dl, self.batches = dl, batches
    def __iter__(self): return self.batches
    def __len__(self): return len(self.dl)
    def __getattr__(self, k): return getattr(self.__dict__['dl'], k)



class ResumeCallback(Callback):
    """Added by `fit(..., resume=...)`: restores an interrupted fit from a checkpoint, mid-epoch included.

    `resume='last'` is the `{fname}_last.pth` that `SaveModelCallback` keeps (fname 'model' by default);
    a path or name picks another checkpoint written by `SaveModelCallback`. It runs after every other
    callback's `before_fit`, which resets their state, and puts back the checkpoint's. A plain torch
    DataLoader is replayed from the RNG state it drew the interrupted epoch's order from, and moved past
    the batches already done; a learnkit loader starts there directly (`set_epoch(epoch, start_batch)`).
    """
    order = 1000

    def __init__(self, resume):
        if not (resume == 'last' or isinstance(resume, (str, os.PathLike))):
            raise TypeError(f"resume must be 'last' or a checkpoint path; got {resume!r}")
        self.resume, self.file, self._pending, self.epoch_start = resume, None, None, None

    def resume_file(self):
        "The checkpoint to resume from."
        if self.resume != 'last': return checkpoint_file(self.learn, self.resume)
        saver = next((cb for cb in self.learn.cbs if hasattr(cb, 'last_name')), None)
        file = checkpoint_file(self.learn, saver.last_name if saver is not None else 'model_last')
        if not file.is_file():
            raise FileNotFoundError(f"fit(resume='last') found no checkpoint at {file}. A fit writes one when it "
                                    "runs with SaveModelCallback (every epoch, and every_n_batches=N mid-epoch); "
                                    "pass resume=None to start afresh, or resume=<path>.")
        return file

    def before_fit(self):
        learn = self.learn
        self.file = self.resume_file()
        state = read_checkpoint(self.file)
        loop = state['loop']
        if loop['resume_at'] is None:
            raise CheckpointError(f"{self.file} was written by learn.save, not by SaveModelCallback during a fit, so "
                                  "it does not say where to continue: learn.load it and start a new fit instead")
        if loop['n_epoch'] != learn.n_epoch:
            raise ValueError(f"{self.file} comes from a fit of {loop['n_epoch']} epochs, but this fit has "
                             f"{learn.n_epoch}: resume with the same n_epoch (and schedule) to continue it exactly")
        missing = sorted(set(state['callbacks']) - {cb.name for cb in learn.cbs})
        if missing:
            warnings.warn(f"Resuming from {self.file} without the callbacks {missing} that were saved in it; "
                          "their state is not restored. Pass them to fit again to continue exactly.", stacklevel=2)
        restore(learn, state, self.file)
        epoch, batch = loop['resume_at']
        learn.start_epoch = learn.epoch = epoch
        if batch:
            learn.start_batch = batch
            self.epoch_start = (state['data'] or {}).get('epoch_start')
            self._pending = (batch, loop['pct_train'], state['rng'], state['data'])

    def before_train(self):
        "Mid-epoch: start the loader after the done batches, then restore the RNG as it was after them."
        if self._pending is None: return
        batch, pct_train, rng, data = self._pending
        self._pending = None
        learn = self.learn
        learn.pct_train = pct_train
        if data is not None and data['kind'] == 'torch':
            if data['epoch_start'] is None:
                raise CheckpointError(f"{self.file} was saved mid-epoch without the state a plain DataLoader drew "
                                      "that epoch's order from; resume from an epoch-end checkpoint instead")
            torch.set_rng_state(data['epoch_start']['torch'])
            if data['epoch_start']['generator'] is not None: learn.dl.generator.set_state(data['epoch_start']['generator'])
            batches = iter(learn.dl)
            for _ in range(batch): next(batches)
            learn.dl = _StartedLoader(learn.dl, batches)
            if data['generator'] is not None: learn.dl.generator.set_state(data['generator'])
        set_rng_states(rng)

    def after_train(self): self.learn.start_batch = 0
    def cleanup_fit(self): self.learn.start_batch = 0
