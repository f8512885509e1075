"""Run the fault scenarios, then time checkpoint writes and reads for simple_cnn and resnet18.

    python bench/faults.py              # scenarios (tests/test_faults.py) and checkpoint timings
    python bench/faults.py --no-tests   # checkpoint timings only

The first table counts the fault scenarios of tests/test_faults.py (kill -9 and resume, crash mid-write,
malicious file, an exception from each event, Ctrl-C, bad batches) that ran and passed. The second gives, for
each model with its Adam state after one training step, the checkpoint size and the median time of
`learn.save` (the whole training state, written atomically: temporary file, fsync, rename, fsync of the
folder) and of `learn.load` (read with torch.load(weights_only=True), then restored), each beside the
hand-written checkpoint most scripts use, measured in the same run: `torch.save({'model': ..., 'opt': ...})`
to the same folder, and `torch.load` of it followed by the two `load_state_dict` calls. Ratio = learnkit / hand.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from torch import nn

from learnkit import Learner
from learnkit.data import DataLoaders
from learnkit.datasets import fashion_mnist
from learnkit.models import resnet18, simple_cnn

ROOT = Path(__file__).resolve().parent.parent


class Outcomes:
    "A pytest plugin that keeps each test's outcome."
    def __init__(self): self.results = {}

    def pytest_runtest_logreport(self, report):
        if report.when == 'call' or report.outcome != 'passed':
            self.results[report.nodeid.split('::')[-1]] = report.outcome


def run_scenarios():
    import pytest
    outcomes = Outcomes()
    pytest.main([str(ROOT / 'tests' / 'test_faults.py'), '-q', '-p', 'no:cacheprovider', '--rootdir', str(ROOT)],
                plugins=[outcomes])
    groups, skipped = {}, [name for name, outcome in outcomes.results.items() if outcome == 'skipped']
    for name, outcome in outcomes.results.items():
        if outcome == 'skipped': continue
        group = name.split('[')[0]
        ran, passed = groups.get(group, (0, 0))
        groups[group] = (ran + 1, passed + (outcome == 'passed'))
    print(f"\n{'scenario':<82} {'ran':>4} {'passed':>7}")
    for group, (ran, passed) in groups.items(): print(f"{group:<82} {ran:>4} {passed:>7}")
    total_ran, total_passed = sum(r for r, _ in groups.values()), sum(p for _, p in groups.values())
    print(f"{'total':<82} {total_ran:>4} {total_passed:>7}")
    if skipped: print(f"skipped here (they need a CUDA GPU): {', '.join(skipped)}")
    return total_ran == total_passed


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_checkpoints(repeats):
    fm = fashion_mnist()
    x, y = fm.x_train[:256], fm.y_train[:256]
    dls = DataLoaders.from_tensors(x, y, fm.x_valid[:64], fm.y_valid[:64], bs=64, device='cpu')
    print(f"\n{'model':<12} {'params':>10} {'size MiB':>9} {'save ms':>8} {'hand save ms':>13} {'ratio':>6} "
          f"{'load ms':>8} {'hand load ms':>13} {'ratio':>6}")
    for name, model in (('simple_cnn', simple_cnn(bn=True)), ('resnet18', resnet18(small_input=True))):
        learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)      # so the optimizer has its state
        with TemporaryDirectory() as tmp:
            learn.path = Path(tmp)
            hand_file = Path(tmp) / 'hand.pth'

            def hand_save(): torch.save({'model': learn.model.state_dict(), 'opt': learn.opt.state_dict()}, hand_file)

            def hand_load():
                state = torch.load(hand_file)
                learn.model.load_state_dict(state['model'])
                learn.opt.load_state_dict(state['opt'])
            save, ref_save = median_time(lambda: learn.save('ckpt'), repeats), median_time(hand_save, repeats)
            load, ref_load = median_time(lambda: learn.load('ckpt'), repeats), median_time(hand_load, repeats)
            size = (Path(tmp) / 'models' / 'ckpt.pth').stat().st_size / 2**20
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:<12} {n_params:>10,} {size:>9.2f} {save * 1e3:>8.1f} {ref_save * 1e3:>13.1f} "
              f"{save / ref_save:>6.2f} {load * 1e3:>8.1f} {ref_load * 1e3:>13.1f} {load / ref_load:>6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--no-tests', action='store_true', help='skip the fault scenarios')
    parser.add_argument('--repeats', type=int, default=5, help='timings per measurement (median)')
    args = parser.parse_args()
    torch.set_num_threads(2)
    ok = True if args.no_tests else run_scenarios()
    time_checkpoints(args.repeats)
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
