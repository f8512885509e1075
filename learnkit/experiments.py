"""Run one training recipe over several configurations and compare them side by side: `compare`.

Each run is seeded the same way, so runs differ only in what their configurations change: the model's init
(for the same architecture) and the data order are the same. Results come back as a `Comparison`: a pandas
table (`.df`), every run's Learner (`.learners`), and overlaid plots.
"""
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from .callback import Callback
from .metrics import batch_size

__all__ = ['compare', 'Comparison', 'Run', 'RunCounter', 'RECIPE_KEYS', 'train_batch_size']

# Configuration keys that `compare` uses itself (each overrides the argument of the same name for that
# configuration); every other key is passed to `make_learner`.
RECIPE_KEYS = ('fit', 'lr', 'n_epoch')

# Goyal et al. 2017 (linear) and the square-root rule (Krizhevsky 2014; Hoffer et al. 2017 for Adam-like updates).
LR_SCALINGS = {'linear': lambda ratio: ratio, 'sqrt': math.sqrt, None: lambda ratio: 1.}


class RunCounter(Callback):
    """Counts training samples and optimizer steps, per training batch and in total, and times training.

    `train_time` sums the training phases only (no validation), with the device synchronised at the end of
    each, so `examples / train_time` is the training throughput.
    """
    order, run_valid = 55, False

    def before_fit(self):
        self.examples, self.steps, self.train_time = 0, 0, 0.
        self.batch_examples, self.batch_steps = [], []   # running totals after each training batch

    def before_train(self): self._start = time.perf_counter()

    def after_step(self): self.steps += 1

    def after_batch(self):
        self.examples += batch_size(self.learn)
        self.batch_examples.append(self.examples)
        self.batch_steps.append(self.steps)

    def after_train(self):
        _synchronize(self.learn.device)
        self.train_time += time.perf_counter() - self._start

    def throughput(self):
        "Training samples per second of training phases (None before any training)."
        return self.examples / self.train_time if self.train_time else None


