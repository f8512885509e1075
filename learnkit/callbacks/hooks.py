"""PyTorch module hooks as objects that remove themselves, and the callback that owns them during fit.

`Hook` and `Hooks` wrap `register_forward_hook` / `register_full_backward_hook`; both are context managers.
`HookCallback` registers its hooks at `before_fit` and removes them in `cleanup_fit`, which the Learner calls
however fit ends (a normal end, a cancel, an exception, KeyboardInterrupt), so a model never keeps a stale
hook and a second fit never doubles them.
"""
import torch
from torch import nn

from ..callback import Callback
from ..torch_core import flatten_model

__all__ = ['Hook', 'Hooks', 'hook_output', 'hook_outputs', 'HookCallback', 'default_modules', 'module_names',
           'layer_index', 'without_grad']


# What `torch.no_grad` itself calls to switch the mode: the public `torch.set_grad_enabled` builds a context-manager
# object on every call, about three times the cost of the switch itself.
_grad_enabled, _set_grad_enabled = torch._C.is_grad_enabled, torch._C._set_grad_enabled


def without_grad(fn, *args):
    """`fn(*args)` with grad mode off, as under `torch.no_grad()`. For hooks, which run once per layer per batch:
    the `with` statement's context object costs several times what switching the mode does."""
    grad = _grad_enabled()
    _set_grad_enabled(False)
    try: return fn(*args)
    finally: _set_grad_enabled(grad)


def _detach(x):
    if isinstance(x, (tuple, list)): return type(x)(_detach(o) for o in x)
    return x.detach() if hasattr(x, 'detach') else x


class Hook:
    """Calls `fn(module, input, output)` after each forward of `module` (`is_forward=False`: after its
    backward, with `(module, grad_input, grad_output)`) and keeps the result in `.stored`.

    With `detach=True` the tensors `fn` receives are detached from the graph. Use as a context manager, or call
    `remove()`; removing twice is harmless.
    """
    def __init__(self, module, fn, is_forward=True, detach=True):
        if not isinstance(module, nn.Module):
            raise TypeError(f"Hook needs a torch.nn.Module; got {type(module).__name__}")
        self.module, self.fn, self.detach, self.stored = module, fn, detach, None
        register = module.register_forward_hook if is_forward else module.register_full_backward_hook
        self._handle = register(self._call)

    def _call(self, module, inp, out):
        if self.detach: inp, out = _detach(inp), _detach(out)
        self.stored = self.fn(module, inp, out)

    @property
    def removed(self): return self._handle is None

    def remove(self):
        "Unregister the hook from its module."
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self): return self
    def __exit__(self, *exc): self.remove()
    def __repr__(self): return f"Hook({type(self.module).__name__}, removed={self.removed})"


class Hooks:
    "One `Hook` per module in `modules`, all calling `fn`; indexable, iterable, a context manager."
    def __init__(self, modules, fn, is_forward=True, detach=True):
        self.hooks = [Hook(m, fn, is_forward, detach) for m in modules]

    def __getitem__(self, i): return self.hooks[i]
    def __len__(self): return len(self.hooks)
    def __iter__(self): return iter(self.hooks)

    @property
    def stored(self):
        "What each hook's function last returned, in module order."
        return [h.stored for h in self.hooks]

    def remove(self):
        "Unregister every hook."
        for h in self.hooks: h.remove()

    def __enter__(self): return self
    def __exit__(self, *exc): self.remove()
    def __repr__(self): return f"Hooks({len(self.hooks)} modules)"


def _output(module, inp, out): return out
def _grad_output(module, grad_inp, grad_out): return grad_out


def hook_output(module, detach=True, grad=False):
    "A `Hook` whose `.stored` is the module's last output (`grad=True`: the gradient of its output)."
    return Hook(module, _grad_output if grad else _output, is_forward=not grad, detach=detach)


def hook_outputs(modules, detach=True, grad=False):
    "`Hooks` whose `.stored` are the modules' last outputs (`grad=True`: the gradients of their outputs)."
    return Hooks(modules, _grad_output if grad else _output, is_forward=not grad, detach=detach)


def _has_params(m): return any(True for _ in m.parameters(recurse=False))


def default_modules(model, include_paramless=False, also=None):
    """The leaf modules of `model` in definition order: those with parameters (as fastai hooks them), or every
    leaf with `include_paramless=True` (which adds activations, pooling, Flatten...); `also(module)` may add
    parameterless leaves it returns True for."""
    return [m for m in flatten_model(model) if include_paramless or _has_params(m) or (also is not None and also(m))]


def module_names(model, modules):
    "A readable name per module: its path in `model` and its type, e.g. '3.0 Conv2d'."
    paths = {id(m): name for name, m in model.named_modules()}
    return [f"{paths.get(id(m), '?')} {type(m).__name__}".strip() for m in modules]


def layer_index(idx, n, what='hooked layers'):
    "Check `idx` (negative counts from the end, as in a list) against `n` layers and return it as 0..n-1."
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise TypeError(f"layer index must be an int (negative counts from the end); got {idx!r}")
    if not -n <= idx < n:
        raise IndexError(f"layer index {idx} is out of range: there are {n} {what} (valid: {-n}..{n - 1})")
    return idx % n


class HookCallback(Callback):
    """Hooks `modules` (default: every layer with parameters; `include_paramless=True` adds the parameterless
    leaves such as ReLU) for the duration of each fit and calls `self.hook(module, input, output)`, with detached
    tensors, on training batches: every one, or every `every`-th (counted by `train_iter`). What `hook` returns
    is in `self.hooks.stored`.

    Hooks are registered at `before_fit` and removed in `cleanup_fit`, however fit ends; they do no work during
    validation. Subclasses override `hook`.
    """
    order = -20

    def __init__(self, modules=None, every=None, include_paramless=False, is_forward=True):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int (record every N-th training batch) or None; got {every!r}")
        if modules is not None and include_paramless:
            raise ValueError("include_paramless chooses the default modules; it has no effect when modules are given. "
                             "Pass one or the other.")
        self.modules, self.every, self.include_paramless, self.is_forward = modules, every, include_paramless, is_forward
        self.hooks, self.hooked_modules, self.layer_names, self._active = None, [], [], False

    def hook(self, module, inp, out):
        "Override: what to compute from a hooked module's input and output on a recorded batch."

    def default_hooked_modules(self, model):
        "The modules hooked when none are given: see `default_modules` (override to add others)."
        return default_modules(model, self.include_paramless)

    def before_fit(self):
        self._remove()
        model = self.learn.model
        mods = list(self.modules) if self.modules is not None else self.default_hooked_modules(model)
        if not mods:
            raise ValueError(f"{type(self).__name__} found no modules to hook in {type(model).__name__}: the model has "
                             "no leaf layer with parameters. Pass modules=[...] or include_paramless=True.")
        if len({id(m) for m in mods}) != len(mods):
            raise ValueError(f"{type(self).__name__}: a module appears twice in modules; hook each module once")
        self.hooked_modules, self.layer_names = mods, module_names(model, mods)
        self.hooks = Hooks(mods, self._gated_hook, self.is_forward, detach=False)

    def _gated_hook(self, module, inp, out):
        if self._active: return self.hook(module, _detach(inp), _detach(out))

    def before_batch(self):
        self._active = self.learn.training and (self.every is None or self.learn.train_iter % self.every == 0)

    def after_batch(self): self._active = False
    def after_fit(self): self._remove()
    def cleanup_fit(self): self._remove()

    def _remove(self):
        self._active = False
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
