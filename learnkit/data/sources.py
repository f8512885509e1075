"""Where a loader's items come from: a tensor in memory, image files decoded once into such a tensor (or per
batch when they do not fit), or a map-style dataset. Each source gives the loader the same small interface:

- `n`: the number of items;
- `load()`: the in-memory `TensorSource` to index into, or None when items are streamed;
- `peek(idx)`: a host batch `(x, y)` for a few indices, without loading everything;
- `stream(batches, pin_memory)`: host batches for lists of indices (streamed sources only).
"""
import os

import torch
from torch.utils.data import DataLoader as TorchDataLoader, default_collate

from .images import FileDecoder, decode_all, default_workers, first_shape, report_bad, size_error

__all__ = ['TensorSource', 'ImageFiles', 'DatasetSource', 'default_cache_budget', 'default_device_cache_budget']


def default_cache_budget() -> int:
    "Host memory the uint8 image cache may take: a quarter of the machine's RAM."
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 4


def default_device_cache_budget(device) -> int:
    "Device memory one loader's cache may take: a quarter of the GPU's memory."
    return torch.cuda.get_device_properties(device).total_memory // 4


class TensorSource:
    """Items held as tensors `x` (N, C, H, W) and `y` (N,) or (N, ...) (multi-hot rows): a batch is an `index_select`.

    `place(device, budget)` moves a copy of the tensors to a CUDA device when they fit `budget` bytes, so
    batching runs there; the host copy stays for `peek` and for moving back."""
    def __init__(self, x, y):
        if x.ndim == 3: x = x[:, None]
        if x.ndim != 4: raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"images must be uint8 (0..255, scaled to [0, 1] per batch) or float, got {x.dtype}")
        y = torch.as_tensor(y)
        if len(x) != len(y): raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.host_x, self.host_y = x, y
        self.x, self.y = x, y

    @property
    def n(self): return len(self.host_x)

    @property
    def nbytes(self): return self.host_x.nbytes + self.host_y.nbytes

    def load(self): return self

    def place(self, device, budget=None) -> torch.device:
        "Keep the tensors on `device` if it is CUDA and they fit `budget`; return the device batches are gathered on."
        device = torch.device(device)
        fits = device.type == 'cuda' and self.nbytes <= (default_device_cache_budget(device) if budget is None else budget)
        target = device if fits else self.host_x.device
        if self.x.device != target: self.x, self.y = self.host_x.to(target), self.host_y.to(target)
        return self.x.device

    def gather(self, idx): return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def gather_pinned(self, idx):
        "Gather on the host into page-locked memory, so the copy to the GPU can be asynchronous."
        xb = torch.empty((len(idx), *self.host_x.shape[1:]), dtype=self.host_x.dtype, pin_memory=True)
        yb = torch.empty((len(idx), *self.host_y.shape[1:]), dtype=self.host_y.dtype, pin_memory=True)
        return torch.index_select(self.host_x, 0, idx, out=xb), torch.index_select(self.host_y, 0, idx, out=yb)

    def peek(self, idx): return self.host_x[idx], self.host_y[idx]

    def __len__(self): return self.n

    def __getitem__(self, i): return self.host_x[i], self.host_y[i]


def _streamer(dataset, batches, workers, pin_memory):
    return iter(TorchDataLoader(dataset, batch_size=None, sampler=batches, num_workers=workers, pin_memory=pin_memory))


