"""What a model's outputs mean to its user, and the Learner features built on predictions.

The loss says how outputs become probabilities (softmax for cross-entropy, sigmoid for BCE-with-logits) and how
probabilities decode: the most probable class for a single-label classifier, every class above a threshold for
a multi-label one (`BCEWithLogitsLoss`; 0.5 unless `thresh` is given, or set as `learn.loss_func.thresh` as a
fastai loss carries it). `tta` and `show_results` are `Learner` methods that delegate here.
"""
import torch
from torch import nn

from .data.show import label_titles, show_images

__all__ = ['is_cross_entropy', 'is_multi_label', 'loss_activation', 'decode_preds', 'decode_item',
           'loader_for', 'inference_loader', 'tta', 'show_results']


def is_cross_entropy(loss_func) -> bool:
    "Whether `loss_func` is cross-entropy (`nn.CrossEntropyLoss` or `F.cross_entropy`): outputs are class scores."
    return isinstance(loss_func, nn.CrossEntropyLoss) or getattr(loss_func, '__name__', '') == 'cross_entropy'


def is_multi_label(loss_func) -> bool:
    "Whether `loss_func` scores each class on its own (BCE with logits): predictions decode by a threshold."
    return isinstance(loss_func, nn.BCEWithLogitsLoss)


def loss_activation(loss_func):
    "The function that turns the model's outputs into probabilities for `loss_func` (identity when it has none)."
    if is_cross_entropy(loss_func): return lambda p: torch.softmax(p, dim=-1)
    if is_multi_label(loss_func): return torch.sigmoid
    return lambda p: p


def _threshold(loss_func, thresh):
    "The decoding threshold of a multi-label loss; None for any other, which refuses a `thresh`."
    if not is_multi_label(loss_func):
        if thresh is not None:
            raise ValueError(f"thresh={thresh} decodes multi-label predictions (loss BCEWithLogitsLoss), but this "
                             f"learner's loss is {type(loss_func).__name__}: its predictions decode to the most "
                             f"probable class. Leave thresh out")
        return None
    thresh = getattr(loss_func, 'thresh', 0.5) if thresh is None else thresh
    if not 0 < thresh < 1: raise ValueError(f"thresh={thresh}: a probability threshold must be in (0, 1)")
    return thresh


def decode_preds(probs, loss_func, vocab=None, thresh=None):
    """Probabilities decoded as the targets are: a boolean multi-hot tensor (probability above the threshold) for
    a multi-label loss, class indices (argmax) for a classifier (a vocab, or a cross-entropy loss), else the
    values as they are (regression)."""
    t = _threshold(loss_func, thresh)
    if t is not None: return probs > t
    return probs.argmax(dim=-1) if vocab is not None or is_cross_entropy(loss_func) else probs


def decode_item(probs, loss_func, vocab, thresh=None):
    """`Learner.predict`'s answer for one item's CPU probabilities. Single-label: `(label, class index,
    probabilities)`; multi-label: `(list of labels, boolean multi-hot tensor, probabilities)`. Labels are the
    vocab's names when there is one, else class indices."""
    t = _threshold(loss_func, thresh)
    name = (lambda i: vocab[i]) if vocab is not None else (lambda i: i)
    if t is None:
        idx = int(probs.argmax())  # sync-ok: CPU probabilities of one item
        return name(idx), idx, probs
    decoded = probs > t
    return [name(i) for i in decoded.nonzero().flatten().tolist()], decoded, probs  # sync-ok: CPU, one item


def loader_for(dls, ds_idx):
    "Loader `ds_idx` of `dls`, as fastai numbers them: 0 the training loader, 1 the validation loader."
    if ds_idx not in (0, 1): raise IndexError(f"ds_idx={ds_idx!r}: use 0 (the training set) or 1 (the validation set)")
    return dls.train if ds_idx == 0 else dls.valid


def inference_loader(dl, augment=False):
    """`dl` as predictions need it: every item once, in order, augmented only when `augment` (a learnkit
    loader made `new` if it shuffles, drops its last batch or augments otherwise). A plain torch DataLoader is
    used as it is."""
    if not hasattr(dl, 'new'):
        if augment:
            raise TypeError(f"test-time augmentation needs a learnkit loader (TfmdDL), whose batch transforms it "
                            f"can turn on; got a {type(dl).__name__}. Build the data with DataBlock or "
                            f"ImageDataLoaders, or pass dl=<a TfmdDL>")
        return dl
    if dl.shuffle or dl.drop_last or dl.augment != augment:
        return dl.new(shuffle=False, drop_last=False, augment=augment)
    return dl


def tta(learn, ds_idx=1, dl=None, n=4, beta=0.25, use_max=False):
    """Test-time augmentation, with fastai's semantics. Predict `n` times on `dl` (default the `ds_idx` loader,
    in order) with the training augmentations on, and combine: the mean of those predictions (the maximum with
    `use_max`) is blended with the prediction without augmentation as `lerp(augmented, plain, beta)`, i.e.
    `(1 - beta) * augmented + beta * plain`. `beta=None` returns both, `(augmented, plain)`; `use_max` returns the
    element-wise maximum of both. Returns `(predictions, targets)`. Without augmentations in the loader's batch
    transforms the result is `get_preds`'s."""
    if n < 1: raise ValueError(f"tta(n={n}): n is the number of augmented passes, at least 1")
    dl = loader_for(learn.dls, ds_idx) if dl is None else dl
    augmented = inference_loader(dl, augment=True)
    aug = torch.stack([learn.get_preds(dl=augmented)[0] for _ in range(n)])
    aug = aug.max(0).values if use_max else aug.mean(0)
    preds, targs = learn.get_preds(dl=inference_loader(dl))
    if use_max: return torch.maximum(preds, aug), targs
    return ((aug, preds) if beta is None else torch.lerp(aug, preds, beta)), targs


def show_results(learn, ds_idx=1, dl=None, max_n=9, shuffle=True, figsize=None):
    """A figure of `max_n` items of `dl` (default: the `ds_idx` loader), drawn at random with `shuffle`, each
    titled with its target over the model's prediction, green when they agree and red when not (multi-label:
    the labels above the threshold, joined by ';'). Returns the matplotlib Figure; nothing is shown by pyplot."""
    dl = loader_for(learn.dls, ds_idx) if dl is None else dl
    if not (hasattr(dl, 'new') and hasattr(dl, 'decode')):
        raise TypeError(f"show_results needs a learnkit loader (TfmdDL), which can undo its batch transforms to "
                        f"show the images; got a {type(dl).__name__}")
    seed = int(torch.randint(2**62, ())) if shuffle else dl.seed  # sync-ok: host RNG, once per call
    xb, yb = dl.new(bs=max_n, shuffle=shuffle, drop_last=False, augment=False, seed=seed).one_batch()
    _, _, decoded = learn.get_preds(dl=[(xb, yb)], with_decoded=True)
    vocab = getattr(learn.dls, 'vocab', None)
    targets, preds = label_titles(yb, vocab), label_titles(decoded, vocab)
    titles = [f"{t}\n{p}" for t, p in zip(targets, preds)]
    colors = ['green' if t == p else 'red' for t, p in zip(targets, preds)]
    return show_images(dl.decode(xb), titles, max_n=max_n, figsize=figsize, colors=colors)
