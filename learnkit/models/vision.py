"""Transfer-learning models the fastai way: a pretrained network's body, cut before its pooling, and a new head.

`create_vision_model(arch, n_out)` builds `nn.Sequential(body, head)` from a torchvision architecture (its function,
as `torchvision.models.resnet34`, or its name) or a learnkit one (`learnkit.models.resnet18`). The head is
fastai's: concat pooling (average and max), Flatten, then BatchNorm1d, Dropout, Linear blocks. `body_head_split`
gives the two parameter groups that `Learner.freeze` and discriminative learning rates work on. When the arch and
`cut` are plain data, the model carries a `learnkit_spec` (see `register_model`), so `load_learner` rebuilds it
by name without any pretrained file.
"""
import functools
import inspect
import re

import torch
from torch import nn

from .layers import Flatten, init_cnn
from .pretrained import adapt_first_conv, first_conv, load_matching, read_state_dict, torchvision_state, weights_file
from .registry import MODELS, get_model, register_model
from .torchvision_models import _NO_AUX, _check_name

__all__ = ['IMAGENET_STATS', 'AdaptiveConcatPool2d', 'create_head', 'create_body', 'body_head_split', 'vision_model',
           'create_vision_model']

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
"The per-channel (mean, std) of ImageNet, which torchvision's pretrained models expect their inputs normalised by."

# torchvision models that pool in `forward` rather than in a module: the body is every child but the classifier.
_FUNCTIONAL_POOL = ('densenet', 'shufflenet', 'mnasnet', 'mobilenet_v2')


class AdaptiveConcatPool2d(nn.Module):
    "Adaptive max pooling and adaptive average pooling to `size`, concatenated along the channels (max first, as fastai)."
    def __init__(self, size: int = 1):
        super().__init__()
        self.size = size
        self.ap, self.mp = nn.AdaptiveAvgPool2d(size), nn.AdaptiveMaxPool2d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor: return torch.cat([self.mp(x), self.ap(x)], 1)


def create_head(nf: int, n_out: int, lin_ftrs: list[int] | None = None, ps: float | list[float] = 0.5,
                concat_pool: bool = True) -> nn.Sequential:
    """fastai's head for `nf` feature maps and `n_out` outputs.

    Pooling (`AdaptiveConcatPool2d`, which doubles the features, or average pooling), Flatten, then for each
    step of `[features, *lin_ftrs, n_out]` (lin_ftrs default [512]): BatchNorm1d, Dropout, Linear without bias,
    with ReLU between. `ps` is one dropout probability per Linear, or one number: the last dropout gets it and
    the others half of it (fastai's default: 0.25, then 0.5). Kaiming-normal init for the Linear layers.
    """
    if concat_pool: nf *= 2
    sizes = [nf, *([512] if lin_ftrs is None else lin_ftrs), n_out]
    ps = list(ps) if isinstance(ps, (list, tuple)) else [ps / 2] * (len(sizes) - 2) + [ps]
    if len(ps) != len(sizes) - 1:
        raise ValueError(f"create_head: ps has {len(ps)} dropout probabilities for {len(sizes) - 1} Linear layers "
                         f"(lin_ftrs={lin_ftrs}); pass one number or {len(sizes) - 1} of them")
    layers = [AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1), Flatten()]
    for i, (ni, no, p) in enumerate(zip(sizes[:-1], sizes[1:], ps)):
        layers += [nn.BatchNorm1d(ni)] + ([nn.Dropout(p)] if p else []) + [nn.Linear(ni, no, bias=False)]
        if i < len(sizes) - 2: layers.append(nn.ReLU())  # not in place, as in every learnkit model: hooks see the Linear's output
    return init_cnn(nn.Sequential(*layers))


def _has_pool(m: nn.Module) -> bool:
    "Whether `m` is or contains a pooling layer (a class named ...Pool1d/2d/3d, as fastai tests)."
    return any(re.search(r'Pool[123]d$', type(l).__name__) for l in m.modules())


