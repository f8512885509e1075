"""The command line as a user runs it: help, a short training run, the run directory, bad flags."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'learnkit', *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_help_explains_every_flag():
    out = run_cli('train', '--help').stdout
    for flag in ('--epochs', '--lr', '--bs', '--bn', '--no-bn', '--one-cycle', '--no-one-cycle', '--data', '--out',
                 '--seed'):
        assert flag in out
    assert run_cli('--help').returncode == 0


def test_train_writes_a_run_directory(tmp_path):
    out = tmp_path / 'run'
    res = run_cli('train', '--epochs', '1', '--n-train', '1000', '--n-valid', '500', '--out', str(out))
    assert res.returncode == 0, res.stderr
    assert 'train_loss' in res.stdout and 'valid_loss' in res.stdout
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 1 and float(rows[0]['accuracy']) > 0.3   # chance is 0.1
    assert json.loads((out / 'config.json').read_text())['bn'] is True
    for f in ('model.pt', 'plots/loss.png', 'plots/schedule.png', 'plots/layer_stats.png', 'plots/color_dim.png',
              'plots/gradients.png'):
        assert (out / f).stat().st_size > 0
    report = (out / 'report.md').read_text()
    assert report.startswith('#') and 'collapse' in report.lower()


def test_bad_flags_and_missing_data_are_reported(tmp_path):
    res = run_cli('train', '--epochs', '0', '--out', str(tmp_path))
    assert res.returncode != 0 and '--epochs must be at least 1' in res.stderr
    res = run_cli('train', '--data', str(tmp_path), '--out', str(tmp_path / 'r'))
    assert res.returncode != 0 and 'dataset-fashion-mnist' in res.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / 'README.md').read_text()
    ci = (ROOT / '.ci' / 'run').read_text()
    test_cmd = next(l.strip() for l in readme.splitlines() if 'pytest' in l and l.strip().startswith('bash'))
    assert test_cmd in ci
