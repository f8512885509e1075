"""The Learner: the training loop, read top to bottom, and the methods users call.

Every phase (fit, epoch, train, validate, batch, backward, step) goes through `_with_events`: run
`before_X`, the body, `after_cancel_X` if the phase was cancelled, then `after_X`. Whatever fit acquires
(temporary callbacks, hooks, a changed loss reduction) is released in `_run_context`'s `finally`.
"""
import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .callback import CANCEL_EXCEPTIONS, Callback, DispatchTable, _name_origin, noop
from .callbacks.core import GatherPredsCallback, TrainEvalCallback
from .callbacks.progress import ProgressCallback
from .callbacks.recorder import Recorder
from .callbacks import distributed, mixed_precision, schedule
from . import checkpoint
from .metrics import as_metric
from .optimizer import Adam, OptimWrapper, as_opt_func

__all__ = ['Learner', 'default_callbacks', 'default_device']

default_callbacks = [TrainEvalCallback, Recorder, ProgressCallback]


def default_device():
    "CUDA when available, else the CPU."
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


class Learner:
    """Trains `model` on `dls` with `loss_func` and `opt_func`, running callbacks at each event.

    `dls` is anything with `.train` and `.valid` iterables of `(x, y)` batches: learnkit's DataLoaders,
    or `DataLoaders(train_dl, valid_dl)` over plain torch DataLoaders. The model, loss and batches move
    to `device` (CUDA when available). `lr` is the default learning rate; `moms` the 1cycle momentums.
    `channels_last=True` keeps the model's 4-D weights and the 4-D input batches in torch.channels_last
    memory format (faster convolutions on tensor-core GPUs, especially with `to_bf16()`).
    """
    def __init__(self, dls, model, loss_func=None, opt_func=Adam, lr=1e-3, splitter=None, metrics=None,
                 cbs=None, wd=None, wd_bn_bias=False, moms=(0.95, 0.85, 0.95), path='.', model_dir='models',
                 device=None, default_cbs=True, channels_last=False):
        if not (hasattr(dls, 'train') and hasattr(dls, 'valid')):
            raise TypeError(f"dls must have .train and .valid loaders; got {type(dls).__name__}. Wrap plain "
                            "torch DataLoaders as learnkit.DataLoaders(train_dl, valid_dl).")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.dls, self.model = dls, model
        self.loss_func = loss_func if loss_func is not None else _default_loss(dls)
        self.opt_func, self.lr, self.splitter = as_opt_func(opt_func), lr, splitter
        self.wd, self.wd_bn_bias, self.moms = wd, wd_bn_bias, moms
        self.metrics = [as_metric(m) for m in _listify(metrics)]
        self.path, self.model_dir = Path(path), model_dir
        self.device = torch.device(device) if device is not None else default_device()
        self.channels_last = channels_last
        self.opt, self.logger = None, print
        # Loop state, read by callbacks through self.learn (or directly, see Callback.__getattr__).
        self.training, self.epoch, self.n_epoch, self.start_epoch, self.start_batch = False, 0, 1, 0, 0
        self.iter, self.n_iter, self.train_iter, self.pct_train = 0, 0, 0, 0.
        self.dl, self.xb, self.yb, self.pred, self.loss, self.loss_grad = None, (), (), None, None, None
        self.cbs, self._dispatch, self._outputs_checked = [], DispatchTable(), False
        self.add_cbs([cb() for cb in default_callbacks] if default_cbs else [])
        self.add_cbs(cbs)
        if default_cbs: self.add_cbs(distributed.torchrun_callbacks(self.cbs))  # DDP when torchrun started us
        self('after_create')

    # ---- callbacks ------------------------------------------------------------------------------
    def __call__(self, event):
        "Run `event` on every callback that handles it (see DispatchTable)."
        self._dispatch.run(event, self.training)

    def add_cb(self, cb):
        "Add a callback (an instance or a class); it becomes `learn.<cb.name>`."
        if isinstance(cb, type): cb = cb()
        if not isinstance(cb, Callback):
            raise TypeError(f"Callbacks must subclass learnkit.Callback; got {cb!r}")
        current = getattr(self, cb.name, None)
        if current is not None and not isinstance(current, Callback):
            raise ValueError(f"Callback {type(cb).__name__} would be reachable as learn.{cb.name}, which would "
                             f"hide the Learner's own `{cb.name}`; give the class another name")
        cb.learn = self
        setattr(self, cb.name, cb)
        self.cbs.append(cb)
        self._dispatch = DispatchTable(self.cbs)
        return self

    def add_cbs(self, cbs):
        for cb in _listify(cbs): self.add_cb(cb)
        return self

    def remove_cb(self, cb):
        "Remove a callback instance, or every callback of a class."
        if isinstance(cb, type):
            for c in [c for c in self.cbs if isinstance(c, cb)]: self.remove_cb(c)
            return self
        if cb in self.cbs:
            self.cbs.remove(cb)
            if getattr(self, cb.name, None) is cb: delattr(self, cb.name)
            cb.learn = None
            self._dispatch = DispatchTable(self.cbs)
        return self

    def remove_cbs(self, cbs):
        for cb in _listify(cbs): self.remove_cb(cb)
        return self

    @contextlib.contextmanager
    def added_cbs(self, cbs):
        "Callbacks present only inside the `with` block."
        cbs = [cb() if isinstance(cb, type) else cb for cb in _listify(cbs)]
        self.add_cbs(cbs)
        try: yield self
        finally: self.remove_cbs(cbs)

    @contextlib.contextmanager
    def removed_cbs(self, cbs):
        "Callbacks absent inside the `with` block, then put back."
        cbs = [c for c in _listify(cbs) if c in self.cbs]
        self.remove_cbs(cbs)
        try: yield self
        finally: self.add_cbs(cbs)

    @contextlib.contextmanager
    def no_bar(self):
        "No progress display inside the `with` block."
        with self.removed_cbs([c for c in self.cbs if isinstance(c, ProgressCallback)]): yield self

    @contextlib.contextmanager
    def no_logging(self):
        "No per-epoch lines inside the `with` block."
        saved, self.logger = self.logger, noop
        try: yield self
        finally: self.logger = saved

    # ---- optimizer ------------------------------------------------------------------------------
    def create_opt(self):
        "Build the optimizer over the splitter's parameter groups (one group by default)."
        params = self.splitter(self.model) if self.splitter is not None else list(self.model.parameters())
        kw = {} if self.wd is None else {'wd': self.wd}
        self.opt = self.opt_func(params, lr=self._first_lr(), wd_bn_bias=self.wd_bn_bias, **kw)
        if not isinstance(self.opt, OptimWrapper):
            raise TypeError(f"opt_func returned {type(self.opt).__name__}; it must return a learnkit OptimWrapper. "
                            "Pass a torch optimizer class (opt_func=torch.optim.SGD) or learnkit.Adam/SGD.")
        return self.opt

    def _first_lr(self):
        lr = self.lr if self.lr is not None else 1e-3
        return lr.stop if isinstance(lr, slice) else (lr[-1] if isinstance(lr, (list, tuple)) else lr)

    def lr_values(self, lr):
        "`lr` for each parameter group: a number, a list, or a slice (discriminative rates, as in fastai)."
        if not isinstance(lr, slice): return lr
        n = self.opt.n_groups if self.opt is not None else 1
        if lr.start:
            if n == 1: return [lr.stop]
            step = (lr.stop / lr.start) ** (1 / (n - 1))
            return [lr.start * step ** i for i in range(n)]
        return [lr.stop / 10] * (n - 1) + [lr.stop]

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, n_epoch, lr=None, wd=None, cbs=None, reset_opt=False, start_epoch=0, resume=None):
        """Train for `n_epoch` epochs at a constant `lr` (default `self.lr`), with temporary callbacks `cbs`.
        `resume='last'` (or a checkpoint path) continues an interrupted fit exactly; see `ResumeCallback`."""
        lr = self.lr if lr is None else lr
        if lr is None:
            raise ValueError("No learning rate: pass lr to fit (or lr_max to fit_one_cycle), or build "
                             "Learner(..., lr=...). learn.lr_find() suggests one.")
        if not isinstance(n_epoch, int) or n_epoch < 1:
            raise ValueError(f"n_epoch must be a positive int; got {n_epoch!r}")
        if resume is not None: cbs = _listify(cbs) + [checkpoint.ResumeCallback(resume)]
        with self._run_context(cbs):
            if reset_opt or self.opt is None: self.create_opt()
            if wd is not None: self.opt.set_hyper('wd', wd)
            self.opt.set_hyper('lr', self.lr_values(lr))
            self.n_epoch, self.start_epoch, self.epoch = n_epoch, start_epoch, start_epoch
            self._with_events(self._do_fit, 'fit')

    def _do_fit(self):
        for epoch in range(self.start_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, 'epoch')

    def _do_epoch(self):
        self._do_epoch_train()
        self._do_epoch_validate()

    def _do_epoch_train(self):
        self.dl = self.dls.train
        if hasattr(self.dl, '__len__') and len(self.dl) == 0:
            raise ValueError(_empty_loader_message(self.dl))
        self._with_events(self._all_batches, 'train')

    def _do_epoch_validate(self, dl=None):
        self.dl = self.dls.valid if dl is None else dl
        if self.dl is None: return
        with torch.no_grad(): self._with_events(self._all_batches, 'validate')

    def _all_batches(self):
        self.n_iter = len(self.dl) if hasattr(self.dl, '__len__') else 0
        start = self.start_batch if self.training else 0   # > 0 only in an epoch resumed mid-way
        for self.iter, batch in enumerate(self.dl, start): self._one_batch(batch)

    def _one_batch(self, batch):
        batch = self._to_device(batch)
        n_inp = getattr(self.dls, 'n_inp', 1)
        self.xb, self.yb = tuple(batch[:n_inp]), tuple(batch[n_inp:])
        if self.channels_last: self.xb = tuple(_channels_last(x) for x in self.xb)
        self.pred = self.loss = self.loss_grad = None      # a cancelled batch leaves no stale loss behind
        self._with_events(self._do_one_batch, 'batch')

    def _do_one_batch(self):
        self.pred = self.model(*self.xb)
        if not self._outputs_checked: self._check_outputs()
        self('after_pred')
        if self.yb:
            try: self.loss_grad = self.loss_func(self.pred, *self.yb)
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise _loss_error(e, self) from e
            self.loss = self.loss_grad.detach()
        self('after_loss')
        if not self.training or not self.yb: return
        self._with_events(self._do_backward, 'backward')
        self._with_events(self._do_step, 'step')
        self.opt.zero_grad()

    def _check_outputs(self):
        """Once per run, before the first loss: a classifier that returns fewer scores than the data has classes,
        known from the loaders' vocab, or else from labels the datasets hold on the host. Nothing is read from
        the device. On CUDA the loss would fail on such targets with a device-side assert that names nothing and
        leaves the GPU unusable until the process restarts."""
        self._outputs_checked = True
        vocab, pred = getattr(self.dls, 'vocab', None), self.pred
        if not (_is_cross_entropy(self.loss_func) and isinstance(pred, torch.Tensor) and pred.ndim == 2): return
        n_out = pred.shape[1]
        if vocab is not None:
            if n_out < len(vocab):
                raise ValueError(f"The model returns {n_out} scores per item, but the data has {len(vocab)} "
                                 f"classes: build the model with n_out={len(vocab)} (dls.c).")
            return
        # No vocab (plain torch loaders): the labels, when the dataset holds them on the host, read once per run.
        for labels in (_host_labels(getattr(self.dls, 'train', None)), _host_labels(getattr(self.dls, 'valid', None))):
            if labels is None or not len(labels): continue
            low, high = int(labels.min()), int(labels.max())  # sync-ok: host labels, once per run
            if low < 0 or high >= n_out:
                raise ValueError(f"The targets range over [{low}, {high}] but the model has n_out={n_out} outputs: "
                                 f"build the model with n_out={high + 1}, or fix the labels.")

    def _do_backward(self): self.loss_grad.backward()
    def _do_step(self): self.opt.step()

    def _with_events(self, body, phase):
        "The one phase wrapper: before_X, body, after_cancel_X on cancel, after_X."
        try:
            self(f'before_{phase}')
            body()
        except CANCEL_EXCEPTIONS[phase]:
            self(f'after_cancel_{phase}')
        self(f'after_{phase}')

    @contextlib.contextmanager
    def _run_context(self, cbs):
        "Temporary callbacks in, then whatever happens: cleanup_fit on every callback, temporary ones out."
        cbs = [cb() if isinstance(cb, type) else cb for cb in _listify(cbs)]
        self.add_cbs(cbs)
        try:
            self._prepare()
            self._outputs_checked = False
            yield
        except BaseException as e:
            _name_origin(e, self._where())
            raise
        finally:
            try:
                for cb in list(self.cbs): cb.cleanup_fit()
            finally:
                self.remove_cbs(cbs)
                if self.opt is not None: self.opt.zero_grad()  # no half-accumulated gradient leaks into the next fit
                self.training = False

    def _where(self):
        phase = 'training' if self.training else 'validation'
        return f"epoch {self.epoch}, {phase} batch {self.iter}"

    def _prepare(self):
        "Put model, loss and data on the learner's device (cheap when they are there already)."
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        self.model.to(self.device, memory_format=layout)
        if isinstance(self.loss_func, nn.Module): self.loss_func.to(self.device)
        if hasattr(self.dls, 'to'): self.dls.to(self.device)

    def _to_device(self, batch):
        dev = self.device
        return tuple(b.to(dev, non_blocking=True) if isinstance(b, torch.Tensor) else b for b in batch)

    # ---- inference ------------------------------------------------------------------------------
    def validate(self, dl=None, cbs=None):
        "Run the validation loop on `dl` (default `dls.valid`); returns `[valid_loss, *metrics]` as floats."
        with self._run_context(cbs): self._do_epoch_validate(dl)
        return self.recorder.final_record if hasattr(self, 'recorder') else None

    def get_preds(self, dl=None, with_input=False, with_loss=False, act=None, cbs=None):
        """Predictions and targets over `dl` (default `dls.valid`), on the CPU. `act` is applied to the
        predictions (default: softmax for cross-entropy, sigmoid for BCE-with-logits, else none)."""
        gather = GatherPredsCallback(with_input=with_input, with_loss=with_loss)
        with self._run_context([gather] + _listify(cbs)), self.no_logging(): self._do_epoch_validate(dl)
        out = gather.result()
        act = act if act is not None else _loss_activation(self.loss_func)
        return (act(out[0]),) + out[1:]

    def predict(self, item):
        """Predict one item as the data holds it, as fastai does: an image file's path, a PIL image, or an image
        tensor (uint8 0..255 or float in [0, 1]; (H, W) or (C, H, W)), e.g. `dls.valid.dataset[i][0]`. It is
        prepared as the validation loader prepares its batches (item transforms, scaling, Normalize; see
        `TfmdDL.prepare`); with plain torch loaders, whose transforms learnkit does not know, the tensor goes to
        the model as it is. Returns `(label, class_index, probabilities)`; label comes from `dls.vocab` when there
        is one."""
        self._prepare()
        xb = _item_as_batch(self.dls, item).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(): pred = self.model(xb)
        finally: self.model.train(was_training)
        probs = _loss_activation(self.loss_func)(pred[0].float()).cpu()  # sync-ok: one item, on request
        idx = int(probs.argmax())  # sync-ok: CPU probabilities, predict
        vocab = getattr(self.dls, 'vocab', None)
        return (vocab[idx] if vocab is not None else idx), idx, probs

    # ---- features: short delegations to their modules --------------------------------------------
    def fit_one_cycle(self, n_epoch, lr_max=None, div=25., div_final=1e5, pct_start=0.25, wd=None, moms=None,
                      cbs=None, reset_opt=False, start_epoch=0, resume=None):
        "1cycle training; see `learnkit.callbacks.schedule.fit_one_cycle`."
        return schedule.fit_one_cycle(self, n_epoch, lr_max, div, div_final, pct_start, wd, moms, cbs,
                                      reset_opt, start_epoch, resume)

    def fit_flat_cos(self, n_epoch, lr=None, div_final=1e5, pct_start=0.75, wd=None, cbs=None, reset_opt=False,
                     start_epoch=0, resume=None):
        "Flat lr, then cosine annealing; see `learnkit.callbacks.schedule.fit_flat_cos`."
        return schedule.fit_flat_cos(self, n_epoch, lr, div_final, pct_start, wd, cbs, reset_opt, start_epoch,
                                     resume)

    def lr_find(self, start_lr=1e-7, end_lr=10, num_it=100, stop_div=True, show_plot=True):
        "The learning-rate finder; returns SuggestedLRs(valley, minimum, steep). Weights are left unchanged."
        return schedule.lr_find(self, start_lr, end_lr, num_it, stop_div, show_plot)

    def freeze_to(self, n):
        "Freeze the splitter's parameter groups before group `n`; see `learnkit.transfer.freeze_to`."
        from .transfer import freeze_to
        return freeze_to(self, n)

    def freeze(self):
        "Freeze every parameter group but the last (the head), as `freeze_to(-1)`."
        return self.freeze_to(-1)

    def unfreeze(self):
        "Train every parameter group again, as `freeze_to(0)`."
        return self.freeze_to(0)

    def fine_tune(self, epochs, base_lr=2e-3, freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5.0, **kwargs):
        "Frozen 1cycle epochs, then unfrozen ones with discriminative rates; see `learnkit.transfer.fine_tune`."
        from .transfer import fine_tune
        return fine_tune(self, epochs, base_lr, freeze_epochs, lr_mult, pct_start, div, **kwargs)

    def distrib_ctx(self, timeout=distributed.DEFAULT_TIMEOUT, **ddp_kwargs):
        "Data-parallel training inside a `with` block; see `learnkit.callbacks.distributed.distrib_ctx`."
        return distributed.distrib_ctx(self, timeout, **ddp_kwargs)

    def save(self, name, with_opt=True):
        "Write the full training state to `path/model_dir/{name}.pth` atomically; see `learnkit.checkpoint`."
        return checkpoint.save_checkpoint(self, name, with_opt=with_opt)

    def load(self, name, with_opt=True):
        "Restore what `save` wrote, reading it safely (no unpickling); see `learnkit.checkpoint`."
        checkpoint.load_checkpoint(self, name, with_opt=with_opt)
        return self

    def export(self, path='export.pth', with_tfms=True):
        "Write weights, model spec, vocab and the validation transforms to `path/{path}`; see `export_learner`."
        return checkpoint.export_learner(self, path, with_tfms)

    def compile(self, **kwargs):
        """Compile the model in place with `torch.compile(**kwargs)` (mode, backend, dynamic...): `learn.model`
        keeps its class, submodules and parameter names. Forward hooks (ActivationStats) keep working: adding
        or removing them costs one recompile."""
        # torch does not guard on module hooks by default: a hook added after the first compiled call would
        # never run and a removed one would keep running (seen in torch 2.14). Guarding on them fixes that.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        self.model.compile(**kwargs)
        return self

    def to_fp16(self, **scaler_kwargs):
        "Mixed precision with float16 and loss scaling (kwargs go to torch.amp.GradScaler); see MixedPrecision."
        return mixed_precision.to_mixed_precision(self, torch.float16, **scaler_kwargs)

    def to_bf16(self):
        "Mixed precision with bfloat16 (no loss scaling); see MixedPrecision."
        return mixed_precision.to_mixed_precision(self, torch.bfloat16)

    def to_fp32(self):
        "Full precision again: removes MixedPrecision."
        return mixed_precision.to_fp32(self)

    def summary(self):
        "Input shape, each layer's output shape and parameters, totals, optimizer, loss and callbacks."
        from .summary import summary
        return summary(self)

    def diagnose(self, show=True, **thresholds):
        "The health report of the last fit; see `learnkit.diagnostics.health.diagnose`."
        from .diagnostics.health import diagnose
        return diagnose(self, show=show, **thresholds)

    @property
    def smooth_loss(self):
        "The recorder's smoothed training loss (a device tensor)."
        return self.recorder.smooth_loss.value

    def __repr__(self):
        return f"Learner({type(self.model).__name__}, cbs={[type(c).__name__ for c in self.cbs]})"


