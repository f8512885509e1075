"""ActivationStats: per-batch statistics and histograms of layer outputs, recorded on the device.

The hot path is the forward hook, and it is short: for a hooked output `x` of n elements it launches a fixed
number of kernels, whatever n is, each writing its number straight into this batch's row (a preallocated
(layers, 6 + bins) tensor). On the CPU: `sum(x)`, `dot(x, x)`, and `sum(x <= 0.05)` computed as floats in a reused
buffer (a comparison into a float buffer and a float sum are vectorised; a bool mask and its count are several
times slower). On CUDA: one Welford `var_mean` and the same near-zero sum. For histograms, a strided view of a
fixed-size sample (no kernel). Once per batch, for all layers together, one `cat`, `clamp_`, `add` and `bincount`
(`histc` on CUDA, where bincount would sync) bin every layer's sample, each layer's values moved to their own
block of bins, and one `TensorLog` append keeps the row. Nothing is read back to the host until a plot, a
DataFrame or the health report asks, and then all batches come back in one transfer.
"""
import random

import torch

from ..records import TensorLog
from .hooks import HookCallback, layer_index

__all__ = ['ActivationStats', 'activation_summary', 'NEAR_ZERO']

NEAR_ZERO = 0.05  # fastai's threshold: an activation <= 0.05 counts as "near zero"

