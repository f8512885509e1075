"GoogLeNet and its Inception block, as in the modern-CNNs chapter."
import torch
from torch import nn

from .layers import classifier_head, conv, init_cnn, max_pool
from .registry import register_model

__all__ = ['Inception', 'googlenet']


def _conv1(ni: int, nf: int, ks: int = 1) -> nn.Sequential:
    "Stride-1 conv with ReLU: the only conv GoogLeNet uses inside its blocks."
    return conv(ni, nf, ks, stride=1)


class Inception(nn.Module):
    """Four parallel paths concatenated on the channel axis; the output has `c1 + c2[1] + c3[1] + c4` channels.

    1x1 conv (`c1`); 1x1 (`c2[0]`) then 3x3 (`c2[1]`); 1x1 (`c3[0]`) then 5x5 (`c3[1]`);
    3x3 max pool then 1x1 (`c4`). Every conv has a ReLU; padding keeps the grid size.
    """
    def __init__(self, ni: int, c1: int, c2: tuple[int, int], c3: tuple[int, int], c4: int):
        super().__init__()
        self.paths = nn.ModuleList([
            _conv1(ni, c1),
            nn.Sequential(_conv1(ni, c2[0]), _conv1(c2[0], c2[1], 3)),
            nn.Sequential(_conv1(ni, c3[0]), _conv1(c3[0], c3[1], 5)),
            nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _conv1(ni, c4))])

    def forward(self, x: torch.Tensor) -> torch.Tensor: return torch.cat([p(x) for p in self.paths], dim=1)


@register_model
def googlenet(n_out: int = 10, in_ch: int = 1) -> nn.Sequential:
    """GoogLeNet as in the chapter: a 7x7 and a 1x1+3x3 stem, nine Inception blocks in three stages, global average pool, Linear.

    Widths are the chapter's (the paper's, no scaling); the chapter's listing has 114 for the
    4th block's 3x3 reduce, a typo for the paper's 144, used here. No auxiliary classifiers and
    no batchnorm, as in the chapter. 28x28 inputs reach 1x1 after the last pool, 96x96 3x3.
    Kaiming init.
    """
    return init_cnn(nn.Sequential(
        nn.Sequential(conv(in_ch, 64, 7, 2), max_pool()),
        nn.Sequential(_conv1(64, 64), _conv1(64, 192, 3), max_pool()),
        nn.Sequential(Inception(192, 64, (96, 128), (16, 32), 32),
                      Inception(256, 128, (128, 192), (32, 96), 64), max_pool()),
        nn.Sequential(Inception(480, 192, (96, 208), (16, 48), 64),
                      Inception(512, 160, (112, 224), (24, 64), 64),
                      Inception(512, 128, (128, 256), (24, 64), 64),
                      Inception(512, 112, (144, 288), (32, 64), 64),
                      Inception(528, 256, (160, 320), (32, 128), 128), max_pool()),
        nn.Sequential(Inception(832, 256, (160, 320), (32, 128), 128),
                      Inception(832, 384, (192, 384), (48, 128), 128)),
        classifier_head(1024, n_out)))
