"""Graph mode: `fit(..., graph=True)` captures the training step once as a CUDA graph and replays it for every batch.

Why. On a GPU a small CNN's training step is bound by kernel launches, not arithmetic: simple_cnn's step is about
150 small kernels, each costing the host several microseconds to launch. A replayed CUDA graph launches them all
with one call, so the step costs what the GPU needs to run it.

What runs where.
- Inside the step (captured on CUDA, run eagerly on other devices; the same code): the batch, gathered from the
  training loader's device cache (`TfmdDL.device_batches`) or, for other loaders, taken from static buffers the
  host copies each batch into; the forward pass and the loss; the device work of the callbacks (below); backward;
  and an Adam/AdamW step (`graph_adam.py`) whose lr and every scheduled hyper-parameter (1cycle's lr and mom) are
  0-d device tensors, read from a table of the fit's schedule by a device-side step counter.
- On the host, per batch: one `replay()` (plus, without a device cache, the loader's next batch and two copies).
  Nothing is read from the device.
- On the host, per epoch: the epoch-level events as usual (before_train, after_train, the validation, which runs in
  the ordinary loop, after_epoch), and each callback's `graph_epoch_end`, which moves the epoch's rows from its
  buffers into its records, on the device.

Static shapes. A CUDA graph replays fixed shapes, so every training batch has the size of the first. A last partial
batch is dropped, as `drop_last=True` does (learnkit's training loaders set it already), with a warning at the end of
the fit that says how many batches were dropped.

The callback contract. A callback that handles a training batch event (`before_batch` ... `after_batch`) must
declare `graph_safe = True`, or fit(graph=True) refuses it with a ValueError naming it: its per-batch host work
would not run. In graph mode a graph-safe callback's training batch events are not called; what it does per batch
it does through these optional methods, all called in `order`:
- `graph_setup(graph)`: host, once per fit before the first step (and before the optimizer is prepared, so an
  option it refuses leaves the learner as it was): allocate its buffers through `graph.buffer(t)` (`graph.n_steps`
  rows: one per training step of the fit; `graph.n_iter` per epoch). A buffer whose size only the first forward
  pass tells may be made and registered inside that first (warm-up) step: warm-up puts it back as it was made.
- `graph_before_forward(graph)` (the batch is in `graph.xb`, `graph.yb`), `graph_after_loss(graph)`,
  `graph_before_step(graph)` (after backward), `graph_after_step(graph)`: inside the step. Device ops only, on
  tensors that live across steps (its buffers; `graph.step`, the step's row in the fit, and `graph.batch`, its row
  in the epoch, both 0-d int64 device tensors; `graph.xb`, `graph.yb`, `graph.pred`, `graph.loss`; the parameters
  and their `.grad`). On CUDA these run once, at capture: Python state they change does not change again at
  replays, and a host read fails the capture.
- `graph_epoch_end(graph, start, stop)`: host, after each epoch's steps: rows `start:stop` are this epoch's.
- `graph_hypers(positions)`: host, once per fit: `{hyper: [value at each position]}` for hyper-parameters that change
  during the fit (ParamScheduler), `positions` being `pct_train` of every step of the fit.
Forward hooks on the model run inside the captured forward pass and follow the same rules: a per-batch choice (a
row to write, a set of sample positions) must come from a device tensor, e.g. a table indexed by `graph.step`.
A callback that records only some steps (`every=N`) still runs its device work at every step (a replayed graph runs
all its ops); its `graph_epoch_end` keeps the rows of the recorded steps.
TrainEval, Recorder, ProgressCallback and ParamScheduler are graph-safe, and so is every callback of `health_cbs()`:
ActivationStats (not with `exact=True`, `sample=None` or `batched=True`, which it refuses by name), GradientStats,
InputStats, OutputStats, WeightStats (epoch-level) and HealthMonitor (which checks at epoch ends only in graph mode,
and warns once when `check_every` asked for more). A callback with only epoch-level events needs nothing. Not
graph-safe, and refused by name: MixedPrecision, GradientAccumulation, GradientNoiseScale, BatchSizeScheduler,
LRFinder, DDP (DistributedCallback), SaveModelCallback and TerminateOnNaNCallback.

Warm-up and capture. At the first training step of each fit, a few warm-up steps run on that batch, then everything
they changed (weights, BatchNorm statistics, optimizer state, the callbacks' registered buffers, the counters) is put
back. On CUDA this is torch's whole-network capture recipe: the warm-up runs on a side stream (cuDNN and the allocator
settle), the gradients are then set to None so that backward allocates them inside the graph's memory pool, and one
step is captured; each fit pays this once (a few hundredths of a second). Elsewhere the warm-up serves no purpose but
runs all the same, so that the CPU tests, which hold graph mode to the ordinary loop's weights, cover it too.

Other limits. One input and one target per batch. BatchNorm with `momentum=None` reads its batch count on the host
and cannot be captured. The optimizer must be torch's Adam or AdamW without amsgrad or maximize.
"""
import warnings

