"""Data-parallel training on several processes with torch.distributed (DistributedDataParallel, torchrun).

Launch the same script once per device with `torchrun --nproc_per_node=N script.py` (or
`torchrun --nproc_per_node=N -m learnkit train ...`). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a Learner
built in such a process gets a `DistributedCallback` by default, and `learn.distrib_ctx()` adds one explicitly.
Outside such a launch nothing changes, so the same script also runs in one process.

What the callback does, and the choices behind it:
- Process group: joined on first use (nccl for CUDA devices, gloo for the CPU), with a timeout, so a rank that
  waits for a dead peer fails instead of hanging (torchrun also stops every rank when one fails).
- Model: wrapped in `DistributedDataParallel` for fit, on this rank's device (cuda:LOCAL_RANK), and unwrapped
  in `cleanup_fit` however fit ends, so `learn.model` is the plain module outside fit. Buffers (BatchNorm's
  running statistics) are broadcast from rank 0 once per epoch, after training, instead of before every
  forward: training forwards do not read them, and validation and checkpoints then see rank 0's on every
  rank. DDP's per-forward broadcast stays available through `ddp_kwargs` (`forward_sync_buffers=True`, or
  `broadcast_buffers=True` before torch 2.14), for models whose training forward reads a buffer.
- Data: each phase iterates this rank's shard. learnkit loaders shard themselves (`dl.shard(rank, world_size)`),
  with the shuffle seed broadcast from rank 0 so the shards of one epoch are disjoint; plain torch DataLoaders
  are rebuilt around a `DistributedSampler`. Every rank gets as many items (the shard is padded by repeating
  the first items, as torch does), so every rank runs as many batches. `bs` is per process: the global batch is
  `bs * world_size`.
- Gradient accumulation: with `GradientAccumulation`, only the backward of a batch that steps all-reduces the
  gradients (DDP's `no_sync` for the others), so an accumulated step costs one all-reduce, not one per batch.
- Training loss: the loss of each training batch is averaged across ranks at `after_loss`, so the Recorder, the
  progress bar and every callback that reads `learn.loss` (lr_find's divergence check, NaN guards) see the loss
  of the global batch and take the same decisions on every rank. This is one scalar all-reduce per batch.
- Validation: predictions and targets are gathered from all ranks at `after_validate`, put back in the order
  of the unsharded loader, the padding dropped, and the loss and metrics are recomputed once on the whole set
  on every rank (before the Recorder reads them). So `validate()` and the results table equal a single process
  on the full validation set for any loss and metric that averages over items (and non-averaging metrics
  are computed on the whole set rather than per rank). We chose this over all-reducing the accumulators'
  (total, count) pairs because it needs no knowledge of each metric's internals and masks the padding
  exactly; its cost is one gather of the predictions (n_valid x n_outputs values) per validation.
  `get_preds` returns the gathered predictions on every rank.
- Statistics: every `StatsCallback` (ActivationStats, GradientStats, GradientNoiseScale, ...) gives a mark of
  its records before each epoch's training (`records_mark()`) and, after it, combines what it recorded since
  across ranks itself (`combine_ranks(mark)`), so every rank reads the statistics of the global batches. This
  callback knows nothing else of them.
- Checkpoints: only rank 0 writes them. When SaveModelCallback loads the best epoch back at the end of fit,
  or TerminateOnNaNCallback the last good checkpoint, rank 0 sends the file's bytes to the other ranks (which
  may not see its files), so every rank ends with the same weights.
- Display: only rank 0 shows the progress bar and per-epoch lines. Callbacks that write files (checkpoints,
  CSV, TensorBoard) or print reports check `is_rank0()` (or decorate the method with `rank0_only`).

Every rank must run the same sequence of fits, validations and lr_finds: each of them meets collectives.
To evaluate on rank 0 alone, remove the callback for that call: `with learn.removed_cbs(learn.distributed): ...`.
"""
import atexit
import contextlib
import datetime
import functools
import inspect
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..callback import Callback, noop
from ..metrics import batch_size
from .batch_size import GradientAccumulation
from .collectives import (all_gather, all_reduce_max, all_reduce_mean, all_reduce_sum, broadcast, broadcast_bytes,
                          broadcast_int, gather_interleaved)
