"""Pretrained weights from this machine only: a local state_dict file, or torchvision's weights in torch's hub cache.

learnkit never downloads weights. A torchvision weights name or enum ('DEFAULT', 'IMAGENET1K_V1',
`ResNet18_Weights.IMAGENET1K_V1`) stands for the file torchvision would download; it is used when that file is in
`torch.hub.get_dir()/checkpoints/` (where torchvision caches it, under `$TORCH_HOME/hub`), and otherwise the error
names the file, its URL and the folder to put it in. Files are read with `torch.load(weights_only=True)` (or
safetensors), so loading them runs no code.
"""
import os
import pickle
import re
from os import PathLike
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = ['hub_checkpoints', 'torchvision_weights', 'weights_file', 'read_state_dict', 'load_matching',
           'first_conv', 'adapt_first_conv']


def hub_checkpoints() -> Path:
    "The folder where torch (and torchvision) keep downloaded weights: `torch.hub.get_dir()/checkpoints`."
    return Path(torch.hub.get_dir()) / 'checkpoints'


def torchvision_weights(name: str, weights):
    """The torchvision weights enum member that `weights` names for torchvision's model `name` (a member, 'DEFAULT',
    'IMAGENET1K_V1' or 'ResNet18_Weights.IMAGENET1K_V1'), or None when it names none."""
    from torchvision.models import WeightsEnum, get_model_weights, get_weight
    own = get_model_weights(name)
    if isinstance(weights, str):
        if weights in own.__members__: return own[weights]
        try: weights = get_weight(weights)
        except (ValueError, KeyError): return None
    if not isinstance(weights, WeightsEnum): return None
    if not isinstance(weights, own):
        raise ValueError(f"weights={weights} are the weights of another model; {name}'s are {', '.join(own.__members__)}")
    return weights


def _cached_file(weights) -> Path:
    "The hub-cache file of a torchvision weights enum member; raise naming it, its URL and its folder when absent."
    fname = os.path.basename(urlparse(weights.url).path)
    path = hub_checkpoints() / fname
    if not path.is_file():
        raise FileNotFoundError(
            f"The pretrained weights {weights} are not on this machine, and learnkit never downloads weights. Put "
            f"the file {fname} (from {weights.url}) in {path.parent}/ (torch's hub cache; set TORCH_HOME to move it), "
            f"or pass weights='path/to/{fname}', or pretrained=False to start from random weights.")
    return path


def weights_file(weights, torchvision_name: str | None = None) -> Path:
    """The local file that `weights` stands for: the path of a state_dict file, or, for torchvision's model
    `torchvision_name`, a weights name or enum member whose file is in the hub cache (see `hub_checkpoints`)."""
    if isinstance(weights, (str, PathLike)) and Path(weights).is_file(): return Path(weights)
    enum = torchvision_weights(torchvision_name, weights) if torchvision_name is not None else None
    if enum is not None: return _cached_file(enum)
    if isinstance(weights, (str, PathLike)):
        hint = ''
        if torchvision_name is not None:
            from torchvision.models import get_model_weights
            hint = (f", nor a name of {torchvision_name}'s torchvision weights "
                    f"({', '.join(get_model_weights(torchvision_name).__members__)})")
        raise FileNotFoundError(f"weights={os.fspath(weights)!r} is not a file (looked for {Path(weights).absolute()})"
                                f"{hint}. Pass the path of a state_dict saved with torch.save(model.state_dict(), ...).")
    raise TypeError(f"weights must be the path of a state_dict file or a torchvision weights name or enum; "
                    f"got {weights!r} ({type(weights).__name__})")


def read_state_dict(path: Path, who: str = 'weights') -> dict[str, torch.Tensor]:
    "The state_dict in `path` (.safetensors, or a torch.save file read with weights_only=True); `who` names the caller."
    path = Path(path)
    if path.suffix == '.safetensors':
        try: from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"{path} is a .safetensors file, which needs the safetensors package: "
                              "pip install 'learnkit[safetensors]' (or save the weights as .pt)") from e
        return load_file(str(path))
    try: state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{who}: {path} is not a weights-only state_dict (it holds pickled code, which learnkit "
                         f"does not run): save `model.state_dict()` with torch.save instead. ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{who}: {path} holds {keys}, not a state_dict (parameter name -> tensor); save the "
                         "model's state_dict itself, e.g. torch.save(checkpoint['state_dict'], path)")
    return state


# torchvision's DenseNet checkpoints name some layers 'norm.1', 'conv.2'...; torchvision renames them on load.
_DENSENET_OLD_KEY = re.compile(r'^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$')


def torchvision_state(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    "`state` with the key renames torchvision applies when it loads its own checkpoints of model `name`."
    if not name.startswith('densenet'): return state
    return {(f'{m[1]}{m[2]}' if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in state.items()}


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source, who: str = 'weights') -> set[str]:
    """Load every tensor of `state` whose name and shape `model` has, and return those names. The others (a
    classifier made for other classes) are left as they are, for the caller to check. Names that `model` lacks
    mean the file is for another architecture, and raise (auxiliary classifiers, which learnkit builds without,
    excepted)."""
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.split('.')[0].lower().startswith('aux')}
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{who}: {source} holds weights this {type(model).__name__} does not have, such as "
                         f"{unexpected[:5]} ({len(unexpected)} in all), and lacks some it has, such as "
                         f"{sorted(set(expected) - set(state))[:5]}: is it a state_dict of this architecture?")
    fitting = {k: v for k, v in state.items() if v.shape == expected[k].shape}
    model.load_state_dict(fitting, strict=False)
    return set(fitting)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    "The name and module of the first Conv2d in `model` (its stem)."
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None: raise ValueError(f"{type(model).__name__} has no Conv2d, so its input channels cannot be changed")
    return found


def adapt_first_conv(model: nn.Module, in_ch: int, pretrained: bool) -> None:
    """Swap the first Conv2d for one taking `in_ch` channels (nothing when it takes them already).

    With `pretrained`, each new input channel gets the mean of the old filters times old_ch/in_ch: for one
    channel that is their sum, as fastai does, so a grey image gives the activations that the same image copied
    to every colour channel gave before."""
    conv_name, old = first_conv(model)
    if old.in_channels == in_ch: return
    new = nn.Conv2d(in_ch, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, bias=old.bias is not None, padding_mode=old.padding_mode)
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(old.weight.mean(1, keepdim=True).expand_as(new.weight) * (old.in_channels / in_ch))
            if old.bias is not None: new.bias.copy_(old.bias)
    parent_name, _, attr = conv_name.rpartition('.')
    setattr(model.get_submodule(parent_name), attr, new)
