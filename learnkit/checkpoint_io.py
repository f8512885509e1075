"""Checkpoint files: written atomically, read back without running code, and a Learner's whole state in them.

A checkpoint is one `torch.save` file made only of tensors and plain values (numbers, strings, lists,
tuples, dicts): the model and optimizer states, the loop position, every callback's `state_dict()` (the
recorder's history, the trackers' best values, a GradScaler...), the RNG states of torch, CUDA, numpy and
python, and the training loader's order. It is written to a temporary file in the same folder, fsynced,
renamed over the old one and the folder fsynced, so a crash mid-write leaves the previous checkpoint whole.
It is read with `torch.load(weights_only=True)`: a file that needs arbitrary unpickling (and could run code
on load, as fastai's `load_learner` allows) is refused with `UnsafeCheckpointError`.
"""
import io
import os
import pickle
import secrets
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .rng import get_rng_states, set_rng_states

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'atomic_save', 'safe_load', 'checkpoint_file', 'plain',
           'learner_state', 'save_checkpoint', 'read_checkpoint', 'load_checkpoint', 'load_checkpoint_from_rank0',
           'restore', 'epoch_start_state', 'bare_model', 'is_main_process', 'load_weights', 'find_normalize']

CHECKPOINT_FORMAT, EXPORT_FORMAT, VERSION = 'learnkit.checkpoint', 'learnkit.export', 1
# Export version 2 adds the item pipeline (image mode, item and batch transforms); version 1 files still load.
VERSIONS = {CHECKPOINT_FORMAT: VERSION, EXPORT_FORMAT: 2}


class CheckpointError(RuntimeError):
    "A file that is not a usable learnkit checkpoint: cut short, another format, or for another model."


class UnsafeCheckpointError(CheckpointError):
    "A file whose loading would need arbitrary unpickling, which can run code; learnkit refuses it."


def is_main_process():
    """False on the ranks other than 0 of a torch.distributed run (torchrun's RANK counts even before the
    process group exists): only rank 0 writes checkpoints and logs."""
    from .callbacks.distributed import is_rank0
    return is_rank0()


