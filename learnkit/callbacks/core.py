"""The callbacks the loop itself relies on: train/eval switching, and gathering predictions."""
import torch

from ..callback import Callback

__all__ = ['TrainEvalCallback', 'GatherPredsCallback']


class TrainEvalCallback(Callback):
    "Switches the model between train and eval mode, and keeps `pct_train` and `train_iter`."
    order, run_valid = -10, False
    graph_safe = True  # graph mode: no per-batch work; the counters advance at the end of the epoch

    def graph_epoch_end(self, graph, start, stop):
        self.learn.train_iter += stop - start
        self.learn.pct_train += (stop - start) / (self.learn.n_iter * self.learn.n_epoch)

    def before_fit(self):
        self.learn.train_iter, self.learn.pct_train = 0, 0.

    def before_train(self):
        self.learn.pct_train = self.learn.epoch / self.learn.n_epoch
        self.learn.model.train()
        self.learn.training = True

    def after_batch(self):
        self.learn.pct_train += 1. / (self.learn.n_iter * self.learn.n_epoch)
        self.learn.train_iter += 1

    def before_validate(self):
        self.learn.model.eval()
        self.learn.training = False


class GatherPredsCallback(Callback):
    """Collects predictions, targets and (optionally) inputs and per-item losses during a validation
    run, on the device; `get_preds` concatenates them once at the end."""
    order = 45

    def __init__(self, with_input=False, with_loss=False):
        self.with_input, self.with_loss = with_input, with_loss
        self._reduction = None

    def before_validate(self):
        self.preds, self.targets, self.inputs, self.losses = [], [], [], []
        if self.with_loss:
            loss_func = self.learn.loss_func
            if not hasattr(loss_func, 'reduction'):
                raise ValueError(f"get_preds(with_loss=True) needs a loss with a `reduction` attribute, such as "
                                 f"nn.CrossEntropyLoss(); {loss_func!r} has none")
            self._reduction, loss_func.reduction = loss_func.reduction, 'none'

    def after_loss(self):
        self.preds.append(self.learn.pred.detach())
        if self.learn.yb: self.targets.append(self.learn.yb[0])
        if self.with_input: self.inputs.append(self.learn.xb[0])
        if self.with_loss: self.losses.append(self.learn.loss.detach())

    def cleanup_fit(self):
        if self._reduction is not None:
            self.learn.loss_func.reduction = self._reduction
            self._reduction = None

    def result(self):
        "(preds, targets[, inputs][, losses]) on the CPU, read in one go."
        cat = lambda ts: torch.cat(ts).cpu() if ts else None  # sync-ok: once, after the run
        out = [cat(self.preds), cat(self.targets)]
        if self.with_input: out.append(cat(self.inputs))
        if self.with_loss: out.append(cat(self.losses))
        return tuple(out)
