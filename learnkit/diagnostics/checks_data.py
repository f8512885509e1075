"""Health checks on what goes in and comes out: the inputs (InputStats), the outputs, predictions and labels
(OutputStats). Each takes the run's records and the `Thresholds` and returns `Finding`s."""
import math

import torch

from .findings import Finding, fmt

__all__ = ['check_inputs', 'check_output_kind', 'check_predictions', 'check_chance', 'check_class_imbalance']


def _median(t): return t.median().item()  # sync-ok: CPU records, read on request


def check_inputs(data, th):
    "Inputs never normalised (far from mean 0, std 1), or constant, or almost all exact zeros."
    i = data.inputs
    finite = torch.isfinite(i['min']) & torch.isfinite(i['max'])
    if not finite.any(): return []  # every batch held a NaN or Inf: `nonfinite` says so
    mean, std, zeros = i['mean'][finite], i['std'][finite], i['zeros'][finite]
    lo, hi = i['min'][finite].min().item(), i['max'][finite].max().item()  # sync-ok: CPU records
    n, m, s, z = int(finite.sum()), _median(mean), _median(std), _median(zeros)  # sync-ok: CPU records
    its = i['iters'][finite]
    where = (int(its[0]), int(its[-1]))  # sync-ok: CPU records
    seen = f"median over {n} training batches; values from {fmt(lo)} to {fmt(hi)}"
    if z >= th.input_zero_share:
        return [Finding('error', 'inputs_degenerate',
                        f"{z:.0%} of the input values are exactly 0 ({seen}): the model sees almost nothing",
                        "check the preprocessing: a mask, a multiplication by 0, a crop of the empty border, an image "
                        "decoded to black, or a wrong channel; look at a batch with dls.show_batch()",
                        batches=where, value=z)]
    if s < th.input_std_min * max(1., abs(m)):
        return [Finding('error', 'inputs_degenerate',
                        f"the inputs are constant: std {fmt(s)} around a mean of {fmt(m)} ({seen})",
                        "check the preprocessing and the loader: every item reaches the model the same",
                        batches=where, value=s)]
    big, tiny = max(abs(m), s) > th.input_scale, max(abs(m), s) < 1 / th.input_scale
    if big or tiny:
        how = "far larger" if big else "far smaller"
        return [Finding('warning', 'inputs_not_normalized',
                        f"the inputs have mean {fmt(m)} and std {fmt(s)} ({seen}), {how} than the mean 0 and std 1 "
                        "that the default initialisations and learning rates assume: they were not normalised",
                        "normalise them: batch_tfms=[Normalize()] (statistics from a training batch), or subtract the "
                        f"training mean and divide by the training std{' (pixels: divide by 255 first)' if hi > 2 else ''}",
                        batches=where, value=s)]
    return []


def check_output_kind(data, th):
    "Outputs that are already probabilities (or log-probabilities) fed to a loss that expects something else."
    o = data.outputs
    expects, n = o['expects'], len(o['probe_min'])
    if expects is None or not n: return []
    rows_are_probs = (o['probe_min'] >= -th.probs_tol) & (o['probe_row_sum_error'] <= th.probs_tol)
    probs = bool(rows_are_probs.all())  # sync-ok: CPU records
    log_probs = bool((o['probe_logsumexp'] <= th.probs_tol).all())  # sync-ok: CPU records
    its = o['probe_iters']
    where, loss = (int(its[0]), int(its[-1])), data.loss_name  # sync-ok: CPU records
    seen = f"on all {n} probed training batches"
    if probs:
        want = "logits" if expects == 'logits' else "log-probabilities"
        fix = ("remove the final softmax (nn.Softmax, F.softmax) from the model: the loss applies its own, and "
               "get_preds/predict apply it for you") if expects == 'logits' else \
              "end the model with log_softmax instead of softmax, or drop it and use nn.CrossEntropyLoss"
        return [Finding('error', 'probabilities_into_loss',
                        f"the model's outputs are already probabilities (every row >= 0 and summing to 1, {seen}), but "
                        f"{loss} expects {want}: the loss squashes them a second time, its gradients shrink, and "
                        "training crawls", fix, batches=where, value=1.)]
    if log_probs and expects == 'logits':
        return [Finding('info', 'probabilities_into_loss',
                        f"the model's outputs are log-probabilities (each row's logsumexp is 0, {seen}); {loss} applies "
                        "log_softmax again, which changes nothing: harmless but redundant",
                        "drop the final log_softmax, or use nn.NLLLoss", batches=where, value=0.)]
    if expects == 'log_probs' and not log_probs:
        return [Finding('error', 'probabilities_into_loss',
                        f"{loss} expects log-probabilities, but the model's outputs are not ({seen}: a row's logsumexp "
                        f"is up to {fmt(o['probe_logsumexp'].max().item())} away from 0)",  # sync-ok: CPU records
                        "end the model with log_softmax (nn.LogSoftmax(dim=1)), or use nn.CrossEntropyLoss on logits",
                        batches=where)]
    return []


def _class(data, i): return f"{i} ({data.vocab[i]})" if data.vocab is not None and i < len(data.vocab) else str(i)


