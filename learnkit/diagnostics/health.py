"""The health report: read what a fit recorded and say, in words, what went wrong, why, and what to try.

`diagnose(learn)` (also `learn.diagnose()`) reads the records of every statistics callback of the learner in one
transfer (the Recorder's losses; InputStats, OutputStats, ActivationStats, GradientStats and WeightStats when
attached; `health_cbs()` attaches them all), runs every check that has its data, and returns a `HealthReport`.

The report is a table of checks (`CHECKS`): each declares the records it needs and returns `Finding`s. Checks
whose records are missing are listed as skipped, with the callback that would feed them. Then the findings are
linked: when one explains another (`EXPLAINS`: a non-finite loss explains exploding and "vanishing" gradient
norms; a collapse explains dead units and vanishing gradients after it), the explained one records its `cause`,
and the report leads with the root causes and lists the rest under them as consequences.
"""
from dataclasses import dataclass, field

import torch

from ..callbacks.activations import ActivationStats
from ..callbacks.gradients import GradientStats
from ..callbacks.inputs import InputStats
from ..callbacks.outputs import OutputStats
from ..callbacks.stats import StatsCallback, read_records
from ..callbacks.weights import WeightStats
from . import checks_data as data_checks, checks_layers as layer_checks, checks_loss as loss_checks
from .findings import SEVERITIES, Finding, Thresholds, batch_range, fmt, thresholds

__all__ = ['Finding', 'HealthReport', 'Thresholds', 'diagnose', 'SEVERITIES', 'CHECKS', 'EXPLAINS']


@dataclass
class HealthReport:
    """What `diagnose` found: `findings` (root causes first, each followed by what it explains), the `checked`
    checks and the `skipped` ones with why. `root_causes` are the warnings and errors nothing else explains.
    Prints as text; `to_markdown()` (and Jupyter) renders Markdown."""
    findings: list = field(default_factory=list)
    checked: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    @property
    def errors(self): return [f for f in self.findings if f.severity == 'error']
    @property
    def warnings(self): return [f for f in self.findings if f.severity == 'warning']
    @property
    def root_causes(self):
        """The warnings and errors that no other finding explains, errors first. A root cause takes the severity of
        the worst finding it explains."""
        return [f for f in self.findings if f.severity != 'info' and f.cause is None]

    def consequences(self, finding):
        "The findings `finding` explains, directly or through another."
        return [f for f in self.findings if f is not finding and self._root(f) is finding]

    def _root(self, f):
        by_key, seen = {g.key: g for g in self.findings}, set()
        while f.cause is not None and f.cause in by_key and f.key not in seen:
            seen.add(f.key)
            f = by_key[f.cause]
        return f

    def by_check(self, check):
        "The findings of one check."
        return [f for f in self.findings if f.check == check]

    def __iter__(self): return iter(self.findings)
    def __len__(self): return len(self.findings)

    def _headline(self):
        if not any(f.severity != 'info' for f in self.findings):
            return "No problems found." + (f" {len(self.findings)} note(s)." if self.findings else "")
        roots = self.root_causes
        counts = [f"{n} {sev}{'s' if n > 1 else ''}" for sev in SEVERITIES[:2]
                  if (n := sum(f.severity == sev for f in roots))]
        explained = sum(f.severity != 'info' and f.cause is not None for f in self.findings)
        return (f"{len(roots)} root cause{'s' if len(roots) > 1 else ''} ({', '.join(counts)})"
                + (f", explaining {explained} more finding{'s' if explained > 1 else ''}." if explained else "."))

    def __str__(self):
        lines = [f"Health report: {self._headline()}"]
        for f in self.findings:
            if f.cause is not None: continue
            lines += _text(f)
            consequences = self.consequences(f)
            for check in dict.fromkeys(c.check for c in consequences):
                same = [c for c in consequences if c.check == check]
                where = same[0].where() if len(same) == 1 else f"{len(same)} layers: " + ', '.join(
                    c.layer or '-' for c in same)
                lines.append(f"  {'':<8}  -> consequence: {check}{' (' + where + ')' if where else ''}: {same[0].message}")
        lines.append(f"Checked: {', '.join(self.checked) or 'nothing'}.")
        lines += [f"Skipped {check}: {why}" for check, why in self.skipped.items()]
        return '\n'.join(lines)

    __repr__ = __str__

    def to_markdown(self):
        "The report as Markdown: a headline, a table of findings (roots first), and what was checked or skipped."
        lines = ["## Health report", "", f"**{self._headline()}**", ""]
        if self.findings:
            lines += ["| severity | check | layer | batches | value | finding | what to try | explained by |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {f.severity} | {f.check} | {_md(f.layer or '')} | {batch_range(f.batches) if f.batches else ''} "
                      f"| {fmt(f.value)} | {_md(f.message)} | {_md(f.advice) if f.cause is None else '(see its cause)'} "
                      f"| {_md(f.cause or '')} |" for f in self.findings]
            lines.append("")
        lines.append(f"Checked: {', '.join(self.checked) or 'nothing'}.")
        if self.skipped:
            lines += ["", "Skipped:"] + [f"- {check}: {_md(why)}" for check, why in self.skipped.items()]
        return '\n'.join(lines) + '\n'

    def _repr_markdown_(self): return self.to_markdown()


