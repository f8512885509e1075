"""ActivationStats: per-batch statistics and histograms of layer outputs, recorded on the device.

The hot path is the forward hook, and it is short: for a hooked output `x` of n elements it launches three
kernels, whatever n is: `dot(x, 1)` and `dot(x, x)`, kept for this batch's row of the records, and an
`index_select` of a fixed-size random sample of `x` into the layer's slot of this batch's sample buffer.
Nothing else happens per batch. On CUDA the layers are instead read together after the forward pass, five
kernels for all of them (see activation_batch.py): there a small CNN is bound by kernel launches.

Every `depth` batches (up to 16; and whenever the records are read, and when fit ends) the staged batches are
finished together: one comparison and one sum count the near-zero values of every sample, one `nan_to_num`,
`clamp_`, `add` and `bincount` (`histc` on CUDA, where bincount would sync) bin them all, each (batch, layer)
in its own block of bins, and one copy appends the rows to a `TensorLog`.
Inside a training step each tensor op costs several microseconds of fixed overhead on the CPU (a kernel launch
on a GPU), so running these ops once per `depth` batches rather than once per batch is most of what makes the
histograms cheap. Nothing is read back to the host until a plot, a DataFrame or the health report asks, and
then all batches come back in one transfer.

Why near_zero comes from the sample: counting the values <= 0.05 of every element takes a comparison pass
that writes a buffer and a second pass that sums it; on the CPU those two passes cost as much as the rest of
the statistics together (about 7% of a training step of the chapter's simple_cnn at bs 64). Counting them in
the sample the histogram takes anyway costs almost nothing, at a standard error of at most 1.1 points.
"""
import random
import warnings

import torch

from ..records import TensorLog
from .activation_batch import BatchedReads, warn_changed_in_place
from .hooks import HookCallback, layer_index, without_grad

__all__ = ['ActivationStats', 'activation_summary', 'NEAR_ZERO']

_UNSET = object()
_TENSOR, _FLOAT32 = torch.Tensor, torch.float32
_POOL = 16  # sets of sample positions per output size; each batch uses one, drawn at random
_STAGE_VALUES = 2 ** 19  # staged sample values (2 MB of float32): the number of batches finished together
NEAR_ZERO = 0.05  # fastai's threshold: an activation <= 0.05 counts as "near zero"

# Columns of a raw record row (one row per hooked layer per recorded batch), then `bins` histogram counts:
# sum(x), sum(x^2), count(sample <= 0.05), n elements, n elements in the sample.
_SUM, _SUMSQ, _NEAR, _NUMEL, _NSAMPLE, _HIST = range(6)


