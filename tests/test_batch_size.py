"""Batch-size callbacks as a user meets them: the gradient noise scale against brute force, gradient
accumulation against the big batch, and batch-size schedules on real Fashion-MNIST slices."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from conftest import normalized_slice, torch_dls
from learnkit import SGD, Callback, Learner, accuracy
from learnkit.callbacks.batch_size import (BatchSizeScheduler, GradientAccumulation, GradientNoiseScale,
                                           noise_scale_estimate)
from learnkit.callbacks.mixed_precision import MixedPrecision
from learnkit.callbacks.schedule import combined_cos
from learnkit.data import DataLoaders, Normalize


def mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def fixed_batch_learner(fmnist, n, bs, cbs, n_epoch=1, seed=1):
    """Measure on the same `n` images, reshuffled each epoch, with lr=0 so the model never moves: every
    measurement estimates the noise scale of one model on one fixed set."""
    x, y, _, _ = normalized_slice(fmnist, n, 1)
    dl = DataLoader(TensorDataset(x, y), bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    learn = Learner(DataLoaders(dl, None), mlp(), loss_func=nn.CrossEntropyLoss(), opt_func=SGD, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, 0.)
    return learn


def brute_force_noise_scale(model, x, y):
    """Unbiased |G|^2 and tr(Sigma) from every per-example gradient: S = sum|g_i - g|^2 / (n-1), |G|^2 = |g|^2 - S/n."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_func = nn.CrossEntropyLoss()
    def example_loss(p, xi, yi): return loss_func(functional_call(model, p, (xi[None],)), yi[None])
    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.flatten(1) for v in per_example.values()], 1).double()
    n, mean = len(g), g.mean(0)
    trace = (g - mean).square().sum() / (n - 1)
    return (mean.square().sum() - trace / n).item(), trace.item()


def test_noise_scale_with_one_example_micro_batches_is_the_per_example_formula(fmnist):
    # Micro-batches of one example over the whole set: the two-size estimator then IS the per-example formula.
    n = 128
    learn = fixed_batch_learner(fmnist, n, n, GradientNoiseScale(n_micro=n, every=1))
    g2, trace = brute_force_noise_scale(learn.model, *normalized_slice(fmnist, n, 1)[:2])
    row = learn.gradient_noise_scale.noise_scale.iloc[-1]
    assert row.grad_sq == pytest.approx(g2, rel=1e-4)
    assert row.trace == pytest.approx(trace, rel=1e-4)


def test_noise_scale_from_micro_batches_agrees_with_brute_force(fmnist):
    # 8 micro-batches of 32 per batch of 256, over 20 reshufflings: within 10% of the per-example truth
    # (the estimator is unbiased; the EMA over 20 partitions leaves a few % of noise).
    n = 256
    gns = GradientNoiseScale(n_micro=8, every=1, beta=0.9)
    learn = fixed_batch_learner(fmnist, n, n, gns, n_epoch=20)
    g2, trace = brute_force_noise_scale(learn.model, *normalized_slice(fmnist, n, 1)[:2])
    row = gns.noise_scale.iloc[-1]
    assert row.grad_sq_ema == pytest.approx(g2, rel=0.1)
    assert row.trace_ema == pytest.approx(trace, rel=0.1)
    assert gns.critical_batch_size() == pytest.approx(trace / g2, rel=0.1)
    # Its state for a checkpoint: a new GradientNoiseScale reads the same measurements and goes on with the EMAs.
    restored = GradientNoiseScale(n_micro=8, every=1, beta=0.9)
    restored.load_state_dict(gns.state_dict())
    assert restored.noise_scale.equals(gns.noise_scale) and restored.epoch_columns() == gns.epoch_columns()
    assert list(gns.stats) == ['grad_sq', 'trace', 'grad_sq_ema', 'trace_ema', 'noise_scale', 'iter', 'epoch', 'bs']


def test_accumulated_batches_give_the_same_estimate_as_split_batches(fmnist):
    # With the same data order, 8 accumulated batches of 32 are exactly the 8 chunks of a batch of 256.
    split = fixed_batch_learner(fmnist, 256, 256, GradientNoiseScale(n_micro=8, every=1), n_epoch=3)
    accumulated = fixed_batch_learner(fmnist, 256, 32, [GradientAccumulation(256), GradientNoiseScale()], n_epoch=3)
    a, b = split.gradient_noise_scale.noise_scale, accumulated.gradient_noise_scale.noise_scale
    assert len(a) == len(b) == 3 and list(b.bs) == [256] * 3
    for col in ('grad_sq', 'trace', 'noise_scale'):
        assert b[col].tolist() == pytest.approx(a[col].tolist(), rel=1e-4)


