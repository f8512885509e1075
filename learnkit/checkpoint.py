"""Checkpoints that continue a fit exactly, written atomically and read back without running code.

A checkpoint is one `torch.save` file made only of tensors and plain values (numbers, strings, lists,
tuples, dicts): the model and optimizer states, the loop position, every callback's `state_dict()` (the
recorder's history, the trackers' best values, a GradScaler...), the RNG states of torch, CUDA, numpy and
python, and the training loader's order. It is written to a temporary file in the same folder, fsynced,
renamed over the old one and the folder fsynced, so a crash mid-write leaves the previous checkpoint whole.
It is read with `torch.load(weights_only=True)`: a file that needs arbitrary unpickling (and could run code
on load, as fastai's `load_learner` allows) is refused with `UnsafeCheckpointError`.

`export_learner` / `load_learner` write and read an inference file in the same safe format: weights,
vocab, the model's registry name and arguments (`model.learnkit_spec`), and how an item becomes the model's
input (the image mode and the transforms that act in validation, as names and arguments).
"""
import io
import os
import pickle
import random
import secrets
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .callback import Callback

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'atomic_save', 'safe_load', 'checkpoint_file', 'plain',
           'learner_state', 'save_checkpoint', 'read_checkpoint', 'load_checkpoint', 'restore', 'get_rng_states',
           'set_rng_states', 'epoch_start_state', 'bare_model', 'ResumeCallback', 'export_learner', 'ExportedData',
           'load_learner', 'is_main_process']

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


