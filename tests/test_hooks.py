"""Hooks, ActivationStats and GradientStats on real Fashion-MNIST slices: hooks never outlive a fit, the
records match statistics computed directly on the same activations, and the per-batch path never syncs."""
import gc
import math
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import normalized_slice, torch_dls
from learnkit import Callback, CancelFitException, CancelStepException, Learner
from learnkit.callbacks.activations import ActivationStats, activation_bounds
from learnkit.callbacks.gradients import GradientStats
from learnkit.data import DataLoaders
from learnkit.callbacks.hooks import (HookCallback, Hook, Hooks, default_modules, hook_output, hook_outputs,
                                     without_grad)
from learnkit.diagnostics import OpCounter
from learnkit.models import simple_cnn


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def make_learner(fmnist, cbs, model=None, n_train=640, bs=64, **kw):
    torch.manual_seed(0)
    return Learner(torch_dls(fmnist, n_train=n_train, n_valid=128, bs=bs), model or simple_cnn(),
                   loss_func=F.cross_entropy, cbs=cbs, device='cpu', **kw)


class Raise(Callback):
    "Raises `exc` in after_batch of training batch `at`."
    def __init__(self, exc, at=2): self.exc, self.at = exc, at
    def after_batch(self):
        if self.learn.training and self.learn.iter == self.at: raise self.exc


class Capture(Callback):
    "Keeps every training batch's outputs of `modules`, to check the statistics against."
    order = -30
    def __init__(self, modules): self.modules, self.outputs = modules, []
    def before_fit(self): self.hooks = hook_outputs(self.modules)
    def after_batch(self):
        if self.learn.training: self.outputs.append([o.clone() for o in self.hooks.stored])
    def cleanup_fit(self): self.hooks.remove()


# ---- Hook, Hooks, hook_outputs -----------------------------------------------------------------------------
def test_hook_stores_and_removes_itself(fmnist):
    x = normalized_slice(fmnist, 8, 1)[0]
    model = simple_cnn()
    with hook_output(model[1]) as h:
        model(x)
        assert h.stored.shape == (8, 16, 7, 7) and not h.stored.requires_grad
    assert h.removed and n_hooks(model) == 0
    h.remove()  # twice is harmless
    with Hooks(model[:3], lambda m, i, o: o.mean()) as hs:
        model(x)
        assert len(hs) == 3 and all(s.ndim == 0 for s in hs.stored)
    assert n_hooks(model) == 0


def test_hook_outputs_grad_stores_output_gradients(fmnist):
    x, y = normalized_slice(fmnist, 8, 1)[:2]
    model = simple_cnn()
    with hook_outputs([model[3][0], model[4][0]], grad=True) as hs:
        F.cross_entropy(model(x), y).backward()
        assert [g[0].shape for g in hs.stored] == [(8, 64, 2, 2), (8, 10, 1, 1)]
    with pytest.raises(TypeError, match='nn.Module'): Hook('not a module', print)


def test_without_grad_runs_fn_with_grad_mode_off_and_restores_it():
    w = torch.ones(3, requires_grad=True)
    out = without_grad(lambda x: (x * 2, torch.is_grad_enabled()), w)
    assert out[1] is False and not out[0].requires_grad and torch.is_grad_enabled()  # no graph; mode restored
    def boom(): raise KeyError('inside')
    with pytest.raises(KeyError): without_grad(boom)
    assert torch.is_grad_enabled()  # restored when fn raises too
    with torch.no_grad():
        without_grad(lambda: None)
        assert not torch.is_grad_enabled()  # restored to what it was, not switched on


def test_default_modules_are_layers_with_parameters():
    model = simple_cnn(bn=True)
    assert [type(m).__name__ for m in default_modules(model)] == ['Conv2d', 'BatchNorm2d'] * 5
    with_acts = default_modules(model, include_paramless=True)
    assert sum(isinstance(m, nn.ReLU) for m in with_acts) == 4 and isinstance(with_acts[-1], nn.Flatten)
    with pytest.raises(ValueError, match='include_paramless'): HookCallback(modules=[model[0]], include_paramless=True)
    with pytest.raises(ValueError, match='every'): HookCallback(every=0)


# ---- hooks never outlive a fit -------------------------------------------------------------------------------
@pytest.mark.parametrize('exc', [RuntimeError('boom'), KeyboardInterrupt()])
def test_hooks_removed_when_fit_raises(fmnist, exc):
    stats = ActivationStats(with_hist=True)
    learn = make_learner(fmnist, [stats, GradientStats(), Raise(exc)])
    with pytest.raises(type(exc)): learn.fit(1, 1e-3)
    assert n_hooks(learn.model) == 0 and stats.hooks is None
    assert len(stats.iters) == 3  # batches 0, 1, 2 were recorded before the error


