"""ActivationStats' batched reads: every hooked layer's output read together after the forward pass.

On a GPU, a small CNN's training step is bound by kernel launches, not arithmetic, so what a statistic costs
is the number of ops it launches. Read one layer at a time, in its hook, ActivationStats launches four per
layer (a view, two dots, the sample). Read together at `after_pred`, the layers cost a view each and five
kernels in all: one `cat` of every output into a grid of rows of 1024 values (each output padded with zeros to
whole rows), an `mv` of the grid with ones and a `bmm` of each row with itself (row sums of x and x^2: padding
adds nothing), an `mm` that adds up each layer's rows, and one `index_select` of every layer's sample, with the
same positions the per-layer path would use.

Two things make the per-layer path the right one elsewhere. On the CPU the hook reads each output while it is
still in cache, and the padded grid would be read from memory: the batched reads are slower there. And an
output changed in place after its hook (ReLU(inplace=True), `out += identity` in a ResNet block) no longer holds
what the layer produced. So the first recorded batch is read per layer, and the tensors' version counters say
which outputs were changed later in the forward pass; only the others are batched, and a batched output found
changed in a later batch is reported, recorded as missing for that batch, and read per layer from then on.
"""
import warnings

import torch

_WIDTH = 1024  # values per grid row: each output wastes less than one row on padding
_GRID_VALUES = 2 ** 24  # the grid, when chosen automatically: at most 64 MB of float32


class BatchedReads:
    "The layers read together, their padded grid and sample positions, and the sums of each staged batch."
    def __init__(self, stats, layers, sizes, samples, device, pool_size):
        self.stats, self.layers = stats, layers  # layer indices in grid-row order
        self.device, self.pool_size, self._layouts = device, pool_size, {}
        self.sizes = list(sizes)  # each row's latest output size (a layer that misses a batch keeps its place)
        n_layers = len(stats._layers)
        self.all_layers = layers == list(range(n_layers))
        # Row j of the grid is layer layers[j]: an index tensor built with fill_ (a host list copied to a GPU
        # would sync it).
        self.index = torch.empty(len(layers), dtype=torch.long, device=device)
        for j, i in enumerate(layers): self.index[j].fill_(i)
        depth = len(samples)
        self.sums = torch.zeros(depth, 2, len(layers), device=device)  # per staged batch: sum(x), sum(x^2) per layer
        # Every per-batch destination is a view made once: a view is an op too.
        self.sum_rows = list(self.sums.unbind(0))
        self.sample_rows = [samples[b].view(-1) if self.all_layers else samples[b] for b in range(depth)]
        self._layout(tuple(sizes))

    @staticmethod
    def fits(sizes):
        "Whether the grid of outputs of these sizes is small enough to be chosen automatically."
        return sum(-(-n // _WIDTH) for n in sizes) * _WIDTH <= _GRID_VALUES

    def _layout(self, sizes):
        """The grid for outputs of `sizes`: its buffer, row and per-batch views, zero padding, blanks for missing
        layers, the (rows, layers) 0/1 matrix that adds up each layer's rows, and the sample positions."""
        if sizes in self._layouts: return self._layouts[sizes]
        dev, k = self.device, self.stats._k
        n_rows = [-(-n // _WIDTH) for n in sizes]
        starts = [0]
        for r in n_rows: starts.append(starts[-1] + r)
        rows = starts[-1]
        zeros = torch.zeros(max(sizes), device=dev)
        pads = [zeros[:r * _WIDTH - n] if n < r * _WIDTH else None for n, r in zip(sizes, n_rows)]
        blanks = [zeros[:n] for n in sizes]
        buffer = torch.empty(rows * _WIDTH + 1, device=dev)  # the grid, then one NaN for unused sample slots
        nan = torch.full((1,), float('nan'), device=dev)
        owner = torch.zeros(rows, len(sizes), device=dev)
        positions = torch.full((self.pool_size, len(sizes), k), rows * _WIDTH, dtype=torch.long, device=dev)
        for j, n in enumerate(sizes):
            owner[starts[j]:starts[j + 1], j] = 1.
            pool, offset = self.stats._positions(n), starts[j] * _WIDTH
            if pool is None: positions[:, j, :n] = torch.arange(n, device=dev) + offset
            else: positions[:, j] = pool + offset
        grid = buffer[:-1].view(rows, _WIDTH)
        row_sums = torch.empty(2, rows, device=dev)  # per row: sum(x), sum(x^2)
        ops = (grid.unsqueeze(1), grid.unsqueeze(2), torch.ones(_WIDTH, device=dev), row_sums[0],
               row_sums[1].view(rows, 1, 1), row_sums, owner)
        layout = (buffer, grid, ops, pads, blanks, nan, positions.view(len(positions), -1).unbind(0))
        self._layouts[sizes] = layout
        return layout

    def read(self, b, pending, pick):
        """Batch b: read the pending outputs of the grid's layers; returns the layers found changed in place
        since their hook (recorded as missing for this batch)."""
        stats, flats, changed = self.stats, [], []
        for j, i in enumerate(self.layers):
            out = pending[i]
            if out is not None and out[0]._version != out[1]:
                changed.append(i)
                out = None
            flat = stats._flat_of(i, out[0]) if out is not None else None
            flats.append(flat)  # None: did not run, or changed: blank in the grid, marked missing by after_batch
            if flat is not None:
                self.sizes[j] = flat.numel()
                stats._fired[i] = True
        sizes = tuple(self.sizes)
        buffer, grid, (as_rows, as_columns, ones, totals, squares, row_sums, owner), pads, blanks, nan, positions = \
            self._layout(sizes)
        parts = []
        for flat, blank, pad in zip(flats, blanks, pads):
            parts.append(flat if flat is not None else blank)
            if pad is not None: parts.append(pad)
        parts.append(nan)
        torch.cat(parts, out=buffer)
        torch.mv(grid, ones, out=totals)
        torch.bmm(as_rows, as_columns, out=squares)  # each row with itself
        torch.mm(row_sums, owner, out=self.sum_rows[b])  # each layer's rows added up
        if self.all_layers: torch.index_select(buffer, 0, positions[pick], out=self.sample_rows[b])
        else:
            picked = torch.index_select(buffer, 0, positions[pick]).view(len(sizes), -1)
            self.sample_rows[b].index_copy_(0, self.index, picked)
        return changed

    def finish(self, sums_columns, start, end):
        """Put the sums of the staged batches [start, end) into the records' (batches, layers, 2) sum and
        sum-of-squares columns."""
        sums = self.sums[start:end].transpose(1, 2)  # (batches, batched layers, 2)
        if self.all_layers: sums_columns.copy_(sums)
        else: sums_columns[:, self.index] = sums


def warn_changed_in_place(name, batch):
    warnings.warn(f"ActivationStats: the output of {name} was changed in place after its forward in training batch "
                  f"{batch} (an in-place op later in the model: ReLU(inplace=True), `+=`); that batch's statistics "
                  "for it are recorded as missing, and from now on it is read as it is produced", RuntimeWarning,
                  stacklevel=2)
