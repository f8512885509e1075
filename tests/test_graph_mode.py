"""Graph mode on the CPU: the same static-buffer step the GPU captures, run eagerly, must train exactly as `fit` does.

The CUDA tests (capture, replay, no sync, accuracy) are in test_gpu_speed.py.
"""
import warnings

import pytest
import torch
from torch import nn

from conftest import torch_dls
from learnkit import SGD, Callback, Learner, accuracy
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.gradients import GradientStats
from learnkit.callbacks.inputs import InputStats
from learnkit.callbacks.monitor import health_cbs
from learnkit.callbacks.outputs import OutputStats
from learnkit.callbacks.stats import StatsCallback, read_records
from learnkit.callbacks.weights import WeightStats
from learnkit.data import DataLoaders, Normalize, TfmdDL
from learnkit.data.sources import TensorSource
from learnkit.models import simple_cnn


def cached_dls(fm, n_train=320, n_valid=64, bs=64, drop_last=True):
    "learnkit loaders over a uint8 cache on the CPU: graph mode gathers their batches inside its step."
    norm = Normalize.from_stats(0.286, 0.353)
    train = TfmdDL(TensorSource(fm.x_train[:n_train], fm.y_train[:n_train]), bs, shuffle=True, drop_last=drop_last,
                   seed=0, batch_tfms=[norm])
    valid = TfmdDL(TensorSource(fm.x_valid[:n_valid], fm.y_valid[:n_valid]), bs * 2, batch_tfms=[norm])
    return DataLoaders(train, valid)


def trained(dls, fit='fit_one_cycle', n_epoch=2, lr=1e-2, graph=False, cbs=None, learn=None, **kw):
    if learn is None:
        torch.manual_seed(0)
        learn = Learner(dls, simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, device='cpu', **kw)
    with learn.no_bar(), learn.no_logging(): getattr(learn, fit)(n_epoch, lr, cbs=cbs, graph=graph)
    return learn


def assert_same_training(graph, eager):
    "Weights, BatchNorm statistics, optimizer state, and what the Recorder shows."
    for (name, g), e in zip(graph.model.state_dict().items(), eager.model.state_dict().values()):
        if g.is_floating_point(): torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=name)
        else: assert torch.equal(g, e), name
    for p, q in zip(graph.model.parameters(), eager.model.parameters()):
        got, want = graph.opt.opt.state[p], eager.opt.opt.state[q]
        assert got['step'].device == want['step'].device and got['step'] == want['step']
        torch.testing.assert_close(got['exp_avg_sq'], want['exp_avg_sq'], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(torch.tensor(graph.recorder.losses), torch.tensor(eager.recorder.losses), rtol=1e-5,
                               atol=0)
    assert graph.recorder.lrs == pytest.approx(eager.recorder.lrs, rel=1e-12)
    assert graph.recorder.moms == pytest.approx(eager.recorder.moms, rel=1e-12)
    for got, want in zip(graph.recorder.values, eager.recorder.values): assert got[:2] == pytest.approx(want[:2], rel=1e-5)
    assert [h['lr'] for h in graph.opt.hypers] == pytest.approx([h['lr'] for h in eager.opt.hypers], rel=1e-12)
    assert all(isinstance(v, float) for h in graph.opt.hypers for v in h.values()), "plain numbers after the fit"
    assert (graph.train_iter, graph.iter) == (eager.train_iter, eager.iter)


def test_graph_mode_trains_1cycle_as_fit_one_cycle_does(fmnist):
    "Batches gathered from the loader's cache inside the step, lr and mom from device tables by a device counter."
    eager = trained(cached_dls(fmnist))
    graph = trained(cached_dls(fmnist), graph=True)
    assert_same_training(graph, eager)
    assert graph.recorder.values[-1][2] == eager.recorder.values[-1][2]  # the same validation accuracy
    assert graph.recorder.moms[0] != graph.recorder.moms[-1], "the momentum was scheduled too"


def test_graph_mode_copies_batches_of_plain_torch_loaders_and_carries_on_from_an_eager_fit(fmnist):
    """Plain torch loaders: each batch is copied into static buffers. The optimizer state carries over both ways.
    channels_last: the step converts its static input as the Learner converts its batches."""
    eager = trained(torch_dls(fmnist, 320, 64), fit='fit', n_epoch=1, lr=1e-3, channels_last=True)
    trained(None, fit='fit', n_epoch=1, lr=1e-3, learn=eager)
    graph = trained(torch_dls(fmnist, 320, 64), fit='fit', n_epoch=1, lr=1e-3, channels_last=True)
    trained(None, fit='fit', n_epoch=1, lr=1e-3, learn=graph, graph=True)
    assert_same_training(graph, eager)


def test_a_last_partial_batch_is_dropped_with_a_warning(fmnist):
    "330 items at bs 64: graph mode trains on the 5 full batches of each epoch, as drop_last=True does."
    eager = trained(cached_dls(fmnist, n_train=330, drop_last=True), fit='fit', n_epoch=2, lr=1e-3)
    with pytest.warns(UserWarning, match=r'dropped 2 training batch.*drop_last=True'):
        graph = trained(cached_dls(fmnist, n_train=330, drop_last=False), fit='fit', n_epoch=2, lr=1e-3, graph=True)
    for g, e in zip(graph.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert len(graph.recorder.losses) == 10


class CountsBatches(Callback):
    "Host work at every batch, without declaring itself graph-safe."
    def after_batch(self): pass


class CountsEpochs(Callback):
    "Epoch-level work only: graph mode runs it as it is."
    def before_fit(self): self.n = 0
    def after_epoch(self): self.n += 1


def test_callbacks_with_per_batch_host_work_are_refused_by_name_and_the_learner_stays_usable(fmnist):
    torch.manual_seed(0)
    learn = Learner(torch_dls(fmnist, 128, 64), simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                    device='cpu')
    acts, epochs = ActivationStats(), CountsEpochs()
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match=r'cannot run CountsBatches \(learn.counts_batches: after_batch\): .*'
                                         r'graph_safe.*without graph=True') as refused:
        trained(None, learn=learn, cbs=[acts, CountsBatches(), epochs], graph=True)
    assert 'ActivationStats' not in str(refused.value), "a graph-safe callback is not named"
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters())), "no step was taken"
    assert acts.hooks is None and learn.opt.opt.state == {}
    with pytest.raises(ValueError, match=r'cannot run ActivationStats\(exact=True\).*exact=False'):
        trained(None, learn=learn, cbs=[acts := ActivationStats(exact=True)], graph=True)
    assert acts.hooks is None and learn.opt.opt.state == {}
    trained(None, learn=learn, cbs=[acts, epochs], fit='fit', n_epoch=1)  # an ordinary fit still works
    trained(None, learn=learn, cbs=epochs, graph=True)                    # epoch-level callbacks run in graph mode
    assert epochs.n == 2