from .core import GatherPredsCallback
from .progress import ProgressCallback
from .schedule import LRFinder
from .stats import StatsCallback

__all__ = ['DEFAULT_TIMEOUT', 'rank_distrib', 'num_distrib', 'local_rank_distrib', 'is_rank0', 'rank0_only',
           'launched_distributed', 'local_device', 'setup_distrib', 'teardown_distrib', 'unwrap_model',
           'all_reduce_sum', 'all_reduce_max', 'all_reduce_mean', 'broadcast', 'broadcast_int', 'broadcast_bytes',
           'all_gather', 'gather_interleaved', 'DistributedCallback', 'distrib_ctx', 'torchrun_callbacks']

# A collective that waits longer than this for a peer raises instead of hanging (checkpoint writes on rank 0
# take seconds, so minutes leave a wide margin).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


# ---- where this process stands ----------------------------------------------------------------------------------
def _group_ready(): return dist.is_available() and dist.is_initialized()


def rank_distrib():
    "This process's global rank: from the process group when there is one, else torchrun's RANK (0 when alone)."
    return dist.get_rank() if _group_ready() else int(os.environ.get('RANK', 0))


def num_distrib():
    "The number of processes: from the process group when there is one, else torchrun's WORLD_SIZE (1 when alone)."
    return dist.get_world_size() if _group_ready() else int(os.environ.get('WORLD_SIZE', 1))


def local_rank_distrib():
    "This process's rank on its machine (torchrun's LOCAL_RANK; 0 when alone): the index of its GPU."
    return int(os.environ.get('LOCAL_RANK', 0))


def is_rank0():
    "True in the process that writes files and prints (rank 0), and in a process that runs alone."
    return rank_distrib() == 0


def rank0_only(fn):
    """Decorator: run `fn` on rank 0 only (it returns None elsewhere). For callback methods that write files or
    print, e.g. a logger's `after_epoch`. Never use it on code that takes part in a collective."""
    @functools.wraps(fn)
    def _on_rank0(*args, **kwargs): return fn(*args, **kwargs) if is_rank0() else None
    return _on_rank0


def launched_distributed():
    "True when this process is one of several started by torchrun (WORLD_SIZE > 1), or joined a group of several."
    return num_distrib() > 1


def local_device(device=None):
    """The device this rank trains on: `cuda:LOCAL_RANK` when `device` is CUDA (or None with a GPU present),
    else `device` itself (the CPU)."""
    if device is None: device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if device.type != 'cuda': return device
    local, n_gpu = local_rank_distrib(), torch.cuda.device_count()
    if local >= n_gpu:
        raise RuntimeError(f"LOCAL_RANK={local} but this machine has {n_gpu} visible GPU(s): start at most one "
                           f"process per GPU (torchrun --nproc_per_node={n_gpu}), or train on the CPU with "
                           "Learner(..., device='cpu') (gloo backend)")
    return torch.device('cuda', local)


