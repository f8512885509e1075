"""Health checks on the loss curves (the Recorder): progress, divergence, plateaus, oscillation, a learning rate
too low (with GradientStats' update ratios), and overfitting."""
import math

from .checks_layers import layer_update_ratios, slowed_on_purpose
from .findings import Finding, mean, tail

__all__ = ['check_loss_progress', 'check_lr_too_low', 'check_oscillation', 'check_overfitting', 'swings']


def check_loss_progress(data, th):
    "A loss that does not decrease at all, diverges, or stops decreasing."
    losses, out = data.losses, []
    finite = [v for v in losses if math.isfinite(v)]
    if len(finite) < 4: return out
    n = len(losses)
    head = finite[0]  # the loss before training moved anything (the first batch's)
    end = mean(finite[-tail(len(finite), th.end_window):])
    lo = min(finite)
    lo_at = losses.index(lo)
    if end > th.diverge_factor * lo:
        out.append(Finding('error', 'loss_diverged', f"the training loss fell to {lo:.3g} at batch {lo_at}, then rose to "
                           f"{end:.3g}", "lower the learning rate, or anneal it (fit_one_cycle)",
                           batches=(lo_at, n - 1), value=end))
    elif end > (1 - th.min_improvement) * head:
        out.append(Finding('error', 'no_progress', f"the training loss went from {head:.3g} at the first batch to "
                           f"{end:.3g} at the end ({(end - head) / head:+.1%}): training has not reduced it",
                           "the findings this one lists as its cause say why; if there are none, run learn.lr_find() "
                           "and train at its suggestion (a rate far too low or too high both stall training)",
                           batches=(0, n - 1), value=end))
    else:
        w = tail(n, th.plateau_window)
        window = [v for v in losses[-w:] if math.isfinite(v)]
        if w >= 4 and len(window) >= 4:
            k = tail(len(window), 0.2)
            start, stop = mean(window[:k]), mean(window[-k:])
            if stop > th.plateau_floor and (start - stop) / start < th.plateau_tol:
                advice = ("the learning rate was already annealed: try another peak rate (learn.lr_find()) or a "
                          "larger model; if the valid loss is still falling, train longer" if _annealed(data.lrs) else
                          "train with a schedule that anneals the learning rate (fit_one_cycle), or a different "
                          "learning rate; if the valid loss is still falling, train longer")
                out.append(Finding('warning', 'loss_plateau',
                                   f"over the last {w} batches the training loss went from {start:.3g} to {stop:.3g} "
                                   f"({(start - stop) / start:+.1%}): it has stopped decreasing", advice,
                                   batches=(n - w, n - 1), value=stop))
    return out


def _annealed(lrs):
    "Whether the learning rate ended the run at under half its peak (fit_one_cycle, fit_flat_cos, a decay schedule)."
    lrs = [float(lr) for lr in lrs or () if isinstance(lr, (int, float))]
    return bool(lrs) and max(lrs) > 0 and lrs[-1] < 0.5 * max(lrs)


