"""Small tensor and module helpers under the names fastai's callbacks import them by.

fastai's callbacks take these from `fastai.torch_core` and `fastai.layers`; learnkit provides the same names with
the same meaning, so such a callback runs here with only its imports changed (see the README, "Porting a fastai
callback"). Each is written for learnkit: none reads a tensor back to the host unless its job is to do so
(`to_detach(cpu=True)`).
"""
import contextlib
import functools
import numbers

import numpy as np
import torch
from torch import nn

__all__ = ['tensor', 'find_bs', 'unsqueeze', 'to_detach', 'flatten_model', 'NoneReduce', 'default_device', 'listify']


def tensor(x, *rest, **kwargs):
    """`x` as a tensor: a tensor or a numpy array without a copy (unless `kwargs` ask for another dtype or device); a
    number, list or tuple through `torch.tensor`. Several arguments make one vector (`tensor(1, 2, 3)`). float64
    becomes float32, torch's default float, as in fastai, unless `dtype` is given. `kwargs` (dtype, device) go to
    `torch.as_tensor` / `torch.tensor`."""
    if rest: x = (x,) + rest
    if isinstance(x, (torch.Tensor, np.ndarray)): out = torch.as_tensor(x, **kwargs)
    elif isinstance(x, (numbers.Number, list, tuple)): out = torch.tensor(x, **kwargs)
    else: raise TypeError(f"tensor() takes a number, list, tuple, numpy array or tensor; got {type(x).__name__}")
    return out.float() if out.dtype == torch.float64 and 'dtype' not in kwargs else out


def _first_tensor(b):
    if isinstance(b, torch.Tensor): return b
    items = b.values() if isinstance(b, dict) else b if isinstance(b, (list, tuple)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None: return found
    return None


def find_bs(b):
    """The batch size of `b`: the first dimension of the first tensor in it (`b` may be a tensor, or tuples, lists and
    dicts of them, such as `learn.yb`). Reads only shapes, never a tensor's values."""
    t = _first_tensor(b)
    if t is None or t.ndim == 0:
        raise ValueError(f"find_bs found no tensor with a batch dimension in {type(b).__name__} {b!r:.80}")
    return t.shape[0]


def unsqueeze(x, dim=-1, n=1):
    "`x` with `n` new dimensions of size 1 at `dim` (`torch.unsqueeze` `n` times; `n=0` gives `x` back)."
    for _ in range(n): x = x.unsqueeze(dim)
    return x


def to_detach(b, cpu=True, gather=True):
    """`b` (a tensor, or tuples, lists and dicts of them) detached from the autograd graph; on the CPU with `cpu=True`
    (a host copy, which waits for the device); with `gather=True` in a data-parallel run, every rank's tensors
    concatenated along the first dimension (a collective: every rank must call it)."""
    if isinstance(b, dict): return {k: to_detach(v, cpu, gather) for k, v in b.items()}
    if isinstance(b, (list, tuple)): return type(b)(to_detach(v, cpu, gather) for v in b)
    if not isinstance(b, torch.Tensor): return b
    b = b.detach()
    if gather: b = _gather_ranks(b)
    return b.cpu() if cpu else b  # sync-ok: the caller asked for a host copy


def _gather_ranks(t):
    from .callbacks.distributed import all_gather, num_distrib   # lazy: distributed imports the loop's modules
    if num_distrib() <= 1: return t
    return torch.cat(all_gather(t if t.ndim else t[None]))


def flatten_model(model):
    "The leaf modules of `model` (those without children), in definition order."
    return [m for m in model.modules() if next(m.children(), None) is None]


@contextlib.contextmanager
def NoneReduce(loss_func):
    """Inside the `with` block, `loss_func` returns one loss per item: a loss with a `reduction` attribute
    (`nn.CrossEntropyLoss()`) has it set to 'none' and restored afterwards, however the block ends; a function gets
    `reduction='none'` passed (`F.cross_entropy`). Yields the loss function to call."""
    if isinstance(loss_func, nn.Module) or hasattr(loss_func, 'reduction'):
        if not hasattr(loss_func, 'reduction'):
            raise TypeError(f"NoneReduce needs a loss with a `reduction` attribute or a function taking reduction=; "
                            f"{loss_func!r} has none")
        saved, loss_func.reduction = loss_func.reduction, 'none'
        try: yield loss_func
        finally: loss_func.reduction = saved
    else: yield functools.partial(loss_func, reduction='none')


def default_device() -> torch.device:
    """The device a Learner and learnkit loaders use when none is given: CUDA when available (as fastai), else the
    CPU. On CUDA, in a torchrun process group, the GPU its LOCAL_RANK names (`callbacks.distributed.local_device`);
    otherwise torch's current device (`torch.cuda.set_device` chooses it), always with its index, so that 'cuda'
    and 'cuda:0' never make two devices that compare unequal."""
    if not torch.cuda.is_available(): return torch.device('cpu')
    from .callbacks.distributed import local_device, num_distrib
    return local_device('cuda') if num_distrib() > 1 else torch.device('cuda', torch.cuda.current_device())


def listify(x) -> list:
    "`x` as a new list: [] for None, the items of a list or tuple, else `[x]` (a callback, a transform, a metric)."
    if x is None: return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
