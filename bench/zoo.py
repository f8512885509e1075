"""The health report's ground truth: a zoo of broken and healthy Fashion-MNIST runs, and the harness that scores
`learn.diagnose()` against them.

    python bench/zoo.py                   # every run at bench size: the table and the totals (~75 s of CPU time)
    python bench/zoo.py --size test       # the small versions, the ones tests/test_health_zoo.py trains
    python bench/zoo.py --only NAME ...   # some runs only
    python bench/zoo.py --markdown        # the table as Markdown

Each recipe builds its data, its model and its Learner (with every callback the report needs), fits, and then
confirms its fault, or its health, by a direct measurement it makes itself with plain torch: forward hooks it
registers, its own evaluation loop over the validation data, its own weight snapshots. It never reads
learnkit's records, so the measurement is ground truth the report can be scored against.

A broken run passes when its measurement confirms the fault and one of its expected checks is among the report's
root causes at warning or error severity. A healthy run passes when its measurement confirms its health and the
report has no warning or error at all. Every recipe has two sizes, `test` (under a second of CPU time each) and
`bench`, from one definition: `size(test_value, bench_value)` picks. The recipes assume `health_cbs()` does not stop
a fit early (its default, `stop_on=None`): each measurement reads the run's end.
"""
import argparse
import copy
import functools
import math
import operator
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __name__ == '__main__':  # run as a script (from any folder): train with this checkout's learnkit
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learnkit import Callback, Learner, accuracy  # noqa: E402
from learnkit.diagnostics import health_cbs  # noqa: E402
from learnkit.data import DataLoaders, Normalize  # noqa: E402
from learnkit.datasets import fashion_mnist  # noqa: E402
from learnkit.models import simple_cnn  # noqa: E402
from learnkit.optimizer import SGD  # noqa: E402

__all__ = ['RECIPES', 'RECIPES_BY_NAME', 'Recipe', 'Run', 'Measurement', 'Condition', 'Size', 'TEST', 'BENCH',
           'health_callbacks', 'root_causes', 'alarms', 'report_agrees', 'disagreement', 'score', 'main']

N_CLASSES = 10
ALARM = ('warning', 'error')


# ---- the report ---------------------------------------------------------------------------------------------
def health_callbacks():
    "Every callback the report's checks read; the live monitor stays quiet (the table shows the final report)."
    return health_cbs(show=False)


def root_causes(report):
    "The report's root causes: its warnings and errors that no other finding explains."
    return report.root_causes


def alarms(report):
    "Every finding at warning or error severity, root cause or consequence."
    return [f for f in report.findings if f.severity in ALARM]


def report_agrees(recipe, report):
    """A broken run: one of its expected checks is a root cause at warning or error severity. A healthy run: no
    warning or error at all."""
    if recipe.healthy: return not alarms(report)
    return any(f.check in recipe.expected and f.severity in ALARM for f in root_causes(report))


def disagreement(recipe, report):
    "Why the report does not agree with the recipe, in words, with the whole report below."
    if recipe.healthy:
        return f"healthy run {recipe.name!r}: the report raised {describe(alarms(report))}\n{report}"
    return (f"{recipe.name!r} ({recipe.fault}): expected {' or '.join(recipe.expected)} among the root causes at "
            f"warning or error severity; the root causes were {describe(root_causes(report))}\n{report}")


def describe(findings):
    "`check (severity, layer)` for each finding, for the table and for assertion messages."
    return ', '.join(f"{f.check} ({f.severity[0].upper()}{', ' + f.layer if f.layer else ''})" for f in findings) or '-'


# ---- sizes, measurements, recipes --------------------------------------------------------------------------
@dataclass(frozen=True)
class Size:
    """A run size: calling it with `(test_value, bench_value)` returns the value for this size; `n_train` and
    `n_valid` are the usual numbers of images."""
    name: str
    n_train: int
    n_valid: int
    def __call__(self, test, bench): return test if self.name == 'test' else bench


TEST, BENCH = Size('test', 2000, 1000), Size('bench', 10000, 2000)
SIZES = {'test': TEST, 'bench': BENCH}

_OPS = {'>=': operator.ge, '<=': operator.le, '==': operator.eq, '>': operator.gt, '<': operator.lt}


@dataclass(frozen=True)
class Condition:
    "One measured number and the bound it must meet for the fault (or the health) to count as confirmed."
    what: str
    value: float
    op: str
    bound: float

    @property
    def holds(self): return _OPS[self.op](self.value, self.bound)
    def __str__(self): return f"{self.what} {_num(self.value)} {self.op} {_num(self.bound)}"


