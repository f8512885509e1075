"""The health report: read what a fit recorded and say, in words, what went wrong and what to try.

`diagnose(learn)` (also `learn.diagnose()`) reads the Recorder's losses, and the records of `ActivationStats`
and `GradientStats` when they were attached, runs every check that has data, and returns a `HealthReport`:
a list of `Finding`s (severity, check, layer, batch range, measured value, message, advice) that prints as text
and renders as Markdown. Checks that lack their data are listed as skipped, with the callback that would feed
them. Every threshold is a documented field of `Thresholds`, and `diagnose` takes any of them as a keyword.
"""
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..callbacks.activations import NEAR_ZERO, ActivationStats
from ..callbacks.gradients import GradientStats

__all__ = ['Finding', 'HealthReport', 'Thresholds', 'diagnose', 'SEVERITIES']

SEVERITIES = ('error', 'warning', 'info')


@dataclass(frozen=True)
class Finding:
    """One problem the report found. `severity` is 'error' (training is broken), 'warning' (it works badly or
    will) or 'info'; `check` names the check; `layer` and `batches` (first, last training batch) say where;
    `value` is the measured number `message` is about; `advice` says what to try."""
    severity: str
    check: str
    message: str
    advice: str
    layer: str | None = None
    batches: tuple[int, int] | None = None
    value: float | None = None

    def where(self):
        parts = ([f"layer {self.layer}"] if self.layer else []) + ([_batch_range(self.batches)] if self.batches else [])
        return ', '.join(parts)


@dataclass
class Thresholds:
    """The report's thresholds. Fractions of a run are fractions of the recorded training batches.

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
    Gradients (from GradientStats):
    - `grad_vanishing` (1e-6): a layer whose median gradient norm over the second half of the run is below this
      gets no learning signal.
    - `grad_exploding` (100.0): a gradient norm above this, on any recorded step, is exploding.
    - `update_ratio_low` (1e-5), `update_ratio_high` (0.1): the median ||update|| / ||w|| of a layer outside this
      range is far from the healthy ~1e-3 (its weights barely move, or are rewritten every few steps).
    - `dead_units` (0.5): a ReLU whose fraction of never-positive units in the last window is at least this.
    Losses (from the Recorder):
    - `min_improvement` (0.05): the smoothed loss at the end must be at least this fraction below its start.
    - `diverge_factor` (3.0): a final loss this many times its minimum has diverged.
    - `plateau_window` (0.25), `plateau_tol` (0.01): over the final `plateau_window` of the run the loss must
      fall by at least `plateau_tol` (relative), unless it is already below `plateau_floor` (0.05).
    - `overfit_rise` (0.1): a valid loss this fraction above its best epoch while the train loss kept falling.
    - `overfit_gap` (2.0): a final valid loss this many times the train loss.
    """
    collapse_near_zero: float = 0.95
    later_layers: float = 0.5
    collapse_min_batches: int = 3
    end_window: float = 0.1
    cycle_growth: float = 3.0
    cycle_drop: float = 3.0
    cycle_near_zero_rise: float = 0.05
    grad_vanishing: float = 1e-6
    grad_exploding: float = 100.0
    update_ratio_low: float = 1e-5
    update_ratio_high: float = 0.1
    dead_units: float = 0.5
    min_improvement: float = 0.05
    diverge_factor: float = 3.0
    plateau_window: float = 0.25
    plateau_tol: float = 0.01
    plateau_floor: float = 0.05
    overfit_rise: float = 0.1
    overfit_gap: float = 2.0


