"""The one protocol every statistics callback follows, and the reader that fetches their records together.

A statistics callback records rows on the device during fit and never reads them back per batch. What other
code may know of it is this interface, nothing private:
- `record_schema`: {column: meaning} of the rows it records (the report and the docs read it);
- `device_records()`: {name: tensor} of its raw records, still on the device (flushing anything staged first);
- `summarize(raw)`: the readable statistics (the `stats` dict) from those raw records once on the CPU;
- `state_dict()` / `load_state_dict(state)`: its records for a checkpoint, and back;
- `records_mark()` / `combine_ranks(since)`: under DDP, `DistributedCallback` takes a mark before each epoch's
  training and, after it, asks the callback to combine what it recorded since the mark across ranks, so every
  rank reads the statistics of the global batches. The callback does it with the collectives in
  `learnkit.callbacks.collectives`; one whose records are the same on every rank combines nothing.

`read_records(cbs)` reads the raw records of several callbacks in one device-to-host transfer per device and
dtype (one, when all are float32 on one device); the health report and `HealthMonitor` use it, and `stats` on
each callback is `summarize` of its own records. Adding a statistic means writing one such callback (and its
health check): DistributedCallback, the checkpoints and the report need no change.
"""
import torch

from ..callback import Callback

__all__ = ['StatsCallback', 'read_records']


class StatsCallback(Callback):
    "Base of the callbacks that record statistics on the device; see the module docstring for the protocol."
    record_schema = {}

    def device_records(self):
        "Override: {name: raw record tensor on the device}, anything staged recorded first."
        return {}

    def summarize(self, raw):
        "Override: the readable statistics from `raw`, the `device_records()` read to the CPU."
        return dict(raw)

    @property
    def stats(self):
        "The readable statistics as CPU tensors (one host transfer, on request)."
        return self.summarize(read_records([self])[0])

    def records_mark(self):
        "Where the records stand now, handed back to `combine_ranks` after the epoch's training."
        return None

    def combine_ranks(self, since):
        """Override when records differ per rank: combine those made since the mark `since` across ranks, in place.
        Every rank calls it at the same point, so it may run collectives."""


def read_records(cbs):
    """The raw records of each callback in `cbs`, on the CPU, read in one transfer per device and dtype: a list of
    {name: tensor}, one per callback. Tensors are flattened into one buffer per device and dtype and split again on
    the host; empty ones cost no transfer."""
    records = [cb.device_records() for cb in cbs]
    groups = {}
    out = [{} for _ in cbs]
    for i, rec in enumerate(records):
        for name, t in rec.items():
            if t.numel() == 0: out[i][name] = torch.empty(t.shape, dtype=t.dtype)
            else: groups.setdefault((t.device, t.dtype), []).append((i, name, t))
    for items in groups.values():
        flat = torch.cat([t.reshape(-1) for _, _, t in items]).cpu()  # sync-ok: on request, once per device and dtype
        offset = 0
        for i, name, t in items:
            n = t.numel()
            out[i][name] = flat[offset:offset + n].view(t.shape)
            offset += n
    return out
