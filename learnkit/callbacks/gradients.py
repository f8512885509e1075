"""GradientStats: per-layer gradient norms, update:data ratios and dead ReLU units, recorded on the device.

Per recorded step it uses torch's fused multi-tensor (`_foreach_*`) ops: one `_foreach_norm` over the gradients,
one `_foreach_copy_` snapshot of the weights before the optimizer step, one `_foreach_sub_` and two
`_foreach_norm`s after it, so the update measured is the one the optimizer really made (momentum, weight
decay, Adam's scaling and the lr included). Norms of a layer's parameters are combined with one `mv`.
Dead units are tracked with forward hooks on the ReLUs: a running per-channel max, two kernels per batch.
"""
import torch
from torch import nn

from ..records import TensorLog
from .hooks import Hooks, default_modules, module_names, without_grad
from ..callback import Callback

__all__ = ['GradientStats', 'RELU_TYPES']

RELU_TYPES = (nn.ReLU, nn.ReLU6)  # activations whose zero region makes a unit "dead"


class GradientStats(Callback):
    """Records, for every training step (or every `every`-th) and every layer with parameters:
    - `grad_norm`: the L2 norm of the layer's gradients (all its parameters together), read just before
      the optimizer step (after any clipping done by callbacks with a lower `order`);
    - `update_ratio`: ||w_after - w_before|| / ||w_before||, the size of the step the optimizer really took
      relative to the weights (lr included); a healthy value is around 1e-3;
    and, for every `nn.ReLU`/`nn.ReLU6` in the model, `dead`: the fraction of its units (channels) whose
    output was never positive over a window of `dead_window` recorded batches.

    Cost and memory: nothing syncs per step. The update ratio needs one copy of the weights (the model's
    parameter memory once more). Records are `steps x 2 x layers` plus `windows x relus` float32 numbers.
    Read them with `stats`, `plot_grad_norms()`, `plot_update_ratios()`, `plot_dead_units()` or `plot_all()`.
    """
    order = 80  # after callbacks that clip or unscale gradients in before_step

    def __init__(self, every=None, dead_window=50, modules=None):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int (record every N-th training step) or None; got {every!r}")
        if not isinstance(dead_window, int) or dead_window < 1:
            raise ValueError(f"dead_window must be a positive int (batches per dead-unit window); got {dead_window!r}")
        self.every, self.dead_window, self.modules = every, dead_window, modules
        self.layer_names, self.relu_names, self.iters, self.dead_iters = [], [], [], []
        self._log, self._dead_log, self._relu_hooks, self._active, self._snapped = TensorLog(), TensorLog(), None, False, False

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
        self._relu_max = [None] * len(relus)
        self._relu_index = {id(m): j for j, m in enumerate(relus)}
        # Not detached per call (two more ops per ReLU per batch): the hook runs with grad mode off instead.
        self._relu_hooks = Hooks(relus, self._relu_hook, detach=False) if relus else None
        self._log, self._dead_log, self.iters, self.dead_iters, self._in_window = TensorLog(), TensorLog(), [], [], 0

    def before_batch(self):
        self._iter = self.learn.train_iter  # read now: TrainEvalCallback advances it before our after_batch
        self._active = self.learn.training and (self.every is None or self._iter % self.every == 0)
        self._snapped = False

    def _relu_hook(self, module, inp, out):
        if self._active and out.ndim >= 2: without_grad(self._relu_max_update, module, out)

    def _relu_max_update(self, module, out):
        j = self._relu_index[id(module)]
        ch_max = out.amax(dim=[d for d in range(out.ndim) if d != 1])
        acc = self._relu_max[j]
        if acc is None or acc.shape != ch_max.shape: self._relu_max[j] = ch_max
        else: torch.maximum(acc, ch_max, out=acc)

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
        "Record the fraction of each ReLU's channels that were never positive in the window, then start a new one."
        if self._relu_max:
            nan = torch.full((), float('nan'), device=self.learn.device)  # a ReLU that did not run in the window
            self._dead_log.append(torch.stack([nan if m is None else (m <= 0).float().mean() for m in self._relu_max]))
            self.dead_iters.append(self.iters[-1])
        self._relu_max = [None] * len(self._relu_max)
        self._in_window = 0

    def state_dict(self):
        """The records so far (one host transfer, at checkpoint time), and the dead-unit window open at that moment
        (each ReLU's per-channel maxima and the steps it has seen), so that a resumed fit closes it where an
        uninterrupted one would."""
        return {'records': self._log.state_dict()['values'], 'dead': self._dead_log.state_dict()['values'],
                'iters': list(self.iters), 'dead_iters': list(self.dead_iters),
                'layer_names': list(self.layer_names), 'relu_names': list(self.relu_names),
                'window': list(self._relu_max), 'in_window': self._in_window}

    def load_state_dict(self, state):
        names = list(state['layer_names'])
        if self.layer_names and names != list(self.layer_names):
            raise ValueError(f"these GradientStats records were taken on the layers {names}, but this learner has "
                             f"{list(self.layer_names)}: load them into a learner with the same model and modules")
        device = self.learn.device if self.learn is not None else None
        self._log.load_state_dict({'values': state['records']}, device)
        self._dead_log.load_state_dict({'values': state['dead']}, device)
        self.iters, self.dead_iters = list(state['iters']), list(state['dead_iters'])
        self.layer_names, self.relu_names = names, list(state['relu_names'])
        # Checkpoints written before the window was kept have none: the resumed fit starts a new window.
        window = state.get('window')
        if window is not None and len(window) == len(self.relu_names):
            self._relu_max = [None if m is None else m.to(device) for m in window]
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
    @property
    def stats(self):
        """CPU tensors: `grad_norm` and `update_ratio` (steps, layers), `iters` (their training batch numbers),
        `dead` (windows, relus) with `dead_iters` (the batch each window ended at), and the names of both."""
        rows = self._log.values().cpu()  # sync-ok: on request
        dead = self._dead_log.values().cpu()  # sync-ok: on request
        rows = rows if len(rows) else torch.empty(0, 2, len(self.layer_names))
        return {'grad_norm': rows[:, 0], 'update_ratio': rows[:, 1],
                'iters': torch.tensor(self.iters, dtype=torch.long), 'layer_names': list(self.layer_names),
                'dead': dead if len(dead) else torch.empty(0, len(self.relu_names)),
                'dead_iters': torch.tensor(self.dead_iters, dtype=torch.long), 'relu_names': list(self.relu_names)}

    def _plot_lines(self, key, names, x, ax, ylabel, logy=True, ref=None):
        from ..diagnostics.plots import fig_ax
        if not len(x): raise ValueError("GradientStats has recorded nothing yet: add it to a Learner and call fit")
        fig, ax = fig_ax(ax, (7, 4))
        values = self.stats[key]
        for i, name in enumerate(names): ax.plot(x, values[:, i].numpy(), label=name)
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
