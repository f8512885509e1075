"""Checkpoints as a user meets them: save and load the whole training state, keep the best model, stop early,
resume an interrupted fit exactly, export a learner for inference and load it back without unpickling."""
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import tiny_cnn, torch_dls
from learnkit import Callback, Learner, accuracy
from learnkit.callbacks.tracking import EarlyStoppingCallback, SaveModelCallback
from learnkit.checkpoint import CheckpointError, load_learner, safe_load
from learnkit.data import DataLoaders, Flip, Normalize
from learnkit.models import simple_cnn


def dropout_cnn():
    "tiny_cnn with dropout, so that an exact resume also needs the RNG states."
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def learnkit_dls(fm, n_train=320, n_valid=64, bs=64):
    "learnkit loaders with a random flip, whose order is a function of (seed, epoch)."
    return DataLoaders.from_tensors(fm.x_train[:n_train], fm.y_train[:n_train], fm.x_valid[:n_valid],
                                    fm.y_valid[:n_valid], bs=bs, batch_tfms=[Flip(), Normalize()], device='cpu')


def make_learner(fm, path, kind='torch', seed=0, **kw):
    "kind: 'torch' (DataLoaders with their own generator), 'torch-global' (shuffled by torch's global RNG), 'learnkit'."
    torch.manual_seed(seed)
    if kind == 'learnkit': dls = learnkit_dls(fm)                           # 5 training batches
    else:
        dls = torch_dls(fm, 320, 64)
        if kind == 'torch-global':
            dls.train = DataLoader(dls.train.dataset, 64, shuffle=True, drop_last=True)
    return Learner(dls, dropout_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=path, **kw)


def quiet_fit(learn, method='fit_one_cycle', *args, **kw):
    with learn.no_bar(), learn.no_logging(): getattr(learn, method)(*args, **kw)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Crash(Callback):
    "Raises at training batch `iter` of `epoch`, as a crash would stop the process there."
    def __init__(self, epoch, iter): self.at = (epoch, iter)
    def after_batch(self):
        if self.learn.training and (self.learn.epoch, self.learn.iter) == self.at: raise RuntimeError('crash')


@pytest.fixture(autouse=True)
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def test_save_and_load_restore_the_whole_training_state(fmnist, tmp_path):
    learn = make_learner(fmnist, tmp_path)
    stopper = EarlyStoppingCallback(patience=5)
    learn.add_cb(stopper)
    quiet_fit(learn, 'fit', 2, 1e-2)
    stopper.wait = 3                         # callback state that must survive
    file = learn.save('ckpt')
    assert file == tmp_path / 'models' / 'ckpt.pth'
    torch.manual_seed(7); random.seed(7); np.random.seed(7)
    expected_draws = torch.rand(3), random.random(), np.random.rand()
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    history, lrs, losses = list(learn.recorder.values), list(learn.recorder.lrs), learn.recorder.losses

    other = make_learner(fmnist, tmp_path, seed=1)      # a fresh process would build this
    other.add_cb(EarlyStoppingCallback(patience=5))
    other.load('ckpt')
    assert all(torch.equal(weights[k], v) for k, v in other.model.state_dict().items())
    opt_a, opt_b = learn.opt.state_dict(), other.opt.state_dict()
    assert all(torch.equal(opt_a['state'][i]['exp_avg'], opt_b['state'][i]['exp_avg']) for i in opt_a['state'])
    assert opt_b['param_groups'][0]['lr'] == opt_a['param_groups'][0]['lr']
    assert other.recorder.values == history and other.recorder.lrs == lrs and other.recorder.losses == losses
    assert other.early_stopping.wait == 3 and other.early_stopping.best == stopper.best
    assert (other.epoch, other.train_iter) == (1, 10)
    # the RNG states are those of the moment of saving
    torch.manual_seed(7); random.seed(7); np.random.seed(7)
    learn.save('ckpt')
    other.load('ckpt')
    draws = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    # everything in the file is tensors and plain values: torch's safe loader reads it
    assert torch.load(file, weights_only=True)['format'] == 'learnkit.checkpoint'


