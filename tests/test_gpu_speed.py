"""GPU speed features as a user meets them: mixed precision, channels_last, compile, fused Adam, no host syncs.

The CPU tests run everywhere (CI has no GPU). The tests marked `cuda` need a GPU and are skipped without one.
"""
from functools import partial

import pytest
import torch
from torch import nn

from conftest import tiny_cnn, torch_dls
from learnkit import SGD, Adam, Callback, Learner, OptimWrapper, accuracy
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.gradients import GradientStats
from learnkit.callbacks.hooks import Hook
from learnkit.callbacks.mixed_precision import MixedPrecision
from learnkit.data import DataLoaders, Normalize
from learnkit.diagnostics import health_cbs
from learnkit.graph_mode import GraphMode
from learnkit.models import simple_cnn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def learner(fmnist, n_train=320, n_valid=128, bs=64, model=None, **kw):
    return Learner(torch_dls(fmnist, n_train, n_valid, bs), model or tiny_cnn(), loss_func=nn.CrossEntropyLoss(),
                   metrics=accuracy, **kw)


def quiet_fit(learn, *args, fit='fit_one_cycle', **kwargs):
    with learn.no_bar(), learn.no_logging(): getattr(learn, fit)(*args, **kwargs)


class StepLog(Callback):
    "Counts the optimizer steps taken and cancelled in a fit."
    def before_fit(self): self.taken, self.cancelled = 0, 0
    def after_cancel_step(self): self.cancelled += 1
    def after_step(self): self.taken += 1


# ---- mixed precision ----------------------------------------------------------------------------------------------
class CapturePredDtype(Callback):
    "Records the dtype of the predictions the loss sees."
    order = 20  # after MixedPrecision (10), which casts predictions back to float32

    def __init__(self, seen): self.seen = seen
    def after_pred(self): self.seen.append(self.learn.pred.dtype)


def test_bf16_reaches_the_fp32_accuracy_within_2_points(fmnist):
    accs = {}
    for precision in ('fp32', 'bf16'):
        torch.manual_seed(0)
        learn = learner(fmnist, 2000, 1000, model=simple_cnn(bn=True))
        if precision == 'bf16': learn.to_bf16()
        quiet_fit(learn, 1, 1e-2)
        accs[precision] = learn.recorder.values[-1][2]
    assert accs['fp32'] > 0.7, "the fp32 reference did not train"
    assert abs(accs['bf16'] - accs['fp32']) <= 0.02, accs


def test_bf16_runs_the_layers_in_bf16_and_hands_float32_predictions_on(fmnist):
    learn = learner(fmnist, 128, 64).to_bf16()
    seen = []
    with Hook(learn.model[0], lambda m, i, o: o.dtype) as hook:
        quiet_fit(learn, 1, 1e-3, fit='fit', cbs=CapturePredDtype(seen))
        assert hook.stored == torch.bfloat16
    assert set(seen) == {torch.float32}
    preds, _ = learn.get_preds()
    assert preds.dtype == torch.float32


def test_fp16_overflow_skips_the_step_raises_cancel_step_and_counts_it(fmnist):
    torch.manual_seed(0)
    # A scale of 2**40 makes every float16 gradient overflow for the first several steps: all 5 are skipped.
    learn = learner(fmnist, 320, 64).to_fp16(init_scale=2.**40)
    before = [p.detach().clone() for p in learn.model.parameters()]
    log = StepLog()
    quiet_fit(learn, 1, 1e-3, fit='fit', cbs=log)
    mp = learn.mixed_precision
    assert mp.skipped_steps == log.cancelled == 5 and log.taken == 5
    assert mp.loss_scale == 2.**35  # halved at every skipped step
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_fp16_with_a_fused_optimizer_skips_on_the_device_and_counts(fmnist):
    torch.manual_seed(0)
    learn = learner(fmnist, 320, 64, opt_func=partial(Adam, fused=True)).to_fp16(init_scale=2.**40)
    before = [p.detach().clone() for p in learn.model.parameters()]
    log = StepLog()
    quiet_fit(learn, 1, 1e-3, fit='fit', cbs=log)
    # The fused kernel skips the update itself, so nothing is cancelled on the host; the count is on the device.
    assert learn.mixed_precision.skipped_steps == 5 and log.cancelled == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


