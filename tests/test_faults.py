"""Faults a long run meets, and what a user can count on afterwards: a process killed mid-epoch resumes to the
same weights bit for bit; a crash mid-write leaves the previous checkpoint whole; a booby-trapped file is refused
without running its code; an exception from any event, or Ctrl-C, ends fit cleanly; bad batches get clear errors.

Run as a script (`python tests/test_faults.py DIR MODE`), this file is the training process that the kill test
starts, kills and resumes."""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import normalized_slice, tiny_cnn, torch_dls
from learnkit import EVENTS, Callback, Learner, accuracy
from learnkit.callback import CANCEL_EXCEPTIONS
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.logging import CSVLogger
from learnkit.callbacks.tracking import SaveModelCallback, TerminateOnNaNCallback
from learnkit.checkpoint import CheckpointError, UnsafeCheckpointError, atomic_save, learner_state, safe_load
from learnkit.data import DataLoaders


def fault_learner(fm, path, n_train=320, bs=64, **kw):
    "A small CNN with dropout on shuffled Fashion-MNIST: 5 training batches and 1 validation batch an epoch."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return Learner(torch_dls(fm, n_train, 64, bs), model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                   path=path, **kw)


def hooks_on(model):
    "Every hook of every kind still registered on the model's modules."
    return [(name, kind) for name, m in model.named_modules()
            for kind in ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')
            if getattr(m, kind)]


# ---- kill -9 during epoch 2, resume in a new process --------------------------------------------------------
class SignalThenDawdle(Callback):
    "Tells the parent process that epoch 2 is under way, then slows down so the kill lands inside it."
    def __init__(self, marker): self.marker = marker
    def after_batch(self):
        if self.learn.training and self.learn.epoch == 1 and self.learn.iter >= 2:
            Path(self.marker).touch()
            time.sleep(0.5)


def train_process(folder, mode):
    "The training script: 3 epochs of 1cycle, a checkpoint every 2 batches and every epoch."
    from learnkit.datasets import fashion_mnist
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    learn = fault_learner(fashion_mnist(), folder)
    cbs = [SaveModelCallback(every_n_batches=2)]
    if mode == 'killed': cbs.append(SignalThenDawdle(Path(folder) / 'in_epoch_2'))
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, 1e-2, cbs=cbs, resume='last' if mode == 'resume' else None)
    learn.save('final')


def run_training(folder, mode):
    return subprocess.Popen([sys.executable, __file__, str(folder), mode], cwd=Path(__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_killed_during_epoch_2_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    reference = run_training(tmp_path / 'reference', 'full')
    victim = run_training(tmp_path / 'run', 'killed')
    marker = tmp_path / 'run' / 'in_epoch_2'
    deadline = time.monotonic() + 120
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline: time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    out = victim.communicate()[0].decode()
    assert victim.returncode == -signal.SIGKILL, out     # killed, not finished or crashed
    last = safe_load(tmp_path / 'run' / 'models' / 'model_last.pth')['loop']
    assert last['epoch'] == 1 and last['resume_at'][0] == 1 and last['resume_at'][1] >= 2   # died in epoch 2
    assert not (tmp_path / 'run' / 'models' / 'final.pth').exists()

    resumed = run_training(tmp_path / 'run', 'resume')
    for proc in (resumed, reference):
        out = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, out
    want = safe_load(tmp_path / 'reference' / 'models' / 'final.pth')
    got = safe_load(tmp_path / 'run' / 'models' / 'final.pth')
    assert want['model'].keys() == got['model'].keys()
    assert all(torch.equal(want['model'][k], got['model'][k]) for k in want['model'])
    assert all(torch.equal(a['exp_avg_sq'], got['opt']['state'][i]['exp_avg_sq'])
               for i, a in want['opt']['state'].items())
    assert got['callbacks']['recorder']['values'] == want['callbacks']['recorder']['values']
    assert len(got['callbacks']['recorder']['logs']) == 3


# ---- crashes while writing ---------------------------------------------------------------------------------
def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(fmnist, tmp_path):
    learn = fault_learner(fmnist, tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=SaveModelCallback())
    good = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)          # the weights move on
    folder = tmp_path / 'models'
    # What a crash mid-write leaves behind: the next version's temporary file, cut short, never renamed.
    torch.save(learner_state(learn), folder / '.model_last.pth.tmp')
    data = (folder / '.model_last.pth.tmp').read_bytes()
    (folder / '.model_last.pth.tmp').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r'\.model_last\.pth\.tmp .*is not a complete torch checkpoint'):
        safe_load(folder / '.model_last.pth.tmp')
    learn.load('model_last')
    assert all(torch.equal(good[k], v) for k, v in learn.model.state_dict().items())
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=SaveModelCallback(), resume='last')     # resume ignores the debris

    # A write that fails half-way (here: an object torch cannot serialise) removes its temporary file.
    before = (folder / 'model.pth').read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_save({'weights': good, 'oops': lambda: 0}, folder / 'model.pth')
    assert (folder / 'model.pth').read_bytes() == before
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith('.tmp')) == ['.model_last.pth.tmp']