import torch

from .callback import INNER_LOOP_EVENTS, Callback, event_methods
from .graph_adam import GraphAdam
from .torch_core import listify

__all__ = ['GraphMode', 'GraphStep', 'graph_unsafe', 'with_graph_mode']

WARMUP_STEPS = 3  # torch's recipe: a few eager steps on a side stream before capture
_STEP_HOOKS = ('graph_before_forward', 'graph_after_loss', 'graph_before_step', 'graph_after_step')


def graph_unsafe(cbs):
    "The callbacks in `cbs` that do host work at training batches and do not declare `graph_safe = True`."
    return [cb for cb in cbs if cb.run and cb.run_train and not getattr(cb, 'graph_safe', False) and _batch_events(cb)]


def _batch_events(cb): return sorted(INNER_LOOP_EVENTS & set(event_methods(cb)))


def with_graph_mode(learn, cbs, graph):
    "The fit's temporary callbacks `cbs` (a list), with a GraphMode when `graph` asks for one and none is present."
    if not isinstance(graph, bool): raise TypeError(f"fit(graph=...) takes True or False; got {graph!r}")
    cbs = listify(cbs)
    present = any(isinstance(cb, GraphMode) or cb is GraphMode for cb in cbs + learn.cbs)
    return cbs + [GraphMode()] if graph and not present else cbs


class GraphMode(Callback):
    """Runs each fit's training steps as one captured CUDA graph replayed per batch (see the module docstring).

    `fit(graph=True)` adds one for the fit. `capture=None` captures on CUDA and runs the same static-buffer step
    eagerly elsewhere; `capture=False` runs it eagerly on CUDA too (to compare with the captured one). During a fit,
    `graph` is its `GraphStep`, the object graph-safe callbacks receive."""
    order = 200  # its before_fit runs last, once every other callback has set up its fit
    graph_safe = True

    def __init__(self, capture=None):
        if capture not in (None, True, False):
            raise ValueError(f"GraphMode(capture={capture!r}): use None (capture on CUDA), True or False")
        self.capture, self.graph = capture, None

    def before_fit(self):
        unsafe = graph_unsafe(self.learn.cbs)
        if unsafe:
            names = ', '.join(f"{type(cb).__name__} (learn.{cb.name}: {', '.join(_batch_events(cb))})" for cb in unsafe)
            raise ValueError(f"fit(graph=True) cannot run {names}: these callbacks work on the host at every training "
                             "batch and do not declare `graph_safe`. Remove them (learn.remove_cb) or fit without "
                             "graph=True; see learnkit.graph_mode for the graph-safe callback contract.")
        self.graph = GraphStep(self.learn, self.capture)

    def train_epoch(self):
        "This epoch's training steps: the Learner calls it inside its `train` phase, in place of its batch loop."
        self.graph.train_epoch()

    def after_fit(self):
        if self.graph.skipped:
            warnings.warn(f"fit(graph=True) dropped {self.graph.skipped} training batch(es) smaller than the first (a "
                          "last partial batch each epoch): a captured step has fixed shapes. Build the training loader "
                          "with drop_last=True to train on the same batches without graph mode.", stacklevel=2)

    def cleanup_fit(self):
        if self.graph is not None: self.graph.close()
        self.graph = None


