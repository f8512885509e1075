"""`TfmdDL`, learnkit's loader, and `DataLoaders`, a training/validation pair of loaders.

A `TfmdDL` turns a source (see `sources.py`) into batches `(xb, yb)`: xb float (N, C, H, W) on `dl.device`, scaled
to [0, 1] and passed through the batch transforms; yb int64 class indices (or float multi-hot rows, multi-label).
When the source is an in-memory uint8 cache that fits the device budget, the cache lives on the device and a batch
is an `index_select` there: no host work per batch beyond launching kernels. Otherwise batches are gathered on the
host into pinned memory and copied on a side CUDA stream, one batch ahead of the consumer.

The order is a pure function of `(dl.seed, epoch)`, drawn with a private `torch.Generator`, so an epoch can be
replayed, resumed mid-way (`set_epoch(epoch, start_batch)`) and split across ranks (`shard`).
"""
import copy
import math

import torch

from .items import ItemPipeline, mode_for, to_float as _to_float
from .show import label_titles, show_images
from .sources import DatasetSource, ImageFiles, TensorSource
from ..torch_core import default_device, listify
from .transforms import BatchTransform, ItemTransform

__all__ = ['TfmdDL', 'DataLoaders', 'default_device']


def _as_device(device) -> torch.device:
    device = torch.device(device)
    # 'cuda' and 'cuda:0' must compare equal to the cache's device.
    if device.type == 'cuda' and device.index is None: device = torch.device('cuda', torch.cuda.current_device())
    return device


def _epoch_seed(seed, epoch):
    "Mix (seed, epoch) into one generator seed; neighbouring epochs get unrelated permutations."
    return (seed * 6364136223846793005 + (epoch + 1) * 1442695040888963407) % 2**63


def check_batch_tfms(tfms):
    "Return the batch transforms as a list sorted by `order`, rejecting anything that is not one."
    tfms = listify(tfms)
    for t in tfms:
        if isinstance(t, ItemTransform):
            raise TypeError(f"{t!r} is an item transform: pass it in item_tfms, not batch_tfms")
        if not isinstance(t, BatchTransform):
            raise TypeError(f"batch_tfms takes learnkit batch transforms (Normalize, Flip, aug_transforms()...), "
                            f"got {t!r}; subclass learnkit.data.BatchTransform to write your own")
    return sorted(tfms, key=lambda t: t.order)


