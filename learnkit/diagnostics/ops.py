"""Counting the tensor ops a piece of code runs: what a callback costs on a GPU, measured on any device."""
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['OpCounter']


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside a `with OpCounter() as c:` block (`c.n`, and `c.by_name` per op).

    On a GPU every op is a kernel launch or at least a dispatch, and a small network's training step is bound by
    them rather than by arithmetic: the extra ops per batch of a callback are what it costs there, and unlike a
    timing they are the same on every run and every device. Code inside the block runs slower (each op passes
    through Python), so count, don't time, with it.
    """
    def __init__(self):
        super().__init__()
        self.n, self.by_name = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        name = func.overloadpacket.__name__
        self.by_name[name] = self.by_name.get(name, 0) + 1
        return func(*args, **(kwargs or {}))