def test_hooks_removed_after_cancel_and_never_doubled(fmnist):
    class CountCalls(HookCallback):
        def before_fit(self):
            super().before_fit()
            self.calls = 0
        def hook(self, m, i, o): self.calls += 1
    counter = CountCalls()
    learn = make_learner(fmnist, [counter, Raise(CancelFitException(), at=3)])
    learn.fit(1, 1e-3)
    assert n_hooks(learn.model) == 0 and counter.calls == 4 * 5  # 4 training batches x 5 conv layers
    learn.remove_cb(Raise)
    learn.fit(1, 1e-3)
    learn.fit(1, 1e-3)
    assert counter.calls == 10 * 5  # one call per layer per training batch: hooks were not doubled
    assert n_hooks(learn.model) == 0
    learn.validate()  # validation outside fit registers nothing
    assert n_hooks(learn.model) == 0


def test_every_records_every_nth_training_batch(fmnist):
    stats = ActivationStats(every=3)
    learn = make_learner(fmnist, stats)
    learn.fit(2, 1e-3)
    assert stats.iters == list(range(0, 20, 3))
    assert stats.stats['mean'].shape == (7, 5)


# ---- ActivationStats: what it records ----------------------------------------------------------------------
def standard_errors(o, k=2048):
    """The standard errors of the mean and of the std of `k` values drawn with replacement from `o`, as the
    ActivationStats docstring gives them: s / sqrt(k), and s * sqrt((kurtosis - 1) / (4k))."""
    x = o.double().flatten()
    s = x.std()
    kurtosis = ((x - x.mean()) ** 4).mean() / s ** 4
    return s / k ** 0.5, s * ((kurtosis - 1) / (4 * k)).sqrt()


@pytest.mark.parametrize('kw', [{'sample': None}, {'exact': True}], ids=['sample=None', 'exact'])
def test_activation_stats_match_direct_computation(fmnist, kw):
    """sample=None reads every element of every output; exact=True takes the mean and std of the larger outputs
    from every element too (near_zero and histograms still from the sample): equal to torch up to float rounding."""
    model = simple_cnn()
    convs = default_modules(model)
    capture = Capture(convs)
    stats = ActivationStats(with_hist=True, hist_range='symmetric', **kw)
    learn = make_learner(fmnist, [stats, capture], model=model)
    learn.fit(1, 0.01)
    s = stats.stats
    outs = capture.outputs
    assert s['mean'].shape == (10, 5) and s['hist'].shape == (10, 5, 40) and len(outs) == 10
    for b, batch in enumerate(outs):
        for i, o in enumerate(batch):
            assert s['mean'][b, i] == pytest.approx(o.double().mean().item(), rel=1e-5, abs=1e-7)
            assert s['std'][b, i] == pytest.approx(o.double().std().item(), rel=1e-5)
            if 'sample' not in kw: continue
            assert s['near_zero'][b, i] == pytest.approx((o <= 0.05).float().mean().item(), abs=1e-6)
            # Bins are computed in float64: histc in float32 would move values within rounding of an edge.
            assert torch.equal(s['hist'][b, i], torch.histc(o.double(), 40, -10, 10).float())
    df = stats.layer_stats(-2)
    assert list(df.columns) == ['mean', 'std', 'near_zero'] and df.index.name == 'batch'
    assert df['std'].tolist() == pytest.approx(s['std'][:, 3].tolist())
    assert s['saturated'].isnan().all() and stats.bounds == [None] * 5  # no bounded layer


def test_outputs_read_whole_keep_exact_moments_when_their_size_changes(fmnist):
    """The last conv's output (10 values per image) is read whole; a smaller batch in the middle of each epoch changes
    its size inside a block of staged batches, and back: every batch's mean and std stay those of its whole output,
    and near_zero its share."""
    class SmallBatch(Callback):  # training batch 4 of each epoch keeps 24 of its 64 images
        order = -40
        def before_batch(self):
            if self.learn.training and self.learn.iter == 4:
                self.learn.xb, self.learn.yb = (self.learn.xb[0][:24],), (self.learn.yb[0][:24],)
    model = simple_cnn()
    last = default_modules(model)[-1]
    capture = Capture([last])
    stats = ActivationStats(with_hist=True)
    make_learner(fmnist, [stats, capture, SmallBatch()], model=model).fit(2, 0.01)
    s = stats.stats
    outs = [batch[0] for batch in capture.outputs]
    assert [o.numel() for o in outs] == ([640] * 4 + [240] + [640] * 5) * 2 and len(s['mean']) == 20
    for b, o in enumerate(outs):
        assert s['mean'][b, -1] == pytest.approx(o.double().mean().item(), rel=1e-5, abs=1e-7)
        assert s['std'][b, -1] == pytest.approx(o.double().std().item(), rel=1e-5)
        assert s['near_zero'][b, -1] == pytest.approx((o <= 0.05).float().mean().item(), abs=1e-6)


class Offset(nn.Module):
    "Standardises its input, then adds `mean`: outputs of std 1 and mean `mean`."
    def __init__(self, mean): super().__init__(); self.mean = mean
    def forward(self, x): return self.mean + (x - x.mean()) / x.std()


@pytest.mark.parametrize('kw', [{'exact': True}, {'exact': True, 'batched': True}, {}],
                         ids=['exact', 'exact-batched', 'sampled'])
