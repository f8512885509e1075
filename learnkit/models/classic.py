"""The plain conv stacks of the modern-CNNs chapter: LeNet, AlexNet, VGG and NiN.

Every model takes `n_out` and `in_ch`, accepts any input from 28x28 (Fashion-MNIST as it comes)
to 224x224 (as the chapter resizes it), and is an nn.Sequential. Where the chapter's pooling
would shrink a 28x28 input to nothing, the pools are padded (3x3, stride 2, padding 1) or use
ceil_mode; at 224 they give the same grid sizes as the papers, give or take one.
"""
from collections.abc import Sequence

from torch import nn

from .layers import Flatten, classifier_head, conv, init_cnn, max_pool
from .registry import register_model

__all__ = ['lenet', 'alexnet', 'vgg_block', 'vgg', 'nin_block', 'nin']


@register_model
def lenet(n_out: int = 10, in_ch: int = 1) -> nn.Sequential:
    """LeNet-5 as in the chapter: two 5x5 convs (6, 16 channels) with sigmoid and 2x2 average pools, then 120-84-n_out.

    Widths are the paper's. An adaptive average pool to 5x5 before the flatten is the identity on
    28x28 inputs and lets larger inputs through. Kaiming init (init_cnn).
    """
    return init_cnn(nn.Sequential(
        nn.Conv2d(in_ch, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(5), Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, n_out)))


@register_model
def alexnet(n_out: int = 10, in_ch: int = 1, fc: int = 4096) -> nn.Sequential:
    """AlexNet as in the chapter: 11x11 stride-4 conv (96), 5x5 (256), three 3x3 (384, 384, 256), max pools, two FC layers.

    Conv widths are the paper's; the FC layers are `fc` wide (the paper's 4096 by default) with
    Dropout(0.5). Scaled for small inputs: the head global-average-pools the last map before the
    FC layers instead of flattening a 5x5 map, so the first FC layer has 256 inputs, not 6400,
    and the model takes 28x28 and 224x224 alike. Kaiming init.
    """
    return init_cnn(nn.Sequential(
        conv(in_ch, 96, ks=11, stride=4, padding=2), max_pool(),
        conv(96, 256, ks=5, stride=1), max_pool(),
        conv(256, 384, stride=1), conv(384, 384, stride=1), conv(384, 256, stride=1), max_pool(),
        classifier_head(256, n_out, hidden=(fc, fc))))


def vgg_block(num_convs: int, ni: int, nf: int) -> nn.Sequential:
    "A VGG block: `num_convs` 3x3 convs with ReLU, then a 2x2 max pool (ceil_mode, so odd grids keep their edge)."
    convs = [conv(ni if i == 0 else nf, nf, stride=1) for i in range(num_convs)]
    return nn.Sequential(*convs, nn.MaxPool2d(2, ceil_mode=True))


@register_model
def vgg(n_out: int = 10, in_ch: int = 1, arch: Sequence[Sequence[int]] = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
        fc: int = 4096) -> nn.Sequential:
    """VGG from `vgg_block`s: `arch` lists (number of convs, channels) per block; the default is VGG-11.

    Conv widths are the paper's by default; the chapter trains on Fashion-MNIST with every width
    divided by 4: `arch=((1, 16), (1, 32), (2, 64), (2, 128), (2, 128))`. The FC layers are `fc`
    wide with Dropout(0.5). Scaled for small inputs: the head global-average-pools the last map
    instead of flattening a 7x7 one, so the first FC layer has 512 inputs, not 25,088; five
    ceil_mode pools take 28x28 to 1x1 and 224x224 to 7x7. Kaiming init.
    """
    if not arch: raise ValueError("vgg: arch is empty; pass (number of convs, channels) pairs, e.g. ((1, 64), (1, 128))")
    widths = [in_ch] + [nf for _, nf in arch]
    blocks = [vgg_block(n, ni, nf) for (n, _), ni, nf in zip(arch, widths[:-1], widths[1:])]
    return init_cnn(nn.Sequential(*blocks, classifier_head(widths[-1], n_out, hidden=(fc, fc))))


def nin_block(ni: int, nf: int, ks: int, stride: int, padding: int) -> nn.Sequential:
    "A NiN block: a `ks`x`ks` conv then two 1x1 convs (a per-pixel MLP), each with ReLU."
    return nn.Sequential(conv(ni, nf, ks, stride, padding=padding), conv(nf, nf, 1, 1), conv(nf, nf, 1, 1))


@register_model
def nin(n_out: int = 10, in_ch: int = 1) -> nn.Sequential:
    """Network in Network as in the chapter: NiN blocks with AlexNet's widths, a last block with `n_out` channels, global average pool.

    Widths are the chapter's. The chapter's listing uses `ks`x`ks` kernels for the two inner
    convs of a block; they are 1x1 here, as in the paper and the text. Max pools are padded so
    28x28 inputs reach 1x1. Like the paper, the logits pass a ReLU before the pool. Kaiming init.
    """
    return init_cnn(nn.Sequential(
        nin_block(in_ch, 96, 11, 4, 0), max_pool(),
        nin_block(96, 256, 5, 1, 2), max_pool(),
        nin_block(256, 384, 3, 1, 1), max_pool(),
        nn.Dropout(0.5),
        nin_block(384, n_out, 3, 1, 1),
        nn.AdaptiveAvgPool2d(1), Flatten()))
