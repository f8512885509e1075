"""Run fastai's own callbacks on learnkit, with only their imports changed, and check that each does what fastai says.

    python bench/fastai_callbacks.py                    # downloads the fastai wheel with pip (no dependencies)
    python bench/fastai_callbacks.py --wheel PATH.whl   # or reads one already downloaded

The script takes the source of 16 callback classes from the wheel (and the module-level helpers they use: MixUp's
`MixHandler` and `reduce_loss`, BnFreeze's `set_bn_eval`, the trackers' `TrackerCallback`), drops fastai's import
lines and puts `IMPORTS` in their place: the names fastai's `from ..basics import *` brings in, taken from torch,
numpy, pandas and fastcore (where fastai itself gets them) and from learnkit (fastai's own names). Nothing else in
the source changes. Each class then trains on a few hundred Fashion-MNIST images and one check tests what fastai
documents it does. The table says, per class, whether it ran and whether the check held; then the total.

fastai is never installed or imported: its wheel is only read as text.
"""
import argparse
import ast
import builtins
import contextlib
import io
import subprocess
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnkit import Callback, CrossEntropyLossFlat, DataLoaders, Learner, SchedLin, flatten_model
from learnkit.datasets import fashion_mnist

# What replaces fastai's import lines in every extracted module.
IMPORTS = '''\
import os
from pathlib import Path
import numpy as np
import pandas as pd
import torch
from torch import nn, Tensor
from torch.distributions.beta import Beta
from fastcore.basics import store_attr
from fastcore.foundation import L, docs
from learnkit import (Callback, CancelBatchException, CancelFitException, CancelTrainException, CancelValidException,
                      MixedPrecision, TrainEvalCallback, NoneReduce, find_bs, flatten_model, tensor, unsqueeze)
'''

# fastai module -> the classes taken from it
CLASSES = {
    'training': ['ShortEpochCallback', 'GradientAccumulation', 'GradientClip', 'BnFreeze'],
    'tracker': ['TerminateOnNaNCallback', 'TrackerCallback', 'EarlyStoppingCallback', 'SaveModelCallback',
                'ReduceLROnPlateau'],
    'mixup': ['MixUp', 'CutMix'],
    'progress': ['CSVLogger'],
    'channelslast': ['ChannelsLast'],
    'preds': ['MCDropoutCallback'],
    'data': ['CollectDataCallback'],
    'schedule': ['ParamScheduler'],
}


# ---- the fastai source --------------------------------------------------------------------------------------------
def fastai_wheel(path):
    if path: return Path(path)
    dest = Path(tempfile.mkdtemp(prefix='fastai-wheel-'))
    subprocess.run([sys.executable, '-m', 'pip', 'download', 'fastai', '--no-deps', '--quiet', '-d', str(dest)],
                   check=True)
    return next(dest.glob('fastai-*.whl'))


