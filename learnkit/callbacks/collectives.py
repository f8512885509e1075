"""Collectives on tensors across the processes of a torch.distributed job, for any code that combines records.

They need a process group (`DistributedCallback` joins it) and are called by every rank in the same order.
Each returns a new tensor on the input's device and reads nothing back to the host. This module imports no
callback, so statistics callbacks can combine their own records (`StatsCallback.combine_ranks`) with it.
"""
import torch
import torch.distributed as dist

__all__ = ['all_reduce_sum', 'all_reduce_max', 'all_reduce_mean', 'broadcast', 'broadcast_int', 'broadcast_bytes',
           'all_gather', 'gather_interleaved']


def _comm_device(t):
    "nccl reduces CUDA tensors only; gloo reduces tensors where they are."
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else t.device


def _all_reduce(t, op):
    out = t.detach().to(_comm_device(t), copy=True)
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def all_reduce_sum(t):
    "The sum of `t` over all ranks, as a new tensor on `t`'s device (no host read)."
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t):
    "The elementwise max of `t` over all ranks, as a new tensor on `t`'s device."
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_mean(t):
    "The mean of `t` over all ranks, as a new tensor on `t`'s device (floating point `t`)."
    return all_reduce_sum(t) / dist.get_world_size()


def broadcast(t, src=0):
    "Rank `src`'s `t`, as a new tensor on `t`'s device on every rank."
    out = t.detach().to(_comm_device(t), copy=True)
    dist.broadcast(out, src)
    return out.to(t.device)


def broadcast_int(value, src=0):
    "Rank `src`'s integer (a seed, say), on every rank."
    return int(broadcast(torch.tensor([int(value)], dtype=torch.int64), src).item())  # sync-ok: once per epoch


def broadcast_bytes(data, src=0):
    "Rank `src`'s `data` (bytes; the other ranks pass None), on every rank: a length, then the bytes."
    mine = dist.get_rank() == src
    n = broadcast_int(len(data) if mine else 0, src)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if mine and n else torch.zeros(n, dtype=torch.uint8)
    return broadcast(buf, src).cpu().numpy().tobytes()  # sync-ok: a checkpoint, once


def all_gather(t):
    "Every rank's `t` (all the same shape), as a list in rank order, on the communication device."
    dev = _comm_device(t)
    t = t.detach().contiguous().to(dev)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return parts


def gather_interleaved(t, n):
    """The full data set's rows from each rank's shard `t`: item j of rank r is item `j * world_size + r` of the
    unsharded order (how `TfmdDL.shard` and `DistributedSampler` deal items out); rows past `n` are the padding
    that evened the shards, and are dropped. Every rank must pass as many rows."""
    parts = all_gather(t)
    return torch.stack(parts, 1).flatten(0, 1)[:n].to(t.device)