@dataclass
class HealthReport:
    """What `diagnose` found: `findings` (errors first), the `checked` checks and the `skipped` ones with why.
    Prints as text; `to_markdown()` (and Jupyter) renders Markdown."""
    findings: list = field(default_factory=list)
    checked: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    @property
    def errors(self): return [f for f in self.findings if f.severity == 'error']
    @property
    def warnings(self): return [f for f in self.findings if f.severity == 'warning']

    def by_check(self, check):
        "The findings of one check."
        return [f for f in self.findings if f.check == check]

    def __iter__(self): return iter(self.findings)
    def __len__(self): return len(self.findings)

    def _headline(self):
        if not self.findings: return "No problems found."
        counts = [f"{n} {sev}{'s' if n > 1 else ''}" for sev in SEVERITIES
                  if (n := sum(f.severity == sev for f in self.findings))]
        return f"{', '.join(counts)}."

    def __str__(self):
        lines = [f"Health report: {self._headline()}"]
        for f in self.findings:
            where = f.where()
            lines.append(f"  {f.severity.upper():<8}{f.check}{' (' + where + ')' if where else ''}: {f.message}")
            lines.append(f"  {'':<8}try: {f.advice}")
        lines.append(f"Checked: {', '.join(self.checked) or 'nothing'}.")
        lines += [f"Skipped {check}: {why}" for check, why in self.skipped.items()]
        return '\n'.join(lines)

    __repr__ = __str__

    def to_markdown(self):
        "The report as Markdown: a headline, a table of findings, and what was checked or skipped."
        lines = ["## Health report", "", f"**{self._headline()}**", ""]
        if self.findings:
            lines += ["| severity | check | layer | batches | value | finding | what to try |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {f.severity} | {f.check} | {_md(f.layer or '')} | {_batch_range(f.batches) if f.batches else ''} "
                      f"| {_fmt(f.value)} | {_md(f.message)} | {_md(f.advice)} |" for f in self.findings]
            lines.append("")
        lines.append(f"Checked: {', '.join(self.checked) or 'nothing'}.")
        if self.skipped:
            lines += ["", "Skipped:"] + [f"- {check}: {_md(why)}" for check, why in self.skipped.items()]
        return '\n'.join(lines) + '\n'

    def _repr_markdown_(self): return self.to_markdown()


def diagnose(learn, show=True, **thresholds):
    """Check what `learn`'s last fit recorded and return a `HealthReport` (printed too, unless `show=False`).

    Uses `learn.recorder` (losses, per-epoch rows) and, when attached, `ActivationStats` (collapse,
    growth-then-collapse cycles, NaN/Inf activations) and `GradientStats` (vanishing/exploding gradients, update
    ratios, dead ReLUs). Keywords override `Thresholds` fields, e.g. `diagnose(learn, collapse_near_zero=0.9)`."""
    known = {f.name for f in dataclasses.fields(Thresholds)}
    unknown = sorted(set(thresholds) - known)
    if unknown:
        raise TypeError(f"diagnose() got unknown threshold(s) {unknown}; the thresholds are: {', '.join(sorted(known))}")
    th = Thresholds(**thresholds)
    data = _RunData.from_learner(learn)
    report = HealthReport()
    for check in CHECKS:
        missing = [need for need in check.needs if getattr(data, need) is None]
        if missing:
            report.skipped[check.name] = _WHY_MISSING[missing[0]]
            continue
        report.checked.append(check.name)
        report.findings += check.fn(data, th)
    report.findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    if show: print(report)
    return report


# ---- what the checks read ---------------------------------------------------------------------------------
_WHY_MISSING = {
    'losses': "no training losses recorded (the Recorder is missing, or fit has not run)",
    'epochs': "no epoch with a validation loss recorded",
    'act': "no activation statistics: add ActivationStats() to the Learner's callbacks",
    'grad': "no gradient statistics: add GradientStats() to the Learner's callbacks",
    'dead': "no dead-unit windows: GradientStats found no nn.ReLU modules, or fit ran fewer batches than dead_window",
}


