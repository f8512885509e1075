"""Item transforms (run once per image at decode time; the result is cached) and batch transforms (run on
every batch, on the batch's device, with per-item random parameters and no host sync).

A random item transform such as `RandomResizedCrop` is split in two: its deterministic part (resize to the
target size) runs at decode time, and its random part (crop and zoom) runs per training batch on the device,
so the cache holds one fixed-size uint8 image per item.

Batch transforms are called as `tfm(x, train)` on a float (N, C, H, W) batch in [0, 1]; augmentations act only
when `train` is true. They run sorted by `order` (augmentations first, `Normalize` last) and each has a
`decode` so that `show_batch` can show the real images.

Every transform has `to_spec()`, its name and arguments as plain values (see `specs.py`), so that an export can
rebuild what it does outside training without pickling code.
"""
import math

import torch
import torch.nn.functional as F

from ..torch_core import listify
from .specs import Specified, register_transform

__all__ = ['ItemTransform', 'Resize', 'CenterCrop', 'RandomResizedCrop',
           'BatchTransform', 'Augmentation', 'Normalize', 'Flip', 'Rotate', 'Brightness', 'Contrast', 'RandomCrop',
           'aug_transforms', 'check_item_tfms']


def _pair(size):
    if isinstance(size, int): return (size, size)
    h, w = size
    return (int(h), int(w))


# ----------------------------------------------------------------------------------------------- item transforms
class ItemTransform(Specified):
    "Base of item transforms: `prepare(img)` maps one uint8 (C, H, W) image to another, deterministically."
    batch_part = None  # a training-only BatchTransform holding the random rest, if any

    def prepare(self, img): raise NotImplementedError


@register_transform
class Resize(ItemTransform):
    """Bring every image to `size` (int or (h, w)). `method='crop'` scales the short side to fit and crops the
    centre, 'pad' scales the long side to fit and pads with zeros, 'squish' stretches. Unlike fastai, 'crop'
    is the centre crop in training too, because its result is cached."""
    def __init__(self, size, method='crop'):
        if method not in ('crop', 'pad', 'squish'):
            raise ValueError(f"Resize(method={method!r}): use 'crop', 'pad' or 'squish'")
        self.size, self.method = _pair(size), method

    def prepare(self, img):
        from torchvision.transforms.v2.functional import center_crop, resize
        (h, w), (H, W) = self.size, img.shape[-2:]
        if (H, W) == (h, w): return img
        if self.method == 'squish': return resize(img, [h, w], antialias=True)
        scale = (max if self.method == 'crop' else min)(h / H, w / W)
        img = resize(img, [max(1, round(H * scale)), max(1, round(W * scale))], antialias=True)
        return center_crop(img, [h, w])  # crops the overhang, or pads with zeros around a smaller image

    def __repr__(self): return f"Resize({self.size}, method={self.method!r})"


@register_transform
class CenterCrop(ItemTransform):
    "Crop the centre `size` (int or (h, w)) of each image, padding with zeros where the image is smaller."
    def __init__(self, size): self.size = _pair(size)

    def prepare(self, img):
        from torchvision.transforms.v2.functional import center_crop
        return center_crop(img, list(self.size))


class RandomResizedCrop(ItemTransform):
    """In training, crop a random part of each image covering `min_scale` to all of its area, with aspect ratio
    in `ratio`, and zoom it back to `size`; in validation, show the whole centre-cropped image.

    The image is cached at `size` (short side scaled, centre cropped); the random crop and zoom run per
    training batch on the device, so they resample the cached image rather than the original file."""
    def __init__(self, size, min_scale=0.08, ratio=(3 / 4, 4 / 3)):
        if not 0 < min_scale <= 1: raise ValueError(f"RandomResizedCrop(min_scale={min_scale}): use 0 < min_scale <= 1")
        self.size, self.min_scale, self.ratio = _pair(size), min_scale, ratio
        self._resize = Resize(size, 'crop')
        self.batch_part = _RandomZoomCrop(min_scale, ratio)

    def prepare(self, img): return self._resize.prepare(img)

    def to_spec(self):
        "What it does outside training, which is all a prediction needs: `Resize(size, 'crop')`."
        return self._resize.to_spec()

    def __repr__(self): return f"RandomResizedCrop({self.size}, min_scale={self.min_scale})"


