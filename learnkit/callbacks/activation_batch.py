"""ActivationStats' batched reads: every hooked layer's output read together after the forward pass.

On a GPU, a small CNN's training step is bound by kernel launches, not arithmetic, so what a statistic costs
is the number of ops it launches. Read one layer at a time, in its hook, ActivationStats launches one op per
layer (the sample; four with exact sums). Read together at `after_pred`, the layers cost a view each and two
kernels in all: one `cat` of every output into one buffer and one `index_select` of every layer's sample, with
the same positions the per-layer path would use. With exact sums the buffer is a grid of rows of 1024 values,
each output padded to whole rows with its layer's reference value, and four more kernels give every layer's
sums: a `sub_` of each row's reference (the padding becomes exactly 0), an `mv` of the grid with ones and a
`bmm` of each row with itself (row sums of x and x^2), and an `mm` that adds up each layer's rows.

Two things make the per-layer path the right one elsewhere. On the CPU the hook reads each output while it is
still in cache, and the buffer would be read from memory: the batched reads are slower there. And an output
changed in place after its hook (ReLU(inplace=True), `out += identity` in a ResNet block) no longer holds what
the layer produced. So the first recorded batch is read per layer, and the tensors' version counters say which
outputs were changed later in the forward pass; only the others are batched, and a batched output found changed
in a later batch is reported, recorded as missing for that batch, and read per layer from then on.
"""
import warnings
from typing import NamedTuple

import torch

_WIDTH = 1024  # values per grid row (exact sums): each output wastes less than one row on padding
_GRID_VALUES = 2 ** 24  # the buffer, when chosen automatically: at most 64 MB of float32


class _GridSums(NamedTuple):
    "exact sums: the grid of a layout and what sums its rows per layer, each made once."
    grid: torch.Tensor  # (rows, 1024) view of the buffer
    row_layer: torch.Tensor  # per row, the layer it belongs to
    row_shift: torch.Tensor  # (rows, 1): per row, its layer's reference value
    as_rows: torch.Tensor  # the grid as (rows, 1, 1024), and as (rows, 1024, 1): bmm of the two squares each row
    as_columns: torch.Tensor
    ones: torch.Tensor
    row_sums: torch.Tensor  # (2, rows): per row, sum(x) and sum(x^2)
    totals: torch.Tensor  # row_sums[0], mv's output
    squares: torch.Tensor  # row_sums[1] as (rows, 1, 1), bmm's output
    owner: torch.Tensor  # (rows, layers) 0/1: mm with it adds up each layer's rows


class _Layout(NamedTuple):
    "Where outputs of given sizes go in the buffer, and where their samples are."
    buffer: torch.Tensor  # the outputs one after the other (padded with exact sums), then one NaN
    blanks: list  # per layer, zeros to stand in for an output that is missing this batch
    pads: list  # per layer, the padding that follows its output (None: none)
    nan: torch.Tensor
    positions: list  # per set of sample positions, every layer's positions in the buffer
    sums: _GridSums | None