@dataclass
class _RunData:
    losses: list | None = None   # smoothed training loss per batch
    epochs: list | None = None   # [(train_loss, valid_loss)] per epoch
    act: dict | None = None      # ActivationStats.stats
    grad: dict | None = None     # GradientStats.stats
    dead: dict | None = None     # the dead-unit part of GradientStats.stats

    @classmethod
    def from_learner(cls, learn):
        data = cls()
        rec = getattr(learn, 'recorder', None)
        if rec is not None and len(rec.losses): data.losses = rec.losses
        if rec is not None and any(v[1] is not None for v in rec.values):
            data.epochs = [(v[0], v[1]) for v in rec.values if v[1] is not None]
        for cb in learn.cbs:
            if isinstance(cb, ActivationStats) and len(cb.iters): data.act = cb.stats
            if isinstance(cb, GradientStats) and len(cb.iters):
                data.grad = cb.stats
                if len(cb.dead_iters): data.dead = data.grad
        return data


@dataclass(frozen=True)
class _Check:
    name: str
    needs: tuple
    fn: object


# ---- small helpers ---------------------------------------------------------------------------------------
def _batch_range(b): return f"batch {b[0]}" if b[0] == b[1] else f"batches {b[0]}-{b[1]}"
def _md(s): return str(s).replace('|', '\\|').replace('\n', ' ')


def _fmt(v):
    if v is None: return ''
    if v != v or math.isinf(v): return str(v)
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _tail(n, frac): return max(1, math.ceil(n * frac))


def _runs(mask):
    "(start, end) index pairs (inclusive) of the runs of True in a 1-D bool tensor."
    if not len(mask): return []
    m = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = (m[1:] - m[:-1]).nonzero().flatten().tolist()  # sync-ok: CPU records, read on request
    return [(s, e - 1) for s, e in zip(edges[::2], edges[1::2])]


def _judged_layers(names, th):
    "Indices of the 'later' hooked layers, the output layer excluded."
    n = len(names)
    if n < 2: return []
    first = min(n - 2, int(n * (1 - th.later_layers)))
    return list(range(first, n - 1))


# ---- checks -----------------------------------------------------------------------------------------------
def check_nonfinite(data, th):
    "NaN or Inf in the training loss or in any layer's activation statistics."
    out = []
    advice = ("lower the learning rate, add gradient clipping, check the inputs for NaN; with mixed precision "
              "keep the loss scaler on")
    if data.losses is not None:
        bad = [i for i, v in enumerate(data.losses) if not math.isfinite(v)]
        if bad:
            out.append(Finding('error', 'nonfinite', f"the training loss became {data.losses[bad[0]]} at batch {bad[0]} "
                               f"and stayed non-finite for {len(bad)} batches", advice, batches=(bad[0], bad[-1]),
                               value=data.losses[bad[0]]))
    if data.act is not None:
        a = data.act
        finite = torch.isfinite(a['mean']) & torch.isfinite(a['std'])
        ran = ~torch.isnan(a['near_zero'])  # NaN near_zero marks a layer that did not run in that batch
        bad = (~finite & ran).nonzero().tolist()  # sync-ok: CPU records, read on request
        if bad:
            row, layer = bad[0]
            it = a['iters'].tolist()  # sync-ok: CPU records, read on request
            value = a['mean'][row, layer].item()  # sync-ok: CPU records, read on request
            out.append(Finding('error', 'nonfinite', f"activations became non-finite (mean {value}) "
                               f"at batch {it[row]}, first in this layer", advice, layer=a['layer_names'][layer],
                               batches=(it[row], it[bad[-1][0]]), value=value))
    if data.grad is not None:
        g = data.grad
        bad = (~torch.isfinite(g['grad_norm'])).nonzero().tolist()  # sync-ok: CPU records, read on request
        if bad:
            row, layer = bad[0]
            it = g['iters'].tolist()  # sync-ok: CPU records, read on request
            value = g['grad_norm'][row, layer].item()  # sync-ok: CPU records, read on request
            out.append(Finding('error', 'nonfinite', f"gradients became non-finite at batch {it[row]}", advice,
                               layer=g['layer_names'][layer], batches=(it[row], it[bad[-1][0]]), value=value))
    return out