def create_body(model: nn.Module, cut=None, name: str | None = None) -> nn.Sequential:
    """The body of `model`: its children before the last one that pools (fastai's rule), or before its classifier
    for torchvision models that pool in `forward` (DenseNet, ShuffleNet, MnasNet, MobileNetV2). `cut` overrides:
    an int keeps `children[:cut]`, a function maps the model to its body."""
    if callable(cut): return cut(model)
    children = list(model.named_children())
    if cut is None and name is not None and name.startswith(_FUNCTIONAL_POOL): cut = -1
    if cut is None:
        cut = next((i for i in reversed(range(len(children))) if _has_pool(children[i][1])), 0)
        if cut == 0:
            raise ValueError(f"Found no pooling layer to cut {name or type(model).__name__} before, among its children "
                             f"{[n for n, _ in children]}: pass cut=<the number of children to keep> or "
                             "cut=<a function that returns the body>")
    if not isinstance(cut, int): raise TypeError(f"cut must be an int, a function or None; got {cut!r}")
    return nn.Sequential(*[m for _, m in children[:cut]])


def _n_features(body: nn.Module, n_in: int, label: str) -> int:
    "The channels of the body's output, from a forward pass on a small blank batch (64x64, then 224x224)."
    was_training = body.training
    body.eval()
    try:
        for size in (64, 224):
            try:
                with torch.no_grad(): out = body(torch.zeros(2, n_in, size, size))
                break
            except RuntimeError as e:
                if size == 224:
                    raise ValueError(f"The body cut from {label} fails on a (2, {n_in}, 224, 224) input ({e}); "
                                     "choose another cut=") from e
    finally: body.train(was_training)
    if out.ndim != 4:
        raise ValueError(f"The body cut from {label} returns shape {tuple(out.shape)}, not feature maps "
                         "(N, C, H, W), so a pooling head cannot follow it; choose another cut=")
    return out.shape[1]


def body_head_split(model: nn.Sequential) -> list[list[nn.Parameter]]:
    "Two parameter groups, fastai's default split: the body `model[0]` and the head `model[1:]`."
    return [list(model[0].parameters()), list(model[1:].parameters())]


def _arch_builder(arch):
    """(label, torchvision name or None, build) for an arch given as data: a torchvision model's name, or a learnkit
    registry spec {'name': ..., 'kwargs': {...}}; or as any function returning a module. `build(in_ch)` makes the
    whole network with random weights, taking `in_ch` channels when the constructor has an `in_ch` argument."""
    if isinstance(arch, str):
        _check_name(arch)
        from torchvision import models
        return arch, arch, lambda in_ch: models.get_model(arch, weights=None, **_NO_AUX.get(arch, {}))
    if isinstance(arch, dict):
        name, kwargs = arch['name'], dict(arch.get('kwargs', {}))
        takes_in_ch = name in MODELS and 'in_ch' in inspect.signature(MODELS[name]).parameters
        return name, None, lambda in_ch: get_model(name, **kwargs, **({'in_ch': in_ch} if takes_in_ch else {}))
    if callable(arch):
        label = getattr(arch, '__name__', repr(arch))

        def build(in_ch):
            model = arch()
            if not isinstance(model, nn.Module):
                raise TypeError(f"arch {label} returned {type(model).__name__}; it must build an nn.Module")
            return model
        return label, None, build
    raise TypeError(f"arch must be a model function (torchvision.models.resnet34, learnkit.models.resnet18...) or "
                    f"a torchvision model's name; got {arch!r}")


def _check_body_loaded(model: nn.Module, body: nn.Module, loaded: set[str], state, source, label: str) -> None:
    "Raise when some weight of the body did not come from the file: the file is for another architecture or size."
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    body_names = [names[id(t)] for t in body.state_dict(keep_vars=True).values() if id(t) in names]
    missing = [k for k in body_names if k not in loaded and not k.endswith('num_batches_tracked')]
    if not missing: return
    shapes = model.state_dict()
    detail = ', '.join(f"{k} {tuple(state[k].shape) if k in state else 'absent'} in the file, "
                       f"{tuple(shapes[k].shape)} in the model" for k in missing[:3])
    raise ValueError(f"{source} does not fit {label}'s body: {len(missing)} of its weights are missing or have "
                     f"other shapes ({detail}). Is it a state_dict of {label}, built the same way?")


