"""Loader speed over the full Fashion-MNIST PNG tree (60k training images, bs 64), side by side in one run.

    python bench/loader.py [--root DIR] [--workers 2] [--device cpu|cuda]

Rows: the decode limit (a plain loop of torchvision.io.decode_png over every training file), torchvision's
ImageFolder + DataLoader with 0 and 2 workers, and learnkit's first epoch (which decodes into the cache) and
second epoch (from the cache). The tree is written once under --root by `fashion_mnist_tree` and reused.
Targets (issue 4): first epoch >= 0.8x the decode limit, second epoch >= 50x ImageFolder with 0 workers,
DataLoaders build under 3 s (decode happens in the first epoch, not at build).
"""
import argparse
import time
import warnings

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import decode_png, read_file
from torchvision.transforms import ToTensor

from learnkit.data import (CategoryBlock, DataBlock, GrandparentSplitter, ImageBlock, Normalize, PILImageBW,
                           get_image_files, parent_label)
from learnkit.datasets import fashion_mnist_tree


def gray_loader(path):
    with Image.open(path) as im: return im.convert('L')


def sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()


def decode_limit(files):
    t = time.perf_counter()
    for f in files: decode_png(read_file(str(f)))
    return len(files) / (time.perf_counter() - t)


def imagefolder_rate(root, bs, workers):
    dl = DataLoader(ImageFolder(root, transform=ToTensor(), loader=gray_loader), batch_size=bs, shuffle=True,
                    num_workers=workers)
    t, n = time.perf_counter(), 0
    for xb, _ in dl: n += len(xb)
    return n / (time.perf_counter() - t)


def epoch_rate(dl, device):
    t, n = time.perf_counter(), 0
    for xb, _ in dl: n += len(xb)
    sync(device)
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--root', default='/tmp/learnkit-bench/fashion-mnist-png', help='where the PNG tree is written once')
    p.add_argument('--workers', type=int, default=2, help='decode worker processes for learnkit')
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--device', default='cpu')
    args = p.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings('ignore', category=DeprecationWarning, module='torchvision')

    t = time.perf_counter()
    root = fashion_mnist_tree(args.root)
    print(f"tree ready at {root} in {time.perf_counter() - t:.1f} s")
    files = get_image_files(root / 'training')

    limit = decode_limit(files)
    if0 = imagefolder_rate(root / 'training', args.bs, 0)
    if2 = imagefolder_rate(root / 'training', args.bs, 2)

    t = time.perf_counter()
    dls = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                    splitter=GrandparentSplitter('training', 'testing'), get_y=parent_label,
                    batch_tfms=Normalize()).dataloaders(root, bs=args.bs, num_workers=args.workers, device=args.device)
    build = time.perf_counter() - t
    first = epoch_rate(dls.train, args.device)
    second = epoch_rate(dls.train, args.device)

    rows = [('decode limit: decode_png loop', limit, 1.0),
            ('ImageFolder + DataLoader, 0 workers', if0, if0 / limit),
            ('ImageFolder + DataLoader, 2 workers', if2, if2 / limit),
            (f'learnkit first epoch ({args.workers} decode workers)', first, first / limit),
            ('learnkit second epoch', second, second / limit)]
    print(f"\n{len(files)} training PNGs, bs {args.bs}, device {args.device}, torch threads 2")
    print(f"{'loader':<44}{'img/s':>12}{'x limit':>10}")
    for name, rate, ratio in rows: print(f"{name:<44}{rate:>12,.0f}{ratio:>10.2f}")
    print(f"{'learnkit DataLoaders build (no decode)':<44}{build:>11.2f}s")
    checks = [('first epoch >= 0.8x decode limit', first / limit, first >= 0.8 * limit),
              ('second epoch >= 50x ImageFolder 0 workers', second / if0, second >= 50 * if0),
              ('build < 3 s', build, build < 3)]
    print("\ntargets")
    for name, value, ok in checks: print(f"{name:<44}{value:>12.2f}  {'PASS' if ok else 'FAIL'}")


if __name__ == '__main__':
    main()
