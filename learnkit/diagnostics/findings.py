"""What the health report is made of: a `Finding`, the `Thresholds` every check reads, and small formatting helpers."""
import dataclasses
import math
from dataclasses import dataclass, field

__all__ = ['Finding', 'Thresholds', 'SEVERITIES']

SEVERITIES = ('error', 'warning', 'info')


@dataclass(frozen=True)
class Finding:
    """One problem the report found. `severity` is 'error' (training is broken), 'warning' (it works badly or
    will) or 'info'; `check` names the check; `layer` and `batches` (first, last training batch) say where;
    `value` is the measured number `message` is about; `advice` says what to try. `cause` is the `key` of the
    finding that explains this one (None for a root cause). `explains` and `explained_by` name checks this finding
    explains, or is explained by, because of its own evidence (beyond the report's fixed table, `EXPLAINS`);
    `explains_not` names checks its evidence rules out explaining, whatever the table says."""
    severity: str
    check: str
    message: str
    advice: str
    layer: str | None = None
    batches: tuple[int, int] | None = None
    value: float | None = None
    cause: str | None = None
    explains: tuple = ()
    explained_by: tuple = ()
    explains_not: tuple = ()

    @property
    def key(self):
        "The finding's name in the report: its check, and its layer when it has one."
        return f"{self.check}[{self.layer}]" if self.layer else self.check

    def where(self):
        parts = ([f"layer {self.layer}"] if self.layer else []) + ([batch_range(self.batches)] if self.batches else [])
        return ', '.join(parts)


# How each threshold is validated: (kind, lower bound, upper bound), both inclusive unless the kind says otherwise.
_FRACTION, _POSITIVE, _ABOVE_ONE, _COUNT = 'a fraction in (0, 1]', 'a number > 0', 'a factor > 1', 'an int >= 1'


def _t(default, kind):
    return field(default=default, metadata={'kind': kind})


