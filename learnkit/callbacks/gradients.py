"""GradientStats: per-layer gradient norms, update:data ratios and dead ReLU units, recorded on the device.

Per recorded step it uses torch's fused multi-tensor (`_foreach_*`) ops: one `_foreach_norm` over the gradients,
one `_foreach_copy_` snapshot of the weights before the optimizer step, one `_foreach_sub_` and two
`_foreach_norm`s after it, so the update measured is the one the optimizer really made (momentum, weight
decay, Adam's scaling and the lr included). Norms of a layer's parameters are combined with one `mv`.
Dead units are tracked with forward hooks on the ReLUs: a running per-channel max, two kernels per batch. Each
closed window records those maxima, and the dead fraction is computed when the records are read, so that under
DDP the windows combine across ranks with a max (a channel is dead only if no rank saw it positive).
"""
import warnings

import torch
from torch import nn

from ..records import TensorLog
from .collectives import all_reduce_max
from .hooks import Hooks, default_modules, module_names, without_grad
from .stats import StatsCallback

__all__ = ['GradientStats', 'RELU_TYPES']

RELU_TYPES = (nn.ReLU, nn.ReLU6)  # activations whose zero region makes a unit "dead"
_STATE_VERSION = 2  # 1: dead fractions per window (could not be combined across ranks); 2: per-channel maxima


