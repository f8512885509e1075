"""The chapter's batch-size experiment on Fashion-MNIST, through `compare`, and what GradientNoiseScale costs.

1. The comparison table: simple_cnn at lr 0.06 for one epoch, bs 64 vs 512, `fit` vs `fit_one_cycle`,
   without and with BN (8 runs, same seed), on all 60k training and 10k validation images by default.
2. The noise scale: simple_cnn + BN, 1cycle at bs 64 with GradientNoiseScale(every=10); B_simple at the end
   and the time of that epoch against the same epoch without the callback (alternating rounds, median ratio).

    python bench/batch_size.py [--n-train 60000] [--n-epoch 1] [--bs 64 512] [--device cpu|cuda] [--rounds 3]
    python bench/batch_size.py --n-train 10000 --skip-overhead      # a short run

On the CPU, subnormal floats are flushed to zero: the collapsing runs (no BN, lr 0.06) otherwise fill the
network with subnormals, which the CPU handles some 10x slower, and the table would time that instead.
"""
import argparse
import itertools
import statistics
import time

import torch
from torch import nn

from learnkit import Learner, accuracy
from learnkit.callbacks.batch_size import GradientNoiseScale
from learnkit.data import DataLoaders, Normalize
from learnkit.datasets import fashion_mnist
from learnkit.experiments import compare
from learnkit.models import simple_cnn


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n-train', type=int, default=60_000)
    p.add_argument('--n-valid', type=int, default=10_000)
    p.add_argument('--n-epoch', type=int, default=1)
    p.add_argument('--bs', type=int, nargs='+', default=[64, 512])
    p.add_argument('--lr', type=float, default=0.06)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds for the noise-scale overhead')
    p.add_argument('--skip-overhead', action='store_true')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    data = fashion_mnist()

    def make_learner(bs=64, bn=False, cbs=None):
        dls = DataLoaders.from_tensors(data.x_train[:args.n_train], data.y_train[:args.n_train],
                                       data.x_valid[:args.n_valid], data.y_valid[:args.n_valid], bs=bs,
                                       batch_tfms=[Normalize()], vocab=data.classes, device=device)
        return Learner(dls, simple_cnn(bn=bn), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, device=device,
                       cbs=cbs)

    warm = make_learner(args.bs[0], bn=True)          # first-touch costs (kernels, allocator) out of the table
    with warm.no_bar(), warm.no_logging(): warm.fit(1, 1e-3)

    configs = [dict(bs=bs, fit=fit, bn=bn) for bn, fit, bs in
               itertools.product([False, True], ['fit', 'fit_one_cycle'], args.bs)]
    start = time.perf_counter()
    res = compare(make_learner, configs, n_epoch=args.n_epoch, lr=args.lr, seeds=args.seeds)
    print(f"device {device}, {args.threads} threads, {args.n_train} train + {args.n_valid} valid images, "
          f"{args.n_epoch} epoch(s), lr {args.lr}, seeds {args.seeds}; {time.perf_counter() - start:.0f} s in all")
    cols = ['bs', 'fit', 'bn', 'seed', 'train_loss', 'valid_loss', 'accuracy', 'steps', 'images_per_s', 'time_s']
    print(res.df[cols].to_string(index=False, float_format=lambda v: f'{v:.4g}'))
    if args.skip_overhead: return

    def one_cycle(cbs):
        learn = make_learner(64, bn=True, cbs=cbs)
        torch.manual_seed(0)
        if device.type == 'cuda': torch.cuda.synchronize()
        t0 = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, args.lr)
        if device.type == 'cuda': torch.cuda.synchronize()
        return time.perf_counter() - t0, learn

    ratios, gns_learn = [], None
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        times = {}
        for with_gns in order:
            times[with_gns], learn = one_cycle([GradientNoiseScale(every=10)] if with_gns else None)
            if with_gns: gns_learn = learn
        ratios.append(times[True] / times[False])
    gns = gns_learn.gradient_noise_scale
    print(f"\nGradientNoiseScale(every=10, n_micro=2), simple_cnn + BN, bs 64, 1cycle lr {args.lr}, 1 epoch: "
          f"B_simple at the end {gns.critical_batch_size():.0f}; epoch time with / without the callback "
          f"{statistics.median(ratios):.3f} (median of {args.rounds} alternating rounds)")
    print(gns.tradeoff().to_string(float_format=lambda v: f'{v:.2f}'))


if __name__ == '__main__':
    main()