@dataclass
class Measurement:
    "What a recipe measured itself: conditions that confirm its fault or its health, and notes for the reader."
    conditions: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def expect(self, what, value, op, bound):
        self.conditions.append(Condition(what, float(value), op, float(bound)))
        return self

    def note(self, text):
        self.notes.append(text)
        return self

    @property
    def confirmed(self): return bool(self.conditions) and all(c.holds for c in self.conditions)
    @property
    def failed(self): return [c for c in self.conditions if not c.holds]

    def __str__(self): return '; '.join([str(c) for c in self.conditions] + self.notes)


@dataclass
class Run:
    "A trained recipe: its Learner (whose report is scored) and the recipe's own measurement."
    learn: Learner
    measurement: Measurement


@dataclass(frozen=True)
class Recipe:
    """One run of the zoo. `expected` are the checks that name its fault (empty for a healthy run); `build(size)`
    trains it and returns a `Run`."""
    name: str
    fault: str
    expected: tuple
    build: object

    @property
    def healthy(self): return not self.expected

    def run(self, size):
        "Train at `size` from fixed seeds and return the Run."
        torch.manual_seed(0)
        torch.set_flush_denormal(True)  # dead and collapsed networks are full of subnormals, ~10x slower on the CPU
        try: return self.build(size)
        finally: torch.set_flush_denormal(False)


RECIPES = []  # in the order of the table; RECIPES_BY_NAME finds one
RECIPES_BY_NAME = {}


def recipe(name, fault, expected=()):
    "Register a recipe: `expected` is a check name or a tuple of them; none for a healthy run."
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    def register(build):
        if name in RECIPES_BY_NAME: raise ValueError(f"two recipes named {name!r}")
        RECIPES.append(Recipe(name, fault, expected, build))
        RECIPES_BY_NAME[name] = RECIPES[-1]
        return build
    return register


def _num(v):
    if v != v or v in (float('inf'), float('-inf')): return str(v)
    if v == int(v) and abs(v) < 1e6: return str(int(v))
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


# ---- data ----------------------------------------------------------------------------------------------------
@functools.cache
def _fmnist(): return fashion_mnist()


@dataclass
class Data:
    "Float images (N, 1, 28, 28) and int64 labels, training and validation, as the recipe prepared them."
    x: torch.Tensor
    y: torch.Tensor
    xv: torch.Tensor
    yv: torch.Tensor

    def loaders(self, bs=64):
        "learnkit loaders over these tensors, as they are (float images are not rescaled), shuffled from seed 0."
        return DataLoaders.from_tensors(self.x, self.y, self.xv, self.yv, bs=bs, seed=0, device='cpu')


def pixels(size, n_train=None, index=None):
    """Training images (the first `n_train`, default `size.n_train`, or those at `index`) and the first
    `size.n_valid` validation images, as floats in 0..255, shaped (N, 1, 28, 28), with their labels."""
    fm = _fmnist()
    index = torch.arange(n_train or size.n_train) if index is None else index
    return Data(fm.x_train[index].float().unsqueeze(1), fm.y_train[index].clone(),
                fm.x_valid[:size.n_valid].float().unsqueeze(1), fm.y_valid[:size.n_valid].clone())


def normalized(size, n_train=None, index=None):
    "`pixels` scaled to [0, 1], then standardised with the training images' mean and std (as a user should)."
    d = pixels(size, n_train, index)
    x, xv = d.x / 255, d.xv / 255
    mean, std = x.mean(), x.std()
    return Data((x - mean) / std, d.y, (xv - mean) / std, d.yv)


# ---- models ----------------------------------------------------------------------------------------------------
def mlp(*widths, act=nn.ReLU):
    "Flatten, then Linear + `act` for each hidden width, then a Linear to the 10 classes."
    layers, n_in = [nn.Flatten()], 28 * 28
    for w in widths:
        layers += [nn.Linear(n_in, w), act()]
        n_in = w
    return nn.Sequential(*layers, nn.Linear(n_in, N_CLASSES))


def linears(model): return [m for m in model.modules() if isinstance(m, nn.Linear)]
def modules_of(model, kind): return [m for m in model.modules() if isinstance(m, kind)]


# ---- training ------------------------------------------------------------------------------------------------------
def learner(data_or_dls, model, bs=64, loss_func=None, **kwargs):
    "A Learner on the CPU with cross-entropy, accuracy and the report's callbacks."
    dls = data_or_dls.loaders(bs) if isinstance(data_or_dls, Data) else data_or_dls
    return Learner(dls, model, loss_func=loss_func if loss_func is not None else nn.CrossEntropyLoss(),
                   metrics=accuracy, cbs=health_callbacks(), device='cpu', **kwargs)


def quietly(learn, fit, *args, **kwargs):
    "Run `learn.<fit>(*args)` with no progress bar and no per-epoch lines; return the Learner."
    with learn.no_bar(), learn.no_logging(): getattr(learn, fit)(*args, **kwargs)
    return learn


# ---- the recipes' own measuring instruments (plain torch) --------------------------------------------------------
@dataclass
class Evaluation:
    "The recipe's own evaluation of a model: mean cross-entropy, accuracy, and the share of each predicted class."
    loss: float
    acc: float
    pred_share: torch.Tensor

    @property
    def top_share(self): return self.pred_share.max().item()