# ---------------------------------------------------------------------------------------------- batch transforms
class BatchTransform(Specified):
    "Base of batch transforms: `tfm(x, train)` maps a float (N, C, H, W) batch; `decode` undoes what can be undone."
    order = 50

    @property
    def acts_in_validation(self) -> bool:
        "Whether `tfm(x, train=False)` changes x: an export keeps only these (Normalize, RandomCrop's centre crop)."
        return True

    def __call__(self, x, train=True): raise NotImplementedError

    def decode(self, x): return x


class Augmentation(BatchTransform):
    "A random batch transform that acts in training only; `p` is the chance that each item is changed."
    order = 30

    def __call__(self, x, train=True): return self.augment(x) if train else x

    @property
    def acts_in_validation(self) -> bool:
        # A subclass that overrides __call__ may act in validation too: such a one is exported, not dropped.
        return type(self).__call__ is not Augmentation.__call__

    def augment(self, x): raise NotImplementedError


def _chosen(x, p):
    "A (N,) float mask on x's device: 1 for the items an augmentation with probability p changes."
    return (torch.rand(x.shape[0], device=x.device) < p).to(x.dtype)


def _uniform(x, lo, hi):
    return torch.rand(x.shape[0], device=x.device, dtype=x.dtype) * (hi - lo) + lo


def _warp(x, theta):
    "Resample each image of x through its own 2x3 affine matrix (normalised coordinates, output -> input)."
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


