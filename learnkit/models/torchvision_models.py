"""Any torchvision classifier, adapted to `n_out` classes and `in_ch` input channels, with weights from a local file only.

torchvision is imported when a model is built, not with learnkit (it adds about a second to the import).
"""
import difflib
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from .pretrained import adapt_first_conv, read_state_dict
from .registry import register_model

__all__ = ['torchvision_model']

# Their auxiliary classifiers make training mode return a tuple; learnkit's loss takes one tensor.
_NO_AUX = {'googlenet': {'aux_logits': False, 'init_weights': True},
           'inception_v3': {'aux_logits': False, 'init_weights': True}}


def _check_name(name: str) -> None:
    from torchvision import models
    known = models.list_models(module=models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"did you mean {', '.join(close)}?" if close else f"classifiers are: {', '.join(known)}"
        raise ValueError(f"torchvision_model: {name!r} is not a torchvision classification model; {hint}")


def _weights_path(weights) -> Path:
    "`weights` as an existing local file; anything else (an enum, 'IMAGENET1K_V1', a URL) is an error: nothing is downloaded."
    if not isinstance(weights, (str, PathLike)) or not Path(weights).is_file():
        raise ValueError(f"torchvision_model(weights={weights!r}): weights must be the path of a local file holding a "
                         "state_dict (.pt, .pth or .safetensors). learnkit never downloads weights: fetch the file "
                         "yourself (e.g. torchvision's weights URL) and pass its path")
    return Path(weights)


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str, n_out: int) -> None:
    """Load `state` into `model`, except the classifier whose shape follows `n_out`: it keeps its fresh init.

    Auxiliary classifiers' weights (GoogLeNet, Inception v3) are skipped: the model has none.
    """
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (k not in expected and k.split('.')[0].lower().startswith('aux'))}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    is_head = len({k.rsplit('.', 1)[0] for k in resized}) <= 1 and all(expected[k].shape[0] == n_out for k in resized)
    if missing or unexpected or not is_head:
        raise RuntimeError(f"torchvision_model: {path} does not fit torchvision's {name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, other shapes {resized[:5]} (first 5 of each). "
                           f"Is it a state_dict of {name}?")
    model.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)


@register_model(rebuilt_without=('weights',))
def torchvision_model(name: str, n_out: int = 10, in_ch: int = 3, weights: str | PathLike | None = None) -> nn.Module:
    """torchvision's classifier `name` (e.g. 'resnet50') with an `n_out`-class head and an `in_ch`-channel first conv.

    `weights` is None (random init) or the path of a local state_dict file of the unmodified
    torchvision model (.pt/.pth via weights-only torch.load, or .safetensors). Everything but the
    head is loaded from it; the new head keeps its random init. Nothing is ever downloaded: a
    weights enum or name such as 'IMAGENET1K_V1' raises. When `in_ch` is not 3 the first conv is
    replaced (initialised from the pretrained filters when weights are given). GoogLeNet and
    Inception v3 are built without their auxiliary classifiers. The learnkit_spec records
    weights=None: an exported model carries its own weights.
    """
    from torchvision import models
    _check_name(name)
    path = None if weights is None else _weights_path(weights)
    model = models.get_model(name, weights=None, num_classes=n_out, **_NO_AUX.get(name, {}))
    if path is not None: _load_weights(model, read_state_dict(path, 'torchvision_model'), path, name, n_out)
    adapt_first_conv(model, in_ch, pretrained=path is not None)
    return model