def _synchronize(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize(device)  # sync-ok: once per epoch, for the clock


def train_batch_size(learn):
    "The training batch size: `bs` of learnkit loaders, `batch_size` of torch DataLoaders."
    dl = learn.dls.train
    bs = getattr(dl, 'bs', None)
    bs = getattr(dl, 'batch_size', None) if bs is None else bs
    if bs is None:
        raise TypeError(f"Cannot tell the batch size of dls.train ({type(dl).__name__}): it has neither `bs` "
                        "(learnkit loaders) nor `batch_size` (torch DataLoaders)")
    return bs


@dataclass
class Run:
    "One trained configuration: its `config` (as given), `seed`, `learn` and its `counter` (a RunCounter)."
    config: dict
    seed: int
    learn: object
    counter: RunCounter

    def label(self, with_seed=False):
        text = ', '.join(f'{k}={_short(v)}' for k, v in self.config.items()) or 'default'
        return f'{text}, seed={self.seed}' if with_seed else text


def _short(v): return getattr(v, '__name__', v)


def compare(make_learner, configs, fit='fit_one_cycle', n_epoch=1, lr=None, seeds=(0,), lr_scaling=None, quiet=True):
    """Train `make_learner(**config)` for each configuration and seed; return a `Comparison`.

    `configs` is a list of dicts. The keys `fit`, `lr` and `n_epoch` (`RECIPE_KEYS`) override this call's
    arguments of the same name for that configuration; every other key goes to `make_learner`, which returns a
    Learner (batch size, model options such as `bn`, callbacks...). `fit` is the name of a Learner method
    called as `learn.<fit>(n_epoch, lr)` ('fit', 'fit_one_cycle', 'fit_flat_cos') or a function
    `fit(learn, n_epoch, lr)`. `lr=None` uses the learner's own `lr`.

    Before each run, Python, numpy and torch are seeded with `seed` (before `make_learner`, so the same
    architecture gets the same init, and again before fitting), and loaders with a `seed` (learnkit's) get it
    and are set to epoch 0, so every configuration sees the data in the same order.

    `lr_scaling='linear'` multiplies the lr by bs / bs0, `'sqrt'` by its square root, where bs0 is the first
    configuration's training batch size (Goyal et al. 2017); the `lr` column shows the lr used.

    The table has one row per (configuration, seed): the configuration's keys, `seed`, `bs`, `lr`, `fit`,
    `n_epoch`, the last epoch's recorder columns (`train_loss`, `valid_loss`, metrics, extra columns),
    `time_s` (wall time of fit), `images_per_s` (training samples per second of training phases), `steps`
    (optimizer steps) and, when the Learner has `diagnose()`, `findings` (the health report's findings).
    `quiet=True` hides progress bars and per-epoch lines.
    """
    configs = list(configs)
    if not configs or not all(isinstance(c, dict) for c in configs):
        raise TypeError(f"compare needs a non-empty list of dicts as configs (keyword arguments for make_learner); "
                        f"got {configs!r}")
    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling={lr_scaling!r}: use 'linear', 'sqrt' or None")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints; got {seeds!r}")
    # Every recipe is checked before the first run, so a typo in the last configuration fails at once.
    recipes = [{'fit': fit, 'lr': lr, 'n_epoch': n_epoch, **{k: c[k] for k in RECIPE_KEYS if k in c}} for c in configs]
    fit_fns = [_fit_function(r['fit']) for r in recipes]
    rows, runs, ref_bs = [], [], None
    for config, recipe, fit_fn in zip(configs, recipes, fit_fns):
        kwargs = {k: v for k, v in config.items() if k not in RECIPE_KEYS}
        for seed in seeds:
            _seed_everything(seed)
            learn = make_learner(**kwargs)
            if not hasattr(learn, 'recorder'):
                raise TypeError(f"make_learner must return a Learner with its Recorder; it returned {learn!r}")
            _restart_data_order(learn, seed)
            bs = train_batch_size(learn)
            ref_bs = bs if ref_bs is None else ref_bs
            run_lr = _scaled_lr(learn.lr if recipe['lr'] is None else recipe['lr'], bs / ref_bs, lr_scaling)
            run = Run(config, seed, learn, RunCounter())
            _seed_everything(seed)
            start = time.perf_counter()
            with learn.added_cbs([run.counter]), _quiet(learn, quiet):
                fit_fn(learn, recipe['n_epoch'], run_lr)
            _synchronize(learn.device)
            rows.append({**config, 'seed': seed, 'bs': bs, 'lr': run_lr, 'fit': _short(recipe['fit']),
                         'n_epoch': recipe['n_epoch'], **_final_results(learn),
                         'time_s': time.perf_counter() - start,
                         'images_per_s': run.counter.throughput(), 'steps': run.counter.steps, **_findings(learn)})
            runs.append(run)
    import pandas as pd
    df = pd.DataFrame(rows)
    config_cols = list(dict.fromkeys(k for c in configs for k in c))
    return Comparison(df[config_cols + [c for c in df.columns if c not in config_cols]], runs)


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _restart_data_order(learn, seed):
    "Same order in every run: loaders whose order is a function of (seed, epoch) get this seed and epoch 0."
    for dl in (learn.dls.train, learn.dls.valid):
        if hasattr(dl, 'seed'): dl.seed = seed
        if hasattr(dl, 'set_epoch'): dl.set_epoch(0)


def _scaled_lr(lr, ratio, rule):
    if rule is None: return lr
    if not isinstance(lr, (int, float)):
        raise TypeError(f"lr_scaling={rule!r} scales a single learning rate; got lr={lr!r}. Pass one number as lr")
    return lr * LR_SCALINGS[rule](ratio)


def _fit_function(fit):
    if callable(fit): return fit
    if not isinstance(fit, str) or not fit.startswith('fit') or not callable(getattr(_learner_class(), fit, None)):
        raise ValueError(f"fit={fit!r}: pass the name of a Learner fit method ('fit', 'fit_one_cycle', "
                         "'fit_flat_cos') or a function fit(learn, n_epoch, lr)")
    return lambda learn, n_epoch, lr: getattr(learn, fit)(n_epoch, lr)


def _learner_class():
    from .learner import Learner
    return Learner


def _quiet(learn, quiet):
    import contextlib
    if not quiet: return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(learn.no_bar())
    stack.enter_context(learn.no_logging())
    return stack