def _defined(node):
    if isinstance(node, (ast.ClassDef, ast.FunctionDef)): return {node.name}
    if isinstance(node, ast.Assign):
        return {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _used(node): return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def extract(source, names):
    """The top-level definitions of `names` in `source`, with the module-level definitions they use, in file order.
    Imports are left out; the code itself is copied character for character."""
    tree = ast.parse(source)
    defs = [(node, _defined(node)) for node in tree.body if _defined(node) and not _defined(node) <= {'__all__'}]
    by_name = {n: node for node, ns in defs for n in ns}
    keep, todo = set(), list(names)
    while todo:
        node = by_name.get(todo.pop())
        if node is None or id(node) in keep: continue
        keep.add(id(node))
        todo += list(_used(node))
    return '\n\n'.join(ast.get_source_segment(source, node, padded=False) for node, _ in defs if id(node) in keep
                       if not _decorators(node) & {'patch'})


def _decorators(node):
    return {d.id for d in getattr(node, 'decorator_list', []) if isinstance(d, ast.Name)}


def load_classes(wheel):
    "Each class, built from fastai's source under `IMPORTS`; and the names the source uses that nothing defines."
    classes, undefined = {}, {}
    with zipfile.ZipFile(wheel) as z:
        for module, names in CLASSES.items():
            code = IMPORTS + '\n' + extract(z.read(f'fastai/callback/{module}.py').decode(), names)
            namespace = {'__name__': f'fastai_on_learnkit.{module}'}
            exec(compile(code, f'fastai/callback/{module}.py (imports rewritten)', 'exec'), namespace)
            missing = _free_names(code) - set(namespace) - set(dir(builtins))
            if missing: undefined[module] = sorted(missing)
            classes.update({n: namespace[n] for n in names})
        callback_names = [node.name for f in z.namelist() if f.startswith('fastai/callback/') and f.endswith('.py')
                          for node in ast.parse(z.read(f)).body if isinstance(node, ast.ClassDef)]
    return classes, undefined, callback_names


def _free_names(code):
    "Names read anywhere in `code` (local ones too; those defined in the module or as builtins are then removed)."
    tree = ast.parse(code)
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    args = {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments)
            for a in n.args + n.kwonlyargs + n.posonlyargs + [x for x in (n.vararg, n.kwarg) if x]}
    funcs = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    caught = {n.name for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.name}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - assigned - args - funcs - caught


# ---- a small run ---------------------------------------------------------------------------------------------------
FM = None


def data(n_train=256, n_valid=256, bs=64, shuffle=True, nan_at=None):
    "Normalised Fashion-MNIST slices in plain torch loaders; `nan_at` poisons one training image."
    global FM
    FM = FM or fashion_mnist()
    x = FM.x_train[:n_train].float().div(255).unsqueeze(1)
    xv = FM.x_valid[:n_valid].float().div(255).unsqueeze(1)
    mean, std = x.mean(), x.std()
    x, xv = (x - mean) / std, (xv - mean) / std
    if nan_at is not None: x[nan_at] = float('nan')
    g = torch.Generator().manual_seed(0)
    return DataLoaders(DataLoader(TensorDataset(x, FM.y_train[:n_train]), bs, shuffle=shuffle, generator=g),
                       DataLoader(TensorDataset(xv, FM.y_valid[:n_valid]), bs))


def cnn(bn=False, dropout=False):
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), *([nn.BatchNorm2d(8)] if bn else []), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         *([nn.Dropout(0.5)] if dropout else []), nn.Linear(16, 10))


def learner(dls=None, model=None, path=None, **kw):
    "fastai's classification loss (what a CategoryBlock gives it there, and learnkit's loaders with a vocab here)."
    torch.manual_seed(0)
    return Learner(dls or data(), model or cnn(), loss_func=CrossEntropyLossFlat(), path=path or tempfile.mkdtemp(),
                   device='cpu', **kw)


def fit(learn, *args, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kw)


def probe(event, fn, order=0):
    "A callback calling `fn(learn)` at `event`."
    return type('Probe', (Callback,), {'order': order, event: lambda self: fn(self.learn)})()


def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- one check per class: what fastai documents it does ------------------------------------------------------------
def short_epoch(C):
    "Fits only `pct` of each epoch: 3 of 4 batches in training and in validation with pct=0.5."
    seen = []
    learn = learner(data(256, 256, bs=64))
    fit(learn, 1, 1e-3, cbs=[C['ShortEpochCallback'](pct=0.5), probe('after_pred', lambda l: seen.append(l.training))])
    return seen.count(True) == 3 and seen.count(False) == 3


def gradient_accumulation(C):
    "Steps once per n_acc items, with the gradient of one large batch: 2x64 accumulated == 1x128."
    steps = []
    small = learner(data(256, 64, bs=64, shuffle=False), opt_func=torch.optim.SGD)
    fit(small, 1, 0.1, cbs=[C['GradientAccumulation'](n_acc=128), probe('after_step', lambda l: steps.append(l.iter))])
    large = learner(data(256, 64, bs=128, shuffle=False), opt_func=torch.optim.SGD)
    fit(large, 1, 0.1)
    close = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(small.parameters(), large.parameters()))
    return steps == [1, 3] and close


