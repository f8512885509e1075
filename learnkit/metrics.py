"""Metrics: functions of (pred, targ) averaged over the validation set, or classes with state.

Accumulators stay on the device; the Recorder reads every value at once at the end of validation.
"""
import torch

__all__ = ['Metric', 'AvgMetric', 'AvgLoss', 'AvgSmoothLoss', 'accuracy', 'error_rate', 'accuracy_multi', 'as_metric']


class Metric:
    """Base class for metrics with state: `reset()` before validation, `accumulate(learn)` after each
    batch, `value` at the end (a tensor or a number). `name` is the column name in the results table."""
    def reset(self): pass
    def accumulate(self, learn): pass
    @property
    def value(self): raise NotImplementedError
    @property
    def name(self): return type(self).__name__.lower()


def batch_size(learn):
    "Items in the current batch, from shapes only (host metadata, no sync)."
    b = learn.yb[0] if learn.yb else learn.xb[0]
    return b.shape[0] if hasattr(b, 'shape') and len(b.shape) else 1


class AvgMetric(Metric):
    "Averages `func(pred, *yb)` over batches, weighted by batch size."
    def __init__(self, func): self.func = func; self.reset()
    def reset(self): self.total, self.count = 0., 0
    def accumulate(self, learn):
        bs = batch_size(learn)
        self.total = self.total + _detached(self.func(learn.pred, *learn.yb)) * bs
        self.count += bs
    @property
    def value(self): return self.total / self.count if self.count else None
    @property
    def name(self): return getattr(self.func, 'func', self.func).__name__


class AvgLoss(Metric):
    "The mean loss over a validation run, weighted by batch size."
    def __init__(self): self.reset()
    def reset(self): self.total, self.count = 0., 0
    def accumulate(self, learn):
        bs = batch_size(learn)
        self.total = self.total + learn.loss.mean() * bs
        self.count += bs
    @property
    def value(self): return self.total / self.count if self.count else None
    @property
    def name(self): return 'loss'


class AvgSmoothLoss(Metric):
    "Exponential moving average of the training loss, debiased as in fastai (beta=0.98)."
    def __init__(self, beta=0.98): self.beta = beta; self.reset()
    def reset(self): self.count, self.val = 0, None
    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss if learn.loss.ndim == 0 else learn.loss.mean()
        if self.val is None: self.val = torch.zeros_like(loss)   # debiasing below assumes a zero start
        self.val = torch.lerp(loss, self.val, self.beta)
    @property
    def value(self): return self.val / (1 - self.beta ** self.count) if self.count else None
    @property
    def name(self): return 'train_loss'


def _detached(v): return v.detach() if isinstance(v, torch.Tensor) else v


def accuracy(inp, targ, axis=-1):
    "Fraction of predictions (argmax over `axis`) equal to the targets."
    return (inp.argmax(dim=axis) == targ).float().mean()


def error_rate(inp, targ, axis=-1):
    "1 - accuracy."
    return 1 - accuracy(inp, targ, axis=axis)


def accuracy_multi(inp, targ, thresh=0.5, sigmoid=True):
    """Multi-label accuracy: the fraction of (item, class) pairs where the prediction (sigmoid of `inp` when
    `sigmoid`, then above `thresh`) agrees with the 0/1 target. `partial(accuracy_multi, thresh=0.2)` changes it."""
    if inp.shape != targ.shape:
        raise ValueError(f"accuracy_multi compares predictions and multi-hot targets of one shape; got "
                         f"{tuple(inp.shape)} and {tuple(targ.shape)} (for single-label targets use accuracy)")
    if sigmoid: inp = inp.sigmoid()
    return ((inp > thresh) == targ.bool()).float().mean()


def as_metric(m):
    "A Metric instance from a Metric, a Metric class, or a function f(pred, targ)."
    if isinstance(m, Metric): return m
    if isinstance(m, type) and issubclass(m, Metric): return m()
    if callable(m): return AvgMetric(m)
    raise TypeError(f"A metric must be a function f(pred, targ) or a learnkit.Metric; got {m!r}")
