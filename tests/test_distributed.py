"""Distributed data-parallel training, as a user launches it: `torchrun --nproc_per_node=2` on the CPU (gloo).

Launching torchrun costs several seconds (each process imports torch), so two launches cover everything: one
job that trains, validates, predicts, runs lr_find and records activation statistics on both ranks, and one
job where rank 1 raises. The same file is the script torchrun runs (see `_worker` at the bottom).
"""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

N_TRAIN, N_VALID, N_ACT, BS, VAL_BS, SEED = 1024, 301, 64, 64, 50, 1
# 301 validation items over 2 ranks: rank 1's shard ends with one padding item, alone in its last batch.
FMNIST_STATS = (0.286, 0.353)  # fixed, so normalisation does not depend on the per-rank batch size
LOSS_RTOL = 1e-4  # DDP loss curve vs one process with the same global batch: float rounding only (seen: 1e-7)


def _model():
    "A small CNN without BatchNorm (per-rank batch statistics would make the two runs differ by design)."
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _act_images(fm):
    "The N_ACT training images the statistics runs see, normalised as `_dls` does."
    mean, std = FMNIST_STATS
    return (fm.x_train[:N_ACT].float().div(255).unsqueeze(1) - mean) / std


def _saturating_model(x):
    """Linear(784, 64), Tanh (weights x 8: partly saturated), Linear(64, 32), ReLU, Linear(32, 10). The first 8
    ReLU units are positive on exactly one image of `x` each, so a rank that does not see it finds the unit dead:
    only combined across ranks do the dead fractions come out right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Tanh(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        model[1].weight.mul_(8)
        first, second = model[:4](x)[:, :8].topk(2, dim=0).values
        model[3].bias[:8] -= (first + second) / 2
    return model


def _dls(fm, bs, n_train=N_TRAIN, n_valid=N_VALID):
    from learnkit.data import DataLoaders, Normalize
    return DataLoaders.from_tensors(fm.x_train[:n_train], fm.y_train[:n_train], fm.x_valid[:n_valid],
                                    fm.y_valid[:n_valid], bs=bs, val_bs=VAL_BS, seed=SEED, device='cpu',
                                    batch_tfms=[Normalize.from_stats(*FMNIST_STATS)])


def _learner(dls, model, **kwargs):
    from learnkit import Learner, accuracy
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, lr=3e-3, **kwargs)


def _torchrun(mode, out, timeout):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           __file__, mode, str(out)]
    # The workers import the learnkit this test imports (a worktree's, not the one the environment installs).
    import learnkit
    source = str(Path(learnkit.__file__).resolve().parents[1])
    env = {**os.environ, 'PYTHONUNBUFFERED': '1',
           'PYTHONPATH': os.pathsep.join(p for p in (source, os.environ.get('PYTHONPATH')) if p)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=out)


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    "One 2-process job (see `_train_worker`): its output folder and console output."
    out = tmp_path_factory.mktemp('ddp')
    proc = _torchrun('train', out, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f'result_rank{r}.json').read_text()) for r in (0, 1)]
    return out, results, proc.stdout


def test_both_ranks_finish_and_only_rank0_writes_and_shows(ddp_run):
    out, results, stdout = ddp_run
    assert [r['rank'] for r in results] == [0, 1] and all(r['world_size'] == 2 for r in results)
    assert sorted(p.name for p in (out / 'rank0').rglob('*') if p.is_file()) == ['history.csv', 'model_0.pth', 'model_last.pth']
    assert not any((out / 'rank1').rglob('*')), "rank 1 must write no checkpoint or log"
    # Two fits print a results table (the test's and the CLI's), each once: only rank 0 shows progress.
    assert stdout.count('train_loss') == 2, stdout
    assert all(r['model_type'] == 'Sequential' for r in results), "learn.model is unwrapped after fit"


def test_metrics_equal_one_process_on_the_saved_weights(ddp_run, fmnist):
    from learnkit.checkpoint import safe_load
    out, results, _ = ddp_run
    model = _model()
    model.load_state_dict(safe_load(out / 'rank0' / 'models' / 'model_0.pth')['model'])
    learn = _learner(_dls(fmnist, BS), model)
    valid_loss, acc = learn.validate()
    for r in results:  # what each rank reported: its results table and validate()
        train_loss, ddp_valid_loss, ddp_acc = r['values'][0]
        assert ddp_acc == pytest.approx(acc, abs=1e-6) and r['validate'][1] == pytest.approx(acc, abs=1e-6)
        assert ddp_valid_loss == pytest.approx(valid_loss, rel=1e-5)
    csv = (out / 'rank0' / 'history.csv').read_text().splitlines()
    assert float(csv[1].split(',')[3]) == pytest.approx(acc, abs=1e-6)
    with learn.no_bar(): preds, targets = learn.get_preds()
    for r in results:  # get_preds gathers every rank's part, in the loader's order, without the padding
        assert torch.equal(torch.tensor(r['targets']), targets)
        assert torch.allclose(torch.tensor(r['preds']), preds, atol=1e-5)


def test_loss_curve_matches_one_process_with_the_same_global_batch(ddp_run, fmnist):
    _, results, _ = ddp_run
    learn = _learner(_dls(fmnist, BS), _model())
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    single = learn.recorder.losses
    for r in results:
        assert len(r['losses']) == len(single) == N_TRAIN // BS
        assert r['losses'] == pytest.approx(single, rel=LOSS_RTOL)


def test_gradient_accumulation_all_reduces_once_per_step_and_matches_one_process(ddp_run, fmnist):
    "Accumulated batches skip DDP's all-reduce (no_sync); the steps still equal one process on the global batches."
    from learnkit.callbacks.batch_size import GradientAccumulation
    _, results, _ = ddp_run
    learn = _learner(_dls(fmnist, BS), _model(), cbs=[GradientAccumulation(n_acc=2 * BS)])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    single, steps = learn.recorder.losses, N_TRAIN // BS // 2
    for r in results:
        assert r['acc_losses'] == pytest.approx(single, rel=LOSS_RTOL)  # the weights after each step agree
        assert r['acc_allreduces'] == steps  # one bucket (a small model), one all-reduce per step, not per batch
        # The noise scale's big batch is the global one (2 ranks x 2 batches x 32); its estimates are finite.
        rows = torch.tensor(r['acc_noise_scale'])
        assert len(rows) == steps and (rows[:, 0] == 2 * BS).all() and rows.isfinite().all()


def test_the_best_weights_loaded_at_the_end_reach_every_rank(ddp_run):
    "Only rank 0 writes checkpoints; SaveModelCallback sends the best one to every rank, so the ranks agree."
    from learnkit.checkpoint import safe_load
    out, (r0, r1), _ = ddp_run
    losses = r0['best_valid_losses']
    assert losses[1] > losses[0] and r1['best_valid_losses'] == losses  # epoch 0 is the best, on both ranks
    assert not (out / 'best_rank1').exists()  # rank 1 wrote nothing, so it cannot have read its own file
    saved = safe_load(out / 'best_rank0' / 'models' / 'model.pth')['model']
    best = torch.cat([t.flatten().float() for t in saved.values()])
    assert torch.equal(torch.tensor(r0['best_weights']), best) and torch.equal(torch.tensor(r1['best_weights']), best)


def test_a_nan_on_one_rank_stops_every_rank_on_the_same_checkpoint(ddp_run):
    from learnkit.checkpoint import safe_load
    out, (r0, r1), _ = ddp_run
    assert r0['nan_bad_batch'] == r1['nan_bad_batch'] == [0, 9]
    assert all('Restored the model' in r['nan_message'] for r in (r0, r1))
    saved = safe_load(out / 'nan_rank0' / 'models' / 'model_last.pth')
    assert tuple(saved['loop']['resume_at']) == (0, 8)  # the checkpoint after batch 8, the last before the NaN
    last = torch.cat([t.flatten().float() for t in saved['model'].values()])
    assert torch.equal(torch.tensor(r0['nan_weights']), last) and torch.equal(torch.tensor(r1['nan_weights']), last)


def test_lr_find_runs_on_every_rank_with_one_answer(ddp_run):
    _, (r0, r1), _ = ddp_run
    assert r0['lr_find'] == r1['lr_find'] and r0['lr_find_points'] == r1['lr_find_points']
    assert r0['lr_find_points'] >= 20, "the finder must see its num_it batches despite the sharded loader"
    assert r0['weights_restored'] and r1['weights_restored']


def test_layer_stats_combine_to_the_concatenated_batch(ddp_run, fmnist):
    "Each rank hooked its half of a 64-image batch; combined, the stats are those of all 64 images at once."
    from learnkit.checkpoint import safe_load
    out, results, _ = ddp_run
    model = _model()
    model.load_state_dict(safe_load(out / 'rank0' / 'models' / 'model_0.pth')['model'])
    mean, std = FMNIST_STATS
    x = (fmnist.x_train[:N_ACT].float().div(255).unsqueeze(1) - mean) / std
    acts, relus = [], []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.detach().flatten()))
             for m in model if any(True for _ in m.parameters(recurse=False))]
    hooks += [m.register_forward_hook(lambda m, i, o: relus.append(o.amax(dim=(0, 2, 3))))
              for m in model if isinstance(m, nn.ReLU)]
    with torch.no_grad(): model(x)
    for h in hooks: h.remove()
    for r in results:
        # GradientStats: a channel is dead if no image of either rank made it positive
        assert r['dead_units'] == pytest.approx([(m <= 0).float().mean().item() for m in relus])
        stats = r['activation_stats']
        for i, a in enumerate(acts):
            assert stats['mean'][i] == pytest.approx(a.mean().item(), rel=1e-4, abs=1e-6)
            assert stats['std'][i] == pytest.approx(a.std().item(), rel=1e-4)
            assert stats['near_zero'][i] == pytest.approx((a <= 0.05).float().mean().item(), abs=1e-6)
            # ActivationStats bins with its own float64 arithmetic, so a value on a bin edge may land one bin
            # over from torch.histc's choice: counts agree in total and within one element per bin.
            direct = torch.histc(a, 40, -10, 10)
            combined = torch.tensor(stats['hist'][i])
            assert combined.sum().item() == pytest.approx(direct.sum().item(), abs=1e-3)
            assert (combined - direct).abs().max().item() <= 1
            # Sampled on each rank (2048 elements, where a rank's half is larger), combined: within 4 standard
            # errors (of one rank's sample: a bound on the combined one's) of the whole batch's statistics.
            f = (a <= 0.05).float().mean().item()
            sampled = r['sampled_stats']
            assert sampled['near_zero'][i] == pytest.approx(f, abs=4 * (f * (1 - f) / 2048) ** 0.5 + 1e-6)
            x = a.double()
            kurtosis = (((x - x.mean()) ** 4).mean() / x.std() ** 4).item()
            assert sampled['mean'][i] == pytest.approx(x.mean().item(), abs=4 * x.std().item() / 2048 ** 0.5)
            se_std = x.std().item() * ((kurtosis - 1) / (4 * 2048)) ** 0.5
            assert sampled['std'][i] == pytest.approx(x.std().item(), abs=4 * se_std)


def test_saturation_exact_sums_and_dead_windows_across_epochs_combine_over_ranks(ddp_run, fmnist):
    """4 epochs of the N_ACT images (one batch per rank per epoch) at lr 0, with ActivationStats(exact=True,
    sample=512, include_saturating=True) and GradientStats(dead_window=3): every epoch's statistics are those of
    all the images. The exact sums (2048 values per rank, above the sample) combine to the whole set's mean and std;
    the Tanh's sampled saturated share to within the standard error of the whole set's; and both dead-unit
    windows, one across three epochs and one left open at an epoch end and closed when fit ends, count the
    channels no image of either rank made positive."""
    _, results, _ = ddp_run
    x = _act_images(fmnist)
    model = _saturating_model(x)
    with torch.no_grad(): outs = [model[:k](x) for k in (2, 3, 4, 5, 6)]  # Linear, Tanh, Linear, ReLU, Linear
    dead = (outs[3].amax(0) <= 0).float().mean().item()
    assert dead < (outs[3][:N_ACT // 2].amax(0) <= 0).float().mean().item()  # half the images would see more dead
    f = ((outs[1].abs() >= 1 - 0.02).float().mean()).item()  # within 1% of the range (-1, 1) from a bound
    assert 0.1 < f < 0.9
    for r in results:
        s = r['saturating']
        assert s['bounds'] == [None, [-1., 1.], None, None] and s['dead_iters'] == [2, 3]
        for i, o in enumerate([outs[k] for k in (0, 1, 2, 4)]):
            for epoch in range(4):
                assert s['mean'][epoch][i] == pytest.approx(o.double().mean().item(), rel=1e-5, abs=1e-6)
                assert s['std'][epoch][i] == pytest.approx(o.double().std().item(), rel=1e-5)
        assert all(row[1] == pytest.approx(f, abs=4 * (f * (1 - f) / 1024) ** 0.5) for row in s['saturated'])
        assert all(row[0] != row[0] and row[2] != row[2] for row in s['saturated'])  # NaN: unbounded layers
        assert s['dead'] == [[pytest.approx(dead)], [pytest.approx(dead)]]


def test_learnkit_train_runs_under_torchrun(ddp_run):
    "The CLI, unchanged, with BatchNorm: every rank ends with rank 0's running statistics, so each rank alone "
    "validates the final weights to the accuracy the job reported."
    out, results, _ = ddp_run
    assert {'config.json', 'metrics.csv', 'model.pt'} <= {p.name for p in (out / 'run').iterdir()}
    for r in results:
        (train_loss, valid_loss, acc), = r['cli_values']
        assert r['cli_alone'][1] == pytest.approx(acc, abs=1e-6) and r['cli_alone'][0] == pytest.approx(valid_loss, rel=1e-5)
    assert results[0]['cli_alone'] == results[1]['cli_alone']


def test_a_rank_that_raises_stops_the_whole_job_with_its_error(tmp_path):
    start = time.monotonic()
    proc = _torchrun('fail', tmp_path, timeout=120)  # a hang would raise TimeoutExpired and fail the test
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert 'ValueError: boom on rank 1' in output and 'during `after_batch`' in output
    assert time.monotonic() - start < 120


def test_outside_torchrun_distrib_ctx_does_nothing_and_the_callback_says_how_to_launch(fmnist, monkeypatch):
    from learnkit.callbacks.distributed import DistributedCallback
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): monkeypatch.delenv(k, raising=False)
    learn = _learner(_dls(fmnist, BS, n_train=256, n_valid=64), _model())
    assert not any(isinstance(cb, DistributedCallback) for cb in learn.cbs)
    with learn.no_bar(), learn.distrib_ctx():  # the same script runs in one process
        assert not any(isinstance(cb, DistributedCallback) for cb in learn.cbs)
        learn.fit(1)
    with pytest.raises(RuntimeError, match='torchrun --nproc_per_node'): learn.validate(cbs=DistributedCallback())
    assert type(learn.model) is nn.Sequential


# ---- what each rank runs under torchrun -----------------------------------------------------------------------
def _train_worker(out):
    from learnkit import Callback
    from learnkit.callbacks.activations import ActivationStats
    from learnkit.callbacks.batch_size import GradientAccumulation, GradientNoiseScale
    from learnkit.callbacks.distributed import num_distrib, rank_distrib
    from learnkit.callbacks.gradients import GradientStats
    from learnkit.callbacks.logging import CSVLogger
    from learnkit.callbacks.tracking import SaveModelCallback, TerminateOnNaNCallback
    from learnkit.cli import build_parser, train
    from learnkit.datasets import fashion_mnist
    rank, world = rank_distrib(), num_distrib()
    fm = fashion_mnist()

    class CountAllReduces(Callback):
        "Counts the gradient all-reduces of the DDP-wrapped model (every bucket of every synced backward)."
        order = 6  # after DistributedCallback wraps the model
        def before_fit(self):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            self.calls = 0
            def counted(state, bucket):
                self.calls += 1
                return allreduce_hook(state, bucket)
            self.learn.model.register_comm_hook(None, counted)
    # Each rank writes under its own folder, so the test can see that rank 1 wrote nothing.
    learn = _learner(_dls(fm, BS // world), _model(), path=out / f'rank{rank}',
                     cbs=[SaveModelCallback(every_epoch=True, with_opt=False), CSVLogger()])
    learn.fit(1)
    result = {'rank': rank, 'world_size': world, 'values': learn.recorder.values, 'losses': learn.recorder.losses,
              'model_type': type(learn.model).__name__, 'validate': learn.validate()}
    preds, targets = learn.get_preds()
    result.update(preds=preds.tolist(), targets=targets.tolist())

    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.removed_cbs([learn.save_model, learn.csv_logger]):
        result['lr_find'] = list(learn.lr_find(num_it=20, show_plot=False))
    result['lr_find_points'] = len(learn.recorder.lrs)
    result['weights_restored'] = all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())

    # One batch of N_ACT images, half on each rank, through the trained weights (lr=0 leaves them as they are).
    stats_learn = _learner(_dls(fm, N_ACT // world, n_train=N_ACT, n_valid=VAL_BS), learn.model,
                           cbs=[ActivationStats(with_hist=True, hist_range='symmetric', sample=None),
                                GradientStats(dead_window=1)])
    with stats_learn.no_logging(): stats_learn.fit(1, lr=0.)
    stats = stats_learn.activation_stats.stats
    result['activation_stats'] = {k: stats[k][0].tolist() for k in ('mean', 'std', 'near_zero', 'hist')}
    result['dead_units'] = stats_learn.gradient_stats.stats['dead'][0].tolist()
    # The same batch with the default sample: each rank's statistics are estimates from its own sample.
    sampled_learn = _learner(_dls(fm, N_ACT // world, n_train=N_ACT, n_valid=VAL_BS), learn.model,
                             cbs=[ActivationStats()])
    with sampled_learn.no_logging(): sampled_learn.fit(1, lr=0.)
    sampled = sampled_learn.activation_stats.stats
    result['sampled_stats'] = {k: sampled[k][0].tolist() for k in ('mean', 'std', 'near_zero')}

    # 4 epochs of one batch per rank: saturation, exact sums and dead-unit windows across epochs (see the test).
    saturating = _learner(_dls(fm, N_ACT // world, n_train=N_ACT, n_valid=VAL_BS), _saturating_model(_act_images(fm)),
                          cbs=[ActivationStats(exact=True, sample=512, include_saturating=True),
                               GradientStats(dead_window=3)])
    with saturating.no_logging(): saturating.fit(4, lr=0.)
    acts, grads = saturating.activation_stats.stats, saturating.gradient_stats.stats
    result['saturating'] = {k: acts[k].tolist() for k in ('mean', 'std', 'saturated')}
    result['saturating'].update(bounds=acts['bounds'], dead=grads['dead'].tolist(),
                                dead_iters=grads['dead_iters'].tolist())

    # GradientAccumulation over 2 batches per rank: the global batch of a step is the single-process batches
    # 2k and 2k+1. Only the backward of the batch that steps all-reduces (counted with a DDP comm hook).
    acc_learn = _learner(_dls(fm, BS // world), _model(),
                         cbs=[GradientAccumulation(n_acc=2 * BS // world), GradientNoiseScale(), CountAllReduces()])
    with acc_learn.no_logging(): acc_learn.fit(1)
    result['acc_losses'] = acc_learn.recorder.losses
    result['acc_allreduces'] = acc_learn.count_all_reduces.calls
    result['acc_noise_scale'] = acc_learn.gradient_noise_scale.noise_scale[['bs', 'grad_sq', 'trace']].values.tolist()

    # SaveModelCallback loads the best epoch back at the end of fit. Epoch 1 is spoiled (the same noise added to
    # the weights on every rank before its validation), so the best is epoch 0, written by rank 0 alone: every
    # rank must end with those weights.
    class SpoilEpoch1(Callback):
        def after_train(self):
            if self.learn.epoch == 1:
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in self.learn.model.parameters(): p.add_(torch.randn(p.shape, generator=g))
    best_learn = _learner(_dls(fm, BS // world), _model(), path=out / f'best_rank{rank}',
                          cbs=[SaveModelCallback(), SpoilEpoch1()])
    with best_learn.no_logging(): best_learn.fit(2)
    result['best_valid_losses'] = [row[1] for row in best_learn.recorder.values]
    result['best_weights'] = torch.cat([t.flatten().float() for t in best_learn.model.state_dict().values()]).tolist()

    # A NaN input on rank 1 alone, at batch 9: the averaged loss is NaN on both ranks, both stop and both get
    # the last checkpoint before it (batch 8), which rank 0 alone wrote.
    class NaNOnRank1(Callback):
        def before_batch(self):
            if self.learn.training and rank == 1 and self.learn.iter == 9: self.learn.xb = (self.xb[0] * float('nan'),)
    nan_learn = _learner(_dls(fm, BS // world), _model(), path=out / f'nan_rank{rank}',
                         cbs=[SaveModelCallback(every_n_batches=4), TerminateOnNaNCallback(check_every=2), NaNOnRank1()])
    with warnings.catch_warnings(), nan_learn.no_logging():
        warnings.simplefilter('ignore', RuntimeWarning)
        nan_learn.fit(1)
    result['nan_bad_batch'] = list(nan_learn.terminate_on_na_n.bad_batch)
    result['nan_message'] = nan_learn.terminate_on_na_n.message
    result['nan_weights'] = torch.cat([t.flatten().float() for t in nan_learn.model.state_dict().values()]).tolist()

    # The command line, as `torchrun -m learnkit train` runs it (simple_cnn with BatchNorm), then a validation
    # of its final weights on the whole validation set by this rank alone.
    cli = train(build_parser().parse_args(['train', '--epochs', '1', '--n-train', str(N_TRAIN), '--n-valid',
                                           str(N_VALID), '--bs', str(BS // world), '--out', str(out / 'run')]))
    result['cli_values'] = cli.recorder.values
    with cli.removed_cbs(cli.distributed): result['cli_alone'] = cli.validate()
    (out / f'result_rank{rank}.json').write_text(json.dumps(result))


def _fail_worker(out):
    from learnkit import Callback
    from learnkit.callbacks.distributed import rank_distrib
    from learnkit.datasets import fashion_mnist

    class RaiseOnRank1(Callback):
        def after_batch(self):
            if rank_distrib() == 1 and self.learn.iter == 2: raise ValueError("boom on rank 1")

    _learner(_dls(fashion_mnist(), BS // 2), _model(), cbs=RaiseOnRank1()).fit(1)


if __name__ == '__main__':
    torch.set_num_threads(1)
    {'train': _train_worker, 'fail': _fail_worker}[sys.argv[1]](Path(sys.argv[2]))