class GraphStep:
    """The training step on static tensors, its buffers and its device-side counters, for one fit.

    What graph-safe callbacks use (see the module docstring): `device`; `n_iter` (batches per epoch) and `n_steps`
    (training steps in the fit: `n_epoch * n_iter`); `step` and `batch`, 0-d int64 device tensors: the step's row in
    the fit and in its epoch; inside the step `xb`, `yb`, `pred` and `loss` (detached); `buffer(t)`; `hyper_values`."""
    def __init__(self, learn, capture=None):
        self.learn, self.device = learn, learn.device
        self.capturing = capture if capture is not None else self.device.type == 'cuda'
        if self.capturing and self.device.type != 'cuda':
            raise ValueError(f"GraphMode(capture=True) needs a CUDA device; the learner is on {self.device}. "
                             "Use capture=None to run the step without capture there.")
        if getattr(learn.dls, 'n_inp', 1) != 1:
            raise ValueError(f"fit(graph=True) takes batches of one input and one target; these loaders have "
                             f"n_inp={learn.dls.n_inp}. Fit without graph=True.")
        dl = learn.dls.train
        if not hasattr(dl, '__len__'):
            raise ValueError(f"fit(graph=True) needs a training loader with a length (to size its schedule tables and "
                             f"records); {type(dl).__name__} has none. Fit without graph=True.")
        self.n_iter = len(dl)
        self.n_steps = self.n_iter * learn.n_epoch
        self.xb = self.yb = self.pred = self.loss = None
        self.skipped, self._last_step, self._buffers, self._saved = 0, None, [], None
        self._run = self._graph = self._feeder = None
        self._adam = self._hypers = None
        self.step = self.buffer(torch.zeros((), dtype=torch.int64, device=self.device))
        self.batch = self.buffer(torch.zeros((), dtype=torch.int64, device=self.device))
        cbs = sorted((cb for cb in learn.cbs if cb.run and cb.run_train), key=lambda c: c.order)
        self._hooks = {name: [getattr(cb, name) for cb in cbs if hasattr(cb, name)] for name in _STEP_HOOKS}
        self._epoch_end = [cb for cb in cbs if hasattr(cb, 'graph_epoch_end')]
        try:
            # The callbacks first: one that refuses an option (ActivationStats(exact=True)) leaves the optimizer as
            # it was, without the state GraphAdam creates up front.
            for cb in cbs:
                if hasattr(cb, 'graph_setup'): cb.graph_setup(self)
            self._adam = GraphAdam(learn.opt)
            self._hypers = _HyperTables(learn.opt, [cb for cb in cbs if hasattr(cb, 'graph_hypers')], self.n_steps,
                                        self.device)
        except BaseException:
            self.close()  # the optimizer as it was
            raise

    def buffer(self, t):
        """Register `t`, a device tensor the step changes, so that warm-up leaves it as it found it; returns `t`.
        A buffer sized by the first forward pass may be registered inside the first warm-up step: it is put back to
        its value at registration."""
        self._buffers.append(t)
        if self._saved is not None: self._saved.append((t, t.detach().clone()))
        return t

    def hyper_values(self, name, start, stop):
        "Hyper-parameter `name` of the last parameter group at steps `start:stop` of the fit, as host floats."
        return self._hypers.values(name, start, stop)

    # ---- one epoch ----------------------------------------------------------------------------------------------
    def train_epoch(self):
        learn, dl = self.learn, self.learn.dl
        if len(dl) != self.n_iter:
            raise ValueError(f"fit(graph=True): the training loader's length changed from {self.n_iter} to {len(dl)} "
                             "batches during the fit (a new bs?); graph mode needs the same batches every epoch.")
        learn.n_iter = self.n_iter
        start = learn.start_batch
        first = learn.epoch * self.n_iter + start
        if self._feeder is None: self._feeder = _feeder_for(dl, self.device)
        self.step.fill_(first)   # fill_ with a host number: a kernel, no copy from the host
        self.batch.fill_(0)
        n = 0
        for _ in self._feeder.epoch(dl):
            self._run_step()
            n += 1
        self.skipped += self.n_iter - start - n
        if n: self._last_step = first + n - 1
        learn.iter = start + n - 1
        learn.xb, learn.yb, learn.pred, learn.loss = (self.xb,), (self.yb,), self.pred, self.loss
        for cb in self._epoch_end: cb.graph_epoch_end(self, first, first + n)

    def _run_step(self):
        if self._run is None: self._run = self._capture() if self.capturing else self._eager()
        self._run()

    def _eager(self):
        "Without capture: warm up as before a capture (so the CPU tests cover it), then run the step each batch."
        self._warm_up()
        def step():
            self._step()
            self.learn.opt.zero_grad()  # as the Learner does after each step: backward makes fresh gradients
        return step

    def _step(self):
        "One training step on static tensors, device ops only: what the CUDA graph captures."
        learn = self.learn
        self._hypers.load(self.step)
        xb, yb = self._feeder.batch(self.batch)
        if learn.memory_format is not None and xb.ndim == 4: xb = xb.contiguous(memory_format=learn.memory_format)
        self.xb, self.yb = xb, yb
        for hook in self._hooks['graph_before_forward']: hook(self)
        pred = learn.model(xb)
        if not learn._outputs_checked:  # the Learner's once-per-run check of n_out against the classes: host only
            learn.pred = pred
            learn._check_outputs()
        loss = learn.loss_func(pred, yb)
        if loss.ndim != 0:
            raise ValueError(f"fit(graph=True) needs a loss reduced to one number; {learn.loss_func!r} returned shape "
                             f"{tuple(loss.shape)}.")
        self.xb, self.yb, self.pred, self.loss = xb, yb, pred.detach(), loss.detach()
        for hook in self._hooks['graph_after_loss']: hook(self)
        loss.backward()
        for hook in self._hooks['graph_before_step']: hook(self)
        self._adam.step()
        for hook in self._hooks['graph_after_step']: hook(self)
        self.step.add_(1)
        self.batch.add_(1)

    def _capture(self):
        "Warm up on a side stream and capture one step (torch's recipe); returns the graph's replay."
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side): self._warm_up()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.learn.opt.zero_grad()  # gradients None: backward allocates them in the graph's pool, as torch advises
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph): self._step()
        return self._graph.replay

    def _warm_up(self):
        """A few runs of this first step, each followed by putting back everything it changed (so the counters stay
        within the tables, and the fit starts as it would have)."""
        self._saved = [(t, t.detach().clone()) for t in self._state()]
        try:
            for _ in range(WARMUP_STEPS):
                self._step()
                self.learn.opt.zero_grad()
                with torch.no_grad():
                    for t, s in self._saved: t.copy_(s)
        finally: self._saved = None

    def _state(self):
        "Every tensor a step changes: weights, buffers (BatchNorm statistics), optimizer state, callback buffers."
        model = self.learn.model
        return list(model.parameters()) + list(model.buffers()) + self._adam.state_tensors() + self._buffers

    def close(self):
        "Give the optimizer back its plain numbers and where torch keeps its step counts; drop the graph."
        if self._hypers is not None: self._hypers.restore(self._last_step)
        if self._adam is not None: self._adam.restore()
        self._run = self._graph = self._adam = self._hypers = self._feeder = None
        self.xb = self.yb = self.pred = self.loss = None