@torch.no_grad()
def evaluate(model, x, y, bs=1000):
    "Cross-entropy, accuracy and predicted-class shares of `model` on (x, y), in eval mode, with a plain loop."
    was_training = model.training
    model.eval()
    total, preds = 0., []
    try:
        for i in range(0, len(x), bs):
            out = model(x[i:i + bs])
            total += F.cross_entropy(out, y[i:i + bs], reduction='sum').item()
            preds.append(out.argmax(1))
    finally: model.train(was_training)
    p = torch.cat(preds)
    return Evaluation(total / len(x), (p == y).float().mean().item(),
                      torch.bincount(p, minlength=N_CLASSES).float() / len(p))


@torch.no_grad()
def forward_outputs(model, modules, x, bs=1000):
    "The outputs of `modules` on `x`, read by forward hooks (concatenated over chunks of `bs`), in eval mode."
    outs = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda mod, inp, out, i=i: outs[i].append(out.detach().clone()))
               for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), bs): model(x[i:i + bs])
    finally:
        model.train(was_training)
        for h in handles: h.remove()
    return [torch.cat(o) for o in outs]


class TrainingLosses:
    """Every training batch's loss, from a forward hook on the loss module. Validation runs under no_grad, so
    losses computed with grad mode off are left out."""
    def __init__(self, loss_module):
        self.values = []
        self.handle = loss_module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        if torch.is_grad_enabled(): self.values.append(out.detach().clone())

    def series(self):
        self.handle.remove()
        return torch.stack(self.values) if self.values else torch.zeros(0)


class GradNorms:
    """The norm of each gradient that backward delivers to the given parameters, from tensor hooks: what arrives
    at each step, whether or not the optimizer then uses it."""
    def __init__(self, params):
        self.norms = [[] for _ in params]
        self.handles = [p.register_hook(lambda g, i=i: self.norms[i].append(g.detach().norm()))
                        for i, p in enumerate(params)]

    def medians(self):
        for h in self.handles: h.remove()
        return [torch.stack(n).median().item() for n in self.norms]


class EpochSnapshots(Callback):
    "A copy of the model's weights at the end of every epoch, for the recipe's own per-epoch evaluation."
    def before_fit(self): self.states = []
    def after_epoch(self): self.states.append(copy.deepcopy(self.learn.model.state_dict()))

    def evaluations(self, model, x, y):
        "The recipe's own evaluation of each snapshot on (x, y), with a copy of `model`."
        twin = copy.deepcopy(model)
        out = []
        for state in self.states:
            twin.load_state_dict(state)
            out.append(evaluate(twin, x, y))
        return out


def snapshot(model): return [p.detach().clone() for p in model.parameters()]


def relative_change(before, after):
    "||after - before|| / ||before|| over all the tensors together."
    num = sum((a - b).pow(2).sum() for a, b in zip(after, before)).sqrt()
    return (num / sum(b.pow(2).sum() for b in before).sqrt()).item()


def nonfinite_tensors(model):
    "How many of the model's parameter tensors hold a NaN or an Inf."
    return sum(not torch.isfinite(p).all().item() for p in model.parameters())


def swings(series, factor):
    """The number of `factor`-fold moves in a series, alternating up and down (a zigzag filter): each move runs
    from a turning point to a value `factor` times above (or below) it, so noise smaller than `factor` is not
    counted, and a loss that falls once and stays down counts 1."""
    count, trend, extreme = 0, 0, series[0]
    for v in series[1:]:
        if trend <= 0 and v >= extreme * factor: count, trend, extreme = count + 1, 1, v
        elif trend >= 0 and v * factor <= extreme: count, trend, extreme = count + 1, -1, v
        elif trend > 0 and v > extreme or trend < 0 and v < extreme: extreme = v
    return count


def health(m, learn, snaps, xv, yv, min_acc):
    """The measurement every healthy run shares: its own evaluation is well above chance (0.10), the valid loss at
    the last epoch is within noise of its best, and every weight is finite."""
    evals = snaps.evaluations(learn.model, xv, yv)
    best = min(e.loss for e in evals)
    m.expect('valid accuracy', evals[-1].acc, '>=', min_acc)
    m.expect('last / best valid loss', evals[-1].loss / best, '<=', 1.02)
    m.expect('weight tensors holding NaN or Inf', nonfinite_tensors(learn.model), '==', 0)
    return m.note(f"valid loss per epoch {', '.join(f'{e.loss:.3f}' for e in evals)}")