def test_graph_mode_refuses_what_it_cannot_capture(fmnist):
    sgd = Learner(torch_dls(fmnist, 128, 64), simple_cnn(), loss_func=nn.CrossEntropyLoss(), opt_func=SGD, device='cpu')
    with pytest.raises(ValueError, match='Adam and AdamW.*SGD'): trained(None, learn=sgd, graph=True)
    bf16 = Learner(torch_dls(fmnist, 128, 64), simple_cnn(), loss_func=nn.CrossEntropyLoss(), device='cpu').to_bf16()
    with pytest.raises(ValueError, match=r'cannot run MixedPrecision'): trained(None, learn=bf16, graph=True)
    with pytest.raises(TypeError, match='True or False'): trained(None, learn=bf16, graph='yes')


def small_dls(fm): return cached_dls(fm, n_valid=32)  # 5 training steps an epoch


def assert_same_records(graph_cbs, eager_cbs):
    "Every statistics callback's raw records and the training batches they belong to, graph mode against eager."
    for got, want in zip(graph_cbs, eager_cbs):
        name = type(got).__name__
        for attr in ('iters', 'probe_iters', 'dead_iters'):
            assert getattr(got, attr, None) == getattr(want, attr, None), f"{name}.{attr}"
        (got_raw,), (want_raw,) = read_records([got]), read_records([want])
        assert got_raw.keys() == want_raw.keys(), name
        for key, w in want_raw.items():
            # The ReLU window sums add thousands of outputs: float32 rounding in another order.
            torch.testing.assert_close(got_raw[key], w, rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"{name} {key}")


def statistics_cbs():
    """Every recorder with `every` where it has one; GradientStats' dead-unit windows of 2 recorded steps (0 and 2,
    4 and 6: the second spans the two epochs of 5 steps, 8 alone: closed at the end of the fit)."""
    return [InputStats(every=3), OutputStats(probe_batches=2), ActivationStats(with_hist=True, every=2),
            GradientStats(every=2, dead_window=2), WeightStats()]


def test_statistics_callbacks_record_in_graph_mode_what_an_ordinary_fit_records(fmnist):
    """The hooks and step methods write at device-side rows inside the step; the epoch's recorded rows are finished
    at its end: the same rows (samples at the same positions, histograms, windows) for the same batches."""
    eager = trained(small_dls(fmnist), fit='fit', lr=1e-2, cbs=(eager_cbs := statistics_cbs()))
    graph = trained(small_dls(fmnist), fit='fit', lr=1e-2, cbs=(graph_cbs := statistics_cbs()), graph=True)
    assert_same_training(graph, eager)
    assert_same_records(graph_cbs, eager_cbs)
    acts, grads = graph_cbs[2], graph_cbs[3]
    assert acts.iters == [0, 2, 4, 6, 8] and graph_cbs[0].iters == [0, 3, 6, 9] and grads.dead_iters == [2, 6, 8]
    assert acts.stats['hist'].sum() > 0 and torch.isfinite(acts.stats['std']).all()
    assert graph_cbs[1].probe_iters == [0, 1, 5, 6]


def test_health_callbacks_in_graph_mode_give_the_same_diagnosis(fmnist):
    "`Learner(..., cbs=health_cbs())` fits with graph=True; HealthMonitor warns that it checks at epoch ends only."
    def learner():
        torch.manual_seed(0)
        return Learner(small_dls(fmnist), simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                       device='cpu', cbs=health_cbs(grad_every=2))
    eager = trained(None, learn=learner(), fit='fit', lr=1e-3)
    with pytest.warns(UserWarning, match=r'HealthMonitor\(check_every=200\).*end of each epoch only'):
        graph = trained(None, learn=learner(), fit='fit', lr=1e-3, graph=True)
    assert_same_training(graph, eager)
    assert_same_records([cb for cb in graph.cbs if isinstance(cb, StatsCallback)],
                        [cb for cb in eager.cbs if isinstance(cb, StatsCallback)])
    got, want = graph.diagnose(show=False), eager.diagnose(show=False)
    assert want.findings and not want.skipped, "a run with findings, every check run"
    assert [(f.key, f.severity, f.batches) for f in got.findings] == [(f.key, f.severity, f.batches)
                                                                       for f in want.findings]
    assert [f.value for f in got.findings] == pytest.approx([f.value for f in want.findings], rel=1e-3)
    assert graph.health_monitor.report is not None, "checked at the epoch ends"
