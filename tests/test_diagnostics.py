"""The health report and ClassificationInterpretation on real (small) Fashion-MNIST training runs: each check
fires on the problem it names and stays quiet on a healthy run."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import normalized_slice, torch_dls
from learnkit import Learner, accuracy
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.gradients import GradientStats
from learnkit.data import DataLoaders, Normalize
from learnkit.datasets import FASHION_MNIST_CLASSES
from learnkit.diagnostics import ClassificationInterpretation, Finding, HealthReport, Thresholds, diagnose, health_cbs
from learnkit.diagnostics.checks_layers import cycles as _cycles
from learnkit.diagnostics.checks_loss import check_loss_progress, check_overfitting
from learnkit.diagnostics.health import CHECKS, RunData as _RunData
from learnkit.models import simple_cnn


def learner(dls, model=None, stats=True, **kw):
    "A Learner with every callback the report reads (`health_cbs()`, dead-unit windows of 5), or none."
    torch.manual_seed(0)
    cbs = health_cbs(show=False) if stats else []
    for cb in cbs:
        if isinstance(cb, GradientStats): cb.dead_window = 5
    return Learner(dls, model or simple_cnn(bn=True), loss_func=F.cross_entropy, metrics=accuracy, cbs=cbs,
                   device='cpu', **kw)


@pytest.fixture(scope='module')
def healthy(fmnist):
    "simple_cnn with batchnorm, 1cycle for 2 epochs on 1280 images: the chapter's good run, small."
    learn = learner(torch_dls(fmnist, n_train=1280, n_valid=256))
    learn.fit_one_cycle(2, 0.01)
    return learn


def test_healthy_run_has_no_errors_and_renders(healthy, capsys):
    report = healthy.diagnose()
    printed = capsys.readouterr().out
    assert printed.startswith('Health report:') and 'Checked:' in printed
    assert not report.errors and not report.warnings, str(report)
    assert not report.skipped and report.checked == [c.name for c in CHECKS]
    md = report.to_markdown()
    assert md.startswith('## Health report') and report._repr_markdown_() == md
    assert not diagnose(healthy, show=False).errors and capsys.readouterr().out == ''


def test_report_renders_findings_as_a_markdown_table():
    f = Finding('error', 'activation_collapse', 'all | zero', 'add batchnorm', layer='3.0 Conv2d', batches=(2, 90),
                value=1.0)
    report = HealthReport([f], ['activation_collapse'], {'gradients': 'no GradientStats'})
    md = report.to_markdown()
    assert '| error | activation_collapse | 3.0 Conv2d | batches 2-90 | 1 | all \\| zero | add batchnorm |' in md
    assert '- gradients: no GradientStats' in md
    text = str(report)
    assert 'ERROR' in text and 'layer 3.0 Conv2d, batches 2-90' in text and 'try: add batchnorm' in text
    assert report.by_check('activation_collapse') == [f] and report.errors == [f] and not report.warnings


def test_thresholds_are_documented_parameters(healthy):
    names = [f.name for f in dataclasses.fields(Thresholds)]
    assert all(f'`{n}`' in Thresholds.__doc__ for n in names)
    with pytest.raises(TypeError, match='unknown threshold.*collapse_near_zero'):
        diagnose(healthy, show=False, collapse_nearzero=0.9)
    with pytest.raises(ValueError, match=r'threshold collapse_near_zero must be a fraction in \(0, 1\]; got 1.5'):
        diagnose(healthy, show=False, collapse_near_zero=1.5)
    with pytest.raises(ValueError, match='threshold oscillation_swings must be an int >= 1'):
        Thresholds(oscillation_swings=2.5)
    with pytest.raises(ValueError, match='threshold grad_exploding must be a number > 0'):
        diagnose(healthy, show=False, grad_exploding='100')
    with pytest.raises(ValueError, match='update_ratio_low .* must be below update_ratio_high'):
        Thresholds(update_ratio_low=0.5)
    # A stricter threshold finds what the default tolerates: a layer's near-zero share above 0.3.
    strict = diagnose(healthy, show=False, collapse_near_zero=0.3)
    assert strict.by_check('activation_collapse') and not diagnose(healthy, show=False).by_check('activation_collapse')


def test_without_stats_the_report_says_what_it_skipped(fmnist):
    learn = learner(torch_dls(fmnist, n_train=640, n_valid=128), stats=False)
    learn.fit(1, 1e-3)
    report = diagnose(learn, show=False)
    assert 'ActivationStats()' in report.skipped['activation_collapse']
    assert 'GradientStats()' in report.skipped['update_ratio']
    assert 'InputStats()' in report.skipped['inputs'] and 'WeightStats()' in report.skipped['unchanged_layers']
    assert report.checked == ['nonfinite', 'loss_progress', 'oscillating_loss', 'overfitting']
    assert set(report.checked) | set(report.skipped) == {c.name for c in CHECKS}


def test_nan_in_the_data_is_an_error_naming_the_batch(fmnist):
    x, y, xv, yv = normalized_slice(fmnist, 640, 128)
    x[300] = float('nan')  # sits in batch 4 (images 256-319), the data is not shuffled
    dls = DataLoaders(DataLoader(TensorDataset(x, y), 64), DataLoader(TensorDataset(xv, yv), 128))
    learn = learner(dls)
    learn.fit(1, 1e-3)
    report = diagnose(learn, show=False)
    found = report.by_check('nonfinite')
    assert {f.severity for f in found} == {'error'}
    # The root cause is the data, found by InputStats at batch 4; the loss and the layers went NaN because of it.
    root, = report.root_causes
    assert root.layer == 'inputs' and root.batches[0] == 4 and 'clean the data' in root.advice
    assert any('loss became nan at batch 4' in f.message and f.cause == root.key for f in found)
    assert any(f.layer == '0.0 Conv2d' and f.batches[0] == 4 for f in found)  # the first layer's activations
    assert all(f.cause is not None for f in report if f is not root and f.severity != 'info')
    # Without InputStats, the earliest place the NaN shows (the first layer's activations) leads.
    learn = learner(dls)
    learn.remove_cb(learn.input_stats)
    learn.fit(1, 1e-3)
    root, = diagnose(learn, show=False).root_causes
    assert root.check == 'nonfinite' and root.layer == '0.0 Conv2d' and 'learning rate' in root.advice


def test_a_learning_rate_far_too_low_is_named_and_explains_the_lack_of_progress(fmnist):
    learn = learner(torch_dls(fmnist, n_train=640, n_valid=128))
    learn.fit(2, 1e-9)
    report = diagnose(learn, show=False)
    root, = report.root_causes
    assert root.check == 'lr_too_low' and root.severity == 'error' and 'raise the learning rate' in root.advice
    assert report.by_check('no_progress')[0].cause == 'lr_too_low'
    low = report.by_check('update_ratio')
    assert len(low) == 10 and all('far below' in f.message and f.value < 1e-5 and f.cause for f in low)
    # The advice never says the opposite of the evidence: nothing tells this run to lower its learning rate.
    assert not any('lower the learning rate' in f.advice for f in report.root_causes)


def test_a_body_trained_slowly_on_purpose_is_not_a_learning_rate_too_low(fmnist):
    """Discriminative learning rates, as fine_tune gives a pretrained body (here lr/1000 for the first three blocks):
    the body's weights barely move (measured by the test's own snapshots of their update ratio), which is the user's
    choice; the report says nothing about it. The same layers trained at that rate throughout are named."""
    def fit(lr):
        learn = learner(torch_dls(fmnist, n_train=1280, n_valid=256),
                        splitter=lambda m: [list(m[:3].parameters()), list(m[3:].parameters())])
        body = learn.model[0][0].weight
        before = body.detach().clone()
        learn.fit_one_cycle(2, lr)
        return learn, ((body.detach() - before).norm() / before.norm()).item() / len(learn.dls.train) / 2
    learn, body_ratio = fit(slice(1e-5, 1e-2))
    assert body_ratio < 1e-5  # the truth: the first conv moves less than 1e-5 of its norm per step
    shares = learn.gradient_stats.stats['lr_share'].tolist()
    assert shares[:6] == pytest.approx([1e-3] * 6) and shares[6:] == pytest.approx([1.] * 4)
    report = diagnose(learn, show=False)
    assert not report.by_check('update_ratio') and not report.by_check('lr_too_low'), str(report)
    slow, _ = fit(1e-5)
    named = {f.layer for f in diagnose(slow, show=False).by_check('update_ratio')}
    assert {'0.1 BatchNorm2d', '1.1 BatchNorm2d', '2.1 BatchNorm2d'} <= named


def test_a_learning_rate_of_zero_leaves_every_layer_unchanged(fmnist):
    learn = learner(torch_dls(fmnist, n_train=320, n_valid=128))
    learn.fit(1, 0.)
    unchanged = diagnose(learn, show=False).by_check('unchanged_layers')
    assert len(unchanged) == 10 and all("learning rate is not 0" in f.advice for f in unchanged)


def test_overfitting_a_tiny_training_set(fmnist):
    # An MLP without weight decay memorises 128 images; its valid loss is at its best by epoch 5, then rises.
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    learn = learner(torch_dls(fmnist, n_train=128, n_valid=128, bs=16), model=mlp, stats=False, wd=0.)
    learn.fit(20, 1e-3)
    found = diagnose(learn, show=False).by_check('overfitting')
    train, valid = [v[0] for v in learn.recorder.values], [v[1] for v in learn.recorder.values]
    best = valid.index(min(valid))
    assert valid[-1] > 1.1 * valid[best] and train[-1] < train[best]  # the run really overfits
    assert len(found) == 1 and found[0].severity == 'warning'
    assert f"the valid loss rose from {valid[best]:.3g} (epoch {best})" in found[0].message


def test_a_rising_valid_loss_is_overfitting():
    epochs = [(1.0, 0.9), (0.7, 0.6), (0.5, 0.62), (0.4, 0.7)]  # (train, valid) per epoch
    found = check_overfitting(_RunData(epochs=epochs), Thresholds())
    assert len(found) == 1 and 'rose from 0.6 (epoch 1) to 0.7 (epoch 3)' in found[0].message
    assert not check_overfitting(_RunData(epochs=epochs[:2]), Thresholds())


def test_a_large_gap_alone_is_not_overfitting():
    # A valid loss three times the training loss, still at its best at the last epoch: a healthy run.
    epochs = [(1.0, 1.2), (0.5, 1.0), (0.3, 0.95), (0.2, 0.9), (0.1, 0.6)]
    assert not check_overfitting(_RunData(epochs=epochs), Thresholds())
    # The gap growing for 3 epochs while the valid loss stalls is.
    epochs = [(1.0, 1.2), (0.5, 0.80), (0.3, 0.80), (0.2, 0.80), (0.1, 0.801)]
    found = check_overfitting(_RunData(epochs=epochs), Thresholds())
    assert len(found) == 1 and 'the gap between valid and training loss grew' in found[0].message


def test_a_plateau_after_an_annealed_learning_rate_is_not_told_to_anneal_it():
    "The plateau advice fits the run's schedule: fit_one_cycle for a constant rate, another peak rate after one."
    losses = [2.0 - 0.02 * i for i in range(60)] + [0.8] * 20  # the last quarter flat
    constant, = check_loss_progress(_RunData(losses=losses, lrs=[1e-2] * 80), Thresholds())
    annealed, = check_loss_progress(_RunData(losses=losses, lrs=[1e-2 * (1 - i / 80) for i in range(80)]), Thresholds())
    assert constant.check == annealed.check == 'loss_plateau'
    assert 'anneals the learning rate (fit_one_cycle)' in constant.advice
    assert 'already annealed' in annealed.advice and 'fit_one_cycle' not in annealed.advice


def test_growth_then_collapse_cycles_are_counted():
    th = Thresholds()
    grow = [0.1, 0.2, 0.5, 1.0, 2.0]
    std = grow + [0.3, 0.1] + grow + [0.2, 0.1] + grow
    nz = [0.99, 0.9, 0.7, 0.6, 0.6] + [0.95, 0.99] + [0.99, 0.9, 0.7, 0.6, 0.6] + [0.95, 0.99] + [0.9] * 5
    events = _cycles(std, nz, th)
    assert events == [(0, 4, 5), (6, 11, 12)]  # (trough, peak, collapse) batch indices
    # A collapse that never recovers is not a cycle (it is `activation_collapse`), nor is a rise without collapse.
    assert _cycles(grow + [0.3, 0.1], [0.9] * 5 + [0.95, 0.99], th) == []
    assert _cycles(grow, [0.5] * 5, th) == []


# ---- ClassificationInterpretation ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def interp_learner(fmnist):
    torch.manual_seed(0)
    dls = DataLoaders.from_tensors(fmnist.x_train[:2000], fmnist.y_train[:2000], fmnist.x_valid[:500],
                                   fmnist.y_valid[:500], bs=64, batch_tfms=[Normalize()], vocab=FASHION_MNIST_CLASSES,
                                   seed=0, device='cpu')
    learn = Learner(dls, simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, device='cpu')
    learn.fit_one_cycle(1, 0.01)
    return learn


def test_confusion_matrix_and_most_confused(interp_learner):
    interp = ClassificationInterpretation.from_learner(interp_learner)
    cm = interp.confusion_matrix()
    valid_loss, acc = interp_learner.validate()
    assert cm.shape == (10, 10) and cm.sum() == 500
    assert cm.trace() / 500 == pytest.approx(acc)
    assert interp.losses.mean().item() == pytest.approx(valid_loss, rel=1e-4)
    confused = interp.most_confused(min_val=2)
    assert confused and all(c >= 2 and a != p for a, p, c in confused)
    assert [c for *_, c in confused] == sorted((c for *_, c in confused), reverse=True)
    a, p, c = confused[0]
    i, j = FASHION_MNIST_CLASSES.index(a), FASHION_MNIST_CLASSES.index(p)
    assert cm[i, j] == c == cm[~torch.eye(10, dtype=torch.bool).numpy()].max()
    fig = interp.plot_confusion_matrix(normalize=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(FASHION_MNIST_CLASSES)


def test_plot_top_losses_shows_the_worst_images(interp_learner):
    interp = ClassificationInterpretation.from_learner(interp_learner)
    losses, idx = interp.top_losses(9)
    assert torch.all(losses[:-1] >= losses[1:]) and losses[0] == interp.losses.max()
    fig = interp.plot_top_losses(9)
    assert len(fig.axes) == 9
    title = fig.axes[0].get_title()
    i = idx[0].item()
    assert title.startswith(f"{FASHION_MNIST_CLASSES[interp.preds[i]]} / {FASHION_MNIST_CLASSES[interp.targs[i]]}")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (28, 28) and 0 <= image.min() and image.max() <= 1  # decoded back to [0, 1]


def test_interpretation_with_a_functional_loss(fmnist):
    learn = learner(torch_dls(fmnist, n_train=640, n_valid=128), stats=False)
    learn.fit(1, 1e-3)
    interp = ClassificationInterpretation.from_learner(learn)  # F.cross_entropy: losses from reduction='none'
    assert interp.losses.shape == (128,) and interp.vocab == list(range(10))
    assert interp.plot_top_losses(4) is not None