def gradient_clip(C):
    "Clips the gradient norm to max_norm (measured by a torch optimizer hook, just before each step)."
    learn, norms = learner(), []
    learn.create_opt()
    learn.opt.opt.register_step_pre_hook(
        lambda opt, args, kw: norms.append(torch.cat([p.grad.flatten() for p in learn.model.parameters()]).norm()))
    fit(learn, 1, 1e-2, cbs=C['GradientClip'](max_norm=0.05))
    return float(torch.stack(norms).max()) <= 0.05 * 1.0001


def bn_freeze(C):
    "Frozen (non-trainable) batchnorm layers keep their running statistics; the rest trains."
    learn = learner(model=cnn(bn=True))
    bn = learn.model[1]
    for p in bn.parameters(): p.requires_grad_(False)
    stats, conv = bn.running_mean.clone(), learn.model[0].weight.detach().clone()
    fit(learn, 1, 1e-2, cbs=C['BnFreeze']())
    return torch.equal(bn.running_mean, stats) and not torch.equal(learn.model[0].weight, conv)


def terminate_on_nan(C):
    "Stops the fit at the first batch whose loss is NaN (image 130: the third batch of 64)."
    learn = learner(data(256, 64, shuffle=False, nan_at=130))
    fit(learn, 3, 1e-3, cbs=C['TerminateOnNaNCallback']())
    return (learn.epoch, learn.iter, learn.recorder.values) == (0, 2, [])


def tracker(C):
    "Keeps the best value of `monitor` (valid_loss: the lowest)."
    cb = C['TrackerCallback']()
    learn = learner(cbs=cb)
    fit(learn, 3, 1e-2)
    return cb.best == min(v[1] for v in learn.recorder.values)


def early_stopping(C):
    "Stops when `monitor` has not improved by min_delta for `patience` epochs: 3 of 5 epochs with patience 2."
    learn = learner()
    with contextlib.redirect_stdout(io.StringIO()):
        fit(learn, 5, 1e-2, cbs=C['EarlyStoppingCallback'](min_delta=10., patience=2))
    return len(learn.recorder.values) == 3


def save_model(C):
    """Saves the model when `monitor` improves, loads the best at the end (the last epoch's huge lr spoils it).

    The history (recorder.values) stays whole: inside a fit, learn.load restores the model and optimizer only."""
    def blow_up(learn):
        if learn.epoch == 2: learn.opt.set_hyper('lr', 5.)
    cb = C['SaveModelCallback']()
    learn = learner()
    with contextlib.redirect_stdout(io.StringIO()): fit(learn, 3, 1e-2, cbs=[cb, probe('before_epoch', blow_up)])
    best = torch.load(cb.last_saved_path, weights_only=True)['model']
    losses = [v[1] for v in learn.recorder.values]
    return same(learn.model.state_dict(), best) and min(losses) < losses[-1] and len(losses) == 3


def reduce_lr_on_plateau(C):
    "Divides the lr by `factor` after `patience` epochs without improvement: 1e-2 -> 1e-4 after two in the optimizer."
    learn = learner()
    with contextlib.redirect_stdout(io.StringIO()):
        fit(learn, 3, 1e-2, cbs=C['ReduceLROnPlateau'](min_delta=10., patience=1, factor=10.))
    return all(abs(g['lr'] - 1e-4) < 1e-12 for g in learn.opt.opt.param_groups)


