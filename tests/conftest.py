"""Shared fixtures: real Fashion-MNIST slices, kept small so the suite stays fast."""
import os

import matplotlib
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

matplotlib.use('Agg')
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def fmnist():
    "The whole Fashion-MNIST data set as uint8 tensors (read once per session, ~0.5 s)."
    from learnkit.datasets import fashion_mnist
    return fashion_mnist()


def normalized_slice(fm, n_train, n_valid):
    "Float (N,1,28,28) tensors normalised with the training slice's statistics, and int64 labels."
    x = fm.x_train[:n_train].float().div(255).unsqueeze(1)
    xv = fm.x_valid[:n_valid].float().div(255).unsqueeze(1)
    mean, std = x.mean(), x.std()
    return (x - mean) / std, fm.y_train[:n_train], (xv - mean) / std, fm.y_valid[:n_valid]


def torch_dls(fm, n_train=1000, n_valid=500, bs=64, seed=0):
    "learnkit DataLoaders over plain torch DataLoaders, as a user without DataBlock would build them."
    from learnkit.data import DataLoaders
    x, y, xv, yv = normalized_slice(fm, n_train, n_valid)
    g = torch.Generator().manual_seed(seed)
    return DataLoaders(DataLoader(TensorDataset(x, y), bs, shuffle=True, drop_last=True, generator=g),
                       DataLoader(TensorDataset(xv, yv), bs * 2))


@pytest.fixture
def tiny_dls(fmnist):
    "1000 training and 500 validation images in plain torch DataLoaders, bs 64."
    return torch_dls(fmnist)


def tiny_cnn():
    "A small model for loop tests (the chapter's models live in learnkit.models)."
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