def test_noise_scale_grows_as_training_lowers_the_loss(fmnist):
    # McCandlish et al.'s qualitative finding: the gradient's signal shrinks faster than its noise as the
    # loss falls, so B_simple rises (here from ~50 at init to 100-200 after three epochs).
    torch.manual_seed(0)
    dls = DataLoaders.from_tensors(fmnist.x_train[:4096], fmnist.y_train[:4096], fmnist.x_valid[:500],
                                   fmnist.y_valid[:500], bs=128, batch_tfms=Normalize(), device='cpu')
    gns = GradientNoiseScale(n_micro=8, every=1)
    learn = Learner(dls, mlp(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=gns)
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 3e-3)
    df = gns.noise_scale
    start, end = df.iloc[:8], df[df.epoch == 2]
    losses = learn.recorder.losses
    assert losses[-1] < losses[7] / 2
    assert end.trace.mean() / end.grad_sq.mean() > 1.5 * start.trace.mean() / start.grad_sq.mean()
    assert list(learn.recorder.df.noise_scale) == pytest.approx(list(df.groupby('epoch').noise_scale.last()), rel=1e-4)
    assert gns.plot().axes[0].get_yscale() == 'log'
    b_noise = gns.critical_batch_size()
    tradeoff = gns.tradeoff([round(b_noise), 8 * round(b_noise)])
    assert list(tradeoff.steps) == pytest.approx([2, 1.125], rel=0.02)   # at B_noise: twice the minimum steps...
    assert list(tradeoff.samples) == pytest.approx([2, 9], rel=0.02)     # ...and twice the minimum samples


def test_noise_scale_measures_every_n_batches_without_changing_training(fmnist):
    def train(cbs):
        learn = Learner(torch_dls(fmnist, 640, 64, bs=64), mlp(), loss_func=nn.CrossEntropyLoss(), cbs=cbs)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
        return learn
    plain, measured = train(None), train(GradientNoiseScale(every=3))
    assert list(measured.gradient_noise_scale.noise_scale.iter) == [0, 3, 6, 9]
    for p, q in zip(plain.model.parameters(), measured.model.parameters()): assert torch.equal(p, q)


def test_noise_scale_estimate_inverts_the_expected_norms():
    # E|G_b|^2 = |G|^2 + tr(Sigma)/b: feed the expectations for |G|^2=2, tr(Sigma)=300 at b=16 and B=128.
    g2, trace = noise_scale_estimate(2 + 300 / 16, 2 + 300 / 128, 1 / 16, 1 / 128)
    assert (g2, trace) == pytest.approx((2, 300))
    with pytest.raises(ValueError, match='smaller than the big one'): noise_scale_estimate(1., 1., 1 / 8, 1 / 8)


def test_noise_scale_errors_name_the_fix(fmnist):
    def fit(loss_func, cbs, bs=64):
        learn = Learner(torch_dls(fmnist, 256, 64, bs=bs), mlp(), loss_func=loss_func, cbs=cbs)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    with pytest.raises(ValueError, match='mean-reduced'):
        fit(nn.CrossEntropyLoss(reduction='sum'), GradientNoiseScale())
    with pytest.raises(ValueError, match='raise n_acc above the batch size'):
        fit(nn.CrossEntropyLoss(), [GradientAccumulation(64), GradientNoiseScale()])
    with pytest.raises(ValueError, match='leave n_micro=None'):
        fit(nn.CrossEntropyLoss(), [GradientAccumulation(128), GradientNoiseScale(n_micro=4)])
    with pytest.raises(ValueError, match='int >= 2'): GradientNoiseScale(n_micro=1)
    with pytest.raises(RuntimeError, match='no measurement yet'): GradientNoiseScale().critical_batch_size()


# ---- GradientAccumulation ------------------------------------------------------------------------------------

def one_epoch_of_sgd(x, y, bs, cbs=None):
    learn = Learner(DataLoaders(DataLoader(TensorDataset(x, y), bs), None), mlp(), loss_func=nn.CrossEntropyLoss(),
                    opt_func=SGD, cbs=cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.5)
    return learn


@pytest.mark.parametrize('n,bs,n_acc', [(64, 16, 64), (60, 20, 50)], ids=['exact', 'overshoot'])
def test_accumulation_steps_like_the_big_batch(fmnist, n, bs, n_acc):
    # 'overshoot': batches of 20 reach n_acc=50 only at 60 samples; the step uses the mean over all 60.
    x, y, _, _ = normalized_slice(fmnist, n, 1)
    big = one_epoch_of_sgd(x, y, bs=n)
    acc = one_epoch_of_sgd(x, y, bs=bs, cbs=GradientAccumulation(n_acc))
    assert acc.gradient_accumulation.step_samples == n
    start = mlp()
    for p0, p, q in zip(start.parameters(), big.model.parameters(), acc.model.parameters()):
        assert not torch.equal(p, p0)                       # the step happened...
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)  # ...and equals the big batch's, to float32 rounding


