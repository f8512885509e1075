"""One item as the data holds it, made into a batch of one the way a loader makes its batches: for `predict`.

An item is what a user has at hand when they ask for a prediction: an image file's path, a PIL image, or an
image tensor as the data set stores it (uint8 0..255, or float in [0, 1]; (H, W) or (C, H, W)). It goes through
what the loader's batches went through: decoding with the source's item transforms (Resize...), scaling to
float, then the batch transforms without augmentation (Normalize...). `ItemPipeline` holds those steps; a
loader's and a loaded export's `prepare` are both one.
"""
import os

import torch

from .images import read_image
from .transforms import Normalize

__all__ = ['item_tensor', 'item_batch', 'to_float', 'mode_for', 'ItemPipeline']


def mode_for(channels):
    "The decoding mode that gives images of `channels` channels: 'L' for 1, 'RGB' for 3, else None."
    return {1: 'L', 3: 'RGB'}.get(channels)


def to_float(xb):
    "uint8 images scaled to float [0, 1]; float images as float32."
    return xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()


def item_tensor(item, mode=None, prep=()):
    """`item` (a path, a PIL image or an image tensor) as a (C, H, W) tensor: files and PIL images are decoded in
    `mode` ('L' or 'RGB'; None keeps a PIL image's own), tensors get a channel axis if they are (H, W), and all
    then go through the item transforms' `prepare` steps in `prep` (each leaves an image of its size as it is)."""
    if isinstance(item, (str, os.PathLike)):
        if not os.path.isfile(item): raise FileNotFoundError(f"predict: no image file at {os.fspath(item)!r}")
        return read_image(os.fspath(item), mode or 'RGB', prep)
    if isinstance(item, torch.Tensor):
        if item.ndim == 2: item = item[None]
        if item.ndim != 3:
            raise ValueError(f"an item is one image, (H, W) or (C, H, W); got shape {tuple(item.shape)}. For a "
                             f"batch, call learn.model on it, or learn.get_preds on a loader")
        img = item
        if mode is not None and img.shape[0] != len(mode):
            raise ValueError(f"predict got an image tensor with {img.shape[0]} channels, but the model takes {mode} "
                             f"images ({len(mode)} channel{'s' * (len(mode) > 1)}); pass the file's path or a PIL "
                             f"image, which are converted to {mode}, or a tensor of {len(mode)} channels")
    elif hasattr(item, 'convert') and hasattr(item, 'size'):  # a PIL image, without importing PIL for everyone
        from torchvision.transforms.v2.functional import pil_to_tensor
        img = pil_to_tensor(item.convert(mode) if mode else item)
    else:
        raise TypeError(f"predict takes an image file's path, a PIL image or an image tensor; got "
                        f"{type(item).__name__}")
    for t in prep: img = t.prepare(img)
    return img


def item_batch(x, batch_tfms, device):
    """The (C, H, W) item `x` as a float batch of one on `device`, through `batch_tfms` without augmentation.
    An input that a Normalize among them would normalise a second time is refused."""
    if x.is_floating_point() and any(isinstance(t, Normalize) for t in batch_tfms):
        low = float(x.min())  # sync-ok: one item, on request
        if low < 0:
            raise ValueError(f"predict got a float image with values down to {low:.3g}: it looks normalised already, "
                             "and predict normalises its input as the loaders do. Pass the image as the data holds "
                             "it (uint8 0..255 or float in [0, 1]; dls.valid.decode(xb) undoes Normalize on a batch)")
    xb = to_float(x[None].to(device))
    for t in batch_tfms: xb = t(xb, False)
    return xb


class ItemPipeline:
    """How one item becomes the model's input, exactly as a loader's validation batches are made: decode files
    and PIL images in `mode` ('L' or 'RGB'; None keeps a PIL image's own), apply the item transforms'
    `prepare`, scale to float, then the batch transforms with `train=False`.

    `to_spec()` writes it as plain values (the mode and each transform's name and arguments), keeping only
    the batch transforms that act in validation, for `learn.export`; `load_learner` rebuilds it."""
    def __init__(self, mode=None, item_tfms=(), batch_tfms=()):
        if mode not in (None, 'L', 'RGB'): raise ValueError(f"ItemPipeline(mode={mode!r}): use 'L', 'RGB' or None")
        self.mode, self.item_tfms, self.batch_tfms = mode, tuple(item_tfms), tuple(batch_tfms)

    def __call__(self, item, device='cpu'):
        "`item` (a path, a PIL image or an image tensor) as a float batch of one on `device`."
        return item_batch(item_tensor(item, self.mode, self.item_tfms), self.batch_tfms, device)

    def to_spec(self) -> dict:
        """`{'mode': ..., 'item_tfms': [spec...], 'batch_tfms': [spec...]}`; raises a TypeError naming any
        transform that cannot be written as a name and arguments (augmentations, a no-op here, are left out)."""
        return {'mode': self.mode, 'item_tfms': [t.to_spec() for t in self.item_tfms],
                'batch_tfms': [t.to_spec() for t in self.batch_tfms if t.acts_in_validation]}

    def __repr__(self):
        return f"ItemPipeline(mode={self.mode!r}, item_tfms={list(self.item_tfms)}, batch_tfms={list(self.batch_tfms)})"
