"""ClassificationInterpretation: which classes a trained classifier confuses, and the items it gets most wrong."""
import torch
import torch.nn.functional as F

__all__ = ['ClassificationInterpretation']


class ClassificationInterpretation:
    """Predictions of a classifier on a data set, ready to interpret. Build it with `from_learner(learn)`.

    `probs` (N, C) class probabilities, `targs` (N,) class indices, `losses` (N,) per-item losses, `inputs`
    the model inputs (or None), `vocab` the class names (or None: the indices), `decode` a function that turns
    a batch of inputs into images in [0, 1] for display (default: min-max scaling of each image).
    """
    def __init__(self, probs, targs, losses, inputs=None, vocab=None, decode=None):
        if probs.ndim != 2:
            raise ValueError(f"probs must be (items, classes); got shape {tuple(probs.shape)}. "
                             "ClassificationInterpretation is for single-label classifiers.")
        if targs.ndim != 1:
            raise ValueError(f"targets must be class indices (items,); got shape {tuple(targs.shape)}, multi-hot rows "
                             "of a multi-label learner: ClassificationInterpretation is for single-label classifiers")
        self.probs, self.targs, self.losses, self.inputs = probs, targs.long(), losses, inputs
        self.preds = probs.argmax(dim=1)
        self.vocab = list(vocab) if vocab is not None else list(range(probs.shape[1]))
        self.decode = decode

    @classmethod
    def from_learner(cls, learn, dl=None):
        """Run `learn` over `dl` (default: the validation loader) and keep inputs, probabilities, targets and
        per-item losses. The loss must accept `reduction='none'` (nn.CrossEntropyLoss, F.cross_entropy...)."""
        loss_func = learn.loss_func
        if hasattr(loss_func, 'reduction'):
            probs, targs, inputs, losses = learn.get_preds(dl=dl, with_input=True, with_loss=True)
        else:
            raw, targs, inputs = learn.get_preds(dl=dl, with_input=True, act=lambda p: p)
            try: losses = loss_func(raw, targs, reduction='none')
            except TypeError as e:
                raise TypeError(f"ClassificationInterpretation needs per-item losses, but loss_func {loss_func!r} "
                                f"takes no reduction='none' ({e}); use nn.CrossEntropyLoss() or F.cross_entropy") from e
            probs = F.softmax(raw, dim=1)
        source = dl if dl is not None else learn.dls.valid
        decode = getattr(source, 'decode', None)
        vocab = getattr(learn.dls, 'vocab', None)
        return cls(probs, targs, losses, inputs, vocab=vocab, decode=decode)

    @property
    def n_classes(self): return self.probs.shape[1]

    def confusion_matrix(self):
        "Counts (classes x classes) as a numpy array: row = actual class, column = predicted class."
        c = self.n_classes
        return torch.bincount(self.targs * c + self.preds, minlength=c * c).reshape(c, c).numpy()  # sync-ok: on request

    def plot_confusion_matrix(self, normalize=False, title='Confusion matrix', cmap='Blues', figsize=None, ax=None):
        "The confusion matrix as an image with the counts (or, with `normalize`, row fractions) written in."
        from .plots import fig_ax
        cm = self.confusion_matrix().astype(float)
        if normalize: cm = cm / cm.sum(axis=1, keepdims=True).clip(min=1)
        c = self.n_classes
        fig, ax = fig_ax(ax, figsize or (max(5, 0.6 * c + 2),) * 2)
        ax.imshow(cm, cmap=cmap)
        ax.set_xticks(range(c), [str(v) for v in self.vocab], rotation=90)
        ax.set_yticks(range(c), [str(v) for v in self.vocab])
        ax.set_xlabel('Predicted'); ax.set_ylabel('Actual'); ax.set_title(title)
        threshold = cm.max() / 2
        for i in range(c):
            for j in range(c):
                count = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"  # sync-ok: a numpy array
                ax.text(j, i, count, ha='center', va='center',
                        fontsize=8, color='white' if cm[i, j] > threshold else 'black')
        fig.tight_layout()
        return fig

    def most_confused(self, min_val=1):
        "`(actual, predicted, count)` for every pair of different classes confused at least `min_val` times, most first."
        cm = self.confusion_matrix()
        pairs = [(self.vocab[i], self.vocab[j], int(cm[i, j])) for i in range(self.n_classes)  # sync-ok: a numpy array
                 for j in range(self.n_classes) if i != j and cm[i, j] >= min_val]
        return sorted(pairs, key=lambda p: -p[2])

    def top_losses(self, k=None, largest=True):
        "`(losses, indices)` of the `k` items with the largest losses (`largest=False`: the smallest)."
        k = len(self.losses) if k is None else min(k, len(self.losses))
        return self.losses.topk(k, largest=largest)

    def plot_top_losses(self, k=9, largest=True, figsize=None):
        "The `k` worst-predicted items as images titled 'predicted / actual / loss / probability of actual'."
        if self.inputs is None: raise ValueError("No inputs kept: build the interpretation with from_learner")
        from ..data.show import show_images
        losses, idx = self.top_losses(k, largest)
        images = self._images(self.inputs[idx])
        titles = [f"{self.vocab[self.preds[i]]} / {self.vocab[self.targs[i]]}\n"
                  f"{losses[n].item():.2f} / {self.probs[i, self.targs[i]].item():.2f}"  # sync-ok: CPU tensors, a plot
                  for n, i in enumerate(idx.tolist())]  # sync-ok: CPU tensor, a plot
        return show_images(images, titles, max_n=len(titles), figsize=figsize)

    def _images(self, x):
        if self.decode is not None: return self.decode(x).cpu()  # sync-ok: a plot, on request
        flat = x.flatten(1)
        lo, hi = flat.min(1).values, flat.max(1).values
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (x - lo.view(shape)) / (hi - lo).clamp(min=1e-8).view(shape)
