"""ActivationStats in graph mode (`fit(..., graph=True)`; see learnkit.graph_mode): its hooks run inside the step.

On CUDA the forward hooks run once, at capture, and the graph replays the ops they launched. So nothing a hook
decides in Python may vary from batch to batch: where a sample goes and which positions it takes must come from
device tensors. Here:
- each hooked layer's sample is written into row `graph.batch` of a staging buffer with one row per training step of
  the epoch (`index_copy_`): one op for an output read whole, three for a sampled one (its positions, picked from
  the layer's pool of position sets by the step's set index; the values at them; the write);
- the set index of each step is read, once per step before the forward pass, from a device table that holds, for
  every step of the fit, the set the eager loop would have drawn for it (the same private generator, drawn in the
  same order at the start of the fit), so graph mode records what an ordinary fit records;
- at the end of each epoch, the rows of the recorded steps (every one, or every `every`-th: a CUDA graph replays
  all its ops, so with `every` the device still samples every step, and the epoch end keeps the recorded rows) are
  finished `depth` at a time by ActivationStats' own finishing ops and appended to the records.

Not supported in graph mode, with an error saying so: `exact=True` (its per-layer reference moves on the host's
schedule), `sample=None` (the staging would hold every element of every output of an epoch) and `batched=True`
(batched reads save kernel launches, which a replayed graph does not pay; graph mode reads each layer in its hook).
"""
from typing import NamedTuple

import torch

from . import activations  # (imported by it: its helpers are read at call time)
from .hooks import Hooks, without_grad

__all__ = []

_TENSOR, _FLOAT32 = torch.Tensor, torch.float32


class _GraphLayer(NamedTuple):
    "How one layer's output is written in graph mode: made at the first forward pass (a warm-up step)."
    numel: int
    pool: torch.Tensor | None  # (sets, k) sample positions; None: the output is read whole
    rows: torch.Tensor  # (n_iter, numel or k): the layer's column of the staging buffer


class GraphActivations:
    """ActivationStats' graph-mode methods (see the module docstring); ActivationStats inherits them. They use its
    eager bookkeeping (sizes, sample positions, the finishing ops) and leave its per-batch path alone."""
    graph_safe = True

    def _check_graph_options(self):
        name = type(self).__name__
        if self.exact:
            raise ValueError(f"fit(graph=True) cannot run {name}(exact=True): its exact sums are shifted by a "
                             "per-layer reference that moves on the host. Use exact=False (statistics of the sample) "
                             "or fit without graph=True.")
        if self.sample is None:
            raise ValueError(f"fit(graph=True) cannot run {name}(sample=None): graph mode stages an epoch of samples, "
                             "which would be every element of every output. Pass a sample size (the default 2048).")
        if self.batched:
            raise ValueError(f"fit(graph=True) cannot run {name}(batched=True): a replayed graph pays no launch cost, "
                             "so graph mode reads each layer in its hook. Use batched=None (the default).")

    def _graph_records(self, step):
        "Whether training step `step` of the fit is recorded (every step, or every `every`-th)."
        return self.every is None or step % self.every == 0

    def graph_setup(self, graph):
        """Graph mode, once per fit: the staging rows, the device table of each step's set of sample positions, and
        the graph-mode hooks in place of the eager ones."""
        self._check_graph_options()
        learn, dev = self.learn, graph.device
        self._graph = graph
        self._graph_samples = torch.full((graph.n_iter, len(self.hooked_modules), self._sample_len), float('nan'),
                                         device=dev)
        first = learn.start_epoch * graph.n_iter + learn.start_batch  # the fit's first step (> 0 when resumed)
        # Drawn as the eager loop draws them (one per recorded step, in order), so both record the same samples.
        sets = [self._position_rng.randrange(activations._POOL) if s >= first and self._graph_records(s) else 0
                for s in range(graph.n_steps)]
        self._graph_set_table = torch.tensor(sets, dtype=torch.long).to(dev)  # once per fit
        self._graph_set = torch.zeros(1, dtype=torch.long, device=dev)
        self._graph_layers = [None] * len(self.hooked_modules)
        self.hooks.remove()
        self.hooks = Hooks(self.hooked_modules, self._graph_hook, detach=False)

    def graph_before_forward(self, graph):
        "Inside the step: this step's set of sample positions, from the table."
        torch.index_select(self._graph_set_table, 0, graph.step.view(1), out=self._graph_set)

    def _graph_hook(self, module, inp, out):
        if not self.learn.training: return  # validation runs in the ordinary loop and is not recorded
        x = out if type(out) is _TENSOR else activations._first_tensor(out)
        without_grad(self._graph_record, self._layer_index[id(module)], x)

    def _graph_record(self, i, x):
        "Inside the step: layer i's sample into its staging row `graph.batch`."
        flat = x.view(-1) if x.is_contiguous() else activations._flat(x)
        layer = self._graph_layers[i]
        if layer is None:
            if flat.numel() == 0: return  # recorded as not run, as the eager path does
            layer = self._graph_layer(i, flat.numel())
        elif layer.numel != flat.numel():
            raise RuntimeError(f"fit(graph=True): the output of {self.layer_names[i]} changed size from {layer.numel} "
                               f"to {flat.numel()} elements between steps; graph mode needs fixed shapes")
        if flat.dtype is not _FLOAT32: flat = flat.float()
        if layer.pool is None: values = flat.view(1, -1)
        else: values = flat.index_select(0, layer.pool.index_select(0, self._graph_set).view(-1)).view(1, -1)
        layer.rows.index_copy_(0, self._graph.batch.view(1), values)

    def _graph_layer(self, i, n):
        "Layer i's output has n elements: its sizes in the staged rows and its positions, as the eager path has them."
        read = self._new_size(i, n)
        sampled = read.positions is not None
        self._graph_layers[i] = _GraphLayer(n, self._sample_positions[n] if sampled else None,
                                            self._graph_samples[:, i] if sampled else self._graph_samples[:, i, :n])
        return self._graph_layers[i]

    def graph_epoch_end(self, graph, start, stop):
        """Host, at the epoch's end: the recorded steps' rows finished `depth` at a time (device ops) and appended to
        the records."""
        every = self.every or 1
        first = (-start) % every  # the epoch's first recorded row
        steps = range(start + first, stop, every)
        rows = self._graph_samples[first:stop - start:every]
        depth = self._stage_depth
        for c in range(0, len(steps), depth):
            chunk = rows[c:c + depth]
            self._staged_samples[:len(chunk)].copy_(chunk)
            self._finish(0, len(chunk))
        self.iters.extend(steps)

    def _free_graph(self):
        self._graph = self._graph_samples = self._graph_set_table = self._graph_set = self._graph_layers = None