class Payload:
    "Unpickling this object creates a file: what a malicious checkpoint would do, harmlessly."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))


def test_a_malicious_checkpoint_is_refused_and_its_code_never_runs(fmnist, tmp_path):
    learn = fault_learner(fmnist, tmp_path)
    folder = tmp_path / 'models'
    folder.mkdir()
    marker = tmp_path / 'pwned'
    torch.save({'format': 'learnkit.checkpoint', 'model': Payload(marker)}, folder / 'evil.pth')
    with open(folder / 'evil.pkl', 'wb') as f: pickle.dump(Payload(marker), f)   # a plain pickle too
    from learnkit.checkpoint import load_learner
    with pytest.raises(UnsafeCheckpointError, match=r'Refused to load .*evil\.pth for safety.*Unsupported global'):
        learn.load('evil')
    with pytest.raises(UnsafeCheckpointError, match='for safety'): load_learner(folder / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match='for safety'):
        learn.fit(1, 1e-2, resume=folder / 'evil.pth')
    with pytest.raises(CheckpointError, match=r'evil\.pkl .*plain pickle, which learnkit never loads'):
        learn.load(folder / 'evil.pkl')
    assert not marker.exists()
    # the payload is real: unpickling the same file the unsafe way would have run it
    torch.save(Payload(tmp_path / 'proof'), tmp_path / 'proof.pth')
    torch.load(tmp_path / 'proof.pth', weights_only=False)
    assert (tmp_path / 'proof').exists()


# ---- exceptions from every event ---------------------------------------------------------------------------
class Fault(Exception):
    "The exception the faulty callback raises."


# To reach `after_cancel_X`, another callback cancels phase X at an event of that phase.
CANCEL_AT = {'backward': 'before_backward', 'step': 'before_step', 'batch': 'after_pred', 'train': 'after_batch',
             'validate': 'before_validate', 'epoch': 'after_train', 'fit': 'after_epoch'}


def callback_raising(exc, event, when=lambda learn: True):
    "A callback that raises `exc` at `event` (at training batches only, for batch events)."
    class Faulty(Callback):
        pass
    def handler(self):
        if when(self.learn): raise exc(f'{event} failed')
    setattr(Faulty, event, handler)
    return Faulty()


FIT_EVENTS = [e for e in EVENTS if e != 'after_create']   # after_create runs when the Learner is built


@pytest.mark.parametrize('event', FIT_EVENTS)
def test_an_exception_from_any_event_ends_fit_cleanly(fmnist, tmp_path, event):
    learn = fault_learner(fmnist, tmp_path, n_train=128, cbs=ActivationStats(with_hist=True))
    cbs = [callback_raising(Fault, event)]
    if event.startswith('after_cancel_'):
        phase = event[len('after_cancel_'):]
        cbs.append(callback_raising(CANCEL_EXCEPTIONS[phase], CANCEL_AT[phase], lambda learn: learn.training
                                    or phase in ('validate', 'fit')))
    with learn.no_bar(), learn.no_logging(), pytest.raises(Fault) as err: learn.fit(2, 1e-2, cbs=cbs)
    assert f'raised in callback Faulty (learn.faulty) during `{event}`' in str(err.value)
    assert hooks_on(learn.model) == [] and not hasattr(learn, 'faulty')
    assert learn.opt is None or all(p.grad is None for p in learn.model.parameters())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)      # the learner is usable again
    assert len(learn.recorder.values) == 1 and len(learn.activation_stats.iters) == 2


def test_ctrl_c_mid_epoch_keeps_finished_epochs(fmnist, tmp_path):
    learn = fault_learner(fmnist, tmp_path, cbs=[ActivationStats(), CSVLogger()])

    class CtrlC(Callback):
        "Sends this process SIGINT, as Ctrl-C in a terminal or 'interrupt' in Jupyter does."
        def after_batch(self):
            if self.learn.training and (self.learn.epoch, self.learn.iter) == (1, 2): signal.raise_signal(signal.SIGINT)
    with learn.no_bar(), learn.no_logging(), pytest.raises(KeyboardInterrupt) as err:
        learn.fit(3, 1e-2, cbs=CtrlC())
    assert 'during `after_batch`' in ''.join(getattr(err.value, '__notes__', [])) + str(err.value)
    assert [row[0] for row in learn.recorder.logs] == [0] and hooks_on(learn.model) == []
    assert learn.csv_logger.read_log()['epoch'].tolist() == [0]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert len(learn.recorder.values) == 1 and learn.csv_logger.read_log()['epoch'].tolist() == [0]


# ---- bad batches -------------------------------------------------------------------------------------------
def plain_dls(x, y, xv, yv, bs=64):
    return DataLoaders(DataLoader(TensorDataset(x, y), bs), DataLoader(TensorDataset(xv, yv), bs))


