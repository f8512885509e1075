"""The recorders behind the health report (InputStats, OutputStats, WeightStats), checked against what the test
measures itself on the same batches, and HealthMonitor stopping a doomed fit early."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import normalized_slice, torch_dls
from learnkit import Callback, Learner, accuracy
from learnkit.callbacks.inputs import InputStats
from learnkit.callbacks.outputs import OutputStats
from learnkit.callbacks.stats import StatsCallback, read_records
from learnkit.callbacks.weights import WeightStats
from learnkit.data import DataLoaders, Normalize
from learnkit.diagnostics import HealthMonitor, health_cbs
from learnkit.diagnostics.findings import SEVERITIES
from learnkit.models import simple_cnn


class KeepBatches(Callback):
    "Keeps a copy of every training batch's inputs and targets, as the model received them."
    order = -100
    def before_fit(self): self.xs, self.ys = [], []
    def before_batch(self):
        if self.learn.training: self.xs.append(self.learn.xb[0].clone()); self.ys.append(self.learn.yb[0].clone())


def fit(dls, model=None, cbs=(), n_epoch=1, lr=1e-3, **kw):
    torch.manual_seed(0)
    learn = Learner(dls, model or simple_cnn(bn=True), loss_func=F.cross_entropy, metrics=accuracy, device='cpu',
                    cbs=list(cbs) + [KeepBatches()], **kw)
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, lr)
    return learn


def test_input_stats_are_those_of_the_batches(fmnist):
    x = fmnist.x_train[:640].float().div(255).unsqueeze(1)  # [0, 1] pixels: about half are exactly 0
    x[200, 0, 5, 5] = float('nan')  # in batch 3 (items 192-255; no shuffle)
    dls = DataLoaders(DataLoader(TensorDataset(x, fmnist.y_train[:640]), 64), DataLoader(TensorDataset(x[:64], fmnist.y_train[:64]), 64))
    learn = fit(dls, cbs=[InputStats()])
    s, xs = learn.input_stats.stats, learn.keep_batches.xs
    assert s['iters'].tolist() == list(range(10)) and len(xs) == 10
    for b, xb in enumerate(xs):
        if b == 3:  # NaN anywhere in the batch shows in its min and max, whatever the sample holds
            assert torch.isnan(s['min'][b]) and torch.isnan(s['max'][b])
            continue
        assert s['min'][b] == xb.min() and s['max'][b] == xb.max()
        # mean, std and zeros come from a 1024-value sample: within 4 standard errors of the whole batch's.
        std, zeros = xb.std().item(), (xb == 0).float().mean().item()
        assert s['mean'][b].item() == pytest.approx(xb.mean().item(), abs=4 * std / 1024 ** 0.5)
        assert s['std'][b].item() == pytest.approx(std, rel=4 / (2 * 1024) ** 0.5)
        assert s['zeros'][b].item() == pytest.approx(zeros, abs=4 * (zeros * (1 - zeros) / 1024) ** 0.5)


def test_input_stats_leave_integer_inputs_alone_and_say_why(fmnist):
    class Embed(nn.Module):
        def __init__(self): super().__init__(); self.emb, self.out = nn.Embedding(256, 4), nn.Linear(4, 10)
        def forward(self, x): return self.out(self.emb(x).mean(1))
    tokens = fmnist.x_train[:128].reshape(128, -1)[:, 200:216].long()
    dls = DataLoaders(DataLoader(TensorDataset(tokens, fmnist.y_train[:128]), 32),
                      DataLoader(TensorDataset(tokens, fmnist.y_train[:128]), 64))
    learn = fit(dls, model=Embed(), cbs=[InputStats()])
    assert learn.input_stats.kind == 'the input is torch.int64, not a floating-point tensor'
    report = learn.diagnose(show=False)
    assert report.skipped['inputs'] == 'InputStats recorded nothing: the input is torch.int64, not a floating-point tensor'


def test_output_stats_count_labels_predictions_and_correct_answers(fmnist):
    dls = torch_dls(fmnist, n_train=640, n_valid=256)
    learn = fit(dls, cbs=[OutputStats()], n_epoch=2)
    s = learn.output_stats.stats
    ys = torch.cat(learn.keep_batches.ys)
    per_epoch = ys.view(2, -1)  # the training labels each epoch saw, in order
    for e in range(2): assert s['train_labels'][e].tolist() == torch.bincount(per_epoch[e], minlength=10).tolist()
    preds, targs = learn.get_preds()  # the weights of the last epoch's validation
    assert s['predicted'][-1].tolist() == torch.bincount(preds.argmax(1), minlength=10).tolist()
    assert s['targets'][-1].tolist() == torch.bincount(targs, minlength=10).tolist()
    assert s['correct'][-1].item() == (preds.argmax(1) == targs).sum().item()
    assert s['correct'][-1].item() / 256 == pytest.approx(learn.recorder.values[-1][2])
    # Two probed training batches per epoch: logits, neither probabilities nor log-probabilities.
    assert s['probe_iters'].tolist() == [0, 1, 10, 11]
    assert (s['probe_min'] < 0).all() and (s['probe_row_sum_error'] > 0.1).all() and s['expects'] == 'logits'


def test_output_stats_see_a_softmax_before_the_loss(fmnist):
    model = nn.Sequential(simple_cnn(bn=True), nn.Softmax(dim=1))
    learn = fit(torch_dls(fmnist, n_train=256, n_valid=128), model=model, cbs=[OutputStats()])
    s = learn.output_stats.stats
    assert (s['probe_min'] >= 0).all() and (s['probe_row_sum_error'] < 1e-5).all()
    found, = learn.diagnose(show=False).by_check('probabilities_into_loss')
    assert found.severity == 'error' and 'remove the final softmax' in found.advice


def test_weight_stats_tell_frozen_unoptimised_and_identical_layers_apart(fmnist):
    torch.manual_seed(0)
    frozen, orphan, same, head = nn.Linear(784, 64), nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 10)
    for p in frozen.parameters(): p.requires_grad_(False)
    for layer in (same, head):  # a constant init from `same` on: its units get the same gradient and stay copies
        nn.init.constant_(layer.weight, 0.05); nn.init.zeros_(layer.bias)
    model = nn.Sequential(nn.Flatten(), frozen, nn.ReLU(), orphan, nn.ReLU(), same, nn.ReLU(), head)
    # The splitter leaves `orphan` out of the optimizer; its .grad is never zeroed.
    splitter = lambda m: [p for p in m.parameters() if all(p is not q for q in orphan.parameters())]
    learn = fit(torch_dls(fmnist, n_train=640, n_valid=128), model=model, cbs=[WeightStats()], n_epoch=2, lr=1e-2,
                splitter=splitter)
    s = learn.weight_stats.stats
    assert s['layer_names'] == ['1 Linear', '3 Linear', '5 Linear', '7 Linear']
    assert s['trainable'].tolist() == [0., 1., 1., 1.] and s['in_optimizer'].tolist() == [1., 0., 1., 1.]
    assert s['changed'][-1].tolist() == [False, False, True, True]
    grad = [g.item() for g in s['orphan_grad'][:, 1]]  # piles up: measured directly, it is the .grad now
    assert grad[0] == 0 and grad[1] < grad[2] and grad[2] == pytest.approx(orphan.weight.grad.norm().item() * (
        1 + (orphan.bias.grad.norm() / orphan.weight.grad.norm()).item() ** 2) ** 0.5, rel=1e-4)
    rows = same.weight.detach()
    assert s['spread'][-1, 2].item() == pytest.approx(((rows - rows[0]).abs().max() / rows.abs().max()).item(), abs=1e-7)
    assert s['spread'][-1, 2] < 1e-6 and s['spread'][-1, 3] > 0.01  # still identical units; the classes' rows are not
    report = learn.diagnose(show=False)
    unchanged = {f.layer: f for f in report.by_check('unchanged_layers')}
    assert unchanged['1 Linear'].severity == 'warning' and 'requires_grad=False' in unchanged['1 Linear'].message
    assert unchanged['3 Linear'].severity == 'error' and 'never zeroed' in unchanged['3 Linear'].message
    assert [f.layer for f in report.by_check('symmetric_units')] == ['5 Linear']


def identical(a, b):
    "Equal values, NaN where the other has NaN."
    return a.shape == b.shape and torch.equal(a.nan_to_num(123.), b.nan_to_num(123.))


def test_recorders_follow_the_protocol_and_survive_a_checkpoint(fmnist):
    cbs = [InputStats(), OutputStats(), WeightStats()]
    learn = fit(torch_dls(fmnist, n_train=320, n_valid=128), cbs=cbs)
    assert all(isinstance(cb, StatsCallback) and cb.record_schema for cb in cbs)
    raws = read_records(cbs)  # all three in one transfer, the same as each one's own read
    for cb, raw in zip(cbs, raws):
        mine = cb.stats
        for k, v in cb.summarize(raw).items():
            if isinstance(v, torch.Tensor): assert identical(v, mine[k]), k
    for cb in cbs:
        fresh = type(cb)()
        fresh.load_state_dict(cb.state_dict())
        for k, v in cb.stats.items():
            if isinstance(v, torch.Tensor): assert identical(v, fresh.stats[k]), (type(cb).__name__, k)


@pytest.fixture(scope='module')
def chapter_dls(fmnist):
    return DataLoaders.from_tensors(fmnist.x_train[:2000], fmnist.y_train[:2000], fmnist.x_valid[:500],
                                    fmnist.y_valid[:500], bs=64, batch_tfms=[Normalize()], vocab=fmnist.classes,
                                    seed=0, device='cpu')


def test_health_monitor_stops_the_chapters_collapsing_run_before_its_epoch_ends(chapter_dls, capsys):
    torch.manual_seed(0)
    learn = Learner(chapter_dls, simple_cnn(bn=False), loss_func=F.cross_entropy, metrics=accuracy, device='cpu',
                    cbs=health_cbs(check_every=5, stop_on='error', max_share=None))
    torch.set_flush_denormal(True)  # a collapsed network is all subnormals, ~10x slower on the CPU
    try:
        with learn.no_bar(): learn.fit(1, 0.06)
    finally: torch.set_flush_denormal(False)
    monitor = learn.health_monitor
    assert monitor.stopped_by.check == 'activation_collapse' and monitor.stopped_by.severity == 'error'
    assert learn.train_iter < len(chapter_dls.train) == 31  # stopped before the epoch's end
    # Confirmed with a plain hook: the collapsed layer outputs (almost) nothing above 0.05 after its ReLU.
    layer = dict(learn.model.named_modules())[monitor.stopped_by.layer.split()[0]]
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append((o.relu() <= 0.05).float().mean().item()))
    with torch.no_grad(): learn.model(chapter_dls.one_batch()[0])
    handle.remove()
    assert seen[0] > 0.95
    out = capsys.readouterr().out
    assert 'ERROR activation_collapse' in out and 'HealthMonitor: stopping the fit' in out
    # Nothing is left behind: no hooks, the learner trains again.
    assert not any(m._forward_hooks for m in learn.model.modules())
    learn.fit(1, 1e-4)


def test_a_growth_collapse_cycle_that_leaves_a_layer_dead_heads_an_error_and_stops_the_fit(fmnist, capsys):
    """The chapter's step 2 (bs 512, lr 0.06, no batchnorm) on 6,000 images: a growth-collapse cycle at the start
    leaves layer 2 collapsed for good (measured with a plain hook on its conv). The cycle, a whole-run finding that
    never stops a fit by itself, explains the collapse; the report leads with it as an error (the worst of what it
    explains), not a warning, and the monitor stops the 2-epoch fit at the end of the first epoch on the collapse."""
    dls = DataLoaders.from_tensors(fmnist.x_train[:6000], fmnist.y_train[:6000], fmnist.x_valid[:500],
                                   fmnist.y_valid[:500], bs=512, batch_tfms=[Normalize()], vocab=fmnist.classes,
                                   seed=0, device='cpu')
    torch.manual_seed(0)
    model = simple_cnn(bn=False)
    shares = []
    handle = model[2][0].register_forward_hook(
        lambda m, i, o: shares.append((o <= 0.05).float().mean().item()) if m.training else None)
    learn = Learner(dls, model, loss_func=F.cross_entropy, metrics=accuracy, device='cpu',
                    cbs=health_cbs(check_every=None, stop_on='error'))
    torch.set_flush_denormal(True)  # a collapsed network is all subnormals, ~10x slower on the CPU
    try:
        with learn.no_bar(): learn.fit(2, 0.06)
    finally:
        torch.set_flush_denormal(False)
        handle.remove()
    assert min(shares[-3:]) > 0.9 and learn.recorder.values[-1][2] < 0.3  # the truth: collapsed, near chance
    monitor = learn.health_monitor
    assert learn.train_iter == len(dls.train) == 11  # stopped at the first epoch's end
    assert (monitor.stopped_by.check, monitor.stopped_by.layer, monitor.stopped_by.cause) == (
        'activation_collapse', '2.0 Conv2d', 'growth_collapse_cycle[2.0 Conv2d]')
    report = learn.diagnose(show=False)
    cycle = report.root_causes[0]
    assert (cycle.severity, cycle.key) == ('error', 'growth_collapse_cycle[2.0 Conv2d]')
    assert 'the last collapse never recovered' in cycle.message and 'restarts training' not in cycle.message
    assert 'activation_collapse[2.0 Conv2d]' in {f.key for f in report.consequences(cycle)}
    for root in report.root_causes:  # no root is less serious than what it explains
        assert all(SEVERITIES.index(root.severity) <= SEVERITIES.index(f.severity) for f in report.consequences(root))
    assert 'HealthMonitor: stopping the fit at training batch 11 (error activation_collapse' in capsys.readouterr().out


def test_health_monitor_lets_a_healthy_run_finish(chapter_dls, capsys):
    torch.manual_seed(0)
    learn = Learner(chapter_dls, simple_cnn(bn=True), loss_func=F.cross_entropy, metrics=accuracy, device='cpu',
                    cbs=health_cbs(check_every=10, stop_on='warning'))
    with learn.no_bar(): learn.fit_one_cycle(1, 0.01)
    assert learn.health_monitor.stopped_by is None and learn.train_iter == 31
    assert not learn.health_monitor.report.root_causes
    assert 'HealthMonitor' not in capsys.readouterr().out


def test_health_monitor_keeps_out_of_lr_find_and_quiet_inside_no_logging(chapter_dls, capsys):
    torch.manual_seed(0)
    learn = Learner(chapter_dls, simple_cnn(bn=True), loss_func=F.cross_entropy, device='cpu',
                    cbs=health_cbs(check_every=5, stop_on='error', max_share=None))
    with learn.no_bar(): learn.lr_find(num_it=30, show_plot=False)  # its loss diverges on purpose
    assert learn.health_monitor.report is None and learn.health_monitor.stopped_by is None
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-7)  # lr far too low: found, not shown
    assert learn.health_monitor.report.by_check('lr_too_low')
    assert capsys.readouterr().out == ''


def test_health_monitor_keeps_its_mid_epoch_checks_within_their_share_of_the_time(chapter_dls):
    """A check reads the whole run so far, so it costs more the longer the fit: with max_share the mid-epoch checks
    are skipped while the last one took more than that share of the time since it (epoch-end checks always run).
    max_share=None runs every check; a share far below any check's cost leaves the first mid-epoch check only."""
    def checks(max_share):
        torch.manual_seed(0)
        learn = Learner(chapter_dls, simple_cnn(bn=True), loss_func=F.cross_entropy, device='cpu',
                        cbs=health_cbs(check_every=3, show=False, max_share=max_share))
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3)
        return learn.health_monitor
    every = checks(None)
    assert every.checked_at == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 33, 36, 39, 42, 45, 48, 51, 54, 57, 60, 62]
    assert every.skipped_checks == 0
    rare = checks(1e-9)
    assert rare.checked_at == [3, 31, 62] and rare.skipped_checks == 19