def _listify(x):
    if x is None: return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.ndim == 4 else x


def _default_loss(dls):
    loss = getattr(dls, 'loss_func', None)
    if loss is not None: return loss
    if getattr(dls, 'vocab', None) is not None: return nn.CrossEntropyLoss()
    raise ValueError("loss_func=None and the data loaders do not say which loss fits them: pass one, e.g. "
                     "Learner(dls, model, loss_func=nn.CrossEntropyLoss()) for classification.")


def _item_as_batch(dls, item):
    "One item as a batch of one: through the loaders' preparation when learnkit knows it (TfmdDL, a loaded export)."
    prepare = getattr(getattr(dls, 'valid', None), 'prepare', None) or getattr(dls, 'prepare', None)
    if prepare is not None: return prepare(item)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"predict with plain torch loaders takes the input tensor of one item, as the model takes it "
                        f"without the batch dimension; got {type(item).__name__}")
    return item[None]


def _host_labels(dl):
    """The integer class labels of a loader's dataset when they are on the host (a TensorDataset's last tensor,
    or a torchvision-style `targets`), else None: reading them costs no device sync."""
    ds = getattr(dl, 'dataset', None)
    labels = ds.tensors[-1] if isinstance(ds, TensorDataset) else getattr(ds, 'targets', None)
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], int): labels = torch.tensor(labels)
    if (not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point()
            or labels.device.type != 'cpu'):
        return None
    return labels


