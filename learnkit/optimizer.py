"""fastai's hyper-parameter names (lr, mom, sqr_mom, wd, eps) over torch's own optimizers.

Schedules set hyper-parameters by these names; `OptimWrapper` translates them to each torch optimizer's
arguments (Adam's `betas[0]`, SGD's `momentum`, ...). Weight decay skips biases and normalisation
weights (every parameter with one dimension or fewer) unless `wd_bn_bias=True`, as in fastai.
"""
import inspect
from collections.abc import MutableMapping

import torch

__all__ = ['OptimWrapper', 'GroupHypers', 'Adam', 'SGD', 'RMSProp', 'as_opt_func']

# fastai name -> torch argument, or (torch argument, tuple position) for tuple-valued ones.
_TORCH_NAMES = {
    torch.optim.Adam: {'mom': ('betas', 0), 'sqr_mom': ('betas', 1)},
    torch.optim.AdamW: {'mom': ('betas', 0), 'sqr_mom': ('betas', 1)},
    torch.optim.NAdam: {'mom': ('betas', 0), 'sqr_mom': ('betas', 1)},
    torch.optim.RAdam: {'mom': ('betas', 0), 'sqr_mom': ('betas', 1)},
    torch.optim.SGD: {'mom': 'momentum'},
    torch.optim.RMSprop: {'mom': 'momentum', 'sqr_mom': 'alpha'},
}
_COMMON = {'lr': 'lr', 'wd': 'weight_decay', 'eps': 'eps'}


class OptimWrapper:
    """A torch optimizer whose hyper-parameters are read and set by fastai's names, per parameter group.

    `params` is an iterable of parameters (one group) or a list of lists (one group each, for
    discriminative learning rates). `hypers` are the initial values by fastai name. `fused=True` asks torch
    for its one-kernel implementation (Adam, AdamW, SGD; CUDA and CPU), the fastest on a GPU; `None` keeps
    torch's default (foreach on CUDA).
    """
    def __init__(self, params, opt_cls, wd_bn_bias=False, fused=None, **hypers):
        groups = _as_groups(params)
        self.names = {**_COMMON, **_TORCH_NAMES.get(opt_cls, {})}
        unknown = [k for k in hypers if k not in self.names]
        if unknown:
            raise TypeError(f"{opt_cls.__name__} has no hyper-parameter {unknown}; it takes {sorted(self.names)}")
        self.torch_groups_of = []          # logical group -> indices of its torch param groups
        self.no_wd = set()                 # torch param groups that never get weight decay
        torch_groups = []
        for ps in groups:
            decay = [p for p in ps if wd_bn_bias or p.ndim > 1]
            no_decay = [p for p in ps if not (wd_bn_bias or p.ndim > 1)]
            idx = []
            for sub, skip_wd in ((decay, False), (no_decay, True)):
                if not sub: continue
                if skip_wd: self.no_wd.add(len(torch_groups))
                idx.append(len(torch_groups))
                torch_groups.append({'params': sub, 'weight_decay': 0.} if skip_wd else {'params': sub})
            self.torch_groups_of.append(idx)
        if not torch_groups:
            raise ValueError("The optimizer got no trainable parameters: is every parameter frozen "
                             "(requires_grad=False), or is the model empty?")
        kw = self._torch_defaults(opt_cls, hypers)
        if fused is not None:
            if 'fused' not in inspect.signature(opt_cls.__init__).parameters:
                raise TypeError(f"{opt_cls.__name__} has no fused implementation; drop fused={fused!r}")
            kw['fused'] = fused
        self.opt = opt_cls(torch_groups, **kw)
        for k, v in hypers.items(): self.set_hyper(k, v)

    def _torch_defaults(self, opt_cls, hypers):
        "Constructor arguments, so the torch optimizer is created in the right mode (e.g. with momentum)."
        kw = {}
        for k, v in hypers.items():
            name = self.names[k]
            v = _first(v)
            if isinstance(name, tuple):
                cur = list(kw.get(name[0], _default(opt_cls, name[0])))
                cur[name[1]] = v; kw[name[0]] = tuple(cur)
            else: kw[name] = v
        return kw

    @property
    def param_groups(self): return self.opt.param_groups
    @property
    def n_groups(self): return len(self.torch_groups_of)

    def set_hyper(self, k, v):
        "Set hyper-parameter `k` (fastai name) to `v`, a number or one value per parameter group."
        self._torch_name(k)
        for group, val in enumerate(_broadcast(v, self.n_groups, k)): self._set_group_hyper(group, k, val)

    def _torch_name(self, k):
        name = self.names.get(k)
        if name is None: raise KeyError(f"Unknown hyper-parameter {k!r}; this optimizer has {sorted(self.names)}")
        return name

    def _set_group_hyper(self, group, k, val):
        "Hyper-parameter `k` of logical group `group` in each of its torch groups (weight decay skips the no-wd ones)."
        name, groups = self._torch_name(k), self.opt.param_groups
        for i in self.torch_groups_of[group]:
            if k == 'wd' and i in self.no_wd: continue
            g = groups[i]
            if isinstance(name, tuple):            # e.g. Adam's mom is betas[0]
                key, pos = name
                old = g[key]
                g[key] = (val, old[1]) if pos == 0 else (old[0], val)
            else: g[name] = val

    def get_hyper(self, k, group=-1):
        "The current value of hyper-parameter `k` in parameter group `group` (cheap: read per batch)."
        g = self.opt.param_groups[self.torch_groups_of[group][0]]
        name = self._torch_name(k)
        return g[name[0]][name[1]] if isinstance(name, tuple) else g.get(name)

    def set_hypers(self, **kwargs):
        for k, v in kwargs.items(): self.set_hyper(k, v)

    @property
    def hypers(self):
        """One live view per parameter group, {fastai name: value}, as fastai's `opt.hypers`: reading reads the torch
        optimizer, and writing sets it (`for h in opt.hypers: h['lr'] /= 10` lowers every group's lr). A tuple, so
        that assigning a whole group (`opt.hypers[0] = {...}`) raises instead of changing nothing."""
        return tuple(GroupHypers(self, i) for i in range(self.n_groups))

    def step(self, closure=None): return self.opt.step(closure)
    def zero_grad(self, set_to_none=True): self.opt.zero_grad(set_to_none=set_to_none)
    def state_dict(self): return self.opt.state_dict()
    def load_state_dict(self, sd): self.opt.load_state_dict(sd)
    def __repr__(self): return f"OptimWrapper({type(self.opt).__name__}, {self.n_groups} group(s))"


