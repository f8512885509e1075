"""The loggers as a user reads their output: the CSV file line by line, and TensorBoard's event files through
tensorboard's own reader."""
import csv

import pytest
import torch
from torch import nn

from conftest import tiny_cnn, torch_dls
from learnkit import Callback, Learner, accuracy
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.logging import CSVLogger, TensorBoardCallback
from learnkit.callbacks.tracking import SaveModelCallback


def small_learner(fm, path, **kw):
    torch.manual_seed(0)
    return Learner(torch_dls(fm, 320, 64), tiny_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                   path=path, **kw)


def read_rows(file):
    with open(file, newline='') as f: return list(csv.reader(f))


class LinesOnDisk(Callback):
    "Counts the lines of the CSV file, read by another handle, right after each epoch: what survives a crash."
    order = 52
    def __init__(self, file): self.file, self.counts = file, []
    def after_epoch(self): self.counts.append(len(read_rows(self.file)))


def test_csv_logger_writes_each_epoch_as_it_ends(fmnist, tmp_path):
    learn = small_learner(fmnist, tmp_path)
    on_disk = LinesOnDisk(tmp_path / 'history.csv')
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2, cbs=[CSVLogger(), on_disk])
    assert on_disk.counts == [2, 3, 4]
    rows = read_rows(tmp_path / 'history.csv')
    assert rows[0] == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert [[float(v) for v in row[1:4]] for row in rows[1:]] == learn.recorder.values

    logger = CSVLogger(append=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=logger)
    rows = read_rows(tmp_path / 'history.csv')
    assert len(rows) == 5 and rows[0][0] == 'epoch' and rows[4][0] == '0'     # appended, no second header
    assert logger.read_log()['valid_loss'].tolist()[-1] == pytest.approx(learn.recorder.values[-1][1])


def test_csv_logger_of_a_resumed_fit_matches_an_uninterrupted_one(fmnist, tmp_path):
    ref = small_learner(fmnist, tmp_path / 'ref')
    with ref.no_bar(), ref.no_logging(): ref.fit_one_cycle(3, 1e-2, cbs=CSVLogger())

    class Crash(Callback):
        def after_batch(self):
            if self.learn.training and (self.learn.epoch, self.learn.iter) == (1, 3): raise RuntimeError('crash')
    learn = small_learner(fmnist, tmp_path / 'run')
    with learn.no_bar(), learn.no_logging(), pytest.raises(RuntimeError, match='crash'):
        learn.fit_one_cycle(3, 1e-2, cbs=[CSVLogger(), SaveModelCallback(every_n_batches=2), Crash()])
    assert len(read_rows(tmp_path / 'run' / 'history.csv')) == 2              # header and epoch 0
    learn = small_learner(fmnist, tmp_path / 'run')
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, 1e-2, cbs=[CSVLogger(), SaveModelCallback(every_n_batches=2)], resume='last')
    strip_time = lambda rows: [row[:-1] for row in rows]
    assert strip_time(read_rows(tmp_path / 'run' / 'history.csv')) == strip_time(read_rows(tmp_path / 'ref' / 'history.csv'))


def test_tensorboard_event_file_reads_back_with_tensorboards_reader(fmnist, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn = small_learner(fmnist, tmp_path, cbs=ActivationStats(with_hist=True))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2, cbs=TensorBoardCallback(tmp_path / 'tb'))
    events = EventAccumulator(str(tmp_path / 'tb'), size_guidance={'scalars': 0, 'histograms': 0})
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    rec = learn.recorder
    assert scalars('train/smooth_loss') == [(i, pytest.approx(v, rel=1e-6)) for i, v in enumerate(rec.losses)]
    assert scalars('hp/lr') == [(i, pytest.approx(v, rel=1e-6)) for i, v in enumerate(rec.lrs)]
    assert [v for _, v in scalars('hp/mom')] == pytest.approx(rec.moms, rel=1e-6)
    for col, name in enumerate(['train_loss', 'valid_loss', 'accuracy']):
        assert scalars(f'epoch/{name}') == [(e, pytest.approx(row[col], rel=1e-6)) for e, row in enumerate(rec.values)]

    act = learn.activation_stats
    stats = act.stats
    first = act.layer_names[0]
    epoch_1 = stats['iters'] >= 5                    # 5 training batches an epoch
    assert scalars(f'activations/{first}/near_zero')[1] == (1, pytest.approx(float(stats['near_zero'][epoch_1, 0].mean()), rel=1e-5))
    hists = events.Histograms(f'activations/{first}')
    assert [h.step for h in hists] == [0, 1]
    h = hists[1].histogram_value
    assert list(h.bucket) == pytest.approx(stats['hist'][epoch_1, 0].double().sum(0).tolist(), rel=1e-5)
    assert (h.min, h.max, len(h.bucket_limit)) == (0, 10, act.bins)
    assert set(events.Tags()['histograms']) == {f'activations/{n}' for n in act.layer_names}