# ==== broken runs ===========================================================================================
@recipe('unnormalized_inputs', "pixels fed as floats 0..255, never scaled or standardised", 'inputs_not_normalized')
def unnormalized_inputs(size):
    data = pixels(size)
    learn = quietly(learner(data, mlp(100)), 'fit_one_cycle', size(2, 3), 1e-3)
    xb = torch.cat([xb for xb, _ in learn.dls.train])
    return Run(learn, Measurement().expect('training input mean', xb.mean(), '>=', 10)
               .expect('training input std', xb.std(), '>=', 10))


@recipe('mostly_zero_inputs', "x // 255 on uint8 pixels: every pixel below 255 becomes 0", 'inputs_degenerate')
def mostly_zero_inputs(size):
    d = pixels(size)
    data = Data(d.x.div(255).floor(), d.y, d.xv.div(255).floor(), d.yv)
    learn = quietly(learner(data, mlp(100)), 'fit_one_cycle', size(2, 3), 1e-3)
    xb = torch.cat([xb for xb, _ in learn.dls.train])
    return Run(learn, Measurement().expect('share of exact zeros in the training inputs', (xb == 0).float().mean(),
                                           '>=', 0.95))


@recipe('nan_inputs', "a few training images carry NaN pixels (a corrupt file)", 'nonfinite')
def nan_inputs(size):
    data = normalized(size)
    bad = torch.randperm(len(data.x))[:len(data.x) // 100]
    data.x[bad, :, 10:14] = float('nan')
    learn = quietly(learner(data, mlp(100)), 'fit', size(2, 3), 1e-3)
    batches = [xb for xb, _ in learn.dls.train]
    m = Measurement()
    m.expect('training batches holding NaN', sum(torch.isnan(xb).any().item() for xb in batches), '>=', 3)
    m.expect('NaN pixels in the training inputs', sum(torch.isnan(xb).sum().item() for xb in batches), '>=', 100)
    return Run(learn, m.expect('weight tensors holding NaN or Inf after fit', nonfinite_tensors(learn.model), '>=', 1))


@recipe('softmax_before_loss', "the model ends in nn.Softmax, then nn.CrossEntropyLoss applies log-softmax again",
        'probabilities_into_loss')
def softmax_before_loss(size):
    data = normalized(size)
    learn = quietly(learner(data, nn.Sequential(mlp(100), nn.Softmax(dim=1))), 'fit_one_cycle', size(2, 3), 1e-3)
    with torch.no_grad(): out = learn.model.eval()(data.xv)
    m = Measurement().expect('largest |row sum - 1| of the outputs', (out.sum(1) - 1).abs().max(), '<=', 1e-4)
    return Run(learn, m.expect('smallest output', out.min(), '>=', 0))


@recipe('shuffled_labels', "the labels are shuffled apart from their images (training and validation): no image "
        "carries its own label", 'metric_at_chance')
def shuffled_labels(size):
    data = normalized(size)
    data.y, data.yv = data.y[torch.randperm(len(data.y))], data.yv[torch.randperm(len(data.yv))]
    learn = quietly(learner(data, mlp(100)), 'fit_one_cycle', size(3, 3), 1e-3)
    ev = evaluate(learn.model, data.xv, data.yv)
    return Run(learn, Measurement().expect('valid accuracy', ev.acc, '<=', 0.15)
               .note(f"chance is 0.10, one standard error {(0.09 / len(data.yv)) ** 0.5:.3f}"))


@recipe('class_imbalance', "90% of the training set is one class (T-shirt); the validation set is balanced",
        'class_imbalance')
def class_imbalance(size):
    n, labels = size(2000, 6000), _fmnist().y_train  # the training set holds 6,000 T-shirts
    major = (labels == 0).nonzero().flatten()[:int(0.9 * n)]
    minor = (labels != 0).nonzero().flatten()[:n - len(major)]
    data = normalized(size, index=torch.cat([major, minor])[torch.randperm(n)])
    learn = quietly(learner(data, mlp(100)), 'fit_one_cycle', size(2, 3), 1e-3)
    counts = torch.bincount(torch.cat([yb for _, yb in learn.dls.train]), minlength=N_CLASSES)
    return Run(learn, Measurement().expect('share of the largest class in the training labels',
                                           counts.max() / counts.sum(), '>=', 0.85)
               .note(f"valid accuracy {evaluate(learn.model, data.xv, data.yv).acc:.2f}"))


@recipe('predictions_collapsed', "weight decay 100x too large (SGD, wd=1) shrinks every weight to ~0: the model "
        "predicts one class for every image", 'predictions_collapsed')
def predictions_collapsed(size):
    data = normalized(size)
    learn = quietly(learner(data, mlp(100, 100), opt_func=SGD), 'fit', size(2, 3), 0.1, wd=1.)
    ev = evaluate(learn.model, data.xv, data.yv)
    m = Measurement().expect('share of the most predicted class on the valid set', ev.top_share, '>=', 0.95)
    return Run(learn, m.note(f"valid accuracy {ev.acc:.2f}"))


@recipe('saturated_tanh', "a tanh MLP whose weights are drawn from N(0, 1) (torch.randn), ~30x too large: most units "
        "sit at +-1", 'saturated_activations')
def saturated_tanh(size):
    data = normalized(size)
    model = mlp(256, 256, act=nn.Tanh)
    with torch.no_grad():
        for lin in linears(model)[:-1]: nn.init.normal_(lin.weight)
    learn = quietly(learner(data, model), 'fit_one_cycle', size(2, 3), 1e-3)
    outs = forward_outputs(learn.model, modules_of(learn.model, nn.Tanh), data.xv)
    m = Measurement()
    for i, o in enumerate(outs):
        m.expect(f"tanh {i}: share of |y| >= 0.99", (o.abs() >= 0.99).float().mean(), '>=', 0.5)
    return Run(learn, m)


@recipe('symmetric_units', "every weight initialised to the same constant: all units of a layer stay identical",
        'symmetric_units')
def symmetric_units(size):
    data = normalized(size)
    model = mlp(64, 64)
    with torch.no_grad():
        for lin in linears(model): lin.weight.fill_(0.01); lin.bias.zero_()
    learn = quietly(learner(data, model), 'fit_one_cycle', size(2, 3), 1e-3)
    m = Measurement()
    for i, lin in enumerate(linears(learn.model)[:-1]):
        w = lin.weight.detach()
        m.expect(f"Linear {i}: largest |row - row 0| / |row 0|", (w - w[0]).norm(dim=1).max() / w[0].norm(), '<=', 1e-4)
    return Run(learn, m.note(f"valid accuracy {evaluate(learn.model, data.xv, data.yv).acc:.2f}"))


@recipe('poor_initialization', "a 10-layer ReLU MLP initialised with std 0.01: the signal shrinks ~10x per layer",
        'poor_initialization')
def poor_initialization(size):
    data = normalized(size)
    model = mlp(*[256] * 10)
    with torch.no_grad():
        for lin in linears(model): nn.init.normal_(lin.weight, std=0.01); lin.bias.zero_()
    stds = [o.std().item() for o in forward_outputs(model, modules_of(model, nn.ReLU), data.x[:64])]
    learn = quietly(learner(data, model), 'fit_one_cycle', size(2, 3), 1e-3)
    return Run(learn, Measurement().expect('std of the first / last ReLU output at init', stds[0] / stds[-1], '>=', 1e4)
               .note(f"stds {', '.join(f'{s:.1e}' for s in stds)}"))


def _three_hidden(): return mlp(128, 128, 128)


@recipe('frozen_layer', "the middle Linear has requires_grad=False (frozen by mistake)", 'unchanged_layers')
def frozen_layer(size):
    data = normalized(size)
    model = _three_hidden()
    frozen = linears(model)[1]
    frozen.requires_grad_(False)
    before = [snapshot(lin) for lin in linears(model)]
    learn = quietly(learner(data, model), 'fit_one_cycle', size(2, 3), 1e-3)
    after = [snapshot(lin) for lin in linears(model)]
    changes = [relative_change(b, a) for b, a in zip(before, after)]
    return Run(learn, Measurement().expect('relative change of the frozen layer', changes[1], '==', 0)
               .expect('smallest relative change of the other layers', min(changes[:1] + changes[2:]), '>=', 1e-2))


@recipe('missing_from_optimizer', "a splitter leaves the middle Linear out of the optimizer: it never changes and its "
        "gradient is never zeroed", 'unchanged_layers')
def missing_from_optimizer(size):
    data = normalized(size)
    model = _three_hidden()
    left_out = linears(model)[1]
    kept = [p for p in model.parameters() if all(p is not q for q in left_out.parameters())]
    before = snapshot(left_out)
    arrivals = GradNorms([left_out.weight])
    learn = quietly(learner(data, model, splitter=lambda m: [kept]), 'fit_one_cycle', size(2, 3), 1e-3)
    step = arrivals.medians()[0]
    m = Measurement().expect('relative change of the left-out layer', relative_change(before, snapshot(left_out)),
                             '==', 0)
    accumulated = left_out.weight.grad.norm() / step
    return Run(learn, m.expect("its accumulated .grad norm / a step's gradient norm", accumulated, '>=', 5))


@recipe('lr_too_low', "Adam at lr 1e-6, a thousand times too low: nothing moves", 'lr_too_low')
def lr_too_low(size):
    data = normalized(size)
    model = mlp(100)
    start, before = evaluate(model, data.xv, data.yv), snapshot(model)
    learn = quietly(learner(data, model), 'fit', size(2, 1), 1e-6)
    end = evaluate(model, data.xv, data.yv)
    m = Measurement().expect('relative fall of the valid loss', (start.loss - end.loss) / start.loss, '<=', 0.05)
    return Run(learn, m.expect('relative change of the weights', relative_change(before, snapshot(model)), '<=', 0.01))


@recipe('lr_too_high', "SGD at lr 20: the loss overflows to NaN", ('nonfinite', 'loss_diverged'))
def lr_too_high(size):
    data = normalized(size)
    loss_func = nn.CrossEntropyLoss()
    losses = TrainingLosses(loss_func)
    learn = quietly(learner(data, mlp(100, 100), loss_func=loss_func, opt_func=SGD), 'fit', size(2, 2), 20.)
    series = losses.series()
    bad = (~torch.isfinite(series)).nonzero().flatten()
    return Run(learn, Measurement().expect('non-finite training losses', len(bad), '>=', 1)
               .note(f"first at batch {bad[0].item() if len(bad) else '-'} of {len(series)}; the first loss "
                     f"{series[0].item():.3g}"))


@recipe('vanishing_gradients', "a 10-layer sigmoid MLP: each layer scales the gradient down ~4x on its way back",
        'vanishing_gradients')
def vanishing_gradients(size):
    data = normalized(size)
    model = mlp(*[64] * 10, act=nn.Sigmoid)
    lins = linears(model)
    arrivals = GradNorms([lins[0].weight, lins[-1].weight])
    learn = quietly(learner(data, model, opt_func=SGD), 'fit', size(2, 3), 0.1)
    first, last = arrivals.medians()
    stds = [o.std().item() for o in forward_outputs(model, modules_of(model, nn.Sigmoid), data.xv)]
    return Run(learn, Measurement().expect('median grad norm, first / last Linear', first / last, '<=', 1e-3)
               .note(f"sigmoid output stds {stds[0]:.2g} .. {stds[-1]:.2g}"))


@recipe('dead_relus', "the first hidden layer's biases initialised to -2: ~90% of its ReLUs never fire, on any image; "
        "the rest still learn", 'dead_units')
def dead_relus(size):
    data = normalized(size)
    model = mlp(256, 256)
    with torch.no_grad(): linears(model)[0].bias.fill_(-2.)
    learn = quietly(learner(data, model), 'fit_one_cycle', size(2, 3), 1e-3)
    first = forward_outputs(learn.model, modules_of(learn.model, nn.ReLU)[:1], torch.cat([data.x, data.xv]))[0]
    return Run(learn, Measurement().expect('share of the first ReLU units never positive on all data',
                                           (first.amax(0) <= 0).float().mean(), '>=', 0.75)
               .note(f"valid accuracy {evaluate(learn.model, data.xv, data.yv).acc:.2f}"))


@recipe('chapter_collapse', "the chapter's baseline: simple_cnn without batchnorm, fit(1, 0.06) at bs 64",
        ('activation_collapse', 'growth_collapse_cycle'))  # the collapse, or the growth-collapse cycle that led to it
def chapter_collapse(size):
    fm = _fmnist()
    n, nv = size(2000, 60000), size(500, 10000)
    dls = DataLoaders.from_tensors(fm.x_train[:n], fm.y_train[:n], fm.x_valid[:nv], fm.y_valid[:nv], bs=64,
                                   batch_tfms=[Normalize()], vocab=fm.classes, seed=0, device='cpu')
    learn = quietly(learner(dls, simple_cnn(bn=False), loss_func=F.cross_entropy), 'fit', 1, 0.06)
    xv, yv = (torch.cat(t) for t in zip(*dls.valid))  # the validation images as the model sees them, in order
    outs = forward_outputs(learn.model, list(learn.model[1:4]), xv)  # conv + ReLU blocks 1..3
    m = Measurement()
    for i, o in enumerate(outs, 1):
        m.expect(f"block {i} (ReLU out): share <= 0.05", (o <= 0.05).float().mean(), '>=', 0.95)
    return Run(learn, m.note(f"valid accuracy {evaluate(learn.model, xv, yv).acc:.2f}"))


@recipe('oscillating_loss', "full-batch gradient descent on softmax regression at lr 0.3, above the stable step "
        "size: the loss jumps up and back down again and again, neither converging nor diverging", 'oscillating_loss')
def oscillating_loss(size):
    n = size.n_train
    data = normalized(size)
    loss_func = nn.CrossEntropyLoss()
    losses = TrainingLosses(loss_func)
    learn = quietly(learner(data, mlp(), bs=n, loss_func=loss_func, opt_func=SGD), 'fit', 40, 0.3)
    series = losses.series().tolist()
    m = Measurement().expect('2-fold moves of the full-batch loss, up or down', swings(series, 2.), '>=', 6)
    m.expect('largest loss / first loss', max(series) / series[0], '<=', 10)
    m.expect('non-finite losses', sum(not math.isfinite(v) for v in series), '==', 0)
    return Run(learn, m.note(f"{len(series)} steps, loss {series[0]:.2f} at the first, then between "
                             f"{min(series):.2f} and {max(series):.2f}"))


@recipe('overfitting', "300 training images, a wide MLP, 30 epochs: it memorises them", 'overfitting')
def overfitting(size):
    data = normalized(size, n_train=300)
    snaps = EpochSnapshots()
    learn = quietly(learner(data, mlp(512, 512)), 'fit', size(25, 30), 1e-3, cbs=[snaps])
    valid = [e.loss for e in snaps.evaluations(learn.model, data.xv, data.yv)]
    train = [e.loss for e in snaps.evaluations(learn.model, data.x, data.y)]
    best = min(range(len(valid)), key=valid.__getitem__)
    return Run(learn, Measurement().expect('last / best valid loss', valid[-1] / valid[best], '>=', 1.2)
               .expect('train loss, last / at the best valid epoch', train[-1] / train[best], '<=', 0.5)
               .note(f"best valid loss at epoch {best} of {len(valid)}"))


@recipe('plateau', "a model far too small for the task (each image averaged down to 2x2 pixels, then one Linear): the "
        "loss converges at a high level within a few epochs and stays flat for the rest",
        ('loss_plateau', 'no_progress'))
def plateau(size):
    data = normalized(size, n_train=size(4000, 10000))  # a long flat stretch: ~300 batches at both sizes
    model = nn.Sequential(nn.AvgPool2d(14), nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, N_CLASSES))
    snaps = EpochSnapshots()
    learn = quietly(learner(data, model), 'fit', size(10, 8), 3e-2, cbs=[snaps])
    train = [e.loss for e in snaps.evaluations(learn.model, data.x, data.y)]
    half = len(train) // 2
    return Run(learn, Measurement().expect('relative fall of the train loss over the second half of the epochs',
                                           (train[half] - train[-1]) / train[half], '<=', 0.02)
               .expect('final train loss', train[-1], '>=', 1.)
               .note(f"train loss per epoch {', '.join(f'{v:.3f}' for v in train)}"))


