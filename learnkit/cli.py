"""`learnkit train`: train a model on Fashion-MNIST or on your own image folders, and write a run directory.

A run directory holds config.json, metrics.csv, model.pt (weights only), plots/*.png and report.md,
so a run can be read without Jupyter.

Every mistake a user can make on the command line (a bad flag value, a folder that holds no data, weights that do
not fit the model) ends the command with one line on stderr and exit status 2, as argparse's own errors do;
a failure once training runs is a bug or a training problem, and keeps its traceback.
"""
import argparse
import inspect
import json
import sys
from pathlib import Path

__all__ = ['main', 'build_parser', 'train', 'UsageError']

SCRATCH_LR, FINE_TUNE_LR = 0.1, 2e-3
"The default --lr: the chapter's for training from scratch, fastai's `fine_tune` base_lr for --fine-tune."

# Registered constructors that take an architecture or a weights file rather than being one: not --model names.
_WRAPPERS = ('vision_model', 'torchvision_model')
_TV_PREFIX = 'torchvision.'


class UsageError(Exception):
    "A mistake in how the command was called (flags, data, weights): reported as one line, exit status 2."


def _fail(prog, message):
    "End the command as argparse does for a bad flag, but on one line: `learnkit train: error: <what> (see ...)`."
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())} (see {prog} --help)\n")
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    "argparse, with its errors on one line (no usage block above them)."
    def error(self, message): _fail(self.prog, message)


def _positive(kind):
    def parse(text):
        try: value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
        if not value > 0: raise argparse.ArgumentTypeError(f"must be greater than 0; got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its own messages
    return parse


def _fraction(text):
    try: value = float(text)
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1: raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), e.g. 0.2; got {text}")
    return value


def build_parser():
    parser = _Parser(prog='learnkit', description="Train CNNs the fastai way on Fashion-MNIST or your own images, "
                                                  "and say how training went.")
    sub = parser.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help="train a model and write a run directory",
                       description="Train a model (default: the chapter's simple_cnn) on Fashion-MNIST's IDX files or "
                                   "on a folder of images in class folders, and write config.json, metrics.csv, "
                                   "plots/, report.md and the weights to --out.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument('--data', type=Path, default=None,
                   help='a folder with the four Fashion-MNIST IDX files (default: the Debian package '
                        'dataset-fashion-mnist, /usr/share/datasets/fashion-mnist), or a folder of images in class '
                        'folders: DIR/train/<label>/*.jpg and DIR/valid/<label>/*.jpg, or DIR/<label>/*.jpg with '
                        '--valid-pct')
    t.add_argument('--valid-pct', type=_fraction, default=None,
                   help='image folders: hold out this random fraction of the images for validation, instead of '
                        'the train/ and valid/ folders')
    t.add_argument('--size', type=_positive(int), default=None,
                   help='image folders: resize every image to SIZE x SIZE (needed when their sizes differ)')
    t.add_argument('--model', default='simple_cnn',
                   help='a learnkit model (simple_cnn, lenet, resnet18, ...: learnkit.models.MODELS) or a '
                        'torchvision architecture (resnet50, efficientnet_b0, ...; torchvision.NAME where learnkit '
                        'has the same name), built through vision_learner')
    t.add_argument('--fine-tune', action='store_true',
                   help='start from --weights and train with fine_tune(epochs, lr): the body frozen for one epoch, '
                        'then everything at discriminative rates')
    t.add_argument('--weights', type=Path, default=None,
                   help='with --fine-tune: a local state_dict file of --model (nothing is ever downloaded)')
    t.add_argument('--epochs', type=_positive(int), default=5, help='number of epochs')
    t.add_argument('--lr', type=_positive(float), default=None,
                   help=f'learning rate (the peak lr with --one-cycle; default {SCRATCH_LR}, or {FINE_TUNE_LR} '
                        'with --fine-tune)')
    t.add_argument('--bs', type=_positive(int), default=64,
                   help='training batch size per process (under torchrun the global batch is bs x processes)')
    t.add_argument('--bn', action=argparse.BooleanOptionalAction, default=None,
                   help="batchnorm after every conv (the chapter's remedy for unstable training); for models with "
                        "a bn argument (simple_cnn), where it defaults to on")
    t.add_argument('--one-cycle', action=argparse.BooleanOptionalAction, default=None,
                   help='1cycle schedule (fit_one_cycle, the default); --no-one-cycle trains at a constant lr (fit)')
    t.add_argument('--out', type=Path, default=Path('runs/chapter'), help='run directory to write')
    t.add_argument('--seed', type=int, default=0, help='random seed for init and data order')
    t.add_argument('--diagnostics', action=argparse.BooleanOptionalAction, default=True,
                   help='record what the health report reads (health_cbs(): inputs, outputs, ActivationStats with '
                        'histograms, GradientStats, weights; new problems are printed as they appear), and write '
                        'plots/layer_stats.png, plots/color_dim.png, plots/gradients.png and report.md (the health report)')
    t.add_argument('--n-train', type=_positive(int), default=None,
                   help='Fashion-MNIST: use only the first N training images (quick runs)')
    t.add_argument('--n-valid', type=_positive(int), default=None,
                   help='Fashion-MNIST: use only the first N validation images')
    return parser


