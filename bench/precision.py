"""bf16 + channels_last against fp32 where it should pay: resnet18 at 64 px, bs 256 (issue 19: at least 1.3x faster).

    python bench/precision.py                                   # CUDA: 30,720 training images at 64x64, 3 repeats
    python bench/precision.py --device cpu --quick              # the dry run: 64 images at 32x32, no warm-up

Fashion-MNIST upsampled once to `--size` pixels (bilinear, kept as uint8 in the loaders' device cache), learnkit's
resnet18 (the paper's stem, 1 input channel), one epoch of fit_one_cycle(1e-2) per run with the default callbacks,
progress display off. Each precision runs one untimed epoch first (cuDNN autotuning, allocator), then the two
alternate for `--repeats` rounds. Prints each one's median epoch time, images/s and validation accuracy, and the
speed-up of bf16 + channels_last over fp32 (median of the per-round ratios). `--json PATH` writes the rows too.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from learnkit import Learner, accuracy
from learnkit.data import DataLoaders, Normalize
from learnkit.datasets import fashion_mnist
from learnkit.models import resnet18

CONFIGS = {'fp32': 'fp32', 'bf16_cl': 'bf16 + channels_last'}


def upsampled(x, size, device, chunk=4096):
    "uint8 (N, 28, 28) images as uint8 (N, 1, size, size), resized on `device` a chunk at a time."
    out = torch.empty((len(x), 1, size, size), dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk, None].to(device).float()
        out[i:i + chunk] = F.interpolate(xb, size=(size, size), mode='bilinear', align_corners=False).round_().clamp_(
            0, 255).to(torch.uint8).cpu()  # sync-ok: data preparation, once
    return out


def make_learner(name, data, bs, device):
    x, y, xv, yv = data
    dls = DataLoaders.from_tensors(x, y, xv, yv, bs=bs, batch_tfms=[Normalize()], device=device, seed=0)
    torch.manual_seed(0)
    learn = Learner(dls, resnet18(n_out=10, in_ch=1), metrics=accuracy, device=device, channels_last=name == 'bf16_cl')
    return learn.to_bf16() if name == 'bf16_cl' else learn


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--quick', action='store_true', help='64 images at 32x32, 1 repeat, no warm-up: a dry run')
    p.add_argument('--n-train', type=int, default=30_720)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=2, help='CPU threads (CPU runs)')
    p.add_argument('--json', default=None)
    args = p.parse_args()
    if args.quick: args.n_train, args.size, args.bs, args.repeats = 64, 32, 32, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    fm = fashion_mnist()
    n_valid = 64 if args.quick else min(10_000, max(args.n_train // 6, 256))
    data = (upsampled(fm.x_train[:args.n_train], args.size, device), fm.y_train[:args.n_train],
            upsampled(fm.x_valid[:n_valid], args.size, device), fm.y_valid[:n_valid])
    learners = {k: make_learner(k, data, args.bs, device) for k in CONFIGS}

    def epoch(k):
        learn = learners[k]
        sync()
        start = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
        sync()
        return time.perf_counter() - start, learn.recorder.values[-1][2]

    for k in CONFIGS if not args.quick else (): epoch(k)  # untimed warm-up
    times, accs = {k: [] for k in CONFIGS}, {}
    for r in range(args.repeats):
        for k in (list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]):
            t, accs[k] = epoch(k)
            times[k].append(t)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {args.threads} threads'
    print(f"device: {name} | torch {torch.__version__} | resnet18 at {args.size}x{args.size}, bs {args.bs} | "
          f"{args.n_train:,} training + {n_valid:,} validation images | one epoch of fit_one_cycle | median of "
          f"{args.repeats}")
    n_images = args.n_train // args.bs * args.bs
    rows = {}
    for k, label in CONFIGS.items():
        t = statistics.median(times[k])
        rows[k] = {'epoch_s': t, 'images_per_s': n_images / t, 'valid_acc': accs[k], 'times': times[k]}
        print(f"{label:<22} epoch {t:8.3f} s {n_images / t:12,.0f} images/s   valid acc {accs[k]:.4f}")
    speedup = statistics.median(a / b for a, b in zip(times['fp32'], times['bf16_cl']))
    print(f"bf16 + channels_last is {speedup:.2f}x as fast as fp32 (target: at least 1.3x on a GPU)")
    if args.json:
        with open(args.json, 'w') as f: json.dump({'device': name, 'rows': rows, 'speedup': speedup}, f, indent=1)


if __name__ == '__main__':
    main()
