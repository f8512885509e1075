"""The Learner's loop as a user meets it: events, cancels, callbacks, errors, results."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import tiny_cnn, torch_dls
from learnkit import (EVENTS, SGD, Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                      CancelFitException, CancelStepException, CancelTrainException, CancelValidException,
                      Learner, accuracy, error_rate)
from learnkit.data import DataLoaders, Normalize
from learnkit.diagnostics import OpCounter
from learnkit.models import simple_cnn


class EventLog(Callback):
    "Records every event it sees, with the phase for batch events."
    def __init__(self): self.events = []


for _event in EVENTS:
    setattr(EventLog, _event, lambda self, e=_event: self.events.append(e))


def small_learner(fmnist, n_train=128, n_valid=64, bs=64, **kw):
    kw.setdefault('metrics', accuracy)
    return Learner(torch_dls(fmnist, n_train, n_valid, bs), tiny_cnn(), loss_func=nn.CrossEntropyLoss(), **kw)


TRAIN_BATCH = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward',
               'before_step', 'after_step', 'after_batch']
VALID_BATCH = ['before_batch', 'after_pred', 'after_loss', 'after_batch']


def test_event_sequence_for_fit_and_validate(fmnist):
    log = EventLog()
    learn = small_learner(fmnist, cbs=log)          # 2 training batches, 1 validation batch
    assert log.events == ['after_create']
    log.events.clear()
    with learn.no_bar(): learn.fit(1, 1e-3)
    assert log.events == (['before_fit', 'before_epoch', 'before_train'] + TRAIN_BATCH * 2 + ['after_train',
                          'before_validate'] + VALID_BATCH + ['after_validate', 'after_epoch', 'after_fit'])
    log.events.clear()
    learn.validate()
    assert log.events == ['before_validate'] + VALID_BATCH + ['after_validate']


def raiser(event, exc, when=lambda learn: True):
    "A callback that raises `exc` at `event` when `when(learn)`; it logs events too."
    class Raiser(EventLog):
        pass
    def handler(self):
        self.events.append(event)
        if when(self.learn): raise exc()
    setattr(Raiser, event, handler)
    return Raiser()


@pytest.mark.parametrize('event,exc,phase', [
    ('after_pred', CancelBatchException, 'batch'), ('before_step', CancelStepException, 'step'),
    ('before_backward', CancelBackwardException, 'backward'), ('before_train', CancelTrainException, 'train'),
    ('before_validate', CancelValidException, 'validate'), ('before_epoch', CancelEpochException, 'epoch'),
    ('after_epoch', CancelFitException, 'fit')])
def test_cancel_runs_after_cancel_then_after(fmnist, event, exc, phase):
    cb = raiser(event, exc)
    learn = small_learner(fmnist, cbs=cb)
    w0 = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(): learn.fit(2, 1e-2)
    ev = cb.events
    i = ev.index(f'after_cancel_{phase}')
    assert ev[i - 1] == event and ev[i + 1] == f'after_{phase}'
    unchanged = all(torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))
    if phase == 'batch':      # nothing after the prediction ran: no loss, no step
        assert 'after_loss' not in ev and unchanged
    if phase in ('step', 'backward', 'train'):
        assert unchanged
    if phase == 'step': assert 'after_backward' in ev
    if phase == 'backward': assert 'before_step' in ev
    if phase == 'train': assert 'before_batch' in ev        # validation batches still ran
    if phase == 'validate': assert ev.count('after_train') == 2 and len(learn.recorder.values) == 2
    if phase == 'epoch': assert ev.count('after_epoch') == 2 and 'before_train' not in ev
    if phase == 'fit': assert ev.count('before_epoch') == 1 and ev[-1] == 'after_fit'


# Callbacks written in fastai's documented style: only the imports differ.
class ShortEpochCallback(Callback):
    "Fit just `pct` of an epoch, then stop"
    def __init__(self, pct=0.01, short_valid=True): self.pct, self.short_valid = pct, short_valid
    def after_batch(self):
        if self.iter / self.n_iter < self.pct: return
        if self.training: raise CancelTrainException
        if self.short_valid: raise CancelValidException


class CountBatchesCallback(Callback):
    def before_fit(self): self.train_batches, self.valid_batches = 0, 0
    def after_batch(self):
        if self.training: self.train_batches += 1
        else: self.valid_batches += 1


class AddNoiseCallback(Callback):
    "Writes through self.learn, as fastai callbacks that change the batch do."
    def before_batch(self):
        if self.training: self.learn.xb = (self.xb[0] + 0.1 * torch.randn_like(self.xb[0]),)


def test_fastai_style_callbacks_run_unchanged(fmnist):
    learn = small_learner(fmnist, n_train=640, cbs=[CountBatchesCallback(), AddNoiseCallback()])
    with learn.no_bar(): learn.fit(1, 1e-3, cbs=ShortEpochCallback(pct=0.5))
    assert learn.count_batches.train_batches == 6 and learn.count_batches.valid_batches == 1
    assert isinstance(learn.add_noise, AddNoiseCallback)
    assert not hasattr(learn, 'short_epoch')            # temporary callbacks are gone after fit
    assert {'TrainEvalCallback', 'Recorder', 'ProgressCallback'} <= {type(c).__name__ for c in learn.cbs}
    assert learn.recorder.values[0][0] == pytest.approx(learn.recorder.losses[-1])


def test_callback_reads_learner_state_and_warns_on_plain_writes(fmnist):
    seen = {}
    class Peek(Callback):
        def after_loss(self):
            seen.update(model=self.model, training=self.training, xb=self.xb, yb=self.yb, n_epoch=self.n_epoch)
            self.loss = None                      # a bug: changes the callback, not the learner
    learn = small_learner(fmnist, cbs=Peek())
    with pytest.warns(UserWarning, match=r'self\.learn\.loss'):
        with learn.no_bar(): learn.fit(1, 1e-3)
    assert seen['model'] is learn.model and seen['n_epoch'] == 1
    assert isinstance(seen['xb'], tuple) and isinstance(seen['yb'], tuple)
    assert learn.peek.name == 'peek'


def test_callback_names_are_snake_case():
    class ActivationStatsCallback(Callback): pass
    class GradientNoiseScale(Callback): pass
    class TerminateOnNaNCallback(Callback): pass
    assert ActivationStatsCallback().name == 'activation_stats'
    assert GradientNoiseScale().name == 'gradient_noise_scale'
    assert TerminateOnNaNCallback().name == 'terminate_on_na_n'   # fastai's name for it, kept for porting


def test_misspelt_event_warns(fmnist):
    class Typo(Callback):
        def before_epcoh(self): pass
    with pytest.warns(UserWarning, match='before_epoch'):
        small_learner(fmnist, cbs=Typo())


def test_run_train_and_run_valid_gate_batch_events(fmnist):
    class TrainOnly(CountBatchesCallback): run_valid = False
    class ValidOnly(CountBatchesCallback): run_train = False
    learn = small_learner(fmnist, cbs=[TrainOnly(), ValidOnly()])
    with learn.no_bar(): learn.fit(1, 1e-3)
    assert (learn.train_only.train_batches, learn.train_only.valid_batches) == (2, 0)
    assert (learn.valid_only.train_batches, learn.valid_only.valid_batches) == (0, 1)


def test_error_in_callback_names_it_and_cleans_up(fmnist):
    class Boom(Callback):
        def after_loss(self):
            if self.training and self.iter == 1: raise RuntimeError('boom')
    class Temp(Callback): pass
    learn = small_learner(fmnist, cbs=Boom())
    n_cbs = len(learn.cbs)
    with pytest.raises(RuntimeError, match=r'boom[\s\S]*Boom.*after_loss'):
        learn.fit(1, 1e-3, cbs=Temp())
    assert len(learn.cbs) == n_cbs and not hasattr(learn, 'temp')
    assert all(p.grad is None for p in learn.model.parameters())   # no half-accumulated gradients
    learn.remove_cb(learn.boom)
    with learn.no_bar(): learn.fit(1, 1e-3)                     # usable again
    assert len(learn.recorder.values) == 1


def test_keyboard_interrupt_keeps_finished_epochs_and_learner_usable(fmnist):
    class Interrupt(Callback):
        def before_batch(self):
            if self.epoch == 1 and self.training: raise KeyboardInterrupt
    learn = small_learner(fmnist)
    with pytest.raises(KeyboardInterrupt):
        with learn.no_bar(): learn.fit(3, 1e-3, cbs=Interrupt())
    assert len(learn.recorder.values) == 1 and not hasattr(learn, 'interrupt')
    with learn.no_bar(): learn.fit(1, 1e-3)


def test_clear_errors_for_bad_setups(fmnist):
    x, y = fmnist.x_train[:10].float().unsqueeze(1), fmnist.y_train[:10]
    empty = DataLoaders(DataLoader(TensorDataset(x, y), 64, drop_last=True), DataLoader(TensorDataset(x, y), 64))
    with pytest.raises(ValueError, match='no batches.*smaller bs'):
        Learner(empty, tiny_cnn(), loss_func=nn.CrossEntropyLoss()).fit(1)
    no_flatten = nn.Sequential(nn.Conv2d(1, 10, 3, 2, 1))
    learn = small_learner(fmnist)
    learn.model = no_flatten
    with pytest.raises(ValueError, match=r'pred of shape \(64, 10, 14, 14\).*target of shape \(64,\)'):
        with learn.no_bar(): learn.fit(1)
    with pytest.raises(ValueError, match='No learning rate'):
        small_learner(fmnist, lr=None).fit(1)
    with pytest.raises(TypeError, match='DataLoaders'):
        Learner(DataLoader(TensorDataset(x, y)), tiny_cnn())
    with pytest.raises(ValueError, match='loss_func=None'):
        Learner(torch_dls(fmnist, 128, 64), tiny_cnn())


def test_a_classifier_with_fewer_outputs_than_classes_is_refused_before_its_first_loss(fmnist):
    """With the classes known (learnkit loaders carry a vocab), a model that returns fewer scores than there are
    classes is named from the shapes alone, before any loss: on CUDA the loss would die in a device-side assert.
    The learner stays usable: given the right model, it trains."""
    dls = DataLoaders.from_tensors(fmnist.x_train[:128], fmnist.y_train[:128], fmnist.x_valid[:64],
                                   fmnist.y_valid[:64], bs=64, vocab=fmnist.classes, device='cpu')
    learn = Learner(dls, nn.Sequential(tiny_cnn(), nn.Linear(10, 5)), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), pytest.raises(ValueError, match=r'returns 5 scores per item, but the data has 10 classes'
                                                          r'.*n_out=10'):
        learn.fit(1, 1e-2)
    learn.model = tiny_cnn()
    with learn.no_bar(): learn.fit(1, 1e-2)
    assert len(learn.recorder.losses) == 2


def test_targets_out_of_range_and_float_targets_get_clear_errors(fmnist):
    learn = small_learner(fmnist)
    learn.model = nn.Sequential(tiny_cnn(), nn.Linear(10, 5))        # 5 outputs for 10 classes
    # Plain torch loaders carry no vocab: the TensorDataset's host labels are checked once, before the first loss
    # (the message is not the loss's: on CUDA the loss would die in a device-side assert that names nothing).
    with pytest.raises(ValueError, match=r'^The targets range over \[0, 9\] but the model has n_out=5'):
        with learn.no_bar(): learn.fit(1)
    learn.model = tiny_cnn()
    with learn.no_bar(): learn.fit(1)  # the learner stays usable
    x, y = fmnist.x_train[:128].float().unsqueeze(1), fmnist.y_train[:128].float()
    dls = DataLoaders(DataLoader(TensorDataset(x, y), 64), DataLoader(TensorDataset(x, y), 64))
    with pytest.raises(ValueError, match=r'floats where class indices are expected.*\.long\(\)'):
        with Learner(dls, tiny_cnn(), loss_func=nn.CrossEntropyLoss()).no_bar() as l: l.fit(1)


def test_metrics_are_weighted_by_batch_size(fmnist):
    learn = small_learner(fmnist, n_valid=100, metrics=[accuracy, error_rate])   # valid batches of 100? no: 128
    learn.dls.valid = DataLoader(learn.dls.valid.dataset, batch_size=30)          # 30,30,30,10: uneven
    loss, acc, err = learn.validate()
    preds, targs = learn.get_preds()
    assert acc == pytest.approx((preds.argmax(1) == targs).float().mean().item(), abs=1e-6)
    assert err == pytest.approx(1 - acc, abs=1e-6)
    full = nn.CrossEntropyLoss()(learn.model(learn.dls.valid.dataset.tensors[0]), targs).item()
    assert loss == pytest.approx(full, rel=1e-5)


def test_get_preds_with_loss_and_predict(fmnist):
    learn = small_learner(fmnist)
    preds, targs, losses = learn.get_preds(with_loss=True)
    assert preds.shape == (64, 10) and targs.shape == (64,) and losses.shape == (64,)
    assert torch.allclose(preds.sum(1), torch.ones(64), atol=1e-5)
    assert learn.loss_func.reduction == 'mean'                      # restored
    x = learn.dls.valid.dataset.tensors[0][0]
    label, idx, probs = learn.predict(x)
    assert label == idx == int(preds[0].argmax()) and probs.shape == (10,)


def test_predict_takes_an_item_as_the_data_holds_it(fmnist):
    "As fastai's predict: a raw item is scaled and normalised as the validation loader does its batches."
    dls = DataLoaders.from_tensors(fmnist.x_train[:256], fmnist.y_train[:256], fmnist.x_valid[:64],
                                   fmnist.y_valid[:64], bs=64, batch_tfms=[Normalize()], vocab=fmnist.classes,
                                   device='cpu', seed=0)
    torch.manual_seed(0)
    learn = Learner(dls, simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss())
    with learn.no_logging(): learn.fit(1, 1e-2)
    xb, _ = dls.valid.one_batch()
    with torch.no_grad(): expected = torch.softmax(learn.model.eval()(xb), 1)
    raw = dls.valid.dataset[0][0]
    assert raw.dtype == torch.uint8 and raw.shape == (1, 28, 28)
    learn.model.train()
    for item in (raw, raw[0], raw.float() / 255):  # uint8 (C, H, W) and (H, W), float in [0, 1]
        label, idx, probs = learn.predict(item)
        assert torch.allclose(probs, expected[0], atol=1e-5) and label == fmnist.classes[idx]
        assert learn.model.training  # predict evaluates in eval mode and restores the mode it found
    with pytest.raises(ValueError, match='looks normalised already'): learn.predict(xb[0])
    with pytest.raises(ValueError, match='one image'): learn.predict(xb)
    with pytest.raises(TypeError, match="path, a PIL image or an image tensor"): learn.predict([0.5] * 784)


def test_results_table_and_dataframe(fmnist, capsys):
    learn = small_learner(fmnist)
    learn.fit(2, 1e-3)
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.strip()]
    assert lines[0].split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert len(lines) == 3 and '\r' not in out                     # no tty: only the epoch lines
    df = learn.recorder.df
    assert list(df.columns) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert df.epoch.tolist() == [0, 1] and len(learn.recorder.values[0]) == 3
    assert len(learn.recorder.losses) == len(learn.recorder.lrs) == 4
    with learn.no_logging(): learn.fit(1, 1e-3)
    assert capsys.readouterr().out == ''


def test_plots_return_figures(fmnist):
    learn = small_learner(fmnist, n_train=640)
    with learn.no_bar(): learn.fit_one_cycle(2, 1e-2)
    for fig in (learn.recorder.plot_loss(), learn.recorder.plot_sched(), learn.recorder.plot_metrics()):
        assert fig.axes
    assert len(learn.recorder.plot_sched().axes) == 2


def test_simple_cnn_bn_one_cycle_reaches_80_percent_on_10k(fmnist):
    torch.manual_seed(0)
    learn = Learner(torch_dls(fmnist, 10_000, 2000, bs=64), simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(),
                    metrics=accuracy)
    with learn.no_bar(): learn.fit_one_cycle(1, 0.06)
    assert learn.recorder.values[-1][2] >= 0.80


def test_plain_loop_mechanics_sgd_and_frozen_params(fmnist):
    learn = small_learner(fmnist, opt_func=SGD)
    learn.model[0].weight.requires_grad_(False)
    frozen = learn.model[0].weight.detach().clone()
    with learn.no_bar(): learn.fit(1, 0.1)
    assert torch.equal(frozen, learn.model[0].weight)
    assert 'momentum' in learn.opt.param_groups[0]


class CountTraining(Callback):
    "Counts the aten ops of the training phase, every callback's share included."
    order = -1000
    def __init__(self, counter): self.counter = counter
    def before_train(self): self.counter.__enter__()
    def after_train(self): self.counter.__exit__(None, None, None)


def test_the_loop_adds_almost_no_ops_to_a_hand_written_loop(fmnist):
    """The Learner with its default callbacks, against the loop a user writes by hand with the same loader, model
    and optimizer: the Learner's own per-batch tensor work is two ops (the loss detached for callbacks, and the
    recorder's on-device running loss; bench/opcount.py counts +2.0 on simple_cnn), and the bound allows three.
    A callback that read a value back per batch, or did more per-batch tensor work, would show here, on any
    device."""
    learn = small_learner(fmnist, n_train=1024, metrics=None, device='cpu')
    learn.create_opt()
    def hand_loop():
        for xb, yb in learn.dls.train:
            loss = learn.loss_func(learn.model(xb), yb)
            loss.backward()
            learn.opt.step()
            learn.opt.zero_grad()
    hand_loop()  # untimed: the optimizer's first step creates its state (18 ops once), which fit then reuses
    hand = OpCounter()
    with hand: hand_loop()
    n_batches = len(learn.dls.train)
    loop = OpCounter()
    with learn.no_logging(): learn.fit(1, 0.01, cbs=CountTraining(loop))
    extra = (loop.n - hand.n) / n_batches
    assert 0 <= extra <= 3, f"the training loop adds {extra:.2f} ops per batch to a hand-written loop"