# --------------------------------------------------------------------------------------------- checking the flags
def _registered(name):
    "The learnkit constructor `--model name` means, or None."
    from .models.registry import MODELS
    return MODELS.get(name) if name not in _WRAPPERS else None


def _model_kind(name):
    "'learnkit' or 'torchvision' for a --model name; a UsageError naming close matches for an unknown one."
    import difflib
    if not name.startswith(_TV_PREFIX) and _registered(name) is not None: return 'learnkit'
    from torchvision import models
    tv_names = models.list_models(module=models)
    if name.removeprefix(_TV_PREFIX) in tv_names: return 'torchvision'
    from .models.registry import MODELS
    known = [n for n in MODELS if n not in _WRAPPERS]
    close = difflib.get_close_matches(name.removeprefix(_TV_PREFIX), sorted(set(known + tv_names)), n=4)
    raise UsageError(f"--model {name}: no learnkit model or torchvision classifier of that name"
                     f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}. learnkit models: "
                     f"{', '.join(sorted(known))}; torchvision ones: see torchvision.models.list_models()")


def _data_kind(args):
    "'idx' or 'images', from what the --data folder holds; a UsageError saying what was expected otherwise."
    from .data.images import IMAGE_EXTENSIONS
    from .datasets import FASHION_MNIST_PATH, has_fashion_mnist_files
    folder = FASHION_MNIST_PATH if args.data is None else args.data
    if args.data is not None and not folder.is_dir(): raise UsageError(f"--data {folder}: no such folder")
    if folder.is_dir() and has_fashion_mnist_files(folder): return 'idx'
    if folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob('*')):
        if args.valid_pct is None and not all((folder / f).is_dir() for f in ('train', 'valid')):
            folders = sorted(d.name for d in folder.iterdir() if d.is_dir())
            raise UsageError(f"--data {folder} holds images but no train/ and valid/ folders (folders present: "
                             f"{', '.join(folders[:10])}{' ...' if len(folders) > 10 else ''}): pass --valid-pct 0.2 to "
                             "hold out a random 20%, or arrange them as train/<label>/ and valid/<label>/")
        return 'images'
    if args.data is None:
        raise UsageError(f"no Fashion-MNIST files in {folder}: install the Debian package dataset-fashion-mnist, or "
                         "pass --data with a folder of the four IDX files or of images in class folders")
    raise UsageError(f"--data {folder} holds neither Fashion-MNIST's IDX files (train-images-idx3-ubyte.gz and the "
                     "three others, as the Debian package dataset-fashion-mnist installs them) nor image files in "
                     "class folders (train/<label>/*.png and valid/<label>/*.png, or <label>/*.png with --valid-pct)")


def check_args(args):
    """Refuse, before anything heavy, every flag that is out of range, does not apply, or names a missing file.
    Fills in the defaults that depend on other flags (lr, bn, one_cycle) and records what the data is."""
    args.data_kind = _data_kind(args)
    only = {'idx': ('--valid-pct', '--size'), 'images': ('--n-train', '--n-valid')}[args.data_kind]
    given = [f for f in only if getattr(args, f[2:].replace('-', '_')) is not None]
    if given:
        what = 'Fashion-MNIST IDX files' if args.data_kind == 'idx' else 'an image folder'
        raise UsageError(f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {what}, which "
                         f"--data names; "
                         f"{'they are for image folders' if args.data_kind == 'idx' else 'they are for Fashion-MNIST'}")
    args.model_kind = _model_kind(args.model)
    if args.fine_tune:
        if args.weights is None:
            raise UsageError("--fine-tune starts from pretrained weights: pass --weights FILE, a state_dict of "
                             f"{args.model} saved on this machine (learnkit never downloads weights)")
        if args.one_cycle is False: raise UsageError("--fine-tune always trains with 1cycle: drop --no-one-cycle")
    elif args.weights is not None:
        raise UsageError("--weights is read only by --fine-tune: add --fine-tune to start from those weights")
    if args.weights is not None and not args.weights.is_file():
        raise UsageError(f"--weights {args.weights}: no such file")
    takes_bn = args.model_kind == 'learnkit' and 'bn' in inspect.signature(_registered(args.model)).parameters
    if args.bn is not None and (not takes_bn or args.fine_tune):
        raise UsageError(f"--{'' if args.bn else 'no-'}bn applies to models built with a bn argument (simple_cnn), "
                         f"not to {args.model}{' under --fine-tune' if takes_bn else ''}")
    if takes_bn and not args.fine_tune and args.bn is None: args.bn = True
    if args.lr is None: args.lr = FINE_TUNE_LR if args.fine_tune else SCRATCH_LR
    if args.one_cycle is None: args.one_cycle = True
    return args


