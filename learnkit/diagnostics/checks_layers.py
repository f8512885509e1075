"""Health checks inside the network: activations (ActivationStats), gradients and dead units (GradientStats),
and weights (WeightStats). Each takes the run's records and the `Thresholds` and returns `Finding`s."""
import math

import torch

from ..callbacks.activations import NEAR_ZERO
from .findings import Finding, fmt, tail

__all__ = ['check_nonfinite', 'check_collapse', 'check_cycles', 'check_saturation', 'check_initialization',
           'check_symmetric', 'check_unchanged', 'check_gradients', 'check_update_ratio', 'check_dead_units']


def _runs(mask):
    "(start, end) index pairs (inclusive) of the runs of True in a 1-D bool tensor."
    if not len(mask): return []
    m = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = (m[1:] - m[:-1]).nonzero().flatten().tolist()  # sync-ok: CPU records, read on request
    return [(s, e - 1) for s, e in zip(edges[::2], edges[1::2])]


def judged_layers(names, th):
    "Indices of the 'later' hooked layers, the output layer excluded."
    n = len(names)
    if n < 2: return []
    first = min(n - 2, int(n * (1 - th.later_layers)))
    return list(range(first, n - 1))


# ---- non-finite values, wherever they first appear ----------------------------------------------------------------
def check_nonfinite(data, th):
    """NaN or Inf in the inputs, the training loss, any layer's activations or gradients: one finding per place,
    and the report makes the earliest the cause of the others."""
    out = []
    lowered = ("lower the learning rate, clip gradients (GradientClip), or add batchnorm; with float16 mixed "
               "precision keep the loss scaler on")
    if data.inputs is not None:
        i = data.inputs
        bad = (~(torch.isfinite(i['min']) & torch.isfinite(i['max']))).nonzero().flatten().tolist()  # sync-ok: CPU
        if bad:
            its = i['iters'].tolist()  # sync-ok: CPU records, read on request
            out.append(Finding('error', 'nonfinite',
                               f"{len(bad)} of {len(its)} recorded training batches hold NaN or Inf inputs (first at "
                               f"batch {its[bad[0]]}): every loss and gradient they touch is NaN",
                               "clean the data: find the items with torch.isnan(x).any() and drop or repair them, "
                               "or check the transform that produces them (a division by a zero std)",
                               layer='inputs', batches=(its[bad[0]], its[bad[-1]]), value=float(len(bad))))
    if data.losses is not None:
        bad = [i for i, v in enumerate(data.losses) if not math.isfinite(v)]
        if bad:
            out.append(Finding('error', 'nonfinite', f"the training loss became {data.losses[bad[0]]} at batch "
                               f"{bad[0]} and was non-finite for {len(bad)} batches", lowered,
                               batches=(bad[0], bad[-1]), value=data.losses[bad[0]]))
    for records, what, keys in ((data.act, 'activations', ('mean', 'std')), (data.grad, 'gradients', ('grad_norm',))):
        if records is None: continue
        finite = torch.ones_like(records[keys[0]], dtype=torch.bool)
        for k in keys: finite &= torch.isfinite(records[k])
        if 'near_zero' in records: finite |= torch.isnan(records['near_zero'])  # a layer that did not run
        bad = (~finite).nonzero().tolist()  # sync-ok: CPU records, read on request
        if not bad: continue
        row, layer = min(bad)
        it = records['iters'].tolist()  # sync-ok: CPU records, read on request
        out.append(Finding('error', 'nonfinite', f"{what} became non-finite at batch {it[row]}, first in this layer",
                           lowered, layer=records['layer_names'][layer], batches=(it[row], it[max(bad)[0]]),
                           value=records[keys[0]][row, layer].item()))  # sync-ok: CPU records
    return out


