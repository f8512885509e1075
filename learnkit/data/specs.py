"""Transforms as names and arguments, so that an export can rebuild them without unpickling code.

`t.to_spec()` gives `{'name': 'Resize', 'args': {'size': [24, 24], 'method': 'crop'}}`: the class's registered
name and its constructor arguments as plain values (numbers, strings, booleans, None, lists and dicts; tensors
become lists). `transform_from_spec(spec)` looks the name up in `TRANSFORMS` and calls the class with the
arguments. learnkit's transforms are registered; decorate your own with `@register_transform`.

By default the arguments are read back from the attributes of the same names (fastcore's `store_attr`
convention, which learnkit's transforms follow); a transform that stores them otherwise defines `to_spec()`.
"""
import inspect

import numpy as np
import torch

__all__ = ['TRANSFORMS', 'register_transform', 'transform_from_spec', 'Specified']

TRANSFORMS: dict[str, type] = {}
"The transform classes that an export may name, by class name."

_FIX = ("decorate its class with @learnkit.data.register_transform (storing each constructor argument as an "
        "attribute of the same name, or defining to_spec()), or export without transforms, "
        "learn.export(path, with_tfms=False), and pass them again to load_learner(path, item_tfms=[...], "
        "batch_tfms=[...])")


class Specified:
    "The mixin that gives learnkit's item and batch transforms `to_spec()`, and a repr of their public attributes."

    def __repr__(self):
        args = ', '.join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith('_'))
        return f"{type(self).__name__}({args})"

    def to_spec(self) -> dict:
        """This transform as `{'name': ..., 'args': {...}}` of plain values, which `transform_from_spec` turns
        back into the same transform. Raises a TypeError naming the transform and the fix when it cannot."""
        cls, name = type(self), type(self).__name__
        if TRANSFORMS.get(name) is not cls:
            raise TypeError(f"{self!r} cannot be exported: an export names its transforms and their arguments "
                            f"(it never pickles code), and {cls.__module__}.{cls.__qualname__} is not a registered "
                            f"transform. To export it, {_FIX}.")
        params = list(inspect.signature(cls).parameters.values())
        bad = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(self, p.name)]
        if bad:
            raise TypeError(f"{self!r} cannot be exported: the constructor arguments {bad} are not stored as attributes "
                            f"of the same names, so they cannot be read back. Store them (self.x = x), or define "
                            f"{name}.to_spec() returning {{'name': {name!r}, 'args': {{...}}}}.")
        return {'name': name, 'args': {p.name: _plain(getattr(self, p.name), self, p.name) for p in params}}


def _plain(value, tfm, where):
    "`value` as numbers, strings, booleans, None, lists and dicts; tensors and arrays as (nested) lists."
    if value is None or isinstance(value, (bool, int, float, str)): return value
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)): return value.tolist()  # sync-ok: export, once
    if isinstance(value, (list, tuple)): return [_plain(v, tfm, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, tfm, where) for k, v in value.items()}
    raise TypeError(f"{tfm!r} cannot be exported: its argument {where}={value!r} is a {type(value).__name__}, and an "
                    f"export holds only numbers, strings, booleans, None, lists and dicts of them. Define "
                    f"{type(tfm).__name__}.to_spec() giving plain arguments, or export without transforms, "
                    f"learn.export(path, with_tfms=False), and pass them again to load_learner(path, item_tfms=[...]).")


def register_transform(cls):
    """Let exports name the transform class `cls` (use as a class decorator); `load_learner` then rebuilds it as
    `cls(**args)`, provided the module that defines it has been imported. Returns `cls`."""
    if not (isinstance(cls, type) and issubclass(cls, Specified)):
        raise TypeError(f"register_transform takes a subclass of learnkit's ItemTransform or BatchTransform; got {cls!r}")
    known = TRANSFORMS.get(cls.__name__)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register_transform: the name {cls.__name__!r} is taken by {known.__module__}."
                         f"{known.__qualname__}; rename your class")
    TRANSFORMS[cls.__name__] = cls  # the same class defined again (a notebook cell run twice) replaces itself
    return cls


def transform_from_spec(spec, where='the export'):
    "The transform that `spec` (from `to_spec()`) describes; errors name `where` the spec comes from."
    if not (isinstance(spec, dict) and isinstance(spec.get('name'), str) and isinstance(spec.get('args'), dict)):
        raise ValueError(f"{where}: {spec!r} is not a transform spec {{'name': str, 'args': dict}}")
    name, args = spec['name'], spec['args']
    cls = TRANSFORMS.get(name)
    if cls is None:
        raise ValueError(f"{where} names the transform {name!r}, which is not registered in this process (known: "
                         f"{', '.join(sorted(TRANSFORMS))}). Import the module that defines it (decorated with "
                         f"@register_transform) before loading, or pass the transforms to load_learner(path, "
                         f"item_tfms=[...], batch_tfms=[...]).")
    try: return cls(**args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot rebuild {name}(**{args!r}): {e}") from e
