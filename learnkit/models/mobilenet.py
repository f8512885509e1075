"MobileNet (v1): a stack of depthwise-separable convs."
from torch import nn

from .layers import ConvBN, DepthwiseSeparableConv, classifier_head, init_cnn
from .registry import register_model

__all__ = ['mobilenet']

# (output channels, stride) of each depthwise-separable block, from the MobileNet paper's table 1
_MOBILENET_V1 = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                 (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


@register_model
def mobilenet(n_out: int = 10, in_ch: int = 1, width_mult: float = 1.0) -> nn.Sequential:
    """MobileNet v1: a 3x3 stride-2 ConvBN stem (32 channels), 13 `DepthwiseSeparableConv` blocks, global average pool, Linear.

    Widths are the paper's times `width_mult` (its alpha; 0.25, 0.5 and 0.75 are the paper's
    smaller models). The grid is halved five times: 224 -> 7, 96 -> 3, 28 -> 1. Kaiming init.
    """
    if width_mult <= 0: raise ValueError(f"mobilenet: width_mult must be positive; got {width_mult}")
    def width(c: int) -> int: return max(8, int(c * width_mult))
    layers, ni = [ConvBN(in_ch, width(32), stride=2)], width(32)
    for nf, stride in _MOBILENET_V1:
        layers.append(DepthwiseSeparableConv(ni, width(nf), stride=stride))
        ni = width(nf)
    return init_cnn(nn.Sequential(*layers, classifier_head(ni, n_out)))