class _RandomZoomCrop(Augmentation):
    "The per-batch part of RandomResizedCrop: a random crop of each item, zoomed back to the batch size."
    order = 10

    def __init__(self, min_scale, ratio): self.min_scale, self.ratio = min_scale, ratio

    def augment(self, x):
        area = _uniform(x, self.min_scale, 1.)
        ratio = _uniform(x, math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
        wf, hf = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        cx, cy = _uniform(x, -1, 1) * (1 - wf), _uniform(x, -1, 1) * (1 - hf)
        zero = torch.zeros_like(wf)
        return _warp(x, torch.stack([wf, zero, cx, zero, hf, cy], 1).view(-1, 2, 3))


@register_transform
class Flip(Augmentation):
    "Flip each item left-right with probability `p`."
    def __init__(self, p=0.5): self.p = p

    def augment(self, x): return torch.where(_chosen(x, self.p).view(-1, 1, 1, 1) > 0, x.flip(-1), x)


@register_transform
class Rotate(Augmentation):
    "Rotate each item, with probability `p`, by a random angle within ±`max_deg` degrees (reflection padding)."
    def __init__(self, max_deg=10., p=0.75): self.max_deg, self.p = max_deg, p

    def augment(self, x):
        angle = _uniform(x, -1, 1) * (self.max_deg * math.pi / 180) * _chosen(x, self.p)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        h, w = x.shape[-2:]
        # A rotation in pixels, expressed in affine_grid's [-1, 1] coordinates (which stretch non-square images).
        theta = torch.stack([cos, -sin * (h / w), zero, sin * (w / h), cos, zero], 1).view(-1, 2, 3)
        return _warp(x, theta)


@register_transform
class Brightness(Augmentation):
    "Shift each item's brightness, with probability `p`, by up to ±`max_lighting` (on the [0, 1] scale)."
    def __init__(self, max_lighting=0.2, p=0.75): self.max_lighting, self.p = max_lighting, p

    def augment(self, x):
        shift = _uniform(x, -self.max_lighting, self.max_lighting) * _chosen(x, self.p)
        return (x + shift.view(-1, 1, 1, 1)).clamp_(0, 1)


@register_transform
class Contrast(Augmentation):
    "Scale each item's contrast about its mean, with probability `p`, by a factor in [1-max_lighting, 1/(1-max_lighting)]."
    def __init__(self, max_lighting=0.2, p=0.75):
        if not 0 <= max_lighting < 1: raise ValueError(f"Contrast(max_lighting={max_lighting}): use 0 <= max_lighting < 1")
        self.max_lighting, self.p = max_lighting, p

    def augment(self, x):
        bound = -math.log(1 - self.max_lighting)
        scale = (_uniform(x, -bound, bound) * _chosen(x, self.p)).exp().view(-1, 1, 1, 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        return ((x - mean) * scale + mean).clamp_(0, 1)


@register_transform
class RandomCrop(BatchTransform):
    """Pad each item with `padding` zeros and crop `size` (int or (h, w)) from it: at a random place per item
    in training, from the centre in validation (so both loaders give the same size)."""
    order = 20

    def __init__(self, size, padding=0): self.size, self.padding = _pair(size), padding

    def __call__(self, x, train=True):
        if self.padding: x = F.pad(x, [self.padding] * 4)
        n, c, H, W = x.shape
        h, w = self.size
        if h > H or w > W:
            raise ValueError(f"RandomCrop({self.size}, padding={self.padding}) is larger than the padded batch ({H}x{W})")
        if not train:
            return x if (h, w) == (H, W) else x[..., (H - h) // 2:(H - h) // 2 + h, (W - w) // 2:(W - w) // 2 + w]
        top = torch.randint(0, H - h + 1, (n, 1), device=x.device) + torch.arange(h, device=x.device)
        left = torch.randint(0, W - w + 1, (n, 1), device=x.device) + torch.arange(w, device=x.device)
        x = x.gather(2, top[:, None, :, None].expand(n, c, h, W))
        return x.gather(3, left[:, None, None, :].expand(n, c, h, w))


@register_transform
class Normalize(BatchTransform):
    """Subtract the per-channel `mean` and divide by `std`, in training and validation.

    `Normalize()` with no statistics computes them from one training batch when the DataLoaders are built,
    as fastai does; `Normalize.from_stats(mean, std)` takes them explicitly. `.mean` and `.std` are (C,)
    tensors (a single value applies to every channel)."""
    order = 99

    def __init__(self, mean=None, std=None):
        if (mean is None) != (std is None):
            raise ValueError("Normalize needs both mean and std, or neither (then it computes them from a training batch)")
        self._on = {}
        self.mean, self.std = mean, std

    @classmethod
    def from_stats(cls, mean, std):
        "A Normalize with fixed per-channel statistics (sequences, tensors or floats)."
        return cls(mean, std)

    @property
    def mean(self): return self._mean

    @mean.setter
    def mean(self, v): self._mean, self._on = None if v is None else torch.as_tensor(v, dtype=torch.float32).flatten(), {}

    @property
    def std(self): return self._std

    @std.setter
    def std(self, v): self._std, self._on = None if v is None else torch.as_tensor(v, dtype=torch.float32).flatten(), {}

    def setup(self, dl):
        "Compute the statistics from one (un-augmented) training batch of `dl`, unless they were given."
        if self._mean is not None: return
        x = dl.sample_batch()
        self.mean, self.std = x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp_min(1e-7)

    def _stats(self, x):
        key = (x.device, x.dtype, x.shape[1])
        if key not in self._on:  # once per device, dtype and channel count: no per-batch copies
            if self._mean is None:
                raise RuntimeError("Normalize() has no statistics yet: build the DataLoaders with it (they compute "
                                   "them from one training batch) or use Normalize.from_stats(mean, std)")
            if len(self._mean) not in (1, x.shape[1]):
                raise ValueError(f"Normalize has statistics for {len(self._mean)} channels but the batch has "
                                 f"{x.shape[1]}; use stats that match the image block (PILImage or PILImageBW)")
            self._on[key] = (self._mean.to(x.device, x.dtype).view(1, -1, 1, 1),
                             self._std.to(x.device, x.dtype).view(1, -1, 1, 1))
        return self._on[key]

    def __call__(self, x, train=True):
        mean, std = self._stats(x)
        return (x - mean) / std

    def decode(self, x):
        mean, std = self._stats(x)
        return x * std + mean

    def __repr__(self): return f"Normalize(mean={self._mean}, std={self._std})"


def check_item_tfms(tfms):
    "Return the item transforms as a list, rejecting anything that is not one."
    tfms = listify(tfms)
    for t in tfms:
        if isinstance(t, BatchTransform): raise TypeError(f"{t!r} is a batch transform: pass it in batch_tfms, not item_tfms")
        if not isinstance(t, ItemTransform):
            raise TypeError(f"item_tfms takes learnkit item transforms (Resize, CenterCrop, RandomResizedCrop), got {t!r}")
    return tfms


def aug_transforms(do_flip=True, max_rotate=10., max_lighting=0.2, p_affine=0.75, p_lighting=0.75):
    "fastai's default augmentations, minus warp and zoom: flip, rotate, brightness and contrast."
    tfms = [Flip()] if do_flip else []
    if max_rotate: tfms.append(Rotate(max_rotate, p=p_affine))
    if max_lighting: tfms += [Brightness(max_lighting, p=p_lighting), Contrast(max_lighting, p=p_lighting)]
    return tfms