# Columns of a raw record row (one row per hooked layer per recorded batch), then `bins` histogram counts:
# the shift c, sum(x - c), sum((x - c)^2), count(x <= 0.05), n elements, n elements histogrammed.
_SHIFT, _SUM, _SUMSQ, _NEAR, _NUMEL, _NHIST, _HIST = range(7)


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
    `batches x layers x (6 + bins)` float32 numbers (about 1 MB for 1,000 batches of 5 layers with 40 bins) and
    never grow with the size of the activations; during fit, one float32 working buffer the size of the
    largest hooked output, and one of `layers x hist_sample` numbers for the histograms, are reused by
    every batch (freed when fit ends).

    Precision: on the CPU the mean and std come from float32 sums of x and x^2 (combined in float64), whose
    relative error in the variance is about 1e-7 (mean / std)^2: below 0.1% while |mean| < 100 std, which
    activations and pre-activations stay well within; a layer whose outputs are a near-constant far from zero
    (|mean| > 1000 std) gets a std that is only an upper bound. On CUDA a Welford `var_mean` is exact.

    Sampled histograms: when a layer's output has more than `hist_sample` elements, its histogram is computed
    from a sample of `hist_sample` of them, every p-th element from a random start (p the largest prime that
    fits, so the sample cuts across channels, rows and columns; the start comes from a private generator, so
    training randomness is untouched), and scaled by n / hist_sample to estimate the full counts. A bin holding a
    fraction p of the activations then has a relative error of about sqrt((1 - p) / (p * hist_sample)): 1.6% at
    p = 0.5 and 16% at p = 0.01 for the default 4096. In the log1p units `color_dim` shows, a bin whose sample
    count is m is off by about 1/sqrt(m): under 0.1 where the sample has 100 or more values in the bin, and the
    colours of sparse bins flicker; bins below about 1 / hist_sample of the mass may read 0 on a given batch.
    Mean, std and near_zero are always computed from every element. `hist_sample=None` histograms every
    element (exact, slower).
    """
    def __init__(self, with_hist=False, modules=None, every=None, bins=40, hist_range=(0, 10), hist_sample=4096,
                 include_paramless=False):
        super().__init__(modules=modules, every=every, include_paramless=include_paramless)
        if not isinstance(bins, int) or bins < 1: raise ValueError(f"bins must be a positive int; got {bins!r}")
        if hist_sample is not None and (not isinstance(hist_sample, int) or hist_sample < 1):
            raise ValueError(f"hist_sample must be a positive int or None (histogram every element); got {hist_sample!r}")
        self.with_hist, self.bins, self.hist_sample = with_hist, bins, hist_sample
        self.hist_range = _check_range(hist_range)
        self._reset()

    def _reset(self):
        self._log, self.iters, self._cache, self._sizes, self._hist_k = TensorLog(), [], None, [], 0
        self._work = self._hist_buf = self._hist_offsets = None

    def before_fit(self):
        super().before_fit()
        self._reset()
        n = len(self.hooked_modules)
        self._layer_of = {id(m): i for i, m in enumerate(self.hooked_modules)}
        self._moments = self.learn.device.type == 'cuda'  # CUDA: one Welford kernel; CPU: plain sums (faster there)
        # This batch's row: each hook writes its layer's numbers straight into it; after the batch it is appended.
        self._row = torch.zeros(n, _HIST + (self.bins if self.with_hist else 0), device=self.learn.device)
        self._cells = [tuple(self._row[i, j] for j in (_SHIFT, _SUM, _SUMSQ, _NEAR)) for i in range(n)]
        self._sizes = [None] * n     # per layer: (n elements, working buffer view, sample step, sample slot)
        self._fired = [False] * n
        self._strides, self._rng = {}, random.Random(0)
        if self.with_hist: self._new_hist_buffer(self.hist_sample or 1)

    # ---- the per-batch path: no host reads, a fixed number of kernels per layer ---------------------------
    def _gated_hook(self, module, inp, out):
        if self._active: self.hook(module, inp, out)  # skips HookCallback's detaching of the inputs

    def hook(self, module, inp, out):
        i = self._layer_of[id(module)]
        x = (out if isinstance(out, torch.Tensor) else _first_tensor(out)).detach()
        if x.dtype != torch.float32: x = x.float()
        flat = x.view(-1) if x.is_contiguous() else _flat(x)
        n = flat.numel()
        size = self._sizes[i]
        if size is None or size[0] != n:
            if n == 0: return
            size = self._new_size(i, n, flat.device)
        _, work, step, slot = size
        shift, s, ss, near = self._cells[i]
        if self._moments:  # shift = mean, sum(x - shift) = 0, sum((x - shift)^2) = n * var
            var, mean = torch.var_mean(flat, correction=0)
            shift.copy_(mean)
            torch.mul(var, n, out=ss)
        else:
            # Plain float32 sums: exact enough for diagnostics (see the class docstring) and half the passes
            # over the data of a shifted two-pass variance.
            torch.sum(flat, 0, out=s)
            torch.dot(flat, flat, out=ss)
        torch.sum(torch.le(flat, NEAR_ZERO, out=work), 0, out=near)
        if self.with_hist:  # copy the sample now, while the output is in cache; `_histograms` bins all layers at once
            if step is None: slot.copy_(flat)
            else:
                start = self._rng.randrange(n - step * (self.hist_sample - 1))
                slot.copy_(flat[start:start + step * self.hist_sample:step])
        self._fired[i] = True

    def _new_size(self, i, n, device):
        "A layer's output size changed (first batch, a smaller last batch): its counts, buffer, sample and slot."
        if self._work is None or self._work.numel() < n:
            self._work = torch.empty(n, device=device)  # one buffer for all layers: they run one at a time
            self._sizes = [None] * len(self._sizes)  # re-derive the other layers' views of it
        step, slot = None, None
        if self.with_hist:
            step = self._stride(n)
            if step is None and n > self._hist_k: self._new_hist_buffer(n)  # hist_sample=None: slots fit every output
            slot = self._hist_buf[i * self._hist_k:(i + 1) * self._hist_k]
            if step is None:  # the whole output fits: the rest of the slot stays NaN, which the histogram drops
                slot[n:].fill_(float('nan'))
                slot = slot[:n]
        self._row[i, _NUMEL].fill_(n)
        self._row[i, _NHIST].fill_(n if step is None else self.hist_sample)
        self._row[i, _SHIFT].zero_()  # stays 0 on the CPU, where plain sums are taken
        self._row[i, _SUM].zero_()  # stays 0 on CUDA, where the shift is the mean
        self._sizes[i] = (n, self._work[:n], step, slot)
        return self._sizes[i]

    def _new_hist_buffer(self, k):
        """One float32 slot of `k` sample values per layer (NaN where unused), and each value's float64 offset
        to its layer's block of bins [i*(bins+2), (i+1)*(bins+2)): an underflow bin, `bins` bins, an overflow bin."""
        n_layers = len(self._sizes)
        lo, hi = self.hist_range
        old, old_k = self._hist_buf, self._hist_k
        self._hist_k, self._sizes = k, [None] * n_layers
        self._hist_buf = torch.full((n_layers * k,), float('nan'), device=self.learn.device)
        if old is not None:  # grown in the middle of a batch: keep the samples already taken
            self._hist_buf.view(n_layers, k)[:, :old_k].copy_(old.view(n_layers, old_k))
        # Built on the device: a host-to-device copy of pageable memory would sync the GPU.
        block = torch.arange(n_layers, dtype=torch.float64, device=self.learn.device).repeat_interleave(k)
        self._hist_offsets = block * (self.bins + 2) + 1 - lo * self.bins / (hi - lo)
        self._hist_pos = torch.empty_like(self._hist_offsets)
        self._hist_idx = torch.empty_like(self._hist_offsets, dtype=torch.int32)

    def after_batch(self):
        if self._active:
            if not all(self._fired): self._mark_missing()
            if self.with_hist: self._row[:, _HIST:].copy_(self._histograms())
            self._log.append(self._row)
            self.iters.append(self.learn.train_iter)
            self._fired = [False] * len(self._fired)
        super().after_batch()

    def _histograms(self):
        "Bin every layer's sample at once; returns (layers, bins) counts."
        lo, hi = self.hist_range
        width = (hi - lo) / self.bins
        # Values below lo (and NaN) go to the block's underflow bin, values from hi up to its overflow bin. Moving
        # them to their block happens in float64, so that no value can cross a bin edge on the way.
        buf = self._hist_buf.nan_to_num_(lo - width).clamp_(lo - width / 2, hi + width / 2)
        pos = torch.add(self._hist_offsets, buf, alpha=1 / width, out=self._hist_pos)  # float32 + float64 offsets
        n_layers = len(self._sizes)
        blocks = n_layers * (self.bins + 2)
        if pos.is_cuda: counts = torch.histc(pos, blocks, 0, blocks)  # bincount would read its size back: a sync
        else: counts = torch.bincount(self._hist_idx.copy_(pos), minlength=blocks)  # 5x faster than histc here
        return counts.view(n_layers, self.bins + 2)[:, 1:-1]  # without the under- and overflow bins

    def _mark_missing(self):
        "A hooked layer did not run this batch: record it as empty (numel 0) rather than repeat stale values."
        for i, fired in enumerate(self._fired):
            if not fired:
                self._row[i].zero_()
                self._sizes[i] = None
                if self.with_hist: self._hist_buf[i * self._hist_k:(i + 1) * self._hist_k].fill_(float('nan'))

    def _stride(self, n):
        """The step of the sample of a layer with n elements (None: histogram all of them): the largest prime
        that spreads `hist_sample` elements over the output. A prime step moves across the (channel, row,
        column) grids instead of following them, so the sample does not pick the same positions everywhere."""
        if self.hist_sample is None or n <= self.hist_sample: return None
        step = self._strides.get(n)
        if step is None: step = self._strides[n] = _prime_at_most(n // self.hist_sample)
        return step

    def cleanup_fit(self):
        super().cleanup_fit()
        # The working buffers are as large as the largest activation: free them between fits.
        self._work = self._hist_buf = self._hist_offsets = self._hist_pos = self._hist_idx = None
        self._sizes = [None] * len(self._sizes)

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


def _prime_at_most(k):
    "The largest prime <= k (1 for k < 2)."
    for p in range(k, 1, -1):
        if all(p % d for d in range(2, int(p ** 0.5) + 1)): return p
    return 1


def activation_summary(raw, with_hist=True):
    """Raw records (batches, layers, 6 [+ bins]) -> `mean`, `std`, `near_zero` (and `hist`, scaled from the
    sample to estimated full counts), computed in float64 for all batches and layers at once."""
    raw = raw.double()
    n = raw[..., _NUMEL]
    empty = n == 0  # a layer that did not run in that batch
    n_safe = n.clamp(min=1)
    s, ss = raw[..., _SUM], raw[..., _SUMSQ]
    mean = raw[..., _SHIFT] + s / n_safe
    var = (ss - s * s / n_safe) / (n_safe - 1).clamp(min=1)
    nan = torch.tensor(float('nan'), dtype=raw.dtype)
    out = {'mean': mean.where(~empty, nan).float(),
           'std': var.clamp(min=0).sqrt().where(~empty, nan).float(),
           'near_zero': (raw[..., _NEAR] / n_safe).where(~empty, nan).float()}
    if with_hist:
        scale = (n / raw[..., _NHIST].clamp(min=1)).unsqueeze(-1)
        out['hist'] = (raw[..., _HIST:] * scale).float()
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


def _check_range(hist_range):
    if hist_range == 'symmetric': return (-10., 10.)
    if not (isinstance(hist_range, (tuple, list)) and len(hist_range) == 2 and hist_range[0] < hist_range[1]):
        raise ValueError(f"hist_range must be (lo, hi) with lo < hi, or 'symmetric' for (-10, 10); got {hist_range!r}")
    return (float(hist_range[0]), float(hist_range[1]))
