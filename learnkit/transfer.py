"""Transfer learning, fastai's way: `vision_learner`, freezing parameter groups, and `fine_tune`.

`vision_learner` builds an ordinary Learner around `create_vision_model` (a pretrained body and a new head) with the
body/head splitter, adds ImageNet's normalisation to the loaders, and freezes the body. `freeze_to`, `fine_tune`
are what `Learner.freeze_to/freeze/unfreeze/fine_tune` delegate to.

Freezing, as in fastai: the parameters of the frozen groups get `requires_grad=False`, so they get no gradient and
torch's optimizers skip them (weight decay included); with `train_bn=True` the normalisation layers' weights and
biases in frozen groups keep training. Their running statistics are updated in training mode either way, as in
fastai (its `BnFreeze` callback stops that). Every `freeze_to` starts the optimizer afresh, as fastai's
`clear_state` does, over every parameter of the splitter's groups, so that unfreezing later trains them all.
"""
from torch import nn

from .learner import Learner
from .models.batchnorm import BatchNorm
from .models.vision import IMAGENET_STATS, body_head_split, create_vision_model

__all__ = ['vision_learner', 'freeze_to', 'fine_tune', 'norm_types', 'add_imagenet_normalize']

norm_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
              nn.LayerNorm, BatchNorm)
"The normalisation layers whose parameters keep training in frozen groups when `train_bn=True` (fastai's list)."


def vision_learner(dls, arch, n_out=None, pretrained=True, weights=None, loss_func=None, metrics=None, cut=None,
                   concat_pool=True, lin_ftrs=None, ps=0.5, train_bn=True, normalize=True, n_in=None, splitter=None,
                   **learner_kwargs):
    """A Learner for transfer learning: `create_vision_model(arch, ...)` (body of `arch`, fastai's head), split into
    (body, head) parameter groups, and frozen but for the head when `pretrained`.

    `arch`: a torchvision model function or name (`torchvision.models.resnet34`, 'efficientnet_b0'), or a learnkit
    one (`learnkit.models.resnet18`). Weights never download: `weights` is a local state_dict file, or a
    torchvision weights name/enum whose file is in torch's hub cache; `pretrained=True` alone means torchvision's
    default weights, from that cache (see `learnkit.models.pretrained`). `n_out` defaults to `dls.c` and `n_in` to
    the channels of the data's batches; a 3-channel pretrained stem takes 1-channel data by summing its filters.
    With `pretrained` and `normalize`, a `Normalize` with ImageNet's statistics joins the loaders' batch
    transforms unless they have one (fastai's rule; for 1-channel data, the mean of the three channels' statistics).
    `cut`, `concat_pool`, `lin_ftrs`, `ps`: see `create_body` and `create_head`. `train_bn`: see `freeze_to`.
    Other keyword arguments go to `Learner` (lr, opt_func, cbs, wd, path...).
    """
    if n_out is None: n_out = _n_classes(dls)
    if n_in is None: n_in = _n_channels(dls)
    model = create_vision_model(arch, n_out, n_in=n_in, pretrained=pretrained, weights=weights, cut=cut,
                                concat_pool=concat_pool, lin_ftrs=lin_ftrs, ps=ps)
    learn = Learner(dls, model, loss_func=loss_func, metrics=metrics,
                    splitter=body_head_split if splitter is None else splitter, **learner_kwargs)
    learn.train_bn = train_bn
    if pretrained and normalize: add_imagenet_normalize(dls, n_in)   # last: a call that fails leaves dls as it was
    if pretrained: learn.freeze()
    return learn


def _n_classes(dls):
    c = getattr(dls, 'c', None)   # learnkit's DataLoaders have a c when they have a vocab
    if c is None:
        raise ValueError("vision_learner: n_out is not given and the loaders have no vocab (dls.c) to tell the number "
                         "of classes: pass n_out=<number of outputs>")
    return c


def _n_channels(dls):
    "The channels of the data's images, from one training batch (cached images: no decoding beyond that batch)."
    xb = dls.one_batch()[0] if hasattr(dls, 'one_batch') else next(iter(dls.train))[0]
    if xb.ndim != 4:
        raise ValueError(f"vision_learner takes image batches (N, C, H, W); the training loader gives shape "
                         f"{tuple(xb.shape)}")
    return xb.shape[1]