# ---- activations ---------------------------------------------------------------------------------------------------
def check_collapse(data, th):
    "Layers whose activations are almost all <= 0.05: collapsed to the end (error) or for a stretch (warning)."
    a, out = data.act, []
    it = a['iters'].tolist()  # sync-ok: CPU records, read on request
    for layer in judged_layers(a['layer_names'], th):
        nz = a['near_zero'][:, layer]
        ok = ~torch.isnan(nz)
        nz, its = nz[ok], [i for i, keep in zip(it, ok.tolist()) if keep]  # sync-ok: CPU records, read on request
        if not len(nz): continue
        n_tail = tail(len(nz), th.end_window)
        runs = [(s, e) for s, e in _runs(nz >= th.collapse_near_zero) if e - s + 1 >= th.collapse_min_batches]
        name = a['layer_names'][layer]
        end_level = nz[-n_tail:].median().item()  # sync-ok: CPU records, read on request
        if end_level >= th.collapse_near_zero:
            start = runs[-1][0] if runs and runs[-1][1] == len(nz) - 1 else len(nz) - n_tail
            out.append(Finding(
                'error', 'activation_collapse',
                f"{end_level:.0%} of the activations are <= {NEAR_ZERO} over the last {n_tail} recorded batches (from "
                f"batch {its[start]} on): the units after this layer output zeros, so it passes almost nothing on",
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
                layer=name, batches=(its[s], its[e]), value=level,
                # It works again at the end, so it cannot be why the final model learned nothing (with shuffled
                # labels a layer dies for a while as a consequence).
                explains_not=('no_progress', 'loss_plateau', 'predictions_collapsed', 'metric_at_chance')))
    return out


