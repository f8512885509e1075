"""What the Learner costs: learnkit's fit_one_cycle against a plain PyTorch loop, side by side.

The chapter's simple_cnn + BN (--no-bn: without) on Fashion-MNIST (default 20k training images, bs 64, 2 threads), one
epoch of 1cycle training plus a validation pass per run. Every configuration iterates the same
learnkit loader, so only the training loop differs. Runs alternate (raw, learnkit, learnkit +
ActivationStats, learnkit + the cheap recorders, learnkit + health_cbs(), raw, ...) and each round's ratio is taken
against that round's raw run; the table gives medians, "best" compares each configuration's fastest epoch with the
raw loop's fastest (timeit's reading: noise from the rest of the machine only ever adds time), and "best vs
learnkit" with the default Learner's fastest.

Targets (issue 17, best of >= 11 rounds): ActivationStats(with_hist=True) >= 0.90x the raw loop; health_cbs()
>= 0.85x; the cheap recorders (InputStats + OutputStats: what the default callbacks could carry) >= 0.98x the
default Learner.

    python bench/overhead.py [--n-train 20000] [--rounds 15] [--no-bn] [--device cpu|cuda]
"""
import argparse
import statistics
import time

import torch
from torch import nn

from learnkit import Learner, accuracy
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.inputs import InputStats
from learnkit.callbacks.outputs import OutputStats
from learnkit.data import DataLoaders, Normalize
from learnkit.datasets import fashion_mnist
from learnkit.diagnostics import health_cbs
from learnkit.models import simple_cnn


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def raw_loop(dls, device, lr, bn=True):
    "The reference: forward, loss, backward, AdamW step, OneCycleLR step, and an on-device validation sum."
    torch.manual_seed(0)
    model = simple_cnn(bn=bn).to(device)
    loss_func = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.99), eps=1e-5, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(dls.train), pct_start=0.25,
                                                div_factor=25., final_div_factor=1e5, base_momentum=0.85,
                                                max_momentum=0.95)
    model.train()
    for xb, yb in dls.train:
        loss = loss_func(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    total, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.no_grad():
        for xb, yb in dls.valid:
            pred = model(xb)
            total += loss_func(pred, yb) * len(yb)
            correct += (pred.argmax(1) == yb).sum()
    return (correct / dls.valid.n).item()


def learnkit_run(dls, device, lr, cbs=(), bn=True):
    torch.manual_seed(0)
    learn = Learner(dls, simple_cnn(bn=bn), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, device=device,
                    cbs=list(cbs))
    with learn.no_logging(): learn.fit_one_cycle(1, lr)
    return learn.recorder.values[-1][2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n-train', type=int, default=20_000)
    p.add_argument('--n-valid', type=int, default=2_000)
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--rounds', type=int, default=15)  # this VM's speed moves ~10% between rounds
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--lr', type=float, default=0.01)
    p.add_argument('--no-bn', dest='bn', action='store_false',
                   help="the chapter's simple_cnn without batchnorm (steps 1-3: 5 hooked layers instead of 10)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = fashion_mnist()
    dls = DataLoaders.from_tensors(data.x_train[:args.n_train], data.y_train[:args.n_train],
                                   data.x_valid[:args.n_valid], data.y_valid[:args.n_valid], bs=args.bs,
                                   batch_tfms=[Normalize()], vocab=data.classes, device=device, seed=0)
    configs = {
        'raw PyTorch loop': lambda: raw_loop(dls, device, args.lr, args.bn),
        'learnkit (default callbacks)': lambda: learnkit_run(dls, device, args.lr, bn=args.bn),
        'learnkit + ActivationStats(with_hist=True)':
            lambda: learnkit_run(dls, device, args.lr, [ActivationStats(with_hist=True)], args.bn),
        'learnkit + InputStats + OutputStats':
            lambda: learnkit_run(dls, device, args.lr, [InputStats(), OutputStats()], args.bn),
        'learnkit + health_cbs()': lambda: learnkit_run(dls, device, args.lr, health_cbs(show=False), args.bn),
    }
    for run in configs.values(): run()            # warm-up: allocator, kernels, first-touch costs
    times = {name: [] for name in configs}
    accs = {}
    for r in range(args.rounds):
        names = list(configs) if r % 2 == 0 else list(configs)[::-1]
        for name in names:
            sync(device); t0 = time.perf_counter()
            accs[name] = configs[name]()
            sync(device); times[name].append(time.perf_counter() - t0)
    n_img = len(dls.train) * args.bs + args.n_valid
    ref, default = times['raw PyTorch loop'], times['learnkit (default callbacks)']
    print(f"simple_cnn({'with' if args.bn else 'without'} batchnorm), device {device}, {args.threads} threads, "
          f"{args.n_train} train + {args.n_valid} valid images, bs {args.bs}, {args.rounds} alternating rounds "
          f"(medians; 'middle half' is the interquartile range of the per-round ratios: how much this machine's "
          f"speed moved between rounds)")
    print(f"{'configuration':<46}{'epoch s':>9}{'img/s':>9}{'ratio':>8}{'middle half':>14}{'best':>7}"
          f"{'best vs learnkit':>18}{'valid acc':>11}")
    for name, ts in times.items():
        ratios = [r / t for r, t in zip(ref, ts)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        med = statistics.median(ts)
        spread = f"{quartiles[0]:.3f}-{quartiles[2]:.3f}"
        print(f"{name:<46}{med:>9.2f}{n_img / med:>9.0f}{statistics.median(ratios):>8.3f}{spread:>14}"
              f"{min(ref) / min(ts):>7.3f}{min(default) / min(ts):>18.3f}{accs[name]:>11.3f}")


if __name__ == '__main__':
    main()
