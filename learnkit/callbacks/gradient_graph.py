"""GradientStats in graph mode (`fit(..., graph=True)`; see learnkit.graph_mode): its per-step work inside the step.

- Norms: `graph_before_step` and `graph_after_step` run the same multi-tensor ops as the eager path (the gradient and
  weight norms, the snapshot, the update and its norms) and write each step's norms at row `graph.batch` of a
  staging buffer with one row per step of the epoch (`index_copy_`).
- Dead units: the ReLU hooks add each batch's outputs, summed over its images (`ones @ rows`, one BLAS product as in
  the eager path), into a running row chosen on the device: before the forward pass each step reads its row from a
  table made on the host at the start of the fit, which maps every step to its dead-unit window, counted from the
  window open at the start of its epoch, and every step that is not recorded to a scratch row. At the end of the
  epoch the host, which knows from the same table where each window starts and ends, folds every row into
  per-channel sums, closes the windows that ended in the epoch (the same windows as an ordinary fit: they may span
  epochs, the one still open is carried over as per-channel sums) and zeroes the rows.
- `every=N`: a CUDA graph replays all its ops at every step, so the device computes the norms at every step either
  way; the epoch end keeps the rows of the recorded steps (a strided slice, no device work per step), and the
  unrecorded steps' ReLU sums go to the scratch row, so they count in no window, as in an ordinary fit. Choosing
  the row on the device costs one `index_add_` per ReLU per step on top of the product; masking the product by
  `step % N == 0` instead would let a NaN or Inf of an unrecorded batch into the window (0 * Inf is NaN).
"""
import torch

from . import gradients  # (imported by it: its helpers are read at call time)
from .hooks import Hooks, without_grad

__all__ = []


