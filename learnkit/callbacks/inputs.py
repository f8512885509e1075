"""InputStats: what the model is fed, batch by batch, recorded on the device.

The health report reads it to name inputs that were never normalised (pixels 0..255), inputs that are constant or
almost all zero (a preprocessing bug), and NaN or Inf in the data, before it blames the network for what follows.
"""
import torch

from ..records import TensorLog
from .collectives import all_reduce_max, all_reduce_mean
from .stats import StatsCallback

__all__ = ['InputStats']

_STAGE = 16  # batches whose samples are staged, then summarised together


class InputStats(StatsCallback):
    """Records, for every training batch (or every `every`-th), the min and max of the whole input batch and the
    mean, std and share of exact zeros of a sample of `sample` of its values.

    Per batch it launches two ops, whatever the batch size: an `aminmax` of the batch (NaN or Inf anywhere in it
    shows in the min or max) and an `index_select` of the sample, both written into staging buffers. Every 16
    batches (and when the records are read) the staged samples are summarised together. Nothing is read back to
    the host until the report or `stats` asks.

    The sample is drawn uniformly with replacement from the whole batch (positions drawn once per batch shape
    from a private generator, so training randomness is untouched); its mean and std have standard errors of
    about std/sqrt(sample) and std/sqrt(2 sample), 3% and 2% of the std at the default 1024, far finer than what
    the checks ask (a mean or std off by a factor of several). Only the first input of a batch is read, and only
    when it is a floating-point tensor (token ids and other integer inputs are not recorded: `kind` says why).
    In graph mode (`fit(..., graph=True)`) the same two ops run inside the captured step and write at a device-side
    row; the epoch's rows are summarised at its end (with `every`, the device reads every batch and the epoch end
    keeps the recorded ones: a replayed graph runs all its ops).
    """
    order = -15
    record_schema = {'mean': "mean of the batch's sampled input values", 'std': 'their standard deviation',
                     'min': "the batch's smallest input value (NaN if the batch holds a NaN)",
                     'max': "the batch's largest input value (NaN if the batch holds a NaN)",
                     'zeros': 'share of the sampled values that are exactly 0'}

    def __init__(self, every=None, sample=1024):
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"InputStats(every={every!r}): every must be a positive int (record every N-th "
                             "training batch) or None (every batch)")
        if not isinstance(sample, int) or isinstance(sample, bool) or sample < 2:
            raise ValueError(f"InputStats(sample={sample!r}): sample is a number of values, an int >= 2")
        self.every, self.sample = every, sample
        self._log, self.iters, self.kind = TensorLog(), [], None
        self._samples = None

    def before_fit(self):
        dev = self.learn.device
        self._log, self.iters, self.kind, self._active = TensorLog(), [], None, False
        self._samples = torch.empty(_STAGE, self.sample, device=dev)
        self._minmax = torch.empty(_STAGE, 2, device=dev)
        self._sample_rows = list(self._samples.unbind(0))  # views made once: a view is an op too
        self._minmax_rows = [(row[0], row[1]) for row in self._minmax.unbind(0)]
        self._positions, self._staged = {}, 0
        self._gen = torch.Generator(device=dev).manual_seed(0)

    def before_batch(self):
        learn = self.learn
        self._active = learn.training and (self.every is None or learn.train_iter % self.every == 0)
        if not self._active: return
        x = learn.xb[0] if learn.xb else None
        if not self._is_recorded(x): return
        flat = self._flat_input(x)
        b = self._staged
        torch.aminmax(flat, out=self._minmax_rows[b])
        torch.index_select(flat, 0, self._positions_for(flat.numel()), out=self._sample_rows[b])
        self.iters.append(learn.train_iter)
        self._staged += 1
        if self._staged == _STAGE: self.flush()

    def _is_recorded(self, x):
        "Whether input `x` is recorded (a floating-point tensor); if not, `kind` says why."
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            self.kind = self.kind or (f"the input is {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}, "
                                      "not a floating-point tensor")
            return False
        self.kind = 'float'
        return True

    def _flat_input(self, x):
        if x.requires_grad: x = x.detach()  # (out= refuses a tensor in the graph; inputs rarely are)
        flat = x.view(-1) if x.is_contiguous() else x.reshape(-1)
        return flat if flat.dtype is torch.float32 else flat.float()

    # ---- graph mode (learnkit.graph_mode): the step writes at the device-side row `graph.batch` ---------------
    graph_safe = True

    def graph_setup(self, graph):
        "Graph mode: one staging row per training step of the epoch, made at the first batch (sized by it)."
        self._graph, self._graph_samples, self._graph_minmax = graph, None, None

    def graph_before_forward(self, graph):
        "Inside the step: the batch's min and max and its sample, at row `graph.batch`."
        if not self._is_recorded(graph.xb): return
        flat, row = self._flat_input(graph.xb), graph.batch.view(1)
        if self._graph_samples is None:
            self._graph_samples = torch.empty(graph.n_iter, self.sample, device=graph.device)
            self._graph_minmax = torch.empty(graph.n_iter, 2, device=graph.device)
        self._graph_minmax.index_copy_(0, row, torch.stack(torch.aminmax(flat)).view(1, 2))
        self._graph_samples.index_copy_(0, row, flat.index_select(0, self._positions_for(flat.numel())).view(1, -1))

    def graph_epoch_end(self, graph, start, stop):
        "Host, at the epoch's end: the recorded steps' rows summarised into the records, 16 at a time."
        if self._graph_samples is None: return  # an input that is not recorded (`kind` says why)
        every = self.every or 1
        first = (-start) % every
        rows = slice(first, stop - start, every)
        samples, minmax = self._graph_samples[rows], self._graph_minmax[rows]
        for c in range(0, len(samples), _STAGE):
            self._staged = len(samples[c:c + _STAGE])
            self._samples[:self._staged].copy_(samples[c:c + _STAGE])
            self._minmax[:self._staged].copy_(minmax[c:c + _STAGE])
            self.flush()
        self.iters.extend(range(start + first, stop, every))

    def _positions_for(self, n):
        positions = self._positions.get(n)
        if positions is None:
            positions = self._positions[n] = torch.randint(n, (self.sample,), device=self._samples.device,
                                                           generator=self._gen)
        return positions

    def flush(self):
        "Summarise the staged batches into the records (a few ops for all of them)."
        k = self._staged
        if not k: return
        s = self._samples[:k].double()
        std, mean = torch.std_mean(s, dim=1)
        zeros = (s == 0).double().mean(1)
        mm = self._minmax[:k].double()
        self._log.extend(torch.stack([mean, std, mm[:, 0], mm[:, 1], zeros], 1).float())
        self._staged = 0

    def after_fit(self): self.flush()

    def cleanup_fit(self):
        self._active, self._graph, self._graph_samples, self._graph_minmax = False, None, None, None
        self._staged = 0  # a failed fit drops its last staged batches with the rest of the fit

    # ---- the protocol ------------------------------------------------------------------------------------------
    def device_records(self):
        if self._samples is not None: self.flush()
        return {'rows': self._log.values()} if len(self._log) else {}

    def summarize(self, raw):
        rows = raw.get('rows', torch.empty(0, len(self.record_schema)))
        out = {name: rows[:, i] for i, name in enumerate(self.record_schema)}
        out['iters'] = torch.tensor(self.iters[:len(rows)], dtype=torch.long)
        return out

    def records_mark(self):
        if self._samples is not None: self.flush()
        return len(self._log)

    def combine_ranks(self, since):
        "The global batch's values: means and zero shares averaged (equal shards), min of mins, max of maxes."
        self.flush()
        rows = self._log.values()[since:]
        if not len(rows): return
        mean = all_reduce_mean(rows)
        mean[:, 2] = -all_reduce_max(-rows[:, 2])
        mean[:, 3] = all_reduce_max(rows[:, 3])
        rows.copy_(mean)

    def state_dict(self):
        if self._samples is not None: self.flush()
        return {'records': self._log.state_dict()['values'], 'iters': list(self.iters), 'kind': self.kind}

    def load_state_dict(self, state):
        device = self.learn.device if self.learn is not None else None
        self._log.load_state_dict({'values': state['records']}, device)
        self.iters, self.kind = list(state['iters']), state['kind']