def _mixing(C, name):
    """Run callback `name`; return the training batches as the loader gave them ('x') and as the model got them
    ('mixed'), and whether the loss function was swapped in training only and put back after the fit."""
    train, valid_loss_funcs = [], []
    def before(learn):
        if learn.training: train.append({'x': learn.x.clone()})
    def after(learn):
        if learn.training: train[-1].update(mixed=learn.x, loss_func=learn.loss_func)
        else: valid_loss_funcs.append(learn.loss_func)
    learn = learner()
    loss_func = learn.loss_func
    fit(learn, 1, 1e-3, cbs=[C[name](), probe('before_batch', before, -1), probe('after_pred', after, 1)])
    swapped = (all(b['loss_func'] is not loss_func for b in train)
               and all(lf is loss_func for lf in valid_loss_funcs) and learn.loss_func is loss_func)
    return train, swapped


def _convex_mix_of_batch(x, mixed):
    "Whether each mixed[i] = lam * x[i] + (1 - lam) * x[j] for some j of the batch and lam >= 0.5."
    x, m = x.flatten(1), mixed.flatten(1)
    d = x[None] - x[:, None]                                   # d[i, j] = x[j] - x[i]
    e = (m - x)[:, None]
    t = (e * d).sum(-1) / (d * d).sum(-1).clamp_min(1e-12)     # how far along x[i] -> x[j] mixed[i] lies
    off = (e - t[..., None] * d).norm(dim=-1)
    fits = (off <= 1e-3 * (1 + e.norm(dim=-1))) & (t >= -1e-5) & (t <= 0.5 + 1e-5)
    return bool(fits.any(1).all())


def mixup(C):
    "Each training input is lam * itself + (1 - lam) * another of the batch (lam >= 0.5); a mixing loss in training."
    train, swapped = _mixing(C, 'MixUp')
    return swapped and all(_convex_mix_of_batch(b['x'], b['mixed']) and not torch.equal(b['x'], b['mixed'])
                           for b in train)


def cutmix(C):
    "A rectangle of each image is replaced by the same one of another image of the batch; a mixing loss in training."
    train, swapped = _mixing(C, 'CutMix')
    pasted = 0
    for b in train:
        x0, mixed = b['x'], b['mixed']
        diff = (x0 != mixed).any(0).any(0)
        if not diff.any(): continue                            # lam drew an empty box
        rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
        r, c = slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1)
        outside = x0.clone()
        outside[..., r, c] = mixed[..., r, c]
        from_batch = all(any(torch.equal(m[..., r, c], o[..., r, c]) for o in x0) for m in mixed)
        if not (torch.equal(outside, mixed) and from_batch): return False
        pasted += 1
    return swapped and pasted > 0


def csv_logger(C):
    "Writes the results table (header, then one row per epoch) to path/fname; read_log() reads it back."
    learn = learner(cbs=C['CSVLogger']())
    fit(learn, 2, 1e-3)
    df = learn.csv_logger.read_log()
    logged, recorded = df['valid_loss'].tolist(), [v[1] for v in learn.recorder.values]
    return (list(df.columns) == learn.recorder.metric_names and len(logged) == 2
            and all(abs(a - b) < 1e-6 for a, b in zip(logged, recorded)))


def channels_last(C):
    "Can be added (as learn.channels_last) and trains with the model's weights in channels_last memory format."
    learn = learner()
    learn.add_cb(C['ChannelsLast']())
    fit(learn, 1, 1e-3)
    w = learn.model[2].weight
    return isinstance(learn.channels_last, C['ChannelsLast']) and w.is_contiguous(
        memory_format=torch.channels_last) and not w.is_contiguous()


def mc_dropout(C):
    "Keeps dropout active during validation and get_preds, so two predictions differ (and not without it)."
    learn = learner(model=cnn(dropout=True))
    plain = [learn.get_preds()[0] for _ in range(2)]
    sampled = [learn.get_preds(cbs=C['MCDropoutCallback']())[0] for _ in range(2)]
    dropouts = [m for m in flatten_model(learn.model) if isinstance(m, nn.Dropout)]
    return torch.equal(*plain) and not torch.equal(*sampled) and not any(m.training for m in dropouts)


