"""What any per-layer statistic costs: the floor under ActivationStats' throughput ratio.

The same fits as bench/overhead.py (the chapter's simple_cnn + BN, 10 layers with parameters, Fashion-MNIST,
bs 64, one epoch of 1cycle plus validation), with hooks on every layer with parameters that do

- nothing (the cost of PyTorch's hook dispatch);
- one op per layer: `dot(x, x)`, the least an exact on-device statistic can read;
- two dots per layer: `dot(x, 1)` and `dot(x, x)`, the sums that ActivationStats(exact=True)'s mean and std come
  from (it also shifts the values first: one more op);
- one op per layer: `index_select` of a 2048-element sample, what a sampled statistic must copy;

and ActivationStats(with_hist=True), which does only the last (one op per layer) plus the staged finish, where
the mean, std, near-zero share and histogram of every sample are computed together every 16 batches.
Runs alternate and each round's ratio is taken against that round's plain PyTorch loop; medians.

    python bench/hook_floor.py [--rounds 16]
"""
import argparse
import gc
import statistics
import time

import torch

from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.hooks import HookCallback
from learnkit.data import DataLoaders, Normalize
from learnkit.datasets import fashion_mnist
from overhead import learnkit_run, raw_loop


class PerLayerOps(HookCallback):
    "Runs `ops(flat_output)` in each hooked layer's forward hook on training batches; keeps results to the batch end."
    def __init__(self, ops): super().__init__(); self.ops, self.kept = ops, []

    def _gated_hook(self, module, inp, out):
        if self._active:
            with torch.no_grad(): self.kept.append(self.ops(out.view(-1)))

    def after_batch(self):
        super().after_batch()
        self.kept.clear()


def exact_sums():
    "dot(x, 1) and dot(x, x), with a ones vector made once per output size, as ActivationStats."
    ones = {}
    def sums(flat):
        n = flat.numel()
        if n not in ones: ones[n] = torch.ones(n)
        return torch.dot(flat, ones[n]), torch.dot(flat, flat)
    return sums


def sample_of(k=2048):
    "index_select of k sorted random positions (drawn once per output size) into a reused slot, as ActivationStats."
    positions, slot = {}, torch.empty(k)
    def gather(flat):
        n = flat.numel()
        if n not in positions: positions[n] = torch.randint(n, (k,)).sort().values
        return torch.index_select(flat, 0, positions[n], out=slot)
    return gather


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=16)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev, data = torch.device('cpu'), fashion_mnist()
    dls = DataLoaders.from_tensors(data.x_train[:20_000], data.y_train[:20_000], data.x_valid[:2_000],
                                   data.y_valid[:2_000], bs=64, batch_tfms=[Normalize()], vocab=data.classes,
                                   device=dev, seed=0)
    hooks = {
        'hooks that do nothing': lambda: PerLayerOps(lambda x: None),
        'one dot per layer': lambda: PerLayerOps(lambda x: torch.dot(x, x)),
        'two dots per layer (exact sums)': lambda: PerLayerOps(exact_sums()),
        'one 2048-sample gather per layer': lambda: PerLayerOps(sample_of()),
        'ActivationStats(with_hist=True)': lambda: ActivationStats(with_hist=True),
        'ActivationStats(with_hist=True, exact=True)': lambda: ActivationStats(with_hist=True, exact=True),
    }
    configs = {'raw PyTorch loop': lambda: raw_loop(dls, dev, 0.01)}
    configs.update({name: (lambda make=make: learnkit_run(dls, dev, 0.01, [make()])) for name, make in hooks.items()})
    for run in configs.values(): run()  # warm-up
    times = {name: [] for name in configs}
    for r in range(args.rounds):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            configs[name]()
            times[name].append(time.perf_counter() - t0)
    ref = times['raw PyTorch loop']
    print(f"simple_cnn + BN (10 hooked layers), cpu, {args.threads} threads, bs 64, {args.rounds} alternating rounds")
    print(f"{'learnkit + hooks that run':<36}{'epoch s':>9}{'ratio':>8}{'middle half':>14}")
    for name, ts in times.items():
        ratios = [r / t for r, t in zip(ref, ts)]
        q = statistics.quantiles(ratios, n=4)
        print(f"{name:<36}{statistics.median(ts):>9.2f}{statistics.median(ratios):>8.3f}{q[0]:>8.3f}-{q[2]:.3f}")


if __name__ == '__main__':
    main()
