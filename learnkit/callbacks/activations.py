"""ActivationStats: per-batch statistics and histograms of layer outputs, recorded on the device.

The hot path is the forward hook, and it is short: for a hooked output of n elements it copies a fixed-size
random sample of it (`index_select` of `sample` positions; the whole output when n <= sample) into this batch's
slot of a staging buffer. That is one op per layer, whatever n is. With `exact=True`, outputs larger than the
sample also get full-tensor sums: three more ops (a shift by the layer's reference value, and two dot products).
Nothing else happens per batch, and nothing is read back. On CUDA the layers are instead read together after the
forward pass (see activation_batch.py): two kernels for all of them (six with `exact=True`), since a small CNN's
step there is bound by kernel launches.

Every `depth` batches (up to 16; and whenever the records are read, and when fit ends) the staged batches are
finished together, with a fixed number of ops for all batches and layers: the mean and std of every sample (in
float64, two passes), the near-zero count, the saturated count of bounded layers, and the histograms
(`nan_to_num`, `clamp_`, `add` and `bincount`, or `histc` on CUDA where bincount would sync; each (batch, layer)
in its own block of bins); one copy appends the rows to a `TensorLog`. Each tensor op has a fixed overhead (a
kernel launch on a GPU), so running these ops once per `depth` batches rather than once per batch is most of
what makes the statistics cheap. Nothing is read back to the host until a plot, a DataFrame or the health report
asks, and then all batches come back in one transfer.
"""
import random
import warnings
from typing import NamedTuple

import torch
from torch import nn

from ..records import TensorLog
from .activation_batch import BatchedReads, warn_changed_in_place
from .activation_graph import GraphActivations
from .collectives import all_reduce_sum
from .hooks import HookCallback, default_modules, layer_index, without_grad
from .stats import StatsCallback

__all__ = ['ActivationStats', 'activation_summary', 'activation_bounds', 'reduce_activation_records', 'NEAR_ZERO',
           'SATURATION_MARGIN']

_UNSET = object()
_TENSOR, _FLOAT32 = torch.Tensor, torch.float32
_POOL = 16  # sets of sample positions per output size; each batch uses one, drawn at random
_STAGE_VALUES = 2 ** 19  # staged sample values (2 MB of float32): the number of batches finished together
_STATE_VERSION = 2  # of the checkpoint state; 1 kept sums where 2 keeps means and variances
NEAR_ZERO = 0.05  # fastai's threshold: an activation <= 0.05 counts as "near zero"
SATURATION_MARGIN = 0.01  # an output of a bounded layer within 1% of its range from a bound counts as saturated

# Columns of a raw record row (one row per hooked layer per recorded batch), then `bins` histogram counts:
# mean, variance (n - 1 denominator), n elements, n elements in the sample, count(sample <= 0.05), count(sample
# saturated; NaN for an unbounded layer).
_MEAN, _VAR, _NUMEL, _NSAMPLE, _NEAR, _SATURATED, _HIST = range(7)

# Bounded activations and their output range (see activation_bounds).
_BOUNDED = {nn.Tanh: (-1., 1.), nn.Sigmoid: (0., 1.), nn.Hardsigmoid: (0., 1.), nn.Softsign: (-1., 1.)}


def activation_bounds(module):
    """(lo, hi), the range of a bounded activation's outputs, or None: nn.Tanh and nn.Softsign (-1, 1), nn.Sigmoid
    and nn.Hardsigmoid (0, 1), nn.Hardtanh (min_val, max_val). nn.ReLU6, a Hardtanh, is left out: its lower bound is
    a ReLU's off state (dead-unit tracking's business), not saturation."""
    if isinstance(module, nn.ReLU6): return None
    if isinstance(module, nn.Hardtanh): return (float(module.min_val), float(module.max_val))
    return next((bounds for cls, bounds in _BOUNDED.items() if isinstance(module, cls)), None)


class _LayerRead(NamedTuple):
    "How one layer's output of `numel` elements is read: made when its size first appears, reused every batch."
    numel: int
    positions: list | None  # per set of sample positions, the positions; None: the whole output is copied
    slots: list  # per staged batch, this layer's view of the sample buffer
    ones: torch.Tensor | None  # exact sums: ones of the output's size (the dot product that sums it)
    shifted: torch.Tensor | None  # exact sums: scratch for the output minus the layer's reference