def test_std_within_documented_precision_when_mean_dwarfs_spread(fmnist, kw):
    """Outputs with mean 1e4 and std 1, where float32 sums of x and x^2 lose the std entirely: exact sums (of values
    minus a per-layer reference) keep it to 1e-4 and better, per layer and batched; from the sample (float64, two
    passes) it is exact for the 640-element output and within the documented standard error for the larger one."""
    mean = 1e4
    model = nn.Sequential(nn.Conv2d(1, 8, 5, 2, 2), Offset(mean), nn.Flatten(), nn.Linear(8 * 14 * 14, 10),
                          Offset(mean))
    stats = ActivationStats(modules=[model[1], model[4]], **kw)
    capture = Capture([model[1], model[4]])
    make_learner(fmnist, [stats, capture], model=model).fit(1, 1e-3)
    big = capture.outputs[0][0].flatten()
    assert big.numel() == 64 * 8 * 14 * 14 and capture.outputs[0][1].numel() == 640
    # What naive float32 sums would read: nothing of the std survives.
    n, total, squares = big.numel(), big.sum().double(), torch.dot(big, big).double()
    naive = ((squares - total * total / n) / (n - 1)).clamp(min=0).sqrt()
    assert abs(naive - 1) > 0.1
    for layer in range(2):
        outs = [o[layer] for o in capture.outputs]
        direct_std = torch.stack([o.double().std() for o in outs])
        direct_mean = torch.stack([o.double().mean() for o in outs])
        std, mean_read = stats.stats['std'][:, layer].double(), stats.stats['mean'][:, layer].double()
        if kw.get('exact') or layer == 1:  # every element summed, or the whole output is the sample
            assert torch.allclose(std, direct_std, rtol=1e-4)
            assert torch.allclose(mean_read, direct_mean, rtol=1e-7, atol=0)
        else:
            se_mean, se_std = zip(*(standard_errors(o) for o in outs))
            assert ((std - direct_std).abs() <= 4 * torch.stack(se_std)).all()
            assert ((mean_read - direct_mean).abs() <= 4 * torch.stack(se_mean)).all()


def test_sampled_statistics_keep_the_picture(fmnist):
    """By default every statistic of an output larger than the sample (2048) comes from the sample: the mean and
    std within the documented standard errors of the full output's, near_zero within its standard error, and
    histograms, scaled up, that match the full histograms. The 640-element output is read whole: exact."""
    model = simple_cnn()
    capture = Capture(default_modules(model))
    stats = ActivationStats(with_hist=True)  # sample=2048: layers 0-3 (100k, 50k, 32k, 16k elements) are sampled
    make_learner(fmnist, [stats, capture], model=model).fit(1, 0.01)
    s = stats.stats
    for layer in range(5):
        outs = [batch[layer] for batch in capture.outputs]
        direct_mean = torch.stack([o.double().mean() for o in outs])
        direct_std = torch.stack([o.double().std() for o in outs])
        mean_error, std_error = (s['mean'][:, layer] - direct_mean).abs(), (s['std'][:, layer] - direct_std).abs()
        if layer == 4:
            assert torch.allclose(s['mean'][:, 4].double(), direct_mean, rtol=1e-6, atol=1e-7)
            assert torch.allclose(s['std'][:, 4].double(), direct_std, rtol=1e-6)
            continue
        se_mean, se_std = (torch.stack(e) for e in zip(*(standard_errors(o) for o in outs)))
        assert (mean_error <= 4 * se_mean).all() and (std_error <= 4 * se_std).all()
        assert mean_error.max() > 0 and std_error.max() > 0  # they really are estimates
    sampled = s['hist']
    full = torch.stack([torch.stack([torch.histc(o.double(), 40, 0, 10) for o in batch]) for batch in capture.outputs])
    for layer in range(4):
        n = capture.outputs[0][layer].numel()
        h, f = sampled[:, layer].log1p(), full[:, layer].float().log1p()
        # As documented: a bin the sample sees m times is off by about 1/sqrt(m) in log1p units. Where m >= 100,
        # four standard errors is 0.4; over all bins the typical difference is small and the images correlate.
        dense = full[:, layer] * 2048 / n >= 100
        assert dense.sum() > 20
        assert (h[dense] - f[dense]).abs().max() < 0.4
        assert (h - f).abs().median() < 0.1
        assert torch.corrcoef(torch.stack([h.flatten(), f.flatten()]))[0, 1] > 0.97
    assert torch.equal(sampled[:, 4], full[:, 4].float())  # the last layer (640 elements) is histogrammed whole
    near = s['near_zero']
    direct = torch.tensor([[(o <= 0.05).double().mean().item() for o in batch] for batch in capture.outputs])
    se = (direct * (1 - direct) / 2048).sqrt()
    errors = (near.double() - direct).abs()
    assert (errors[:, :4] <= 4 * se[:, :4] + 1e-6).all()  # sampled layers: within 4 standard errors (<= 4.4 points)
    assert errors[:, :4].max() > 0  # ... and they really are estimates
    assert torch.equal(near[:, 4].double(), direct[:, 4].float().double())  # counted whole: exact