class ImageFiles:
    """Image files with their targets (int64 class indices, or a tensor such as float multi-hot rows), decoded
    lazily: on `load()` into a `TensorSource` cache when `N x C x H x W` bytes fit `cache_budget`, otherwise
    decoded per batch by worker processes (`stream`).

    `mode` is 'L' or 'RGB', `prep` the item transforms; `on_error='skip'` leaves unreadable files out (they are
    listed in `skipped`) and needs the cache."""
    def __init__(self, files, labels, mode='RGB', prep=(), workers=None, on_error='raise', cache_budget=None):
        if on_error not in ('raise', 'skip'): raise ValueError(f"on_error={on_error!r}: use 'raise' or 'skip'")
        self.files = list(files)
        self.labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels, dtype=torch.int64)
        if len(self.labels) != len(self.files):
            raise ValueError(f"{len(self.files)} image files but {len(self.labels)} labels")
        self.mode, self.prep, self.on_error = mode, tuple(prep), on_error
        self.workers = default_workers() if workers is None else workers
        self.cache_budget = default_cache_budget() if cache_budget is None else cache_budget
        self.cache, self.streaming, self.skipped, self._shape = None, False, [], None

    @property
    def n(self): return self.cache.n if self.cache is not None else len(self.files)

    def shape(self):
        "(position, shape) of the first readable image: the shape every image must have."
        if self._shape is None: self._shape = first_shape(self.files, self.mode, self.prep, self.on_error)
        return self._shape

    def load(self):
        "Decode every file into the cache, once; return the cache, or None when the files are streamed."
        if self.cache is not None or self.streaming: return self.cache
        _, shape = self.shape()
        need = len(self.files) * torch.Size(shape).numel()
        if need > self.cache_budget:
            if self.on_error == 'skip':
                raise ValueError(f"on_error='skip' needs the image cache, but {len(self.files)} images of shape {shape} "
                                 f"take {need / 2**30:.1f} GiB, over cache_budget={self.cache_budget / 2**30:.1f} GiB; "
                                 f"raise cache_budget or remove the bad files")
            self.streaming = True
            return None
        x, kept, self.skipped = decode_all(self.files, self.mode, self.prep, self.workers, self.on_error)
        if self.skipped: self.files = [self.files[i] for i in kept.tolist()]  # sync-ok: CPU index tensor, once when building
        self.cache = TensorSource(x, self.labels[kept])
        return self.cache

    def _decoded(self, indices, images, failures):
        "Check one decoded batch: raise naming any bad file."
        for pos, kind, detail in failures:
            if kind == 'size':
                ref, shape = self.shape()
                raise size_error(self.files, ref, indices[pos], detail, shape)
        if failures: report_bad(self.files, [(indices[p], d) for p, _, d in failures], 'raise')
        return images, self.labels[indices]

    def peek(self, idx):
        if self.cache is not None: return self.cache.peek(idx)
        return self._decoded(*FileDecoder(self.files, self.mode, self.prep, self.shape()[1])[idx.tolist()])  # sync-ok: CPU indices for the host decoder

    def stream(self, batches, pin_memory=False):
        decoder = FileDecoder(self.files, self.mode, self.prep, self.shape()[1])
        return (self._decoded(*b) for b in _streamer(decoder, batches, self.workers, pin_memory))

    def __len__(self): return self.n

    def __getitem__(self, i):
        "Item `i` as (uint8 (C, H, W) image, label), decoded now if the cache is not built."
        if self.cache is not None: return self.cache[i]
        x, y = self.peek(torch.tensor([i]))
        return x[0], y[0]


def _to_tensor(x):
    if isinstance(x, torch.Tensor): return x
    from PIL.Image import Image
    if isinstance(x, Image):
        from torchvision.transforms.v2.functional import pil_to_tensor
        return pil_to_tensor(x)
    raise TypeError(f"dataset items must be (image, label) with the image a tensor or PIL image, got {type(x).__name__}")


def _collate(items):
    xs, ys = zip(*((_to_tensor(x), y) for x, y in items))
    return default_collate(list(xs)), default_collate(list(ys))


class _Batches:
    "A map-style view of a dataset whose items are whole batches (lists of indices), collated."
    def __init__(self, ds): self.ds = ds

    def __len__(self): return len(self.ds)

    def __getitem__(self, indices): return _collate([self.ds[i] for i in indices])


class DatasetSource:
    "A map-style dataset of `(image, label)` items, streamed a batch at a time by `workers` processes."
    def __init__(self, ds, workers=0): self.ds, self.workers, self.skipped = ds, workers, []

    @property
    def n(self): return len(self.ds)

    def load(self): return None

    def peek(self, idx): return _Batches(self.ds)[idx.tolist()]  # sync-ok: CPU indices, show_batch

    def stream(self, batches, pin_memory=False): return _streamer(_Batches(self.ds), batches, self.workers, pin_memory)

    def __len__(self): return self.n

    def __getitem__(self, i): return self.ds[i]
