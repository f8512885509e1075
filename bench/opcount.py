"""What the loop and the statistics callbacks cost per training batch, in aten ops: the GPU cost, on any device.

A small CNN on a fast GPU is bound by kernel launches, so the ops a callback adds per batch are what it costs
there; unlike a timing, the count is the same on every run. Each figure is the difference between fits of 64
and 32 training batches (so one-off set-up drops out), divided by 32, on the chapter's simple_cnn(bn=True)
(10 layers with parameters, 4 ReLUs) at bs 64 on the CPU.

    python bench/opcount.py
"""
import torch
import torch.nn.functional as F

from learnkit import Learner
from learnkit.callbacks.activations import ActivationStats
from learnkit.callbacks.gradients import GradientStats
from learnkit.data import DataLoaders, Normalize
from learnkit.datasets import fashion_mnist
from learnkit.diagnostics import OpCounter
from learnkit.models import simple_cnn

BS = 64


def learner(data, n_batches, cbs=()):
    "The chapter's model on `n_batches` training batches (and one validation batch), seeded."
    n = n_batches * BS
    dls = DataLoaders.from_tensors(data.x_train[:n], data.y_train[:n], data.x_valid[:BS], data.y_valid[:BS], bs=BS,
                                   batch_tfms=[Normalize()], device='cpu', seed=0)
    torch.manual_seed(0)
    return Learner(dls, simple_cnn(bn=True), loss_func=F.cross_entropy, cbs=list(cbs), device='cpu')


def fit_ops(data, n_batches, make_cbs):
    learn = learner(data, n_batches, make_cbs())
    with OpCounter() as counter, learn.no_logging(): learn.fit(1, 0.01)
    return counter.n


def per_batch(data, make_cbs):
    return (fit_ops(data, 64, make_cbs) - fit_ops(data, 32, make_cbs)) / 32


def hand_loop_ops(data, n_batches):
    "The loop a user writes by hand on the same loader, model and optimizer."
    learn = learner(data, n_batches)
    learn.create_opt()
    with OpCounter() as counter:
        for xb, yb in learn.dls.train:
            F.cross_entropy(learn.model(xb), yb).backward()
            learn.opt.step()
            learn.opt.zero_grad()
    return counter.n


def main():
    torch.set_num_threads(2)
    data = fashion_mnist()
    loop = per_batch(data, list)
    hand = (hand_loop_ops(data, 64) - hand_loop_ops(data, 32)) / 32
    rows = [('hand-written loop (forward, loss, backward, step, zero_grad)', hand, None),
            ('learnkit fit, default callbacks', loop, loop - hand)]
    for label, make in (('+ ActivationStats(with_hist=True, batched=False)  [CPU default]',
                         lambda: [ActivationStats(with_hist=True, batched=False)]),
                        ('+ ActivationStats(with_hist=True, batched=True)   [CUDA default]',
                         lambda: [ActivationStats(with_hist=True, batched=True)]),
                        ('+ ActivationStats(with_hist=True, exact=True, batched=False)',
                         lambda: [ActivationStats(with_hist=True, exact=True, batched=False)]),
                        ('+ ActivationStats(with_hist=True, exact=True, batched=True)',
                         lambda: [ActivationStats(with_hist=True, exact=True, batched=True)]),
                        ('+ GradientStats()', lambda: [GradientStats()])):
        ops = per_batch(data, make)
        rows.append((label, ops, ops - loop))
    print(f"aten ops per training batch, simple_cnn(bn=True), bs {BS}, torch {torch.__version__}")
    print(f"{'configuration':<66}{'ops/batch':>10}{'added':>8}")
    for label, ops, added in rows:
        print(f"{label:<66}{ops:>10.1f}{'' if added is None else f'{added:+.1f}':>8}")


if __name__ == '__main__':
    main()