@pytest.mark.parametrize('fused', [False, True])
def test_fp16_trains_once_the_scale_has_come_down(fmnist, fused):
    torch.manual_seed(0)
    learn = learner(fmnist, 640, 128, opt_func=partial(Adam, fused=fused)).to_fp16(init_scale=2.**22)
    before = [p.detach().clone() for p in learn.model.parameters()]
    log = StepLog()
    quiet_fit(learn, 1, 1e-2, fit='fit', cbs=log)
    skipped = learn.mixed_precision.skipped_steps
    assert 1 <= skipped < 10, skipped
    assert log.cancelled == (0 if fused else skipped)
    assert not any(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    assert all(torch.isfinite(torch.tensor(v)) for v in learn.recorder.values[-1])


def test_fp16_gradients_are_unscaled_before_other_callbacks_read_them(fmnist):
    "Gradient statistics and clipping must see true gradients, not gradients times the loss scale."
    norms = {}

    class GradNorm(Callback):
        order = 20
        def after_backward(self): self.norm = torch.linalg.vector_norm(self.learn.model[-1].weight.grad)

    for precision in ('fp32', 'fp16'):
        torch.manual_seed(0)
        learn = learner(fmnist, 64, 64)
        if precision == 'fp16': learn.to_fp16(init_scale=2.**10)
        cb = GradNorm()
        quiet_fit(learn, 1, 1e-3, fit='fit', cbs=cb)
        norms[precision] = cb.norm.item()
    assert norms['fp16'] == pytest.approx(norms['fp32'], rel=0.05)


def test_precision_shortcuts_replace_each_other(fmnist):
    learn = learner(fmnist, 64, 64)
    learn.to_fp16().to_bf16()
    assert [type(c) for c in learn.cbs].count(MixedPrecision) == 1 and learn.mixed_precision.dtype == torch.bfloat16
    learn.to_fp32()
    assert not any(isinstance(c, MixedPrecision) for c in learn.cbs)


def test_mixed_precision_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match='bfloat16 or torch.float16'): MixedPrecision(torch.float32)
    with pytest.raises(ValueError, match='float16 only'): MixedPrecision(torch.bfloat16, init_scale=1024.)