# ==== healthy runs ===========================================================================================
def _healthy(data_or_dls, model, fit, *args, min_acc=0.6, bs=64, **kwargs):
    "Train a healthy run with per-epoch snapshots and confirm its health with `health`."
    snaps = EpochSnapshots()
    learn = quietly(learner(data_or_dls, model, bs=bs, **kwargs), fit, *args, cbs=[snaps])
    xv, yv = (torch.cat(t) for t in zip(*learn.dls.valid))  # the validation set as the model sees it
    return Run(learn, health(Measurement(), learn, snaps, xv, yv, min_acc))


@recipe('healthy_cnn_bn', "the chapter's good run: simple_cnn with batchnorm, fit_one_cycle at lr 0.06")
def healthy_cnn_bn(size):
    fm = _fmnist()
    n, nv = size(2000, 20000), size.n_valid
    dls = DataLoaders.from_tensors(fm.x_train[:n], fm.y_train[:n], fm.x_valid[:nv], fm.y_valid[:nv], bs=64,
                                   batch_tfms=[Normalize()], vocab=fm.classes, seed=0, device='cpu')
    return _healthy(dls, simple_cnn(bn=True), 'fit_one_cycle', size(1, 2), 0.06, loss_func=F.cross_entropy)


@recipe('healthy_mlp', "a ReLU MLP, Adam, fit_one_cycle at lr 3e-3")
def healthy_mlp(size):
    return _healthy(normalized(size), mlp(128), 'fit_one_cycle', size(2, 3), 3e-3)


