"""The command line as a user runs it: help, a short training run, the run directory, a user's own image folders
(written to tmp_path from real Fashion-MNIST images), fine-tuning from weights a run wrote, and bad flags and data,
each refused at once with one line on stderr and exit status 2."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from learnkit.cli import main

ROOT = Path(__file__).parent.parent
# torchvision 0.29 deprecates its image codecs (for torchcodec); the tests write images with them.
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning:torchvision')
CLASSES = {1: 'trouser', 8: 'bag'}


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
    assert res.returncode == 2 and res.stderr.count('\n') == 1 and 'argument --epochs: must be greater than 0' in res.stderr
    res = run_cli('train', '--data', str(tmp_path), '--out', str(tmp_path / 'r'))
    assert res.returncode != 0 and 'dataset-fashion-mnist' in res.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / 'README.md').read_text()
    ci = (ROOT / '.ci' / 'run').read_text()
    test_cmd = next(l.strip() for l in readme.splitlines() if 'pytest' in l and l.strip().startswith('bash'))
    assert test_cmd in ci


def write_tree(root, fmnist, layout, n=12, sizes=(28,)):
    """`n` real images of each class in CLASSES as PNGs: `layout` 'split' writes train/<label>/ and (every fourth)
    valid/<label>/, 'flat' writes <label>/. Image i is sizes[i % len(sizes)] pixels square."""
    for c, label in CLASSES.items():
        for k, i in enumerate((fmnist.y_train == c).nonzero().flatten()[:n].tolist()):
            size = sizes[k % len(sizes)]
            img = torch.nn.functional.interpolate(fmnist.x_train[i][None, None].float(), size=size).to(torch.uint8)[0]
            folder = root / label if layout == 'flat' else root / ('valid' if k % 4 == 0 else 'train') / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f'{k}.png').write_bytes(encode_png(img).numpy().tobytes())
    return root


def train(tmp_path, capsys, *flags):
    "Run `learnkit train` in this process; its stdout and the run directory."
    out = tmp_path / 'run'
    assert main(['train', '--epochs', '1', '--bs', '8', '--seed', '0', '--out', str(out), *flags]) == 0
    return capsys.readouterr().out, out


def test_trains_on_an_image_folder_with_train_and_valid_folders(tmp_path, fmnist, capsys):
    data = write_tree(tmp_path / 'pets', fmnist, 'split', sizes=(28, 40, 33))
    stdout, out = train(tmp_path, capsys, '--data', str(data), '--size', '32', '--no-diagnostics')
    assert '18 train / 6 valid images, 2 classes' in stdout
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 1 and 0 <= float(rows[0]['accuracy']) <= 1
    config = json.loads((out / 'config.json').read_text())
    assert config['data_kind'] == 'images' and config['bn'] is True and config['size'] == 32
    for f in ('model.pt', 'plots/loss.png', 'plots/schedule.png'):
        assert (out / f).stat().st_size > 0
    assert torch.load(out / 'model.pt')['0.0.weight'].shape[1] == 3   # PNGs are read as RGB


def test_valid_pct_holds_out_part_of_a_folder_of_class_folders(tmp_path, fmnist, capsys):
    data = write_tree(tmp_path / 'flat', fmnist, 'flat', n=10)
    stdout, out = train(tmp_path, capsys, '--data', str(data), '--valid-pct', '0.25', '--no-diagnostics')
    assert '15 train / 5 valid images' in stdout and (out / 'metrics.csv').is_file()


def test_torchvision_arch_and_fine_tune_from_weights_a_run_wrote(tmp_path, fmnist, capsys):
    data = write_tree(tmp_path / 'pets', fmnist, 'split', n=8)
    stdout, out = train(tmp_path, capsys, '--data', str(data), '--model', 'squeezenet1_1', '--no-diagnostics')
    state = torch.load(out / 'model.pt')   # vision_learner's model: Sequential(body, head)
    assert 'squeezenet1_1 on' in stdout and any(k.startswith('0.') for k in state) and state['1.8.weight'].shape[0] == 2

    first = tmp_path / 'lenet'
    assert main(['train', '--data', str(data), '--model', 'lenet', '--epochs', '1', '--bs', '8', '--out', str(first),
                 '--no-diagnostics']) == 0
    capsys.readouterr()
    stdout, out = train(tmp_path, capsys, '--data', str(data), '--model', 'lenet', '--fine-tune', '--weights',
                        str(first / 'model.pt'), '--no-diagnostics')
    assert f'fine-tuned from {first}' in stdout and 'fine_tune(1, 0.002)' in stdout
    assert stdout.count('train_loss') == 2   # the frozen epoch, then the unfrozen one
    assert json.loads((out / 'config.json').read_text())['lr'] == 0.002


@pytest.mark.parametrize('flags, says', [
    (['--lr', '-1'], 'argument --lr: must be greater than 0'),
    (['--lr', '0'], 'argument --lr: must be greater than 0'),
    (['--epochs', '0'], 'argument --epochs: must be greater than 0'),
    (['--bs', '0'], 'argument --bs: must be greater than 0'),
    (['--valid-pct', '1'], 'argument --valid-pct: must be between 0 and 1'),
    (['--valid-pct', '0'], 'argument --valid-pct: must be between 0 and 1'),
    (['--model', 'resnet181'], '--model resnet181: no learnkit model or torchvision classifier'),
    (['--data', '{tmp}/nowhere'], '--data {tmp}/nowhere: no such folder'),
    (['--fine-tune'], '--fine-tune starts from pretrained weights: pass --weights FILE'),
    (['--fine-tune', '--weights', '{tmp}/missing.pt'], '--weights {tmp}/missing.pt: no such file'),
    (['--weights', '{tmp}/missing.pt'], '--weights is read only by --fine-tune'),
    (['--model', 'lenet', '--no-bn'], '--no-bn applies to models built with a bn argument'),
    (['--data', '{tmp}/empty'], 'holds neither Fashion-MNIST\'s IDX files (train-images-idx3-ubyte.gz'),
    (['--data', '{tmp}/flat'], 'holds images but no train/ and valid/ folders (folders present: bag, trouser)'),
    (['--data', '{tmp}/flat', '--valid-pct', '0.2', '--n-train', '5'], '--n-train does not apply to an image folder'),
    (['--valid-pct', '0.2'], '--valid-pct does not apply to Fashion-MNIST IDX files'),
    (['--data', '{tmp}/mixed'], 'Images differ in size'),
    (['--data', '{tmp}/mixed', '--size', '28'], '--bs 64 is more than the 4 training images'),
])
def test_user_errors_are_one_line_and_exit_status_2(tmp_path, fmnist, capsys, flags, says):
    (tmp_path / 'empty').mkdir()
    if any('flat' in f for f in flags): write_tree(tmp_path / 'flat', fmnist, 'flat', n=2)
    if any('mixed' in f for f in flags): write_tree(tmp_path / 'mixed', fmnist, 'split', n=3, sizes=(28, 28, 30))
    with pytest.raises(SystemExit) as exit:
        main(['train', '--out', str(tmp_path / 'run'), *[f.format(tmp=tmp_path) for f in flags]])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    assert err.startswith('learnkit train: error: ') and says.format(tmp=tmp_path) in err
    assert not (tmp_path / 'run').exists()   # refused before anything was written
    if says == 'Images differ in size': assert 'On the command line: --size SIZE' in err
