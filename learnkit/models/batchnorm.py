"""Batch normalization written from its equations (the chapters' BatchNorm), a drop-in for nn.BatchNorm1d/2d."""
import torch
from torch import nn

__all__ = ['BatchNorm']


class BatchNorm(nn.Module):
    """BatchNorm from the equations, for (N, C) and (N, C, H, W) inputs.

    Training: normalise with the batch mean and (biased) variance over every axis but the
    channel axis, `y = (x - mean) / sqrt(var + eps)`, return `weight * y + bias` (the chapters'
    gamma and beta), and move the running statistics toward the batch's:
    `running = (1 - momentum) * running + momentum * batch`, where the running variance takes the
    *unbiased* batch variance (times n/(n-1)), as nn.BatchNorm does. Evaluation: normalise with
    the running statistics. Parameter and buffer names match nn.BatchNorm2d, so state dicts load
    either way.
    """
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"BatchNorm: momentum must be a number in [0, 1] (the running statistics' update "
                             f"weight); got {momentum!r}. nn.BatchNorm's momentum=None (a cumulative average) is not supported")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 4) or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) takes (N, {self.num_features}) or "
                             f"(N, {self.num_features}, H, W) inputs; got shape {tuple(x.shape)}")
        axes = (0,) if x.dim() == 2 else (0, 2, 3)
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast per-channel vectors over x
        if self.training:
            n = x.numel() // self.num_features
            if n < 2: raise ValueError(f"BatchNorm needs more than one value per channel to train; got shape {tuple(x.shape)}")
            var, mean = torch.var_mean(x, dim=axes, correction=0)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * (n / (n - 1)), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return self.weight.view(shape) * y + self.bias.view(shape)

    def extra_repr(self) -> str: return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