def test_load_errors_name_the_file_and_the_fix(fmnist, tmp_path):
    learn = make_learner(fmnist, tmp_path)
    quiet_fit(learn, 'fit', 1, 1e-2)
    learn.save('no_opt', with_opt=False)
    with pytest.raises(CheckpointError, match='no_opt.pth holds no optimizer state.*with_opt=False'):
        learn.load('no_opt')
    learn.load('no_opt', with_opt=False)
    other = Learner(torch_dls(fmnist, 128, 64), tiny_cnn(), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    with pytest.raises(CheckpointError, match='no_opt.pth does not fit this model'):
        other.load('no_opt', with_opt=False)
    with pytest.raises(FileNotFoundError, match="No checkpoint at .*missing.pth.*'no_opt.pth'"):
        learn.load('missing')

    class Opaque(Callback):
        def state_dict(self): return {'fn': len}
    learn.add_cb(Opaque())
    with pytest.raises(TypeError, match=r"Opaque.state_dict\(\)\['fn'\] is a builtin_function_or_method"):
        learn.save('bad')


def test_save_model_keeps_the_best_and_loads_it_at_the_end(fmnist, tmp_path):
    learn = make_learner(fmnist, tmp_path)

    class Record(Callback):
        "Remembers the weights at each epoch end."
        order = 70
        def before_fit(self): self.weights = []
        def after_epoch(self): self.weights.append({k: v.clone() for k, v in self.learn.model.state_dict().items()})
    rec = Record()
    quiet_fit(learn, 'fit', 3, 0.1, cbs=[SaveModelCallback(), rec])   # lr too high: the valid loss jumps about
    losses = [v[1] for v in learn.recorder.values]
    best = int(np.argmin(losses))
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['model.pth', 'model_last.pth']
    assert all(torch.equal(v, rec.weights[best][k]) for k, v in learn.model.state_dict().items())
    assert safe_load(tmp_path / 'models' / 'model.pth')['loop']['resume_at'] == [best + 1, 0]

    quiet_fit(learn, 'fit', 2, 1e-3, cbs=SaveModelCallback(every_epoch=True, fname='ep'))
    assert {'ep_0.pth', 'ep_1.pth', 'ep_last.pth'} <= {p.name for p in (tmp_path / 'models').iterdir()}


def test_early_stopping_and_monitor_errors(fmnist, tmp_path, capsys):
    learn = make_learner(fmnist, tmp_path)
    stopper = EarlyStoppingCallback(monitor='accuracy', min_delta=1.0, patience=2)  # accuracy never gains 1.0
    quiet_fit(learn, 'fit', 10, 1e-2, cbs=stopper)
    assert len(learn.recorder.values) == 3 and stopper.stopped_epoch == 2
    assert 'No improvement in accuracy since epoch 0' in capsys.readouterr().out
    with pytest.raises(ValueError, match="monitors 'acuracy'.*'accuracy'"):
        quiet_fit(learn, 'fit', 1, 1e-2, cbs=EarlyStoppingCallback(monitor='acuracy'))


@pytest.mark.parametrize('kind', ['torch', 'torch-global', 'learnkit'])
def test_resume_mid_epoch_equals_an_uninterrupted_fit(fmnist, tmp_path, kind):
    "Dropout, a random flip and shuffled loaders: only an exact restore of every state gives the same weights."
    ref = make_learner(fmnist, tmp_path / 'ref', kind)
    quiet_fit(ref, 'fit_one_cycle', 3, 1e-2, cbs=SaveModelCallback(every_n_batches=2))

    crashed = make_learner(fmnist, tmp_path / 'run', kind)
    with pytest.raises(RuntimeError, match='crash'):
        quiet_fit(crashed, 'fit_one_cycle', 3, 1e-2, cbs=[SaveModelCallback(every_n_batches=2), Crash(1, 3)])
    assert safe_load(tmp_path / 'run' / 'models' / 'model_last.pth')['loop']['resume_at'] == [1, 2]

    resumed = make_learner(fmnist, tmp_path / 'run', kind, seed=123)   # a new process: other seeds, other RNG
    quiet_fit(resumed, 'fit_one_cycle', 3, 1e-2, cbs=SaveModelCallback(every_n_batches=2), resume='last')
    assert same_weights(ref.model, resumed.model)
    assert resumed.recorder.values == ref.recorder.values and resumed.recorder.lrs == ref.recorder.lrs
    assert resumed.recorder.losses == ref.recorder.losses


def test_resume_continues_the_diagnostics_records(fmnist, tmp_path):
    """ActivationStats and GradientStats records are in the checkpoints, so a resumed fit ends with the records of
    an uninterrupted one: the same rows, the sampled near_zero and histograms and the open dead-unit window
    included."""
    from learnkit.callbacks.activations import ActivationStats
    from learnkit.callbacks.gradients import GradientStats
    def diagnostics(): return [ActivationStats(with_hist=True, sample=256), GradientStats(dead_window=2)]
    ref_cbs, run_cbs, resumed_cbs = diagnostics(), diagnostics(), diagnostics()
    ref = make_learner(fmnist, tmp_path / 'ref', 'learnkit')
    quiet_fit(ref, 'fit_one_cycle', 3, 1e-2, cbs=[SaveModelCallback(every_n_batches=2), *ref_cbs])
    crashed = make_learner(fmnist, tmp_path / 'run', 'learnkit')
    with pytest.raises(RuntimeError, match='crash'):
        quiet_fit(crashed, 'fit_one_cycle', 3, 1e-2, cbs=[SaveModelCallback(every_n_batches=2), Crash(1, 3), *run_cbs])
    resumed = make_learner(fmnist, tmp_path / 'run', 'learnkit', seed=7)
    quiet_fit(resumed, 'fit_one_cycle', 3, 1e-2, cbs=[SaveModelCallback(every_n_batches=2), *resumed_cbs],
              resume='last')
    (a, g), (b, h) = ref_cbs, resumed_cbs
    assert a.iters == b.iters == list(range(15))
    for k in ('mean', 'std', 'near_zero', 'hist'): assert torch.equal(a.stats[k], b.stats[k]), k
    g, h = g.stats, h.stats
    assert torch.equal(g['grad_norm'], h['grad_norm']) and torch.equal(g['update_ratio'], h['update_ratio'])
    # The dead-unit window open at the crash was in the checkpoint: the windows close at the same steps.
    assert torch.equal(g['dead_iters'], h['dead_iters']) and torch.equal(g['dead'], h['dead'])
    # Records of other layers are refused with what to do.
    other = make_learner(fmnist, tmp_path / 'run', 'learnkit')
    with pytest.warns(UserWarning, match='without the callbacks'), pytest.raises(ValueError, match='same model and modules'):
        quiet_fit(other, 'fit_one_cycle', 3, 1e-2, cbs=ActivationStats(modules=[other.model[0]]), resume='last')


def test_resume_from_an_epoch_end_and_resume_errors(fmnist, tmp_path):
    ref = make_learner(fmnist, tmp_path / 'ref')
    quiet_fit(ref, 'fit_flat_cos', 3, 1e-2)
    crashed = make_learner(fmnist, tmp_path / 'run')
    with pytest.raises(RuntimeError, match='crash'):
        quiet_fit(crashed, 'fit_flat_cos', 3, 1e-2, cbs=[SaveModelCallback(every_epoch=True), Crash(2, 0)])
    resumed = make_learner(fmnist, tmp_path / 'run', seed=5)
    with pytest.warns(UserWarning, match=r"without the callbacks \['save_model'\]"):
        quiet_fit(resumed, 'fit_flat_cos', 3, 1e-2, resume=tmp_path / 'run' / 'models' / 'model_1.pth')
    assert same_weights(ref.model, resumed.model) and resumed.recorder.values == ref.recorder.values

    with pytest.raises(ValueError, match='fit of 3 epochs, but this fit has 4'):
        quiet_fit(resumed, 'fit_flat_cos', 4, 1e-2, resume='model_1')
    fresh = make_learner(fmnist, tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match=r"fit\(resume='last'\) found no checkpoint at .*model_last.pth"):
        quiet_fit(fresh, 'fit', 1, 1e-2, resume='last')
    fresh.save('by_hand')
    with pytest.raises(CheckpointError, match='written by learn.save.*does not say where to continue'):
        quiet_fit(fresh, 'fit', 1, 1e-2, resume='by_hand')


def test_export_and_load_learner_rebuild_the_model_by_name(fmnist, tmp_path):
    dls = learnkit_dls(fmnist)
    dls.train.vocab = dls.valid.vocab = list(fmnist.classes)
    learn = Learner(dls, simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    quiet_fit(learn, 'fit_one_cycle', 1, 1e-2)
    file = learn.export()
    assert file == tmp_path / 'export.pth'
    raw = torch.load(file, weights_only=True)           # no pickled code: torch's safe loader reads it
    assert raw['model'] == {'name': 'simple_cnn', 'kwargs': {'bn': True, 'n_out': 10, 'in_ch': 1}}

    loaded = load_learner(file)
    assert loaded.dls.vocab == list(fmnist.classes)
    norm = dls.train.batch_tfms[-1]
    assert torch.equal(loaded.dls.normalize.mean, norm.mean) and torch.equal(loaded.dls.normalize.std, norm.std)
    xb, _ = dls.valid.one_batch()
    raw = dls.valid.dataset[0][0]  # a uint8 image as the data holds it: both learners normalise it
    label, idx, probs = loaded.predict(raw)
    _, _, expected = learn.predict(raw)
    with torch.no_grad(): direct = torch.softmax(learn.model.eval()(xb[:1]), 1)[0]
    assert torch.allclose(probs, expected) and torch.allclose(probs, direct, atol=1e-5)
    assert label == fmnist.classes[idx]
    # the stored statistics normalise raw images as the loaders did
    raw_x = fmnist.x_valid[:4].float().div(255).unsqueeze(1)
    assert torch.allclose(loaded.dls.normalize(raw_x, False), xb[:4], atol=1e-5)


def test_load_learner_needs_a_constructor_for_unregistered_models(fmnist, tmp_path):
    learn = Learner(torch_dls(fmnist, 128, 64), tiny_cnn(), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    file = learn.export('plain.pth')
    with pytest.raises(ValueError, match='torch.nn.modules.container.Sequential.*pass model='):
        load_learner(file)
    loaded = load_learner(file, model=tiny_cnn)
    assert same_weights(loaded.model, learn.model) and isinstance(loaded.loss_func, nn.CrossEntropyLoss)
    learn.save('ckpt')
    with pytest.raises(CheckpointError, match='is a training checkpoint .*learn.load.*learn.export'):
        load_learner(tmp_path / 'models' / 'ckpt.pth')
