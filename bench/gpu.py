"""One epoch of 1cycle training, learnkit against a hand-written loop, on whatever device is present.

    python bench/gpu.py                   # CUDA if available, else the CPU: full Fashion-MNIST, bs 64 and 512
    python bench/gpu.py --quick           # a short run on a subset (6,400 training, 1,000 validation images)
    python bench/gpu.py --configs a,b,c   # only some configurations; (a) is always run, as the reference
    python bench/gpu.py --device cpu --quick --repeats 1 --no-ops --graph-epochs 2   # the dry run of the GPU script

The chapter's simple_cnn(bn=True), one epoch of fit_one_cycle (training on 60,000 images, drop_last, then
validation on 10,000 with loss and accuracy), for each configuration:
  a      a hand-written loop: uint8 data resident on the device, batches gathered, scaled and normalised there,
         the 1cycle schedule computed before the loop, torch AdamW as learnkit's Adam sets it up (wd 0.01 on
         weights only), zero_grad(set_to_none=True), the training loss and the validation loss and accuracy
         summed on the device and read once at the end. No host read inside the epoch.
  b      learnkit: Learner with the default callbacks (the progress display is whatever this terminal gets:
         plain epoch lines when stdout is not a tty), DataLoaders.from_tensors (device-resident uint8 cache)
  c      b + ActivationStats(with_hist=True) (on CUDA its outputs are read together after the forward pass)
  c_layer, c_batch   c with batched=False (every output read in its hook, the CPU's default) and batched=True
  d      b + to_bf16() + channels_last=True
  e      b + learn.compile()
  f      b + health_cbs(show=False): every recorder the health report reads, and the monitor (a check every 200 batches)
  g      b in graph mode: fit_one_cycle(..., graph=True), the training step captured as a CUDA graph once per fit
  g_acts g + ActivationStats(with_hist=True) (refused until ActivationStats is graph-safe: the row says so)
  a_fused, b_fused   a and b with torch's fused AdamW (learnkit: Adam(fused=True))
Each configuration runs one untimed epoch first (compilation, cuDNN autotuning, allocator warm-up); then every
configuration is timed `--repeats` times in a rotating order, so slow spells hit all of them alike.
Rows: median epoch time (s), training images/s, the speed ratio to (a) (median of per-repeat ratios), the
extra time per batch against (a) in microseconds, and the aten ops issued per batch (training and validation
batches together; counted in one more, untimed epoch; not for (e) and (g), whose ops run inside compiled or
captured graphs; --no-ops skips the count). A small CNN on a fast GPU is bound by launch overhead, so on a GPU the
extra time per batch follows the extra ops: the op count says what a configuration costs there even when this table
is printed on a CPU. A graph-mode fit captures its step at its first batch, so each one-epoch row of (g) includes one
capture; `--graph-epochs K` adds a table of fits of K epochs for a, b, c, g, g_acts: the first epoch's time, the median
of the later epochs (the steady state), and the validation accuracy at the end, graph mode against eager (every
configuration starts from the same weights; the hand loop runs K one-epoch cycles, as a time reference).
`--json PATH` also writes every row as JSON.
"""
import argparse
import json
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from learnkit import Adam, Callback, Learner, accuracy
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.schedule import combined_cos
from learnkit.data import DataLoaders, Normalize
from learnkit.datasets import fashion_mnist
from learnkit.diagnostics import OpCounter, health_cbs
from learnkit.models import simple_cnn

CONFIGS = {'a': 'hand loop', 'b': 'learnkit', 'c': '+ActStats', 'c_layer': 'ActSt/layer', 'c_batch': 'ActSt/batch',
           'd': 'bf16+c_last', 'e': 'compile', 'f': '+health', 'g': 'graph', 'g_acts': 'graph+ActSt',
           'a_fused': 'hand fused', 'b_fused': 'lk fused'}
NO_OP_COUNT = ('e', 'g', 'g_acts')  # their ops run inside compiled or captured graphs
LR_MAX, DIV, DIV_FINAL, PCT_START, MOMS, SQR_MOM, EPS, WD = 1e-2, 25., 1e5, 0.25, (0.95, 0.85, 0.95), 0.99, 1e-5, 0.01