class BatchedReads:
    """The layers read together (`layers`, in buffer order, with their output `sizes`), their layouts and sample
    positions, and with exact sums the sums of each staged batch. `samples` is ActivationStats' (depth, layers, k)
    staging buffer; `positions(n)` its (pool, k) sample positions for outputs of n elements (None: read whole);
    `reference`, with exact sums, its (layers,) per-layer reference values (None: no sums)."""
    def __init__(self, layers, sizes, samples, positions, device, pool_size, reference=None):
        self.layers, self.sizes = layers, list(sizes)  # each layer's latest output size (a missing one keeps its place)
        self.positions, self.device, self.pool_size, self.reference = positions, device, pool_size, reference
        self._layouts = {}
        depth, n_layers, self.sample_len = samples.shape
        self.all_layers = layers == list(range(n_layers))
        # Buffer layer j is layer layers[j]: an index tensor built with fill_ (a host list copied to a GPU would
        # sync it).
        self.index = torch.empty(len(layers), dtype=torch.long, device=device)
        for j, i in enumerate(layers): self.index[j].fill_(i)
        # Every per-batch destination is a view made once: a view is an op too.
        self.sample_rows = [samples[b].view(-1) if self.all_layers else samples[b] for b in range(depth)]
        if reference is not None:
            self.sums = torch.zeros(depth, 2, len(layers), device=device)  # per staged batch: sum(x), sum(x^2)
            self.sum_rows = list(self.sums.unbind(0))
        self._layout(tuple(sizes))

    @staticmethod
    def fits(sizes):
        "Whether the buffer for outputs of these sizes is small enough to be chosen automatically."
        return sum(-(-n // _WIDTH) for n in sizes) * _WIDTH <= _GRID_VALUES

    def _layout(self, sizes):
        "The layout for outputs of `sizes`, made on first use."
        if sizes in self._layouts: return self._layouts[sizes]
        dev, exact = self.device, self.reference is not None
        room = [-(-n // _WIDTH) * _WIDTH if exact else n for n in sizes]  # padded to whole grid rows
        starts = [0]
        for r in room: starts.append(starts[-1] + r)
        total = starts[-1]
        zeros = torch.zeros(max(sizes), device=dev)
        blanks = [zeros[:n] for n in sizes]
        # The padding of an output is its layer's reference value (a view of it, so it follows the reference when
        # that moves): after the shift it is exactly 0 and adds nothing to the sums.
        pads = [self.reference[i:i + 1].expand(r - n) if r > n else None
                for i, n, r in zip(self.layers, sizes, room)]
        buffer = torch.empty(total + 1, device=dev)
        positions = torch.full((self.pool_size, len(sizes), self.sample_len), total, dtype=torch.long, device=dev)
        for j, n in enumerate(sizes):
            pool = self.positions(n)
            if pool is None: positions[:, j, :n] = torch.arange(n, device=dev) + starts[j]
            else: positions[:, j] = pool + starts[j]
        sums = self._grid_sums(buffer, starts) if exact else None
        layout = _Layout(buffer, blanks, pads, torch.full((1,), float('nan'), device=dev),
                         positions.view(self.pool_size, -1).unbind(0), sums)
        self._layouts[sizes] = layout
        return layout

    def _grid_sums(self, buffer, starts):
        dev, rows = self.device, starts[-1] // _WIDTH
        grid = buffer[:-1].view(rows, _WIDTH)
        owner = torch.zeros(rows, len(self.layers), device=dev)
        row_layer = torch.empty(rows, dtype=torch.long, device=dev)
        for j, i in enumerate(self.layers):
            first, end = starts[j] // _WIDTH, starts[j + 1] // _WIDTH
            owner[first:end, j] = 1.
            row_layer[first:end].fill_(i)
        row_sums = torch.empty(2, rows, device=dev)
        sums = _GridSums(grid, row_layer, torch.empty(rows, 1, device=dev), grid.unsqueeze(1), grid.unsqueeze(2),
                         torch.ones(_WIDTH, device=dev), row_sums, row_sums[0], row_sums[1].view(rows, 1, 1), owner)
        self._shift_rows(sums)
        return sums

    def _shift_rows(self, sums):
        torch.index_select(self.reference, 0, sums.row_layer, out=sums.row_shift.view(-1))

    def move_shifts(self):
        "ActivationStats moved the references: every layout's rows follow (called once per staged round)."
        for layout in self._layouts.values(): self._shift_rows(layout.sums)

    def read(self, b, held, position_set, flat_of):
        """Staged batch b: read the held outputs `(tensor, version at its hook)` of the batched layers, with sample
        positions set `position_set`; `flat_of(i, x)` flattens layer i's output. Returns the layers found changed in
        place since their hook (recorded as missing for this batch) and the layers read."""
        flats, changed = [], []
        for j, i in enumerate(self.layers):
            out = held[i]
            if out is not None and out[0]._version != out[1]:
                changed.append(i)
                out = None
            flat = flat_of(i, out[0]) if out is not None else None
            flats.append(flat)  # None: did not run, or changed: blank in the buffer, marked missing by after_batch
            if flat is not None: self.sizes[j] = flat.numel()
        layout = self._layout(tuple(self.sizes))
        parts = []
        for flat, blank, pad in zip(flats, layout.blanks, layout.pads):
            parts.append(flat if flat is not None else blank)
            if pad is not None: parts.append(pad)
        parts.append(layout.nan)
        torch.cat(parts, out=layout.buffer)
        positions = layout.positions[position_set]
        if self.all_layers: torch.index_select(layout.buffer, 0, positions, out=self.sample_rows[b])
        else:
            picked = torch.index_select(layout.buffer, 0, positions).view(len(self.layers), -1)
            self.sample_rows[b].index_copy_(0, self.index, picked)
        if layout.sums is not None: self._sum(layout.sums, b)
        return changed, [i for i, flat in zip(self.layers, flats) if flat is not None]

    def _sum(self, sums, b):
        "Each layer's sums of its values minus its reference, and of their squares, into staged batch b."
        sums.grid.sub_(sums.row_shift)
        torch.mv(sums.grid, sums.ones, out=sums.totals)
        torch.bmm(sums.as_rows, sums.as_columns, out=sums.squares)  # each row with itself
        torch.mm(sums.row_sums, sums.owner, out=self.sum_rows[b])  # each layer's rows added up

    def finish(self, sums_columns, start, end):
        """Put the sums of the staged batches [start, end) into `sums_columns`, the (batches, layers, 2) sums and
        sums of squares of every layer."""
        sums = self.sums[start:end].transpose(1, 2)  # (batches, batched layers, 2)
        if self.all_layers: sums_columns.copy_(sums)
        else: sums_columns[:, self.index] = sums


def warn_changed_in_place(name, batch):
    warnings.warn(f"ActivationStats: the output of {name} was changed in place after its forward in training batch "
                  f"{batch} (an in-place op later in the model: ReLU(inplace=True), `+=`); that batch's statistics "
                  "for it are recorded as missing, and from now on it is read as it is produced", RuntimeWarning,
                  stacklevel=2)
