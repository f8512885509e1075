"""fastai's callbacks run on learnkit with only their imports changed.

Each test writes a callback in fastai's style that touches exactly what one of fastai's own callbacks touches
(ShortEpochCallback, GradientAccumulation, GradientClip, BnFreeze, TerminateOnNaNCallback, TrackerCallback,
EarlyStoppingCallback, SaveModelCallback, ReduceLROnPlateau, MixUp, CutMix, CSVLogger, ChannelsLast,
MCDropoutCallback, CollectDataCallback, ParamScheduler), trains a few Fashion-MNIST batches with it, and checks
what fastai documents that callback does. `bench/fastai_callbacks.py` runs fastai's real source the same way.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from fastcore.basics import store_attr
from fastcore.foundation import L
from torch import nn
from torch.distributions.beta import Beta
from torch.utils.data import DataLoader, TensorDataset

from conftest import normalized_slice, tiny_cnn, torch_dls
from learnkit import (Callback, CancelBatchException, CancelFitException, CancelTrainException, CancelValidException,
                      CrossEntropyLossFlat, DataLoaders, Learner, MixedPrecision, NoneReduce, SchedLin,
                      TrainEvalCallback, UnsafeCheckpointError, find_bs, flatten_model, tensor, unsqueeze)


def learner(fm, path='.', n_train=256, n_valid=256, bs=64, model=None, dls=None, **kw):
    torch.manual_seed(0)
    kw.setdefault('loss_func', CrossEntropyLossFlat())
    return Learner(dls or torch_dls(fm, n_train, n_valid, bs), model or tiny_cnn(), path=path, device='cpu', **kw)


def ordered_dls(fm, n_train=256, n_valid=128, bs=64):
    "Loaders without shuffling, so two runs see the same batches."
    x, y, xv, yv = normalized_slice(fm, n_train, n_valid)
    return DataLoaders(DataLoader(TensorDataset(x, y), bs), DataLoader(TensorDataset(xv, yv), bs))


def fit(learn, *args, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kw)


def bn_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def Probe(event, fn, order=0):
    "A callback that calls `fn(learn)` at `event`; `order` places it among the other callbacks."
    return type('Probe', (Callback,), {'order': order, event: lambda self: fn(self.learn)})()


# ---- the loop's events, in fastai's order ----------------------------------------------------------------------------
FASTAI_ORDER = ('before_fit before_epoch before_train before_batch after_pred after_loss before_backward '
                'after_backward before_step after_step after_batch after_train before_validate before_batch after_pred '
                'after_loss after_batch after_validate after_epoch after_fit').split()


def test_events_come_in_fastais_order_and_short_epochs_cancel_each_phase(fmnist):
    seen = []
    names = set(FASTAI_ORDER) | {'after_cancel_train', 'after_cancel_validate'}
    handlers = {n: (lambda n: lambda self: seen.append(n))(n) for n in names}
    events = type('Events', (Callback,), {'order': -100, **handlers})

    class StopAtFraction(Callback):           # what fastai's ShortEpochCallback touches
        def __init__(self, pct): self.pct = pct
        def after_batch(self):
            if self.iter / self.n_iter < self.pct: return
            if self.training: raise CancelTrainException
            raise CancelValidException

    fit(learner(fmnist, n_train=64, n_valid=128, cbs=events), 1, 1e-3)   # one training and one validation batch
    assert seen == FASTAI_ORDER

    seen.clear()
    learn = learner(fmnist, n_train=256, n_valid=512, cbs=events)       # 4 training, 4 validation batches
    fit(learn, 1, 1e-3, cbs=StopAtFraction(0.5))
    assert seen.count('after_pred') == 6                                  # 3 of 4 batches in each phase
    assert seen[seen.index('after_cancel_train') + 1] == 'after_train'
    assert seen[seen.index('after_cancel_validate') + 1] == 'after_validate'


# ---- GradientAccumulation, GradientClip, BnFreeze ------------------------------------------------------------------
def test_accumulated_gradients_step_as_one_large_batch(fmnist):
    class Accumulate(Callback):               # what fastai's GradientAccumulation touches
        order, run_valid = MixedPrecision.order - 4, False
        def __init__(self, n_acc=128): store_attr()
        def before_fit(self): self.count = 0
        def after_loss(self): self.learn.loss_grad /= self.n_acc / find_bs(self.learn.yb)
        def before_step(self):
            self.learn.loss_grad *= self.n_acc / find_bs(self.learn.yb)
            self.count += find_bs(self.learn.yb)
            if self.count < self.n_acc: raise CancelBatchException()
            self.count = 0

    steps = []
    small = learner(fmnist, dls=ordered_dls(fmnist, 256, 64, bs=64), opt_func=torch.optim.SGD)
    fit(small, 1, 0.1, cbs=[Accumulate(128), Probe('after_step', lambda l: steps.append(l.iter))])
    large = learner(fmnist, dls=ordered_dls(fmnist, 256, 64, bs=128), opt_func=torch.optim.SGD)
    fit(large, 1, 0.1)
    assert steps == [1, 3]                                    # one step per two batches of 64
    for a, b in zip(small.model.parameters(), large.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(small.recorder.lrs) == 4                       # every batch, stepped or not, is recorded


def test_gradient_clipping_through_the_learners_model_parameters(fmnist):
    class Clip(Callback):                     # what fastai's GradientClip touches: self.parameters() is the model's
        order = MixedPrecision.order + 1
        def __init__(self, max_norm=1., norm_type=2.): store_attr()
        def before_step(self): nn.utils.clip_grad_norm_(self.parameters(), self.max_norm, self.norm_type)

    def grad_norms(clip):
        learn = learner(fmnist)
        norms = []
        learn.create_opt()
        learn.opt.opt.register_step_pre_hook(      # a plain torch hook: the gradient the optimizer steps with
            lambda opt, args, kw: norms.append(torch.cat([p.grad.flatten() for p in learn.model.parameters()]).norm()))
        fit(learn, 1, 1e-2, cbs=[Clip(0.05)] if clip else [])
        return torch.stack(norms)

    assert grad_norms(clip=False).max() > 0.1
    assert grad_norms(clip=True).max() <= 0.05 * 1.0001

    learn = learner(fmnist)
    assert list(learn.parameters()) == list(learn.model.parameters())
    with pytest.raises(AttributeError, match=r"neither the Learner nor its model \(Sequential\) has .*'paramters'"):
        learn.paramters()

    class Typo(Callback):
        def before_fit(self): self.paramters()
    with pytest.raises(AttributeError, match=r"'Typo' has no attribute 'paramters'.*Learner.*Sequential"):
        fit(learn, 1, 1e-3, cbs=Typo())


def test_frozen_batchnorm_keeps_its_running_statistics(fmnist):
    class FreezeFrozenBN(Callback):           # what fastai's BnFreeze touches
        run_after = TrainEvalCallback
        def before_train(self):
            for m in flatten_model(self.model):
                if isinstance(m, nn.BatchNorm2d) and not next(m.parameters()).requires_grad: m.eval()

    def run(cbs):
        learn = learner(fmnist, model=bn_cnn())
        bn = learn.model[1]
        for p in bn.parameters(): p.requires_grad_(False)
        before, conv = bn.running_mean.clone(), learn.model[0].weight.detach().clone()
        fit(learn, 1, 1e-2, cbs=cbs)
        return torch.equal(bn.running_mean, before), torch.equal(learn.model[0].weight, conv)

    assert run([FreezeFrozenBN()]) == (True, False)          # statistics fixed, the rest trains
    assert run([]) == (False, False)


# ---- the trackers ---------------------------------------------------------------------------------------------------
def test_a_nan_loss_stops_the_fit_at_that_batch(fmnist):
    class StopOnNaN(Callback):                # what fastai's TerminateOnNaNCallback touches
        order = -9
        def after_batch(self):
            if torch.isinf(self.loss) or torch.isnan(self.loss): raise CancelFitException

    x, y, xv, yv = normalized_slice(fmnist, 256, 64)
    x[130] = float('nan')                                     # in the third batch of 64
    dls = DataLoaders(DataLoader(TensorDataset(x, y), 64), DataLoader(TensorDataset(xv, yv), 64))
    learn = learner(fmnist, dls=dls)
    fit(learn, 3, 1e-3, cbs=StopOnNaN())
    assert (learn.epoch, learn.iter, learn.train_iter, learn.recorder.values) == (0, 2, 3, [])


class TrackValidLoss(Callback):               # what fastai's TrackerCallback touches
    order = 60
    def __init__(self, monitor='valid_loss', min_delta=0.):
        self.monitor, self.comp, self.min_delta, self.best = monitor, np.less, -min_delta, None
    def before_fit(self):
        self.run = not hasattr(self, 'lr_finder') and not hasattr(self, 'gather_preds')
        self.best = float('inf')
        assert self.monitor in self.recorder.metric_names[1:]
        self.idx = list(self.recorder.metric_names[1:]).index(self.monitor)
    def after_epoch(self):
        val = self.recorder.values[-1][self.idx]
        self.new_best = bool(self.comp(val - self.min_delta, self.best))
        if self.new_best: self.best = val


def test_a_tracker_follows_the_monitored_value_and_sits_out_lr_find(fmnist):
    tracker, running = TrackValidLoss(), []
    learn = learner(fmnist, cbs=tracker)
    fit(learn, 3, 1e-2)
    assert tracker.best == min(v[1] for v in learn.recorder.values)
    learn.add_cb(Probe('after_batch', lambda l: running.append(tracker.run)))
    with learn.no_bar(): learn.lr_find(num_it=6, show_plot=False)
    assert running == [False] * 6 and tracker.run                   # off during lr_find, on again after it
    fit(learn, 1, 1e-2)
    assert tracker.best == learn.recorder.values[0][1]


def test_early_stopping_cancels_the_fit_after_patience_epochs(fmnist):
    class StopWhenStuck(TrackValidLoss):      # what fastai's EarlyStoppingCallback adds
        order = TrackValidLoss.order + 3
        def __init__(self, patience=1, **kw): super().__init__(**kw); self.patience = patience
        def before_fit(self): self.wait = 0; super().before_fit()
        def after_epoch(self):
            super().after_epoch()
            self.wait = 0 if self.new_best else self.wait + 1
            if self.wait >= self.patience:
                print(f'No improvement since epoch {self.epoch - self.wait}: early stopping')
                raise CancelFitException()

    learn = learner(fmnist)
    fit(learn, 5, 1e-2, cbs=StopWhenStuck(patience=2, min_delta=10.))  # nothing improves by 10
    assert len(learn.recorder.values) == 3 and learn.epoch == 2


class Opaque:
    "An object only unpickling can rebuild."


def test_the_best_model_is_saved_and_loaded_back_at_the_end(fmnist, tmp_path):
    class KeepBest(TrackValidLoss):           # what fastai's SaveModelCallback touches
        order = TrackValidLoss.order + 1
        def __init__(self, fname='model', with_opt=False):
            super().__init__()
            self.fname, self.with_opt = fname, with_opt
        def after_epoch(self):
            super().after_epoch()
            if self.new_best:
                self.last_saved_path = self.learn.save(self.fname, with_opt=self.with_opt)
                self.saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        def after_fit(self): self.learn.load(self.fname, with_opt=self.with_opt, weights_only=False)

    def blow_up(learn):                       # the last epoch's lr ruins the model: the best epoch is an earlier one
        if learn.epoch == 2: learn.opt.hypers[0]['lr'] = 5.
    keeper = KeepBest()
    learn = learner(fmnist, path=tmp_path)
    fit(learn, 3, 1e-2, cbs=[keeper, Probe('before_epoch', blow_up)])
    assert keeper.last_saved_path == tmp_path / 'models' / 'model.pth'
    losses = [v[1] for v in learn.recorder.values]
    assert len(losses) == 3 and keeper.best == min(losses) < losses[2]    # the loop's history stays whole
    assert all(torch.equal(v, keeper.saved[k]) for k, v in learn.model.state_dict().items())

    with pytest.raises(TypeError, match='weights_only must be True or False'): learn.load('model', weights_only='no')
    torch.save({'format': 'learnkit.checkpoint', 'model': Opaque()}, tmp_path / 'models' / 'opaque.pth')
    with pytest.raises(UnsafeCheckpointError) as e: learn.load('opaque', weights_only=False)
    assert 'never' in ' '.join(e.value.__notes__)


def test_reduce_lr_on_plateau_lowers_the_lr_in_the_torch_optimizer(fmnist):
    class LowerLR(TrackValidLoss):            # what fastai's ReduceLROnPlateau touches
        order = TrackValidLoss.order + 2
        def __init__(self, factor=10., **kw): super().__init__(**kw); self.factor = factor
        def after_epoch(self):
            super().after_epoch()
            if not self.new_best:
                for h in self.opt.hypers: h['lr'] = max(h['lr'] / self.factor, 0)

    learn = learner(fmnist, splitter=lambda m: [list(m[:2].parameters()), list(m[2:].parameters())])
    fit(learn, 3, 1e-2, cbs=LowerLR(min_delta=10.))                   # epochs 1 and 2 do not improve enough
    torch_lrs = [g['lr'] for g in learn.opt.opt.param_groups]
    assert len(torch_lrs) == 4 and torch_lrs == pytest.approx([1e-4] * 4)   # both groups, decayed and not
    assert [h['lr'] for h in learn.opt.hypers] == pytest.approx([1e-4, 1e-4])
    with pytest.raises(TypeError): learn.opt.hypers[0] = {'lr': 1.}    # a copy is never written silently
    with pytest.raises(KeyError, match="'momentum'.*'lr'"): learn.opt.hypers[0]['momentum'] = 0.9


# ---- MixUp and CutMix ------------------------------------------------------------------------------------------------
class MixBase(Callback):                      # what fastai's MixHandler touches
    run_valid = False
    def __init__(self, alpha=0.4): self.distrib = Beta(tensor(alpha), tensor(alpha))
    def before_train(self):
        self.stack_y = getattr(self.learn.loss_func, 'y_int', False)
        if self.stack_y: self.old_lf, self.learn.loss_func = self.learn.loss_func, self.lf
    def after_train(self):
        if self.stack_y: self.learn.loss_func = self.old_lf
    def after_cancel_train(self): self.after_train()
    def after_cancel_fit(self): self.after_train()
    def lf(self, pred, *yb):
        if not self.training: return self.old_lf(pred, *yb)
        with NoneReduce(self.old_lf) as lf:
            return torch.lerp(lf(pred, *self.yb1), lf(pred, *yb), self.lam).mean()


def test_mixup_mixes_inputs_and_losses_in_training_only(fmnist):
    class Mix(MixBase):                       # MixUp: reads self.x / self.y, writes self.learn.xb
        def before_batch(self):
            n = self.y.size(0)
            self.lam = self.distrib.sample((n,)).to(self.x.device)
            self.lam = torch.maximum(self.lam, 1 - self.lam)
            self.shuffle = torch.randperm(n).to(self.x.device)
            self.yb1 = tuple(L(self.yb).itemgot(self.shuffle))
            xb1 = tuple(L(self.xb).itemgot(self.shuffle))
            self.learn.xb = tuple(L(xb1, self.xb).map_zip(torch.lerp, weight=unsqueeze(self.lam, n=self.x.ndim - 1)))

    mix, seen = Mix(), []
    def before(learn): seen.append({'x': learn.x.clone(), 'y': learn.y.clone(), 'training': learn.training})
    def after(learn): seen[-1].update(mixed=learn.x, loss_func=learn.loss_func, loss=learn.loss, pred=learn.pred)
    learn = learner(fmnist, cbs=[mix, Probe('before_batch', before, order=-1), Probe('after_loss', after, order=1)])
    loss_func = learn.loss_func
    fit(learn, 1, 1e-3)
    train, valid = [s for s in seen if s['training']], [s for s in seen if not s['training']]
    assert len(train) == 4 and len(valid) == 2
    b = train[-1]
    lam = unsqueeze(mix.lam, n=3)
    torch.testing.assert_close(b['mixed'], b['x'][mix.shuffle] * (1 - lam) + b['x'] * lam)
    with torch.no_grad():
        per_item = nn.functional.cross_entropy(b['pred'], b['y'][mix.shuffle], reduction='none') * (1 - mix.lam)
        per_item += nn.functional.cross_entropy(b['pred'], b['y'], reduction='none') * mix.lam
    torch.testing.assert_close(b['loss'], per_item.mean())
    assert b['loss_func'] == mix.lf and all(v['loss_func'] is loss_func for v in valid)
    assert learn.loss_func is loss_func and loss_func.reduction == 'mean'           # put back after the fit

    def cancel(learn): raise CancelFitException()
    learn = learner(fmnist, cbs=mix)
    loss_func = learn.loss_func
    fit(learn, 1, 1e-3, cbs=Probe('after_batch', cancel))
    assert learn.loss_func is loss_func                                              # cancelled mid-training: put back


def test_cutmix_pastes_a_patch_of_another_image_into_the_batch(fmnist):
    class Patch(MixBase):                     # CutMix: writes into self.learn.xb[0] in place
        def before_batch(self):
            bs, _, H, W = self.x.size()
            self.shuffle = torch.randperm(bs).to(self.x.device)
            xb1, self.yb1 = self.x[self.shuffle], (self.y[self.shuffle],)
            self.box = (4, 18, 6, 20)                          # y1, y2, x1, x2
            y1, y2, x1, x2 = self.box
            self.learn.xb[0][..., y1:y2, x1:x2] = xb1[..., y1:y2, x1:x2]
            self.lam = tensor(1 - (x2 - x1) * (y2 - y1) / float(W * H))

    patch, seen = Patch(), []
    x_data = normalized_slice(fmnist, 256, 64)[0]
    def keep(learn):
        if learn.training: seen.append(learn.x.clone())
    learn = learner(fmnist, cbs=[patch, Probe('before_batch', keep, order=-1), Probe('after_pred', keep, order=1)])
    fit(learn, 1, 1e-3)
    before, after = seen[-2:]                                 # the last training batch
    y1, y2, x1, x2 = patch.box
    expected = before.clone()
    expected[..., y1:y2, x1:x2] = before[patch.shuffle][..., y1:y2, x1:x2]
    assert torch.equal(after, expected) and not torch.equal(after, before)
    assert torch.equal(learn.dls.train.dataset.tensors[0], x_data)             # the data set itself is untouched
    assert learn.loss_func.__class__ is CrossEntropyLossFlat


def test_default_classification_loss_tells_mixup_its_targets_are_class_indices(fmnist):
    x, y, xv, yv = normalized_slice(fmnist, 64, 64)
    dls = DataLoaders.from_tensors(x, y, xv, yv, bs=32, vocab=list('abcdefghij'), device='cpu')
    learn = Learner(dls, tiny_cnn(), device='cpu')
    assert isinstance(learn.loss_func, nn.CrossEntropyLoss) and learn.loss_func.y_int
    scores, targets = torch.randn(2, 5, 3, 10), torch.randint(0, 10, (2, 5, 3))
    torch.testing.assert_close(CrossEntropyLossFlat()(scores, targets),
                               nn.functional.cross_entropy(scores.reshape(-1, 10), targets.reshape(-1)))


# ---- logging, memory format, dropout at inference, collecting batches, schedules -----------------------------------
def test_a_csv_logger_writes_the_results_table_through_learn_logger(fmnist, tmp_path):
    class CsvLog(Callback):                   # what fastai's CSVLogger touches
        order = 60
        def __init__(self, fname='history.csv'): self.fname = Path(fname)
        def before_fit(self):
            if hasattr(self, 'gather_preds'): return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = (self.path / self.fname).open('w')
            self.file.write(','.join(self.recorder.metric_names) + '\n')
            self.old_logger, self.learn.logger = self.logger, self._write_line
        def _write_line(self, log):
            self.file.write(','.join(str(t) for t in log) + '\n')
            self.old_logger(log)
        def after_fit(self):
            self.file.close()
            self.learn.logger = self.old_logger

    learn = learner(fmnist, path=tmp_path, cbs=CsvLog())
    fit(learn, 2, 1e-3)
    lines = (tmp_path / 'history.csv').read_text().splitlines()
    assert lines[0] == 'epoch,train_loss,valid_loss,time' and len(lines) == 3
    assert [float(v) for v in lines[2].split(',')[1:3]] == pytest.approx(learn.recorder.values[1][:2])


def test_a_callback_named_channels_last_can_be_added_and_changes_the_model_layout(fmnist):
    class ChannelsLast(Callback):             # what fastai's ChannelsLast touches; its name is `channels_last`
        order = -1
        def before_fit(self): self.learn.model.to(memory_format=torch.channels_last)

    learn = learner(fmnist)
    learn.add_cb(ChannelsLast())
    assert isinstance(learn.channels_last, ChannelsLast)
    fit(learn, 1, 1e-3)
    assert learn.model[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert not learn.model[2].weight.is_contiguous()

    layouts = []                                # the constructor flag still works, under its own name
    learn = learner(fmnist, channels_last=True)
    fit(learn, 1, 1e-3, cbs=Probe('before_batch', lambda l: layouts.append(
        l.x.is_contiguous(memory_format=torch.channels_last))))
    assert learn.memory_format is torch.channels_last and all(layouts)

    # Every fastai callback's attribute name is free; the Learner's own methods stay protected.
    names = ('ShortEpoch GradientAccumulation GradientClip BnFreeze TerminateOnNaN Tracker EarlyStopping SaveModel '
             'ReduceLROnPlateau MixUp CutMix CSVLogger ChannelsLast MCDropout CollectData ParamScheduler Recorder '
             'TrainEval Progress MixedPrecision LRFinder GatherPreds FetchPreds ActivationStats Hook').split()
    for name in names: learn.add_cb(type(name, (Callback,), {})())
    with pytest.raises(ValueError, match=r"learn\.fit, which would hide the Learner's own"):
        learn.add_cb(type('Fit', (Callback,), {})())


def test_dropout_stays_on_at_inference_with_mc_dropout(fmnist):
    class DropoutAtInference(Callback):       # what fastai's MCDropoutCallback touches
        def before_validate(self):
            for m in [m for m in flatten_model(self.model) if 'dropout' in m.__class__.__name__.lower()]: m.train()
        def after_validate(self):
            for m in [m for m in flatten_model(self.model) if 'dropout' in m.__class__.__name__.lower()]: m.eval()

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10))
    learn = learner(fmnist, model=model)
    plain = [learn.get_preds()[0] for _ in range(2)]
    sampled = [learn.get_preds(cbs=DropoutAtInference())[0] for _ in range(2)]
    assert torch.equal(*plain) and not torch.equal(*sampled)
    assert not model[3].training


def test_collected_batches_are_detached_host_copies(fmnist):
    class KeepBatches(Callback):              # what fastai's CollectDataCallback touches
        def before_fit(self): self.data = L()
        def after_batch(self): self.data.append(self.learn.to_detach((self.xb, self.yb, self.pred, self.loss)))

    keep = KeepBatches()
    learn = learner(fmnist, cbs=keep)
    fit(learn, 1, 1e-3)
    assert len(keep.data) == 4 + 2
    xb, yb, pred, loss = keep.data[0]
    assert xb[0].shape == (64, 1, 28, 28) and yb[0].shape == (64,) and pred.shape == (64, 10)
    assert all(t.device.type == 'cpu' and not t.requires_grad for t in (xb[0], yb[0], pred, loss))
    assert learn.to_detach({'a': [torch.ones(2, requires_grad=True)]}, cpu=False)['a'][0].requires_grad is False


def test_a_param_scheduler_sets_and_records_the_lr_of_every_batch(fmnist):
    class Schedule(Callback):                 # what fastai's ParamScheduler touches
        order, run_valid = 60, False
        def __init__(self, scheds): self.scheds = scheds
        def before_fit(self): self.hps = {p: [] for p in self.scheds.keys()}
        def before_batch(self):
            for n, f in self.scheds.items(): self.opt.set_hyper(n, f(self.pct_train))
        def after_batch(self):
            for p in self.scheds.keys(): self.hps[p].append(self.opt.hypers[-1][p])
        def after_fit(self):
            if hasattr(self.learn, 'recorder') and hasattr(self, 'hps'): self.recorder.hps = self.hps

    learn = learner(fmnist)
    fit(learn, 2, 1e-3, cbs=Schedule({'lr': SchedLin(1e-3, 1e-2)}))
    expected = [1e-3 + (1e-2 - 1e-3) * i / 8 for i in range(8)]
    assert learn.recorder.hps['lr'] == pytest.approx(expected)
    assert learn.recorder.lrs == pytest.approx(expected)                       # what the torch optimizer used
    assert learn.opt.opt.param_groups[0]['lr'] == pytest.approx(expected[-1])


def test_fastai_helpers_under_their_names():
    assert tensor(np.arange(3.)).dtype == torch.float32 and tensor(1, 2).tolist() == [1, 2]
    assert find_bs(({'a': [torch.zeros(5, 2)]}, torch.zeros(3))) == 5
    with pytest.raises(ValueError, match='find_bs found no tensor'): find_bs(('a', 1))
    assert unsqueeze(torch.zeros(4), n=0).shape == (4,) and unsqueeze(torch.zeros(4), dim=0, n=2).shape == (1, 1, 4)
    loss, pred, targ = nn.CrossEntropyLoss(), torch.randn(6, 10), torch.randint(0, 10, (6,))
    with pytest.raises(RuntimeError), NoneReduce(loss) as lf:
        assert lf(pred, targ).shape == (6,)
        raise RuntimeError('a failing batch')
    assert loss.reduction == 'mean'                                              # put back however the block ends
    with NoneReduce(nn.functional.cross_entropy) as lf: assert lf(pred, targ).shape == (6,)
    assert [type(m) for m in flatten_model(nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU())))] == [
        nn.Linear, nn.ReLU]