class GraphGradients:
    """GradientStats' graph-mode methods (see the module docstring); GradientStats inherits them. They use its eager
    records and window bookkeeping, and leave its per-step path alone."""
    graph_safe = True

    def _graph_recorded(self, step): return self.every is None or step % self.every == 0

    def graph_setup(self, graph):
        "Graph mode, once per fit: the staging rows of the norms, the table of dead-unit rows, the graph-mode hooks."
        learn, dev = self.learn, graph.device
        self._graph, n = graph, len(self._params)
        self._graph_norms = torch.zeros(graph.n_iter, 3 * n, device=dev)  # per step: grad, weight, update norms
        self._graph_grads_weights, self._graph_updates = self._graph_norms[:, :2 * n], self._graph_norms[:, 2 * n:]
        first = learn.start_epoch * graph.n_iter + learn.start_batch
        self._graph_windows = self._window_plan(first, graph.n_steps, graph.n_iter)
        rows = [0] * graph.n_steps
        for step, row in self._graph_windows.items(): rows[step] = row
        self._graph_n_rows = max(self._graph_windows.values(), default=-1) + 2  # the windows' rows, then the scratch
        scratch = self._graph_n_rows - 1
        rows = [rows[s] if s in self._graph_windows else scratch for s in range(graph.n_steps)]
        self._graph_row_table = torch.tensor(rows, dtype=torch.long).to(dev)  # once per fit
        self._graph_row = torch.zeros(1, dtype=torch.long, device=dev)
        self._graph_running, self._graph_scratch = [None] * len(self.relu_names), [None] * len(self.relu_names)
        self._graph_channels_last = [None] * len(self.relu_names)
        if self._relu_hooks is not None:
            modules = [h.module for h in self._relu_hooks]
            self._relu_hooks.remove()
            self._relu_hooks = Hooks(modules, self._graph_relu_hook, detach=False)

    def _window_plan(self, first, n_steps, n_iter):
        """{recorded step: its running row}: a window's row counts from the window open at the start of the step's
        epoch. Windows close after `dead_window` recorded steps, counted on from the window open now."""
        plan, in_window, window, epoch_window = {}, self._in_window, 0, 0
        for step in range(first, n_steps):
            if step % n_iter == 0 or step == first: epoch_window = window
            if not self._graph_recorded(step): continue
            plan[step] = window - epoch_window
            in_window += 1
            if in_window == self.dead_window: window, in_window = window + 1, 0
        return plan

    def graph_before_forward(self, graph):
        "Inside the step: this step's running row for the ReLU sums (a window's, or the scratch row)."
        torch.index_select(self._graph_row_table, 0, graph.step.view(1), out=self._graph_row)

    def _graph_relu_hook(self, module, inp, out):
        if self.learn.training and out.ndim >= 2: without_grad(self._graph_add_channel_sums, module, out)

    def _graph_add_channel_sums(self, module, out):
        j = self._relu_of(module, out)
        if j is None: return
        rows, channels_last = gradients._batch_rows(out)
        running = self._graph_running[j]
        if running is None:  # the first forward pass (a warm-up step): registered, so warm-up puts it back to 0
            running = self._graph_running[j] = self._graph.buffer(
                torch.zeros(self._graph_n_rows, rows.shape[1], dtype=rows.dtype, device=rows.device))
            self._graph_scratch[j] = torch.empty(1, rows.shape[1], dtype=rows.dtype, device=rows.device)
            self._graph_channels_last[j] = channels_last
        elif running.shape[1] != rows.shape[1] or channels_last != self._graph_channels_last[j]:
            raise RuntimeError(f"fit(graph=True): the output of {self.relu_names[j]} changed shape or layout between "
                               "steps; graph mode needs fixed shapes")
        summed = torch.mm(self._ones_row(out), rows, out=self._graph_scratch[j])
        running.index_add_(0, self._graph_row, summed)

    @torch.no_grad()
    def graph_before_step(self, graph):
        "Inside the step: gradient and weight norms at row `graph.batch`, and the weights' snapshot."
        grads = [p.grad if p.grad is not None else self._zero(p) for p in self._params]
        norms = torch.stack(torch._foreach_norm(grads + self._params))
        self._graph_grads_weights.index_copy_(0, graph.batch.view(1), norms.view(1, -1))
        torch._foreach_copy_(self._prev, self._params)

    @torch.no_grad()
    def graph_after_step(self, graph):
        "Inside the step: the norms of the update the optimizer made, at row `graph.batch`."
        torch._foreach_sub_(self._prev, self._params)  # now w_before - w_after
        norms = torch.stack(torch._foreach_norm(self._prev))
        self._graph_updates.index_copy_(0, graph.batch.view(1), norms.view(1, -1))

    def graph_epoch_end(self, graph, start, stop):
        "Host, at the epoch's end: the recorded steps' norms join the records; the windows that ended are closed."
        every = self.every or 1
        first = (-start) % every
        self._flush()
        self._log.extend(self._graph_norms[first:stop - start:every].view(-1, 3, len(self._params)))
        steps = [s for s in range(start + first, stop, every)]
        sums = [None if r is None else self._graph_fold(j, r) for j, r in enumerate(self._graph_running)]
        for row in sorted({self._graph_windows[s] for s in steps}):
            window_steps = [s for s in steps if self._graph_windows[s] == row]
            for j, per_channel in enumerate(sums):
                if per_channel is None: continue
                carried = self._open_windows[j]
                added = per_channel[row] if carried is None else carried.fold() + per_channel[row]
                self._open_windows[j] = gradients._OpenWindow.resumed(added)
            self.iters.extend(window_steps)
            self._in_window += len(window_steps)
            if self._in_window == self.dead_window: self._close_window()
        for running in self._graph_running:
            if running is not None: running.zero_()

    def _graph_fold(self, j, running):
        "ReLU j's running rows as per-channel float32 sums, (rows, channels): one op for all the epoch's windows."
        return gradients.per_channel_sums(running, self._relu_widths[j], self._graph_channels_last[j])

    def _free_graph(self):
        self._graph = self._graph_norms = self._graph_grads_weights = self._graph_updates = None
        self._graph_row_table = self._graph_row = self._graph_windows = None
        self._graph_running = self._graph_scratch = self._graph_channels_last = []