# ---- the process group ------------------------------------------------------------------------------------------
def setup_distrib(device=None, timeout=DEFAULT_TIMEOUT):
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
    unless this process is in one already: nccl when `device` is CUDA, gloo otherwise. Collectives that wait
    longer than `timeout` raise. Returns True when this call created the group (then `teardown_distrib` ends it)."""
    if _group_ready(): return False
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
    if missing:
        raise RuntimeError(f"Distributed training needs the environment torchrun sets; {', '.join(missing)} "
                           "missing. Launch with `torchrun --nproc_per_node=N script.py`.")
    device = local_device(device)
    if device.type != 'cuda': dist.init_process_group('gloo', timeout=timeout)
    else:
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', timeout=timeout, device_id=device)
    return True


def teardown_distrib():
    "Leave the process group, if this process is in one."
    if _group_ready(): dist.destroy_process_group()


def unwrap_model(model):
    "The plain module inside a DistributedDataParallel wrapper (the model itself otherwise): save this one."
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- sharding loaders --------------------------------------------------------------------------------------------
def _n_items(dl):
    "Items in the whole (unsharded) data set behind `dl`."
    if hasattr(dl, 'shard'): return dl.n
    return len(dl.dataset)


def _distributed_torch_loader(dl, rank, world_size, seed):
    "A torch DataLoader like `dl` that yields only this rank's part, through a DistributedSampler."
    from torch.utils.data import (DataLoader, DistributedSampler, IterableDataset, RandomSampler,
                                  SequentialSampler)
    if isinstance(dl.dataset, IterableDataset):
        raise TypeError("DistributedCallback cannot shard a DataLoader over an IterableDataset: make the dataset "
                        "yield only rank rank_distrib()'s part of each epoch, or use a map-style dataset")
    if dl.batch_size is None or not isinstance(dl.sampler, (RandomSampler, SequentialSampler)):
        raise TypeError(f"DistributedCallback rebuilds plain DataLoaders with a DistributedSampler, but this one "
                        f"uses a custom {type(dl.sampler).__name__}/batch_sampler: build it with "
                        "torch.utils.data.DistributedSampler (or a sampler that shards) yourself")
    sampler = DistributedSampler(dl.dataset, world_size, rank, shuffle=isinstance(dl.sampler, RandomSampler),
                                 seed=seed)
    return DataLoader(dl.dataset, dl.batch_size, sampler=sampler, num_workers=dl.num_workers,
                      collate_fn=dl.collate_fn, pin_memory=dl.pin_memory, drop_last=dl.drop_last, timeout=dl.timeout,
                      worker_init_fn=dl.worker_init_fn, multiprocessing_context=dl.multiprocessing_context,
                      prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers)


# DDP's option that turns off the buffer broadcast before each forward (renamed in torch 2.14; the old name warns).
_NO_FORWARD_BUFFER_SYNC = ('forward_sync_buffers' if 'forward_sync_buffers' in
                           inspect.signature(DistributedDataParallel.__init__).parameters else 'broadcast_buffers')


# ---- the callback ------------------------------------------------------------------------------------------------
class DistributedCallback(Callback):
    """Data-parallel training across the processes torchrun started (see the module docstring for what it does).

    Added by default to a Learner built in a process torchrun started with WORLD_SIZE > 1, or through
    `learn.distrib_ctx()`. `timeout` bounds how long a collective waits for a peer; `ddp_kwargs` go to
    `DistributedDataParallel` (e.g. `find_unused_parameters=True`). It runs early (order 5) so that every
    later callback sees the global training loss and the gathered validation results.
    """
    order = 5

    def __init__(self, timeout=DEFAULT_TIMEOUT, **ddp_kwargs):
        self.timeout, self.ddp_kwargs = timeout, ddp_kwargs
        self._active, self._sharded, self._rebuilt, self._muted, self._saved_logger = False, [], {}, [], None
        self._valid_batches, self._record_marks = [], []
        self._accumulation = None

    @property
    def rank(self): return rank_distrib()

    @property
    def world_size(self): return num_distrib()

    def after_create(self):
        # Before anything moves to the device: each rank trains on its own GPU.
        self.learn.device = local_device(self.learn.device)

    # -- set-up and clean-up, shared by fit, validate and get_preds --
    def _setup(self):
        if self._active: return
        if setup_distrib(self.learn.device, self.timeout): atexit.register(teardown_distrib)
        self._active = True
        if self.rank != 0:  # one display for the whole job
            self._muted = [cb for cb in self.learn.cbs if isinstance(cb, ProgressCallback) and cb.run]
            for cb in self._muted: cb.run = False
            self._saved_logger, self.learn.logger = self.learn.logger, noop

    def cleanup_fit(self):
        "Unwrap the model, unshard the loaders, restore the display: whatever way fit ended (no collectives here)."
        learn = self.learn
        if learn is not None and isinstance(learn.model, DistributedDataParallel): learn.model = learn.model.module
        for dl in self._sharded: dl.shard(0, 1)
        for cb in self._muted: cb.run = True
        if self._saved_logger is not None: learn.logger = self._saved_logger
        self._sharded, self._rebuilt, self._muted, self._saved_logger = [], {}, [], None
        self._valid_batches, self._record_marks, self._active = [], [], False

    # -- fit --
    def before_fit(self):
        self._setup()
        learn = self.learn
        if not isinstance(learn.model, DistributedDataParallel):
            dev = learn.device
            kwargs = {'device_ids': [dev.index]} if dev.type == 'cuda' else {}
            # DDP copies rank 0's weights and buffers to every rank here, so all ranks start equal. Buffers
            # (BatchNorm's running statistics) are then broadcast once per epoch, at after_train, rather than
            # before every forward as DDP does by default: training forwards do not read them, and the
            # per-forward broadcast cost a fifth of the throughput of a small CNN on a GPU.
            kwargs = {**kwargs, _NO_FORWARD_BUFFER_SYNC: False, **self.ddp_kwargs}
            learn.model = DistributedDataParallel(learn.model, **kwargs)
        self._accumulation = next((cb for cb in learn.cbs if isinstance(cb, GradientAccumulation)), None)
        if any(isinstance(cb, LRFinder) for cb in learn.cbs):
            # lr_find sized its fit from the unsharded loader; a rank's shard has 1/world_size of the batches,
            # so give the finder enough epochs to reach its num_it batches (it stops itself there).
            learn.n_epoch = learn.start_epoch + (learn.n_epoch - learn.start_epoch) * self.world_size + 1

    def before_train(self):
        self.learn.dl = self._shard(self.learn.dl)
        # Where each statistics callback's records stand, so that it combines this epoch's across ranks.
        self._record_marks = [(cb, cb.records_mark()) for cb in self.learn.cbs if isinstance(cb, StatsCallback)]

    def before_batch(self):
        # With GradientAccumulation, only the backward of a batch that steps all-reduces the gradients; the others
        # add to .grad locally, and the next all-reduce averages the whole accumulation. This is what DDP's
        # `no_sync()` sets, and like it, it must be in force from the forward pass on. Without it every
        # accumulated batch paid an all-reduce of the full gradient.
        acc, model = self._accumulation, self.learn.model
        if acc is not None and self.learn.training and isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = acc.steps_after(batch_size(self.learn))

    def after_train(self):
        if isinstance(self.learn.model, DistributedDataParallel): self.learn.model.require_backward_grad_sync = True
        self._unshard(self.learn.dl)
        for buf in unwrap_model(self.learn.model).buffers(): buf.copy_(broadcast(buf))  # rank 0's, for validation
        # One combine per statistics callback per epoch, before anything reads the epoch's records.
        for cb, mark in self._record_marks: cb.combine_ranks(mark)
        self._record_marks = []

    def after_fit(self):
        # Rank 0 may still be writing the last epoch's files (checkpoints) that the others are about to read
        # (SaveModelCallback loads the best weights back): wait for it.
        dist.barrier()

    # -- validation --
    def before_validate(self):
        self._setup()
        self.learn.dl = self._shard(self.learn.dl)
        self._valid_batches = []

    def after_loss(self):
        learn = self.learn
        if learn.training:
            # The loss of the global batch, on every rank (see the module docstring); grads are DDP's business.
            if learn.loss is not None: learn.loss = all_reduce_mean(learn.loss)
        elif isinstance(learn.pred, torch.Tensor): self._valid_batches.append((learn.pred.detach(), *learn.yb))
        else:
            raise TypeError(f"DistributedCallback gathers the validation predictions across ranks, so they must be "
                            f"one tensor; the model returned {type(learn.pred).__name__}. Return a tensor, or "
                            "validate in one process (outside torchrun)")

    def after_validate(self):
        self._gather_validation()
        self._unshard(self.learn.dl)
        self._valid_batches = []

    def _gather_validation(self):
        learn, n = self.learn, _n_items(self.learn.dl)
        n_local = sum(len(batch[0]) for batch in self._valid_batches)
        counts = torch.cat(all_gather(torch.tensor([n_local], device=learn.device)))
        counts = counts.tolist()  # sync-ok: once per validation
        if not any(counts): return  # cancelled on every rank before any batch
        if len(set(counts)) > 1:
            raise RuntimeError(f"Validation shards differ in size across ranks ({counts} items): every rank must "
                               "see as many validation items (use learnkit loaders, or drop_last=False)")
        preds, *targets = (gather_interleaved(torch.cat(parts), n) for parts in zip(*self._valid_batches))
        gather = next((cb for cb in learn.cbs if isinstance(cb, GatherPredsCallback)), None)
        if gather is not None:  # get_preds: hand it the whole set
            gather.preds, gather.targets = [preds], targets[:1]
            for name in ('inputs', 'losses'):
                parts = getattr(gather, name)
                if parts: setattr(gather, name, [gather_interleaved(torch.cat(parts), n)])
        self._recompute_metrics(preds, tuple(targets))

    def _recompute_metrics(self, preds, targets):
        "Loss and metrics on the whole gathered set, as one batch, into the accumulators the Recorder reads."
        learn = self.learn
        recorder = getattr(learn, 'recorder', None)
        accumulators = ([recorder.valid_loss_accumulator] if recorder is not None else []) + list(learn.metrics)
        saved = learn.xb, learn.yb, learn.pred, learn.loss
        try:
            learn.xb, learn.yb, learn.pred = (), targets, preds
            learn.loss = learn.loss_func(preds, *targets).detach() if targets else None
            for m in accumulators:
                m.reset()
                if learn.loss is not None: m.accumulate(learn)
        finally:
            learn.xb, learn.yb, learn.pred, learn.loss = saved

    # -- loaders --
    def _shard(self, dl):
        "This rank's part of `dl` for the coming phase."
        if hasattr(dl, 'shard'):
            if getattr(dl, 'world_size', 1) > 1: return dl  # sharded by the user already
            if getattr(dl, 'shuffle', False): dl.seed = broadcast_int(dl.seed)  # the same order on every rank
            self._sharded.append(dl.shard(self.rank, self.world_size))
            return dl
        from torch.utils.data import DataLoader, DistributedSampler
        if not isinstance(dl, DataLoader):
            raise TypeError(f"DistributedCallback can shard learnkit loaders and torch DataLoaders, not "
                            f"{type(dl).__name__}: give each rank its own part of the data")
        if isinstance(dl.sampler, DistributedSampler): sharded = dl
        else:
            if id(dl) not in self._rebuilt:
                seed = broadcast_int(torch.randint(2**62, ()).item())  # sync-ok: once per loader per fit
                self._rebuilt[id(dl)] = _distributed_torch_loader(dl, self.rank, self.world_size, seed)
            sharded = self._rebuilt[id(dl)]
        sharded.sampler.set_epoch(self.learn.epoch)
        return sharded

    def _unshard(self, dl):
        if dl in self._sharded:
            dl.shard(0, 1)
            self._sharded.remove(dl)


def torchrun_callbacks(cbs):
    "The callbacks a Learner gets by default for a distributed launch: a DistributedCallback unless `cbs` has one."
    if not launched_distributed() or any(isinstance(cb, DistributedCallback) for cb in cbs): return []
    return [DistributedCallback()]


@contextlib.contextmanager
def distrib_ctx(learn, timeout=DEFAULT_TIMEOUT, **ddp_kwargs):
    """Train `learn` data-parallel inside the `with` block: joins the process group torchrun set up and adds a
    `DistributedCallback(timeout, **ddp_kwargs)` (a Learner built under torchrun has one already). Outside a
    distributed launch it does nothing, so the same script runs in one process. The group is left on exit
    when this context created it."""
    if not launched_distributed():
        yield learn
        return
    present = [cb for cb in learn.cbs if isinstance(cb, DistributedCallback)]
    if present and ddp_kwargs and present[0].ddp_kwargs != ddp_kwargs:
        raise ValueError(f"learn already has a DistributedCallback (torchrun launched this process) with "
                         f"{present[0].ddp_kwargs}; build the Learner with cbs=DistributedCallback(**{ddp_kwargs}) "
                         "to change the DistributedDataParallel options")
    learn.device = local_device(learn.device)
    created = setup_distrib(learn.device, timeout)
    cb = None if present else DistributedCallback(timeout, **ddp_kwargs)
    if cb is not None: learn.add_cb(cb)
    try: yield learn
    finally:
        if cb is not None: learn.remove_cb(cb)
        if created: teardown_distrib()