@recipe('healthy_tanh', "a tanh MLP with LeCun init (std 1/sqrt(fan_in)), Adam, fit_one_cycle")
def healthy_tanh(size):
    model = mlp(128, 128, act=nn.Tanh)
    with torch.no_grad():
        for lin in linears(model): nn.init.normal_(lin.weight, std=lin.in_features ** -0.5); lin.bias.zero_()
    run = _healthy(normalized(size), model, 'fit_one_cycle', size(2, 3), 1e-3)
    xv = torch.cat([xb for xb, _ in run.learn.dls.valid])
    for i, o in enumerate(forward_outputs(model, modules_of(model, nn.Tanh), xv)):
        run.measurement.expect(f"tanh {i}: share of |y| >= 0.99", (o.abs() >= 0.99).float().mean(), '<=', 0.25)
    return run


@recipe('healthy_no_bn', "simple_cnn without batchnorm trained gently: Adam, fit_one_cycle at lr 3e-3")
def healthy_no_bn(size):
    return _healthy(normalized(size, n_train=size(2000, 20000)), simple_cnn(bn=False), 'fit_one_cycle', size(2, 2),
                    3e-3)


@recipe('healthy_long_1cycle', "simple_cnn with batchnorm, 8 (test) or 10 (bench) epochs of fit_one_cycle with weight "
        "decay 0.1, on enough data (2,000 or 30,000 images) that the valid loss is still at its best at the end")
