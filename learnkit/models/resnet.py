"ResNet-18/34 and SE-ResNet from the basic residual block."
from collections.abc import Sequence

from torch import nn

from .layers import ConvBN, ResBlock, classifier_head, init_cnn, max_pool
from .registry import register_model

__all__ = ['resnet18', 'resnet34', 'se_resnet']

_WIDTHS = (64, 128, 256, 512)


def _resnet(layers: Sequence[int], n_out: int, in_ch: int, small_input: bool, se_reduction: int | None) -> nn.Sequential:
    """nn.Sequential(stem, four stages of ResBlocks, head); stage i has `layers[i]` blocks and halves the grid (but the first)."""
    stem = (nn.Sequential(ConvBN(in_ch, 64)) if small_input
            else nn.Sequential(ConvBN(in_ch, 64, ks=7, stride=2), max_pool()))
    stages, ni = [], 64
    for i, (n, nf) in enumerate(zip(layers, _WIDTHS)):
        blocks = [ResBlock(ni if j == 0 else nf, nf, stride=2 if i > 0 and j == 0 else 1, se_reduction=se_reduction)
                  for j in range(n)]
        stages.append(nn.Sequential(*blocks))
        ni = nf
    return init_cnn(nn.Sequential(stem, *stages, classifier_head(ni, n_out)))


_SMALL_INPUT_DOC = """
    `small_input=False` is the paper's stem (7x7 stride-2 conv, 3x3 stride-2 max pool: 224 -> 56,
    96 -> 24, 28 -> 7). `small_input=True` is a single 3x3 stride-1 ConvBN, as ResNets for CIFAR
    use, so 28x28 inputs keep 28x28 in the first stage and reach 4x4 at the last: better for
    Fashion-MNIST, about 16x the compute of the paper's stem at the same input size.
    Widths (64-128-256-512) are the paper's. Kaiming init."""


@register_model
def resnet18(n_out: int = 10, in_ch: int = 1, small_input: bool = False) -> nn.Sequential:
    return _resnet((2, 2, 2, 2), n_out, in_ch, small_input, None)


@register_model
def resnet34(n_out: int = 10, in_ch: int = 1, small_input: bool = False) -> nn.Sequential:
    return _resnet((3, 4, 6, 3), n_out, in_ch, small_input, None)


@register_model
def se_resnet(n_out: int = 10, in_ch: int = 1, small_input: bool = False, reduction: int = 16) -> nn.Sequential:
    return _resnet((2, 2, 2, 2), n_out, in_ch, small_input, reduction)


resnet18.__doc__ = "ResNet-18: basic residual blocks (2, 2, 2, 2) per stage, global average pool, Linear.\n" + _SMALL_INPUT_DOC
resnet34.__doc__ = "ResNet-34: basic residual blocks (3, 4, 6, 3) per stage, global average pool, Linear.\n" + _SMALL_INPUT_DOC
se_resnet.__doc__ = ("SE-ResNet-18: ResNet-18 with a squeeze-and-excitation block (bottleneck `ch // reduction`) "
                     "on every residual branch.\n" + _SMALL_INPUT_DOC)
