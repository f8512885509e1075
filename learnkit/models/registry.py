"""A name -> constructor registry, so a model can be rebuilt from a JSON spec instead of a pickle.

Every model constructor in learnkit is decorated with `register_model`. The module it returns
carries `learnkit_spec = {'name': ..., 'kwargs': {...}}`: the constructor's name and all its
arguments (defaults applied) as JSON values. `get_model(spec['name'], **spec['kwargs'])` then
builds the same architecture again, ready for `load_state_dict`.
"""
import functools
import inspect
from collections.abc import Callable
from os import PathLike

from torch import nn

__all__ = ['MODELS', 'register_model', 'get_model']

MODELS: dict[str, Callable[..., nn.Module]] = {}
"The registered model constructors, by name."


def _to_json(value, where: str):
    "`value` as plain JSON data (tuples become lists, paths strings); raise if it has no JSON form."
    if isinstance(value, (tuple, list)): return [_to_json(v, where) for v in value]
    if isinstance(value, dict): return {str(k): _to_json(v, where) for k, v in value.items()}
    if isinstance(value, PathLike): return str(value)
    if value is None or isinstance(value, (bool, int, float, str)): return value
    raise TypeError(f"{where} is {value!r} ({type(value).__name__}), which has no JSON form, so the model "
                    "could not be rebuilt by name; pass numbers, strings, booleans, None, lists or dicts")


def _spec_kwargs(sig: inspect.Signature, bound: inspect.BoundArguments, name: str, rebuilt_without) -> dict:
    "The bound arguments as one flat JSON dict (a `**kwargs` parameter is merged in)."
    kwargs = {}
    for arg, value in bound.arguments.items():
        if sig.parameters[arg].kind is inspect.Parameter.VAR_KEYWORD: kwargs.update(value)
        else: kwargs[arg] = value
    for arg in rebuilt_without: kwargs[arg] = sig.parameters[arg].default
    return {k: _to_json(v, f"{name}({k}=...)") for k, v in kwargs.items()}


def register_model(fn: Callable[..., nn.Module] | None = None, *, rebuilt_without: tuple[str, ...] = ()):
    """Register a model constructor under its function name, and stamp `learnkit_spec` on what it builds.

    `rebuilt_without` names arguments that load weights rather than shape the model (such as
    `torchvision_model`'s `weights`): the spec records their default, because an exported
    state_dict replaces whatever they loaded and the file may not exist where the model is loaded.
    Use as `@register_model` or `@register_model(rebuilt_without=('weights',))`.
    """
    if fn is None: return functools.partial(register_model, rebuilt_without=rebuilt_without)
    name, sig = fn.__name__, inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        raise TypeError(f"register_model: {name} takes *args, which cannot be rebuilt by keyword; "
                        "give each argument a name")
    unknown = [a for a in rebuilt_without if a not in sig.parameters]
    if unknown: raise TypeError(f"register_model: {name} has no argument(s) {unknown} named in rebuilt_without")
    known = MODELS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"register_model: the name {name!r} is taken by {known.__module__}.{known.__qualname__}; "
                         "rename your constructor")

    @functools.wraps(fn)
    def build(*args, **kwargs) -> nn.Module:
        try: bound = sig.bind(*args, **kwargs)
        except TypeError as e: raise TypeError(f"{name}{sig}: {e}") from e
        bound.apply_defaults()
        spec = {'name': name, 'kwargs': _spec_kwargs(sig, bound, name, rebuilt_without)}
        model = fn(*bound.args, **bound.kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} returned {type(model).__name__}; a registered model constructor must return an nn.Module")
        model.learnkit_spec = spec
        return model

    MODELS[name] = build
    return build


def get_model(name: str, /, **kwargs) -> nn.Module:
    "Build the registered model `name` with `kwargs`: `get_model(m.learnkit_spec['name'], **m.learnkit_spec['kwargs'])`."
    if name not in MODELS:
        raise ValueError(f"get_model: no model named {name!r}; known models: {', '.join(sorted(MODELS))}. "
                         "Register your own constructor with @register_model")
    return MODELS[name](**kwargs)