def cycles(std, nz, th):
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
    for layer in judged_layers(a['layer_names'], th):
        std, nz = a['std'][:, layer], a['near_zero'][:, layer]
        ok = (~torch.isnan(nz)).tolist()  # sync-ok: CPU records, read on request
        std, nz = std[ok].tolist(), nz[ok].tolist()  # sync-ok: CPU records, read on request
        its = [i for i, keep in zip(it, ok) if keep]
        events = cycles(std, nz, th)
        if not events: continue
        t0, p0, c0 = events[0]
        # Whether the layer is still collapsed at the end (as check_collapse judges it): then the last collapse was
        # not a restart but the end of training for this layer.
        end = nz[-tail(len(nz), th.end_window):]
        for_good = sorted(end)[len(end) // 2] >= th.collapse_near_zero
        outcome = ("the last collapse never recovered: the layer stays collapsed to the end" if for_good else
                   "each collapse restarts training, which ends slower and worse")
        out.append(Finding(
            'warning', 'growth_collapse_cycle',
            f"{len(events)} cycle{'s' if len(events) > 1 else ''} of growth then collapse: the std of the activations "
            f"grew {std[p0] / max(std[t0], 1e-12):.1f}-fold (batch {its[t0]} to {its[p0]}), then fell back "
            f"{std[p0] / max(std[c0], 1e-12):.1f}-fold with {nz[c0]:.0%} near zero at batch {its[c0]}; {outcome}",
            "add batchnorm (simple_cnn(bn=True)), or lower lr_max",
            layer=a['layer_names'][layer], batches=(its[events[0][0]], its[events[-1][2]]), value=len(events)))
    return out


def check_saturation(data, th):
    "Bounded activations (tanh, sigmoid, ...) whose outputs sit at their bounds, where their gradient is ~0."
    a, out = data.act, []
    if 'saturated' not in a: return out
    it = a['iters'].tolist()  # sync-ok: CPU records, read on request
    sat = a['saturated']
    for layer, name in enumerate(a['layer_names']):
        col = sat[:, layer]
        ok = ~torch.isnan(col)
        if not ok.any(): continue  # not a bounded activation
        col, its = col[ok], [i for i, keep in zip(it, ok.tolist()) if keep]  # sync-ok: CPU records
        half = col[len(col) // 2:]
        level = half.median().item()  # sync-ok: CPU records, read on request
        if level < th.saturated_share: continue
        start = col[:tail(len(col), th.end_window)].median().item()  # sync-ok: CPU records, read on request
        if start >= th.saturated_share:
            when = f"it was saturated from the first batches ({start:.0%})"
            advice = ("its inputs are too large from the start: initialise the layer before it with a smaller gain "
                      "(nn.init.xavier_uniform_ for tanh/sigmoid), normalise the inputs, or add batchnorm before it")
        else:
            when = f"it saturated during training (from {start:.0%} at the start)"
            advice = "lower the learning rate, or add batchnorm before it; weight decay keeps the weights smaller"
        out.append(Finding('warning', 'saturated_activations',
                           f"{level:.0%} of its outputs are within 1% of its bounds (median over the second half of "
                           f"the run), where its gradient is almost 0, so the layers before it barely learn; {when}",
                           advice, layer=name, batches=(its[len(col) // 2], its[-1]), value=level))
    return out


def _is_weight_layer(m):
    w = getattr(m, 'weight', None)
    return isinstance(w, torch.Tensor) and w.ndim >= 2


def check_initialization(data, th):
    "Activation std that fades or explodes from the first to the last hidden weight layer on the first batches."
    a = data.act
    layers = [i for i, m in enumerate(data.act_modules or []) if _is_weight_layer(m)][:-1]  # the output layer excluded
    if len(layers) < 2 or not len(a['std']): return []
    first_rows = a['std'][:th.init_batches]
    std = first_rows[:, layers].nanmedian(0).values.tolist()  # sync-ok: CPU records, read on request
    if not all(math.isfinite(s) and s > 0 for s in (std[0], std[-1])): return []
    ratio = std[-1] / std[0]
    if 1 / th.init_std_ratio < ratio < th.init_std_ratio: return []
    names = a['layer_names']
    fades = ratio < 1
    it = a['iters'].tolist()  # sync-ok: CPU records, read on request
    return [Finding('warning', 'poor_initialization',
                    f"on the first {len(first_rows)} batches the activation std {'falls' if fades else 'grows'} from "
                    f"{fmt(std[0])} after {names[layers[0]]} to {fmt(std[-1])} after {names[layers[-1]]} "
                    f"({ratio:.1e}x over {len(layers)} weight layers): the signal {'fades' if fades else 'explodes'} "
                    "layer by layer, and so do the gradients",
                    "initialise each layer for its activation: nn.init.kaiming_normal_ for ReLU (learnkit's init_cnn "
                    "does it), xavier for tanh/sigmoid; or add batchnorm after each weight layer",
                    layer=names[layers[-1]], batches=(it[0], it[len(first_rows) - 1]), value=ratio)]


# ---- weights -------------------------------------------------------------------------------------------------------
def check_symmetric(data, th):
    "Layers whose units all have the same weights at the end of fit: they compute the same function."
    w, out = data.weights, []
    if len(w['spread']) < 2: return out
    start, end = w['spread'][0], w['spread'][-1]
    its = w['iters'].tolist()  # sync-ok: CPU records, read on request
    for layer, name in enumerate(w['layer_names']):
        s = end[layer].item()  # sync-ok: CPU records, read on request
        if not (s <= th.symmetric_spread): continue  # NaN (a layer without rows) is not judged
        init = "as they did at the start" if start[layer] <= th.symmetric_spread else "although they differed at the start"
        out.append(Finding('error', 'symmetric_units',
                           f"all its units have the same weights at the end of fit (rows differ by {fmt(s)} of the "
                           f"largest weight), {init}: they compute the same function and get the same gradient, so "
                           "the layer works as a single unit",
                           "initialise the weights randomly (not with a constant or zeros): remove the custom init, "
                           "or use nn.init.kaiming_normal_ / learnkit's init_cnn", layer=name,
                           batches=(its[0], its[-1]), value=s))
    return out


def check_unchanged(data, th):
    """Layers whose weights did not change at all during fit: frozen (requires_grad=False), missing from the
    optimizer (their gradient arrives, is never zeroed and piles up), or trainable but reached by no gradient."""
    w, out = data.weights, []
    if len(w['changed']) < 2: return out
    same = ~w['changed'][1:].any(0)
    its = w['iters'].tolist()  # sync-ok: CPU records, read on request
    where = (its[0], its[-1])
    for layer, name in enumerate(w['layer_names']):
        if not same[layer]: continue
        trainable, in_opt = w['trainable'][layer].item(), w['in_optimizer'][layer].item()  # sync-ok: CPU records
        if trainable == 0:
            intended = data.frozen_on_purpose
            out.append(Finding('info' if intended else 'warning', 'unchanged_layers',
                               "its weights did not change during fit: none of its parameters requires a gradient "
                               f"(requires_grad=False){' (learn.freeze())' if intended else ''}",
                               "if you froze it on purpose (transfer learning), nothing to do; otherwise set "
                               "requires_grad=True on its parameters, or call learn.unfreeze(), before fit",
                               layer=name, batches=where, value=0.))
        elif in_opt < 1:
            g0, g1 = w['orphan_grad'][0, layer].item(), w['orphan_grad'][-1, layer].item()  # sync-ok: CPU records
            out.append(Finding('error', 'unchanged_layers',
                               f"its weights did not change during fit: {1 - in_opt:.0%} of its trainable parameters are "
                               "in no optimizer parameter group, so their gradient is never applied and never zeroed: "
                               f"it piled up from {fmt(g0)} to {fmt(g1)}",
                               "give the optimizer every trainable parameter: a splitter must return all of "
                               "model.parameters() in its groups; build the Learner after the model is complete",
                               layer=name, batches=where, value=g1))
        else:
            grad = data.layer_grad(name)
            starved = grad is not None and grad < th.grad_vanishing
            why = ("no gradient reached it (is it used in forward? is everything after it detached, dead or "
                   "saturated?)" if starved else "yet it is trainable and in the optimizer")
            out.append(Finding('warning', 'unchanged_layers', f"its weights did not change during fit: {why}",
                               "check that the layer is used in the forward pass, and that its parameter group's "
                               "learning rate is not 0", layer=name, batches=where, value=grad,
                               explained_by=('vanishing_gradients', 'activation_collapse', 'dead_units',
                                             'saturated_activations', 'nonfinite') if starved else ()))
    return out


# ---- gradients -----------------------------------------------------------------------------------------------------
def check_gradients(data, th):
    "Vanishing (no signal reaches a layer) and exploding gradients, per layer; non-finite norms are not counted."
    g, out = data.grad, []
    it, norms = g['iters'].tolist(), g['grad_norm']  # sync-ok: CPU records, read on request
    half = norms[len(norms) // 2:]
    for layer, name in enumerate(g['layer_names']):
        col, recent = norms[:, layer], half[:, layer]
        recent = recent[torch.isfinite(recent)]
        if len(recent):
            med = recent.median().item()  # sync-ok: CPU records, read on request
            if med < th.grad_vanishing:
                out.append(Finding(
                    'error', 'vanishing_gradients',
                    f"median gradient norm {med:.2e} over the second half of the run: this layer has stopped learning",
                    "look for what blocks the signal after it (dead, collapsed or saturated activations), add "
                    "batchnorm or residual connections, or initialise for the activation (kaiming/xavier)",
                    layer=name, batches=(it[len(norms) // 2], it[-1]), value=med))
        finite = col[torch.isfinite(col)]
        peak = finite.max().item() if len(finite) else 0.  # sync-ok: CPU records, read on request
        if peak > th.grad_exploding:
            over = (col > th.grad_exploding).nonzero().flatten().tolist()  # sync-ok: CPU records
            worst = over[int(col[over].argmax())]  # sync-ok: CPU records
            out.append(Finding(
                'warning', 'exploding_gradients',
                f"gradient norm reached {peak:.3g} at batch {it[worst]} ({len(over)} steps above "
                f"{th.grad_exploding:g})", "lower the learning rate, clip gradients (GradientClip), or add batchnorm",
                layer=name, batches=(it[over[0]], it[over[-1]]), value=peak))
    return out


def slowed_on_purpose(g):
    """Per layer, whether its parameter group trains at a learning rate well below the fit's top one (discriminative
    rates, as fine_tune gives a pretrained body): its small steps are the user's choice, not a learning rate too low."""
    shares = g.get('lr_share')
    if shares is None: return [False] * len(g['layer_names'])
    return [share < 0.5 for share in shares.tolist()]  # sync-ok: CPU records, read on request (NaN compares False)


def layer_update_ratios(g):
    "Per layer, the median update ratio over its finite steps (NaN when it has none)."
    ratios = g['update_ratio']
    out = []
    for layer in range(ratios.shape[1]):
        col = ratios[:, layer]
        col = col[torch.isfinite(col)]
        out.append(col.median().item() if len(col) else math.nan)  # sync-ok: CPU records, read on request
    return out


def check_update_ratio(data, th):
    "Median update:data ratio per layer far from the healthy ~1e-3."
    g, out = data.grad, []
    it = g['iters'].tolist()  # sync-ok: CPU records, read on request
    for name, med, slowed in zip(g['layer_names'], layer_update_ratios(g), slowed_on_purpose(g)):
        if med != med: continue
        if med < th.update_ratio_low and not slowed:
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
