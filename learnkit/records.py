"""Growable records that live on the device: append without reading back, read in bulk when asked."""
import torch

__all__ = ['TensorLog']


class TensorLog:
    """A series of equally shaped tensors stored in one preallocated device buffer.

    `append(x)` is one device copy into the next free row (no host sync, no Python work that grows with
    `x`); the buffer doubles when full, so memory is O(rows x row size). `values()` returns the filled
    rows as one tensor on the device; `numpy()` reads them to the host in a single transfer.
    """
    def __init__(self, capacity=256):
        self.capacity, self.n, self.buf = capacity, 0, None

    def append(self, x):
        x = x.detach()
        if self.buf is None:
            self.buf = torch.empty((self.capacity, *x.shape), dtype=x.dtype, device=x.device)
        elif self.n == self.buf.shape[0]:
            bigger = torch.empty((2 * self.n, *self.buf.shape[1:]), dtype=self.buf.dtype, device=self.buf.device)
            bigger[:self.n].copy_(self.buf)
            self.buf = bigger
        self.buf[self.n].copy_(x)
        self.n += 1

    def values(self):
        "The rows appended so far, as one tensor on the device (empty if none)."
        return self.buf[:self.n] if self.buf is not None else torch.empty(0)

    def numpy(self):
        "The rows on the host, read with one transfer."
        return self.values().float().cpu().numpy()  # sync-ok: read when asked, not per batch

    def clear(self): self.n = 0
    def __len__(self): return self.n

    def state_dict(self): return {'values': self.values().cpu()}  # sync-ok: checkpoints only

    def load_state_dict(self, state, device=None):
        vals = state['values'] if device is None else state['values'].to(device)
        self.n, self.buf = len(vals), None
        if self.n:
            self.capacity = max(self.capacity, self.n)
            self.buf = torch.empty((self.capacity, *vals.shape[1:]), dtype=vals.dtype, device=vals.device)
            self.buf[:self.n].copy_(vals)