# ---- RNG states -----------------------------------------------------------------------------------
def get_rng_states():
    "The RNG states of torch (CPU and every CUDA device in use), numpy and python, as tensors and numbers."
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {'torch': torch.get_rng_state(),
              'python': {'version': py_version, 'state': torch.tensor(py_state, dtype=torch.int64),
                         'gauss_next': py_gauss},
              'numpy': {'kind': np_kind, 'keys': torch.from_numpy(np_keys.astype(np.int64)), 'pos': int(np_pos),
                        'has_gauss': int(np_has_gauss), 'cached_gaussian': float(np_gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized(): states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    "Restore what `get_rng_states` returned (CUDA states only where CUDA is available)."
    torch.set_rng_state(states['torch'])
    py = states['python']
    random.setstate((py['version'], tuple(py['state'].tolist()), py['gauss_next']))  # sync-ok: CPU tensor, checkpoint loading
    n = states['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],  # sync-ok: CPU tensor, checkpoint loading
                         n['cached_gaussian']))
    if 'cuda' in states and torch.cuda.is_available():
        for i, s in enumerate(states['cuda'][:torch.cuda.device_count()]): torch.cuda.set_rng_state(s, i)


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
        norm = _find_normalize(dl)
        return {'kind': 'learnkit', 'seed': dl.seed, 'epoch': dl.epoch,
                'normalize': {'mean': norm.mean, 'std': norm.std} if norm is not None else None}
    gen = getattr(dl, 'generator', None)
    return {'kind': 'torch', 'generator': gen.get_state() if gen is not None else None, 'epoch_start': epoch_start}


def _restore_loader(dl, state, resume_at):
    "Put the loader where the checkpoint left it: the next epoch, or mid-epoch for learnkit loaders."
    if state['kind'] == 'learnkit' and _is_learnkit_loader(dl):
        batch = resume_at[1] if resume_at is not None else 0
        dl.seed = state['seed']
        norm = _find_normalize(dl)
        if norm is not None and state['normalize'] is not None:
            norm.mean, norm.std = state['normalize']['mean'], state['normalize']['std']
        dl.set_epoch(state['epoch'] + (0 if batch else 1), start_batch=batch)
    elif state['kind'] == 'torch' and state['generator'] is not None and getattr(dl, 'generator', None) is not None:
        dl.generator.set_state(state['generator'])


class _StartedLoader:
    "A plain DataLoader's iterator already moved past the batches a resumed epoch had done."
    def __init__(self, dl, batches): self.dl, self.batches = dl, batches
    def __iter__(self): return self.batches
    def __len__(self): return len(self.dl)
    def __getattr__(self, k): return getattr(self.__dict__['dl'], k)


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
    _load_weights(bare_model(learn.model), state['model'], file)
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


def _load_weights(model, weights, file):
    try: model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{file} does not fit this model ({type(model).__name__}): {e}") from e


# ---- resuming a fit -------------------------------------------------------------------------------
class ResumeCallback(Callback):
    """Added by `fit(..., resume=...)`: restores an interrupted fit from a checkpoint, mid-epoch included.

    `resume='last'` is the `{fname}_last.pth` that `SaveModelCallback` keeps (fname 'model' by default);
    a path or name picks another checkpoint written by `SaveModelCallback`. It runs after every other
    callback's `before_fit`, which resets their state, and puts back the checkpoint's. A plain torch
    DataLoader is replayed from the RNG state it drew the interrupted epoch's order from, and moved past
    the batches already done; a learnkit loader starts there directly (`set_epoch(epoch, start_batch)`).
    """
    order = 1000

    def __init__(self, resume):
        if not (resume == 'last' or isinstance(resume, (str, os.PathLike))):
            raise TypeError(f"resume must be 'last' or a checkpoint path; got {resume!r}")
        self.resume, self.file, self._pending, self.epoch_start = resume, None, None, None

    def resume_file(self):
        "The checkpoint to resume from."
        if self.resume != 'last': return checkpoint_file(self.learn, self.resume)
        saver = next((cb for cb in self.learn.cbs if hasattr(cb, 'last_name')), None)
        file = checkpoint_file(self.learn, saver.last_name if saver is not None else 'model_last')
        if not file.is_file():
            raise FileNotFoundError(f"fit(resume='last') found no checkpoint at {file}. A fit writes one when it "
                                    "runs with SaveModelCallback (every epoch, and every_n_batches=N mid-epoch); "
                                    "pass resume=None to start afresh, or resume=<path>.")
        return file

    def before_fit(self):
        learn = self.learn
        self.file = self.resume_file()
        state = read_checkpoint(self.file)
        loop = state['loop']
        if loop['resume_at'] is None:
            raise CheckpointError(f"{self.file} was written by learn.save, not by SaveModelCallback during a fit, so "
                                  "it does not say where to continue: learn.load it and start a new fit instead")
        if loop['n_epoch'] != learn.n_epoch:
            raise ValueError(f"{self.file} comes from a fit of {loop['n_epoch']} epochs, but this fit has "
                             f"{learn.n_epoch}: resume with the same n_epoch (and schedule) to continue it exactly")
        missing = sorted(set(state['callbacks']) - {cb.name for cb in learn.cbs})
        if missing:
            warnings.warn(f"Resuming from {self.file} without the callbacks {missing} that were saved in it; "
                          "their state is not restored. Pass them to fit again to continue exactly.", stacklevel=2)
        restore(learn, state, self.file)
        epoch, batch = loop['resume_at']
        learn.start_epoch = learn.epoch = epoch
        if batch:
            learn.start_batch = batch
            self.epoch_start = (state['data'] or {}).get('epoch_start')
            self._pending = (batch, loop['pct_train'], state['rng'], state['data'])

    def before_train(self):
        "Mid-epoch: start the loader after the done batches, then restore the RNG as it was after them."
        if self._pending is None: return
        batch, pct_train, rng, data = self._pending
        self._pending = None
        learn = self.learn
        learn.pct_train = pct_train
        if data is not None and data['kind'] == 'torch':
            if data['epoch_start'] is None:
                raise CheckpointError(f"{self.file} was saved mid-epoch without the state a plain DataLoader drew "
                                      "that epoch's order from; resume from an epoch-end checkpoint instead")
            torch.set_rng_state(data['epoch_start']['torch'])
            if data['epoch_start']['generator'] is not None: learn.dl.generator.set_state(data['epoch_start']['generator'])
            batches = iter(learn.dl)
            for _ in range(batch): next(batches)
            learn.dl = _StartedLoader(learn.dl, batches)
            if data['generator'] is not None: learn.dl.generator.set_state(data['generator'])
        set_rng_states(rng)

    def after_train(self): self.learn.start_batch = 0
    def cleanup_fit(self): self.learn.start_batch = 0


# ---- export for inference -------------------------------------------------------------------------
def export_learner(learn, path='export.pth', with_tfms=True):
    """Write what inference needs to `learn.path/path`, with no pickled code: the weights, the model's
    registry name and arguments (`model.learnkit_spec`, from `learnkit.models.register_model`), the vocab,
    the loss function's torch.nn class name, and how the validation loader prepares an item (`TfmdDL.pipeline`):
    the image mode ('L' or 'RGB', as the training data), the item transforms (Resize...) and the batch
    transforms that act in validation (Normalize...), each as its name and arguments (`to_spec()`).

    A transform that cannot be written so (a class not registered with `register_transform`) raises a
    TypeError naming it. `with_tfms=False` writes no transforms (only the image mode and the Normalize
    statistics); pass them again to `load_learner(path, item_tfms=..., batch_tfms=...)`."""
    model = bare_model(learn.model)
    spec = getattr(model, 'learnkit_spec', None)
    vocab = getattr(learn.dls, 'vocab', None)
    norm = _find_normalize(getattr(learn.dls, 'train', None))
    loss = type(learn.loss_func)
    pipe = getattr(getattr(learn.dls, 'valid', None), 'pipeline', None)  # None for plain torch loaders
    if pipe is None: pipeline = None
    elif with_tfms: pipeline = pipe.to_spec()
    else: pipeline = {'mode': pipe.mode, 'item_tfms': None, 'batch_tfms': None}
    state = {'format': EXPORT_FORMAT, 'version': VERSIONS[EXPORT_FORMAT], 'state_dict': model.state_dict(),
             'model': plain(spec, 'model.learnkit_spec') if spec is not None else None,
             'model_class': f'{type(model).__module__}.{type(model).__qualname__}',
             'vocab': plain(list(vocab), 'dls.vocab') if vocab is not None else None,
             'normalize': {'mean': norm.mean, 'std': norm.std} if norm is not None else None,
             'pipeline': pipeline, 'n_inp': getattr(learn.dls, 'n_inp', 1),
             'loss_func': loss.__name__ if getattr(nn, loss.__name__, None) is loss else None}
    return atomic_save(state, Path(learn.path) / path)


def _find_normalize(dl):
    "The `Normalize` among a loader's batch transforms, once it has statistics."
    for t in getattr(dl, 'batch_tfms', None) or []:
        if type(t).__name__ == 'Normalize' and getattr(t, 'mean', None) is not None: return t
    return None


class ExportedData:
    """The data side of a loaded learner: no loaders, but the `vocab`, `c`, `n_inp` and the `pipeline` (an
    `ItemPipeline`) that makes an item into the model's input as the validation loader did."""
    train = valid = None

    def __init__(self, vocab, pipeline, n_inp):
        self.vocab, self.pipeline, self.n_inp = vocab, pipeline, n_inp

    @property
    def c(self): return len(self.vocab) if self.vocab is not None else None

    @property
    def normalize(self):
        "The pipeline's `Normalize`, or None."
        return next((t for t in self.pipeline.batch_tfms if type(t).__name__ == 'Normalize'), None)

    def prepare(self, item):
        """One item (an image file's path, a PIL image or an image tensor) as a float batch of one, as the
        validation loader made its batches: decoded in the exported image mode, through the item transforms
        (Resize...), scaled, then through the batch transforms that act in validation (Normalize...)."""
        return self.pipeline(item, 'cpu')

    def __repr__(self): return f"ExportedData(vocab={self.vocab}, pipeline={self.pipeline})"


def _exported_pipeline(state, file, item_tfms, batch_tfms):
    "The `ItemPipeline` of an export: the transforms the file names, each replaced by `item_tfms`/`batch_tfms` if given."
    from .data.items import ItemPipeline, mode_for
    from .data.loaders import check_batch_tfms
    from .data.specs import transform_from_spec
    from .data.transforms import Normalize, check_item_tfms
    norm = state['normalize']
    # A version-1 file (or one written with_tfms=False) has no transforms: only its Normalize, whose channel
    # count gives the mode files are decoded in.
    spec = state.get('pipeline') or {'mode': mode_for(len(norm['mean'])) if norm is not None else None,
                                     'item_tfms': None, 'batch_tfms': None}
    if item_tfms is None: item_tfms = [transform_from_spec(t, file) for t in spec['item_tfms'] or ()]
    if batch_tfms is None:
        if spec['batch_tfms'] is not None: batch_tfms = [transform_from_spec(t, file) for t in spec['batch_tfms']]
        else: batch_tfms = [Normalize(norm['mean'], norm['std'])] if norm is not None else []
    return ItemPipeline(spec['mode'], check_item_tfms(item_tfms), check_batch_tfms(batch_tfms))


def load_learner(path, model=None, loss_func=None, device=None, item_tfms=None, batch_tfms=None):
    """A Learner for inference from a file written by `learn.export`, read without unpickling anything.

    The model is rebuilt from learnkit's registry (`get_model(name, **kwargs)`) unless `model` is given:
    an `nn.Module` to load the weights into, or a callable called with the saved constructor arguments
    (none if the model was not built by a registered constructor). The exported transforms are rebuilt by
    name (`register_transform`); `item_tfms` / `batch_tfms`, when given, replace them. `learn.predict(item)`
    then prepares a file, PIL image (any mode: converted to the training data's L or RGB) or image tensor of
    any size as the validation loader did: item transforms (Resize...), scaling, Normalize.

    Files exported before learnkit exported transforms (or with `with_tfms=False`) hold only the Normalize
    statistics: their inputs must already have the training size, unless `item_tfms` is given."""
    from .learner import Learner
    from .models import get_model
    state = read_checkpoint(path, EXPORT_FORMAT)
    spec = state['model']
    if isinstance(model, nn.Module): net = model
    elif callable(model): net = model(**(spec['kwargs'] if spec is not None else {}))
    elif model is None:
        if spec is None:
            raise ValueError(f"{path} holds the weights of a {state['model_class']}, which was not built by a "
                             "registered constructor, so it cannot be rebuilt by name: pass model=<the module or "
                             "a function that builds it> (or decorate its constructor with @register_model)")
        net = get_model(spec['name'], **spec['kwargs'])
    else: raise TypeError(f"model must be None, an nn.Module or a callable that builds one; got {model!r}")
    if not isinstance(net, nn.Module):
        raise TypeError(f"model={model!r} returned {type(net).__name__}, not an nn.Module")
    _load_weights(net, state['state_dict'], path)
    dls = ExportedData(state['vocab'], _exported_pipeline(state, path, item_tfms, batch_tfms), state['n_inp'])
    if loss_func is None and state['loss_func'] is not None: loss_func = getattr(nn, state['loss_func'])()
    if loss_func is None and dls.vocab is None:
        raise ValueError(f"{path} records neither a torch.nn loss nor a vocab; pass loss_func=...")
    return Learner(dls, net.eval(), loss_func=loss_func, device=device)
