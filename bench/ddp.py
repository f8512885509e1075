"""Data-parallel throughput: training images/s under torchrun, 1 process vs 2, side by side in one run.

    python bench/ddp.py [--n-train 12800] [--epochs 2] [--bs 64] [--threads 2] [--model simple_cnn|resnet18]

CPU rows (gloo): one process with all `--threads` threads, then 2 processes with threads/2 each, so both use the
same cores. GPU rows (nccl), when CUDA is there: one process without and with DistributedCallback (the cost of
DDP itself), and 2 processes on 2 GPUs when there are two. `bs` is per process, so 2 processes train with twice
the global batch, as DDP users do. Images/s counts the training images of every rank over the training time of
the timed epochs (one warm-up epoch first; validation not timed). Each row is a separate torchrun job.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def worker(args):
    "One rank of one configuration: train, time the training phases, rank 0 writes the figures."
    from torch import nn

    from learnkit import Callback, Learner
    from learnkit.callbacks.distributed import DistributedCallback, is_rank0, num_distrib
    from learnkit.data import DataLoaders, Normalize
    from learnkit.datasets import fashion_mnist
    from learnkit.metrics import batch_size
    from learnkit.models import get_model

    class TrainTimer(Callback):
        "Training images and seconds over the epochs after the first (host metadata only, one sync per epoch)."
        def before_fit(self): self.images, self.seconds = 0, 0.
        def before_train(self):
            _sync(self.learn.device)
            self.start, self.epoch_images = time.perf_counter(), 0
        def after_batch(self):
            if self.learn.training: self.epoch_images += batch_size(self.learn)
        def after_train(self):
            _sync(self.learn.device)
            if self.learn.epoch > 0:
                self.images += self.epoch_images
                self.seconds += time.perf_counter() - self.start

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fm = fashion_mnist()
    n = args.n_train
    dls = DataLoaders.from_tensors(fm.x_train[:n], fm.y_train[:n], fm.x_valid[:1000], fm.y_valid[:1000], bs=args.bs,
                                   batch_tfms=[Normalize.from_stats(0.286, 0.353)], device=device, seed=0)
    kwargs = {'bn': True} if args.model == 'simple_cnn' else {'n_out': 10, 'in_ch': 1}
    model = get_model(args.model, **kwargs)
    cbs = [TrainTimer()] + ([DistributedCallback()] if args.ddp and num_distrib() == 1 else [])
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=cbs, device=device)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.epochs + 1, 1e-2)
    if is_rank0():
        timer = learn.train_timer
        images_per_s = timer.images * num_distrib() / timer.seconds
        Path(args.worker).write_text(json.dumps({'images_per_s': images_per_s, 'world': num_distrib()}))


def run_config(args, device, procs, threads, ddp):
    "Launch one torchrun job; returns its images/s."
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'result.json'
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', __file__,
               '--worker', str(out), '--device', device, '--threads', str(threads), '--n-train', str(args.n_train),
               '--epochs', str(args.epochs), '--bs', str(args.bs), '--model', args.model] + (['--ddp'] if ddp else [])
        env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun job failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())['images_per_s']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n-train', type=int, default=12800, help='training images (a Fashion-MNIST slice)')
    p.add_argument('--epochs', type=int, default=2, help='timed epochs (after one warm-up epoch)')
    p.add_argument('--bs', type=int, default=64, help='batch size per process')
    p.add_argument('--threads', type=int, default=2, help='CPU threads in all (split between the processes)')
    p.add_argument('--model', default='simple_cnn', help="a learnkit.models registry name (simple_cnn, resnet18...)")
    p.add_argument('--no-cpu', action='store_true', help='GPU rows only')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--device', default='cpu', help=argparse.SUPPRESS)
    p.add_argument('--ddp', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker: return worker(args)

    configs = [] if args.no_cpu else [('cpu', 1, args.threads, False), ('cpu', 2, max(args.threads // 2, 1), True)]
    n_gpu = torch.cuda.device_count()
    if n_gpu: configs += [('cuda', 1, args.threads, False), ('cuda', 1, args.threads, True)]
    if n_gpu >= 2: configs += [('cuda', 2, max(args.threads // 2, 1), True)]
    print(f"{args.model}, {args.n_train} Fashion-MNIST images, bs {args.bs} per process, {args.epochs} timed epochs"
          + (f", GPU: {torch.cuda.get_device_name(0)} x{n_gpu}" if n_gpu else ", no GPU"))
    print(f"{'device':8}{'procs':>6}{'threads/proc':>14}{'DDP':>5}{'global bs':>11}{'images/s':>11}{'vs 1 proc':>11}")
    base = {}
    for device, procs, threads, ddp in configs:
        rate = run_config(args, device, procs, threads, ddp)
        base.setdefault(device, rate)
        print(f"{device:8}{procs:>6}{threads:>14}{'yes' if ddp else 'no':>5}{args.bs * procs:>11}{rate:>11.0f}"
              f"{rate / base[device]:>10.2f}x", flush=True)


if __name__ == '__main__':
    main()
