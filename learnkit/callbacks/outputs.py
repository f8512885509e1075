"""OutputStats: what a classifier outputs and what it is asked to predict, recorded on the device.

The health report reads it to name outputs that are already probabilities (a softmax before a loss that applies
its own), predictions that collapsed onto one class, a validation accuracy no better than chance or than always
answering the majority class, and a training set dominated by one class.
"""
import torch
from torch import nn

from ..records import TensorLog
from .collectives import all_reduce_sum
from .stats import StatsCallback

__all__ = ['OutputStats', 'loss_expects']


def _probe_row(pred):
    "min output, max |row sum - 1|, max |logsumexp(row)| of a batch of outputs (see OutputStats)."
    p = pred.float()
    return torch.stack([p.min(), (p.sum(1) - 1).abs().max(), p.logsumexp(1).abs().max()])


def loss_expects(loss_func):
    """What a classification loss expects of the model's outputs: 'logits' (cross-entropy, BCE with logits),
    'log_probs' (NLL), or None when learnkit does not know the loss."""
    name = getattr(loss_func, '__name__', '')
    if isinstance(loss_func, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)) or name in (
            'cross_entropy', 'binary_cross_entropy_with_logits'):
        return 'logits'
    if isinstance(loss_func, nn.NLLLoss) or name == 'nll_loss': return 'log_probs'
    return None


