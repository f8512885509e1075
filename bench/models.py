"""Train the chapters' CNNs on Fashion-MNIST with 1cycle and print a results table.

    python bench/models.py                                   # simple_cnn_bn, the chapter's run (CPU: a few minutes)
    python bench/models.py --models resnet18 --epochs 5      # GPU run: resnet18, small-input stem, flip + crop
    python bench/models.py --models simple_cnn_bn,resnet18 --epochs 1 --n-train 2000   # quick CPU check

Each name is a registered model (learnkit.models.MODELS, built with its defaults at 28x28, 1 channel) or one
of the presets below, which fix the model's arguments and the chapter's settings (lr, epochs, batch size,
augmentation). --epochs/--lr/--bs/--aug override every row. Columns: model, params, epochs, lr, bs, aug,
valid accuracy (on the 10k test images, or the first --n-valid), time (seconds of fit_one_cycle).
Targets (issue 5): simple_cnn_bn with fit_one_cycle(5, 0.1) on the full data >= 0.91 on a CPU; resnet18 with
augmentation on a GPU, how close to 0.94.
"""
import argparse
import contextlib
import time

import torch

from learnkit import Learner, accuracy
from learnkit.data import DataLoaders, Flip, Normalize, RandomCrop
from learnkit.datasets import fashion_mnist
from learnkit.models import MODELS, get_model

# name -> (registered model, its kwargs, lr, epochs, bs, augment)
PRESETS = {
    'simple_cnn': ('simple_cnn', {}, 0.06, 5, 512, False),
    'simple_cnn_bn': ('simple_cnn', {'bn': True}, 0.1, 5, 512, False),  # the chapter's last run
    'resnet18': ('resnet18', {'small_input': True}, 1e-2, 5, 256, True),
    'se_resnet': ('se_resnet', {'small_input': True}, 1e-2, 5, 256, True),
}
DEFAULT_RUN = (1e-3, 5, 256, False)  # lr, epochs, bs, augment for any other registered model


def run_config(name, args):
    "(model name, kwargs, lr, epochs, bs, aug) for a preset or registered model, with the command line's overrides."
    if name in PRESETS: model, kwargs, *run = PRESETS[name]
    elif name in MODELS and name != 'torchvision_model': model, kwargs, run = name, {}, list(DEFAULT_RUN)
    else:
        raise SystemExit(f"unknown model {name!r}; presets: {', '.join(PRESETS)}; registered: "
                         f"{', '.join(sorted(set(MODELS) - {'torchvision_model'}))}")
    overrides = (args.lr, args.epochs, args.bs, None if args.aug == 'default' else args.aug == 'on')
    lr, epochs, bs, aug = (o if o is not None else r for o, r in zip(overrides, run))
    return model, kwargs, lr, epochs, bs, aug


def train_one(name, data, args):
    model_name, kwargs, lr, epochs, bs, aug = run_config(name, args)
    x, y, xv, yv = data
    tfms = [Normalize()] + ([Flip(), RandomCrop(28, padding=2)] if aug else [])
    torch.manual_seed(args.seed)
    dls = DataLoaders.from_tensors(x, y, xv, yv, bs=bs, batch_tfms=tfms, seed=args.seed, device=args.device)
    model = get_model(model_name, n_out=10, in_ch=1, **kwargs)
    learn = Learner(dls, model, metrics=accuracy, device=args.device)
    start = time.perf_counter()
    with contextlib.ExitStack() as quiet:
        if args.quiet: quiet.enter_context(learn.no_logging()); quiet.enter_context(learn.no_bar())
        learn.fit_one_cycle(epochs, lr)
    seconds = time.perf_counter() - start  # the epoch-end metrics read already synced
    valid_loss, acc = learn.validate()
    params = sum(p.numel() for p in model.parameters())
    return dict(model=name, params=params, epochs=epochs, lr=lr, bs=bs, aug='flip+crop' if aug else '-',
                valid_accuracy=acc, time=seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default='simple_cnn_bn', help='comma-separated presets or registered model names')
    p.add_argument('--epochs', type=int, help="override each model's epochs")
    p.add_argument('--lr', type=float, help="override each model's lr_max")
    p.add_argument('--bs', type=int, help="override each model's batch size")
    p.add_argument('--aug', choices=['default', 'on', 'off'], default='default', help='flip + random crop (pad 2)')
    p.add_argument('--n-train', type=int, default=60_000, help='first N training images')
    p.add_argument('--n-valid', type=int, default=10_000, help='first N test images, the validation set')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quiet', action='store_true', help='no progress bars or epoch lines')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fm = fashion_mnist()
    data = (fm.x_train[:args.n_train], fm.y_train[:args.n_train], fm.x_valid[:args.n_valid], fm.y_valid[:args.n_valid])
    names = [n.strip() for n in args.models.split(',') if n.strip()]
    for n in names: run_config(n, args)  # fail on a bad name before any training
    rows = [train_one(n, data, args) for n in names]
    device = torch.cuda.get_device_name() if args.device.startswith('cuda') else f'cpu, {args.threads} threads'
    print(f"\nFashion-MNIST, {len(data[0])} train / {len(data[2])} valid images, fit_one_cycle, {device}")
    print(f"{'model':<14}{'params':>12}{'epochs':>8}{'lr':>8}{'bs':>6}{'aug':>11}{'valid accuracy':>16}{'time':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['params']:>12,}{r['epochs']:>8}{r['lr']:>8g}{r['bs']:>6}{r['aug']:>11}"
              f"{r['valid_accuracy']:>16.4f}{r['time']:>9.1f}s")


if __name__ == '__main__':
    main()
