"""`learnkit train`: the chapter's experiment from the command line, written to a run directory.

A run directory holds config.json, metrics.csv, model.pt (weights only), plots/*.png and report.md,
so a run can be read without Jupyter.
"""
import argparse
import json
import sys
from pathlib import Path

__all__ = ['main', 'build_parser', 'train']


def build_parser():
    parser = argparse.ArgumentParser(
        prog='learnkit', description="Train the book chapter's CNNs the fastai way, and say how training went.")
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help="train simple_cnn on Fashion-MNIST and write a run directory",
                       description="Train the chapter's simple_cnn on Fashion-MNIST (60k train / 10k valid) and "
                                   "write metrics.csv, plots/, report.md and the weights to --out.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument('--epochs', type=int, default=5, help='number of epochs')
    t.add_argument('--lr', type=float, default=0.1, help='learning rate (the peak lr with --one-cycle)')
    t.add_argument('--bs', type=int, default=64,
                   help='training batch size per process (under torchrun the global batch is bs x processes)')
    t.add_argument('--bn', action=argparse.BooleanOptionalAction, default=True,
                   help='batchnorm after every conv (the chapter\'s remedy for unstable training)')
    t.add_argument('--one-cycle', action=argparse.BooleanOptionalAction, default=True,
                   help='1cycle schedule (fit_one_cycle); --no-one-cycle trains at a constant lr (fit)')
    t.add_argument('--data', type=Path, default=None,
                   help='folder with the four Fashion-MNIST IDX files (default: the Debian package '
                        'dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)')
    t.add_argument('--out', type=Path, default=Path('runs/chapter'), help='run directory to write')
    t.add_argument('--seed', type=int, default=0, help='random seed for init and data order')
    t.add_argument('--diagnostics', action=argparse.BooleanOptionalAction, default=True,
                   help='record what the health report reads (health_cbs(): inputs, outputs, ActivationStats with '
                        'histograms, GradientStats, weights; new problems are printed as they appear), and write '
                        'plots/layer_stats.png, plots/color_dim.png, plots/gradients.png and report.md (the health report)')
    t.add_argument('--n-train', type=int, default=None, help='use only the first N training images (quick runs)')
    t.add_argument('--n-valid', type=int, default=None, help='use only the first N validation images')
    return parser


def train(args):
    "Run the training described by parsed `args`; returns the Learner."
    import torch
    from torch import nn

    from .callbacks.distributed import is_rank0
    from .callbacks.monitor import health_cbs
    from .data import DataLoaders, Normalize
    from .datasets import fashion_mnist
    from .learner import Learner
    from .metrics import accuracy
    from .models import simple_cnn

    if args.epochs < 1: raise SystemExit(f"--epochs must be at least 1; got {args.epochs}")
    if args.bs < 1: raise SystemExit(f"--bs must be at least 1; got {args.bs}")
    torch.manual_seed(args.seed)
    data = fashion_mnist(args.data)
    x_train, y_train = data.x_train[:args.n_train], data.y_train[:args.n_train]
    x_valid, y_valid = data.x_valid[:args.n_valid], data.y_valid[:args.n_valid]
    dls = DataLoaders.from_tensors(x_train, y_train, x_valid, y_valid, bs=args.bs, batch_tfms=[Normalize()],
                                   vocab=data.classes, seed=args.seed)
    cbs = health_cbs() if args.diagnostics else []
    learn = Learner(dls, simple_cnn(bn=args.bn), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=cbs)
    out = args.out
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != 'command'}
    if is_rank0():                      # under torchrun only rank 0 writes and prints
        (out / 'plots').mkdir(parents=True, exist_ok=True)
        (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
        print(f"simple_cnn(bn={args.bn}) on Fashion-MNIST: {len(x_train)} train / {len(x_valid)} valid images, "
              f"bs {args.bs}, {'fit_one_cycle' if args.one_cycle else 'fit'}({args.epochs}, {args.lr}), "
              f"device {learn.device}", flush=True)
    if args.one_cycle: learn.fit_one_cycle(args.epochs, args.lr)
    else: learn.fit(args.epochs, args.lr)
    if is_rank0(): write_run(learn, out)
    return learn


def write_run(learn, out):
    "metrics.csv, weights, the plots of a finished run and, with diagnostics, the health report."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch

    learn.recorder.df.to_csv(out / 'metrics.csv', index=False)
    torch.save(learn.model.state_dict(), out / 'model.pt')
    plots = {'loss': learn.recorder.plot_loss, 'schedule': learn.recorder.plot_sched}
    written = ['config.json', 'metrics.csv', 'model.pt']
    if hasattr(learn, 'activation_stats'):
        plots.update(layer_stats=lambda: learn.activation_stats.plot_layer_stats(-2),
                     color_dim=learn.activation_stats.plot_all)
    if hasattr(learn, 'gradient_stats'): plots['gradients'] = learn.gradient_stats.plot_all
    for name, plot in plots.items():
        fig = plot()
        fig.savefig(out / 'plots' / f'{name}.png', dpi=100, bbox_inches='tight')
        plt.close(fig)
        written.append(f'plots/{name}.png')
    if hasattr(learn, 'activation_stats'):
        report = learn.diagnose()
        (out / 'report.md').write_text(report.to_markdown() + '\n')
        written.append('report.md')
    print(f"wrote {out}/: {' '.join(written)}", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == 'train': train(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