class GroupHypers(MutableMapping):
    """The hyper-parameters of one parameter group of an `OptimWrapper`, by fastai name, read from and written to the
    torch optimizer itself (what `opt.hypers` returns). Only the names this optimizer has are keys; none can be
    removed."""
    def __init__(self, wrapper, group): self.wrapper, self.group = wrapper, group

    def _keys(self):
        w = self.wrapper
        g = w.opt.param_groups[w.torch_groups_of[self.group][0]]
        return [k for k, n in w.names.items() if (n[0] if isinstance(n, tuple) else n) in g]

    def _check(self, k):
        if k not in self._keys():
            raise KeyError(f"Unknown hyper-parameter {k!r}; this optimizer has {sorted(self._keys())}")

    def __getitem__(self, k):
        self._check(k)
        return self.wrapper.get_hyper(k, self.group)

    def __setitem__(self, k, v):
        self._check(k)
        self.wrapper._set_group_hyper(self.group, k, v if isinstance(v, torch.Tensor) else float(v))

    def __delitem__(self, k):
        raise TypeError(f"A parameter group's hyper-parameters cannot be removed (tried {k!r}); set a value instead")

    def __iter__(self): return iter(self._keys())
    def __len__(self): return len(self._keys())
    def __repr__(self): return repr(dict(self))


def _default(opt_cls, arg):
    return inspect.signature(opt_cls.__init__).parameters[arg].default


def _first(v): return v[-1] if isinstance(v, (list, tuple)) else v


def _broadcast(v, n, k):
    "One value per parameter group from a number, a 0-d array, or a sequence of n values."
    if isinstance(v, (list, tuple)) or getattr(v, 'ndim', 0) > 0:
        v = [float(x) for x in v]
        if len(v) != n:
            raise ValueError(f"{k} has {len(v)} values but the optimizer has {n} parameter group(s); "
                             f"pass one value, or a splitter that makes {len(v)} groups")
        return v
    return [v if isinstance(v, torch.Tensor) else float(v)] * n


def _as_groups(params):
    params = list(params)
    if params and isinstance(params[0], torch.Tensor): params = [params]
    return [[p for p in g if p.requires_grad] for g in params]


def Adam(params, lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, decouple_wd=True, wd_bn_bias=False, fused=None):
    """fastai's Adam defaults: decoupled weight decay (torch's AdamW) with wd=0.01, eps=1e-5.
    `fused=None` picks torch's one-kernel implementation when every parameter is on CUDA (the fastest there,
    and it lets fp16 loss scaling skip steps without a host sync), torch's default elsewhere."""
    params = list(params)
    if fused is None and _all_on_cuda(params): fused = True
    cls = torch.optim.AdamW if decouple_wd else torch.optim.Adam
    return OptimWrapper(params, cls, wd_bn_bias=wd_bn_bias, fused=fused, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps,
                        wd=wd)


def _all_on_cuda(params):
    flat = [p for g in params for p in (g if isinstance(g, (list, tuple)) else [g])]
    return bool(flat) and all(p.is_cuda for p in flat)


def SGD(params, lr=1e-3, mom=0., wd=0., wd_bn_bias=False, fused=None):
    "torch's SGD, with momentum set by `mom` (so 1cycle can move it). See OptimWrapper for `fused`."
    return OptimWrapper(params, torch.optim.SGD, wd_bn_bias=wd_bn_bias, fused=fused, lr=lr, mom=mom, wd=wd)


def RMSProp(params, lr=1e-3, sqr_mom=0.99, mom=0., eps=1e-8, wd=0., wd_bn_bias=False):
    return OptimWrapper(params, torch.optim.RMSprop, wd_bn_bias=wd_bn_bias, lr=lr, sqr_mom=sqr_mom,
                        mom=mom, eps=eps, wd=wd)


def as_opt_func(opt_func):
    "Accept a learnkit opt_func or a torch optimizer class (`torch.optim.SGD`) as `opt_func`."
    if isinstance(opt_func, type) and issubclass(opt_func, torch.optim.Optimizer):
        def make(params, lr=1e-3, wd_bn_bias=False, **hypers):
            return OptimWrapper(params, opt_func, wd_bn_bias=wd_bn_bias, lr=lr, **hypers)
        make.__name__ = opt_func.__name__
        return make
    if not callable(opt_func):
        raise TypeError(f"opt_func must be a function like learnkit.Adam or a torch.optim class; got {opt_func!r}")
    return opt_func
