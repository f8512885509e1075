"""Loss functions under fastai's names, for what fastai's callbacks expect of a loss."""
from torch import nn

__all__ = ['CrossEntropyLossFlat']


class CrossEntropyLossFlat(nn.CrossEntropyLoss):
    """`nn.CrossEntropyLoss` over the class scores at dimension `axis` (default the last one), with every other
    dimension flattened into items, as fastai's loss of the same name: `(N, C)` scores with `(N,)` targets as usual, or
    `(N, H, W, C)` with `(N, H, W)` (per-pixel classes, `axis=-1`) and `(N, C, H, W)` with `axis=1`.

    `y_int = True` says that its targets are class indices: fastai's `MixUp` and `CutMix` read it to mix the losses of
    the two targets instead of the targets themselves. Other arguments (weight, ignore_index, reduction,
    label_smoothing) are `nn.CrossEntropyLoss`'s.
    """
    y_int = True

    def __init__(self, *args, axis=-1, **kwargs):
        super().__init__(*args, **kwargs)
        self.axis = axis

    def forward(self, input, target):
        if input.ndim > 2 or self.axis % input.ndim != input.ndim - 1:
            input = input.movedim(self.axis, -1).reshape(-1, input.shape[self.axis])
            target = target.reshape(-1)
        return super().forward(input, target)

    def extra_repr(self): return f'axis={self.axis}'
