"""Decode image files with torchvision into uint8 (C, H, W) tensors, in chunks, in worker processes."""
import math
import os
import warnings
from contextlib import contextmanager
from functools import cache

import torch
from torch.utils.data import DataLoader as TorchDataLoader, Dataset

__all__ = ['IMAGE_EXTENSIONS', 'ImageDecodeError', 'read_image', 'FileDecoder', 'decode_all', 'default_workers']

# What torchvision decodes natively, plus the few formats we hand to PIL (torchvision cannot read them).
IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.gif', '.webp', '.bmp', '.tif', '.tiff'})
_PIL_ONLY = frozenset({'.bmp', '.tif', '.tiff'})
_SERIAL_BELOW = 4096  # starting worker processes costs more than decoding this many small files


class ImageDecodeError(RuntimeError):
    "An image file that cannot be read or decoded; the message names the file."


def default_workers() -> int:
    "Decode worker processes: one per core the process may use, at most 8."
    return min(8, len(os.sched_getaffinity(0)))


@cache
def _decoder():
    "torchvision's decoder and read modes, imported on first use so that `import learnkit` stays fast."
    from torchvision.io import ImageReadMode, decode_image
    return decode_image, {'L': ImageReadMode.GRAY, 'RGB': ImageReadMode.RGB}


def _decode_with_pil(fn, mode):
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor
    try:
        with Image.open(fn) as im: return pil_to_tensor(im.convert(mode))
    except (OSError, UnidentifiedImageError) as e:
        raise ImageDecodeError(f"cannot decode {fn}: {e}") from e


@contextmanager
def quiet_decoders():
    """Silence torchvision 0.29's warning, on every decode, that its decoders are deprecated in favour of
    torchcodec: it costs a tenth of a small PNG's decode. Use it around loops, not single calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=DeprecationWarning, module='torchvision')
        yield


def read_image(fn, mode='RGB', prep=()) -> torch.Tensor:
    """Read image file `fn` as a uint8 (C, H, W) tensor in `mode` ('L' or 'RGB'), then apply the item
    transforms' deterministic `prepare` steps in `prep`. Gray and colour files are converted to `mode`."""
    if os.path.splitext(fn)[1].lower() in _PIL_ONLY: img = _decode_with_pil(fn, mode)
    else:
        with open(fn, 'rb') as f: data = bytearray(f.read())  # writable, so torch.frombuffer does not warn
        if not data: raise ImageDecodeError(f"cannot decode {fn}: the file is empty")
        decode_image, read_modes = _decoder()
        try: img = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=read_modes[mode])
        except RuntimeError as e: raise ImageDecodeError(f"cannot decode {fn}: {str(e).splitlines()[-1]}") from e
        if img.ndim == 4: img = img[0]  # an animated GIF: keep its first frame
        if img.dtype != torch.uint8:  # a 16-bit PNG
            from torchvision.transforms.v2.functional import to_dtype
            img = to_dtype(img, torch.uint8, scale=True)
    for t in prep: img = t.prepare(img)
    return img


class FileDecoder(Dataset):
    """Decodes a list of file indices at once into one uint8 (n, C, H, W) tensor of the expected `shape`.

    It never raises for a bad file: it returns `(indices, images, failures)`, failures being
    `(position, kind, detail)` with kind 'corrupt' (detail: the message) or 'size' (detail: the shape),
    so the main process can name every bad file and decide between raising and skipping."""
    def __init__(self, files, mode, prep, shape):
        self.files, self.mode, self.prep, self.shape = files, mode, tuple(prep), tuple(shape)

    def __len__(self): return len(self.files)

    def __getitem__(self, indices):
        blank = torch.zeros(self.shape, dtype=torch.uint8)
        images, failures = [], []
        with quiet_decoders():
            for pos, i in enumerate(indices):
                try: img = read_image(self.files[i], self.mode, self.prep)
                except ImageDecodeError as e:
                    failures.append((pos, 'corrupt', str(e)))
                    img = blank
                if img.shape != self.shape:
                    failures.append((pos, 'size', tuple(img.shape)))
                    img = blank
                images.append(img)
        out = torch.stack(images) if images else torch.empty((0, *self.shape), dtype=torch.uint8)
        return indices, out, failures