class ActivationStats(GraphActivations, HookCallback, StatsCallback):
    """Records, for every training batch (or every `every`-th) and every hooked layer, the mean, the std and the
    fraction of activations <= 0.05 (`near_zero`) of its output, the fraction `saturated` of a bounded layer's
    outputs, and with `with_hist=True` a histogram of `bins` bins over `hist_range`: fastai's (0, 10) by default;
    `'symmetric'` means (-10, 10), for layers whose outputs are pre-activations, whose negatives (0, 10) drops;
    or any `(lo, hi)`. Bins are half-open, [lo + k*w, lo + (k+1)*w), so a value exactly equal to hi counts as out
    of range (torch.histc would put it in the last bin).

    Hooked layers are those with parameters (as fastai); `include_saturating=True` adds the bounded activations
    (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign; see `activation_bounds`), whose `saturated`
    share is the fraction of outputs within 1% of the range from a bound; `include_paramless=True` adds every
    parameterless leaf; or pass `modules`. `bounds` lists, per hooked layer, its (lo, hi) or None; `saturated`
    is NaN for unbounded layers. Read the records with `stats`, `layer_stats(idx)`, `plot_layer_stats(idx)`,
    `hist(idx)`, `color_dim(idx)` and `plot_all()`; `idx` may be negative (-2 is the penultimate hooked layer).

    Sampling and precision: when a layer's output has more than `sample` elements, its statistics are estimated
    from `sample` of them, drawn uniformly at random with replacement (each batch uses one of 16 sets of positions
    drawn once per fit, from a private generator, so training randomness is untouched); outputs of at most
    `sample` elements are read whole, and their statistics are exact. For a layer whose outputs have std s, with
    k = `sample` (2048 by default):
    - mean: standard error s / sqrt(k) (2.2% of the std);
    - std: standard error about s / sqrt(2k) for near-normal outputs (1.6%), more for heavy tails: in general
      s * sqrt((kurtosis - 1) / (4k)), kurtosis being E[(x - mean)^4] / s^4 (3 for normal data);
    - near_zero and saturated: sqrt(f (1 - f) / k) for a true fraction f, at most 1.1 points (0.2 points at
      f = 0.01 or 0.99; 0 at f = 0 or 1, so a collapsed layer reads 1.00);
    - histograms are scaled by n / k to estimate the full counts. A bin holding a fraction p of the activations
      has a relative error of about sqrt((1 - p) / (p * k)): 2.2% at p = 0.5 and 22% at p = 0.01. In the log1p
      units `color_dim` shows, a bin whose sample count is m is off by about 1/sqrt(m): under 0.1 where the sample
      has 100 or more values in the bin; bins below about 1 / k of the mass may read 0 on a given batch;
    - a NaN or Inf in a sampled output shows only if the sample holds it (the layers after it usually carry it to
      every element).
    Means and stds of samples are computed in float64 in two passes: exact up to float64 rounding, whatever the
    ratio of mean to std. `exact=True` computes the mean and std of larger outputs from every element instead:
    float32 sums of the output minus a per-layer reference (the layer's mean a few batches earlier), combined in
    float64, so the std keeps about 1e-5 relative precision even where |mean| is 1e4 times the std (a naive float32
    sum of squares loses it all). The other statistics still come from the sample. `sample=None` reads every
    element of every output (exact everything, on the CPU about twice the cost).

    Cost and memory: the statistics stay on the device and nothing syncs per batch. Per training batch, one op per
    hooked layer (the sample), four with `exact=True` for outputs larger than the sample; per `depth` batches, a
    fixed few dozen ops for all of them. A smaller sample is cheaper and noisier. The records take
    `batches x layers x (6 + bins)` float32 numbers (about 1 MB for 1,000 batches of 5 layers with 40 bins) and
    never grow with the size of the activations. During fit, the samples of up to 16 batches are staged before
    they are finished together: at most 2 MB of float32 samples (`layers x sample` values per batch; with
    `sample=None`, one batch of `layers x` the largest output), and about five times that in working buffers
    (plus, with `exact=True`, one buffer of the largest output), all freed when fit ends.

    `batched` chooses how outputs are read. Per layer (`False`, the default on the CPU): in each hook, while the
    output is in cache. Batched (`None`, the default, means this on CUDA; `True` forces it): all layers together
    after the forward pass, a view per layer and two kernels in all (six with `exact=True`), the same records up to
    float rounding. It holds each output from its hook to the end of the forward pass, and copies them all into
    one buffer (chosen automatically only while that is at most 64 MB; beyond that a step is bound by
    arithmetic, not launches). Outputs that a later op changes in place (ReLU(inplace=True), a ResNet's `+=`)
    are found on the first batch and read per layer; one found changed later is warned about, recorded as
    missing for that batch, and read per layer from then on. With `sample=None` outputs are read per layer.

    In graph mode (`fit(..., graph=True)`) the hooks write each layer's sample at a device-side row of a staging
    buffer and the epoch's rows are finished at its end: the same records as an ordinary fit (see
    activation_graph.py; `exact=True`, `sample=None` and `batched=True` are refused there).
    """
    record_schema = {
        'mean': "mean of the output: of its sample, or with exact=True of every element when larger than the sample",
        'var': "variance of the output (n - 1 denominator), from the same values as the mean",
        'numel': "elements in the output (0: the layer did not run in that batch)",
        'n_sample': "elements in the sample (numel when the output is read whole)",
        'near_zero': "sampled elements <= 0.05",
        'saturated': "sampled elements within 1% of the range from a bound (NaN: an unbounded layer)",
        'hist': "per bin, sampled elements in the bin (with_hist=True; `bins` columns)"}

    def __init__(self, with_hist=False, modules=None, every=None, bins=40, hist_range=(0, 10), sample=2048,
                 include_paramless=False, batched=None, exact=False, include_saturating=False, hist_sample=_UNSET):
        super().__init__(modules=modules, every=every, include_paramless=include_paramless)
        if hist_sample is not _UNSET:
            warnings.warn("ActivationStats(hist_sample=...) is now `sample`: it sizes the sample that both near_zero "
                          "and the histogram are taken from", FutureWarning, stacklevel=2)
            sample = hist_sample
        if not isinstance(bins, int) or bins < 1: raise ValueError(f"bins must be a positive int; got {bins!r}")
        if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool) or sample < 1):
            raise ValueError(f"sample must be a positive int or None (count every element); got {sample!r}")
        if batched not in (None, True, False):
            raise ValueError(f"batched must be None (on CUDA), True or False; got {batched!r}")
        if not isinstance(exact, bool):
            raise ValueError(f"exact must be True (mean and std of every element) or False (of the sample); "
                             f"got {exact!r}")
        if not isinstance(include_saturating, bool):
            raise ValueError(f"include_saturating must be True or False; got {include_saturating!r}")
        if modules is not None and include_saturating:
            raise ValueError("include_saturating chooses the default modules; it has no effect when modules are "
                             "given. Pass one or the other (bounded modules among `modules` are measured anyway).")
        self.with_hist, self.bins, self.sample, self.batched = with_hist, bins, sample, batched
        self.exact, self.include_saturating = exact, include_saturating
        self.hist_range = _check_range(hist_range)
        self.bounds, self._layer_reads, self._position_rng = [], [], random.Random(0)
        self._reset_records()
        self._free_staging()

    def default_hooked_modules(self, model):
        bounded = (lambda m: activation_bounds(m) is not None) if self.include_saturating else None
        return default_modules(model, self.include_paramless, also=bounded)

    def _reset_records(self):
        self._records, self.iters, self._stats_cache = TensorLog(), [], None

    def before_fit(self):
        super().before_fit()
        self._reset_records()
        n_layers, dev = len(self.hooked_modules), self.learn.device
        self.bounds = [activation_bounds(m) for m in self.hooked_modules]
        self._layer_index = {id(m): i for i, m in enumerate(self.hooked_modules)}
        self._layer_reads = [None] * n_layers  # per layer, how its current output size is read (see _new_size)
        self._recorded = [False] * n_layers  # per layer, whether this batch's output was read
        self._current_sizes = torch.zeros(n_layers, 2, device=dev)  # per layer: its n elements and n sampled now
        self._sample_positions, self._position_set, self._position_rng = {}, 0, random.Random(0)
        # Sample positions come from a private generator on the device: training randomness is untouched, and
        # nothing is copied from the host (a pageable host-to-device copy would sync the GPU).
        self._position_generator = torch.Generator(device=dev).manual_seed(0)
        # Exact sums: each layer's output is shifted by its reference value before it is summed, so that float32
        # sums of squares keep their precision when |mean| is large against the std. The reference is set from the
        # layer's first sample and moved to its latest mean whenever the staged batches are finished.
        self._reference = torch.zeros(n_layers, device=dev)
        self._reference_views = list(self._reference.unbind(0))  # made once: a view is an op too
        self._reference_set = [False] * n_layers
        self._ones = self._shifted = torch.zeros(0, device=dev)
        self._zero_scalar, self._staged_sums = torch.zeros((), device=dev), []
        self._saturation_setup(dev)
        self._new_buffers(self.sample or 1)
        # Batched reads (see activation_batch): the first recorded batch is read per layer and tells which outputs
        # later ops change in place; the others are then read together after the forward pass.
        wanted = self.batched if self.batched is not None else dev.type == 'cuda'
        self._probing = wanted and self.sample is not None
        self._batched_reads, self._batch_plan, self._changed_in_place = None, None, []
        self._held_outputs, self._read_after_forward = [None] * n_layers, [False] * n_layers

    def _saturation_setup(self, dev):
        "The bounded layers, and per bounded layer the centre of its range and the distance from it that saturates."
        bounded = [(i, b) for i, b in enumerate(self.bounds) if b is not None]
        self._bounded_layers = (torch.tensor([i for i, _ in bounded], device=dev) if bounded else None)
        if bounded:
            lo, hi = torch.tensor([b for _, b in bounded], device=dev).unbind(1)
            self._range_centre = ((lo + hi) / 2).unsqueeze(1)
            self._saturation_distance = ((0.5 - SATURATION_MARGIN) * (hi - lo)).unsqueeze(1)

    def before_batch(self):
        super().before_batch()
        if self._active: self._position_set = self._position_rng.randrange(_POOL)  # this batch's, for every layer

    # ---- the per-batch path: no host reads, one op per layer (four for exact sums) -------------------------
    def _gated_hook(self, module, inp, out):
        if self._active: self.hook(module, inp, out)  # skips HookCallback's detaching of the inputs

    def hook(self, module, inp, out):
        i = self._layer_index[id(module)]
        x = out if type(out) is _TENSOR else _first_tensor(out)  # the common case without a call
        if self._read_after_forward[i]:  # read after the forward pass, with the other batched layers
            self._held_outputs[i] = (x, x._version)
            return
        # Grad mode off rather than detach(): the same effect, one op fewer per layer (on a GPU, where a small
        # CNN's step is bound by launch overhead, every op counts).
        without_grad(self._record, i, x)
        if self._probing: self._held_outputs[i] = (x, x._version)

    def after_pred(self):
        if not self._active or not (self._probing or self._batched_reads is not None): return
        if self._probing:  # the outputs no later op changed in place can be read after the forward pass
            ready = [(i, held[0].numel()) for i, (recorded, held) in enumerate(zip(self._recorded, self._held_outputs))
                     if recorded and held[0]._version == held[1]]
            self._batch_plan = ([i for i, _ in ready], [n for _, n in ready])
        else:
            # Outside autocast (MixedPrecision keeps it on until after_loss): on CUDA it would run the sums in
            # reduced precision.
            with torch.no_grad(), torch.autocast(self.learn.device.type, enabled=False):
                self._changed_in_place, read = self._batched_reads.read(self._staged, self._held_outputs,
                                                                        self._position_set, self._flat_of)
            for i in read: self._recorded[i] = True
            for i in self._changed_in_place: warn_changed_in_place(self.layer_names[i], self.learn.train_iter)
        self._held_outputs = [None] * len(self._held_outputs)  # hold no activation beyond the forward pass

    def _record(self, i, x):
        flat = x.view(-1) if x.is_contiguous() else _flat(x)
        read = self._layer_reads[i]
        if read is None or read.numel != flat.numel():  # the first batch, or a new size (a smaller last batch)
            if flat.numel() == 0: return
            read = self._new_size(i, flat.numel())
        # Copy the sample now, while the output is in cache and before a later in-place op can change it.
        slot = read.slots[self._staged]
        if read.positions is None: slot.copy_(flat)
        elif flat.dtype is _FLOAT32: torch.index_select(flat, 0, read.positions[self._position_set], out=slot)
        else: slot.copy_(flat[read.positions[self._position_set]])
        if read.ones is not None: self._record_sums(i, flat, read, slot)
        self._recorded[i] = True

    def _record_sums(self, i, flat, read, slot):
        "exact=True: the sums of the output's values minus the layer's reference, and of their squares."
        if not self._reference_set[i]:  # the layer's first sampled output this fit: its sample's mean
            torch.nan_to_num(slot.mean(), 0., 0., 0., out=self._reference_views[i])
            self._reference_set[i] = True
        if flat.dtype is not _FLOAT32: flat = flat.float()
        shifted = torch.sub(flat, self._reference_views[i], out=read.shifted)
        cell = 2 * (self._staged * len(self._layer_reads) + i)
        # BLAS dots (faster than torch.sum on the CPU), kept as they come; `_finish` stacks them all in one op
        # (an `out=` here would add a copy per dot).
        self._staged_sums[cell] = torch.dot(shifted, read.ones)
        self._staged_sums[cell + 1] = torch.dot(shifted, shifted)

    def _flat_of(self, i, x):
        "Layer i's output as a 1-D view in memory order, with its size bookkeeping updated; None when empty."
        flat = _flat(x)
        n = flat.numel()
        if n == 0: return None
        read = self._layer_reads[i]
        if read is None or read.numel != n: self._new_size(i, n)
        return flat

    def after_batch(self):
        if self._active:
            if not all(self._recorded): self._mark_missing()
            self.iters.append(self.learn.train_iter)
            self._recorded = [False] * len(self._recorded)
            self._staged += 1
            if self._batch_plan is not None or self._changed_in_place: self._replan()
            if self._staged == self._stage_depth:
                self._finish(self._finished, self._staged, move_reference=True)
                self._staged = self._finished = 0  # the staging buffers are reused from the top
        super().after_batch()

    def _replan(self):
        "Start (after the first batch) or narrow (an output found changed in place) the batched reads."
        self.flush()  # the staged batches were recorded with the old plan
        if self._batch_plan is not None: layers, sizes = self._batch_plan
        else:
            reads = self._batched_reads
            kept = [(i, n) for i, n in zip(reads.layers, reads.sizes) if i not in self._changed_in_place]
            layers, sizes = [i for i, _ in kept], [n for _, n in kept]
        self._probing, self._batch_plan, self._changed_in_place = False, None, []
        use = bool(layers) and (self.batched or BatchedReads.fits(sizes))
        self._batched_reads = BatchedReads(layers, sizes, self._staged_samples, self._positions, self.learn.device,
                                           _POOL, self._reference if self.exact else None) if use else None
        self._read_after_forward = [use and i in layers for i in range(len(self._layer_reads))]

    def _mark_missing(self):
        "A hooked layer did not run this batch: record it as empty (numel 0) rather than repeat stale values."
        for i, recorded in enumerate(self._recorded):
            if not recorded:
                if self._staged_sums:
                    cell = 2 * (self._staged * len(self._layer_reads) + i)
                    self._staged_sums[cell] = self._staged_sums[cell + 1] = self._zero_scalar
                self._staged_rows[self._staged, i].zero_()
                self._staged_samples[self._staged, i].fill_(float('nan'))

    # ---- sizes and buffers: on the first batch, and when an output's size changes (a smaller last batch) ----
    def _new_size(self, i, n):
        "Layer i's output now has n elements: its counts, sample positions, and its views into the staging buffers."
        # Finish the whole batches staged with the old size first: every block of batches finished together then
        # has one size per layer, so the unused tail of each layer's slot is known on the host (see _sample_moments).
        if self._layer_reads[i] is not None: self.flush()
        sampled = self.sample is not None and n > self.sample
        if not sampled and n > self._sample_len: self._new_buffers(n)  # sample=None: slots fit every output
        summed = self.exact and sampled
        if summed and n > len(self._ones):
            self._ones = torch.ones(n, device=self.learn.device)
            self._shifted = torch.empty(n, device=self.learn.device)
            self._layer_reads = [None] * len(self._layer_reads)  # re-derive the other layers' views of them
        positions = self._positions(n).unbind(0) if sampled else None
        # This and later staged batches; the batches staged before keep the size they were recorded with.
        self._current_sizes[i, 0].fill_(n)  # fill_ with a number: no host-to-device copy, so no sync
        self._current_sizes[i, 1].fill_(self._sample_len if sampled else n)
        self._staged_rows[self._staged:, i, _NUMEL:_NEAR].copy_(self._current_sizes[i])
        if not sampled: self._staged_samples[self._staged:, i, n:].fill_(float('nan'))  # the unused rest counts nowhere
        slots = [self._staged_samples[b, i, :n if not sampled else None] for b in range(self._stage_depth)]
        self._layer_reads[i] = _LayerRead(n, positions, slots, self._ones[:n] if summed else None,
                                          self._shifted[:n] if summed else None)
        return self._layer_reads[i]

    def _positions(self, n):
        "The sets of sample positions for outputs of n elements, drawn on first use; None if they are read whole."
        if self.sample is None or n <= self.sample: return None
        if n not in self._sample_positions:
            positions = torch.randint(n, (_POOL, self._sample_len), generator=self._position_generator,
                                      device=self.learn.device)
            # In ascending order (a sample is a set: its order changes no count), so that the gathers walk memory
            # forwards and the hardware prefetches the next values.
            self._sample_positions[n] = positions.sort(1).values
        return self._sample_positions[n]

    def _new_buffers(self, k):
        """The staging buffers for `depth` batches of `k` sample values per layer: rows (depth, layers, 6 + bins)
        and samples (depth, layers, k), NaN where unused, and the working buffers that finish them."""
        n_layers, dev = len(self._layer_reads), self.learn.device
        if self._staged_samples is not None: self.flush()  # grown mid-fit: record what is staged
        # Grown mid-batch (sample=None: one batch staged): keep what this batch's earlier layers recorded.
        old = (self._staged_rows[0], self._staged_samples[0]) if self._staged_samples is not None else None
        depth = 1 if self.sample is None else max(1, min(16, _STAGE_VALUES // (n_layers * k)))
        self._sample_len, self._stage_depth, self._layer_reads = k, depth, [None] * n_layers
        self._staged_rows = torch.zeros(depth, n_layers, _HIST + (self.bins if self.with_hist else 0), device=dev)
        self._staged_samples = torch.full((depth, n_layers, k), float('nan'), device=dev)
        if self.exact and len(self._staged_sums) != 2 * depth * n_layers:
            self._staged_sums = [self._zero_scalar] * (2 * depth * n_layers)
        if old is not None:
            self._staged_rows[0].copy_(old[0])
            self._staged_samples[0, :, :old[1].shape[-1]].copy_(old[1])
        self._compare_buffer = torch.empty_like(self._staged_samples)
        self._moment_buffer = torch.empty(depth, n_layers, k, dtype=torch.float64, device=dev)
        if self.with_hist:
            lo, hi = self.hist_range
            # Batch b, layer i has the bins [(b*layers + i)*(bins+2), ...): an underflow bin, `bins` bins, an
            # overflow bin.
            block = torch.arange(depth * n_layers, dtype=torch.float64, device=dev).view(depth, n_layers, 1)
            self._bin_offsets = block * (self.bins + 2) + 1 - lo * self.bins / (hi - lo)
            self._bin_values = torch.empty(depth, n_layers, k, device=dev)
            self._bin_positions = torch.empty(depth, n_layers, k, dtype=torch.float64, device=dev)
            if dev.type != 'cuda': self._bin_indices = torch.empty(depth, k, n_layers, dtype=torch.int32, device=dev)

    # ---- finishing the staged batches: a fixed number of ops for all of them -------------------------------
    def flush(self):
        """Finish the whole batches staged so far and append them to the records. It happens by itself every few
        batches, whenever the records are read (`device_records`, `stats`), and when fit ends."""
        # Only whole batches: read in the middle of a batch (a callback's after_loss, say), the batch being
        # recorded stays staged, and the next flush starts after the batches finished here.
        if self._staged_samples is not None and self._staged > self._finished:
            self._finish(self._finished, self._staged)
            self._finished = self._staged

    def _finish(self, start, end, move_reference=False):
        rows, samples = self._staged_rows[start:end], self._staged_samples[start:end]
        rows[..., _MEAN:_NUMEL].copy_(self._sample_moments(samples, rows[..., _NSAMPLE]))
        if self.exact: self._use_exact_moments(rows, start, end)
        # NaN (unused slot positions) compares False: only sampled values are counted.
        torch.sum(torch.le(samples, NEAR_ZERO, out=self._compare_buffer[:len(rows)]), 2, out=rows[..., _NEAR])
        self._count_saturated(samples, rows[..., _SATURATED])
        if self.with_hist: rows[..., _HIST:].copy_(self._histograms(samples))
        if move_reference and self.exact: self._move_reference(rows[-1])
        self._records.extend(rows)
        # The rows are reused for later batches: put back every layer's current size (a layer that did not run
        # was zeroed) and the NaN of unused sample slots.
        rows[..., _NUMEL:_NEAR].copy_(self._current_sizes)
        for i, read in enumerate(self._layer_reads):
            if read is not None and read.positions is None: samples[:, i, read.numel:].fill_(float('nan'))

    def _sample_moments(self, samples, counts):
        """(m, layers, 2): the mean and variance of every staged sample, in float64 and two passes (exact up to
        float64 rounding). A layer read whole whose output is smaller than its slot leaves the slot's tail unused
        (NaN there); the tails are the same in every batch of the block (a size change finishes the batches before
        it), so they are zeroed by slicing. NaN at a used position propagates."""
        tails = [(i, read.numel) for i, read in enumerate(self._layer_reads)
                 if read is not None and read.positions is None and read.numel < self._sample_len]
        x = self._moment_buffer[:len(samples)].copy_(samples)
        for i, used in tails: x[:, i, used:].zero_()
        n = counts.double().clamp(min=1)
        mean = x.sum(-1).div_(n)
        x.sub_(mean.unsqueeze(-1))
        for i, used in tails: x[:, i, used:].zero_()
        var = torch.linalg.vecdot(x, x).div_((n - 1).clamp(min=1))
        return torch.stack([mean, var], -1)

    def _use_exact_moments(self, rows, start, end):
        "exact=True: the mean and variance of every element, for the outputs larger than their sample."
        m, n_layers = end - start, len(self._layer_reads)
        sums = torch.stack(self._staged_sums[2 * start * n_layers:2 * end * n_layers]).view(m, n_layers, 2)
        if self._batched_reads is not None: self._batched_reads.finish(sums, start, end)  # the batched layers' sums
        sums = sums.double()
        n = rows[..., _NUMEL].double().clamp(min=1)
        shifted_sum, shifted_squares = sums[..., 0], sums[..., 1]
        mean = self._reference.double() + shifted_sum / n
        var = ((shifted_squares - shifted_sum * shifted_sum / n) / (n - 1).clamp(min=1)).clamp_(min=0)
        summed = rows[..., _NSAMPLE] < rows[..., _NUMEL]
        rows[..., _MEAN:_NUMEL].copy_(torch.where(summed.unsqueeze(-1), torch.stack([mean, var], -1),
                                                  rows[..., _MEAN:_NUMEL].double()))

    def _move_reference(self, last_rows):
        "Each layer's reference becomes its mean in the last finished batch (where it ran and is finite)."
        mean = last_rows[:, _MEAN]
        torch.where(mean.isfinite() & (last_rows[:, _NUMEL] > 0), mean, self._reference, out=self._reference)
        if self._batched_reads is not None: self._batched_reads.move_shifts()

    def _count_saturated(self, samples, out):
        "Per staged batch and layer, the sampled values within 1% of the range from a bound; NaN for unbounded layers."
        out.fill_(float('nan'))
        if self._bounded_layers is None: return
        values = samples.index_select(1, self._bounded_layers)
        saturated = values.sub_(self._range_centre).abs_().ge_(self._saturation_distance)  # NaN compares False
        out.index_copy_(1, self._bounded_layers, saturated.sum(-1))

    def _histograms(self, samples):
        "Bin every value of `samples` (m staged batches) at once; returns (m, layers, bins) counts."
        m = len(samples)
        lo, hi = self.hist_range
        width = (hi - lo) / self.bins
        # NaN (unused slot positions) goes to the underflow bin, values below lo too, values from hi up to the
        # overflow bin; the samples keep their NaN.
        values = torch.nan_to_num(samples, lo - width, out=self._bin_values[:m])
        values.clamp_(lo - width / 2, hi + width / 2)
        # Each value moved to its block in float64, so that no value can cross a bin edge on the way. Converted
        # first: adding float32 to float64 takes a slower mixed-type loop, for the same result.
        positions = self._bin_positions[:m].copy_(values)
        torch.add(self._bin_offsets[:m], positions, alpha=1 / width, out=positions)
        n_layers = len(self._layer_reads)
        blocks = m * n_layers * (self.bins + 2)
        if positions.is_cuda: counts = torch.histc(positions, blocks, 0, blocks)  # bincount would read its size back
        else:
            # bincount (on the CPU several times faster than histc) gets the bin indices transposed to (batch, k,
            # layers), so that consecutive increments go to different layers' counters: a run of increments to one
            # counter (half of a pre-activation falls in the underflow bin) waits on each previous one.
            indices = self._bin_indices[:m].copy_(positions.transpose(1, 2))
            counts = torch.bincount(indices.view(-1), minlength=blocks)
        return counts.view(m, n_layers, self.bins + 2)[..., 1:-1]  # without the under- and overflow bins

    def cleanup_fit(self):
        self.flush()  # however fit ended, the completed batches are kept
        super().cleanup_fit()
        self._free_staging()

    def _free_staging(self):
        "The staging buffers can be as large as the largest activation (sample=None): freed between fits."
        self._staged_samples = self._staged_rows = self._compare_buffer = self._moment_buffer = None
        self._ones = self._shifted = self._sample_positions = self._current_sizes = None
        self._bin_offsets = self._bin_values = self._bin_positions = self._bin_indices = None
        self._staged_sums, self._layer_reads = [], [None] * len(self._layer_reads)
        self._batched_reads, self._batch_plan, self._changed_in_place, self._probing = None, None, [], False
        self._held_outputs = [None] * len(self._layer_reads)
        self._read_after_forward = [False] * len(self._layer_reads)
        self._staged = self._finished = 0
        self._free_graph()

    # ---- the statistics protocol (see stats.py); checkpoints keep the records, and a resumed fit continues them
    def device_records(self):
        self.flush()
        return {'records': self._records.values()}

    def summarize(self, raw):
        """`mean`, `std`, `near_zero` and `saturated` shaped (batches, layers), `hist` (batches, layers, bins;
        estimated full-activation counts, present with `with_hist`), `iters` (the training batch number of each
        row), `layer_names` and `bounds`. A layer that did not run in a batch reads NaN there."""
        rows = raw['records']
        out = activation_summary(rows, self.with_hist) if len(rows) else {}
        out.update(iters=torch.tensor(self.iters, dtype=torch.long), layer_names=list(self.layer_names),
                   bounds=list(self.bounds))
        return out

    @property
    def stats(self):
        "`summarize` of the records (see there): one host transfer, cached until the next batch is recorded."
        if self._stats_cache is None or self._stats_cache[0] != len(self.iters):
            self._stats_cache = (len(self.iters), super().stats)
        return dict(self._stats_cache[1])

    def records_mark(self):
        self.flush()
        return len(self._records)

    def combine_ranks(self, since):
        "The rows recorded since the mark become those of the concatenated batches of all ranks (see below)."
        self.flush()
        if len(self._records) == since: return
        rows = self._records.values()[since:]
        rows.copy_(reduce_activation_records(rows))
        self._stats_cache = None  # its summary of the per-rank rows is stale

    def state_dict(self):
        "The records so far (one host transfer, at checkpoint time), and the sampler's state."
        self.flush()
        return {'version': _STATE_VERSION, 'records': self._records.state_dict()['values'], 'iters': list(self.iters),
                'layer_names': list(self.layer_names), 'bounds': [None if b is None else list(b) for b in self.bounds],
                'rng': self._position_rng.getstate()}

    def load_state_dict(self, state):
        if state.get('version') != _STATE_VERSION:
            raise ValueError("these ActivationStats records were written by an older learnkit, whose rows have other "
                             "columns: resume without ActivationStats, or start the fit afresh")
        names, rows = list(state['layer_names']), state['records']
        if self.layer_names and names != list(self.layer_names):
            raise ValueError(f"these ActivationStats records were taken on the layers {names}, but this learner hooks "
                             f"{list(self.layer_names)}: load them into a learner with the same model and modules")
        width = _HIST + (self.bins if self.with_hist else 0)
        if len(rows) and rows.shape[-1] != width:
            raise ValueError(f"these ActivationStats records have {rows.shape[-1] - _HIST} histogram bins per row, "
                             f"but this ActivationStats(with_hist={self.with_hist}, bins={self.bins}) records "
                             f"{width - _HIST}: create it with the same with_hist and bins")
        device = self.learn.device if self.learn is not None else None
        self._records.load_state_dict({'values': rows}, device)
        self.iters, self.layer_names, self._stats_cache = list(state['iters']), names, None
        self.bounds = [None if b is None else tuple(b) for b in state['bounds']]
        self._position_rng.setstate(_as_rng_state(state['rng']))

    # ---- reading ------------------------------------------------------------------------------------------
    def _layer(self, idx):
        if not self.iters:
            raise ValueError("ActivationStats has recorded nothing yet: add it to a Learner and call fit")
        return layer_index(idx, len(self.layer_names))

    def layer_stats(self, idx):
        """A DataFrame of one layer's `mean`, `std` and `near_zero` (and `saturated` for a bounded layer) per
        recorded batch, indexed by batch number."""
        import pandas as pd
        i, s = self._layer(idx), self.stats
        columns = ('mean', 'std', 'near_zero') + (('saturated',) if self.bounds[i] is not None else ())
        return pd.DataFrame({k: s[k][:, i].numpy() for k in columns},  # sync-ok: CPU tensors, read on request
                            index=pd.Index(s['iters'].numpy(), name='batch'))  # sync-ok: CPU tensor, on request

    def hist(self, idx):
        "log1p of layer `idx`'s histogram counts, shaped (bins, batches): column t is batch t's histogram."
        i = self._layer(idx)
        if not self.with_hist:
            raise ValueError("These activation stats were recorded without histograms: use "
                             "ActivationStats(with_hist=True) to get hist, color_dim and plot_all")
        return self.stats['hist'][:, i].t().log1p()

    def plot_layer_stats(self, idx):
        """Mean, std and % near zero (and % saturated for a bounded layer) of layer `idx` against the training
        batch, side by side; returns the figure."""
        from ..diagnostics.plots import plot_series
        i, df = self._layer(idx), self.layer_stats(idx)
        series = {'mean': df['mean'], 'std': df['std'], '% near zero': df['near_zero']}
        if 'saturated' in df: series['% saturated'] = df['saturated']
        return plot_series(df.index, series, title=self.layer_names[i])

    def color_dim(self, idx, figsize=(10, 5), ax=None):
        """The 'colorful dimension' plot of layer `idx`: each column is one batch's histogram, log1p of the
        counts, bin 0 (the lowest values) at the bottom, as fastai draws it. Returns the figure."""
        from ..diagnostics.plots import plot_color_dim
        i = self._layer(idx)
        return plot_color_dim(self.hist(idx), self.hist_range, title=self.layer_names[i], figsize=figsize, ax=ax)

    def plot_all(self, ncols=2, figsize=None):
        "`color_dim` of every hooked layer in one grid, first layer top left; returns the figure."
        from ..diagnostics.plots import grid
        self._layer(0)
        n = len(self.layer_names)
        fig, axs = grid(n, ncols, figsize)
        for i, ax in enumerate(axs[:n]): self.color_dim(i, ax=ax)
        fig.tight_layout()
        return fig


def activation_summary(raw, with_hist=True):
    """Raw records (batches, layers, 6 [+ bins]) -> `mean`, `std`, `near_zero`, `saturated` (and `hist`, scaled
    from the sample to estimated full counts), computed in float64 for all batches and layers at once."""
    raw = raw.double()
    n = raw[..., _NUMEL]
    ran = n > 0  # a layer that did not run in that batch reads NaN
    k = raw[..., _NSAMPLE].clamp(min=1)
    nan = torch.tensor(float('nan'), dtype=raw.dtype)
    out = {'mean': raw[..., _MEAN].where(ran, nan).float(),
           'std': raw[..., _VAR].clamp(min=0).sqrt().where(ran, nan).float(),
           'near_zero': (raw[..., _NEAR] / k).where(ran, nan).float(),
           'saturated': (raw[..., _SATURATED] / k).where(ran, nan).float()}
    if with_hist: out['hist'] = (raw[..., _HIST:] * (n / k).unsqueeze(-1)).float()
    return out


def reduce_activation_records(raw):
    """ActivationStats' raw records `(rows, layers, 6 [+ bins])` from this rank, combined with the same rows of
    every other rank into what one process would record on the concatenated batches (on every rank; one
    all-reduce).

    Each rank's mean and variance become sums (n mean, and (n - 1) var + n mean^2, the sum of squares) that add up
    across ranks in float64; sampled near-zero and saturated counts and histograms are first scaled to their
    estimates of the full counts (the sample size becomes the element count), then added."""
    rows = raw.double()
    n = rows[..., _NUMEL]
    totals = rows.clone()
    totals[..., _MEAN] = n * rows[..., _MEAN]
    totals[..., _VAR] = (n - 1).clamp(min=0) * rows[..., _VAR] + n * rows[..., _MEAN] ** 2
    totals[..., _NEAR:] *= (n / rows[..., _NSAMPLE].clamp(min=1)).unsqueeze(-1)
    totals = all_reduce_sum(totals)
    n = totals[..., _NUMEL]
    count = n.clamp(min=1)
    mean = totals[..., _MEAN] / count
    totals[..., _VAR] = ((totals[..., _VAR] - count * mean * mean) / (count - 1).clamp(min=1)).clamp(min=0)
    totals[..., _MEAN], totals[..., _NSAMPLE] = mean, n
    return totals.to(raw.dtype)


def _flat(x):
    "`x` as 1-D in memory order: a view for contiguous and channels_last tensors (statistics ignore the order)."
    if x.is_contiguous(): return x.view(-1)
    dense = x.permute(sorted(range(x.ndim), key=lambda d: -x.stride(d)))
    return dense.view(-1) if dense.is_contiguous() else x.reshape(-1)


def _first_tensor(out):
    "A module's output, or the first tensor of a tuple output (an LSTM's output, say)."
    if isinstance(out, torch.Tensor): return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor): return o
    raise TypeError(f"ActivationStats hooked a module whose output is {type(out).__name__}, not a tensor; "
                    "pass modules=[...] without it")


def _as_rng_state(state):
    "random.Random's state from its checkpoint form (tuples may come back as lists)."
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _check_range(hist_range):
    if hist_range == 'symmetric': return (-10., 10.)
    if not (isinstance(hist_range, (tuple, list)) and len(hist_range) == 2 and hist_range[0] < hist_range[1]):
        raise ValueError(f"hist_range must be (lo, hi) with lo < hi, or 'symmetric' for (-10, 10); got {hist_range!r}")
    lo, hi = hist_range
    return (float(lo), float(hi))
