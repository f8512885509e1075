"""WeightStats: whether each layer trains at all, and whether its units are all alike; never read per batch.

The health report reads it to tell apart three layers that all "do not learn": one no gradient reaches
(vanishing), one that gets a gradient but never changes (frozen with `requires_grad=False`, or missing from the
optimizer, whose gradient is then never zeroed and piles up), and one whose units are identical copies of each
other (a constant or zero initialisation that no gradient can break).
"""
import torch

from ..records import TensorLog
from .hooks import default_modules, module_names
from .stats import StatsCallback

__all__ = ['WeightStats']


class WeightStats(StatsCallback):
    """At the start of fit and at the end of every epoch's training (never per batch) records, per layer with
    parameters (or per module of `modules`):
    - `param_sum` and `param_sq`: per parameter, its sum and sum of squares, a fingerprint: a layer none of whose
      parameters' fingerprints ever changes did not train (`changed`: per snapshot and layer, whether it differs
      from the first);
    - `spread`: how far its units' weight rows differ, max |w_i - w_0| / max |w|, 0 when every unit (output row
      of a Linear, output channel of a conv) has the same weights and so computes the same function;
    - `orphan_grad`: the gradient norm of its parameters that need a gradient but are in no optimizer parameter
      group: `zero_grad` never clears them, so it grows batch after batch.
    And once per fit, per layer: `trainable` (share of its parameters with requires_grad) and `in_optimizer`
    (share of those in the optimizer).

    Cost: a handful of ops per layer per epoch; no copy of the weights is kept.
    """
    order = 85
    record_schema = {'param_sum': 'per snapshot and parameter, its sum',
                     'param_sq': 'per snapshot and parameter, its sum of squares',
                     'spread': 'per snapshot and layer, max |w_i - w_0| / max |w| over its units (NaN: no rows)',
                     'orphan_grad': 'per snapshot and layer, norm of .grad of its parameters in no optimizer group'}

    def __init__(self, modules=None):
        self.modules = modules
        self.layer_names, self.iters, self.trainable, self.in_optimizer, self._owner = [], [], [], [], []
        self._log = TensorLog()

    def before_fit(self):
        model = self.learn.model
        layers = list(self.modules) if self.modules is not None else default_modules(model)
        self.layer_names, self._layers = module_names(model, layers), layers
        self._params = [list(m.parameters(recurse=self.modules is not None)) for m in layers]
        opt = self.learn.opt
        optimised = {id(p) for g in opt.param_groups for p in g['params']} if opt is not None else set()
        self.trainable, self.in_optimizer, self._orphans = [], [], []
        for params in self._params:
            needs = [p for p in params if p.requires_grad]
            self.trainable.append(len(needs) / max(len(params), 1))
            self.in_optimizer.append(sum(id(p) in optimised for p in needs) / max(len(needs), 1) if needs else 1.)
            self._orphans.append([p for p in needs if id(p) not in optimised])
        self._all_params = [p for params in self._params for p in params]
        self._owner = [i for i, params in enumerate(self._params) for _ in params]
        self._log, self.iters = TensorLog(), []
        self._snapshot()

    def after_train(self): self._snapshot()

    def after_fit(self):
        # A fit cancelled mid-epoch (HealthMonitor(stop_on=...), a CancelFitException) still gets its last snapshot.
        if self.iters and self.iters[-1] != self.learn.train_iter: self._snapshot()

    @torch.no_grad()
    def _snapshot(self):
        dev = self.learn.device
        flat = [p.detach().float() for p in self._all_params]
        fingerprints = torch.stack([torch.stack([p.sum() for p in flat]).to(dev),
                                    torch.stack(torch._foreach_norm(flat)).square().to(dev)], 1)
        layers = []
        for params, orphans in zip(self._params, self._orphans):
            grads = [p.grad.float() for p in orphans if p.grad is not None]
            orphan = torch.stack(torch._foreach_norm(grads)).square().sum().sqrt().to(dev) if grads else \
                torch.zeros((), device=dev)
            layers.append(torch.stack([_spread(params[0] if params else None, dev), orphan]))
        self._log.append(torch.cat([fingerprints.flatten(), torch.stack(layers).flatten()]), copy=False)
        self.iters.append(self.learn.train_iter)

    # ---- the protocol ------------------------------------------------------------------------------------------
    def device_records(self):
        return {'rows': self._log.values()} if len(self._log) else {}

    def summarize(self, raw):
        n_params, n_layers = len(self._owner), len(self.layer_names)
        rows = raw.get('rows', torch.empty(0, 2 * n_params + 2 * n_layers))
        fingerprints = rows[:, :2 * n_params].view(len(rows), n_params, 2)
        layers = rows[:, 2 * n_params:].view(len(rows), n_layers, 2)
        # A layer changed since the first snapshot when any of its parameters' sums or sums of squares did.
        moved = (fingerprints != fingerprints[:1]).any(2).float()
        owner = torch.zeros(n_layers, n_params).index_put_((torch.tensor(self._owner, dtype=torch.long),
                                                            torch.arange(n_params)), torch.tensor(1.))
        out = {'changed': (moved @ owner.t()) > 0, 'param_sum': fingerprints[..., 0], 'param_sq': fingerprints[..., 1],
               'spread': layers[..., 0], 'orphan_grad': layers[..., 1]}
        out.update(iters=torch.tensor(self.iters[:len(rows)], dtype=torch.long), layer_names=list(self.layer_names),
                   trainable=torch.tensor(self.trainable), in_optimizer=torch.tensor(self.in_optimizer))
        return out

    # The weights are the same on every rank under DDP (it averages the gradients), so there is nothing to combine.

    def state_dict(self):
        return {'records': self._log.state_dict()['values'], 'iters': list(self.iters),
                'layer_names': list(self.layer_names), 'trainable': list(self.trainable),
                'in_optimizer': list(self.in_optimizer), 'owner': list(self._owner)}

    def load_state_dict(self, state):
        device = self.learn.device if self.learn is not None else None
        self._log.load_state_dict({'values': state['records']}, device)
        self.iters, self.layer_names = list(state['iters']), list(state['layer_names'])
        self.trainable, self.in_optimizer = list(state['trainable']), list(state['in_optimizer'])
        self._owner = list(state['owner'])


def _spread(w, dev):
    "max |w_i - w_0| / max |w| over the rows of a weight of 2+ dims and 2+ rows (a Linear's or conv's), else NaN."
    if w is None or w.ndim < 2 or w.shape[0] < 2: return torch.full((), float('nan'), device=dev)
    rows = w.detach().float().reshape(w.shape[0], -1)
    return ((rows - rows[:1]).abs().amax() / rows.abs().amax().clamp(min=1e-30)).to(dev)