class TfmdDL:
    """Batches from `source` (a TensorSource, ImageFiles or DatasetSource).

    `bs` may be changed at any time and applies from the next epoch. `shuffle` draws a new order each epoch
    from `(seed, epoch)`; `seed` defaults to a number drawn from torch's global RNG, so `torch.manual_seed`
    before building gives the same orders. `augment` turns on the batch transforms' augmentations (the
    training loader). `device_cache_budget` (bytes, default a quarter of the GPU) bounds the cache kept on
    the GPU."""
    def __init__(self, source, bs=64, shuffle=False, drop_last=False, seed=None, device='cpu', batch_tfms=None,
                 augment=False, vocab=None, device_cache_budget=None):
        if bs < 1: raise ValueError(f"bs={bs}: the batch size must be at least 1")
        self.source, self.bs, self.shuffle, self.drop_last, self.augment = source, bs, shuffle, drop_last, augment
        self.seed = int(torch.randint(2**62, ()).item()) if seed is None else int(seed)  # sync-ok: host RNG, once
        self.batch_tfms, self.vocab = check_batch_tfms(batch_tfms), vocab
        self.device, self.device_cache_budget = _as_device(device), device_cache_budget
        self.epoch, self._epoch_chosen, self._start_batch = 0, True, 0
        self.rank, self.world_size = 0, 1

    # ------------------------------------------------------------------------------------------ sizes and order
    @property
    def n(self) -> int:
        "Number of items in the whole data set (every rank together, no padding)."
        return self.source.n

    @property
    def dataset(self): return getattr(self.source, 'ds', self.source)

    @property
    def items(self): return getattr(self.source, 'files', None)

    def _rank_len(self): return math.ceil(self.n / self.world_size) if self.world_size > 1 else self.n

    def __len__(self):
        m = self._rank_len()
        return m // self.bs if self.drop_last else math.ceil(m / self.bs)

    @property
    def n_pad(self) -> int:
        "How many items of this rank's part are repeats added so every rank gets as many (trim them after a gather)."
        total = self._rank_len() * self.world_size
        return sum(1 for p in range(self.n, total) if p % self.world_size == self.rank)

    def order(self, epoch) -> torch.Tensor:
        "This rank's item indices for `epoch`, as a CPU int64 tensor: a pure function of (seed, epoch, shard)."
        n = self.n
        if self.shuffle: idx = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, epoch)))
        else: idx = torch.arange(n)
        if self.world_size > 1:
            total = self._rank_len() * self.world_size
            # As torch's DistributedSampler: repeat the first items so every rank gets the same count.
            idx = idx.repeat(math.ceil(total / max(n, 1)))[:total][self.rank::self.world_size]
        return idx

    def new(self, bs=None, shuffle=None, drop_last=None, augment=None, seed=None):
        """A loader over the same source (and its cache) and batch transforms, with the settings given changed and
        the others kept: `dl.new(shuffle=False, drop_last=False, augment=False)` yields every item once, in order,
        as validation sees it (what predictions need); `augment=True` gives test-time augmentation."""
        if bs is not None and bs < 1: raise ValueError(f"bs={bs}: the batch size must be at least 1")
        dl = copy.copy(self)
        for name, value in dict(bs=bs, shuffle=shuffle, drop_last=drop_last, augment=augment, seed=seed).items():
            if value is not None: setattr(dl, name, value)
        dl._epoch_chosen, dl._start_batch = True, 0
        return dl

    def set_epoch(self, epoch, start_batch=0):
        "Make the next iteration epoch `epoch`, starting at batch `start_batch` (the earlier ones are not loaded)."
        if start_batch < 0: raise ValueError(f"start_batch={start_batch} must be >= 0")
        self.epoch, self._start_batch, self._epoch_chosen = int(epoch), int(start_batch), True

    def shard(self, rank, world_size):
        "Yield only rank `rank`'s part of each epoch out of `world_size`; `shard(0, 1)` undoes it."
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard(rank={rank}, world_size={world_size}): need 0 <= rank < world_size")
        self.rank, self.world_size = rank, world_size
        return self

    def to(self, device):
        "Send batches to `device` from now on (the cache follows at the next iteration when it fits)."
        self.device = _as_device(device)
        return self

    def load(self):
        "Decode the images into the cache now, rather than at the first iteration."
        self.source.load()
        return self

    # ----------------------------------------------------------------------------------------------- iteration
    def _next_epoch(self):
        if not self._epoch_chosen: self.epoch += 1
        self._epoch_chosen, start, self._start_batch = False, self._start_batch, 0
        return self.epoch, start

    def __iter__(self):
        epoch, start = self._next_epoch()
        bs, cache = self.bs, self.source.load()  # read once: a bs set mid-epoch applies next epoch
        order = self.order(epoch)
        stop = len(order) // bs if self.drop_last else math.ceil(len(order) / bs)
        if cache is None:
            batches = [b.tolist() for b in order.split(bs)[start:stop]]  # sync-ok: CPU order tensor, once per epoch
            host = self.source.stream(batches, pin_memory=self.device.type == 'cuda')
            return map(self._finish, self._to_device(host))
        on = cache.place(self.device, self.device_cache_budget)
        if on.type == 'cuda': order = order.pin_memory().to(on, non_blocking=True)  # once per epoch, no host wait
        idxs = order.split(bs)[start:stop]
        if on == self.device: return map(self._finish, map(cache.gather, idxs))
        gather = cache.gather_pinned if self.device.type == 'cuda' else cache.gather
        return map(self._finish, self._to_device(map(gather, idxs)))

    def device_batches(self):
        """For a loop that gathers its batches itself (graph mode, `learnkit.graph_mode`): when the items are cached on
        `device`, start the next epoch as iterating would and return `(order, make_batch)`: the epoch's full batches of
        item indices as an (n, bs) int64 tensor on `device` (from the resume batch on; a last partial batch is left
        out) and `make_batch(idx)`, which gathers and transforms the batch of the indices `idx` with device ops alone.
        None, and no epoch started, when the items are not cached on `device` (then iterate the loader)."""
        cache = self.source.load()
        if cache is None or cache.place(self.device, self.device_cache_budget) != self.device: return None
        epoch, start = self._next_epoch()
        order = self.order(epoch)
        n = len(order) // self.bs
        order = order[:n * self.bs].view(n, self.bs)[start:]
        if self.device.type == 'cuda': order = order.pin_memory().to(self.device, non_blocking=True)  # no host wait
        return order, lambda idx: self._finish(cache.gather(idx))

    def _to_device(self, host_batches):
        if self.device.type != 'cuda':
            for xb, yb in host_batches: yield xb.to(self.device), yb.to(self.device)
            return
        copies = torch.cuda.Stream(self.device)
        pending = None
        for xb, yb in host_batches:
            # Issue this batch's copy on a side stream before handing out the previous one, so the copy
            # overlaps the model's work on the previous batch.
            with torch.cuda.stream(copies):
                ready = (xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True), torch.cuda.Event())
                ready[2].record(copies)
            if pending is not None: yield _ready(*pending)
            pending = ready
        if pending is not None: yield _ready(*pending)

    def _finish(self, batch):
        xb, yb = batch
        xb = _to_float(xb)
        for t in self.batch_tfms: xb = t(xb, self.augment)
        return xb, yb

    def _peek(self, idx):
        xb, yb = self.source.peek(idx)
        return self._finish((xb.to(self.device), yb.to(self.device)))

    def one_batch(self):
        "The first batch of the current epoch's order, transformed, without starting an epoch or loading the rest."
        return self._peek(self.order(self.epoch)[:self.bs])

    def sample_batch(self) -> torch.Tensor:
        "A float host batch in [0, 1] of `bs` items drawn with `seed`, before batch transforms (for statistics)."
        idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))[:self.bs]
        return _to_float(self.source.peek(idx)[0])

    def prepare(self, item):
        """One item as the data holds it (an image file's path, a PIL image, or an image tensor: uint8 0..255 or
        float in [0, 1], (H, W) or (C, H, W)) as this loader batches its items: a float batch of one on `device`,
        after the source's item transforms (Resize...) and the batch transforms, without augmentation. This is
        what `Learner.predict` feeds the model, through `self.pipeline` (which `learn.export` writes)."""
        return self.pipeline(item, self.device)

    @property
    def pipeline(self) -> ItemPipeline:
        "The steps `prepare` takes: decoding mode, the source's item transforms, the batch transforms."
        source = self.source
        if isinstance(source, ImageFiles): mode, prep = source.mode, source.prep
        else:  # tensors: files and PIL images are decoded with as many channels as the data has
            channels = source.host_x.shape[1] if isinstance(source, TensorSource) else None
            mode, prep = mode_for(channels), ()
        return ItemPipeline(mode, prep, self.batch_tfms)

    def decode(self, xb):
        "Undo the batch transforms that can be undone (Normalize), giving images in [0, 1]."
        for t in reversed(self.batch_tfms): xb = t.decode(xb)
        return xb

    def show_batch(self, max_n=9, figsize=None):
        "A figure of the first `max_n` images of `one_batch()`, decoded, titled with their labels."
        xb, yb = self.one_batch()
        return show_images(self.decode(xb[:max_n]), label_titles(yb[:max_n], self.vocab), max_n=max_n, figsize=figsize)

    def __repr__(self):
        return (f"TfmdDL(n={self.n}, bs={self.bs}, shuffle={self.shuffle}, drop_last={self.drop_last}, "
                f"device={self.device}, batch_tfms={self.batch_tfms})")