def check_collapse(data, th):
    "Layers whose activations are almost all <= 0.05: collapsed to the end (error) or for a stretch (warning)."
    a, out = data.act, []
    it = a['iters'].tolist()  # sync-ok: CPU records, read on request
    for layer in _judged_layers(a['layer_names'], th):
        nz = a['near_zero'][:, layer]
        ok = ~torch.isnan(nz)
        nz, its = nz[ok], [i for i, keep in zip(it, ok.tolist()) if keep]  # sync-ok: CPU records, read on request
        if not len(nz): continue
        tail = _tail(len(nz), th.end_window)
        runs = [(s, e) for s, e in _runs(nz >= th.collapse_near_zero) if e - s + 1 >= th.collapse_min_batches]
        name = a['layer_names'][layer]
        end_level = nz[-tail:].median().item()  # sync-ok: CPU records, read on request
        if end_level >= th.collapse_near_zero:
            start = runs[-1][0] if runs and runs[-1][1] == len(nz) - 1 else len(nz) - tail
            out.append(Finding(
                'error', 'activation_collapse',
                f"{end_level:.0%} of the activations are <= {NEAR_ZERO} over the last {tail} recorded batches (from batch "
                f"{its[start]} on): the units after this layer output zeros, so it passes almost nothing on",
                "lower the learning rate or warm it up (fit_one_cycle), add batchnorm (simple_cnn(bn=True)), or use "
                "a larger batch size", layer=name, batches=(its[start], its[-1]), value=end_level))
        elif runs:
            s, e = max(runs, key=lambda r: r[1] - r[0])
            level = nz[s:e + 1].median().item()  # sync-ok: CPU records, read on request
            out.append(Finding(
                'warning', 'activation_collapse',
                f"{level:.0%} of the activations were <= {NEAR_ZERO} for {e - s + 1} recorded "
                f"batches ({len(runs)} such stretch{'es' if len(runs) > 1 else ''}) before recovering; they end at "
                f"{end_level:.0%}", "warm the learning rate up more gently (larger pct_start or div), or add batchnorm",
                layer=name, batches=(its[s], its[e]), value=level))
    return out


def _cycles(std, nz, th):
    """Growth-then-collapse cycles in one layer: (trough, peak, collapse) indices where the std grew
    `cycle_growth`-fold from the trough, then fell `cycle_drop`-fold from the peak while the near-zero share rose
    back, counted only when the std grows again afterwards (a collapse that never recovers is
    `activation_collapse`)."""
    events, trough, peak, grown = [], 0, None, False
    for t in range(1, len(std)):
        s = std[t]
        if not grown:
            if s < std[trough]: trough = t
            elif s >= th.cycle_growth * std[trough]: grown, peak = True, t
        elif s > std[peak]: peak = t
        elif s * th.cycle_drop <= std[peak] and nz[t] >= min(nz[trough:peak + 1]) + th.cycle_near_zero_rise:
            events.append((trough, peak, t))
            grown, trough = False, t
    # Keep the collapses the layer recovered from: followed by new growth (a later event, or an open growth).
    return events if grown else events[:-1]


def check_cycles(data, th):
    "The chapter's 'exponential growth then collapse' cycles, read from each later layer's std and near-zero share."
    a, out = data.act, []
    it = a['iters'].tolist()  # sync-ok: CPU records, read on request
    for layer in _judged_layers(a['layer_names'], th):
        std, nz = a['std'][:, layer], a['near_zero'][:, layer]
        ok = (~torch.isnan(nz)).tolist()  # sync-ok: CPU records, read on request
        std, nz = std[ok].tolist(), nz[ok].tolist()  # sync-ok: CPU records, read on request
        its = [i for i, keep in zip(it, ok) if keep]
        events = _cycles(std, nz, th)
        if not events: continue
        t0, p0, c0 = events[0]
        out.append(Finding(
            'warning', 'growth_collapse_cycle',
            f"{len(events)} cycle{'s' if len(events) > 1 else ''} of growth then collapse: the std of the activations "
            f"grew {std[p0] / max(std[t0], 1e-12):.1f}-fold (batch {its[t0]} to {its[p0]}), then fell back "
            f"{std[p0] / max(std[c0], 1e-12):.1f}-fold with {nz[c0]:.0%} near zero at batch {its[c0]}; each collapse "
            "restarts training, which ends slower and worse", "add batchnorm (simple_cnn(bn=True)), or lower lr_max",
            layer=a['layer_names'][layer], batches=(its[events[0][0]], its[events[-1][2]]), value=len(events)))
    return out