class ActivationStats(HookCallback):
    """Records, for every training batch (or every `every`-th) and every hooked layer, the mean, the std and the
    fraction of activations <= 0.05 (`near_zero`) of its output, and with `with_hist=True` a histogram of
    `bins` bins over `hist_range`: fastai's (0, 10) by default; `'symmetric'` means (-10, 10), for layers
    whose outputs are pre-activations, whose negatives (0, 10) drops; or any `(lo, hi)`. Bins are half-open,
    [lo + k*w, lo + (k+1)*w), so a value exactly equal to hi counts as out of range (torch.histc would put it
    in the last bin).

    Hooked layers are those with parameters (as fastai), `include_paramless=True` adds activations and the
    other parameterless leaves, or pass `modules`. Read the records with `stats`, `layer_stats(idx)`,
    `plot_layer_stats(idx)`, `hist(idx)`, `color_dim(idx)` and `plot_all()`; `idx` may be negative (-2 is the
    penultimate hooked layer).

    Cost and memory: the statistics stay on the device and nothing syncs per batch. The records take
    `batches x layers x (5 + bins)` float32 numbers (about 1 MB for 1,000 batches of 5 layers with 40 bins) and
    never grow with the size of the activations. During fit, the samples of up to 16 batches are staged
    before they are counted and binned together: at most 2 MB of float32 samples (`layers x sample` values per
    batch; with `sample=None`, one batch of `layers x` the largest output), and five times that in working
    buffers for the histograms, all freed when fit ends.

    Mean and std are computed from every element, from float32 sums of x and x^2 combined in float64: the
    relative error in the variance grows like 1e-6 (mean / std)^2 (at mean = 100 std we measured up to 1.1e-2
    for 100k elements and 8e-3 for 12.8M), so the std is within 1% while |mean| < 100 std, which activations
    and pre-activations stay well within; a layer whose outputs are a near-constant far from zero (|mean| >
    1000 std) gets a std that is only an upper bound.

    Sampling: when a layer's output has more than `sample` elements, its near_zero fraction and its histogram
    are estimated from `sample` of them, drawn uniformly at random with replacement (each batch uses one of 16
    sets of positions drawn once per fit, from a private generator, so training randomness is untouched);
    outputs of at most `sample` elements are counted whole, exactly.
    - near_zero: the standard error is sqrt(f (1 - f) / sample) for a true fraction f, at most 1.1 points for
      the default 2048 (0.2 points at f = 0.01 or 0.99; 0 at f = 0 or 1, so a collapsed layer reads 1.00).
    - Histograms are scaled by n / sample to estimate the full counts. A bin holding a fraction p of the
      activations has a relative error of about sqrt((1 - p) / (p * sample)): 2.2% at p = 0.5 and 22% at
      p = 0.01. In the log1p units `color_dim` shows, a bin whose sample count is m is off by about 1/sqrt(m):
      under 0.1 where the sample has 100 or more values in the bin, and the colours of sparse bins flicker;
      bins below about 1 / sample of the mass may read 0 on a given batch.
    A smaller sample is cheaper and noisier: in fits of simple_cnn + BN (bs 64, 2 CPU threads) ActivationStats
    spent 413 instead of 482 us per batch at `sample=1024`, and the correlation of its color_dim images with the
    full histograms fell from about 0.99 to 0.97. `sample=None` counts and histograms every element (exact; on
    the CPU about twice the cost).

    `batched` chooses how outputs are read. Per layer (`False`, the default on the CPU): in each hook, while the
    output is in cache; four ops per layer. Batched (`None`, the default, means this on CUDA; `True` forces it):
    all layers together after the forward pass, a view per layer and five kernels in all, the same records up to
    float rounding. It holds each output from its hook to the end of the forward pass, and copies them all into
    one buffer (chosen automatically only while that is at most 64 MB; beyond that a step is bound by
    arithmetic, not launches). Outputs that a later op changes in place (ReLU(inplace=True), a ResNet's `+=`)
    are found on the first batch and read per layer; one found changed later is warned about, recorded as
    missing for that batch, and read per layer from then on. With `sample=None` outputs are read per layer.
    """
    def __init__(self, with_hist=False, modules=None, every=None, bins=40, hist_range=(0, 10), sample=2048,
                 include_paramless=False, batched=None, hist_sample=_UNSET):
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
        self.with_hist, self.bins, self.sample, self.batched = with_hist, bins, sample, batched
        self.hist_range = _check_range(hist_range)
        self._reset()

    def _reset(self):
        self._log, self.iters, self._cache, self._layers = TensorLog(), [], None, []
        self._samples, self._k, self._b, self._done, self._depth = None, 0, 0, 0, 0
        self._batch, self._plan, self._changed, self._probe = None, None, [], False
        self._pending, self._deferred = [], []

    def before_fit(self):
        super().before_fit()
        self._reset()
        n, dev = len(self.hooked_modules), self.learn.device
        self._layer_of = {id(m): i for i, m in enumerate(self.hooked_modules)}
        self._layers = [None] * n  # per layer, its output size and its per-staged-batch views (see _new_size)
        self._fired = [False] * n
        self._ones = torch.ones(0, device=dev)
        self._zero, self._sums = torch.zeros((), device=dev), []  # per staged batch and layer: sum, sum of squares
        self._sizes = torch.zeros(n, 2, device=dev)  # per layer: its current n elements and n sampled
        self._pools, self._pick, self._rng = {}, 0, random.Random(0)
        # Sample positions come from a private generator on the device: training randomness is untouched, and
        # nothing is copied from the host (a pageable host-to-device copy would sync the GPU).
        self._gen = torch.Generator(device=dev).manual_seed(0)
        self._new_buffers(self.sample or 1)
        # Batched reads (see activation_batch): the first recorded batch is read per layer and tells which outputs
        # later ops change in place; the others are then read together after the forward pass.
        wanted = self.batched if self.batched is not None else dev.type == 'cuda'
        self._probe = wanted and self.sample is not None
        self._batch, self._plan, self._changed = None, None, []
        self._pending, self._deferred = [None] * n, [False] * n

    def before_batch(self):
        super().before_batch()
        if self._active: self._pick = self._rng.randrange(_POOL)  # this batch's sample positions, for every layer

    # ---- the per-batch path: no host reads, three kernels per layer ----------------------------------------
    def _gated_hook(self, module, inp, out):
        if self._active: self.hook(module, inp, out)  # skips HookCallback's detaching of the inputs

    def hook(self, module, inp, out):
        i = self._layer_of[id(module)]
        x = out if type(out) is _TENSOR else _first_tensor(out)  # the common case without a call: 2 us per layer
        if self._deferred[i]:  # read after the forward pass, with the other batched layers
            self._pending[i] = (x, x._version)
            return
        # Grad mode off rather than detach(): the same effect, one op fewer per layer (on a GPU, where a small
        # CNN's step is bound by launch overhead, every op counts).
        without_grad(self._record, i, x)
        if self._probe: self._pending[i] = (x, x._version)

    def after_pred(self):
        if not self._active or not (self._probe or self._batch is not None): return
        if self._probe:  # the outputs no later op changed in place can be read after the forward pass
            ready = [(i, out[0].numel()) for i, (fired, out) in enumerate(zip(self._fired, self._pending))
                     if fired and out[0]._version == out[1]]
            self._plan = ([i for i, _ in ready], [n for _, n in ready])
        else:
            # Outside autocast (MixedPrecision keeps it on until after_loss): on CUDA it would run mv and bmm, the
            # sums, in reduced precision.
            with torch.no_grad(), torch.autocast(self.learn.device.type, enabled=False):
                self._changed = self._batch.read(self._b, self._pending, self._pick)
            for i in self._changed: warn_changed_in_place(self.layer_names[i], self.learn.train_iter)
        self._pending = [None] * len(self._pending)  # hold no activation beyond the forward pass

    def _record(self, i, x):
        if x.dtype is not _FLOAT32: x = x.float()
        flat = x.view(-1) if x.is_contiguous() else _flat(x)
        layer = self._layers[i]
        if layer is None or layer[0] != flat.numel():  # the first batch, or a new size (a smaller last batch)
            if flat.numel() == 0: return
            layer = self._new_size(i, flat.numel())
        _, ones, pool, slots = layer
        b = self._b
        slot, cell = slots[b], 2 * (b * len(self._layers) + i)
        # BLAS dots (faster than torch.sum on the CPU), kept as they come; `_finish` stacks them all in one op
        # (an `out=` here would add a copy per dot).
        self._sums[cell] = torch.dot(flat, ones)
        self._sums[cell + 1] = torch.dot(flat, flat)
        # Copy the sample now, while the output is in cache and before a later in-place op can change it.
        if pool is None: slot.copy_(flat)
        else: torch.index_select(flat, 0, pool[self._pick], out=slot)
        self._fired[i] = True

    def _flat_of(self, i, x):
        "Layer i's output as a 1-D view in memory order, with its size bookkeeping updated; None when empty."
        flat = _flat(x)
        n = flat.numel()
        if n == 0: return None
        layer = self._layers[i]
        if layer is None or layer[0] != n: self._new_size(i, n)
        return flat

    def after_batch(self):
        if self._active:
            if not all(self._fired): self._mark_missing()
            self.iters.append(self.learn.train_iter)
            self._fired = [False] * len(self._fired)
            self._b += 1
            if self._plan is not None or self._changed: self._replan()
            if self._b == self._depth:
                self.flush()
                self._b = self._done = 0  # the staging buffers are reused from the top
        super().after_batch()

    def _replan(self):
        "Start (after the first batch) or narrow (an output found changed in place) the batched reads."
        self.flush()  # the staged batches were recorded with the old plan
        if self._plan is not None: layers, sizes = self._plan
        else:
            kept = [(i, n) for i, n in zip(self._batch.layers, self._batch.sizes) if i not in self._changed]
            layers, sizes = [i for i, _ in kept], [n for _, n in kept]
        self._probe, self._plan, self._changed = False, None, []
        use = bool(layers) and (self.batched or BatchedReads.fits(sizes))
        self._batch = BatchedReads(self, layers, sizes, self._samples, self.learn.device, _POOL) if use else None
        self._deferred = [use and i in layers for i in range(len(self._layers))]

    def _mark_missing(self):
        "A hooked layer did not run this batch: record it as empty (numel 0) rather than repeat stale values."
        for i, fired in enumerate(self._fired):
            if not fired:
                cell = 2 * (self._b * len(self._layers) + i)
                self._sums[cell] = self._sums[cell + 1] = self._zero
                self._stage[self._b, i].zero_()
                self._samples[self._b, i].fill_(float('nan'))

    # ---- sizes and buffers: on the first batch, and when an output's size changes (a smaller last batch) ----
    def _new_size(self, i, n):
        "Layer i's output now has n elements: its counts, sample positions, and its views into the staging buffers."
        if n > len(self._ones):
            self._ones = torch.ones(n, device=self.learn.device)
            self._layers = [None] * len(self._layers)  # re-derive the other layers' views of it
        sampled = self.sample is not None and n > self.sample
        if not sampled and n > self._k:  # sample=None: slots fit every output
            self._new_buffers(n)
        pool = self._positions(n).unbind(0) if sampled else None
        # This and later staged batches; the batches staged before keep the size they were recorded with.
        self._sizes[i, 0].fill_(n)  # fill_ with a number: no host-to-device copy, so no sync
        self._sizes[i, 1].fill_(self._k if sampled else n)
        self._stage[self._b:, i, _NUMEL:_HIST].copy_(self._sizes[i])
        if not sampled: self._samples[self._b:, i, n:].fill_(float('nan'))  # the unused rest counts nowhere
        slots = [self._samples[b, i, :n if not sampled else None] for b in range(self._depth)]
        self._layers[i] = (n, self._ones[:n], pool, slots)
        return self._layers[i]

    def _positions(self, n):
        "The sets of sample positions for outputs of n elements, drawn on first use; None if they are counted whole."
        if self.sample is None or n <= self.sample: return None
        if n not in self._pools:
            positions = torch.randint(n, (_POOL, self._k), generator=self._gen, device=self.learn.device)
            # In ascending order (a sample is a set: its order changes no count), so that the gathers walk memory
            # forwards and the hardware prefetches the next values: about 12% off the sampling on the CPU.
            self._pools[n] = positions.sort(1).values
        return self._pools[n]

    def _new_buffers(self, k):
        """The staging buffers for `depth` batches of `k` sample values per layer: rows (depth, layers, 5 + bins)
        and samples (depth, layers, k), NaN where unused, and the histograms' working buffers."""
        n_layers, dev = len(self._layers), self.learn.device
        if self._samples is not None: self.flush()  # grown mid-fit: record what is staged
        # Grown mid-batch (sample=None: one batch staged): keep what this batch's earlier layers recorded.
        old = (self._stage[0], self._samples[0]) if self._samples is not None else None
        depth = 1 if self.sample is None else max(1, min(16, _STAGE_VALUES // (n_layers * k)))
        self._k, self._depth, self._layers = k, depth, [None] * n_layers
        self._stage = torch.zeros(depth, n_layers, _HIST + (self.bins if self.with_hist else 0), device=dev)
        self._samples = torch.full((depth, n_layers, k), float('nan'), device=dev)
        if len(self._sums) != 2 * depth * n_layers: self._sums = [self._zero] * (2 * depth * n_layers)
        if old is not None:
            self._stage[0].copy_(old[0])
            self._samples[0, :, :old[1].shape[-1]].copy_(old[1])
        self._near_flags = torch.empty_like(self._samples)
        if self.with_hist:
            lo, hi = self.hist_range
            # Batch b, layer i has the bins [(b*layers + i)*(bins+2), ...): an underflow bin, `bins` bins, an
            # overflow bin.
            block = torch.arange(depth * n_layers, dtype=torch.float64, device=dev).view(depth, n_layers, 1)
            self._hist_offsets = block * (self.bins + 2) + 1 - lo * self.bins / (hi - lo)
            self._hist_vals = torch.empty(depth, n_layers, k, device=dev)
            self._hist_pos = torch.empty(depth, n_layers, k, dtype=torch.float64, device=dev)
            if dev.type != 'cuda': self._hist_idx = torch.empty(depth, k, n_layers, dtype=torch.int32, device=dev)

    # ---- finishing the staged batches: a fixed number of ops for all of them -------------------------------
    def flush(self):
        """Count and bin the batches staged so far and append them to the records. It happens by itself every few
        batches, whenever the records are read, and when fit ends; call it before reading `_log` directly."""
        # Only whole batches: read in the middle of a batch (a callback's after_loss, say), the batch being
        # recorded stays staged, and the next flush starts after the batches finished here.
        if self._b > self._done:
            self._finish(self._done, self._b)
            self._done = self._b

    def _finish(self, start, end):
        m, n_layers = end - start, len(self._layers)
        rows, samples = self._stage[start:end], self._samples[start:end]
        rows[..., _SUM:_NEAR].copy_(torch.stack(self._sums[2 * start * n_layers:2 * end * n_layers]).view(m, -1, 2))
        if self._batch is not None: self._batch.finish(rows[..., _SUM:_NEAR], start, end)  # the batched layers' sums
        # NaN (unused slot positions) compares False: only sampled values are counted.
        torch.sum(torch.le(samples, NEAR_ZERO, out=self._near_flags[:m]), 2, out=rows[..., _NEAR])
        if self.with_hist: rows[..., _HIST:].copy_(self._histograms(samples))
        self._log.extend(rows)
        # The rows are reused for later batches: put back every layer's current size (a layer that did not run
        # was zeroed) and the NaN of unused sample slots.
        rows[..., _NUMEL:_HIST].copy_(self._sizes)
        for i, layer in enumerate(self._layers):
            if layer is not None and layer[2] is None: samples[:, i, layer[0]:].fill_(float('nan'))

    def _histograms(self, samples):
        "Bin every value of `samples` (m staged batches) at once; returns (m, layers, bins) counts."
        m = len(samples)
        lo, hi = self.hist_range
        width = (hi - lo) / self.bins
        # NaN (unused slot positions) goes to the underflow bin, values below lo too, values from hi up to the
        # overflow bin; the samples keep their NaN.
        vals = torch.nan_to_num(samples, lo - width, out=self._hist_vals[:m])
        vals.clamp_(lo - width / 2, hi + width / 2)
        # Each value moved to its block in float64, so that no value can cross a bin edge on the way. Converted
        # first: adding float32 to float64 takes a slower mixed-type loop (on the CPU 260 against 190 us for
        # 16 batches of 10 layers), for the same result.
        pos = self._hist_pos[:m].copy_(vals)
        torch.add(self._hist_offsets[:m], pos, alpha=1 / width, out=pos)
        n_layers = len(self._layers)
        blocks = m * n_layers * (self.bins + 2)
        if pos.is_cuda: counts = torch.histc(pos, blocks, 0, blocks)  # bincount would read its size back: a sync
        else:
            # bincount (on the CPU 5x faster than histc) gets the bin indices transposed to (batch, k, layers), so
            # that consecutive increments go to different layers' counters: a run of increments to one counter
            # (half of a pre-activation falls in the underflow bin) waits on each previous one, twice as slow.
            counts = torch.bincount(self._hist_idx[:m].copy_(pos.transpose(1, 2)).view(-1), minlength=blocks)
        return counts.view(m, n_layers, self.bins + 2)[..., 1:-1]  # without the under- and overflow bins

    def cleanup_fit(self):
        if self._samples is not None: self.flush()  # however fit ended, the completed batches are kept
        super().cleanup_fit()
        # The staging buffers can be as large as the largest activation (sample=None): free them between fits.
        self._samples = self._stage = self._near_flags = self._ones = self._pools = self._sizes = None
        self._sums = []
        self._hist_offsets = self._hist_vals = self._hist_pos = self._hist_idx = None
        self._batch, self._plan, self._changed, self._probe = None, None, [], False
        self._pending, self._deferred = [None] * len(self._layers), [False] * len(self._layers)
        self._b = self._done = 0
        self._layers = [None] * len(self._layers)

    # ---- checkpoints: SaveModelCallback keeps the records, and a resumed fit continues them ----------------
    def state_dict(self):
        "The records so far (one host transfer, at checkpoint time), and the sampler's state."
        if self._samples is not None: self.flush()
        return {'records': self._log.state_dict()['values'], 'iters': list(self.iters),
                'layer_names': list(self.layer_names), 'rng': self._rng.getstate()}

    def load_state_dict(self, state):
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
        self._log.load_state_dict({'values': rows}, device)
        self.iters, self.layer_names, self._cache = list(state['iters']), names, None
        self._rng.setstate(_as_rng_state(state['rng']))

    # ---- reading: one host transfer, cached until the next batch is recorded ------------------------------
    @property
    def stats(self):
        """The records as CPU tensors: `mean`, `std`, `near_zero` shaped (batches, layers), `hist` (batches,
        layers, bins; estimated full-activation counts, present with `with_hist`), `iters` (the training batch
        number of each row) and `layer_names`. A layer that did not run in a batch reads NaN there."""
        if self._cache is None or self._cache[0] != len(self.iters):
            self._cache = (len(self.iters), self._summary())
        out = dict(self._cache[1])
        out['iters'], out['layer_names'] = torch.tensor(self.iters, dtype=torch.long), list(self.layer_names)
        return out

    def _summary(self):
        if self._samples is not None: self.flush()
        rows = self._log.values().cpu()  # sync-ok: on request, all batches in one transfer
        return activation_summary(rows, self.with_hist) if len(rows) else {}

    def _layer(self, idx):
        if not self.iters:
            raise ValueError("ActivationStats has recorded nothing yet: add it to a Learner and call fit")
        return layer_index(idx, len(self.layer_names))

    def layer_stats(self, idx):
        "A DataFrame of one layer's `mean`, `std` and `near_zero` per recorded batch, indexed by batch number."
        import pandas as pd
        i, s = self._layer(idx), self.stats
        return pd.DataFrame({k: s[k][:, i].numpy() for k in ('mean', 'std', 'near_zero')},  # sync-ok: read on request
                            index=pd.Index(s['iters'].numpy(), name='batch'))  # sync-ok: read on request

    def hist(self, idx):
        "log1p of layer `idx`'s histogram counts, shaped (bins, batches): column t is batch t's histogram."
        i = self._layer(idx)
        if not self.with_hist:
            raise ValueError("These activation stats were recorded without histograms: use "
                             "ActivationStats(with_hist=True) to get hist, color_dim and plot_all")
        return self.stats['hist'][:, i].t().log1p()

    def plot_layer_stats(self, idx):
        "Mean, std and % near zero of layer `idx` against the training batch, side by side; returns the figure."
        from ..diagnostics.plots import plot_series
        i, df = self._layer(idx), self.layer_stats(idx)
        return plot_series(df.index, {'mean': df['mean'], 'std': df['std'], '% near zero': df['near_zero']},
                           title=self.layer_names[i])

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
    """Raw records (batches, layers, 5 [+ bins]) -> `mean`, `std`, `near_zero` (and `hist`, scaled from the
    sample to estimated full counts), computed in float64 for all batches and layers at once."""
    raw = raw.double()
    n = raw[..., _NUMEL]
    empty = n == 0  # a layer that did not run in that batch
    n_safe, k = n.clamp(min=1), raw[..., _NSAMPLE].clamp(min=1)
    s, ss = raw[..., _SUM], raw[..., _SUMSQ]
    var = (ss - s * s / n_safe) / (n_safe - 1).clamp(min=1)
    nan = torch.tensor(float('nan'), dtype=raw.dtype)
    out = {'mean': (s / n_safe).where(~empty, nan).float(),
           'std': var.clamp(min=0).sqrt().where(~empty, nan).float(),
           'near_zero': (raw[..., _NEAR] / k).where(~empty, nan).float()}
    if with_hist: out['hist'] = (raw[..., _HIST:] * (n / k).unsqueeze(-1)).float()
    return out


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
    return (float(hist_range[0]), float(hist_range[1]))
