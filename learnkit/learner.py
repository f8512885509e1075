"""The Learner: the training loop, read top to bottom, and the methods users call.

Every phase (fit, epoch, train, validate, batch, backward, step) goes through `_with_events`: run
`before_X`, the body, `after_cancel_X` if the phase was cancelled, then `after_X`. Whatever fit acquires
(temporary callbacks, hooks, a changed loss reduction) is released in `_run_context`'s `finally`.
"""
import contextlib
from pathlib import Path

import torch
from torch import nn

from .callback import CANCEL_EXCEPTIONS, Callback, DispatchTable, _name_origin, noop
from .callbacks.core import GatherPredsCallback, TrainEvalCallback
from .callbacks.progress import ProgressCallback
from .callbacks.recorder import Recorder
from .callbacks import distributed, mixed_precision, schedule
from . import checkpoint, graph_mode, predictions, sanity
from .metrics import as_metric
from .losses import CrossEntropyLossFlat
from .optimizer import Adam, OptimWrapper, as_opt_func
from .torch_core import default_device, listify, to_detach
from .predictions import loss_activation

__all__ = ['Learner', 'default_callbacks', 'default_device']

default_callbacks = [TrainEvalCallback, Recorder, ProgressCallback]


def _detupled(name, doc):
    "A property over the tuple attribute `name`: its one element (or the tuple if it has several); setting it sets it."
    def get(self):
        t = getattr(self, name)
        return t[0] if len(t) == 1 else t
    def set(self, v): setattr(self, name, v if isinstance(v, tuple) else (v,))
    return property(get, set, doc=doc)