def _text(f):
    where = f.where()
    return [f"  {f.severity.upper():<8}{f.check}{' (' + where + ')' if where else ''}: {f.message}",
            f"  {'':<8}try: {f.advice}"]


def _md(s): return str(s).replace('|', '\\|').replace('\n', ' ')


def diagnose(learn, show=True, **overrides):
    """Check what `learn`'s last fit recorded and return a `HealthReport` (printed too, unless `show=False`).

    Reads the Recorder and every statistics callback attached (see `health_cbs()` for all of them) in one
    transfer. Keywords override `Thresholds` fields, e.g. `diagnose(learn, collapse_near_zero=0.9)`; each is
    validated."""
    th = thresholds(**overrides)
    report = run_checks(RunData.from_learner(learn), th)
    if show: print(report)
    return report


def run_checks(data, th):
    "Every check of `CHECKS` that has its records, the findings linked to their causes, roots first."
    report = HealthReport()
    for check in CHECKS:
        missing = [need for need in check.needs if getattr(data, need) is None]
        if missing:
            report.skipped[check.name] = data.why_missing(missing[0])
            continue
        report.checked.append(check.name)
        report.findings += check.fn(data, th)
    report.findings = link_causes(report.findings)
    return report


# ---- what the checks read --------------------------------------------------------------------------------------
_WHY_MISSING = {
    'losses': "no training losses recorded (the Recorder is missing, or fit has not run)",
    'epochs': "no epoch with a validation loss recorded",
    'inputs': "no input statistics: add InputStats() (health_cbs() has it)",
    'outputs': "no output statistics: add OutputStats() (health_cbs() has it)",
    'act': "no activation statistics: add ActivationStats() (health_cbs() has it)",
    'act_modules': "no activation statistics: add ActivationStats() (health_cbs() has it)",
    'grad': "no gradient statistics: add GradientStats() (health_cbs() has it)",
    'dead': "no dead-unit windows: GradientStats found no nn.ReLU modules, or fit ran fewer batches than dead_window",
    'weights': "no weight statistics: add WeightStats() (health_cbs() has it)",
}


