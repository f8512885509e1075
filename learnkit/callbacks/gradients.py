"""GradientStats: per-layer gradient norms, update:data ratios and dead ReLU units, recorded on the device.

Per recorded step it uses torch's multi-tensor (`_foreach_*`) ops: before the optimizer step one `_foreach_norm`
over the gradients and the weights together and one `_foreach_copy_` snapshot of the weights; after it one
`_foreach_sub_` and one `_foreach_norm` of the update, so the update measured is the one the optimizer really made
(momentum, weight decay, Adam's scaling and the lr included). Each `_foreach_norm`'s per-parameter norms are
stacked straight into a staging block of 16 steps, which is appended to the records when full: six ops per step,
of four kinds (on a CPU each kind of op costs most the first time it runs in a step, its code having left the
cache during the forward and backward passes). The norms are combined per layer, and the ratios taken, when the
records are read.
Dead units are tracked with forward hooks on the ReLUs: a ReLU's outputs are never negative, so a channel was never
positive exactly when the sum of its outputs is 0. Each batch adds its outputs, summed over the images, into a
running (channel x position) buffer with one matrix product (`ones @ output`, a BLAS call: a per-channel max over
the batch and spatial dimensions is a strided reduction that costs several times as much); the positions are
summed per channel when the window closes. Each closed window records those per-channel sums, and the dead
fraction is computed when the records are read, so that under DDP the windows combine across ranks with a max (a
channel is dead only if no rank saw it positive).
"""
import warnings

import torch
from torch import nn

from ..records import TensorLog
from .collectives import all_reduce_max
from .gradient_graph import GraphGradients
from .hooks import Hooks, default_modules, module_names, without_grad
from .stats import StatsCallback

__all__ = ['GradientStats', 'RELU_TYPES']

RELU_TYPES = (nn.ReLU, nn.ReLU6)  # activations whose zero region makes a unit "dead"
# Of the checkpoint state. 1: dead fractions per window (could not be combined across ranks); 2: per-channel maxima
# and per-layer norms; 3: per-channel sums and per-parameter norms.
_STATE_VERSION = 3
_STAGE = 16  # steps staged before they are appended to the records