# ---- fused optimizers ---------------------------------------------------------------------------------------------
def test_fused_adam_takes_the_same_steps_as_the_default_one():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    models = [tiny_cnn(), tiny_cnn()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [Adam(list(models[0].parameters()), lr=1e-2), Adam(list(models[1].parameters()), lr=1e-2, fused=True)]
    assert opts[1].opt.defaults['fused'] is True and not opts[0].opt.defaults['fused']
    for _ in range(5):
        for model, opt in zip(models, opts):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step(); opt.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert SGD(list(models[0].parameters()), fused=True).opt.defaults['fused'] is True


def test_fused_is_refused_by_an_optimizer_without_a_fused_kernel():
    with pytest.raises(TypeError, match='RMSprop has no fused'):
        OptimWrapper(list(tiny_cnn().parameters()), torch.optim.RMSprop, fused=True, lr=1e-3)


# ---- channels_last and compile -------------------------------------------------------------------------------------
def test_channels_last_gives_the_same_predictions(fmnist):
    torch.manual_seed(0)
    trained = learner(fmnist, 320, 256, model=simple_cnn(bn=True))
    quiet_fit(trained, 1, 1e-2)
    preds, _ = trained.get_preds()
    model = simple_cnn(bn=True)
    model.load_state_dict(trained.model.state_dict())
    learn = learner(fmnist, 320, 256, model=model, channels_last=True)
    preds_cl, _ = learn.get_preds()
    conv = learn.model[1][0].weight  # 16x8x3x3: its layout shows which format the model is in
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(preds_cl, preds, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_gives_the_same_predictions_and_hooks_added_later_still_run(fmnist):
    torch.manual_seed(0)
    learn = learner(fmnist, 64, 256, bs=128)  # validation: one batch of 256, so one compiled graph
    eager, _ = learn.get_preds()
    learn.compile(dynamic=False)
    compiled, _ = learn.get_preds()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    # A hook registered after the model was compiled must run (torch skips hook guards unless told not to)...
    x = learn.dls.valid.dataset.tensors[0]
    with Hook(learn.model[0], lambda m, i, o: o.sum()) as hook:
        learn.get_preds()
        torch.testing.assert_close(hook.stored, learn.model[0](x).sum(), rtol=1e-4, atol=1e-3)
    # ...and a removed one must not.
    hook.stored = None
    learn.get_preds()
    assert hook.stored is None


# ---- on a GPU: no host sync inside an epoch ------------------------------------------------------------------------
class SyncCheck(Callback):
    """Turns CUDA's sync detector to 'error' from the first batch of each phase to the phase's end: every batch
    (the loader's next(), the callbacks, forward, backward, step) must then run without a host sync. The epoch-end
    read of the results, and each loader's one-off start of epoch, fall outside."""
    order = -100

    def before_batch(self): torch.cuda.set_sync_debug_mode('error')
    def after_train(self): torch.cuda.set_sync_debug_mode(0)
    def after_validate(self): torch.cuda.set_sync_debug_mode(0)
    def cleanup_fit(self): torch.cuda.set_sync_debug_mode(0)


def cuda_learner(fmnist, n=4096, bs=256, **kw):
    dls = DataLoaders.from_tensors(fmnist.x_train[:n], fmnist.y_train[:n], fmnist.x_valid[:1000],
                                   fmnist.y_valid[:1000], bs=bs, batch_tfms=[Normalize()], device='cuda', seed=0)
    return Learner(dls, simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, device='cuda', **kw)


@cuda
@pytest.mark.parametrize('setup', ['fp32', 'bf16+channels_last', 'fp16+fused'])
def test_a_fit_with_stats_callbacks_never_syncs_inside_a_batch(fmnist, setup):
    torch.manual_seed(0)
    learn = cuda_learner(fmnist, channels_last='channels_last' in setup,
                         opt_func=partial(Adam, fused=True) if 'fused' in setup else Adam)
    if 'bf16' in setup: learn.to_bf16()
    if 'fp16' in setup: learn.to_fp16()
    acts, grads = ActivationStats(with_hist=True), GradientStats()
    with learn.no_bar(): learn.fit_one_cycle(2, 1e-2, cbs=[SyncCheck(), acts, grads])
    assert learn.dls.train.source.x.is_cuda, "the uint8 cache should live on the GPU"
    assert learn.recorder.values[-1][2] > 0.5
    assert acts.stats['mean'].isfinite().all() and grads.stats['grad_norm'].isfinite().all()


@cuda
def test_the_sync_check_catches_a_per_batch_read(fmnist):
    class ReadsLoss(Callback):
        def after_batch(self): self.learn.loss.item()

    learn = cuda_learner(fmnist, n=1024)
    with pytest.raises(RuntimeError, match='synchroniz'), learn.no_bar(): learn.fit(1, 1e-3, cbs=[SyncCheck(), ReadsLoss()])


@cuda
def test_compiled_model_records_activation_stats_on_cuda(fmnist):
    torch.manual_seed(0)
    learn = cuda_learner(fmnist).compile()
    acts = ActivationStats()
    with learn.no_bar(): learn.fit_one_cycle(1, 1e-2, cbs=acts)
    assert len(acts.stats['mean']) == len(learn.dls.train) and acts.stats['mean'].isfinite().all()
    assert learn.recorder.values[-1][2] > 0.5


@cuda
@pytest.mark.parametrize('setup', ['fp32', 'bf16+channels_last'])
def test_batched_reads_on_cuda_record_what_per_layer_reads_record(fmnist, setup):
    """CUDA reads the hooked outputs together after the forward pass (and under bf16 autocast, which must not
    lower the precision of its sums); the records equal those read per layer. lr=0 keeps the weights, so both
    runs see the same activations whatever cuDNN's backward does."""
    class ReadTogether(Callback):
        order = 100
        def after_batch(self):
            if self.training: self.seen.append(self.learn.activation_stats._batched_reads is not None)

    stats = {}
    for batched in (None, False):  # None: CUDA's default, batched
        torch.manual_seed(0)
        learn = cuda_learner(fmnist, n=2048, channels_last='channels_last' in setup)
        if 'bf16' in setup: learn.to_bf16()
        acts, mode = ActivationStats(with_hist=True, batched=batched), ReadTogether()
        mode.seen = []
        with learn.no_bar(): learn.fit(1, 0., cbs=[acts, mode])
        assert mode.seen == [batched is None] * 8 and len(acts.stats['mean']) == 8
        stats[batched] = acts.stats
    for k in ('mean', 'std'): torch.testing.assert_close(stats[None][k], stats[False][k], rtol=1e-3, atol=1e-5)
    for k in ('near_zero', 'hist'): assert torch.equal(stats[None][k], stats[False][k]), k


@cuda
def test_a_fit_with_the_health_report_callbacks_never_syncs_inside_a_batch(fmnist):
    "Issue 19: health_cbs() with the progress bar off; the monitor checks at epoch ends only (check_every=None)."
    torch.manual_seed(0)
    learn = cuda_learner(fmnist)
    cbs = health_cbs(check_every=None, show=False)
    with learn.no_bar(): learn.fit_one_cycle(2, 1e-2, cbs=[SyncCheck(), *cbs])
    assert learn.recorder.values[-1][2] > 0.5
    acts = next(cb for cb in cbs if isinstance(cb, ActivationStats))
    assert acts.stats['mean'].isfinite().all()


# ---- graph mode on a GPU: captured once, replayed per batch ---------------------------------------------------------
class TrainingSyncCheck(Callback):
    """CUDA's sync detector at 'error' through every training phase after the first (whose first step warms up and
    captures the graph) and through the validation batches. Graph-safe: in graph mode its before_batch runs for
    validation batches only."""
    order, graph_safe = -100, True

    def before_train(self):
        if self.learn.epoch > 0: torch.cuda.set_sync_debug_mode('error')
    def before_batch(self): torch.cuda.set_sync_debug_mode('error')
    def after_train(self): torch.cuda.set_sync_debug_mode(0)
    def after_validate(self): torch.cuda.set_sync_debug_mode(0)
    def cleanup_fit(self): torch.cuda.set_sync_debug_mode(0)


@cuda
def test_graph_mode_replays_without_a_sync_and_ends_at_the_eager_accuracy(fmnist):
    accs = {}
    for graph in (False, True):
        torch.manual_seed(0)
        learn = cuda_learner(fmnist, n=8192)
        with learn.no_bar(): learn.fit_one_cycle(3, 1e-2, graph=graph, cbs=TrainingSyncCheck() if graph else None)
        accs[graph] = learn.recorder.values[-1][2]
        assert len(learn.recorder.losses) == 3 * len(learn.dls.train)
        assert all(isinstance(h['lr'], float) for h in learn.opt.hypers)
    assert accs[False] > 0.75, accs
    assert abs(accs[True] - accs[False]) <= 0.02, accs


@cuda
def test_the_captured_step_trains_as_the_same_step_run_eagerly_and_as_fit(fmnist):
    """GraphMode(capture=False) runs the very step the graph captures, eagerly: after an epoch of 1cycle the weights
    and the recorded losses agree closely (deterministic cuDNN). The ordinary loop (torch's fused Adam) agrees too."""
    runs = {}
    for name, cbs in (('eager step', GraphMode(capture=False)), ('captured', GraphMode(capture=True)), ('fit', None)):
        torch.manual_seed(0)
        learn = cuda_learner(fmnist, n=2048)
        with learn.no_bar(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            learn.fit_one_cycle(1, 1e-2, cbs=cbs)
        runs[name] = ([p.detach().clone() for p in learn.model.parameters()], torch.tensor(learn.recorder.losses))
    for a, b in zip(runs['captured'][0], runs['eager step'][0]): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs['captured'][1], runs['eager step'][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs['captured'][0], runs['fit'][0]): torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@cuda
def test_captured_statistics_callbacks_record_what_the_same_step_run_eagerly_records(fmnist):
    """The statistics callbacks inside the captured step: their hooks ran once, at capture, so every per-batch choice
    (the staging row, the sample positions, the dead-unit window) must come from the device. Replayed, they record
    what the same step run eagerly records (GraphMode(capture=False), where the Python runs at every step), without a
    sync inside the training phase."""
    from learnkit.callbacks.stats import StatsCallback, read_records
    records = {}
    for capture in (False, True):
        torch.manual_seed(0)
        learn = cuda_learner(fmnist, n=2048, cbs=health_cbs(check_every=None, grad_every=2))
        with learn.no_bar(), learn.no_logging(), torch.backends.cudnn.flags(enabled=True, benchmark=False,
                                                                             deterministic=True):
            learn.fit(2, 1e-3, cbs=[GraphMode(capture=capture)] + ([TrainingSyncCheck()] if capture else []))
        stats = [cb for cb in learn.cbs if isinstance(cb, StatsCallback)]
        records[capture] = ([getattr(cb, 'iters', None) for cb in stats], read_records(stats))
        assert learn.activation_stats.iters == list(range(16)), "every step of both epochs"
    assert records[True][0] == records[False][0]
    for got, want in zip(records[True][1], records[False][1]):
        assert got.keys() == want.keys()
        for key in want: torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-3, equal_nan=True)