def healthy_long_1cycle(size):
    return _healthy(normalized(size, n_train=size(2000, 30000)), simple_cnn(bn=True), 'fit_one_cycle', size(8, 10),
                    1e-2, bs=128, wd=0.1, min_acc=0.75)


@recipe('healthy_fine_tune', "fine_tune: simple_cnn's body pretrained on the five other classes, a new head, one "
        "frozen epoch, then the body at 1/100 of the head's learning rate")
def healthy_fine_tune(size):
    fm = _fmnist()

    def five_classes(first, n, nv):
        "Loaders over the first n training (nv valid) images of classes first..first+4, labelled 0..4."
        def pick(x, y, k):
            keep = (y >= first) & (y < first + 5)
            return x[keep][:k], y[keep][:k] - first
        return DataLoaders.from_tensors(*pick(fm.x_train, fm.y_train, n), *pick(fm.x_valid, fm.y_valid, nv), bs=64,
                                        batch_tfms=[Normalize()], seed=0, device='cpu')
    n, nv = size(2000, 15000), size(500, 5000)
    pretrain = quietly(Learner(five_classes(0, n, nv), simple_cnn(bn=True, n_out=5), loss_func=F.cross_entropy,
                               device='cpu'), 'fit_one_cycle', size(1, 2), 1e-2)
    model = pretrain.model
    for m in model[4].modules():  # a new head
        if hasattr(m, 'reset_parameters'): m.reset_parameters()
    return _healthy(five_classes(5, n, nv), model, 'fine_tune', size(2, 3), 1e-2, loss_func=F.cross_entropy,
                    splitter=lambda m: [list(m[:4].parameters()), list(m[4:].parameters())])


