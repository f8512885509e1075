"""The blocks every learnkit CNN is built from: conv blocks, residual, depthwise-separable and SE blocks.

Activations are never in-place, so a forward hook that keeps a layer's output sees the values
that layer produced, not the ReLU of them.
"""
import math

import torch
from torch import nn

__all__ = ['Flatten', 'conv', 'ConvBN', 'ResBlock', 'DepthwiseSeparableConv', 'SEBlock',
           'max_pool', 'classifier_head', 'init_cnn']

Flatten = nn.Flatten  # the chapter's Flatten: (N, C, 1, 1) -> (N, C); torch already has it


def _conv_padding(ks: int, stride: int, dilation: int, transpose: bool) -> tuple[int, int]:
    "(padding, output_padding): ceil(size/stride) out for a conv (odd ks), size*stride for a transposed conv."
    if not transpose: return dilation * (ks // 2), 0
    # output = (size-1)*stride - 2*padding + dilation*(ks-1) + output_padding + 1 = size*stride
    excess = dilation * (ks - 1) + 1 - stride
    padding = max(0, math.ceil(excess / 2))
    output_padding = 2 * padding - excess
    if output_padding >= max(stride, dilation):
        raise ValueError(f"conv(transpose=True): no padding makes a transposed conv with ks={ks}, stride={stride}, "
                         f"dilation={dilation} scale its input exactly by {stride}; pass padding= yourself")
    return padding, output_padding


def _conv_layers(ni: int, nf: int, ks: int, stride: int, act: bool, bn: bool, padding: int | None,
                 dilation: int, groups: int, transpose: bool, bias: bool | None) -> list[nn.Module]:
    "conv (or transposed conv), then BatchNorm2d when `bn`, then ReLU when `act`."
    if padding is None: padding, output_padding = _conv_padding(ks, stride, dilation, transpose)
    else: output_padding = 0
    if bias is None: bias = not bn  # a bias before BN is cancelled by its mean subtraction
    if transpose:
        layer = nn.ConvTranspose2d(ni, nf, ks, stride=stride, padding=padding, output_padding=output_padding,
                                   groups=groups, bias=bias, dilation=dilation)
    else:
        layer = nn.Conv2d(ni, nf, ks, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    return [layer] + ([nn.BatchNorm2d(nf)] if bn else []) + ([nn.ReLU()] if act else [])


def conv(ni: int, nf: int, ks: int = 3, stride: int = 2, act: bool = True, bn: bool = False, *,
         padding: int | None = None, dilation: int = 1, groups: int = 1, transpose: bool = False,
         bias: bool | None = None) -> nn.Sequential:
    """The chapter's conv block: `nn.Sequential(Conv2d(ni, nf, ks, stride, padding=ks//2), [BatchNorm2d], [ReLU])`.

    Stride 2 by default, as in the chapter, so each block halves the grid. `bn=True` adds
    BatchNorm2d between conv and ReLU; the conv then has no bias (`bias=None` means "only without
    BN"), as in fastai's ConvLayer, because BN subtracts it right away. Pass `bias=True` to keep it.
    `ks=1` gives a 1x1 conv, `dilation=d` a dilated conv (padding grows to `d*(ks//2)` so the
    grid still shrinks only by the stride), `transpose=True` a transposed conv whose output is
    `stride` times its input, `groups=ni` a depthwise conv. Unlike the chapter, a block without
    activation is still a Sequential (of one conv), so `model[i][0]` is always the conv.
    """
    return nn.Sequential(*_conv_layers(ni, nf, ks, stride, act, bn, padding, dilation, groups, transpose, bias))


class ConvBN(nn.Sequential):
    """Conv -> BatchNorm2d -> ReLU (no ReLU when `act=False`), stride 1 by default, conv without bias.

    The block the residual, depthwise-separable and classic models are made of; `conv(..., bn=True)`
    builds the same layers with the chapter's stride-2 default. Takes the same `padding`,
    `dilation`, `groups` and `transpose` arguments as `conv`.
    """
    def __init__(self, ni: int, nf: int, ks: int = 3, stride: int = 1, act: bool = True, *,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, transpose: bool = False):
        super().__init__(*_conv_layers(ni, nf, ks, stride, act, True, padding, dilation, groups, transpose, None))


class SEBlock(nn.Module):
    """Squeeze-and-excitation: global average pool, bottleneck MLP (1x1 convs), sigmoid gate per channel.

    The output is the input with each channel scaled by its gate in (0, 1). The bottleneck has
    `max(1, ch // reduction)` units.
    """
    def __init__(self, ch: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, ch // reduction)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, ch, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor: return x * self.gate(x)


class ResBlock(nn.Module):
    """The basic residual block: ReLU(ConvBN(ConvBN(x)) + shortcut(x)), both convs 3x3.

    The first conv has `stride`; when the stride or the width changes, the shortcut is a 1x1
    ConvBN with that stride (as in torchvision's ResNet), otherwise the identity.
    `se_reduction` adds an SEBlock on the residual branch before the sum (SE-ResNet).
    """
    def __init__(self, ni: int, nf: int, stride: int = 1, se_reduction: int | None = None):
        super().__init__()
        layers = [ConvBN(ni, nf, stride=stride), ConvBN(nf, nf, act=False)]
        if se_reduction is not None: layers.append(SEBlock(nf, se_reduction))
        self.convs = nn.Sequential(*layers)
        self.shortcut = nn.Identity() if stride == 1 and ni == nf else ConvBN(ni, nf, ks=1, stride=stride, act=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.act(self.convs(x) + self.shortcut(x))


class DepthwiseSeparableConv(nn.Sequential):
    """A depthwise conv (one `ks`x`ks` filter per channel, with `stride`) then a 1x1 conv mixing channels.

    Each is followed by BatchNorm2d and ReLU, as in MobileNet v1. `dilation` dilates the depthwise conv.
    """
    def __init__(self, ni: int, nf: int, ks: int = 3, stride: int = 1, dilation: int = 1):
        super().__init__(ConvBN(ni, ni, ks, stride, groups=ni, dilation=dilation), ConvBN(ni, nf, ks=1))


def max_pool() -> nn.MaxPool2d:
    "3x3 stride-2 max pool with padding 1: halves the grid rounding up, so even a 2x2 map gives 1x1."
    return nn.MaxPool2d(3, stride=2, padding=1)


def classifier_head(ni: int, n_out: int, hidden: tuple[int, ...] = (), p: float = 0.5) -> nn.Sequential:
    """Global average pool, Flatten, then Linear layers `ni -> *hidden -> n_out` (ReLU and Dropout(p) between).

    Pooling first makes the head, and so the model, take any input size.
    """
    sizes = [ni, *hidden]
    layers = [nn.AdaptiveAvgPool2d(1), Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]): layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(p)]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], n_out))


_KAIMING_INIT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def init_cnn(model: nn.Module) -> nn.Module:
    "Kaiming-normal init for every conv and linear weight in `model`, zero for their biases; returns `model`."
    for m in model.modules():
        if isinstance(m, _KAIMING_INIT):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None: nn.init.zeros_(m.bias)
    return model