class Learner:
    """Trains `model` on `dls` with `loss_func` and `opt_func`, running callbacks at each event.

    `dls` is anything with `.train` and `.valid` iterables of `(x, y)` batches: learnkit's DataLoaders,
    or `DataLoaders(train_dl, valid_dl)` over plain torch DataLoaders. The model, loss and batches move
    to `device` (CUDA when available). `lr` is the default learning rate; `moms` the 1cycle momentums.
    `channels_last=True` keeps the model's 4-D weights and the 4-D input batches in torch.channels_last
    memory format (faster convolutions on tensor-core GPUs, especially with `to_bf16()`); the Learner keeps that
    choice as `memory_format`, leaving the name `learn.channels_last` to fastai's `ChannelsLast` callback.

    As in fastai, an attribute the Learner does not have is its model's: `learn.parameters()`, and so a callback's
    `self.parameters()`, are the model's (see `__getattr__`).
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
        self.metrics = [as_metric(m) for m in listify(metrics)]
        self.path, self.model_dir = Path(path), model_dir
        self.device = torch.device(device) if device is not None else default_device()
        self.memory_format = torch.channels_last if channels_last else None
        self.opt, self.logger = None, print
        # Loop state, read by callbacks through self.learn (or directly, see Callback.__getattr__).
        self.training, self.epoch, self.n_epoch, self.start_epoch, self.start_batch = False, 0, 1, 0, 0
        self.iter, self.n_iter, self.train_iter, self.pct_train = 0, 0, 0, 0.
        self.dl, self.xb, self.yb, self.pred, self.loss, self.loss_grad = None, (), (), None, None, None
        self.cbs, self._dispatch, self._outputs_checked, self._in_fit = [], DispatchTable(), False, False
        self.add_cbs([cb() for cb in default_callbacks] if default_cbs else [])
        self.add_cbs(cbs)
        if default_cbs: self.add_cbs(distributed.torchrun_callbacks(self.cbs))  # DDP when torchrun started us
        self('after_create')

    # ---- what the Learner lacks is its model's (fastai's delegation) ----------------------------
    def __getattr__(self, k):
        """An attribute the Learner does not have is its model's, as in fastai: `learn.parameters()`, and a callback's
        `self.parameters()` (callbacks hand what they lack to the Learner). Python calls this only when normal lookup
        fails, so the Learner's own attributes and its callbacks come first. A name neither has raises an
        AttributeError that names both."""
        if isinstance(getattr(type(self), k, None), property):
            return getattr(type(self), k).fget(self)    # the property itself failed: let its own error through
        model = self.__dict__.get('model')
        if k.startswith('_') or model is None:
            raise AttributeError(f"'Learner' object has no attribute {k!r}", name=k, obj=self)
        try: return getattr(model, k)
        except AttributeError: pass
        raise AttributeError(f"neither the Learner nor its model ({type(model).__name__}) has an attribute {k!r}",
                             name=k, obj=self)

    def _own_attr(self, k):
        "The Learner's own attribute `k` (of the instance or its class, not the model's), or None."
        return self.__dict__[k] if k in self.__dict__ else getattr(type(self), k, None)

    # ---- callbacks ------------------------------------------------------------------------------
    def __call__(self, event):
        "Run `event` on every callback that handles it (see DispatchTable)."
        self._dispatch.run(event, self.training)

    def add_cb(self, cb):
        "Add a callback (an instance or a class); it becomes `learn.<cb.name>`."
        if isinstance(cb, type): cb = cb()
        if not isinstance(cb, Callback):
            raise TypeError(f"Callbacks must subclass learnkit.Callback; got {cb!r}")
        current = self._own_attr(cb.name)
        if current is not None and not isinstance(current, Callback):
            raise ValueError(f"Callback {type(cb).__name__} would be reachable as learn.{cb.name}, which would "
                             f"hide the Learner's own `{cb.name}`; give the class another name")
        cb.learn = self
        setattr(self, cb.name, cb)
        self.cbs.append(cb)
        self._dispatch = DispatchTable(self.cbs)
        return self

    def add_cbs(self, cbs):
        for cb in listify(cbs): self.add_cb(cb)
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
        for cb in listify(cbs): self.remove_cb(cb)
        return self

    @contextlib.contextmanager
    def added_cbs(self, cbs):
        "Callbacks present only inside the `with` block."
        cbs = [cb() if isinstance(cb, type) else cb for cb in listify(cbs)]
        self.add_cbs(cbs)
        try: yield self
        finally: self.remove_cbs(cbs)

    @contextlib.contextmanager
    def removed_cbs(self, cbs):
        "Callbacks absent inside the `with` block, then put back."
        cbs = [c for c in listify(cbs) if c in self.cbs]
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
    def fit(self, n_epoch, lr=None, wd=None, cbs=None, reset_opt=False, start_epoch=0, resume=None, graph=False):
        """Train for `n_epoch` epochs at a constant `lr` (default `self.lr`), with temporary callbacks `cbs`.
        `resume='last'` (or a checkpoint path) continues an interrupted fit exactly; see `ResumeCallback`.
        `graph=True` captures the training step once as a CUDA graph and replays it for every batch (on the CPU the
        same step runs without capture); see `learnkit.graph_mode` for what it supports."""
        lr = self.lr if lr is None else lr
        if lr is None:
            raise ValueError("No learning rate: pass lr to fit (or lr_max to fit_one_cycle), or build "
                             "Learner(..., lr=...). learn.lr_find() suggests one.")
        if not isinstance(n_epoch, int) or n_epoch < 1:
            raise ValueError(f"n_epoch must be a positive int; got {n_epoch!r}")
        if resume is not None: cbs = listify(cbs) + [checkpoint.ResumeCallback(resume)]
        cbs = graph_mode.with_graph_mode(self, cbs, graph)
        with self._run_context(cbs):
            if reset_opt or self.opt is None: self.create_opt()
            if wd is not None: self.opt.set_hyper('wd', wd)
            self.opt.set_hyper('lr', self.lr_values(lr))
            self.n_epoch, self.start_epoch, self.epoch = n_epoch, start_epoch, start_epoch
            was_in_fit, self._in_fit = self._in_fit, True
            try: self._with_events(self._do_fit, 'fit')
            finally:
                self._in_fit = was_in_fit
                for cb in self.cbs: cb.run = True    # as in fastai, `run = False` lasts until the end of the fit

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
            raise ValueError(sanity.empty_loader_message(self.dl))
        graph = self._own_attr('graph_mode')  # fit(graph=True): the replayed step replaces the batch loop
        self._with_events(self._all_batches if graph is None else graph.train_epoch, 'train')

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
        if self.memory_format is not None: self.xb = tuple(_channels_last(x) for x in self.xb)
        self.pred = self.loss = self.loss_grad = None      # a cancelled batch leaves no stale loss behind
        self._with_events(self._do_one_batch, 'batch')

    def _do_one_batch(self):
        self.pred = self.model(*self.xb)
        if not self._outputs_checked: self._check_outputs()
        self('after_pred')
        if self.yb:
            try: self.loss_grad = self.loss_func(self.pred, *self.yb)
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise sanity.loss_error(e, self) from e
            self.loss = self.loss_grad.detach()
        self('after_loss')
        if not self.training or not self.yb: return
        self._with_events(self._do_backward, 'backward')
        self._with_events(self._do_step, 'step')
        self.opt.zero_grad()

    def _check_outputs(self):
        "Once per run, before the first loss: the model's outputs fit the data's classes (see `sanity.check_outputs`)."
        self._outputs_checked = True
        sanity.check_outputs(self)

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
        cbs = [cb() if isinstance(cb, type) else cb for cb in listify(cbs)]
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
        self.model.to(self.device, memory_format=self.memory_format or torch.preserve_format)
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

    def get_preds(self, ds_idx=1, dl=None, with_input=False, with_decoded=False, with_loss=False, act=None, cbs=None,
                  thresh=None):
        """`(predictions, targets[, decoded][, inputs][, losses])` over `dl` (default: loader `ds_idx` of `dls`,
        1 the validation set, 0 the training set, every item once in order, not augmented), on the CPU. `act` is
        applied to the predictions (default: softmax for cross-entropy, sigmoid for BCE-with-logits, else none).
        `with_decoded` adds them decoded as the targets are: class indices, or for a multi-label loss a boolean
        multi-hot tensor of the probabilities above `thresh` (default 0.5, or `loss_func.thresh`)."""
        if thresh is not None and not with_decoded:
            raise ValueError("get_preds(thresh=...) sets the threshold of the decoded predictions: pass "
                             "with_decoded=True too")
        dl = predictions.inference_loader(predictions.loader_for(self.dls, ds_idx)) if dl is None else dl
        gather = GatherPredsCallback(with_input=with_input, with_loss=with_loss)
        with self._run_context([gather] + listify(cbs)), self.no_logging(): self._do_epoch_validate(dl)
        out = gather.result()
        preds = (act if act is not None else loss_activation(self.loss_func))(out[0])
        if not with_decoded: return (preds,) + out[1:]
        decoded = predictions.decode_preds(preds, self.loss_func, getattr(self.dls, 'vocab', None), thresh)
        return (preds, out[1], decoded) + out[2:]

    def predict(self, item, *, thresh=None):
        """Predict one item as the data holds it, as fastai does: an image file's path, a PIL image, or an image
        tensor (uint8 0..255 or float in [0, 1]; (H, W) or (C, H, W)), e.g. `dls.valid.dataset[i][0]`. It is
        prepared as the validation loader prepares its batches (item transforms, scaling, Normalize; see
        `TfmdDL.prepare`); with plain torch loaders, whose transforms learnkit does not know, the tensor goes to
        the model as it is. Returns `(label, class_index, probabilities)`; label comes from `dls.vocab` when there
        is one. A multi-label learner (BCEWithLogitsLoss) returns `(labels, multi-hot booleans, probabilities)`, the
        labels those whose probability is above `thresh` (default 0.5, or `loss_func.thresh`)."""
        self._prepare()
        xb = _item_as_batch(self.dls, item).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(): pred = self.model(xb)
        finally: self.model.train(was_training)
        probs = loss_activation(self.loss_func)(pred[0].float()).cpu()  # sync-ok: one item, on request
        return predictions.decode_item(probs, self.loss_func, getattr(self.dls, 'vocab', None), thresh)

    def tta(self, ds_idx=1, dl=None, n=4, beta=0.25, use_max=False):
        "Test-time augmentation, as fastai's: `(predictions, targets)`; see `learnkit.predictions.tta`."
        return predictions.tta(self, ds_idx, dl, n, beta, use_max)

    def show_results(self, ds_idx=1, dl=None, max_n=9, shuffle=True, figsize=None):
        "A figure of items titled target / prediction (green or red); see `learnkit.predictions.show_results`."
        return predictions.show_results(self, ds_idx, dl, max_n, shuffle, figsize)

    # ---- features: short delegations to their modules --------------------------------------------
    def fit_one_cycle(self, n_epoch, lr_max=None, div=25., div_final=1e5, pct_start=0.25, wd=None, moms=None,
                      cbs=None, reset_opt=False, start_epoch=0, resume=None, graph=False):
        "1cycle training; see `learnkit.callbacks.schedule.fit_one_cycle`."
        return schedule.fit_one_cycle(self, n_epoch, lr_max, div, div_final, pct_start, wd, moms, cbs,
                                      reset_opt, start_epoch, resume, graph)

    def fit_flat_cos(self, n_epoch, lr=None, div_final=1e5, pct_start=0.75, wd=None, cbs=None, reset_opt=False,
                     start_epoch=0, resume=None, graph=False):
        "Flat lr, then cosine annealing; see `learnkit.callbacks.schedule.fit_flat_cos`."
        return schedule.fit_flat_cos(self, n_epoch, lr, div_final, pct_start, wd, cbs, reset_opt, start_epoch,
                                     resume, graph)

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

    def load(self, name, with_opt=True, weights_only=True, training_state=None):
        """Restore what `save` wrote, reading it safely (no unpickling); see `learnkit.checkpoint`.

        `training_state` (the loop position, the callbacks' states, the RNG states, the loader's order) is restored
        by default outside a fit, and not inside one, whose running loop owns them: a callback that loads the best
        weights at `after_fit` (fastai's SaveModelCallback) gets the model and optimizer back, as in fastai.
        `weights_only` is fastai's argument, and learnkit always reads as `torch.load(weights_only=True)` does:
        `weights_only=False` allows unpickling, which learnkit never needs for the files it writes and never does, so
        such a file loads the same; a file that would need unpickling raises `UnsafeCheckpointError` either way."""
        if not isinstance(weights_only, bool):
            raise TypeError(f"weights_only must be True or False; got {weights_only!r}")
        if training_state is None: training_state = not self._in_fit
        try: checkpoint.load_checkpoint(self, name, with_opt=with_opt, training_state=training_state)
        except checkpoint.UnsafeCheckpointError as e:
            if not weights_only: e.add_note("weights_only=False does not make learnkit unpickle: it never does.")
            raise
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

    # ---- the batch and helpers under fastai's names ---------------------------------------------
    x = _detupled('xb', "The batch's input: `xb[0]`, or the tuple `xb` when the model takes several (fastai's `x`).")
    y = _detupled('yb', "The batch's target: `yb[0]`, or the tuple `yb` when there are several (fastai's `y`).")

    def to_detach(self, b, cpu=True, gather=True):
        "`b` detached from the graph, on the CPU with `cpu`, gathered across ranks with `gather`; see `torch_core`."
        return to_detach(b, cpu, gather)

    @property
    def smooth_loss(self):
        "The recorder's smoothed training loss (a device tensor)."
        return self.recorder.smooth_loss.value

    def __repr__(self):
        return f"Learner({type(self.model).__name__}, cbs={[type(c).__name__ for c in self.cbs]})"


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.ndim == 4 else x


def _default_loss(dls):
    loss = getattr(dls, 'loss_func', None)
    if loss is not None: return loss
    if getattr(dls, 'vocab', None) is not None: return CrossEntropyLossFlat()
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