# ----------------------------------------------------------------------------------------------- data and model
def _dataloaders(args):
    "DataLoaders for the --data folder, and a description of them for the first line of output."
    from .data import DataLoaders, ImageDataLoaders, Normalize, Resize
    norm = [] if args.fine_tune else [Normalize()]  # fine-tuning normalises as the weights expect (vision_learner)
    if args.data_kind == 'idx':
        from .datasets import fashion_mnist
        data = fashion_mnist(args.data)
        x_train, y_train = data.x_train[:args.n_train], data.y_train[:args.n_train]
        x_valid, y_valid = data.x_valid[:args.n_valid], data.y_valid[:args.n_valid]
        dls = DataLoaders.from_tensors(x_train, y_train, x_valid, y_valid, bs=args.bs, batch_tfms=norm,
                                       vocab=data.classes, seed=args.seed)
        return dls, f"Fashion-MNIST: {len(x_train)} train / {len(x_valid)} valid images"
    item_tfms = None if args.size is None else [Resize(args.size)]
    dls = ImageDataLoaders.from_folder(args.data, valid_pct=args.valid_pct, seed=args.seed, item_tfms=item_tfms,
                                       batch_tfms=norm, bs=args.bs)
    dls.load()   # decode now, so that an unreadable file or mixed sizes are reported before training starts
    if len(dls.train) == 0:   # the training loader drops its last partial batch
        raise UsageError(f"--bs {args.bs} is more than the {len(dls.train.items)} training images in {args.data}: "
                         "pass a smaller --bs")
    return dls, (f"{args.data}: {len(dls.train.items)} train / {len(dls.valid.items)} valid images, "
                 f"{len(dls.vocab)} classes")


def _learner(args, dls, cbs):
    "The Learner for --model: a learnkit model as it is, a torchvision one (or any under --fine-tune) via vision_learner."
    from torch import nn

    from .learner import Learner
    from .metrics import accuracy
    from .transfer import vision_learner
    common = dict(loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=cbs)
    if args.model_kind == 'learnkit' and not args.fine_tune:
        build = _registered(args.model)
        kwargs = {'n_out': dls.c, 'in_ch': dls.one_batch()[0].shape[1]}
        if args.bn is not None: kwargs['bn'] = args.bn
        return Learner(dls, build(**kwargs), **common)
    arch = _registered(args.model) if args.model_kind == 'learnkit' else args.model.removeprefix(_TV_PREFIX)
    return vision_learner(dls, arch, pretrained=args.fine_tune, weights=args.weights, **common)


def _model_label(args):
    if args.bn is not None: return f"{args.model}(bn={args.bn})"
    return f"{args.model} fine-tuned from {args.weights}" if args.fine_tune else args.model


def train(args):
    "Run the training described by parsed `args` (checked by `check_args` unless already); returns the Learner."
    import torch

    from .callbacks.distributed import is_rank0
    from .callbacks.monitor import health_cbs

    if not hasattr(args, 'data_kind'): check_args(args)
    torch.manual_seed(args.seed)
    try:
        dls, described = _dataloaders(args)
        learn = _learner(args, dls, health_cbs() if args.diagnostics else [])
    except (ValueError, FileNotFoundError) as e:   # the data or the weights, as the user gave them
        hint = ' On the command line: --size SIZE.' if 'Resize(' in str(e) and args.size is None else ''
        raise UsageError(f"{e}{hint}") from e
    out = args.out
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != 'command'}
    if is_rank0():                      # under torchrun only rank 0 writes and prints
        (out / 'plots').mkdir(parents=True, exist_ok=True)
        (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
        how = 'fine_tune' if args.fine_tune else 'fit_one_cycle' if args.one_cycle else 'fit'
        print(f"{_model_label(args)} on {described}, bs {args.bs}, {how}({args.epochs}, {args.lr}), "
              f"device {learn.device}", flush=True)
    if args.fine_tune: learn.fine_tune(args.epochs, args.lr)
    elif args.one_cycle: learn.fit_one_cycle(args.epochs, args.lr)
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
    "The `learnkit` command. A user error exits with status 2 and one line on stderr; bugs keep their traceback."
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == 'train':
        try: train(check_args(args))
        except UsageError as e: _fail(f"{parser.prog} train", e)
    return 0


if __name__ == '__main__':
    sys.exit(main())