@dataclass
class RunData:
    "What one fit recorded, read from the learner's callbacks in one transfer: the checks' only input."
    losses: list | None = None      # smoothed training loss per batch
    batch_losses: list | None = None  # each training batch's own loss
    batches_per_epoch: int = 1
    lrs: list | None = None         # learning rate per training batch
    epochs: list | None = None      # [(train_loss, valid_loss)] per epoch
    inputs: dict | None = None      # InputStats.stats
    outputs: dict | None = None     # OutputStats.stats
    act: dict | None = None         # ActivationStats.stats
    act_modules: list | None = None  # the modules ActivationStats hooked
    grad: dict | None = None        # GradientStats.stats
    dead: dict | None = None        # GradientStats.stats, when it closed a dead-unit window
    weights: dict | None = None     # WeightStats.stats
    vocab: list | None = None
    loss_name: str = 'the loss'
    wd: float | None = None
    frozen_on_purpose: bool = False
    last_batch: int = 0
    notes: dict = field(default_factory=dict)  # why a record is missing although its callback is there

    @classmethod
    def from_learner(cls, learn):
        data = cls()
        cbs = [cb for cb in learn.cbs if isinstance(cb, StatsCallback)]
        raws = dict(zip(map(id, cbs), read_records(cbs)))  # every recorder below, in one transfer
        stats = lambda cb: cb.summarize(raws[id(cb)])
        rec = getattr(learn, 'recorder', None)
        if rec is not None and len(rec.lrs):
            recorded = stats(rec)
            data.losses = recorded['loss'].tolist()  # sync-ok: CPU records, read on request
            data.batch_losses = recorded['batch_loss'].tolist()  # sync-ok: CPU records, read on request
            data.lrs = list(rec.lrs)
            data.batches_per_epoch = rec.iters[0] if rec.iters else len(rec.lrs)
            data.last_batch = max(len(data.losses) - 1, 0)
            if not data.losses: data.losses = data.batch_losses = None
        if rec is not None and any(v[1] is not None for v in rec.values):
            data.epochs = [(v[0], v[1]) for v in rec.values if v[1] is not None]
        for cb in learn.cbs:
            if isinstance(cb, InputStats):
                if cb.iters: data.inputs = stats(cb)
                elif cb.kind not in (None, 'float'): data.notes['inputs'] = f"InputStats recorded nothing: {cb.kind}"
            elif isinstance(cb, OutputStats):
                if cb.iters: data.outputs = stats(cb)
                elif cb.kind not in (None, 'classifier'): data.notes['outputs'] = f"OutputStats recorded nothing: {cb.kind}"
            elif isinstance(cb, ActivationStats) and len(cb.iters):
                data.act, data.act_modules = stats(cb), list(cb.hooked_modules)
            elif isinstance(cb, GradientStats) and len(cb.iters):
                data.grad = stats(cb)
                if len(cb.dead_iters): data.dead = data.grad
            elif isinstance(cb, WeightStats) and len(cb.iters) >= 2: data.weights = stats(cb)
        data.vocab = getattr(learn.dls, 'vocab', None)
        loss = learn.loss_func
        data.loss_name = getattr(loss, '__name__', None) or type(loss).__name__
        if learn.opt is not None and 'wd' in getattr(learn.opt, 'names', {}): data.wd = learn.opt.get_hyper('wd')
        data.frozen_on_purpose = bool(getattr(learn, 'frozen_on_purpose', False))
        return data

    def why_missing(self, need): return self.notes.get(need) or _WHY_MISSING[need]

    def layer_grad(self, name):
        "The median gradient norm of layer `name` over the run, when GradientStats recorded it."
        if self.grad is None or name not in self.grad['layer_names']: return None
        col = self.grad['grad_norm'][:, self.grad['layer_names'].index(name)]
        col = col[torch.isfinite(col)]
        return col.median().item() if len(col) else None  # sync-ok: CPU records, read on request

    def weight_shrink(self):
        "How many times smaller the weights' total norm ended than it started (WeightStats), or None."
        if self.weights is None: return None
        sq = self.weights['param_sq'].double().sum(1)
        start, end = sq[0].sqrt().item(), sq[-1].sqrt().item()  # sync-ok: CPU records, read on request
        return start / end if end > 0 else float('inf')

    def loss_drop(self):
        "The relative fall of the training loss from its first batch to the end, or None."
        losses = [v for v in (self.losses or []) if v == v]
        if len(losses) < 4 or losses[0] <= 0: return None
        end = sum(losses[-max(1, len(losses) // 10):]) / max(1, len(losses) // 10)
        return (losses[0] - end) / losses[0]


@dataclass(frozen=True)
class _Check:
    name: str
    needs: tuple
    fn: object


CHECKS = [
    _Check('nonfinite', ('losses',), layer_checks.check_nonfinite),
    _Check('inputs', ('inputs',), data_checks.check_inputs),
    _Check('probabilities_into_loss', ('outputs',), data_checks.check_output_kind),
    _Check('class_imbalance', ('outputs',), data_checks.check_class_imbalance),
    _Check('symmetric_units', ('weights',), layer_checks.check_symmetric),
    _Check('unchanged_layers', ('weights',), layer_checks.check_unchanged),
    _Check('poor_initialization', ('act', 'act_modules'), layer_checks.check_initialization),
    _Check('saturated_activations', ('act',), layer_checks.check_saturation),
    _Check('activation_collapse', ('act',), layer_checks.check_collapse),
    _Check('growth_collapse_cycle', ('act',), layer_checks.check_cycles),
    _Check('dead_units', ('dead',), layer_checks.check_dead_units),
    _Check('gradients', ('grad',), layer_checks.check_gradients),
    _Check('update_ratio', ('grad',), layer_checks.check_update_ratio),
    _Check('lr_too_low', ('losses', 'grad'), loss_checks.check_lr_too_low),
    _Check('loss_progress', ('losses',), loss_checks.check_loss_progress),
    _Check('oscillating_loss', ('losses',), loss_checks.check_oscillation),
    _Check('predictions_collapsed', ('outputs',), data_checks.check_predictions),
    _Check('metric_at_chance', ('outputs',), data_checks.check_chance),
    _Check('overfitting', ('epochs',), loss_checks.check_overfitting),
]


# ---- root causes -------------------------------------------------------------------------------------------------
# Which findings explain which, by check name, listed from the earliest link of a causal chain to the last: a
# finding is explained only by one listed before it. `SAME_LAYER` links hold only between findings on one layer.
_OUTCOMES = ('no_progress', 'loss_plateau', 'predictions_collapsed', 'metric_at_chance')
_LEARNING = ('vanishing_gradients', 'update_ratio', 'lr_too_low') + _OUTCOMES
EXPLAINS = {
    'inputs_degenerate': ('nonfinite', 'dead_units', 'activation_collapse', 'oscillating_loss', 'poor_initialization',
                          'saturated_activations') + _LEARNING,
    'inputs_not_normalized': ('nonfinite', 'loss_diverged', 'oscillating_loss', 'exploding_gradients',
                              'saturated_activations', 'activation_collapse', 'growth_collapse_cycle', 'dead_units',
                              'poor_initialization') + _LEARNING,
    'class_imbalance': ('predictions_collapsed', 'metric_at_chance'),
    'probabilities_into_loss': ('dead_units', 'loss_diverged') + _LEARNING,
    'symmetric_units': ('poor_initialization', 'dead_units', 'activation_collapse', 'saturated_activations')
                       + _LEARNING,
    'unchanged_layers': ('vanishing_gradients', 'exploding_gradients', 'update_ratio'),
    'poor_initialization': ('nonfinite', 'saturated_activations', 'activation_collapse', 'dead_units',
                            'exploding_gradients') + _LEARNING,
    'nonfinite': ('nonfinite', 'exploding_gradients', 'loss_diverged', 'oscillating_loss', 'activation_collapse',
                  'growth_collapse_cycle', 'dead_units', 'saturated_activations', 'overfitting') + _LEARNING,
    'saturated_activations': _LEARNING,
    'activation_collapse': ('activation_collapse', 'dead_units') + _LEARNING,
    'growth_collapse_cycle': ('activation_collapse', 'dead_units', 'oscillating_loss', 'loss_plateau'),
    'dead_units': _LEARNING,
    'exploding_gradients': ('loss_diverged', 'oscillating_loss', 'update_ratio'),
    'lr_too_low': ('update_ratio',) + _OUTCOMES,
    'vanishing_gradients': ('update_ratio', 'lr_too_low') + _OUTCOMES,
    'loss_diverged': ('oscillating_loss',) + _OUTCOMES,
    'oscillating_loss': _OUTCOMES,
    'predictions_collapsed': ('metric_at_chance', 'no_progress', 'loss_plateau'),
    'metric_at_chance': ('no_progress', 'loss_plateau', 'overfitting'),
}
SAME_LAYER = {('unchanged_layers', 'vanishing_gradients'), ('unchanged_layers', 'exploding_gradients'),
              ('unchanged_layers', 'update_ratio'), ('growth_collapse_cycle', 'activation_collapse')}
_ORDER = ['inputs_degenerate', 'inputs_not_normalized', 'class_imbalance', 'probabilities_into_loss',
          'symmetric_units', 'unchanged_layers', 'poor_initialization', 'nonfinite', 'saturated_activations',
          'growth_collapse_cycle', 'activation_collapse', 'dead_units', 'exploding_gradients', 'vanishing_gradients',
          'lr_too_low', 'update_ratio', 'loss_diverged', 'oscillating_loss', 'predictions_collapsed',
          'metric_at_chance', 'no_progress', 'loss_plateau', 'overfitting']
_RANK = {c: i for i, c in enumerate(_ORDER)}


def _explains(cause, effect, position):
    if cause is effect: return False
    # A finding's own evidence may decide (weights shrunk by weight decay explain dead units; a layer no gradient
    # reaches is a vanishing gradient's consequence), and then the fixed table does not link them the other way.
    if effect.check in cause.explains or cause.check in effect.explained_by: return True
    if cause.check in effect.explains or effect.check in cause.explained_by or effect.check in cause.explains_not:
        return False
    if effect.check not in EXPLAINS.get(cause.check, ()): return False
    if (cause.check, effect.check) in SAME_LAYER and cause.layer != effect.layer: return False
    if cause.check == effect.check:
        # Non-finite values, collapses: the earliest place explains the later ones; in one batch, the place earlier
        # in the data's flow (the checks list layers in model order).
        return ((_first_batch(cause), _flow(cause), position[id(cause)])
                < (_first_batch(effect), _flow(effect), position[id(effect)]))
    return _RANK[cause.check] < _RANK[effect.check]


def _first_batch(f): return f.batches[0] if f.batches else 0


def _flow(f):
    "Where a non-finite value shows within one batch, in the order data flows: inputs, activations, loss, gradients."
    if f.check != 'nonfinite': return 0
    if f.layer == 'inputs': return 0
    if f.layer is None: return 2
    return 1 if f.message.startswith('activations') else 3


def link_causes(findings):
    """Each warning or error that an earlier-listed warning or error explains gets that one (the most upstream)
    as its `cause`; the findings come back ordered root causes first (errors, then warnings, each followed by
    what it explains), then the notes."""
    serious = [f for f in findings if f.severity != 'info']
    position = {id(f): i for i, f in enumerate(findings)}
    linked = []
    for f in findings:
        causes = [c for c in serious if _explains(c, f, position)] if f.severity != 'info' else []
        if causes:
            best = min(causes, key=lambda c: (_RANK[c.check], _first_batch(c), position[id(c)]))
            f = Finding(**{**f.__dict__, 'cause': best.key})
        linked.append(f)
    by_key = {f.key: f for f in linked}

    def root(f, depth=0):
        return f if f.cause is None or f.cause not in by_key or depth > len(linked) else root(by_key[f.cause], depth + 1)

    # A root cause is as serious as the worst of what it explains: a growth-collapse cycle (a warning when training
    # recovers from it) that left the layers collapsed for good heads an error.
    worst = {}
    for f in linked:
        if f.severity != 'info':
            r = root(f)
            worst[r.key] = min(worst.get(r.key, len(SEVERITIES)), SEVERITIES.index(f.severity))
    linked = [Finding(**{**f.__dict__, 'severity': SEVERITIES[worst[f.key]]})
              if f.cause is None and f.key in worst and worst[f.key] < SEVERITIES.index(f.severity) else f
              for f in linked]
    by_key = {f.key: f for f in linked}

    def rank(f):
        r = root(f)
        return (r.severity == 'info', SEVERITIES.index(r.severity), _RANK.get(r.check, 99), r.key, f.cause is not None,
                _RANK.get(f.check, 99))
    return sorted(linked, key=rank)