def check_predictions(data, th):
    "Validation predictions collapsed onto one class that the targets do not justify."
    o = data.outputs
    if not len(o['predicted']) or o['predicted'][-1].sum() == 0: return []
    pred, targ = o['predicted'][-1], o['targets'][-1]
    top = int(pred.argmax())  # sync-ok: CPU records
    share, target_share = (pred[top] / pred.sum()).item(), (targ[top] / targ.sum()).item()  # sync-ok: CPU records
    if share < th.collapsed_predictions or target_share >= th.collapsed_predictions: return []
    shrink, explains = data.weight_shrink(), ()
    if shrink is not None and shrink >= 10:
        # Weights driven to ~0 silence the units and the gradients too: this collapse is their cause, not the reverse.
        explains = ('dead_units', 'activation_collapse', 'vanishing_gradients', 'update_ratio', 'lr_too_low',
                    'saturated_activations')
    if shrink is not None and shrink >= 10 and data.wd:
        advice = (f"the weights shrank {shrink:.0f}-fold during fit under weight decay {fmt(data.wd)}: lower wd "
                  "(Adam's default is 0.01)")
    elif shrink is not None and shrink >= 10:
        advice = f"the weights shrank {shrink:.0f}-fold during fit: look at what drives them to zero (the loss, wd)"
    else:
        advice = ("the network stopped using its input: lower the learning rate or use fit_one_cycle; if the "
                  "training set is dominated by this class, rebalance it")
    return [Finding('error', 'predictions_collapsed',
                    f"{share:.0%} of the validation predictions are class {_class(data, top)}, which is {target_share:.0%} "
                    f"of the targets: the model answers the same class whatever the input",
                    advice, batches=(data.last_batch, data.last_batch), value=share, explains=explains)]


def check_chance(data, th):
    "A best validation accuracy no better than guessing: chance, or always answering the majority class."
    o = data.outputs
    n = o['targets'].sum(1)
    seen = n > 0
    if not seen.any(): return []
    acc = (o['correct'][seen] / n[seen])
    best_epoch = int(acc.argmax())  # sync-ok: CPU records
    best, n_valid = acc[best_epoch].item(), int(n[seen][best_epoch])  # sync-ok: CPU records
    targ = o['targets'][seen][best_epoch]
    majority, n_classes = (targ.max() / targ.sum()).item(), targ.shape[0]  # sync-ok: CPU records
    chance = max(1 / n_classes, majority)
    se = math.sqrt(chance * (1 - chance) / max(n_valid, 1))
    if best > chance + th.chance_margin * se: return []
    what = (f"chance (1/{n_classes} = {1 / n_classes:.1%})" if majority <= 1 / n_classes + 1e-9 else
            f"always answering the majority class ({majority:.1%} of the targets)")
    fell = data.loss_drop()
    if fell is not None and fell >= 0.3:
        advice = (f"the training loss fell {fell:.0%} while the validation accuracy stayed at chance: the model "
                  "memorises training labels that carry nothing it can generalise. Check that labels and inputs "
                  "stay paired (a shuffle of one without the other, a wrong label column or label function) and "
                  "that the validation set is labelled the same way")
    else:
        advice = ("nothing was learned: see the findings this one lists as its cause, if any; otherwise check the "
                  "labels, then the learning rate (learn.lr_find())")
    return [Finding('error', 'metric_at_chance',
                    f"the best validation accuracy, {best:.1%} (epoch {best_epoch}, {n_valid} items), is no better than "
                    f"{what}", advice, batches=(data.last_batch, data.last_batch), value=best)]


def check_class_imbalance(data, th):
    "A training set dominated by some classes: the most frequent `class_imbalance` times the least frequent."
    o = data.outputs
    if not len(o['train_labels']): return []
    counts = o['train_labels'].sum(0)
    present = (counts > 0) | (o['targets'].sum(0) > 0)  # classes of the data, not spare outputs of the model
    if present.sum() < 2: return []
    counts = counts[present]
    names = present.nonzero().flatten().tolist()  # sync-ok: CPU records
    hi, lo = int(counts.argmax()), int(counts.argmin())  # sync-ok: CPU records
    ratio = (counts[hi] / counts[lo]).item() if counts[lo] > 0 else math.inf  # sync-ok: CPU records
    if ratio < th.class_imbalance: return []
    share = (counts[hi] / counts.sum()).item()  # sync-ok: CPU records
    rare = f"{int(counts[lo])} examples" if counts[lo] > 0 else "none"  # sync-ok: CPU records
    return [Finding('warning', 'class_imbalance',
                    f"class {_class(data, names[hi])} is {share:.0%} of the training labels, "
                    f"{'infinitely' if math.isinf(ratio) else f'{ratio:.0f}x'} as frequent as class "
                    f"{_class(data, names[lo])} ({rare})",
                    "rebalance the training set: oversample the rare classes (a weighted sampler), weight the loss "
                    "(nn.CrossEntropyLoss(weight=...)), or collect more of them; judge the model per class "
                    "(ClassificationInterpretation), not by accuracy alone", value=ratio)]