def test_reading_the_records_during_fit_changes_nothing(fmnist):
    """Batches are staged and finished a few at a time; reading `stats` in the middle of a batch (after the
    forward, before after_batch) finishes the whole batches only, and the records come out the same."""
    class ReadMidBatch(Callback):
        def after_loss(self):
            if self.training: self.seen.append(len(self.learn.activation_stats.stats.get('mean', [])))
    def run(*extra):
        torch.manual_seed(0)
        stats = ActivationStats(with_hist=True)
        make_learner(fmnist, [stats, *extra], model=simple_cnn()).fit(1, 0.01)
        return stats.stats
    reader = ReadMidBatch()
    reader.seen = []
    plain, read = run(), run(reader)
    assert reader.seen == list(range(10))  # every read saw exactly the batches finished before it
    for k in ('mean', 'std', 'near_zero', 'hist'):
        assert torch.equal(plain[k], read[k]), k


def test_sample_argument(fmnist):
    with pytest.raises(ValueError, match='sample must be a positive int or None'): ActivationStats(sample=0)
    with pytest.warns(FutureWarning, match='now `sample`'):
        renamed = ActivationStats(hist_sample=1024)  # the first release's name
    assert renamed.sample == 1024


@pytest.mark.parametrize('batched', [False, True])
def test_records_stay_on_device_and_never_read_back_per_batch(monkeypatch, fmnist, batched):
    """Drive ActivationStats (sampled with histograms, and exact with a saturating layer) and GradientStats through
    16 training batches with every host read disabled: the batches are staged, finished together at the 16th, and
    the references of the exact sums moved, all without reading anything back."""
    x, y = normalized_slice(fmnist, 256, 1)[:2]
    model = nn.Sequential(simple_cnn(), nn.Tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    learn = SimpleNamespace(model=model, training=True, train_iter=0, device=torch.device('cpu'))
    cbs = [ActivationStats(with_hist=True, batched=batched),
           ActivationStats(exact=True, include_saturating=True, batched=batched), GradientStats(dead_window=2)]
    for cb in cbs:
        cb.learn = learn
        cb.before_fit()
    def no_sync(*args, **kwargs): raise AssertionError("host read in the per-batch path")
    for name in ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__'):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    def fire(event):
        for cb in cbs:
            if hasattr(type(cb), event): getattr(cb, event)()
    for xb, yb in zip(x.split(16), y.split(16)):
        fire('before_batch')
        pred = model(xb)
        fire('after_pred')
        F.cross_entropy(pred, yb).backward()
        fire('before_step')
        opt.step()
        fire('after_step')
        opt.zero_grad()
        fire('after_batch')
        learn.train_iter += 1
    monkeypatch.undo()
    for cb in cbs[:2]:  # from the second batch on, read together after the forward
        assert (cb._batched_reads is not None) == batched and len(cb._records) == 16  # finished at the 16th batch
    for cb in cbs: cb.after_fit()
    assert n_hooks(model) == 0
    assert cbs[0].stats['mean'].shape == (16, 5) and cbs[1].stats['saturated'].shape == (16, 6)
    assert cbs[1].stats['saturated'][:, -1].isfinite().all() and cbs[1].stats['std'].isfinite().all()
    assert cbs[2].stats['grad_norm'].shape == (16, 5) and cbs[2].stats['dead'].shape == (8, 4)


def test_memory_grows_with_batches_layers_bins_not_activation_size(fmnist):
    small, big = ActivationStats(with_hist=True, bins=20), ActivationStats(with_hist=True, bins=20)
    make_learner(fmnist, small, model=simple_cnn()).fit(1, 1e-3)  # outputs of 640 to 100k elements
    wide = nn.Sequential(nn.Conv2d(1, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 10, 28), nn.Flatten())
    make_learner(fmnist, big, model=wide, n_train=128).fit(1, 1e-3)  # a 12.8M-element output
    assert small.device_records()['records'].shape == (10, 5, 6 + 20)  # batches x layers x (6 + bins)
    assert big.device_records()['records'].shape == (2, 2, 6 + 20)
    assert big._staged_samples is None  # the sample buffer is released when fit ends


# ---- ActivationStats: reading and plotting ---------------------------------------------------------------
def test_reading_api_with_negative_indices(fmnist):
    stats = ActivationStats(with_hist=True)
    learn = make_learner(fmnist, stats)
    with pytest.raises(ValueError, match='recorded nothing'): stats.layer_stats(0)
    learn.fit(1, 1e-3)
    assert stats.layer_stats(-2).equals(stats.layer_stats(3))
    assert stats.hist(-1).shape == (40, 10)
    assert torch.equal(stats.hist(-2), stats.stats['hist'][:, 3].t().log1p())
    with pytest.raises(IndexError, match=r'5 hooked layers \(valid: -5..4\)'): stats.layer_stats(5)
    with pytest.raises(TypeError, match='int'): stats.hist('conv')
    fig = stats.color_dim(-2)
    img = fig.axes[0].images[0]
    assert img.origin == 'lower' and img.get_array().shape == (40, 10)
    assert len(stats.plot_layer_stats(-2).axes) == 3
    assert sum(ax.get_visible() for ax in stats.plot_all().axes) == 5
    no_hist = ActivationStats()
    make_learner(fmnist, no_hist).fit(1, 1e-3)
    with pytest.raises(ValueError, match='with_hist=True'): no_hist.color_dim(0)


def test_include_paramless_records_relu_outputs(fmnist):
    stats = ActivationStats(include_paramless=True)
    make_learner(fmnist, stats).fit(1, 1e-3)
    relus = [i for i, n in enumerate(stats.layer_names) if n.endswith('ReLU')]
    assert len(relus) == 4
    assert (stats.stats['mean'][:, relus] >= 0).all()


# ---- ActivationStats: saturation of bounded activations ---------------------------------------------------
def tanh_mlp(gain):
    "Flatten, Linear(784, 64), Tanh, Linear(64, 10): with `gain` times the default init of the first Linear."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad(): model[1].weight.mul_(gain)
    return model


def saturated_share(o, lo=-1., hi=1.):
    "Measured directly: the share of `o` within 1% of the range (lo, hi) from a bound."
    margin = 0.01 * (hi - lo)
    return (((o - lo).abs() <= margin) | ((hi - o).abs() <= margin)).double().mean()


@pytest.mark.parametrize('gain', [30., 1.], ids=['huge-init', 'default-init'])
def test_saturation_of_a_tanh_network(fmnist, gain):
    """include_saturating=True hooks the Tanh too; its `saturated` share is measured on the sample (a 64 x 64 output
    is larger than 2048) within the standard error of the share a plain forward hook measures: most of the
    outputs with a huge init, about none with the default one. Layers that are not bounded read NaN."""
    model = tanh_mlp(gain)
    capture = Capture([model[2]])
    stats = ActivationStats(include_saturating=True)
    make_learner(fmnist, [stats, capture], model=model).fit(1, 1e-4)  # (Adam at 1e-3 saturates it within 10 batches)
    assert stats.layer_names == ['1 Linear', '2 Tanh', '3 Linear'] and stats.bounds == [None, (-1., 1.), None]
    s = stats.stats
    direct = torch.stack([saturated_share(batch[0]) for batch in capture.outputs])
    se = (direct * (1 - direct) / 2048).sqrt()
    assert ((s['saturated'][:, 1].double() - direct).abs() <= 4 * se + 1e-6).all()
    assert (direct > 0.5).all() if gain > 1 else (direct < 0.02).all()
    assert s['saturated'][:, [0, 2]].isnan().all() and s['bounds'] == stats.bounds
    assert list(stats.layer_stats(1).columns) == ['mean', 'std', 'near_zero', 'saturated']
    assert len(stats.plot_layer_stats(1).axes) == 4


def test_activation_bounds_and_the_saturating_option():
    assert activation_bounds(nn.Hardtanh(-2., 3.)) == (-2., 3.) and activation_bounds(nn.Sigmoid()) == (0., 1.)
    assert activation_bounds(nn.Hardsigmoid()) == (0., 1.) and activation_bounds(nn.Softsign()) == (-1., 1.)
    assert activation_bounds(nn.ReLU6()) is None and activation_bounds(nn.LogSigmoid()) is None  # see the docstring
    assert activation_bounds(nn.ReLU()) is None and activation_bounds(nn.Linear(2, 2)) is None
    # A model without bounded activations: include_saturating hooks the same layers, so it costs nothing more.
    model = simple_cnn(bn=True)
    with_option = ActivationStats(include_saturating=True).default_hooked_modules(model)
    assert with_option == ActivationStats().default_hooked_modules(model) == default_modules(model)
    with pytest.raises(ValueError, match='include_saturating'):
        ActivationStats(include_saturating=True, modules=[model[0]])
    with pytest.raises(ValueError, match='exact must be True'): ActivationStats(exact=1)


def test_checkpoint_state_round_trip(fmnist):
    """state_dict / load_state_dict of ActivationStats (with saturation and histograms) and GradientStats: a new
    callback reads the same statistics; records from an older learnkit are refused with what to do."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    acts, grads = ActivationStats(with_hist=True, include_saturating=True), GradientStats(dead_window=3)
    make_learner(fmnist, [acts, grads], model=model).fit(1, 1e-2)
    new_acts, new_grads = ActivationStats(with_hist=True, include_saturating=True), GradientStats(dead_window=3)
    new_acts.load_state_dict(acts.state_dict())
    new_grads.load_state_dict(grads.state_dict())
    for old, new in ((acts.stats, new_acts.stats), (grads.stats, new_grads.stats)):
        assert old.keys() == new.keys()
        for k, v in old.items():
            if isinstance(v, torch.Tensor): torch.testing.assert_close(v, new[k], rtol=0, atol=0, equal_nan=True)
            else: assert v == new[k], k
    assert new_acts.stats['saturated'][:, 1].isfinite().all() and len(new_grads.stats['dead']) == 4  # 3 + 3 + 3 + 1
    for cb, state in ((ActivationStats(), acts.state_dict()), (GradientStats(), grads.state_dict())):
        del state['version']  # as written before the records changed
        with pytest.raises(ValueError, match='older learnkit'): cb.load_state_dict(state)


# ---- GradientStats -------------------------------------------------------------------------------------------
def test_gradient_stats_match_direct_computation(fmnist):
    class Direct(Callback):
        order = 90
        def before_fit(self): self.norms, self.ratios = [], []
        def before_step(self):
            layers = default_modules(self.learn.model)
            self.norms.append([math.sqrt(sum(p.grad.norm().item() ** 2 for p in m.parameters())) for m in layers])
            self.before = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in layers]
        def after_step(self):
            after = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in default_modules(self.learn.model)]
            self.ratios.append([((b - a).norm() / b.norm()).item() for b, a in zip(self.before, after)])
    grads, direct = GradientStats(), Direct()
    make_learner(fmnist, [grads, direct]).fit(1, 0.01)
    s = grads.stats
    assert s['layer_names'] == [f'{i}.0 Conv2d' for i in range(5)]
    assert torch.allclose(s['grad_norm'], torch.tensor(direct.norms), rtol=1e-4)
    assert torch.allclose(s['update_ratio'], torch.tensor(direct.ratios), rtol=1e-3)
    figs = [grads.plot_grad_norms(), grads.plot_update_ratios(), grads.plot_dead_units(), grads.plot_all()]
    assert len(figs[-1].axes) == 3


def test_gradient_stats_leave_frozen_layers_out(fmnist):
    """A layer frozen before fit has no gradient to measure: GradientStats leaves it out (a norm of 0 would read as a
    vanishing gradient, and the report would call a deliberate freeze an error); only frozen layers are refused."""
    model = simple_cnn()
    model[1].requires_grad_(False)
    grads = GradientStats()
    make_learner(fmnist, grads, model=model).fit(1, 0.01)
    assert grads.layer_names == ['0.0 Conv2d', '2.0 Conv2d', '3.0 Conv2d', '4.0 Conv2d']
    assert (grads.stats['grad_norm'] > 0).all()
    learn = make_learner(fmnist, GradientStats(modules=[model[1]]), model=model)
    with pytest.raises(ValueError, match='no trainable parameters.*frozen.*unfreeze'): learn.fit(1, 0.01)
    assert not any(m._forward_hooks for m in model.modules())  # the failed fit left no hook behind


def test_dead_units_are_counted_per_window(fmnist):
    model = simple_cnn()
    with torch.no_grad(): model[3][0].bias.fill_(-100.)  # every unit of the 4th ReLU is dead from the start
    grads = GradientStats(dead_window=4)
    make_learner(fmnist, grads, model=model).fit(1, 1e-4)
    s = grads.stats
    assert s['dead_iters'].tolist() == [3, 7, 9] and s['relu_names'][3] == '3.1 ReLU'
    assert (s['dead'][:, 3] == 1).all() and (s['dead'][:, 0] < 0.5).all()


@pytest.mark.parametrize('variant', ['channels_last, two image sizes', 'bfloat16 autocast'])
def test_dead_units_match_plain_hooks(fmnist, variant):
    """Each window's dead fraction is what a plain forward hook reads (a channel is dead when its largest output over
    the window's training batches is <= 0): with channels_last outputs and the image size changing inside a window
    (two layouts summed into one window), and with bfloat16 outputs under autocast (the sums kept in bfloat16)."""
    from learnkit.callbacks.mixed_precision import MixedPrecision

    class Resize(Callback):  # every other training batch at 36 px
        order = -40
        def before_batch(self):
            if self.learn.training and self.learn.iter % 2: self.learn.xb = (F.interpolate(self.learn.xb[0], size=36),)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad(): model[0].bias[:3], model[2].bias[::2] = -50., -3.  # some dead, some half dead channels
    extra = [Resize()] if variant.startswith('channels_last') else [MixedPrecision(torch.bfloat16)]
    if variant.startswith('channels_last'): model = model.to(memory_format=torch.channels_last)
    maxima, windows, seen = {}, [], set()
    def direct(module, inp, out):
        if not module.training: return
        seen.add((out.dtype, out.is_contiguous(), out.shape[-1]))
        m = out.detach().float().amax((0, 2, 3))
        maxima[module] = torch.maximum(maxima[module], m) if module in maxima else m
    class CloseWindows(Callback):  # the plain reading's windows, of 4 training batches like GradientStats'
        order = 90
        def after_batch(self):
            if self.learn.training and (self.learn.iter % 4 == 3 or self.learn.iter == self.learn.n_iter - 1):
                windows.append([(maxima[r] <= 0).float().mean().item() for r in (model[1], model[3])])
                maxima.clear()
    handles = [model[i].register_forward_hook(direct) for i in (1, 3)]
    grads = GradientStats(dead_window=4)
    try: make_learner(fmnist, [grads, CloseWindows(), *extra], model=model).fit(1, 1e-3)
    finally:
        for h in handles: h.remove()
    if variant.startswith('channels_last'): assert {(s[1], s[2]) for s in seen} == {(False, 14), (False, 7), (False, 18), (False, 9)}
    else: assert {s[0] for s in seen} == {torch.bfloat16}
    dead = grads.stats['dead']
    assert dead.tolist() == windows and len(windows) == 3
    assert dead[:, 0].min() >= 3 / 8 and 0 < dead[:, 1].max() < 1  # the test's dead channels are there


def test_gradient_stats_skip_steps_another_callback_cancelled(fmnist):
    "A step skipped before GradientStats sees it (as MixedPrecision does on an fp16 overflow) is not recorded."
    class SkipOddSteps(Callback):
        order = 10
        def before_step(self):
            if self.learn.iter % 2: raise CancelStepException()
    grads = GradientStats()
    make_learner(fmnist, [grads, SkipOddSteps()]).fit(1, 0.01)
    s = grads.stats
    assert grads.iters == [0, 2, 4, 6, 8]
    assert torch.isfinite(s['update_ratio']).all() and (s['update_ratio'] > 0).all()


_PLAIN_OPS = {}  # ops of fits without statistics, by (bs, batches): the same for every case below


@pytest.mark.parametrize('batched,exact', [(False, False), (True, False), (False, True), (True, True)],
                         ids=['per-layer', 'batched', 'per-layer-exact', 'batched-exact'])
def test_activation_stats_adds_a_fixed_few_ops_per_layer_whatever_the_activation_size(fmnist, batched, exact):
    """ActivationStats' cost per training batch in aten ops (each a kernel launch on a GPU), the same at bs 32 and
    at bs 128, whose activations are 4x larger. Per layer (the CPU's default): two per hooked layer (a view and the
    sample), and with exact=True three more for each output larger than the sample (a shift and two dots; simple_cnn
    has four, the fifth has 640 elements). Batched (CUDA's default): a view per layer and two kernels for all of
    them, six with exact=True. All plus the staged finish, shared by 16 batches. Counted as the difference between
    fits of 32 and 16 batches (one staged round), so that the one-off set-up (buffers, sample positions, the first
    batch read per layer) drops out."""
    def ops(bs, n_batches, cbs):
        learn = make_learner(fmnist, cbs, n_train=n_batches * bs, bs=bs)
        with OpCounter() as counter: learn.fit(1, 0.01)
        return counter.n
    for bs in (32, 128):
        stats = [ActivationStats(with_hist=True, batched=batched, exact=exact) for _ in range(2)]
        with_stats = ops(bs, 32, stats[:1]) - ops(bs, 16, stats[1:])
        for n in (32, 16):
            if (bs, n) not in _PLAIN_OPS: _PLAIN_OPS[bs, n] = ops(bs, n, [])
        extra, n_layers = (with_stats - (_PLAIN_OPS[bs, 32] - _PLAIN_OPS[bs, 16])) / 16, len(stats[0].layer_names)
        assert n_layers == 5
        per_batch = n_layers + (6 if exact else 2) if batched else 2 * n_layers + (3 * 4 if exact else 0)
        finish = 8 if exact else 5  # the staged finish's few dozen ops, over 16 batches
        assert per_batch <= extra <= per_batch + finish, f"bs {bs}: {extra:.2f} ops per batch for {n_layers} layers"


def _stats_of(fmnist, model_fn, n_train=1000, **kw):
    "ActivationStats(with_hist=True, **kw) of one epoch of `model_fn()`, with a smaller last batch."
    kw.setdefault('with_hist', True)
    torch.manual_seed(0)
    x, y, xv, yv = normalized_slice(fmnist, n_train, 64)
    g = torch.Generator().manual_seed(0)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), 64, shuffle=True, generator=g),
                      DataLoader(TensorDataset(xv, yv), 64))
    stats = ActivationStats(**kw)
    Learner(dls, model_fn(), loss_func=F.cross_entropy, cbs=[stats], device='cpu').fit(1, 0.01)
    return stats.stats


def assert_same_records(a, b, layers=slice(None)):
    # float32 sums in another order: the std of a 400k-element output moved by up to 2e-4 (relative) in our runs
    for k in ('mean', 'std'): torch.testing.assert_close(a[k][:, layers], b[k][:, layers], rtol=1e-3, atol=1e-5)
    for k in ('near_zero', 'hist'):
        if k in a: assert torch.equal(a[k][:, layers], b[k][:, layers]), k


def test_batched_reads_record_what_per_layer_reads_record(fmnist):
    """Reading every layer together after the forward pass (CUDA's default, forced here) gives the per-layer
    records: the same samples, so the same near_zero and histograms, and the same sums up to rounding; also
    for the smaller last batch (1000 = 15 x 64 + 40)."""
    model_fn = lambda: simple_cnn(bn=True)
    per_layer, batched = _stats_of(fmnist, model_fn, batched=False), _stats_of(fmnist, model_fn, batched=True)
    assert per_layer['mean'].shape == (16, 10)
    assert_same_records(per_layer, batched)


@pytest.mark.parametrize('kw', [{'every': 3}, {'sample': None}, {'with_hist': False}],
                         ids=['every=3', 'sample=None', 'no-hist'])
def test_batched_reads_with_other_options(fmnist, kw):
    "every=3 records every third batch either way; sample=None falls back to per-layer reads; no-hist works."
    model_fn = lambda: simple_cnn(bn=True)
    per_layer = _stats_of(fmnist, model_fn, n_train=600, batched=False, **kw)
    batched = _stats_of(fmnist, model_fn, n_train=600, batched=True, **kw)
    assert torch.equal(per_layer['iters'], batched['iters'])
    assert_same_records(per_layer, batched)


class SometimesInPlace(nn.Module):
    "ReLU, in place from training batch `start` on (the batched reads must notice and give up on that layer)."
    def __init__(self, start=None): super().__init__(); self.start, self.calls = start, 0
    def forward(self, x):
        self.calls += self.training
        in_place = self.start is not None and self.calls > self.start
        return x.relu_() if in_place else x.relu()


def test_batched_reads_see_outputs_before_any_in_place_change(fmnist):
    """A conv whose output a later op changes in place (ReLU(inplace=True), as in torchvision's ResNets) is read in
    its hook, before the change: the first batch shows which outputs are changed, and those layers are never
    batched. One found changed only later (batch 5 here) is reported, recorded as missing for that batch, and read
    in its hook from then on; the other layers stay batched and unaffected."""
    def model_fn(relu):
        return lambda: nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), relu(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    always = model_fn(lambda: nn.ReLU(inplace=True))
    assert_same_records(_stats_of(fmnist, always, batched=False), _stats_of(fmnist, always, batched=True))
    later = model_fn(lambda: SometimesInPlace(start=5))
    per_layer = _stats_of(fmnist, later, batched=False)
    with pytest.warns(RuntimeWarning, match=r"output of 0 Conv2d was changed in place .* in training batch 5"):
        batched = _stats_of(fmnist, later, batched=True)
    assert batched['mean'][5, 0].isnan() and batched['near_zero'][5, 0].isnan()
    assert not batched['mean'][5, 1:].isnan().any()
    keep = torch.arange(len(per_layer['mean'])) != 5
    assert_same_records({k: v[keep] for k, v in per_layer.items() if k in ('mean', 'std', 'near_zero', 'hist')},
                        {k: v[keep] for k, v in batched.items() if k in ('mean', 'std', 'near_zero', 'hist')})


def test_batched_reads_on_a_resnet_with_in_place_relus_and_sums(fmnist):
    """torchvision's ResNet changes BN outputs in place (ReLU(inplace=True), `out += identity`): those layers
    are read in their hooks, the rest together, and the records are the same as per layer."""
    import torchvision

    def model_fn():
        net = torchvision.models.resnet18(num_classes=10)
        net.conv1, net.maxpool = nn.Conv2d(1, 64, 3, 1, 1, bias=False), nn.Identity()  # 28-px grayscale input
        return net

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # all in-place changes are found on the first batch: no warning
        per_layer = _stats_of(fmnist, model_fn, n_train=160, batched=False)
        batched = _stats_of(fmnist, model_fn, n_train=160, batched=True)
    assert per_layer['mean'].shape == (3, 41)
    assert_same_records(per_layer, batched)


def test_batched_reads_keep_no_activation_after_the_forward_pass(fmnist):
    "Batched reads hold each output from its hook to the end of the forward pass only: nothing survives fit."
    outputs = []
    model = simple_cnn()
    model[-2].register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    make_learner(fmnist, [ActivationStats(with_hist=True, batched=True)], model=model, n_train=256).fit(1, 0.01)
    gc.collect()
    assert len(outputs) == 4 + 1 and all(ref() is None for ref in outputs)  # 4 training batches, 1 validation


def test_batched_argument():
    with pytest.raises(ValueError, match='batched must be None'): ActivationStats(batched='yes')


def test_gradient_stats_adds_a_fixed_few_ops_per_step(fmnist):
    """GradientStats' cost per training step in aten ops: its fused multi-tensor ops cover every layer at once,
    so the count does not grow with the layers; two per ReLU per batch track dead units. The same at bs 32 and
    bs 128 (counted as in the ActivationStats test above)."""
    def ops(bs, n_batches, cbs):
        torch.manual_seed(0)
        learn = make_learner(fmnist, cbs, model=simple_cnn(bn=True), n_train=n_batches * bs, bs=bs)
        with OpCounter() as counter: learn.fit(1, 0.01)
        return counter.n
    for bs in (32, 128):
        stats = [GradientStats() for _ in range(2)]
        extra = ((ops(bs, 64, stats[:1]) - ops(bs, 32, stats[1:])) - (ops(bs, 64, []) - ops(bs, 32, []))) / 32
        n_layers, n_relus = len(stats[0].layer_names), len(stats[0].relu_names)
        assert (n_layers, n_relus) == (10, 4)
        assert extra <= 21 + 2 * n_relus, f"bs {bs}: {extra:.2f} ops per step"