def check_lr_too_low(data, th):
    """A learning rate far too low: the optimizer's steps move the weights by less than `lr_low_update_ratio` of
    their norm (median over the layers that train), while the loss is still falling, or barely moved."""
    losses = [v for v in data.losses if math.isfinite(v)]
    if len(losses) < 4: return []
    # Layers that do not move at all are `unchanged_layers`; layers trained at a lower rate on purpose (a
    # fine-tuned body) say nothing about the fit's learning rate.
    ratios = [r for r, slowed in zip(layer_update_ratios(data.grad), slowed_on_purpose(data.grad))
              if r == r and r > 0 and not slowed]
    if not ratios: return []
    ratio = sorted(ratios)[len(ratios) // 2]
    if ratio >= th.lr_low_update_ratio: return []
    head, end = losses[0], mean(losses[-tail(len(losses), th.end_window):])
    w = tail(len(losses), th.plateau_window)
    k = tail(w, 0.2)
    still_falling = mean(losses[-w:][:k]) - mean(losses[-k:]) > th.plateau_tol * mean(losses[-w:][:k])
    barely = end > (1 - th.min_improvement) * head
    if end > (1 + th.min_improvement) * head or not (still_falling or barely): return []
    lrs = data.lrs
    lr = f" at lr {max(lrs):.1e}" if lrs else ""
    return [Finding('error' if barely else 'warning', 'lr_too_low',
                    f"the optimizer's steps move the weights by {ratio:.1e} of their norm (median over {len(ratios)} "
                    f"layers; ~1e-3 is healthy){lr}, and the loss went from {head:.3g} to {end:.3g}"
                    f"{', still falling' if still_falling else ''}: the learning rate is far too low",
                    "raise the learning rate: learn.lr_find() suggests one (the 'valley'), then fit_one_cycle at it",
                    batches=(0, len(data.losses) - 1), value=ratio)]


def swings(values, rise, factor=1.):
    """The (low, high) index pairs of the swings in `values`: a rise of at least `rise` above a low, to at least
    `factor` times it, followed by a fall back by as much from the high."""
    out, low, high, rising = [], 0, None, True
    for t in range(1, len(values)):
        v = values[t]
        if rising:
            if v < values[low]: low = t
            elif v - values[low] >= rise and v >= factor * values[low]: rising, high = False, t
        elif v > values[high]: high = t
        elif values[high] - v >= rise and v * factor <= values[high]:
            out.append((low, high))
            rising, low = True, t
    return out


def _smooth(values, window):
    "An exponential moving average over about `window` values (the values themselves for a window of 1)."
    beta, out, avg = 1 - 1 / window, [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def check_oscillation(data, th):
    """A loss that swings up and back down, again and again, instead of settling (steps that overshoot): read from
    each batch's own loss, smoothed over up to 10 batches to average out the noise of sampling batches (a run whose
    batch is the whole data set has none, and is read as it is)."""
    losses = data.batch_losses or []
    if not all(math.isfinite(v) for v in losses) or len(losses) < 8: return []  # non-finite: `nonfinite`
    smooth = _smooth(losses, max(1, min(10, data.batches_per_epoch)))
    factor = 1 + th.oscillation_rise
    found = swings(smooth, 0., factor)
    if len(found) < th.oscillation_swings: return []
    biggest = max(smooth[h] / max(smooth[lo], 1e-12) for lo, h in found)
    return [Finding('warning', 'oscillating_loss',
                    f"the training loss swung up at least {factor:g}-fold and back down {len(found)} times (the largest "
                    f"{biggest:.1f}x, first from batch {found[0][0]} to {found[0][1]}): the steps overshoot",
                    "lower the learning rate (or lr_max), anneal it (fit_one_cycle), or clip gradients",
                    batches=(found[0][0], found[-1][1]), value=float(len(found)))]


def check_overfitting(data, th):
    """A valid loss that rose from its best while the training loss fell, or a gap that kept growing while the
    valid loss stopped improving: never a static ratio of the two."""
    epochs, out = data.epochs, []
    valid, train = [v for _, v in epochs], [t for t, _ in epochs]
    last, best = len(valid) - 1, min(range(len(valid)), key=lambda i: valid[i])
    if best < last and valid[last] > (1 + th.overfit_rise) * valid[best] and train[last] < train[best]:
        out.append(Finding('warning', 'overfitting',
                           f"the valid loss rose from {valid[best]:.3g} (epoch {best}) to {valid[last]:.3g} (epoch "
                           f"{last}) while the training loss fell from {train[best]:.3g} to {train[last]:.3g}",
                           "stop earlier (EarlyStoppingCallback, or SaveModelCallback to keep the best epoch), add data "
                           "augmentation, weight decay or dropout", value=valid[last]))
        return out
    k = th.overfit_gap_epochs
    if len(epochs) > k:
        gaps = [v - t for t, v in epochs]
        growing = all(gaps[i] > gaps[i - 1] and train[i] < train[i - 1] for i in range(last - k + 1, last + 1))
        stalled = valid[last] >= 0.99 * min(valid[:last - k + 1])
        if growing and stalled:
            out.append(Finding('warning', 'overfitting',
                               f"over the last {k} epochs the gap between valid and training loss grew from "
                               f"{gaps[last - k]:.3g} to {gaps[last]:.3g} while the training loss fell and the valid loss "
                               f"stopped improving (best {min(valid):.3g})",
                               "stop earlier, add data augmentation, weight decay or dropout, or more data",
                               value=gaps[last]))
    return out
