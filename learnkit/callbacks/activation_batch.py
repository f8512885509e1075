"""ActivationStats' batched reads: every hooked layer's output read together after the forward pass.

On a GPU, a small CNN's training step is bound by kernel launches, not arithmetic, so what a statistic costs
is the number of ops it launches. Read one layer at a time, in its hook, ActivationStats launches four per
layer (a view, two dots, the sample). Read together at `after_pred`, the layers cost a view each and four
kernels in all: one `cat` of every output into a (layers, longest) grid padded with zeros, an `mv` of the grid
with ones and a `bmm` of its rows with themselves (the exact sums of x and x^2: padding adds nothing), and one
`index_select` of every layer's sample, with the same positions the per-layer path would use.

Two things make the per-layer path the right one elsewhere. On the CPU the hook reads each output while it is
still in cache, and the padded grid would be read from memory: the batched reads are slower there. And an
output changed in place after its hook (ReLU(inplace=True), `out += identity` in a ResNet block) no longer holds
what the layer produced. So the first recorded batch is read per layer, and the tensors' version counters say
which outputs were changed later in the forward pass; only the others are batched, and a batched output found
changed in a later batch is reported, recorded as missing for that batch, and read per layer from then on.
"""
import warnings

import torch

_GRID_VALUES = 2 ** 24  # the padded grid, when chosen automatically: at most 64 MB of float32


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
        self.sums = torch.zeros(depth, 2, len(layers), device=device)  # per staged batch: sum(x), sum(x^2) per row
        # Every per-batch destination is a view made once here: a view is an op too.
        self.sum_views = [(self.sums[b, 0], self.sums[b, 1].view(-1, 1, 1)) for b in range(depth)]
        self.sample_rows = [samples[b].view(-1) if self.all_layers else samples[b] for b in range(depth)]
        self._layout(tuple(sizes))

    @staticmethod
    def fits(sizes):
        "Whether the padded grid of outputs of these sizes is small enough to be chosen automatically."
        return len(sizes) * max(sizes) <= _GRID_VALUES

    def _layout(self, sizes):
        "The grid for outputs of `sizes`: its buffer, zero padding, blanks for missing layers, sample positions."
        if sizes in self._layouts: return self._layouts[sizes]
        dev, k, width = self.device, self.stats._k, max(sizes)
        rows = len(sizes)
        zeros = torch.zeros(width, device=dev)
        pads = [zeros[:width - n] if n < width else None for n in sizes]
        blanks = [zeros[:n] for n in sizes]
        buffer = torch.empty(rows * width + 1, device=dev)  # the grid, then one NaN for unused sample slots
        nan = torch.full((1,), float('nan'), device=dev)
        positions = torch.full((self.pool_size, rows, k), rows * width, dtype=torch.long, device=dev)
        for j, n in enumerate(sizes):
            pool = self.stats._positions(n)
            if pool is None: positions[:, j, :n] = torch.arange(n, device=dev) + j * width
            else: positions[:, j] = pool + j * width
        grid = buffer[:-1].view(rows, width)
        layout = (buffer, grid, (grid.unsqueeze(1), grid.unsqueeze(2), torch.ones(width, device=dev)), pads, blanks,
                  nan, positions.view(len(positions), -1).unbind(0))
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
        buffer, grid, (rows, columns, ones), pads, blanks, nan, positions = self._layout(sizes)
        parts = []
        for flat, blank, pad in zip(flats, blanks, pads):
            parts.append(flat if flat is not None else blank)
            if pad is not None: parts.append(pad)
        parts.append(nan)
        torch.cat(parts, out=buffer)
        total, squares = self.sum_views[b]
        torch.mv(grid, ones, out=total)
        torch.bmm(rows, columns, out=squares)  # each row with itself
        if self.all_layers: torch.index_select(buffer, 0, positions[pick], out=self.sample_rows[b])
        else: self.sample_rows[b].index_copy_(0, self.index, torch.index_select(buffer, 0, positions[pick]).view(len(sizes), -1))
        return changed

    def finish(self, rows, start, end):
        "Put the grid's sums of the staged batches [start, end) into their record rows."
        sums = self.sums[start:end].transpose(1, 2)  # (batches, grid rows, 2)
        if self.all_layers: rows[..., 0:2].copy_(sums)
        else: rows[:, self.index, 0:2] = sums


def warn_changed_in_place(name, batch):
    warnings.warn(f"ActivationStats: the output of {name} was changed in place after its forward in training batch "
                  f"{batch} (an in-place op later in the model: ReLU(inplace=True), `+=`); that batch's statistics "
                  "for it are recorded as missing, and from now on it is read as it is produced", RuntimeWarning,
                  stacklevel=2)
