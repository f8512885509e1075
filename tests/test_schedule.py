"""Schedules, hyper-parameters, 1cycle and the lr finder, checked on real training runs."""
import copy

import pytest
import torch
from torch import nn

from conftest import tiny_cnn, torch_dls
from learnkit import (SGD, Adam, Learner, SchedCos, SchedExp, SchedLin, SchedNo, SchedPoly, accuracy,
                      combine_scheds, combined_cos)


def test_schedule_functions():
    assert SchedLin(0, 10)(0.25) == 2.5
    assert SchedCos(0, 10)(0) == 0 and SchedCos(0, 10)(1) == pytest.approx(10) and SchedCos(0, 10)(0.5) == pytest.approx(5)
    assert SchedNo(3, 7)(0.9) == 3
    assert SchedExp(1e-3, 1e-1)(0.5) == pytest.approx(1e-2)
    assert SchedPoly(0, 1, 2)(0.5) == 0.25
    f = combine_scheds([0.3, 0.7], [SchedLin(0, 1), SchedLin(1, 0)])
    assert f(0) == 0 and f(0.3) == pytest.approx(1) and f(1) == pytest.approx(0) and f(0.65) == pytest.approx(0.5)
    with pytest.raises(ValueError, match='sum to 1'): combine_scheds([0.3, 0.3], [SchedNo(0, 0)] * 2)
    with pytest.raises(ValueError, match='positive'): SchedExp(0, 1)


def test_fit_one_cycle_lr_and_mom_at_start_peak_end(fmnist):
    learn = Learner(torch_dls(fmnist, 640, 64), tiny_cnn(), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(): learn.fit_one_cycle(4, lr_max=0.01, pct_start=0.25)   # 10 batches x 4 epochs
    lrs, moms = learn.recorder.lrs, learn.recorder.moms
    assert len(lrs) == 40
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert max(lrs) == pytest.approx(0.01, rel=1e-3) and lrs.index(max(lrs)) == 10
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01 / 300   # annealing towards lr_max/1e5
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85, rel=1e-3)
    assert moms.index(min(moms)) == 10 and moms[-1] == pytest.approx(0.95, abs=1e-3)
    # Adam's beta1 is the momentum torch really used
    assert learn.opt.opt.param_groups[0]['betas'][0] == pytest.approx(moms[-1])


def test_fit_flat_cos_is_flat_then_anneals(fmnist):
    learn = Learner(torch_dls(fmnist, 640, 64), tiny_cnn(), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(): learn.fit_flat_cos(2, lr=0.01)
    lrs = learn.recorder.lrs
    assert lrs[:15] == [pytest.approx(0.01)] * 15 and lrs[16] < 0.01 and lrs[-1] < 0.01 / 10


def test_lr_find_suggests_and_leaves_weights_and_optimizer_unchanged(fmnist):
    learn = Learner(torch_dls(fmnist, 3200, 64), tiny_cnn(), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(): learn.fit(1, 1e-3)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_before = copy.deepcopy(learn.opt.state_dict())
    sugg = learn.lr_find(show_plot=False)
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    opt_after = learn.opt.state_dict()
    for pid, st in opt_before['state'].items():
        assert all(torch.equal(st[k], opt_after['state'][pid][k]) for k in st)
    assert 1e-7 < sugg.valley < 10 and 1e-7 < sugg.minimum < 10 and 1e-7 <= sugg.steep < 10
    assert len(learn.recorder.lrs) <= 100 + 8 and learn.recorder.lrs[0] == pytest.approx(1e-7)


def test_lr_find_stops_when_the_loss_diverges(fmnist):
    learn = Learner(torch_dls(fmnist, 6400, 64), tiny_cnn(), loss_func=nn.CrossEntropyLoss(), opt_func=SGD)
    learn.lr_find(end_lr=1e4, num_it=100, show_plot=False)
    assert len(learn.recorder.lrs) < 100          # stopped early, at most a few batches past divergence


def test_adam_hyper_parameters_map_to_torch_and_skip_wd_on_bn_and_bias(fmnist):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    learn = Learner(torch_dls(fmnist, 128, 64), model, loss_func=nn.CrossEntropyLoss(), wd=0.1)
    opt = learn.create_opt()
    assert isinstance(opt.opt, torch.optim.AdamW)
    decay, no_decay = opt.opt.param_groups
    assert decay['weight_decay'] == 0.1 and no_decay['weight_decay'] == 0
    assert all(p.ndim > 1 for p in decay['params']) and all(p.ndim <= 1 for p in no_decay['params'])
    opt.set_hyper('mom', 0.8)
    assert decay['betas'] == (0.8, 0.99) and opt.hypers[0]['mom'] == 0.8
    with pytest.raises(KeyError, match='Unknown hyper-parameter'): opt.set_hyper('momentum', 0.9)


def test_discriminative_lr_with_a_slice(fmnist):
    model = tiny_cnn()
    splitter = lambda m: [list(m[:4].parameters()), list(m[4:].parameters())]
    learn = Learner(torch_dls(fmnist, 128, 64), model, loss_func=nn.CrossEntropyLoss(), splitter=splitter,
                    opt_func=torch.optim.SGD)
    with learn.no_bar(): learn.fit(1, lr=slice(1e-4, 1e-2))
    assert [h['lr'] for h in learn.opt.hypers] == [pytest.approx(1e-4), pytest.approx(1e-2)]
    with learn.no_bar(): learn.fit(1, lr=slice(1e-2))
    assert [h['lr'] for h in learn.opt.hypers] == [pytest.approx(1e-3), pytest.approx(1e-2)]
    with pytest.raises(ValueError, match='3 values but the optimizer has 2'):
        learn.opt.set_hyper('lr', [1, 2, 3])