class _HyperTables:
    """lr, and every hyper-parameter a callback schedules, as (n_steps, n_groups) float32 tables on the device. The
    optimizer's parameter groups hold 0-d views of `now`, which each step fills with its row."""
    def __init__(self, opt, schedulers, n_steps, device):
        self.opt, n_groups = opt, opt.n_groups
        positions = [s / n_steps for s in range(n_steps)]  # pct_train at each step, as TrainEvalCallback counts it
        scheduled = {}
        for cb in schedulers: scheduled.update(cb.graph_hypers(positions))
        self.before = {name: [h[name] for h in opt.hypers] for name in ['lr'] + list(scheduled)}
        self.rows, self.tables, self.now = {}, {}, {}
        for name, before in self.before.items():
            rows = ([_per_group(v, n_groups, name) for v in scheduled[name]] if name in scheduled
                    else [before] * n_steps)
            self.rows[name] = rows
            self.tables[name] = torch.tensor(rows, dtype=torch.float32).to(device)  # once per fit
            self.now[name] = torch.empty(1, n_groups, device=device)
            opt.set_hyper(name, list(self.now[name][0].unbind(0)))

    def load(self, step):
        "Inside the step: each table's row `step` into `now`, which the optimizer reads."
        for name, table in self.tables.items(): torch.index_select(table, 0, step.view(1), out=self.now[name])

    def values(self, name, start, stop):
        if name in self.rows: return [row[-1] for row in self.rows[name][start:stop]]
        return [self.opt.get_hyper(name)] * (stop - start)

    def restore(self, last_step):
        "Plain numbers again: the last step's values, as the eager loop leaves them (or the values from before)."
        for name, before in self.before.items():
            self.opt.set_hyper(name, self.rows[name][last_step] if last_step is not None else before)