# ---- writing and reading files --------------------------------------------------------------------
def atomic_save(obj, file):
    """`torch.save(obj)` to `file` so that `file` is always either the old or the new version, never a
    partial one: write a temporary file in the same folder, flush and fsync it, rename it over `file`,
    then fsync the folder so the rename itself survives a power cut."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f'.{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    done = False
    try:
        with open(tmp, 'xb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
        done = True
    finally:
        if not done: tmp.unlink(missing_ok=True)   # an interrupted write leaves no temporary file behind
    _fsync_dir(file.parent)
    return file


def _fsync_dir(folder):
    if os.name != 'posix': return     # Windows cannot open a folder to fsync it; its renames are journaled
    fd = os.open(folder, os.O_RDONLY)
    try: os.fsync(fd)
    finally: os.close(fd)


def safe_load(file, data=None):
    """Read a file written by `torch.save` with `torch.load(weights_only=True)`, onto the CPU. `data`: the
    file's bytes, read already (rank 0 sends them to the other ranks); `file` then only names it in messages.

    Raises `UnsafeCheckpointError` (and runs nothing from the file) when the file holds objects other than
    tensors and plain values, and `CheckpointError` when it is cut short or not a torch file at all."""
    file = Path(file)
    if data is None and not file.is_file():
        near = sorted(p.name for p in file.parent.glob('*.pth')) if file.parent.is_dir() else []
        raise FileNotFoundError(f"No checkpoint at {file}" + (f"; {file.parent} has {near}" if near else ''))
    source = io.BytesIO(data) if data is not None else file
    if not zipfile.is_zipfile(source):
        size = len(data) if data is not None else file.stat().st_size
        raise CheckpointError(
            f"{file} ({size} bytes) is not a complete torch checkpoint: either it was cut short "
            "(a crash or an interrupted copy), or it is another format such as a plain pickle, which learnkit "
            "never loads because unpickling can run code. Use an earlier checkpoint, or save the file again.")
    if data is not None: source.seek(0)
    try:
        return torch.load(source, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if 'Unsupported' in line), 'see torch.load')
        raise UnsafeCheckpointError(
            f"Refused to load {file} for safety: it contains objects that only arbitrary unpickling can rebuild "
            f"({reason}), and unpickling can run code hidden in the file. learnkit loads only tensors and "
            "plain values, which learn.save and learn.export write. If you made this file yourself with other "
            "objects in it, save their state_dict() instead.") from None


def checkpoint_file(learn, name):
    "A name without suffix is `learn.path/learn.model_dir/{name}.pth`; a path with a suffix is used as given."
    p = Path(name)
    return p if p.suffix else learn.path / learn.model_dir / f'{p}.pth'


def plain(obj, where):
    """`obj` as tensors and plain values only, which `torch.load(weights_only=True)` can read back: numpy
    arrays become tensors and numpy scalars Python numbers. Anything else raises a TypeError naming `where`."""
    if isinstance(obj, (torch.Tensor, str, bytes, bool, int, float, type(None))): return obj
    if isinstance(obj, np.ndarray): return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic): return obj.item()  # sync-ok: a numpy scalar, checkpoint writing
    if isinstance(obj, dict):
        out = {k: plain(v, f'{where}[{k!r}]') for k, v in obj.items()}
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, (list, tuple)):
        out = [plain(v, f'{where}[{i}]') for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    raise TypeError(f"{where} is a {type(obj).__name__}; a checkpoint holds only tensors, numbers, strings, None "
                    "and lists/tuples/dicts of them, so that loading it never unpickles code. Return those "
                    "from the state_dict() that produced it.")


# ---- the training loader's order ------------------------------------------------------------------
def _is_learnkit_loader(dl): return hasattr(dl, 'set_epoch') and hasattr(dl, 'seed')


def epoch_start_state(dl):
    """What a plain torch DataLoader draws its epoch order from (torch's global RNG and its own generator),
    read just before the epoch starts; None for learnkit loaders, whose order is a function of (seed, epoch)."""
    if _is_learnkit_loader(dl): return None
    gen = getattr(dl, 'generator', None)
    return {'torch': torch.get_rng_state(), 'generator': gen.get_state() if gen is not None else None}


def _loader_state(dl, epoch_start):
    if _is_learnkit_loader(dl):
        # Normalize() computes its statistics from a sample drawn with the loader's seed: keep them too.
        norm = find_normalize(dl)
        return {'kind': 'learnkit', 'seed': dl.seed, 'epoch': dl.epoch,
                'normalize': {'mean': norm.mean, 'std': norm.std} if norm is not None else None}
    gen = getattr(dl, 'generator', None)
    return {'kind': 'torch', 'generator': gen.get_state() if gen is not None else None, 'epoch_start': epoch_start}


def _restore_loader(dl, state, resume_at):
    "Put the loader where the checkpoint left it: the next epoch, or mid-epoch for learnkit loaders."
    if state['kind'] == 'learnkit' and _is_learnkit_loader(dl):
        batch = resume_at[1] if resume_at is not None else 0
        dl.seed = state['seed']
        norm = find_normalize(dl)
        if norm is not None and state['normalize'] is not None:
            norm.mean, norm.std = state['normalize']['mean'], state['normalize']['std']
        dl.set_epoch(state['epoch'] + (0 if batch else 1), start_batch=batch)
    elif state['kind'] == 'torch' and state['generator'] is not None and getattr(dl, 'generator', None) is not None:
        dl.generator.set_state(state['generator'])


def find_normalize(dl):
    "The `Normalize` among a loader's batch transforms, once it has statistics."
    for t in getattr(dl, 'batch_tfms', None) or []:
        if type(t).__name__ == 'Normalize' and getattr(t, 'mean', None) is not None: return t
    return None



# ---- learner state --------------------------------------------------------------------------------
def bare_model(model):
    "The model under torch.compile and (Distributed)DataParallel wrappers, whose parameter names are stable."
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)): model = model.module
        elif hasattr(model, '_orig_mod'): model = model._orig_mod
        else: return model


def learner_state(learn, with_opt=True, resume_at=None, epoch_start=None):
    """Everything a fit needs to continue exactly, as tensors and plain values. `resume_at` is
    `(epoch, batch)`, where a resumed fit starts; `epoch_start` the plain DataLoader's `epoch_start_state`."""
    opt = plain(learn.opt.state_dict(), 'the optimizer state') if with_opt and learn.opt is not None else None
    loop = {'epoch': learn.epoch, 'iter': learn.iter, 'n_epoch': learn.n_epoch, 'train_iter': learn.train_iter,
            'pct_train': float(learn.pct_train), 'resume_at': None if resume_at is None else list(resume_at)}
    cbs = {cb.name: plain(sd, f'{type(cb).__name__}.state_dict()') for cb in learn.cbs if (sd := cb.state_dict())}
    return {'format': CHECKPOINT_FORMAT, 'version': VERSION, 'model': bare_model(learn.model).state_dict(),
            'opt': opt, 'loop': loop, 'callbacks': cbs, 'rng': get_rng_states(),
            'data': _loader_state(learn.dls.train, epoch_start) if learn.dls.train is not None else None}


def save_checkpoint(learn, name, with_opt=True, resume_at=None, epoch_start=None):
    "Write `learner_state` atomically to `checkpoint_file(learn, name)`; returns the path."
    return atomic_save(learner_state(learn, with_opt, resume_at, epoch_start), checkpoint_file(learn, name))


def read_checkpoint(file, expected=CHECKPOINT_FORMAT, data=None):
    "`safe_load(file, data)`, checked to be a learnkit file of the `expected` kind."
    state = safe_load(file, data)
    kind = state.get('format') if isinstance(state, dict) else None
    if kind != expected:
        what = {CHECKPOINT_FORMAT: 'a training checkpoint (read it with learn.load)',
                EXPORT_FORMAT: 'an exported learner (read it with load_learner)'}.get(kind, 'not a learnkit file')
        want = 'learn.save' if expected == CHECKPOINT_FORMAT else 'learn.export'
        raise CheckpointError(f"{file} is {what}; this needs a file written by {want}")
    if state.get('version', VERSIONS[expected] + 1) > VERSIONS[expected]:
        raise CheckpointError(f"{file} was written by a newer learnkit (format version {state['version']}); "
                              "upgrade learnkit to read it")
    return state


def load_checkpoint(learn, name, with_opt=True, training_state=True):
    """Restore the checkpoint `name` (see `checkpoint_file`) into `learn`: the model, the optimizer (`with_opt`)
    and, with `training_state`, the loop position, the callbacks' states, the RNG states and the training
    loader's order (a learnkit loader goes on with the epoch after the one saved; a plain DataLoader gets its
    generator's state back). Callbacks not attached to `learn` now (such as those passed to one fit) are
    skipped: `fit(..., resume=...)` restores them too."""
    file = checkpoint_file(learn, name)
    restore(learn, read_checkpoint(file), file, with_opt, training_state)
    return file


def load_checkpoint_from_rank0(learn, name, with_opt=True, training_state=True):
    """`load_checkpoint` for a distributed run, where only rank 0 writes checkpoints, so only it can be relied on
    to have the file: rank 0 reads it and sends its bytes to the other ranks, and every rank restores the same
    state, so the ranks agree afterwards. Every rank must call it. In one process it is `load_checkpoint`."""
    from .callbacks.distributed import broadcast_bytes, is_rank0, num_distrib
    if num_distrib() == 1: return load_checkpoint(learn, name, with_opt, training_state)
    file = checkpoint_file(learn, name)
    data = broadcast_bytes(file.read_bytes() if is_rank0() else None)
    restore(learn, read_checkpoint(file, data=data), file, with_opt, training_state)
    return file


def restore(learn, state, file, with_opt=True, training_state=True):
    "Put a checkpoint read from `file` into `learn`; see `load_checkpoint`."
    load_weights(bare_model(learn.model), state['model'], file)
    if with_opt:
        if state['opt'] is None:
            raise CheckpointError(f"{file} holds no optimizer state (saved with with_opt=False, or before the "
                                  "optimizer existed); load it with with_opt=False")
        if learn.opt is None: learn.create_opt()
        try: learn.opt.load_state_dict(state['opt'])
        except ValueError as e:
            raise CheckpointError(f"{file}: the optimizer state does not fit this optimizer ({e}). Was the model "
                                  "split into parameter groups differently? Load with with_opt=False.") from e
    if not training_state: return
    loop = state['loop']
    learn.epoch, learn.iter, learn.train_iter, learn.pct_train = (loop['epoch'], loop['iter'], loop['train_iter'],
                                                                  loop['pct_train'])
    for cb in learn.cbs:
        if cb.name in state['callbacks']: cb.load_state_dict(state['callbacks'][cb.name])
    set_rng_states(state['rng'])
    if state['data'] is not None and learn.dls.train is not None:
        _restore_loader(learn.dls.train, state['data'], loop['resume_at'])


def load_weights(model, weights, file):
    "`model.load_state_dict(weights)`, a mismatch raised as a CheckpointError naming `file`."
    try: model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{file} does not fit this model ({type(model).__name__}): {e}") from e
