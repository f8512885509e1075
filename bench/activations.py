"""Throughput of a plain PyTorch training loop with and without activation statistics, in one process.

    python bench/activations.py                      # simple_cnn and simple_cnn(bn=True), bs 64, CPU, 2 threads
    python bench/activations.py --bs 512 --repeats 9
    python bench/activations.py --device cuda        # on a GPU

Variants, each hooking every layer with parameters on every training batch (each run trains the model from the
same initial weights):
  plain        the loop alone: forward, cross-entropy, backward, Adam step, on batches already in memory
  learnkit     + learnkit's ActivationStats(with_hist=True) (mean, std, near_zero and histograms from a
               2048-element sample, records on the device)
  exact        + ActivationStats(with_hist=True, exact=True) (mean and std from every element, the rest sampled)
  exact_hist   + ActivationStats(with_hist=True, sample=None) (every element counted and histogrammed)
  no_hist      + ActivationStats() (mean, std, near_zero only)
  sample4k     + ActivationStats(with_hist=True, sample=4096) (a larger sample)
  naive        + a straightforward on-device hook: mean, std, (o <= 0.05).float().mean(), histc(40, 0, 10),
                 kept in Python lists (no sync, but many kernels)
  fastai       + fastai's hook: the same, read with .item() three times per layer per batch
The variants run in turn, in a rotating order, `--repeats` times; the table shows each variant's median
time per batch and its throughput relative to `plain` (the median of the per-repeat ratios, so slow
spells on a shared machine hit both sides of a ratio alike), by the wall clock and by the process's CPU
time. On a busy machine the CPU-time ratio is the steadier one: time the process spends descheduled
counts in neither (with several threads, spin-waiting at parallel regions still counts).
"""
import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.hooks import Hooks, default_modules
from learnkit.datasets import fashion_mnist
from learnkit.models import simple_cnn


def naive_hook(m, i, o):
    return {'mean': o.mean(), 'std': o.std(), 'near_zero': (o <= 0.05).float().mean(), 'hist': o.histc(40, 0, 10)}


def fastai_hook(m, i, o):
    o = o.float()
    return {'mean': o.mean().item(), 'std': o.std().item(),
            'near_zero': (o <= 0.05).long().sum().item() / o.numel(), 'hist': o.histc(40, 0, 10)}


class PlainHooks:
    "Drive a hook function over every parameterised layer, storing its results per batch as fastai does."
    def __init__(self, model, fn): self.model, self.fn, self.stats = model, fn, []
    def start(self): self.hooks = Hooks(default_modules(self.model), self.fn)
    def before_batch(self): pass
    def after_batch(self): self.stats.append(self.hooks.stored)
    def stop(self): self.hooks.remove()


class CallbackDriver:
    "Run a learnkit callback's hooks from a plain loop: a stand-in learner with the state the callback reads."
    def __init__(self, model, cb, device):
        self.cb, self.learn = cb, SimpleNamespace(model=model, training=True, train_iter=0, device=device)
    def start(self):
        self.cb.learn = self.learn
        self.cb.before_fit()
    def before_batch(self): self.cb.before_batch()
    def after_batch(self):
        self.cb.after_batch()
        self.learn.train_iter += 1
    def stop(self): self.cb.cleanup_fit()


def make_variant(name, model, device):
    if name == 'plain': return None
    if name == 'learnkit': return CallbackDriver(model, ActivationStats(with_hist=True), device)
    if name == 'exact': return CallbackDriver(model, ActivationStats(with_hist=True, exact=True), device)
    if name == 'exact_hist': return CallbackDriver(model, ActivationStats(with_hist=True, sample=None), device)
    if name == 'no_hist': return CallbackDriver(model, ActivationStats(), device)
    if name == 'sample4k': return CallbackDriver(model, ActivationStats(with_hist=True, sample=4096), device)
    return PlainHooks(model, {'naive': naive_hook, 'fastai': fastai_hook}[name])


def run(model, opt, batches, variant, sync):
    "Train on `batches` with `variant`'s hooks; (wall seconds, process CPU seconds) per batch."
    if variant is not None: variant.start()
    try:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for xb, yb in batches:
            if variant is not None: variant.before_batch()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if variant is not None: variant.after_batch()
        sync()
        return (time.perf_counter() - start) / len(batches), (time.process_time() - cpu_start) / len(batches)
    finally:
        if variant is not None: variant.stop()


def bench(bn, args, device, sync):
    torch.manual_seed(0)
    ds = fashion_mnist()
    x = (ds.x_train[:args.bs * args.batches, None].float() / 255 - 0.286) / 0.353
    batches = [(xb.to(device), yb.to(device)) for xb, yb in zip(x.split(args.bs), ds.y_train.split(args.bs))]
    model = simple_cnn(bn=bn).to(device)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    def fresh():
        "Every run trains the same model from the same weights, so every variant sees the same workload."
        model.load_state_dict(init)
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    names = args.variants.split(',')
    times = {n: [] for n in names}
    run(model, fresh(), batches[:5], None, sync)  # warm up
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order: times[n].append(run(model, fresh(), batches, make_variant(n, model, device), sync))
    rows = []
    for n in names:
        row = [f"simple_cnn(bn={bn})", n]
        for clock in (0, 1):
            ratios = [p[clock] / t[clock] for p, t in zip(times['plain'], times[n])]
            row += [statistics.median(t[clock] for t in times[n]) * 1e3, statistics.median(ratios)]
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--batches', type=int, default=30, help='batches per timed run')
    p.add_argument('--repeats', type=int, default=15)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--variants', default='plain,learnkit,exact,exact_hist,naive,fastai')
    p.add_argument('--bn', default='false,true', help="which models: 'false' (simple_cnn), 'true' (with BN), or both")
    args = p.parse_args()
    if not args.variants.startswith('plain'): raise SystemExit("--variants must start with 'plain', the reference")
    torch.set_num_threads(args.threads)
    # Subnormal floats (which a long run of tiny updates produces in the optimizer state) are ~100x slower on the
    # CPU and would make every variant crawl at random points: flush them to zero.
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    rows = [row for bn in args.bn.split(',') for row in bench(bn == 'true', args, device, sync)]
    print(f"device={device} threads={args.threads} bs={args.bs} batches/run={args.batches} repeats={args.repeats}")
    print(f"{'model':<22}{'variant':<12}{'wall ms':>10}{'x plain':>10}{'cpu ms':>10}{'x plain':>10}")
    for model, variant, ms, ratio, cpu_ms, cpu_ratio in rows:
        print(f"{model:<22}{variant:<12}{ms:>10.2f}{ratio:>10.3f}{cpu_ms:>10.2f}{cpu_ratio:>10.3f}")


if __name__ == '__main__':
    main()