class OutputStats(StatsCallback):
    """For a classifier (outputs of shape (batch, classes), integer targets), records:
    - on the first `probe_batches` training batches of every epoch: the smallest output, the largest distance of an
      output row's sum from 1, and the largest |logsumexp| of a row (0 for log-probabilities). Outputs that are
      non-negative rows summing to 1 are probabilities; rows whose logsumexp is 0 are log-probabilities;
    - per epoch: the count of each class among the training labels, and over the validation set the count of each
      predicted class (argmax), of each target class, and of correct predictions.

    Cost: on a training batch one `index_add_` (the label counts); on a probe batch six small ops more; on a
    validation batch five ops on the (batch, classes) outputs. Nothing is read back until asked. Anything else
    (regression, multi-label, sequence outputs) is not recorded, and `kind` says why. In graph mode (`fit(...,
    graph=True)`) the label counts and the probes run inside the captured step, the probes written at a row chosen
    on the device (every batch is probed there, the later ones into a scratch row: a replayed graph runs all its ops).
    """
    order = 55
    record_schema = {'train_labels': 'per epoch, count of each class among the training labels',
                     'predicted': 'per epoch, count of each class among the validation predictions (argmax)',
                     'targets': 'per epoch, count of each class among the validation targets',
                     'correct': 'per epoch, validation predictions equal to their target',
                     'probe': 'per probe batch: min output, max |row sum - 1|, max |logsumexp(row)|'}

    def __init__(self, probe_batches=2):
        if not isinstance(probe_batches, int) or isinstance(probe_batches, bool) or probe_batches < 0:
            raise ValueError(f"OutputStats(probe_batches={probe_batches!r}): a number of batches per epoch, an int >= 0")
        self.probe_batches = probe_batches
        self.kind, self.n_classes, self.iters, self.probe_iters = None, None, [], []
        self._epochs, self._probes, self._counts = TensorLog(), TensorLog(), None
        self.expects, self._in_fit, self._epoch_open = None, False, False

    def before_fit(self):
        self.kind, self.n_classes, self.iters, self.probe_iters = None, None, [], []
        self._epochs, self._probes, self._counts = TensorLog(), TensorLog(), None
        self.expects, self._in_fit, self._epoch_open = loss_expects(self.learn.loss_func), True, False

    def after_fit(self):
        if self._epoch_open: self.after_epoch()  # a fit cancelled mid-epoch keeps what it counted
        self._in_fit = False
    def cleanup_fit(self): self._in_fit, self._graph = False, None

    def before_epoch(self):
        if self._counts is not None: self._counts.zero_()
        self._probed, self._epoch_open = 0, True

    def _classifier_batch(self, pred, targ):
        "(pred, target) when this batch is a classifier's, else None (and `kind` says why)."
        if not (isinstance(pred, torch.Tensor) and pred.ndim == 2 and pred.shape[1] >= 2 and pred.is_floating_point()
                and isinstance(targ, torch.Tensor) and targ.ndim == 1 and not targ.is_floating_point()
                and len(targ) == len(pred)):
            if self.kind is None:
                self.kind = (f"outputs {tuple(getattr(pred, 'shape', ()))} and targets "
                             f"{tuple(getattr(targ, 'shape', ()))} are not a classifier's (batch, classes) scores "
                             "and integer labels")
            return None
        if self.n_classes is None:
            self.kind, self.n_classes = 'classifier', pred.shape[1]
            # Rows per epoch: training label counts, predicted counts, target counts, and [correct, 0, ...].
            self._counts = torch.zeros(4, self.n_classes, device=pred.device)
            self._train_labels, self._ones, self._ones_views = self._counts[0], torch.ones(0, device=pred.device), {}
        elif pred.shape[1] != self.n_classes: return None
        if len(self._ones) < len(targ): self._ones, self._ones_views = torch.ones(len(targ), device=pred.device), {}
        return pred.detach(), targ

    def _ones_for(self, n):
        "n ones, a view made once per batch size (a view is an op too)."
        ones = self._ones_views.get(n)
        if ones is None: ones = self._ones_views[n] = self._ones[:n]
        return ones

    def after_loss(self):
        if not self._in_fit: return  # validate() and get_preds() outside fit are not this run's epochs
        learn = self.learn
        if learn.training and self._probed >= self.probe_batches and self.n_classes is not None:
            # The common training batch, once the classifier is known: one index_add_ of its labels.
            targ = learn.yb[0] if learn.yb else None
            if (type(targ) is torch.Tensor and targ.ndim == 1 and not targ.is_floating_point()
                    and len(targ) <= len(self._ones)):
                self._train_labels.index_add_(0, targ, self._ones_for(len(targ)))
                return
        batch = self._classifier_batch(learn.pred, learn.yb[0] if learn.yb else None)
        if batch is None: return
        pred, targ = batch
        ones = self._ones_for(len(targ))
        counts = self._counts
        if self.learn.training:
            self._train_labels.index_add_(0, targ, ones)
            if self._probed < self.probe_batches: self._probe(pred)
        else:
            guess = pred.argmax(1)
            counts[1].index_add_(0, guess, ones)
            counts[2].index_add_(0, targ, ones)
            counts[3, :1] += (guess == targ).sum()

    def _probe(self, pred):
        self._probes.append(_probe_row(pred), copy=False)
        self.probe_iters.append(self.learn.train_iter)
        self._probed += 1

    # ---- graph mode (learnkit.graph_mode): label counts and probes inside the captured step --------------------
    graph_safe = True

    def graph_setup(self, graph):
        "Graph mode: a row per probe batch, and a scratch row that the later batches of the epoch write to."
        self._graph = graph
        self._graph_probes = torch.zeros(self.probe_batches + 1, 3, device=graph.device)
        self._graph_last_probe = torch.full((1,), self.probe_batches, dtype=torch.long, device=graph.device)

    def graph_after_loss(self, graph):
        """Inside the step: the batch's labels added to the epoch's counts and, on the first `probe_batches` batches
        of the epoch (chosen on the device by `graph.batch`), the probe of its outputs."""
        new = self._counts is None
        batch = self._classifier_batch(graph.pred, graph.yb)
        if batch is None: return
        if new: graph.buffer(self._counts)  # made at the first batch, a warm-up step: warm-up puts it back to 0
        pred, targ = batch
        self._train_labels.index_add_(0, targ, self._ones_for(len(targ)))
        if self.probe_batches:
            row = torch.minimum(graph.batch.view(1), self._graph_last_probe)  # past the probes: the scratch row
            self._graph_probes.index_copy_(0, row, _probe_row(pred).view(1, 3))

    def graph_epoch_end(self, graph, start, stop):
        "Host, at the epoch's end: the epoch's probe rows join the records."
        if self.n_classes is None: return
        k = min(self.probe_batches, stop - start)
        if k: self._probes.extend(self._graph_probes[:k])
        self.probe_iters.extend(range(start, start + k))
        self._probed = k

    def after_validate(self):
        # Under DDP each rank counted its own shard: add them up here, where the validation ends.
        from .distributed import launched_distributed
        if self._in_fit and self._counts is not None and launched_distributed():
            self._counts[1:].copy_(all_reduce_sum(self._counts[1:]))

    def after_epoch(self):
        if not self._in_fit or self._counts is None: return
        self._epoch_open = False
        self._epochs.append(self._counts)
        self.iters.append(self.learn.train_iter)

    # ---- the protocol ------------------------------------------------------------------------------------------
    def device_records(self):
        out = {}
        if len(self._epochs): out['epochs'] = self._epochs.values()
        if len(self._probes): out['probe'] = self._probes.values()
        return out

    def summarize(self, raw):
        c = self.n_classes or 0
        epochs = raw.get('epochs', torch.zeros(0, 4, c))
        probe = raw.get('probe', torch.zeros(0, 3))
        return {'train_labels': epochs[:, 0], 'predicted': epochs[:, 1], 'targets': epochs[:, 2],
                'correct': epochs[:, 3, 0] if c else torch.zeros(0),
                'iters': torch.tensor(self.iters[:len(epochs)], dtype=torch.long),
                'probe_min': probe[:, 0], 'probe_row_sum_error': probe[:, 1], 'probe_logsumexp': probe[:, 2],
                'probe_iters': torch.tensor(self.probe_iters[:len(probe)], dtype=torch.long),
                'expects': self.expects}

    def records_mark(self): return None

    def combine_ranks(self, since):
        "The training label counts of this epoch, added up over ranks (validation counts are added at its end)."
        if self._counts is not None: self._counts[0].copy_(all_reduce_sum(self._counts[0]))

    def state_dict(self):
        return {'epochs': self._epochs.state_dict()['values'], 'probes': self._probes.state_dict()['values'],
                'iters': list(self.iters), 'probe_iters': list(self.probe_iters), 'kind': self.kind,
                'n_classes': self.n_classes}

    def load_state_dict(self, state):
        device = self.learn.device if self.learn is not None else None
        self._epochs.load_state_dict({'values': state['epochs']}, device)
        self._probes.load_state_dict({'values': state['probes']}, device)
        self.iters, self.probe_iters = list(state['iters']), list(state['probe_iters'])
        self.kind, self.n_classes = state['kind'], state['n_classes']
        if self.n_classes is not None and device is not None:
            self._counts = torch.zeros(4, self.n_classes, device=device)
            self._train_labels, self._ones, self._ones_views = self._counts[0], torch.ones(0, device=device), {}