def _hw(shape): return f"{shape[-2]}x{shape[-1]}"


def size_error(files, ref, other, other_shape, ref_shape) -> ValueError:
    return ValueError(f"Images differ in size: {files[ref]} is {_hw(ref_shape)} but {files[other]} is "
                      f"{_hw(other_shape)}. Add item_tfms=Resize(size) (or RandomResizedCrop(size)) to bring "
                      f"them to one size.")


def first_shape(files, mode, prep, on_error):
    """Decode files in order until one succeeds and return (its position, its shape): the shape every
    other image must have. Unreadable files before it raise, or are passed over with `on_error='skip'`
    (the full decode reports them)."""
    with quiet_decoders():
        for i, fn in enumerate(files):
            try: return i, tuple(read_image(fn, mode, prep).shape)
            except ImageDecodeError:
                if on_error == 'raise': raise
    raise ImageDecodeError(f"none of the {len(files)} image files could be decoded, e.g. {files[0]}" if files
                           else "no image files to decode")


def _chunks(n, workers):
    size = min(4096, max(256, math.ceil(n / (max(workers, 1) * 16))))
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _run(decoder, batches, workers):
    "Yield `decoder[b]` for each index list in `batches`, in order, in `workers` processes when it pays."
    if workers == 0 or len(decoder) < _SERIAL_BELOW: return map(decoder.__getitem__, batches)
    return iter(TorchDataLoader(decoder, batch_size=None, sampler=batches, num_workers=workers))


def decode_all(files, mode, prep=(), workers=None, on_error='raise'):
    """Decode every file into one uint8 (N, C, H, W) cache.

    Returns `(cache, kept, skipped)`: `kept` the int64 positions of the files in the cache, `skipped` the
    files left out when `on_error='skip'` (a warning names them and why). With `on_error='raise'` the
    first unreadable files are named in an `ImageDecodeError`. Images that differ in size raise a
    ValueError naming two of them and suggesting `Resize`."""
    if on_error not in ('raise', 'skip'): raise ValueError(f"on_error={on_error!r}: use 'raise' or 'skip'")
    workers = default_workers() if workers is None else workers
    ref, shape = first_shape(files, mode, prep, on_error)
    cache = torch.empty((len(files), *shape), dtype=torch.uint8)
    keep = torch.ones(len(files), dtype=torch.bool)
    bad = []
    decoder = FileDecoder(files, mode, prep, shape)
    for indices, images, failures in _run(decoder, _chunks(len(files), workers), workers):
        cache[indices[0]:indices[-1] + 1] = images  # chunks are contiguous ranges
        for pos, kind, detail in failures:
            i = indices[pos]
            if kind == 'size': raise size_error(files, ref, i, detail, shape)
            bad.append((i, detail))
    if bad:
        keep[[i for i, _ in bad]] = False
        report_bad(files, bad, on_error)
    skipped = [files[i] for i, _ in bad]
    if not skipped: return cache, torch.arange(len(files)), skipped
    kept = keep.nonzero().squeeze(1)  # sync-ok: a host mask, once when caching
    return cache[kept], kept, skipped


def report_bad(files, bad, on_error):
    "Raise for unreadable files, or warn that they were skipped; either way name them."
    listing = '; '.join(msg for _, msg in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else '')
    if on_error == 'raise':
        raise ImageDecodeError(f"{len(bad)} unreadable image file(s): {listing}. Fix or remove them, or pass "
                               f"on_error='skip' to leave them out.")
    warnings.warn(f"Skipped {len(bad)} unreadable image file(s) (kept in dls.skipped): {listing}", stacklevel=3)