def _per_group(v, n_groups, name):
    "One float per parameter group from a schedule's value (a number, or an array with one value per group)."
    vals = [float(x) for x in (v.reshape(-1) if hasattr(v, 'reshape') else [v])]
    if len(vals) == 1: return vals * n_groups
    if len(vals) != n_groups:
        raise ValueError(f"The schedule of {name} gives {len(vals)} values but the optimizer has {n_groups} parameter "
                         "group(s)")
    return vals


def _feeder_for(dl, device):
    "How the step gets its batch: gathered from the loader's device cache when it has one, else copied in."
    batches = getattr(dl, 'device_batches', None)
    got = batches() if batches is not None else None
    return _CachedBatches(got) if got is not None else _CopiedBatches(device)


class _CachedBatches:
    """Batches gathered inside the step from a loader's cache on the device: the host copies each epoch's order into a
    static (n, bs) index buffer once, and the step gathers row `graph.batch` of it."""
    def __init__(self, first):
        self.first, self.order, self.make = first, None, None

    def epoch(self, dl):
        got, self.first = (self.first or dl.device_batches()), None  # the epoch started when the feeder was chosen
        if got is None:
            raise RuntimeError("fit(graph=True): the training loader's cache left the device during the fit")
        order, self.make = got
        if self.order is None: self.order = torch.empty_like(order)
        if order.shape[1:] != self.order.shape[1:] or len(order) > len(self.order):
            raise ValueError(f"fit(graph=True): this epoch's batches {tuple(order.shape)} differ from the first "
                             f"epoch's {tuple(self.order.shape)}; graph mode needs a fixed batch size.")
        self.order[:len(order)].copy_(order)
        return range(len(order))

    def batch(self, i):
        return self.make(self.order.index_select(0, i.view(1)).view(-1))


class _CopiedBatches:
    """Batches from iterating the loader, copied into static buffers on the device before each step. A batch whose
    shapes differ from the first's (a last partial batch) is skipped; the caller counts it."""
    def __init__(self, device): self.device, self.xb, self.yb = device, None, None

    def epoch(self, dl):
        for batch in dl:
            if len(batch) != 2:
                raise ValueError(f"fit(graph=True) takes batches of one input and one target; got {len(batch)} tensors")
            xb, yb = (b.to(self.device, non_blocking=True) for b in batch)
            if self.xb is None: self.xb, self.yb = torch.empty_like(xb), torch.empty_like(yb)
            if xb.shape != self.xb.shape or yb.shape != self.yb.shape: continue
            self.xb.copy_(xb, non_blocking=True)
            self.yb.copy_(yb, non_blocking=True)
            yield

    def batch(self, i): return self.xb, self.yb