def add_imagenet_normalize(dls, n_in):
    """Add `Normalize` with ImageNet's statistics to both loaders' batch transforms, unless they have a Normalize
    already (fastai's rule: yours is kept). 1-channel data gets the mean of the three channels' statistics."""
    from .data.loaders import check_batch_tfms
    from .data.transforms import Normalize
    loaders = (dls.train, dls.valid)
    if not all(hasattr(dl, 'batch_tfms') for dl in loaders if dl is not None):
        raise ValueError("vision_learner(pretrained=True, normalize=True) adds ImageNet's Normalize to learnkit "
                         "loaders' batch transforms, and these are plain torch DataLoaders: normalise the images "
                         "with learnkit.models.IMAGENET_STATS yourself and pass normalize=False")
    if any(isinstance(t, Normalize) for dl in loaders if dl is not None for t in dl.batch_tfms): return
    mean, std = IMAGENET_STATS
    if n_in == 1: mean, std = [sum(mean) / 3], [sum(std) / 3]
    elif n_in != 3:
        raise ValueError(f"vision_learner: ImageNet's statistics are for 3-channel (or grey) images, and the data has "
                         f"{n_in} channels: add your own Normalize to the loaders' batch_tfms, or pass normalize=False")
    norm = Normalize.from_stats(mean, std)
    for dl in loaders:
        if dl is not None: dl.batch_tfms = check_batch_tfms(dl.batch_tfms + [norm])


def freeze_to(learn, n):
    """Freeze the parameter groups before group `n` of `learn.splitter` (`n=-1`: all but the last; 0: none).

    Their parameters get `requires_grad=False`, except normalisation layers' when `learn.train_bn` (True unless
    vision_learner was told otherwise, as in fastai). The optimizer starts afresh over every parameter of every
    group, as fastai's `clear_state`; frozen ones have no gradient, so it leaves them exactly as they are."""
    if learn.splitter is None:
        raise ValueError("freeze needs parameter groups, and this Learner has no splitter: build it with "
                         "vision_learner, or Learner(..., splitter=f) where f(model) returns lists of parameters")
    groups = [list(g) for g in learn.splitter(learn.model)]
    n_groups = len(groups)
    if n_groups == 1 and n != 0:
        raise ValueError(f"freeze_to({n}): the splitter gives one parameter group, so freezing it would leave nothing "
                         "to train; pass a splitter that separates the body from the head (vision_learner does)")
    k = n if n >= 0 else n_groups + n
    if not 0 <= k < n_groups or (n != 0 and k == 0):
        raise ValueError(f"freeze_to({n}) would freeze {'every group' if k >= n_groups else 'no group'} of the "
                         f"{n_groups}: pass 1 to {n_groups - 1} (-1: all but the last group), or 0 to unfreeze")
    for g in groups:
        for p in g: p.requires_grad_(True)
    # On the learner's device first, so that Adam picks its fused CUDA kernel as it does when fit creates it.
    learn.model.to(learn.device)
    learn.create_opt()  # over every parameter while all are trainable: OptimWrapper drops frozen ones
    train_bn = getattr(learn, 'train_bn', True)
    keep = {id(p) for m in learn.model.modules() if isinstance(m, norm_types) for p in m.parameters()} if train_bn else set()
    for g in groups[:k]:
        for p in g:
            if id(p) not in keep: p.requires_grad_(False)
    learn.opt.zero_grad()
    # The health report then takes a layer without gradients for a freeze on purpose (a note, not a warning).
    learn.frozen_on_purpose = k > 0


def fine_tune(learn, epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5.0, **kwargs):
    """fastai's fine_tune: `freeze_epochs` of 1cycle with the body frozen (lr `slice(base_lr)`, pct_start 0.99),
    then `epochs` of 1cycle with everything trained at discriminative rates `slice(base_lr/2/lr_mult, base_lr/2)`
    (`pct_start`, `div`). Other keyword arguments go to both `fit_one_cycle` calls (wd, cbs, moms, div_final)."""
    if not isinstance(freeze_epochs, int) or freeze_epochs < 0:
        raise ValueError(f"fine_tune: freeze_epochs must be an int >= 0; got {freeze_epochs!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fine_tune: epochs must be a positive int; got {epochs!r}")
    learn.freeze()
    if freeze_epochs: learn.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99, **kwargs)
    base_lr /= 2
    learn.unfreeze()
    learn.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div, **kwargs)