def _is_cross_entropy(loss_func):
    return isinstance(loss_func, nn.CrossEntropyLoss) or getattr(loss_func, '__name__', '') == 'cross_entropy'


def _loss_activation(loss_func):
    if _is_cross_entropy(loss_func): return lambda p: torch.softmax(p, dim=-1)
    if isinstance(loss_func, nn.BCEWithLogitsLoss): return torch.sigmoid
    return lambda p: p


def _empty_loader_message(dl):
    n = getattr(dl, 'n', None)
    if n is None and hasattr(dl, 'dataset'):
        try: n = len(dl.dataset)
        except TypeError: n = None
    bs, drop_last = getattr(dl, 'bs', getattr(dl, 'batch_size', None)), getattr(dl, 'drop_last', None)
    return (f"The training loader yields no batches ({n} items, batch size {bs}, drop_last={drop_last}). "
            "Use more training data, a smaller bs, or drop_last=False.")


def _loss_error(e, learn):
    "A ValueError that names the loss, the shapes and dtypes it got, and the likely fix."
    pred, targ = learn.pred, learn.yb[0]
    name = getattr(learn.loss_func, '__name__', type(learn.loss_func).__name__)
    desc = (f"pred of shape {tuple(pred.shape)} ({pred.dtype}) and target of shape "
            f"{tuple(getattr(targ, 'shape', ()))} ({getattr(targ, 'dtype', type(targ).__name__)})")
    hint = ''
    if isinstance(targ, torch.Tensor) and isinstance(pred, torch.Tensor):
        if pred.shape[0] != targ.shape[0]:
            hint = "The batch sizes differ: does the model flatten or reshape the batch dimension away?"
        elif targ.is_floating_point() and pred.ndim == targ.ndim + 1:
            hint = ("The targets are floats where class indices are expected: convert them with .long() "
                    "(or use a regression loss such as nn.MSELoss).")
        elif not targ.is_floating_point() and pred.ndim >= 2 and targ.numel():
            n_out, t_max, t_min = pred.shape[1], int(targ.max()), int(targ.min())  # sync-ok: error path only
            if t_max >= n_out or t_min < 0:
                hint = (f"The targets range over [{t_min}, {t_max}] but the model has n_out={n_out} outputs: "
                        f"build the model with n_out={t_max + 1} (dls.c), or fix the labels.")
            elif pred.ndim > targ.ndim + 1:
                hint = ("The model's output has extra dimensions: end it with Flatten() (as simple_cnn does) "
                        "so it returns (batch, n_classes).")
    return ValueError(f"loss_func {name} failed on {desc}: {str(e).rstrip('.')}. {hint}".rstrip())