def test_accumulation_skips_steps_between_and_records_unweighted_losses(fmnist):
    class Steps(Callback):
        def before_fit(self): self.n = 0
        def after_step(self): self.n += 1
    learn = Learner(torch_dls(fmnist, 512, 64, bs=32), mlp(), loss_func=nn.CrossEntropyLoss(),
                    cbs=[GradientAccumulation(128), Steps()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.steps.n == 512 // 128
    assert 1.5 < learn.recorder.losses[0] < 3   # ~ln(10): the loss as computed, not weighted by 32/128
    with pytest.raises(ValueError, match='positive int'): GradientAccumulation(0)
    learn.add_cb(MixedPrecision(torch.float16))
    with pytest.raises(ValueError, match='bfloat16'): learn.fit(1, 1e-3)


# ---- BatchSizeScheduler --------------------------------------------------------------------------------------

class BatchSizes(Callback):
    "The number of items in every training batch the loop sees, per epoch."
    run_valid = False
    def before_fit(self): self.per_epoch = []
    def before_train(self): self.per_epoch.append([])
    def after_batch(self): self.per_epoch[-1].append(len(self.learn.yb[0]))


def scheduled_learner(fmnist, sched, n=320, bs=32):
    x, y, xv, yv = normalized_slice(fmnist, n, 64)
    dls = DataLoaders.from_tensors(x, y, xv, yv, bs=bs, device='cpu')
    return Learner(dls, mlp(), loss_func=nn.CrossEntropyLoss(), cbs=[sched, BatchSizes()])


def test_batch_size_schedule_changes_the_batches_the_loop_sees(fmnist):
    learn = scheduled_learner(fmnist, BatchSizeScheduler({1: 64, 2: 160}))
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3)
    assert learn.batch_sizes.per_epoch == [[32] * 10, [64] * 5, [160] * 2]
    assert list(learn.recorder.df.bs) == [32, 64, 160]
    assert learn.dls.train.bs == 32                              # put back after fit
    learn.batch_size_scheduler.schedule = lambda epoch: 32 * 2 ** epoch
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    assert learn.batch_sizes.per_epoch == [[32] * 10, [64] * 5]


def test_keep_lr_ratio_scales_constant_and_one_cycle_lrs(fmnist):
    learn = scheduled_learner(fmnist, BatchSizeScheduler({1: 64}, keep_lr_ratio=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
    assert learn.recorder.lrs == pytest.approx([1e-3] * 10 + [2e-3] * 5)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    one_cycle = combined_cos(0.25, 1e-2 / 25, 1e-2, 1e-2 / 1e5)
    pcts = [i / 20 for i in range(10)] + [0.5 + i / 10 for i in range(5)]
    expected = [one_cycle(p) * (1 if p < 0.5 else 2) for p in pcts]
    assert learn.recorder.lrs == pytest.approx(expected)


def test_batch_size_schedule_refuses_plain_torch_loaders(fmnist):
    learn = Learner(torch_dls(fmnist, 256, 64), mlp(), loss_func=nn.CrossEntropyLoss(),
                    cbs=BatchSizeScheduler({1: 128}))
    with pytest.raises(TypeError, match=r'fixes its batch size.*DataLoaders\.from_tensors'):
        with learn.no_bar(): learn.fit(2, 1e-3)
    with pytest.raises(ValueError, match=r"not: \{1: 0\}"): BatchSizeScheduler({1: 0})
    learn = scheduled_learner(fmnist, BatchSizeScheduler(lambda epoch: 0.5))
    with pytest.raises(ValueError, match=r'schedule\(0\) returned 0.5'):
        with learn.no_bar(): learn.fit(1, 1e-3)


# ---- no host sync in the batch path (CUDA only: the sync detector is a CUDA feature) ------------------------

class NoSyncInTraining(Callback):
    "Turns torch's sync detector to 'error' from the first training batch (the loader's cache is placed by then)."
    order, run_valid = 1000, False
    def before_batch(self): torch.cuda.set_sync_debug_mode('error')
    def after_train(self): torch.cuda.set_sync_debug_mode(0)
    def cleanup_fit(self): torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('cbs', [lambda: [GradientNoiseScale(every=1, n_micro=4)],
                                 lambda: [GradientAccumulation(256), GradientNoiseScale()],
                                 lambda: [BatchSizeScheduler({1: 128}, keep_lr_ratio=True)]],
                         ids=['split', 'accumulate', 'schedule'])
def test_no_host_sync_while_training_on_cuda(fmnist, cbs):
    dls = DataLoaders.from_tensors(fmnist.x_train[:2048], fmnist.y_train[:2048], fmnist.x_valid[:256],
                                   fmnist.y_valid[:256], bs=64, batch_tfms=[Normalize()], device='cuda')
    learn = Learner(dls, mlp(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=cbs() + [NoSyncInTraining()])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    if hasattr(learn, 'gradient_noise_scale'): assert learn.gradient_noise_scale.critical_batch_size() > 0