def test_nan_inputs_stop_the_fit_naming_the_batch_and_keeping_the_last_good_checkpoint(fmnist, tmp_path):
    x, y, xv, yv = normalized_slice(fmnist, 640, 64)
    x[5 * 64 + 3] = float('nan')                       # one image in batch 5 of each epoch (no shuffling)
    torch.manual_seed(0)
    learn = Learner(plain_dls(x, y, xv, yv), tiny_cnn(), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    nan_guard = TerminateOnNaNCallback(check_every=4)
    with learn.no_bar(), learn.no_logging(), pytest.warns(RuntimeWarning) as warned:
        learn.fit(2, 1e-2, cbs=[nan_guard, SaveModelCallback(every_n_batches=4)])
    msg = next(str(w.message) for w in warned if 'TerminateOnNaN' in str(w.message))
    assert 'NaN or infinite at epoch 0, batch 5 (the first such batch; the fit stopped 2 batch(es) later)' in msg
    assert 'Restored the model and optimizer from' in msg and 'model_last.pth' in msg
    assert nan_guard.bad_batch == (0, 5) and learn.recorder.logs == []
    kept = safe_load(tmp_path / 'models' / 'model_last.pth')
    assert kept['loop']['resume_at'] == [0, 4]        # written before the bad batch, and not after it
    assert all(torch.equal(kept['model'][k], v) for k, v in learn.model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_targets_out_of_range_or_float_get_clear_errors(fmnist):
    x, y, xv, yv = normalized_slice(fmnist, 128, 64)
    bad = y.clone()
    bad[7] = 12
    learn = Learner(plain_dls(x, bad, xv, yv), tiny_cnn(), loss_func=nn.CrossEntropyLoss(),
                    cbs=ActivationStats())
    with learn.no_bar(), pytest.raises(ValueError, match=r'targets range over \[0, 12\] but the model has n_out=10'):
        learn.fit(1, 1e-2)
    assert hooks_on(learn.model) == []
    learn = Learner(plain_dls(x, y.float(), xv, yv.float()), tiny_cnn(), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), pytest.raises(ValueError, match=r'floats where class indices are expected.*\.long\(\)'):
        learn.fit(1, 1e-2)


# ---- on a GPU -----------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def cuda_dls(fm, x, n_valid=256, bs=64):
    "learnkit loaders with the images cached on the GPU, shuffled with seed 0, flipped at random."
    from learnkit.data import Flip
    return DataLoaders.from_tensors(x, fm.y_train[:len(x)], fm.x_valid[:n_valid], fm.y_valid[:n_valid], bs=bs,
                                    batch_tfms=[Flip()], device='cuda', seed=0)


@cuda
def test_nan_guard_adds_no_sync_on_cuda_and_names_the_first_bad_batch(fmnist):
    from test_gpu_speed import SyncCheck
    x = fmnist.x_train[:4096].float().div(255).unsqueeze(1)
    dls = cuda_dls(fmnist, x)
    position = dls.train.order(0).tolist().index(2500)     # where image 2500 falls in epoch 0
    x[2500] = float('nan')
    dls = cuda_dls(fmnist, x)
    torch.manual_seed(0)
    learn = Learner(dls, tiny_cnn(), loss_func=nn.CrossEntropyLoss(), device='cuda')
    guard = TerminateOnNaNCallback(check_every=8)
    with learn.no_bar(), learn.no_logging(), pytest.warns(RuntimeWarning, match='TerminateOnNaN'):
        learn.fit(2, 1e-2, cbs=[SyncCheck(), guard])       # SyncCheck: any host sync in a batch raises
    assert guard.bad_batch == (0, position // 64) and learn.recorder.logs == []


@cuda
def test_resume_on_cuda_equals_an_uninterrupted_fit(fmnist, tmp_path, monkeypatch):
    "Dropout and flips draw from the CUDA RNG, which the checkpoint keeps too."
    monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)
    try:
        x = fmnist.x_train[:640]

        def fit(folder, cbs=(), resume=None, seed=0):
            learn = fault_learner(fmnist, folder, device='cuda')
            learn.dls = cuda_dls(fmnist, x)
            torch.manual_seed(seed)                        # a resumed process starts from other RNG states
            with learn.no_bar(), learn.no_logging():
                learn.fit_one_cycle(3, 1e-2, cbs=[SaveModelCallback(every_n_batches=3), *cbs], resume=resume)
            return learn

        class Crash(Callback):
            def after_batch(self):
                if self.learn.training and (self.learn.epoch, self.learn.iter) == (1, 4): raise Fault('crash')
        ref = fit(tmp_path / 'ref')
        with pytest.raises(Fault): fit(tmp_path / 'run', [Crash()])
        resumed = fit(tmp_path / 'run', resume='last', seed=1)
        want, got = ref.model.state_dict(), resumed.model.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)
        assert resumed.recorder.values == ref.recorder.values
    finally: torch.use_deterministic_algorithms(False)


if __name__ == '__main__':
    train_process(Path(sys.argv[1]), sys.argv[2])
