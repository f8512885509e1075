"The convolutions chapter's network."
from torch import nn

from .layers import Flatten, conv
from .registry import register_model

__all__ = ['simple_cnn']


@register_model
def simple_cnn(bn: bool = False, n_out: int = 10, in_ch: int = 1) -> nn.Sequential:
    """The chapter's CNN: five stride-2 `conv` blocks taking 28x28 to 1x1, then `Flatten`.

    `conv(in_ch,8,ks=5)` 14x14, `conv(8,16)` 7x7, `conv(16,32)` 4x4, `conv(32,64)` 2x2,
    `conv(64,n_out,act=False)` 1x1, `Flatten()`. With `bn=True` every block, the last one too
    (as in the chapter), is conv -> BatchNorm2d -> ReLU. One difference from the chapter's code:
    there the conv keeps its bias in front of BatchNorm; here it is dropped, as fastai's ConvLayer
    does, because BN's mean subtraction cancels it (its gradient is zero in training). So the
    1-channel model has 30,282 parameters without BN and 30,412 with it (the chapter's BN version
    has 30,542: the same plus 130 dead biases). PyTorch's default init, as in the chapter, so the
    chapter's lr experiments behave as described there. Made for 28x28 (32x32 also ends at 1x1):
    a larger input leaves an h x w grid after the last block, and Flatten then gives n_out*h*w
    features; the classic models pool globally and take any size.
    """
    widths = [in_ch, 8, 16, 32, 64]
    blocks = [conv(ni, nf, ks=5 if i == 0 else 3, bn=bn) for i, (ni, nf) in enumerate(zip(widths[:-1], widths[1:]))]
    return nn.Sequential(*blocks, conv(widths[-1], n_out, act=False, bn=bn), Flatten())