class HandLoop:
    "The reference: the loop a careful user writes by hand, with the same data, model, optimizer and schedule."
    def __init__(self, data, bs, device, fused):
        x, y, xv, yv, self.mean, self.std = data
        self.x, self.y, self.xv, self.yv = (t.to(device) for t in (x, y, xv, yv))
        self.bs, self.device = bs, device
        self.model = simple_cnn(bn=True).to(device)
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.opt = torch.optim.AdamW([{'params': decay}, {'params': no_decay, 'weight_decay': 0.}], lr=LR_MAX,
                                     betas=(MOMS[0], SQR_MOM), eps=EPS, weight_decay=WD, fused=fused or None)
        self.mean_d, self.std_d = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (self.mean, self.std))

    def batch(self, x, y, idx):
        return (x.index_select(0, idx).float().div_(255) - self.mean_d) / self.std_d, y.index_select(0, idx)

    def fit_one_cycle(self, n_epoch=1, timer=None):
        "One epoch of 1cycle per call (`n_epoch` calls when asked for more, each timed by `timer`)."
        if n_epoch > 1 or timer is not None:
            results = []
            for _ in range(n_epoch):
                if timer is not None: timer.before_epoch()
                results.append(self.fit_one_cycle())
                if timer is not None: timer.after_epoch()
            return results[-1]
        n = len(self.x) // self.bs
        lr_sched = combined_cos(PCT_START, LR_MAX / DIV, LR_MAX, LR_MAX / DIV_FINAL)
        mom_sched = combined_cos(PCT_START, *MOMS)
        lrs = [float(lr_sched(i / n)) for i in range(n)]
        betas = [(float(mom_sched(i / n)), SQR_MOM) for i in range(n)]
        self.model.train()
        perm = torch.randperm(len(self.x), device=self.device)
        train_loss = torch.zeros((), device=self.device)
        for i in range(n):
            xb, yb = self.batch(self.x, self.y, perm[i * self.bs:(i + 1) * self.bs])
            for g in self.opt.param_groups: g['lr'], g['betas'] = lrs[i], betas[i]
            loss = F.cross_entropy(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            train_loss += loss.detach()
        self.model.eval()
        valid_loss, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        with torch.no_grad():
            for idx in torch.arange(len(self.xv), device=self.device).split(self.bs):
                xb, yb = self.batch(self.xv, self.yv, idx)
                pred = self.model(xb)
                valid_loss += F.cross_entropy(pred, yb, reduction='sum')
                correct += (pred.argmax(1) == yb).sum()
        return torch.stack([train_loss / n, valid_loss / len(self.xv), correct / len(self.xv)]).tolist()


class LearnkitRun:
    "One learnkit configuration: a Learner built once, trained one epoch of fit_one_cycle per call."
    def __init__(self, name, data, bs, device):
        x, y, xv, yv, mean, std = data
        dls = DataLoaders.from_tensors(x, y, xv, yv, bs=bs, batch_tfms=[Normalize.from_stats(mean, std)],
                                       device=device, seed=0)
        opt_func = partial(Adam, mom=MOMS[0], sqr_mom=SQR_MOM, eps=EPS, wd=WD, fused=True if name == 'b_fused' else None)
        self.learn = Learner(dls, simple_cnn(bn=True), loss_func=nn.CrossEntropyLoss(), metrics=accuracy,
                             opt_func=opt_func, device=device, channels_last=name == 'd')
        if name == 'd': self.learn.to_bf16()
        if name == 'e': self.learn.compile()
        self.name, self.with_acts, self.graph = name, name.startswith('c') or name == 'g_acts', name.startswith('g')

    def fit_one_cycle(self, n_epoch=1, timer=None):
        batched = {'c_layer': False, 'c_batch': True}.get(self.name)
        cbs = [ActivationStats(with_hist=True, batched=batched)] if self.with_acts else []
        if self.name == 'f': cbs += health_cbs(show=False)
        if timer is not None: cbs.append(timer)
        with self.learn.no_logging():
            self.learn.fit_one_cycle(n_epoch, LR_MAX, div=DIV, div_final=DIV_FINAL, pct_start=PCT_START, moms=MOMS,
                                     cbs=cbs, graph=self.graph)
        return self.learn.recorder.values[-1]


class EpochTimer(Callback):
    "Wall time of each epoch (training and validation), the device synced at both ends: for the graph-mode table."
    order = 100

    def __init__(self, sync): self.sync, self.times = sync, []
    def before_epoch(self):
        self.sync()
        self._start = time.perf_counter()
    def after_epoch(self):
        self.sync()
        self.times.append(time.perf_counter() - self._start)


def load_data(quick):
    fm = fashion_mnist()
    n, nv = (6400, 1000) if quick else (len(fm.x_train), len(fm.x_valid))
    x, xv = fm.x_train[:n, None], fm.x_valid[:nv, None]
    mean, std = x.float().div(255).mean().item(), x.float().div(255).std().item()
    return x, fm.y_train[:n], xv, fm.y_valid[:nv], mean, std


def make_runs(names, data, bs, device):
    "Each configuration built from the same seed: the same initial weights, so their accuracies compare."
    runs = {}
    for k in names:
        torch.manual_seed(0)
        runs[k] = HandLoop(data, bs, device, fused=k == 'a_fused') if k.startswith('a') else LearnkitRun(k, data, bs, device)
    return runs


def refused(names, runs):
    "Configurations whose fit is refused (a callback graph mode cannot run yet): {name: the reason}, left out."
    out = {}
    for k in names:
        try: runs[k].fit_one_cycle()
        except ValueError as e: out[k] = str(e).split('\n')[0]
    return out


def bench_bs(bs, names, data, device, repeats, sync, count_ops=True):
    runs = make_runs(names, data, bs, device)
    skipped = refused([k for k in names if k == 'g_acts'], runs)
    names = [k for k in names if k not in skipped]
    runs = {k: runs[k] for k in names}

    def timed(run):
        sync()
        start = time.perf_counter()
        result = run.fit_one_cycle()
        sync()
        return time.perf_counter() - start, result

    warm = {k: timed(r) for k, r in runs.items()}
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]: times[k].append(timed(runs[k])[0])
    n_train = len(data[0]) // bs
    n_batches = n_train + -(-len(data[2]) // bs)
    rows = {}
    for k in names:
        t = statistics.median(times[k])
        ratio = statistics.median(a / x for a, x in zip(times['a'], times[k]))
        extra_us = (t - statistics.median(times['a'])) / n_batches * 1e6
        ops = ops_per_batch(runs[k], n_batches) if count_ops else float('nan')
        rows[k] = (t, n_train * bs / t, ratio, extra_us, warm[k][0], warm[k][1], ops)
    return rows, skipped


def graph_table(bs, names, data, device, n_epoch, sync):
    "Fits of n_epoch epochs: first epoch, median later epoch, final accuracy; graph mode against eager."
    runs = make_runs(names, data, bs, device)
    rows = {}
    for k in names:
        timer = EpochTimer(sync)
        try: result = runs[k].fit_one_cycle(n_epoch, timer)
        except ValueError as e:
            rows[k] = {'refused': str(e).split('\n')[0]}
            continue
        rows[k] = {'first_epoch_s': timer.times[0], 'later_epoch_s': statistics.median(timer.times[1:] or timer.times),
                   'valid_acc': result[-1]}
    return rows


def print_graph_table(bs, rows, n_epoch):
    print(f"\nbs {bs}, fit_one_cycle({n_epoch}): {'first epoch (s)':>16}{'later epochs (s)':>18}{'valid acc':>11}")
    for k, r in rows.items():
        if 'refused' in r: print(f"({k}) {CONFIGS[k]:<14} refused: {r['refused']}")
        else: print(f"({k}) {CONFIGS[k]:<14}{r['first_epoch_s']:>16.3f}{r['later_epoch_s']:>18.3f}{r['valid_acc']:>11.4f}")


def ops_per_batch(run, n_batches):
    if getattr(run, 'name', None) in NO_OP_COUNT: return float('nan')
    with OpCounter() as counter: run.fit_one_cycle()
    return counter.n / n_batches


def device_name(device):
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(bs, rows, names, skipped):
    names = [k for k in names if k in rows]
    w = 13
    print(f"\n{f'bs {bs}':<20}" + ''.join(f"{f'({k})':>{w}}" for k in names))
    for label, i, fmt in (('epoch time (s)', 0, '{:.3f}'), ('images/s', 1, '{:,.0f}'), ('ratio to (a)', 2, '{:.3f}'),
                          ('extra us/batch', 3, '{:+.1f}'), ('aten ops/batch', 6, '{:.1f}'), ('warm-up (s)', 4, '{:.2f}')):
        print(f"{label:<20}" + ''.join(f"{fmt.format(rows[k][i]):>{w}}" for k in names))
    print(f"{'valid acc (warm-up)':<20}" + ''.join(f"{rows[k][5][-1]:>{w}.4f}" for k in names))
    if 'a_fused' in rows and 'b_fused' in rows:
        print(f"(b_fused)/(a_fused) = {rows['a_fused'][0] / rows['b_fused'][0]:.3f}")
    for k, why in skipped.items(): print(f"({k}) refused: {why}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='6,400 training images, 1 repeat (on the CPU unless --device)')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when there is one and not --quick)')
    p.add_argument('--no-ops', action='store_true', help='skip the op count (one more epoch per configuration)')
    p.add_argument('--graph-epochs', type=int, default=0, help='add the graph-mode table: fits of this many epochs')
    p.add_argument('--graph-only', action='store_true', help='only the graph-mode table (with --graph-epochs)')
    p.add_argument('--json', default=None, help='also write every row to this file as JSON')
    p.add_argument('--bs', default='64,512')
    p.add_argument('--repeats', type=int, default=None, help='timed repeats per configuration (default 5; 1 with --quick)')
    p.add_argument('--configs', default=','.join(CONFIGS), help=f"which of {','.join(CONFIGS)}")
    p.add_argument('--threads', type=int, default=2, help='CPU threads (CPU runs)')
    args = p.parse_args()
    names = ['a'] + [k for k in args.configs.split(',') if k != 'a']
    unknown = [k for k in names if k not in CONFIGS]
    if unknown: raise SystemExit(f"unknown configs {unknown}; choose from {','.join(CONFIGS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ('cpu' if args.quick or not torch.cuda.is_available() else 'cuda'))
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    repeats = args.repeats or (1 if args.quick else 5)
    data = load_data(args.quick)
    mode = 'tty' if sys.stdout.isatty() else 'not a tty (epoch lines only)'
    print(f"device: {device_name(device)} | torch {torch.__version__} | simple_cnn(bn=True) | {len(data[0]):,} training "
          f"+ {len(data[2]):,} validation images | one epoch of fit_one_cycle | median of {repeats} | stdout {mode}")
    if not args.graph_only: print('  '.join(f"({k}) {CONFIGS[k]}" for k in names))
    report = {'device': device_name(device), 'torch': torch.__version__, 'repeats': repeats, 'tables': {}, 'graph': {}}
    if args.graph_only and not args.graph_epochs: raise SystemExit("--graph-only needs --graph-epochs K")

    def save():  # after every table, so a run stopped part-way keeps what it measured
        if args.json:
            with open(args.json, 'w') as f: json.dump(report, f, indent=1, default=str)
    for bs in (int(b) for b in args.bs.split(',')) if not args.graph_only else ():
        torch.manual_seed(0)
        rows, skipped = bench_bs(bs, names, data, device, repeats, sync, count_ops=not args.no_ops)
        print_table(bs, rows, names, skipped)
        report['tables'][bs] = {'rows': {k: dict(zip(('epoch_s', 'images_per_s', 'ratio_to_a', 'extra_us_per_batch',
                                                      'warmup_s', 'warmup_values', 'ops_per_batch'), v))
                                         for k, v in rows.items()}, 'refused': skipped}
        save()
    for bs in (int(b) for b in args.bs.split(',')) if args.graph_epochs else ():
        torch.manual_seed(0)
        report['graph'][bs] = rows = graph_table(bs, ['a', 'b', 'c', 'g', 'g_acts'], data, device, args.graph_epochs, sync)
        print_graph_table(bs, rows, args.graph_epochs)
        save()


if __name__ == '__main__':
    main()