@dataclass
class Thresholds:
    """The report's thresholds. Fractions of a run are fractions of the recorded training batches. Every value is
    validated: a wrong type or range raises a ValueError naming the threshold.

    Inputs (from InputStats):
    - `input_scale` (5.0): inputs whose median |mean| or std over the batches is above this were not normalised.
    - `input_zero_share` (0.95): inputs with at least this share of exact zeros are mostly zero.
    - `input_std_min` (1e-6): inputs whose std is below this (relative to max(1, |mean|)) are constant.
    Outputs and targets (from OutputStats and the Recorder):
    - `probs_tol` (1e-3): outputs whose rows are >= -probs_tol and sum to 1 within it are probabilities; rows whose
      logsumexp is within it of 0 are log-probabilities.
    - `collapsed_predictions` (0.9): at least this share of the validation predictions in one class, a class with
      less than this share of the targets, means the predictions collapsed.
    - `chance_margin` (3.0): a best validation accuracy less than this many binomial standard errors above chance
      (1 / classes) or above the majority class's share of the targets is no better than guessing.
    - `class_imbalance` (10.0): the most frequent training class this many times the least frequent.
    Activations (from ActivationStats):
    - `collapse_near_zero` (0.95): a layer whose fraction of activations <= 0.05 is at least this has collapsed.
    - `later_layers` (0.5): the fraction of hooked layers, counted from the end, where collapse is an error
      (the output layer itself is never judged: its near-zero share says nothing about dead units).
    - `collapse_min_batches` (3): a collapse shorter than this many recorded batches is ignored.
    - `end_window` (0.1): the final fraction of the run whose median decides whether a state persisted to the end.
    - `cycle_growth` (3.0), `cycle_drop` (3.0), `cycle_near_zero_rise` (0.05): a growth-then-collapse cycle is the
      std of a layer's activations growing at least `cycle_growth`-fold from a trough, then falling at least
      `cycle_drop`-fold from that peak while the near-zero fraction climbs back by `cycle_near_zero_rise` or more
      above its lowest value during the growth, and growing again afterwards.
    - `saturated_share` (0.5): a bounded activation (tanh, sigmoid, ...) whose median share of outputs within 1%
      of its bounds over the second half of the run is at least this is saturated.
    - `init_std_ratio` (100.0): on the first `init_batches` (3) recorded batches, the activation std of the last
      hidden weight layer this many times smaller or larger than the first's means a poor initialisation.
    Weights and gradients (from WeightStats and GradientStats):
    - `symmetric_spread` (1e-6): a layer whose units' weight rows differ by at most this (relative) at the end of
      fit has identical units.
    - `grad_vanishing` (1e-6): a layer whose median gradient norm over the second half of the run is below this
      gets no learning signal.
    - `grad_exploding` (100.0): a gradient norm above this, on any recorded step, is exploding.
    - `update_ratio_low` (1e-5), `update_ratio_high` (0.1): the median ||update|| / ||w|| of a layer outside this
      range is far from the healthy ~1e-3 (its weights barely move, or are rewritten every few steps).
    - `lr_low_update_ratio` (1e-4): a median update ratio (over the layers that move at all) below this, while the
      loss has not risen and is still falling or has fallen less than `min_improvement`, means a learning rate far
      too low.
    - `dead_units` (0.5): a ReLU whose fraction of never-positive units in the last window is at least this.
    Losses (from the Recorder):
    - `min_improvement` (0.05): the smoothed loss at the end must be at least this fraction below its start.
    - `diverge_factor` (3.0): a final loss this many times its minimum has diverged.
    - `plateau_window` (0.25), `plateau_tol` (0.01): over the final `plateau_window` of the run the loss must
      fall by at least `plateau_tol` (relative), unless it is already below `plateau_floor` (0.05).
    - `oscillation_rise` (1.0), `oscillation_swings` (3): a per-batch loss (smoothed over up to 10 batches, fewer
      when an epoch has fewer) that rises from a low to (1 + `oscillation_rise`) times it and falls back as far,
      `oscillation_swings` times or more, oscillates: the noise of sampling batches, averaged so, stays well
      below a doubling; an overshooting step does not.
    - `overfit_rise` (0.1): a valid loss this fraction above its best epoch while the train loss kept falling.
    - `overfit_gap_epochs` (3): a gap between valid and train loss that grew in each of the last this many epochs
      while the train loss fell and the valid loss stopped improving.
    """
    input_scale: float = _t(5.0, _POSITIVE)
    input_zero_share: float = _t(0.95, _FRACTION)
    input_std_min: float = _t(1e-6, _POSITIVE)
    probs_tol: float = _t(1e-3, _POSITIVE)
    collapsed_predictions: float = _t(0.9, _FRACTION)
    chance_margin: float = _t(3.0, _POSITIVE)
    class_imbalance: float = _t(10.0, _ABOVE_ONE)
    collapse_near_zero: float = _t(0.95, _FRACTION)
    later_layers: float = _t(0.5, _FRACTION)
    collapse_min_batches: int = _t(3, _COUNT)
    end_window: float = _t(0.1, _FRACTION)
    cycle_growth: float = _t(3.0, _ABOVE_ONE)
    cycle_drop: float = _t(3.0, _ABOVE_ONE)
    cycle_near_zero_rise: float = _t(0.05, _FRACTION)
    saturated_share: float = _t(0.5, _FRACTION)
    init_std_ratio: float = _t(100.0, _ABOVE_ONE)
    init_batches: int = _t(3, _COUNT)
    symmetric_spread: float = _t(1e-6, _POSITIVE)
    grad_vanishing: float = _t(1e-6, _POSITIVE)
    grad_exploding: float = _t(100.0, _POSITIVE)
    update_ratio_low: float = _t(1e-5, _POSITIVE)
    update_ratio_high: float = _t(0.1, _POSITIVE)
    lr_low_update_ratio: float = _t(1e-4, _POSITIVE)
    dead_units: float = _t(0.5, _FRACTION)
    min_improvement: float = _t(0.05, _FRACTION)
    diverge_factor: float = _t(3.0, _ABOVE_ONE)
    plateau_window: float = _t(0.25, _FRACTION)
    plateau_tol: float = _t(0.01, _FRACTION)
    plateau_floor: float = _t(0.05, _POSITIVE)
    oscillation_rise: float = _t(1.0, _POSITIVE)
    oscillation_swings: int = _t(3, _COUNT)
    overfit_rise: float = _t(0.1, _POSITIVE)
    overfit_gap_epochs: int = _t(3, _COUNT)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_threshold(f.name, getattr(self, f.name), f.metadata['kind'])
        if self.update_ratio_low >= self.update_ratio_high:
            raise ValueError(f"update_ratio_low ({self.update_ratio_low}) must be below update_ratio_high "
                             f"({self.update_ratio_high})")


def check_threshold(name, value, kind):
    "Raise a ValueError naming `name` unless `value` is of `kind`."
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and math.isfinite(value) and {
        _FRACTION: lambda v: 0 < v <= 1, _POSITIVE: lambda v: v > 0, _ABOVE_ONE: lambda v: v > 1,
        _COUNT: lambda v: isinstance(v, int) and v >= 1}[kind](value)
    if not ok:
        default = Thresholds.__dataclass_fields__[name].default
        raise ValueError(f"threshold {name} must be {kind}; got {value!r} (the default is {default})")


def thresholds(**overrides):
    "`Thresholds` with `overrides`, whose names are checked: an unknown one is a TypeError listing the known ones."
    known = {f.name for f in dataclasses.fields(Thresholds)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown threshold(s) {unknown}; the thresholds are: {', '.join(sorted(known))}")
    return Thresholds(**overrides)


# ---- small helpers the checks share ------------------------------------------------------------------------------
def batch_range(b): return f"batch {b[0]}" if b[0] == b[1] else f"batches {b[0]}-{b[1]}"


def fmt(v):
    if v is None: return ''
    if v != v or math.isinf(v): return str(v)
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def tail(n, frac): return max(1, math.ceil(n * frac))


def mean(xs): return sum(xs) / len(xs)
