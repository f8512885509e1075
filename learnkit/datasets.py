"""Fashion-MNIST: read the IDX files into uint8 tensors, or write them out as a chapter-style image tree."""
import gzip
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ['FASHION_MNIST_PATH', 'FASHION_MNIST_CLASSES', 'FashionMNIST', 'fashion_mnist', 'fashion_mnist_tree',
           'read_idx', 'tree_label', 'has_fashion_mnist_files']

FASHION_MNIST_PATH = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_FILES = {'x_train': 'train-images-idx3-ubyte', 'y_train': 'train-labels-idx1-ubyte',
          'x_valid': 't10k-images-idx3-ubyte', 'y_valid': 't10k-labels-idx1-ubyte'}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}
_TREE_MARKER = '.learnkit-tree.json'


class FashionMNIST(NamedTuple):
    "Fashion-MNIST as uint8 images (N, 28, 28) and int64 labels; unpacks like a tuple."
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    classes: tuple


def read_idx(fn) -> np.ndarray:
    "Read one IDX file (gzipped or not) into a numpy array, without copying the payload twice."
    fn = Path(fn)
    raw = fn.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b'\x1f\x8b' else raw
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{fn} is not an IDX file (bad magic number {data[:4].hex()}); "
                         f"re-download it or reinstall the Debian package dataset-fashion-mnist")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, '>i4', ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{fn} is truncated or padded: {len(data)} bytes where its header {dims} "
                         f"needs {expected}; re-download it")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    "The IDX file `stem` in `folder` (gzipped or not, in either spelling), or None."
    # Some mirrors name the files train-images.idx3-ubyte; accept that spelling too.
    alt = stem.replace('-idx', '.idx')
    return next((folder / n for n in (stem + '.gz', stem, alt + '.gz', alt) if (folder / n).is_file()), None)


def has_fashion_mnist_files(folder) -> bool:
    "Whether `folder` holds Fashion-MNIST's (or MNIST's) IDX files, judged by any one of the four being there."
    return any(_idx_file(Path(folder), stem) is not None for stem in _FILES.values())


def _find_idx(folder: Path, stem: str) -> Path:
    found = _idx_file(folder, stem)
    if found is not None: return found
    names = ', '.join(f + '.gz' for f in _FILES.values())
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {folder}. Install the Debian package "
        f"dataset-fashion-mnist (it puts the files in {FASHION_MNIST_PATH}), or download the four "
        f"upstream files {names} into a folder and pass fashion_mnist(path=that_folder).")


def fashion_mnist(path=None) -> FashionMNIST:
    """Load Fashion-MNIST from the four IDX files in `path` (default: the Debian package's folder).

    Returns a `FashionMNIST` tuple `(x_train, y_train, x_valid, y_valid, classes)`: uint8 images of shape
    (N, 28, 28), int64 labels, and the ten class names. Files may be gzipped or not. Nothing is cached
    between calls; reading takes a fraction of a second.
    """
    folder = Path(FASHION_MNIST_PATH if path is None else path)
    arrays = {k: read_idx(_find_idx(folder, stem)) for k, stem in _FILES.items()}
    for split in ('train', 'valid'):
        x, y = arrays['x_' + split], arrays['y_' + split]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {split} files in {folder} disagree: images {x.shape}, labels {y.shape}")
    # np.frombuffer views are read-only; torch wants writable memory, so copy once here.
    return FashionMNIST(torch.from_numpy(arrays['x_train'].copy()), torch.from_numpy(arrays['y_train'].astype(np.int64)),
                        torch.from_numpy(arrays['x_valid'].copy()), torch.from_numpy(arrays['y_valid'].astype(np.int64)),
                        FASHION_MNIST_CLASSES)


def tree_label(name: str) -> str:
    "The folder name a class gets in `fashion_mnist_tree` ('T-shirt/top' -> 'T-shirt_top')."
    return name.replace('/', '_')


def _write_images(folder: str, fmt: str, start: int, images: np.ndarray, labels: np.ndarray):
    from torchvision.io import encode_jpeg, encode_png
    for i, (img, lbl) in enumerate(zip(images, labels), start):
        t = torch.from_numpy(img)[None]
        data = encode_png(t) if fmt == 'png' else encode_jpeg(t, quality=95)
        with open(os.path.join(folder, tree_label(FASHION_MNIST_CLASSES[lbl]), f'{i}.{fmt}'), 'wb') as f:
            f.write(data.numpy().tobytes())  # sync-ok: host tensors, writing files


def fashion_mnist_tree(dest, path=None, n_train=None, n_valid=None, fmt='png', workers=None) -> Path:
    """Write Fashion-MNIST as `dest/training/<label>/<i>.png` and `dest/testing/<label>/<i>.png`, once.

    `<i>` is the image's index in `fashion_mnist(path)`, `<label>` its class name made folder-safe by
    `tree_label`. `n_train`/`n_valid` keep only the first images of each split; `fmt` is 'png' or 'jpg'.
    A finished tree is marked, so a second call with the same settings returns at once; a call with other
    settings on the same `dest` raises rather than mixing two trees. `workers` processes encode in parallel
    (default: up to 8, one per core).
    """
    if fmt not in ('png', 'jpg'): raise ValueError(f"fmt={fmt!r}: fashion_mnist_tree writes 'png' or 'jpg'")
    dest = Path(dest)
    settings = {'n_train': n_train, 'n_valid': n_valid, 'fmt': fmt}
    marker = dest / _TREE_MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found == settings: return dest
        raise ValueError(f"{dest} already holds a Fashion-MNIST tree written with {found}, not {settings}; "
                         f"pass another dest or delete {dest}")
    ds = fashion_mnist(path)
    jobs = []
    for split, x, y, n in (('training', ds.x_train, ds.y_train, n_train), ('testing', ds.x_valid, ds.y_valid, n_valid)):
        folder = dest / split
        for name in FASHION_MNIST_CLASSES: (folder / tree_label(name)).mkdir(parents=True, exist_ok=True)
        x, y = x[:n].numpy(), y[:n].numpy()  # sync-ok: host tensors, writing files
        jobs += [(str(folder), fmt, s, x[s:s + 2500], y[s:s + 2500]) for s in range(0, len(x), 2500)]
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context('fork')) as pool:
            for fut in [pool.submit(_write_images, *job) for job in jobs]: fut.result()
    else:
        for job in jobs: _write_images(*job)
    marker.write_text(json.dumps(settings))
    return dest
