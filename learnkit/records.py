"""Growable records that live on the device: append without reading back, read in bulk when asked."""
import torch

__all__ = ['TensorLog']


class TensorLog:
    """A series of equally shaped tensors, kept on their device and read in bulk.

    `append(x)` copies `x` (one device kernel, no host sync); `append(x, copy=False)` only keeps a
    reference, for a fresh tensor the caller will not modify in place; `extend(rows)` copies a block of rows. Every `chunk` appends the pending
    rows are stacked into one growing device buffer, so memory is O(rows x row size).
    `values()` returns the rows as one tensor on the device; `numpy()` reads them with one transfer.
    """
    def __init__(self, chunk=256):
        self.chunk, self.buf, self.n, self._pending = chunk, None, 0, []

    def append(self, x, copy=True):
        if x.requires_grad: x = x.detach()  # (a detach of a tensor outside the graph would be an op for nothing)
        self._pending.append(x.clone() if copy else x)
        if len(self._pending) >= self.chunk: self._flush()

    def extend(self, rows):
        "Append each row of `rows` (copied: one device kernel, no host sync)."
        self._flush()
        self._write(rows.detach())

    def _flush(self):
        if not self._pending: return
        block = torch.stack(self._pending)
        self._pending = []
        self._write(block)

    def _write(self, block):
        if self.buf is None:
            self.buf = torch.empty((max(self.chunk, len(block)), *block.shape[1:]), dtype=block.dtype,
                                   device=block.device)
        if self.n + len(block) > self.buf.shape[0]:
            bigger = torch.empty((max(2 * self.buf.shape[0], self.n + len(block)), *self.buf.shape[1:]),
                                 dtype=self.buf.dtype, device=self.buf.device)
            bigger[:self.n].copy_(self.buf[:self.n])
            self.buf = bigger
        self.buf[self.n:self.n + len(block)].copy_(block)
        self.n += len(block)

    def values(self):
        "The rows appended so far, as one tensor on the device (empty if none)."
        self._flush()
        return self.buf[:self.n] if self.buf is not None else torch.empty(0)

    def numpy(self):
        "The rows on the host, read with one transfer."
        return self.values().float().cpu().numpy()  # sync-ok: read when asked, not per batch

    def clear(self): self.n, self._pending = 0, []
    def __len__(self): return self.n + len(self._pending)

    def state_dict(self): return {'values': self.values().cpu()}  # sync-ok: checkpoints only

    def load_state_dict(self, state, device=None):
        vals = state['values'] if device is None else state['values'].to(device)
        self.buf, self.n, self._pending = None, 0, []
        if len(vals): self._pending = list(vals); self._flush()