def collect_data(C):
    "Collects every batch's (xb, yb, pred, loss), detached and on the CPU, in `data`."
    cb = C['CollectDataCallback']()
    learn = learner(cbs=cb)
    fit(learn, 1, 1e-3)
    (xb, yb, pred, loss) = cb.data[0]
    return len(cb.data) == 4 + 4 and pred.shape == (64, 10) and all(
        t.device.type == 'cpu' and not t.requires_grad for t in (xb[0], yb[0], pred, loss))


def param_scheduler(C):
    "Sets each hyper-parameter from its schedule at every training batch and records it in recorder.hps."
    learn = learner()
    fit(learn, 2, 1e-3, cbs=C['ParamScheduler']({'lr': SchedLin(1e-3, 1e-2)}))
    expected = [1e-3 + 9e-3 * i / 8 for i in range(8)]
    return (all(abs(a - b) < 1e-12 for a, b in zip(learn.recorder.hps['lr'], expected))
            and all(abs(a - b) < 1e-12 for a, b in zip(learn.recorder.lrs, expected)) and len(learn.recorder.lrs) == 8)


CHECKS = {'ShortEpochCallback': short_epoch, 'GradientAccumulation': gradient_accumulation,
          'GradientClip': gradient_clip, 'BnFreeze': bn_freeze, 'TerminateOnNaNCallback': terminate_on_nan,
          'TrackerCallback': tracker, 'EarlyStoppingCallback': early_stopping, 'SaveModelCallback': save_model,
          'ReduceLROnPlateau': reduce_lr_on_plateau, 'MixUp': mixup, 'CutMix': cutmix, 'CSVLogger': csv_logger,
          'ChannelsLast': channels_last, 'MCDropoutCallback': mc_dropout, 'CollectDataCallback': collect_data,
          'ParamScheduler': param_scheduler}


def name_clashes(callback_names):
    "fastai callback classes whose learn.<name> would hide one of the Learner's own attributes."
    learn = learner()
    clashes = []
    for cls_name in callback_names:
        cb = type(cls_name, (Callback,), {})()
        own = learn._own_attr(cb.name)
        if own is not None and not isinstance(own, Callback): clashes.append(f'{cls_name} (learn.{cb.name})')
    return clashes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--wheel', help='a fastai wheel already downloaded (default: pip download fastai)')
    args = parser.parse_args()
    wheel = fastai_wheel(args.wheel)
    print(f'fastai source: {wheel.name}\nimports, in place of fastai\'s:\n{IMPORTS}')
    classes, undefined, callback_names = load_classes(wheel)
    for module, names in undefined.items():
        print(f'names fastai/callback/{module}.py uses that nothing defines: {names}')
    rows = []
    for name, check in CHECKS.items():
        try: ran, ok, note = True, bool(check(classes)), ''
        except Exception as e:
            ran, ok, note = False, False, f'{type(e).__name__}: {str(e).splitlines()[0][:90]}'
            traceback.print_exc(limit=-3, file=sys.stderr)
        rows.append((name, ran, ok, note or check.__doc__.split('\n')[0]))
    width = max(len(r[0]) for r in rows)
    print(f"{'class':<{width}}  ran  does what fastai documents  check")
    for name, ran, ok, note in rows:
        print(f"{name:<{width}}  {'yes' if ran else 'NO ':<3}  {'yes' if ok else 'NO':<26}  {note}")
    print(f"total: {sum(r[1] for r in rows)}/{len(rows)} ran, {sum(r[2] for r in rows)}/{len(rows)} did what fastai "
          "documents")
    clashes = name_clashes(callback_names)
    print(f"fastai callback classes ({len(callback_names)}) whose name would hide a Learner attribute: "
          f"{', '.join(clashes) or 'none'}")
    return 0 if all(r[2] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