# ---- scoring and the table -------------------------------------------------------------------------------------
@dataclass
class Result:
    "One scored run."
    recipe: Recipe
    measurement: Measurement
    causes: list
    alarms: list
    agrees: bool
    seconds: float
    cpu_seconds: float

    @property
    def passed(self): return self.measurement.confirmed and self.agrees


def score(recipe, size):
    "Train `recipe` at `size`, read its report, and score it."
    start, cpu_start = time.perf_counter(), time.process_time()
    run = recipe.run(size)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    report = run.learn.diagnose(show=False)
    return Result(recipe, run.measurement, root_causes(report), alarms(report), report_agrees(recipe, report), seconds,
                  cpu_seconds)


COLUMNS = ('run', 'expected cause', 'measured', 'report root causes', 'result')


def _row(r):
    failed = '; '.join(map(str, r.measurement.failed))
    confirmed = 'confirmed' if r.measurement.confirmed else f"NOT CONFIRMED ({failed or 'nothing measured'})"
    found = describe(r.alarms if r.recipe.healthy else r.causes)
    verdict = 'PASS' if r.passed else 'FAIL'
    return (r.recipe.name, ' or '.join(r.recipe.expected) or 'healthy: no warning or error',
            f"{confirmed}: {r.measurement}", found, verdict)


def _totals(results):
    broken = [r for r in results if not r.recipe.healthy]
    healthy = [r for r in results if r.recipe.healthy]
    return (f"broken runs named right: {sum(r.passed for r in broken)}/{len(broken)}; healthy runs clean: "
            f"{sum(r.passed for r in healthy)}/{len(healthy)}; measurements confirmed: "
            f"{sum(r.measurement.confirmed for r in results)}/{len(results)}; trained in "
            f"{sum(r.seconds for r in results):.0f} s ({sum(r.cpu_seconds for r in results):.0f} s of CPU time, "
            f"{torch.get_num_threads()} threads)")


def markdown(results):
    "The table as Markdown, with the totals below it."
    esc = lambda s: str(s).replace('|', '\\|')
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    lines += ['| ' + ' | '.join(esc(c) for c in _row(r)) + ' |' for r in results]
    return '\n'.join(lines + ['', _totals(results)])


def text(results):
    "The table as plain text: one block per run, then the totals."
    lines = []
    for r in results:
        name, expected, measured, found, verdict = _row(r)
        lines += [f"{verdict}  {name}  ({r.seconds:.1f} s, {r.cpu_seconds:.1f} s CPU)  expected: {expected}",
                  f"      measured: {measured}", f"      report:   {found}"]
    return '\n'.join(lines + ['', _totals(results)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', choices=sorted(SIZES), default='bench')
    parser.add_argument('--only', nargs='+', metavar='NAME', help='run only these recipes')
    parser.add_argument('--markdown', action='store_true', help='print the table as Markdown')
    args = parser.parse_args(argv)
    names = [r.name for r in RECIPES]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown: parser.error(f"unknown run(s) {unknown}; the runs are: {', '.join(names)}")
    results = []
    for rec in RECIPES:
        if args.only and rec.name not in args.only: continue
        results.append(score(rec, SIZES[args.size]))
        if not args.markdown: print(text(results[-1:]).rsplit('\n\n', 1)[0], flush=True)
    print(markdown(results) if args.markdown else '\n' + _totals(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