def check_gradients(data, th):
    "Vanishing (no signal reaches a layer) and exploding gradients, per layer."
    g, out = data.grad, []
    it, norms = g['iters'].tolist(), g['grad_norm']  # sync-ok: CPU records, read on request
    half = norms[len(norms) // 2:]
    for layer, name in enumerate(g['layer_names']):
        col = norms[:, layer]
        med = half[:, layer].nan_to_num(nan=0.).median().item()  # sync-ok: CPU records, read on request
        if med < th.grad_vanishing:
            out.append(Finding(
                'error', 'vanishing_gradients',
                f"median gradient norm {med:.2e} over the second half of the run: this layer has stopped learning",
                "look for dead activations after it (activation_collapse, dead_units), lower the learning rate, add "
                "batchnorm or residual connections", layer=name, batches=(it[len(norms) // 2], it[-1]), value=med))
        finite = col[torch.isfinite(col)]
        peak = finite.max().item() if len(finite) else 0.  # sync-ok: CPU records, read on request
        if peak > th.grad_exploding:
            worst = int(col.nan_to_num(nan=0., posinf=float('inf')).argmax())  # sync-ok: CPU records
            over = (col > th.grad_exploding).nonzero().flatten().tolist()  # sync-ok: CPU records
            out.append(Finding(
                'warning', 'exploding_gradients',
                f"gradient norm reached {peak:.3g} at batch {it[worst]} ({len(over)} steps above "
                f"{th.grad_exploding:g})", "lower the learning rate, clip gradients, or add batchnorm",
                layer=name, batches=(it[over[0]], it[over[-1]]), value=peak))
    return out


def check_update_ratio(data, th):
    "Median update:data ratio per layer far from the healthy ~1e-3."
    g, out = data.grad, []
    it = g['iters'].tolist()  # sync-ok: CPU records, read on request
    for layer, name in enumerate(g['layer_names']):
        med = g['update_ratio'][:, layer].nan_to_num(nan=0.).median().item()  # sync-ok: CPU records, read on request
        if med < th.update_ratio_low:
            out.append(Finding('warning', 'update_ratio',
                               f"median ||update|| / ||w|| is {med:.1e}, far below ~1e-3: the weights barely move",
                               "raise the learning rate (learn.lr_find()), or check this layer is not frozen",
                               layer=name, batches=(it[0], it[-1]), value=med))
        elif med > th.update_ratio_high:
            out.append(Finding('warning', 'update_ratio',
                               f"median ||update|| / ||w|| is {med:.2g}, far above ~1e-3: each step rewrites a large "
                               "part of the weights", "lower the learning rate, or add weight decay",
                               layer=name, batches=(it[0], it[-1]), value=med))
    return out


def check_dead_units(data, th):
    "ReLUs with many units that were never positive over the last window."
    g, out = data.dead, []
    dead, ends = g['dead'], g['dead_iters'].tolist()  # sync-ok: CPU records, read on request
    for j, name in enumerate(g['relu_names']):
        frac = dead[-1, j].item()  # sync-ok: CPU records, read on request
        if frac != frac or frac < th.dead_units: continue
        first = next(i for i in range(len(dead)) if dead[i, j].item() >= th.dead_units)  # sync-ok: CPU records
        out.append(Finding('error' if frac >= 1 else 'warning', 'dead_units',
                           f"{frac:.0%} of this ReLU's units were never positive in the last window (ending at batch "
                           f"{ends[-1]})", "lower the learning rate, add batchnorm before the ReLU, or use a leaky "
                           "activation", layer=name, batches=(ends[first], ends[-1]), value=frac))
    return out


def _mean(xs): return sum(xs) / len(xs)


def check_loss_progress(data, th):
    "A loss that does not decrease at all, diverges, or stops decreasing."
    losses, out = data.losses, []
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < 4: return out
    n = len(losses)
    head = finite[0]  # the loss before training moved anything (the first batch's)
    tail = _mean(finite[-_tail(len(finite), th.end_window):])
    lo = min(finite)
    lo_at = losses.index(lo)
    if tail > th.diverge_factor * lo:
        out.append(Finding('error', 'loss_diverged', f"the training loss fell to {lo:.3g} at batch {lo_at}, then rose to "
                           f"{tail:.3g}", "lower the learning rate, or anneal it (fit_one_cycle)",
                           batches=(lo_at, n - 1), value=tail))
    elif tail > (1 - th.min_improvement) * head:
        out.append(Finding('error', 'no_progress', f"the training loss went from {head:.3g} at the first batch to "
                           f"{tail:.3g} at the end ({(tail - head) / head:+.1%}): training has not reduced it",
                           "look for collapsed activations or vanishing gradients; try a lower learning rate, "
                           "fit_one_cycle, or batchnorm", batches=(0, n - 1), value=tail))
    else:
        w = _tail(n, th.plateau_window)
        window = [v for v in losses[-w:] if math.isfinite(v)]
        if w >= 4 and len(window) >= 4:
            k = _tail(len(window), 0.2)
            start, end = _mean(window[:k]), _mean(window[-k:])
            if end > th.plateau_floor and (start - end) / start < th.plateau_tol:
                out.append(Finding('warning', 'loss_plateau',
                                   f"over the last {w} batches the training loss went from {start:.3g} to {end:.3g} "
                                   f"({(start - end) / start:+.1%}): it has stopped decreasing",
                                   "train with a schedule that anneals the learning rate (fit_one_cycle), or a "
                                   "different learning rate; if the valid loss is still falling, train longer",
                                   batches=(n - w, n - 1), value=end))
    return out


def check_overfitting(data, th):
    "A valid loss that diverges from the training loss."
    epochs, out = data.epochs, []
    valid = [v for _, v in epochs]
    train = [t for t, _ in epochs]
    last, best = len(valid) - 1, min(range(len(valid)), key=lambda i: valid[i])
    if best < last and valid[last] > (1 + th.overfit_rise) * valid[best] and train[last] < train[best]:
        out.append(Finding('warning', 'overfitting',
                           f"the valid loss rose from {valid[best]:.3g} (epoch {best}) to {valid[last]:.3g} (epoch "
                           f"{last}) while the training loss fell from {train[best]:.3g} to {train[last]:.3g}",
                           "stop earlier (fewer epochs), add data augmentation, weight decay or dropout",
                           value=valid[last]))
    elif train[last] > 0 and valid[last] > th.overfit_gap * train[last]:
        out.append(Finding('warning', 'overfitting',
                           f"the final valid loss {valid[last]:.3g} is {valid[last] / train[last]:.1f}x the "
                           f"training loss {train[last]:.3g}", "add data augmentation, weight decay or dropout, or "
                           "more training data", value=valid[last]))
    return out


CHECKS = [
    _Check('nonfinite', ('losses',), check_nonfinite),
    _Check('loss_progress', ('losses',), check_loss_progress),
    _Check('overfitting', ('epochs',), check_overfitting),
    _Check('activation_collapse', ('act',), check_collapse),
    _Check('growth_collapse_cycle', ('act',), check_cycles),
    _Check('gradients', ('grad',), check_gradients),
    _Check('update_ratio', ('grad',), check_update_ratio),
    _Check('dead_units', ('dead',), check_dead_units),
]
