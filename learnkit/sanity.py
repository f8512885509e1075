"""Sanity checks and error hints for classification, kept out of the training loop's module.

The Learner calls `check_outputs` once per run before the first loss, `loss_error` when the loss function raises,
and `empty_loader_message` when the training loader yields nothing: each names what is at fault and the fix.
"""
import torch
from torch.utils.data import TensorDataset

from .predictions import is_cross_entropy

__all__ = ['check_outputs', 'loss_error', 'empty_loader_message']


def check_outputs(learn):
    """Raise when a classifier returns fewer scores than the data has classes (`learn.pred` of the first batch),
    known from the loaders' vocab, or else from labels the datasets hold on the host. Nothing is read from
    the device. On CUDA the loss would fail on such targets with a device-side assert that names nothing and
    leaves the GPU unusable until the process restarts."""
    vocab, pred = getattr(learn.dls, 'vocab', None), learn.pred
    if not (is_cross_entropy(learn.loss_func) and isinstance(pred, torch.Tensor) and pred.ndim == 2): return
    n_out = pred.shape[1]
    if vocab is not None:
        if n_out < len(vocab):
            raise ValueError(f"The model returns {n_out} scores per item, but the data has {len(vocab)} "
                             f"classes: build the model with n_out={len(vocab)} (dls.c).")
        return
    # No vocab (plain torch loaders): the labels, when the dataset holds them on the host, read once per run.
    for labels in (_host_labels(getattr(learn.dls, 'train', None)), _host_labels(getattr(learn.dls, 'valid', None))):
        if labels is None or not len(labels): continue
        low, high = int(labels.min()), int(labels.max())  # sync-ok: host labels, once per run
        if low < 0 or high >= n_out:
            raise ValueError(f"The targets range over [{low}, {high}] but the model has n_out={n_out} outputs: "
                             f"build the model with n_out={high + 1}, or fix the labels.")


def _host_labels(dl):
    """The integer class labels of a loader's dataset when they are on the host (a TensorDataset's last tensor,
    or a torchvision-style `targets`), else None: reading them costs no device sync."""
    ds = getattr(dl, 'dataset', None)
    labels = ds.tensors[-1] if isinstance(ds, TensorDataset) else getattr(ds, 'targets', None)
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], int): labels = torch.tensor(labels)
    if (not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point()
            or labels.device.type != 'cpu'):
        return None
    return labels


def empty_loader_message(dl):
    "Why a training loader yields no batches, and what to change."
    n = getattr(dl, 'n', None)
    if n is None and hasattr(dl, 'dataset'):
        try: n = len(dl.dataset)
        except TypeError: n = None
    bs, drop_last = getattr(dl, 'bs', getattr(dl, 'batch_size', None)), getattr(dl, 'drop_last', None)
    return (f"The training loader yields no batches ({n} items, batch size {bs}, drop_last={drop_last}). "
            "Use more training data, a smaller bs, or drop_last=False.")


def loss_error(e, learn):
    "A ValueError that names the loss, the shapes and dtypes it got, and the likely fix."
    pred, targ = learn.pred, learn.yb[0]
    name = getattr(learn.loss_func, '__name__', type(learn.loss_func).__name__)
    desc = (f"pred of shape {tuple(pred.shape)} ({pred.dtype}) and target of shape "
            f"{tuple(getattr(targ, 'shape', ()))} ({getattr(targ, 'dtype', type(targ).__name__)})")
    hint = ''
    if isinstance(targ, torch.Tensor) and isinstance(pred, torch.Tensor):
        if pred.shape[0] != targ.shape[0]:
            hint = "The batch sizes differ: does the model flatten or reshape the batch dimension away?"
        elif targ.is_floating_point() and pred.ndim == targ.ndim + 1:
            hint = ("The targets are floats where class indices are expected: convert them with .long() "
                    "(or use a regression loss such as nn.MSELoss).")
        elif not targ.is_floating_point() and pred.ndim >= 2 and targ.numel():
            n_out, t_max, t_min = pred.shape[1], int(targ.max()), int(targ.min())  # sync-ok: error path only
            if t_max >= n_out or t_min < 0:
                hint = (f"The targets range over [{t_min}, {t_max}] but the model has n_out={n_out} outputs: "
                        f"build the model with n_out={t_max + 1} (dls.c), or fix the labels.")
            elif pred.ndim > targ.ndim + 1:
                hint = ("The model's output has extra dimensions: end it with Flatten() (as simple_cnn does) "
                        "so it returns (batch, n_classes).")
    return ValueError(f"loss_func {name} failed on {desc}: {str(e).rstrip('.')}. {hint}".rstrip())
