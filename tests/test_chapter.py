"""The convolutions chapter's ActivationStats sequence, on a 2,000-image slice of Fashion-MNIST at bs 64: the
baseline at lr 0.06 collapses and the report says so; 1cycle trains; batchnorm trains cleanly and the report
finds no error. The recorded statistics are checked against the activations themselves.

On the full data (nbs/01_chapter_activations.ipynb) the sequence ends at 0.10, 0.10, 0.81, 0.87 and 0.91
valid accuracy, as fastai's run of the chapter does (0.10, 0.10, 0.81, 0.88, 0.91)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from learnkit import Callback, Learner, accuracy
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.gradients import GradientStats
from learnkit.callbacks.hooks import hook_outputs
from learnkit.data import DataLoaders, Normalize
from learnkit.models import simple_cnn


class KeepOutputs(Callback):
    "Keeps one layer's output of every training batch."
    def __init__(self, module): self.module, self.outputs = module, []
    def before_fit(self): self.hooks = hook_outputs([self.module])
    def after_batch(self):
        if self.learn.training: self.outputs.append(self.hooks.stored[0].clone())
    def cleanup_fit(self): self.hooks.remove()


@contextlib.contextmanager
def flush_denormals():
    "A collapsed network is full of subnormal floats, ~10x slower on the CPU: flush them to zero meanwhile."
    torch.set_flush_denormal(True)
    try: yield
    finally: torch.set_flush_denormal(False)


@pytest.fixture(scope='module')
def dls(fmnist):
    return DataLoaders.from_tensors(fmnist.x_train[:2000], fmnist.y_train[:2000], fmnist.x_valid[:500],
                                    fmnist.y_valid[:500], bs=64, batch_tfms=[Normalize()], vocab=fmnist.classes,
                                    seed=0, device='cpu')


def chapter_fit(dls, bn=False, one_cycle=False, keep=None):
    """The chapter's `fit`: simple_cnn (with batchnorm if `bn`), cross-entropy, accuracy, lr 0.06, with
    ActivationStats(with_hist=True) and GradientStats (dead units over windows of 10 batches); `keep` (a layer index) also keeps that conv's outputs."""
    torch.manual_seed(0)
    model = simple_cnn(bn=bn)
    cbs = [ActivationStats(with_hist=True), GradientStats(dead_window=10)]
    if keep is not None: cbs.append(KeepOutputs(model[keep][0]))
    learn = Learner(dls, model, loss_func=F.cross_entropy, metrics=accuracy, device='cpu', cbs=cbs)
    with learn.no_bar(), learn.no_logging(), flush_denormals():
        (learn.fit_one_cycle if one_cycle else learn.fit)(1, 0.06)
    return learn


@pytest.fixture(scope='module')
def baseline(dls): return chapter_fit(dls, keep=3)  # model[3][0] is hooked layer -2, as in the chapter


def test_baseline_collapses_and_the_report_says_so(baseline):
    assert baseline.recorder.values[-1][2] < 0.2  # chance accuracy, as the chapter's first run
    df = baseline.activation_stats.layer_stats(-2)
    assert df['near_zero'].iloc[-10:].min() > 0.99
    report = baseline.diagnose(show=False)
    assert '3.0 Conv2d' in {f.layer for f in report.errors if f.check == 'activation_collapse'}
    assert {'no_progress', 'vanishing_gradients', 'dead_units'} <= {f.check for f in report.errors}


def test_recorded_stats_are_those_of_the_activations(baseline):
    df = baseline.activation_stats.layer_stats(-2)
    outputs = baseline.keep_outputs.outputs
    assert len(outputs) == len(df) == 31
    for b, out in enumerate(outputs):
        # All three come from a 2048-element sample of the 16,384: within 4 standard errors, as documented (the
        # std's grows with the kurtosis, which the collapse makes large).
        x = out.double().flatten()
        std = x.std().item()
        kurtosis = (((x - x.mean()) ** 4).mean() / std ** 4).item() if std > 0 else 1.
        assert df['mean'].iloc[b] == pytest.approx(x.mean().item(), abs=4 * std / 2048 ** 0.5 + 1e-7)
        assert df['std'].iloc[b] == pytest.approx(std, abs=4 * std * ((kurtosis - 1) / (4 * 2048)) ** 0.5 + 1e-7)
        f = (out <= 0.05).float().mean().item()
        assert df['near_zero'].iloc[b] == pytest.approx(f, abs=4 * (f * (1 - f) / 2048) ** 0.5 + 1e-6)


def test_one_cycle_trains_where_the_baseline_collapsed(dls, baseline):
    learn = chapter_fit(dls, one_cycle=True)
    assert learn.recorder.values[-1][2] > baseline.recorder.values[-1][2] + 0.3
    assert not learn.diagnose(show=False).by_check('no_progress')


def test_batchnorm_trains_cleanly(dls, baseline):
    learn = chapter_fit(dls, bn=True, one_cycle=True)
    report = learn.diagnose(show=False)
    assert not report.errors, str(report)
    assert learn.recorder.values[-1][2] > 0.7
    stats = learn.activation_stats
    assert stats.layer_names[-2] == '4.0 Conv2d'  # with BN, -2 is the last conv, before its batchnorm
    assert stats.layer_stats(-2)['near_zero'].max() < 0.9