class GradientStats(StatsCallback):
    """Records, for every training step (or every `every`-th) and every layer with parameters:
    - `grad_norm`: the L2 norm of the layer's gradients (all its parameters together), read just before
      the optimizer step (after any clipping done by callbacks with a lower `order`);
    - `update_ratio`: ||w_after - w_before|| / ||w_before||, the size of the step the optimizer really took
      relative to the weights (lr included); a healthy value is around 1e-3;
    and, for every `nn.ReLU`/`nn.ReLU6` in the model, `dead`: the fraction of its units (channels) whose
    output was never positive over a window of `dead_window` recorded batches (NaN for a ReLU that did not run
    in the window). A ReLU module applied to outputs of different widths (one instance reused across a block)
    keeps the units of the first width it saw; calls with another width are left out, with a warning.

    Cost and memory: nothing syncs per step. The update ratio needs one copy of the weights (the model's
    parameter memory once more). Records are `steps x 2 x layers` float32 numbers, plus one per ReLU channel per
    window. Read them with `stats`, `plot_grad_norms()`, `plot_update_ratios()`, `plot_dead_units()` or
    `plot_all()`.
    """
    order = 80  # after callbacks that clip or unscale gradients in before_step
    record_schema = {'grad_norm': "per step and layer: L2 norm of the layer's gradients before the step",
                     'update_ratio': "per step and layer: ||w_after - w_before|| / ||w_before||",
                     'window_max': "per closed window and ReLU channel: the largest output the channel gave "
                                   "(-inf: the ReLU did not run); the channel is dead when it is <= 0"}

    def __init__(self, every=None, dead_window=50, modules=None):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int (record every N-th training step) or None; got {every!r}")
        if not isinstance(dead_window, int) or dead_window < 1:
            raise ValueError(f"dead_window must be a positive int (batches per dead-unit window); got {dead_window!r}")
        self.every, self.dead_window, self.modules = every, dead_window, modules
        self.layer_names, self.relu_names, self.iters, self.dead_iters = [], [], [], []
        self._relu_hooks, self._active, self._snapped = None, False, False
        self._reset_records(0)

    def _reset_records(self, n_relus):
        self._log = TensorLog()  # per step: (2, layers) grad norms and update ratios
        # Per ReLU: its closed windows' per-channel maxima, its running maxima in the open window (None until it
        # runs in it), its number of channels (None until it first runs) and its windows closed before that.
        self._window_maxima = [TensorLog() for _ in range(n_relus)]
        self._open_maxima = [None] * n_relus
        self._relu_widths, self._windows_before_width = [None] * n_relus, [0] * n_relus
        self._width_warned = [False] * n_relus
        self.iters, self.dead_iters, self._in_window = [], [], 0

    def before_fit(self):
        self._remove()
        model, dev = self.learn.model, self.learn.device
        layers = list(self.modules) if self.modules is not None else default_modules(model)
        self._params, owner = [], []
        for i, m in enumerate(layers):
            for p in m.parameters(recurse=self.modules is not None):
                if p.requires_grad: self._params.append(p); owner.append(i)
        if not self._params:
            raise ValueError(f"GradientStats found no trainable parameters in the layers of {type(model).__name__}")
        self.layer_names, self._n_layers = module_names(model, layers), len(layers)
        # Which layer each parameter belongs to, as a (layers, params) 0/1 matrix: one mv sums the parameters'
        # squared norms per layer.
        self._owner = torch.zeros(len(layers), len(owner)).index_put_(
            (torch.tensor(owner), torch.arange(len(owner))), torch.tensor(1.)).to(dev)
        self._prev = [torch.empty_like(p) for p in self._params]
        self._zeros = {}
        self._row = torch.zeros(2, self._n_layers, device=dev)
        self._row_views = (self._row[0], self._row[1])  # made once: a view is an op too
        relus = [m for m in model.modules() if isinstance(m, RELU_TYPES)]
        self.relu_names = module_names(model, relus)
        self._relu_index = {id(m): j for j, m in enumerate(relus)}
        self._reset_records(len(relus))
        # Not detached per call (two more ops per ReLU per batch): the hook runs with grad mode off instead.
        self._relu_hooks = Hooks(relus, self._relu_hook, detach=False) if relus else None

    def before_batch(self):
        self._iter = self.learn.train_iter  # read now: TrainEvalCallback advances it before our after_batch
        self._active = self.learn.training and (self.every is None or self._iter % self.every == 0)
        self._snapped = False

    def _relu_hook(self, module, inp, out):
        if self._active and out.ndim >= 2: without_grad(self._update_open_maxima, module, out)

    def _update_open_maxima(self, module, out):
        j = self._relu_index[id(module)]
        width = self._relu_widths[j]
        if width is None: self._first_width(j, out.shape[1])
        elif out.shape[1] != width: return self._warn_width(j, out.shape[1])
        channel_max = out.amax(dim=[d for d in range(out.ndim) if d != 1])
        running = self._open_maxima[j]
        if running is None: self._open_maxima[j] = channel_max
        else: torch.maximum(running, channel_max, out=running)

    def _first_width(self, j, width):
        "ReLU j's first run in this fit: its windows closed before are recorded as 'did not run'."
        self._relu_widths[j] = width
        missed = self._windows_before_width[j]
        if missed: self._window_maxima[j].extend(torch.full((missed, width), -torch.inf, device=self.learn.device))

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
        self._layer_norms(torch._foreach_norm(grads), out=self._row_views[0])
        self._weight_sq = self._layer_sq(torch._foreach_norm(self._params))
        torch._foreach_copy_(self._prev, self._params)
        self._snapped = True

    def after_cancel_step(self):
        # A callback before us skipped the step (MixedPrecision on an fp16 overflow): nothing to measure this batch.
        if not self._snapped: self._active = False

    @torch.no_grad()
    def after_step(self):
        if not self._active: return
        torch._foreach_sub_(self._prev, self._params)  # now w_before - w_after
        update = self._layer_sq(torch._foreach_norm(self._prev))
        torch.div(update.sqrt_(), self._weight_sq.sqrt_(), out=self._row_views[1])
        # Recorded here rather than in after_batch, so that a checkpoint written in this batch's after_batch
        # (SaveModelCallback runs before us there) already holds this step.
        self._log.append(self._row)
        self.iters.append(self._iter)
        self._in_window += 1
        if self._in_window == self.dead_window: self._close_window()

    def after_batch(self): self._active = False

    def after_fit(self):
        if self._in_window: self._close_window()
        self._remove()

    def cleanup_fit(self): self._remove()

    def _close_window(self):
        "Record each ReLU's per-channel maxima over the window (no copy: the next window starts new ones)."
        if self._open_maxima:
            for j, running in enumerate(self._open_maxima):
                width = self._relu_widths[j]
                if running is not None: self._window_maxima[j].append(running, copy=False)
                elif width is not None: self._window_maxima[j].extend(torch.full((1, width), -torch.inf,
                                                                                 device=self.learn.device))
                else: self._windows_before_width[j] += 1
            self.dead_iters.append(self.iters[-1])
        self._open_maxima = [None] * len(self._open_maxima)
        self._in_window = 0

    # ---- the statistics protocol (see stats.py) ------------------------------------------------------------
    def device_records(self):
        out = {'records': self._log.values()}
        for j, log in enumerate(self._window_maxima): out[f'window_max.{j}'] = log.values()
        return out

    def summarize(self, raw):
        """`grad_norm` and `update_ratio` (steps, layers), `iters` (their training batch numbers), `dead` (windows,
        relus: the fraction of each ReLU's channels never positive in the window) with `dead_iters` (the batch each
        window ended at), and the names of both."""
        rows = raw['records']
        rows = rows if len(rows) else torch.empty(0, 2, len(self.layer_names))
        n_windows = len(self.dead_iters)
        dead = torch.full((n_windows, len(self.relu_names)), float('nan'))
        for j in range(len(self.relu_names)):
            maxima = raw.get(f'window_max.{j}')
            if maxima is None or len(maxima) != n_windows or maxima.ndim != 2: continue  # never ran: NaN
            ran = (maxima > -torch.inf).any(1)
            dead[:, j] = torch.where(ran, (maxima <= 0).float().mean(1), float('nan'))
        return {'grad_norm': rows[:, 0], 'update_ratio': rows[:, 1],
                'iters': torch.tensor(self.iters, dtype=torch.long), 'layer_names': list(self.layer_names),
                'dead': dead, 'dead_iters': torch.tensor(self.dead_iters, dtype=torch.long),
                'relu_names': list(self.relu_names)}

    def records_mark(self):
        "The windows closed so far (norms and update ratios are the same on every rank: DDP averaged the gradients)."
        return len(self.dead_iters)

    def combine_ranks(self, since):
        """Each channel's maxima become the max over ranks, for the windows closed since the mark and for the open
        window (max is idempotent, so the open window may be combined again at the next epoch's end)."""
        parts = [log.values()[since:] for j, log in enumerate(self._window_maxima)
                 if self._relu_widths[j] is not None]
        parts += [m for m in self._open_maxima if m is not None]
        parts = [p for p in parts if p.numel()]
        if not parts: return
        combined = all_reduce_max(torch.cat([p.reshape(-1) for p in parts]))
        offset = 0
        for p in parts:
            p.copy_(combined[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()

    def state_dict(self):
        """The records so far (one host transfer, at checkpoint time), and the dead-unit window open at that moment
        (each ReLU's per-channel maxima and the steps it has seen), so that a resumed fit closes it where an
        uninterrupted one would."""
        cpu = lambda t: None if t is None else t.cpu()  # sync-ok: checkpoint writing
        return {'version': _STATE_VERSION, 'records': self._log.state_dict()['values'],
                'window_maxima': [log.state_dict()['values'] for log in self._window_maxima],
                'relu_widths': list(self._relu_widths), 'windows_before_width': list(self._windows_before_width),
                'iters': list(self.iters), 'dead_iters': list(self.dead_iters),
                'layer_names': list(self.layer_names), 'relu_names': list(self.relu_names),
                'open_window': [cpu(m) for m in self._open_maxima], 'in_window': self._in_window}

    def load_state_dict(self, state):
        names = list(state['layer_names'])
        if self.layer_names and names != list(self.layer_names):
            raise ValueError(f"these GradientStats records were taken on the layers {names}, but this learner has "
                             f"{list(self.layer_names)}: load them into a learner with the same model and modules")
        if state.get('version') != _STATE_VERSION:
            raise ValueError("these GradientStats records were written by an older learnkit, which kept dead-unit "
                             "fractions rather than the channel maxima they come from: resume without GradientStats, "
                             "or start the fit afresh")
        device = self.learn.device if self.learn is not None else None
        self.relu_names = list(state['relu_names'])
        self._reset_records(len(self.relu_names))
        self._log.load_state_dict({'values': state['records']}, device)
        for log, values in zip(self._window_maxima, state['window_maxima']): log.load_state_dict({'values': values},
                                                                                               device)
        self._relu_widths, self._windows_before_width = list(state['relu_widths']), list(state['windows_before_width'])
        self.iters, self.dead_iters, self.layer_names = list(state['iters']), list(state['dead_iters']), names
        self._open_maxima = [None if m is None else m.to(device) for m in state['open_window']]
        self._in_window = state['in_window']  # a Python int in the checkpoint

    def _zero(self, p):
        if p.device not in self._zeros: self._zeros[p.device] = torch.zeros((), device=p.device)
        return self._zeros[p.device]

    def _layer_sq(self, norms):
        "Per-parameter norms -> per-layer sums of squares."
        return torch.mv(self._owner, torch.stack(norms).float().square_())

    def _layer_norms(self, norms, out):
        torch.sqrt(self._layer_sq(norms), out=out)

    def _remove(self):
        self._active, self._prev = False, []  # the snapshot is as large as the model: free it between fits
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
