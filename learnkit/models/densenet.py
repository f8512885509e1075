"DenseNet: dense blocks (each conv sees every earlier output) joined by transition layers, as in the chapters."
from collections.abc import Sequence

import torch
from torch import nn

from .layers import ConvBN, classifier_head, init_cnn, max_pool
from .registry import register_model

__all__ = ['DenseBlock', 'transition', 'densenet']


def _bn_relu_conv(ni: int, nf: int, ks: int) -> nn.Sequential:
    "DenseNet's pre-activation unit: BatchNorm2d -> ReLU -> conv (stride 1, size-keeping padding)."
    return nn.Sequential(nn.BatchNorm2d(ni), nn.ReLU(), nn.Conv2d(ni, nf, ks, padding=ks // 2))


class DenseBlock(nn.Module):
    """`num_convs` pre-activation 3x3 convs of `growth` channels, each fed the concatenation of the input and all earlier outputs.

    The output has `ni + num_convs * growth` channels.
    """
    def __init__(self, num_convs: int, ni: int, growth: int):
        super().__init__()
        self.convs = nn.ModuleList([_bn_relu_conv(ni + i * growth, growth, 3) for i in range(num_convs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs: x = torch.cat([x, c(x)], dim=1)
        return x


def transition(ni: int, nf: int) -> nn.Sequential:
    "DenseNet's transition: BN -> ReLU -> 1x1 conv to `nf` channels -> 2x2 average pool (ceil_mode, so 7x7 gives 4x4)."
    return nn.Sequential(*_bn_relu_conv(ni, nf, 1), nn.AvgPool2d(2, ceil_mode=True))


@register_model
def densenet(n_out: int = 10, in_ch: int = 1, growth: int = 32, block_sizes: Sequence[int] = (4, 4, 4, 4)) -> nn.Sequential:
    """DenseNet as in the d2l chapter: a 7x7 ConvBN stem and max pool, dense blocks of `block_sizes` convs, transitions that halve channels and grid.

    Widths (stem 64, growth 32) are the chapter's: a small DenseNet, not DenseNet-121. The
    transitions' average pools use ceil_mode, so 28x28 inputs reach 1x1 at the last block and
    96x96 3x3. Ends in BN, ReLU, global average pool and Linear. Kaiming init.
    """
    if not block_sizes: raise ValueError("densenet: block_sizes is empty; pass the number of convs per dense block, e.g. (4, 4, 4, 4)")
    layers, ch = [nn.Sequential(ConvBN(in_ch, 64, ks=7, stride=2), max_pool())], 64
    for i, n in enumerate(block_sizes):
        layers.append(DenseBlock(n, ch, growth))
        ch += n * growth
        if i < len(block_sizes) - 1:
            layers.append(transition(ch, ch // 2))
            ch //= 2
    return init_cnn(nn.Sequential(*layers, nn.BatchNorm2d(ch), nn.ReLU(), classifier_head(ch, n_out)))