def _load_pretrained(model: nn.Module, weights, tv_name: str | None, label: str):
    """Load the file `weights` stands for into `model`, its stem first given the file's channels. Returns what
    `_check_body_loaded` needs: the names loaded, the file's state_dict and the file."""
    if weights is None and tv_name is None:
        raise ValueError(f"{label} has no published pretrained weights: pass weights='file.pth' (a state_dict of "
                         f"{label}, saved with torch.save(model.state_dict(), ...)) or pretrained=False")
    source = weights_file('DEFAULT' if weights is None else weights, tv_name)
    state = read_state_dict(source, 'vision_learner')
    if tv_name is not None: state = torchvision_state(tv_name, state)
    stem_key = first_conv(model)[0] + '.weight'
    if stem_key in state: adapt_first_conv(model, state[stem_key].shape[1], pretrained=False)  # the file's channels
    return load_matching(model, state, source, 'vision_learner'), state, source


def _vision_model(arch, n_out, n_in=3, pretrained=False, weights=None, cut=None, concat_pool=True, lin_ftrs=None,
                  ps=0.5):
    if weights is not None and not pretrained:
        raise ValueError(f"pretrained=False but weights={weights!r}: pass pretrained=True to start from those "
                         "weights, or weights=None for random ones")
    label, tv_name, build = _arch_builder(arch)
    model = build(n_in)
    loaded = _load_pretrained(model, weights, tv_name, label) if pretrained else None
    adapt_first_conv(model, n_in, pretrained=pretrained)
    body = create_body(model, cut, tv_name)
    if loaded is not None: _check_body_loaded(model, body, *loaded, label)
    head = create_head(_n_features(body, n_in, label), n_out, lin_ftrs, ps, concat_pool)
    return nn.Sequential(body, head)


@register_model(rebuilt_without=('pretrained', 'weights'))
def vision_model(arch: str | dict, n_out: int, n_in: int = 3, pretrained: bool = False, weights=None,
                 cut: int | None = None, concat_pool: bool = True, lin_ftrs: list[int] | None = None,
                 ps: float | list[float] = 0.5) -> nn.Sequential:
    """`nn.Sequential(body, head)` for an arch given as data: a torchvision model's name ('resnet34') or a learnkit
    registry spec ({'name': 'resnet18', 'kwargs': {...}}); see `create_vision_model`. Its `learnkit_spec` records
    pretrained=False and weights=None: an exported model brings its own weights."""
    return _vision_model(arch, n_out, n_in, pretrained, weights, cut, concat_pool, lin_ftrs, ps)


def _as_data(arch):
    "A torchvision model function as its name, a learnkit registered constructor (or a partial of one) as its spec."
    fn, kwargs = (arch.func, arch.keywords) if isinstance(arch, functools.partial) and not arch.args else (arch, {})
    name = getattr(fn, '__name__', None)
    if name is not None and MODELS.get(name) is fn: return {'name': name, 'kwargs': dict(kwargs)}
    if getattr(fn, '__module__', '').startswith('torchvision.models'):
        if {'weights', 'pretrained'} & set(kwargs):   # torchvision would download them
            raise ValueError(f"Pass the weights to vision_learner(weights=...), not to torchvision's {name}: learnkit "
                             "reads them from a local file or torch's hub cache and never downloads")
        from torchvision import models
        if not kwargs and name in models.list_models(module=models): return name
    return arch


def create_vision_model(arch, n_out: int, n_in: int = 3, pretrained: bool = True, weights=None, cut=None,
                        concat_pool: bool = True, lin_ftrs: list[int] | None = None,
                        ps: float | list[float] = 0.5) -> nn.Sequential:
    """`nn.Sequential(body, head)`: the body of `arch` (see `create_body`) taking `n_in` channels, then
    `create_head(features, n_out, lin_ftrs, ps, concat_pool)`.

    `arch`: a torchvision model function or name (`torchvision.models.resnet34`, 'efficientnet_b0'), a learnkit
    model constructor (`learnkit.models.resnet18`, or a `functools.partial` of one), or any function returning a
    CNN. Weights come from this machine only (see `learnkit.models.pretrained`): `weights` is the path of a
    state_dict file of that architecture (any classifier in it is ignored), or a torchvision weights name or enum
    whose file is in torch's hub cache; `pretrained=True` with `weights=None` means torchvision's 'DEFAULT'
    weights. When the stem was trained on 3 channels and `n_in` is 1, its filters are summed, as fastai does.
    The model is rebuildable by `load_learner` when the arch is a torchvision or learnkit one and `cut` is None
    or an int.
    """
    arch = _as_data(arch)
    make = vision_model if isinstance(arch, (str, dict)) and not callable(cut) else _vision_model
    return make(arch, n_out, n_in, pretrained, weights, cut, concat_pool, lin_ftrs, ps)