def test_findings_on_the_whole_run_wait_for_its_last_epoch(chapter_dls, capsys):
    """A learning rate far too low judges the whole run: the monitor checks at both epoch ends, and shows it once,
    at the end of the last (after the first it could be a schedule's warm-up)."""
    torch.manual_seed(0)
    learn = Learner(chapter_dls, simple_cnn(bn=True), loss_func=F.cross_entropy, device='cpu',
                    cbs=health_cbs(check_every=None))
    with learn.no_bar(): learn.fit(2, 1e-7)
    assert learn.health_monitor.checked_at == [31, 62] and learn.health_monitor.report.by_check('lr_too_low')
    shown = [line for line in capsys.readouterr().out.splitlines() if 'lr_too_low' in line]
    assert len(shown) == 1 and shown[0].startswith('ERROR lr_too_low (batch 62)')


def test_health_monitor_validates_its_arguments():
    with pytest.raises(ValueError, match="check_every=0.*int >= 1"): HealthMonitor(check_every=0)
    with pytest.raises(ValueError, match="stop_on='fatal'.*None.*'error' or 'warning'"): HealthMonitor(stop_on='fatal')
    with pytest.raises(ValueError, match=r"max_share=0.*\(0, 1\]"): HealthMonitor(max_share=0)
    with pytest.raises(ValueError, match='threshold dead_units must be a fraction'): health_cbs(dead_units=2)
    with pytest.raises(TypeError, match='unknown threshold'): HealthMonitor(dead_unit=0.5)