def _final_results(learn):
    "The last epoch's recorder row without `epoch` and `time`: train_loss, valid_loss, metrics, extra columns."
    rec = learn.recorder
    if not rec.logs: return {}
    return {k: v for k, v in zip(rec.metric_names, rec.logs[-1]) if k not in ('epoch', 'time')}


def _findings(learn):
    "The health report's findings as one string ('severity check (where); ...'), when the Learner has `diagnose()`."
    if not hasattr(learn, 'diagnose'): return {}
    return {'findings': '; '.join(_describe(f) for f in learn.diagnose(show=False).findings)}


def _describe(finding):
    where = finding.where()
    return f"{finding.severity} {finding.check}" + (f" ({where})" if where else '')


class Comparison:
    """What `compare` returns: `df` (one row per run), `runs` (config, seed, learner, counter) and `learners`.

    It reads as its table, a pandas DataFrame: `len(res)` runs, `res.columns`, `res['valid_loss']`,
    `res.loc[...]`, `res.iloc[...]`, `res.shape`, iteration over the column names, and the table in a notebook.
    Anything else a DataFrame does is `res.df`."""
    def __init__(self, df, runs): self.df, self.runs = df, runs

    # The DataFrame's reading side, spelled out (no attribute forwarding: a reader finds each one here).
    def __len__(self): return len(self.df)
    def __getitem__(self, key): return self.df[key]
    def __iter__(self): return iter(self.df)
    @property
    def columns(self): return self.df.columns
    @property
    def index(self): return self.df.index
    @property
    def shape(self): return self.df.shape
    @property
    def loc(self): return self.df.loc
    @property
    def iloc(self): return self.df.iloc

    @property
    def learners(self): return [r.learn for r in self.runs]

    def summary(self):
        "Mean and standard deviation over seeds of every numeric result, per configuration."
        config_cols = list(dict.fromkeys(k for r in self.runs for k in r.config))
        results = [c for c in self.df.select_dtypes('number').columns if c not in config_cols + ['seed']]
        return self.df.groupby(config_cols or ['fit'], dropna=False, sort=False)[results].agg(['mean', 'std'])

    def _labels(self):
        with_seed = len({r.seed for r in self.runs}) > 1
        return [r.label(with_seed) for r in self.runs]

    def plot_losses(self, x='examples', skip_start=5, ax=None):
        """Every run's smoothed training loss, overlaid, against training samples seen (`x='examples'`) or
        optimizer steps (`x='steps'`); runs with different batch sizes line up on the first by data seen."""
        if x not in ('examples', 'steps'): raise ValueError(f"x={x!r}: plot against 'examples' or 'steps'")
        from .diagnostics.plots import fig_ax
        fig, ax = fig_ax(ax)
        for run, label in zip(self.runs, self._labels()):
            xs = run.counter.batch_examples if x == 'examples' else run.counter.batch_steps
            losses = run.learn.recorder.losses
            ax.plot(xs[skip_start:], losses[skip_start:len(xs)], label=label)
        ax.set_xlabel('training samples seen' if x == 'examples' else 'optimizer steps')
        ax.set_ylabel('training loss (smoothed)'); ax.legend(fontsize='small')
        return fig

    def plot_color_dim(self, idx=-2, ncols=None, figsize=None):
        """`learn.activation_stats.color_dim(idx)` of every run, side by side (`ncols` per row; default all in
        one row). The runs need ActivationStats with histograms: have make_learner add
        `cbs=ActivationStats(with_hist=True)`."""
        missing = [label for run, label in zip(self.runs, self._labels()) if not hasattr(run.learn, 'activation_stats')]
        if missing:
            raise ValueError(f"plot_color_dim needs ActivationStats in every run; these have none: {missing}. "
                             "Have make_learner add cbs=ActivationStats(with_hist=True)")
        from .diagnostics.plots import grid
        fig, axs = grid(len(self.runs), ncols or len(self.runs), figsize, size=(4, 3.5))
        for ax, run, label in zip(axs, self.runs, self._labels()):
            run.learn.activation_stats.color_dim(idx, ax=ax)
            ax.set_title(label, fontsize='small')
        fig.tight_layout()
        return fig

    def __repr__(self): return repr(self.df)
    def _repr_html_(self): return self.df._repr_html_()