def _ready(xb, yb, copied):
    "Make the current stream wait for a side-stream copy, and tell the allocator the tensors are used here."
    stream = torch.cuda.current_stream(xb.device)
    stream.wait_event(copied)
    xb.record_stream(stream)
    yb.record_stream(stream)
    return xb, yb


class DataLoaders:
    """A training and a validation loader (`TfmdDL`s, or plain torch DataLoaders).

    On construction, batch transforms with a `setup` (a `Normalize()` without statistics) compute what they
    need from the training loader. `to(device)` moves both loaders' batches. `loss_func` is the loss that fits
    the targets (a DataBlock sets it from its target block: cross-entropy, or BCEWithLogitsLoss for multi-label);
    a Learner built without a loss takes it."""
    def __init__(self, train, valid, device=None, loss_func=None):
        self.train, self.valid, self._device, self.loss_func = train, valid, None, loss_func
        if device is not None: self.to(device)
        for t in getattr(train, 'batch_tfms', ()):
            if hasattr(t, 'setup'): t.setup(train)

    @classmethod
    def from_sources(cls, train_source, valid_source, bs=64, val_bs=None, batch_tfms=None, vocab=None, device=None,
                     seed=None, device_cache_budget=None, loss_func=None):
        "Training (shuffled, drop_last, augmented) and validation loaders over two sources, sharing `batch_tfms`."
        tfms = check_batch_tfms(batch_tfms)
        device = default_device() if device is None else device
        common = dict(batch_tfms=tfms, vocab=vocab, device=device, device_cache_budget=device_cache_budget)
        train = TfmdDL(train_source, bs, shuffle=True, drop_last=True, augment=True, seed=seed, **common)
        valid = TfmdDL(valid_source, val_bs or bs, seed=seed, **common)
        return cls(train, valid, loss_func=loss_func)

    @classmethod
    def from_tensors(cls, x_train, y_train, x_valid, y_valid, bs=64, batch_tfms=None, vocab=None, **kwargs):
        """Loaders over in-memory images: uint8 (scaled to [0, 1]) or float (used as they are), shaped (N, H, W)
        or (N, C, H, W), with integer labels. `vocab` names the classes (default: the label numbers).
        Other keyword arguments go to `from_sources` (val_bs, device, seed, device_cache_budget)."""
        train = TensorSource(x_train, torch.as_tensor(y_train, dtype=torch.int64))
        valid = TensorSource(x_valid, torch.as_tensor(y_valid, dtype=torch.int64))
        ys = torch.cat([train.host_y, valid.host_y])
        if vocab is None: vocab = list(range(int(ys.max()) + 1)) if len(ys) else []  # sync-ok: host labels, once
        vocab = list(vocab)
        if len(ys) and (ys.min() < 0 or ys.max() >= len(vocab)):  # sync-ok: host labels, once
            lo, hi = int(ys.min()), int(ys.max())  # sync-ok: host labels, in an error message
            raise ValueError(f"labels run from {lo} to {hi} but vocab has {len(vocab)} "
                             f"classes; labels must be 0..{len(vocab) - 1}")
        return cls.from_sources(train, valid, bs=bs, batch_tfms=batch_tfms, vocab=vocab, **kwargs)

    @classmethod
    def from_dsets(cls, train_ds, valid_ds, bs=64, batch_tfms=None, vocab=None, num_workers=0, **kwargs):
        """Loaders over map-style datasets of `(image, label)` (image a tensor or PIL image), read a batch at a time
        by `num_workers` processes. `vocab` defaults to `train_ds.classes` when it has one."""
        vocab = getattr(train_ds, 'classes', None) if vocab is None else vocab
        return cls.from_sources(DatasetSource(train_ds, num_workers), DatasetSource(valid_ds, num_workers), bs=bs,
                                batch_tfms=batch_tfms, vocab=vocab, **kwargs)

    @property
    def loaders(self): return (self.train, self.valid)

    def __getitem__(self, i): return self.loaders[i]

    def __len__(self): return 2

    @property
    def vocab(self):
        "The class names, from the training loader (or its dataset's `classes` for a plain torch DataLoader)."
        vocab = getattr(self.train, 'vocab', None)
        return getattr(getattr(self.train, 'dataset', None), 'classes', None) if vocab is None else vocab

    @property
    def c(self):
        "The number of classes."
        if self.vocab is None: raise AttributeError("these DataLoaders have no vocab, so no number of classes c")
        return len(self.vocab)

    @property
    def bs(self):
        "The training batch size."
        bs = getattr(self.train, 'bs', None)
        return self.train.batch_size if bs is None else bs

    @property
    def device(self):
        "Where batches go: the training loader's device (or the last `to(device)` for plain torch DataLoaders)."
        return getattr(self.train, 'device', self._device)

    @property
    def train_ds(self): return self.train.dataset

    @property
    def valid_ds(self): return self.valid.dataset

    @property
    def skipped(self):
        "Image files left out as unreadable (`on_error='skip'`)."
        return [f for dl in self.loaders for f in getattr(getattr(dl, 'source', None), 'skipped', [])]

    def to(self, device):
        "Send both loaders' batches to `device` (plain torch DataLoaders are left as they are)."
        self._device = _as_device(device)
        for dl in self.loaders:
            if hasattr(dl, 'to'): dl.to(self._device)
        return self

    def load(self):
        "Decode both loaders' images into their caches now."
        for dl in self.loaders:
            if hasattr(dl, 'load'): dl.load()
        return self

    def one_batch(self):
        "One transformed training batch."
        return self.train.one_batch() if hasattr(self.train, 'one_batch') else next(iter(self.train))

    def show_batch(self, max_n=9, figsize=None):
        "A figure of `max_n` decoded training images with their labels (gray for one channel)."
        if not hasattr(self.train, 'show_batch'):
            raise TypeError("show_batch needs learnkit loaders (TfmdDL); these are plain torch DataLoaders")
        return self.train.show_batch(max_n=max_n, figsize=figsize)

    def __repr__(self): return f"DataLoaders(train={self.train!r}, valid={self.valid!r})"