class GradientStats(GraphGradients, StatsCallback):
    """Records, for every training step (or every `every`-th) and every layer with a trainable parameter (frozen
    layers, whose parameters all have requires_grad=False when fit begins, are left out):
    - `grad_norm`: the L2 norm of the layer's gradients (all its parameters together), read just before
      the optimizer step (after any clipping done by callbacks with a lower `order`);
    - `update_ratio`: ||w_after - w_before|| / ||w_before||, the size of the step the optimizer really took
      relative to the weights (lr included); a healthy value is around 1e-3;
    and, for every `nn.ReLU`/`nn.ReLU6` in the model, `dead`: the fraction of its units (channels) whose
    output was never positive over a window of `dead_window` recorded batches (NaN for a ReLU that did not run
    in the window). A ReLU module applied to outputs of different widths (one instance reused across a block)
    keeps the units of the first width it saw; calls with another width are left out, with a warning.

    Cost and memory: nothing syncs per step. The update ratio needs one copy of the weights (the model's
    parameter memory once more). Records are `steps x 3 x parameter tensors` float32 numbers (per parameter tensor:
    its gradient's norm, its norm and its update's norm; combined per layer when read), plus one per ReLU channel
    per window. Read them with `stats`, `plot_grad_norms()`, `plot_update_ratios()`, `plot_dead_units()` or
    `plot_all()`.

    In graph mode (`fit(..., graph=True)`) the same records are made inside the captured step, at device-side rows,
    and the epoch's rows join the records at its end (see gradient_graph.py).
    """
    order = 80  # after callbacks that clip or unscale gradients in before_step
    record_schema = {'norms': "per step and parameter tensor: the L2 norms of its gradient before the step, of its "
                              "weights before the step, and of the step's update (w_before - w_after)",
                     'window_sum': "per closed window and ReLU channel: the sum of the channel's outputs over the "
                                   "window (-inf: the ReLU did not run); the channel is dead when it is <= 0"}

    def __init__(self, every=None, dead_window=50, modules=None):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int (record every N-th training step) or None; got {every!r}")
        if not isinstance(dead_window, int) or dead_window < 1:
            raise ValueError(f"dead_window must be a positive int (batches per dead-unit window); got {dead_window!r}")
        self.every, self.dead_window, self.modules = every, dead_window, modules
        self.layer_names, self.relu_names, self.iters, self.dead_iters, self.lr_shares = [], [], [], [], None
        self._relu_hooks, self._active, self._snapped = None, False, False
        self.param_layers, self._staged_rows, self._staged = [], None, 0
        self._reset_records(0)

    def _reset_records(self, n_relus):
        self._log = TensorLog()  # per step: (3, parameter tensors) gradient, weight and update norms
        # Per ReLU: its closed windows' per-channel sums, its open window (see _OpenWindow; None until it runs in
        # it), its number of channels (None until it first runs) and its windows closed before that.
        self._window_sums = [TensorLog() for _ in range(n_relus)]
        self._open_windows = [None] * n_relus
        self._ones_rows = {}  # (batch size, dtype) -> a (1, batch size) row of ones, made once
        self._relu_widths, self._windows_before_width = [None] * n_relus, [0] * n_relus
        self._width_warned = [False] * n_relus
        self.iters, self.dead_iters, self._in_window = [], [], 0

    def before_fit(self):
        self._remove()
        model, dev = self.learn.model, self.learn.device
        recurse = self.modules is not None
        # Layers with a trainable parameter: a frozen layer has no gradient to measure (a norm of 0 would read as a
        # vanishing gradient; WeightStats reports the layer as unchanged).
        layers = [m for m in (list(self.modules) if self.modules is not None else default_modules(model))
                  if any(p.requires_grad for p in m.parameters(recurse=recurse))]
        self._params, self.param_layers = [], []
        for i, m in enumerate(layers):
            for p in m.parameters(recurse=recurse):
                if p.requires_grad: self._params.append(p); self.param_layers.append(i)
        if not self._params:
            raise ValueError(f"GradientStats found no trainable parameters in the layers of {type(model).__name__}: "
                             "every one is frozen (requires_grad=False). Unfreeze some (learn.unfreeze()) or fit "
                             "without GradientStats")
        self.layer_names = module_names(model, layers)
        self._prev = [torch.empty_like(p) for p in self._params]
        self._zeros = {}
        n = len(self._params)
        self._staged_rows, self._staged = torch.zeros(_STAGE, 3, n, device=dev), 0
        # Per staged step: its gradient and weight norms as one 2n vector (one stack fills both), its update norms.
        # Made once: a view is an op too.
        self._slots = [(row[:2].view(-1), row[2]) for row in self._staged_rows.unbind(0)]
        relus = [m for m in model.modules() if isinstance(m, RELU_TYPES)]
        self.lr_shares = self._lr_shares(layers)
        self.relu_names = module_names(model, relus)
        self._relu_index = {id(m): j for j, m in enumerate(relus)}
        self._reset_records(len(relus))
        # Not detached per call (two more ops per ReLU per batch): the hook runs with grad mode off instead.
        self._relu_hooks = Hooks(relus, self._relu_hook, detach=False) if relus else None

    def _lr_shares(self, layers):
        """Per layer, the learning rate of its parameters' group over the fit's largest (1 for every layer without
        discriminative learning rates; 0.01 for a body trained at lr/100 by fine_tune), read from the optimizer at the
        start of fit; None when the rates are not plain numbers (graph mode's device tensors are not read)."""
        opt = getattr(self.learn, 'opt', None)
        if opt is None: return None
        lr_of = {}
        for group in opt.param_groups:
            lr = group.get('lr')
            if isinstance(lr, bool) or not isinstance(lr, (int, float)): return None
            for p in group['params']: lr_of[id(p)] = lr
        top = max(lr_of.values(), default=0)
        if top <= 0: return None
        recurse = self.modules is not None
        return [max(lr_of.get(id(p), 0) for p in m.parameters(recurse=recurse) if p.requires_grad) / top
                for m in layers]

    def before_batch(self):
        self._iter = self.learn.train_iter  # read now: TrainEvalCallback advances it before our after_batch
        self._active = self.learn.training and (self.every is None or self._iter % self.every == 0)
        self._snapped = False

    def _relu_hook(self, module, inp, out):
        if self._active and out.ndim >= 2: without_grad(self._add_channel_sums, module, out)

    def _add_channel_sums(self, module, out):
        j = self._relu_of(module, out)
        if j is None: return
        window = self._open_windows[j]
        if window is None: window = self._open_windows[j] = _OpenWindow(out.shape[1])
        window.add(out, self._ones_row(out))

    def _relu_of(self, module, out):
        "ReLU `module`'s index, or None when `out` has another width than its first (warned once)."
        j = self._relu_index[id(module)]
        width = self._relu_widths[j]
        if width is None: self._first_width(j, out.shape[1])
        elif out.shape[1] != width:
            self._warn_width(j, out.shape[1])
            return None
        return j

    def _ones_row(self, out):
        "A (1, batch) row of ones in `out`'s dtype: the product with it sums a batch over its images. Made once."
        key = (out.shape[0], out.dtype)
        ones = self._ones_rows.get(key)
        if ones is None: ones = self._ones_rows[key] = torch.ones(1, out.shape[0], dtype=out.dtype, device=out.device)
        return ones

    def _first_width(self, j, width):
        "ReLU j's first run in this fit: its windows closed before are recorded as 'did not run'."
        self._relu_widths[j] = width
        missed = self._windows_before_width[j]
        if missed: self._window_sums[j].extend(torch.full((missed, width), -torch.inf, device=self.learn.device))

    def _warn_width(self, j, width):
        if self._width_warned[j]: return
        self._width_warned[j] = True
        warnings.warn(f"GradientStats: {self.relu_names[j]} is applied to outputs of {width} channels as well as "
                      f"{self._relu_widths[j]}; its dead units count the {self._relu_widths[j]} channels only. Give "
                      "each use its own nn.ReLU to track them all", RuntimeWarning, stacklevel=4)

    @torch.no_grad()
    def before_step(self):
        if not self._active: return
        grads = [p.grad if p.grad is not None else self._zero(p) for p in self._params]
        torch.stack(torch._foreach_norm(grads + self._params), out=self._slots[self._staged][0])
        torch._foreach_copy_(self._prev, self._params)
        self._snapped = True

    def after_cancel_step(self):
        # A callback before us skipped the step (MixedPrecision on an fp16 overflow): nothing to measure this batch.
        if not self._snapped: self._active = False

    @torch.no_grad()
    def after_step(self):
        if not self._active: return
        torch._foreach_sub_(self._prev, self._params)  # now w_before - w_after
        torch.stack(torch._foreach_norm(self._prev), out=self._slots[self._staged][1])
        # Counted here rather than in after_batch, so that a checkpoint written in this batch's after_batch
        # (SaveModelCallback runs before us there) already holds this step.
        self._staged += 1
        if self._staged == _STAGE: self._flush()
        self.iters.append(self._iter)
        self._in_window += 1
        if self._in_window == self.dead_window: self._close_window()

    def after_batch(self): self._active = False

    def after_fit(self):
        if self._in_window: self._close_window()
        self._remove()

    def cleanup_fit(self):
        self._flush()  # however fit ended, the steps recorded are kept
        self._remove()

    def _flush(self):
        "Append the staged steps to the records (one copy)."
        if self._staged:
            self._log.extend(self._staged_rows[:self._staged])
            self._staged = 0

    def _close_window(self):
        "Record each ReLU's per-channel sums over the window (no copy: the next window starts new ones)."
        if self._open_windows:
            for j, window in enumerate(self._open_windows):
                width = self._relu_widths[j]
                if window is not None: self._window_sums[j].append(window.fold(), copy=False)
                elif width is not None: self._window_sums[j].extend(torch.full((1, width), -torch.inf,
                                                                               device=self.learn.device))
                else: self._windows_before_width[j] += 1
            self.dead_iters.append(self.iters[-1])
        self._open_windows = [None] * len(self._open_windows)
        self._in_window = 0

    # ---- the statistics protocol (see stats.py) ------------------------------------------------------------
    def device_records(self):
        self._flush()
        out = {'records': self._log.values()}
        for j, log in enumerate(self._window_sums): out[f'window_sum.{j}'] = log.values()
        return out

    def summarize(self, raw):
        """`grad_norm` and `update_ratio` (steps, layers), `iters` (their training batch numbers), `dead` (windows,
        relus: the fraction of each ReLU's channels never positive in the window) with `dead_iters` (the batch each
        window ended at), and the names of both; `lr_share`, per layer the learning rate of its group over the fit's
        largest (NaN when unknown)."""
        rows = raw['records']
        rows = rows if len(rows) else torch.empty(0, 3, len(self.param_layers))
        # Per layer, the square root of its parameters' summed squared norms (in float64: a (layers, params) 0/1
        # matrix times the squares).
        owner = torch.zeros(len(self.layer_names), len(self.param_layers), dtype=torch.float64)
        owner[self.param_layers, range(len(self.param_layers))] = 1.
        grad, weight, update = (owner @ rows[:, k].double().square().T for k in range(3))
        n_windows = len(self.dead_iters)
        dead = torch.full((n_windows, len(self.relu_names)), float('nan'))
        for j in range(len(self.relu_names)):
            sums = raw.get(f'window_sum.{j}')
            if sums is None or len(sums) != n_windows or sums.ndim != 2: continue  # never ran: NaN
            ran = (sums > -torch.inf).any(1)
            dead[:, j] = torch.where(ran, (sums <= 0).float().mean(1), float('nan'))
        return {'grad_norm': grad.sqrt().T.float(), 'update_ratio': (update.sqrt() / weight.sqrt()).T.float(),
                'iters': torch.tensor(self.iters, dtype=torch.long), 'layer_names': list(self.layer_names),
                'dead': dead, 'dead_iters': torch.tensor(self.dead_iters, dtype=torch.long),
                'relu_names': list(self.relu_names),
                'lr_share': torch.tensor(self.lr_shares if self.lr_shares is not None
                                         else [float('nan')] * len(self.layer_names), dtype=torch.float32)}

    def records_mark(self):
        "The windows closed so far (norms and update ratios are the same on every rank: DDP averaged the gradients)."
        return len(self.dead_iters)

    def combine_ranks(self, since):
        """Each channel's sums become their max over ranks, for the windows closed since the mark and for the open
        window (a channel stays dead only if it is dead on every rank; max is idempotent, so the open window may be
        combined again at the next epoch's end, after each rank has added more to it)."""
        parts = [log.values()[since:] for j, log in enumerate(self._window_sums) if self._relu_widths[j] is not None]
        parts += [w.fold() for w in self._open_windows if w is not None]
        parts = [p for p in parts if p.numel()]
        if not parts: return
        combined = all_reduce_max(torch.cat([p.reshape(-1) for p in parts]))
        offset = 0
        for p in parts:
            p.copy_(combined[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()

    def state_dict(self):
        """The records so far (one host transfer, at checkpoint time), and the dead-unit window open at that moment
        (each ReLU's per-channel sums and the steps it has seen), so that a resumed fit closes it where an
        uninterrupted one would."""
        cpu = lambda w: None if w is None else w.fold().cpu()  # sync-ok: checkpoint writing
        self._flush()
        return {'version': _STATE_VERSION, 'records': self._log.state_dict()['values'],
                'param_layers': list(self.param_layers),
                'window_sums': [log.state_dict()['values'] for log in self._window_sums],
                'relu_widths': list(self._relu_widths), 'windows_before_width': list(self._windows_before_width),
                'iters': list(self.iters), 'dead_iters': list(self.dead_iters),
                'layer_names': list(self.layer_names), 'relu_names': list(self.relu_names),
                'open_window': [cpu(w) for w in self._open_windows], 'in_window': self._in_window,
                'lr_shares': self.lr_shares}

    def load_state_dict(self, state):
        names = list(state['layer_names'])
        if self.layer_names and names != list(self.layer_names):
            raise ValueError(f"these GradientStats records were taken on the layers {names}, but this learner has "
                             f"{list(self.layer_names)}: load them into a learner with the same model and modules")
        if state.get('version') != _STATE_VERSION:
            raise ValueError("these GradientStats records were written by an older learnkit, which kept other "
                             "records (per-layer norms, per-channel maxima): resume without GradientStats, or start "
                             "the fit afresh")
        device = self.learn.device if self.learn is not None else None
        self.relu_names = list(state['relu_names'])
        self._reset_records(len(self.relu_names))
        self._log.load_state_dict({'values': state['records']}, device)
        for log, values in zip(self._window_sums, state['window_sums']): log.load_state_dict({'values': values}, device)
        self._relu_widths, self._windows_before_width = list(state['relu_widths']), list(state['windows_before_width'])
        self.iters, self.dead_iters, self.layer_names = list(state['iters']), list(state['dead_iters']), names
        self.param_layers, self.lr_shares = list(state['param_layers']), state.get('lr_shares')
        self._open_windows = [None if m is None else _OpenWindow.resumed(m.to(device)) for m in state['open_window']]
        self._in_window = state['in_window']  # a Python int in the checkpoint

    def _zero(self, p):
        if p.device not in self._zeros: self._zeros[p.device] = torch.zeros((), device=p.device)
        return self._zeros[p.device]

    def _remove(self):
        self._active, self._prev = False, []  # the snapshot is as large as the model: free it between fits
        self._ones_rows = {}
        self._free_graph()
        if self._relu_hooks is not None:
            self._relu_hooks.remove()
            self._relu_hooks = None

    # ---- reading ------------------------------------------------------------------------------------------
    def _plot_lines(self, key, names, x, ax, ylabel, logy=True, ref=None):
        from ..diagnostics.plots import fig_ax
        if not len(x): raise ValueError("GradientStats has recorded nothing yet: add it to a Learner and call fit")
        fig, ax = fig_ax(ax, (7, 4))
        values = self.stats[key]
        for i, name in enumerate(names): ax.plot(x, values[:, i].numpy(), label=name)  # sync-ok: CPU stats, a plot
        if ref is not None: ax.axhline(ref, color='k', linestyle='--', linewidth=1)
        if logy: ax.set_yscale('log')
        ax.set_xlabel('batch'); ax.set_ylabel(ylabel)
        ax.legend(fontsize='small')
        return fig

    def plot_grad_norms(self, ax=None):
        "Gradient norm of every layer against the training batch (log scale); returns the figure."
        return self._plot_lines('grad_norm', self.layer_names, self.iters, ax, 'gradient norm')

    def plot_update_ratios(self, ax=None):
        "Update:data ratio of every layer against the training batch, with the 1e-3 reference; returns the figure."
        return self._plot_lines('update_ratio', self.layer_names, self.iters, ax, '||update|| / ||w||', ref=1e-3)

    def plot_dead_units(self, ax=None):
        "Fraction of dead units of every ReLU, per window, against the batch the window ended at; returns the figure."
        if not self.relu_names: raise ValueError("The model has no nn.ReLU modules, so there are no dead units to plot")
        return self._plot_lines('dead', self.relu_names, self.dead_iters, ax, 'dead fraction', logy=False)

    def plot_all(self, figsize=(18, 4)):
        "Gradient norms, update ratios and (when the model has ReLUs) dead units, side by side; returns the figure."
        from ..diagnostics.plots import grid
        plots = [self.plot_grad_norms, self.plot_update_ratios] + ([self.plot_dead_units] if self.dead_iters else [])
        fig, axs = grid(len(plots), len(plots), figsize)
        for plot, ax in zip(plots, axs): plot(ax=ax)
        fig.tight_layout()
        return fig



class _OpenWindow:
    """One ReLU's outputs summed over the open window: per layout of its outputs (elements per image, dtype, and
    whether channels come last in memory), a running (1, elements per image) row that each batch adds to, folded into
    per-channel float32 sums when the window closes or is read (folding loses nothing: the window may go on)."""
    def __init__(self, width):
        self.width, self.folded, self.runnings = width, None, {}
        self._last_key, self._last = None, None

    @classmethod
    def resumed(cls, channel_sums):
        "A window reopened from a checkpoint's per-channel sums."
        window = cls(len(channel_sums))
        window.folded = channel_sums.float()
        return window

    def add(self, out, ones_row):
        "Add a batch of outputs, summed over its images (`ones_row`: (1, batch) ones of their dtype)."
        rows, channels_last = _batch_rows(out)
        key = (rows.shape[1], rows.dtype, channels_last)
        if key != self._last_key:  # a new layout, or back to an earlier one
            running = self.runnings.get(key)
            if running is None:
                running = self.runnings[key] = torch.zeros(1, rows.shape[1], dtype=rows.dtype, device=rows.device)
            self._last_key, self._last = key, running
        self._last.addmm_(ones_row, rows)  # in place: autocast leaves it alone, so it adds in the output's dtype

    def fold(self):
        "The per-channel sums so far, float32: the running rows are summed per channel into them and start again."
        for (_, _, channels_last), running in self.runnings.items():
            per_channel = per_channel_sums(running, self.width, channels_last)[0]
            self.folded = per_channel if self.folded is None else self.folded.add_(per_channel)
        self.runnings, self._last_key, self._last = {}, None, None
        return self.folded


def per_channel_sums(running, width, channels_last):
    "Running sums (rows, elements per image) of a ReLU's outputs of `width` channels as (rows, width) float32 sums."
    rows = len(running)
    return (running.view(rows, -1, width).sum(1, dtype=torch.float32) if channels_last
            else running.view(rows, width, -1).sum(2, dtype=torch.float32))


def _batch_rows(out):
    """(`out` (batch, channels, ...) as (batch, elements per image) in memory order, whether channels come last in
    that order): a view when the batch dimension is outermost and the rest is dense (contiguous, or channels_last),
    else a contiguous copy."""
    n = out.shape[0]
    if out.is_contiguous(): return out.view(n, -1), False
    if out.ndim > 2:
        channels_last = out.movedim(1, -1)
        if channels_last.is_contiguous(): return channels_last.view(n, -1), True
    return out.reshape(n, -1), False
