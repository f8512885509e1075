"""`learn.summary()`: the model's layers on a real batch, as fastai prints them."""
import torch

__all__ = ['summary', 'Summary']


class Summary(str):
    "A string that shows itself unquoted in Jupyter and at the REPL."
    def __repr__(self): return str(self)


def _shape(o):
    if isinstance(o, torch.Tensor): return ' x '.join(str(s) for s in o.shape)
    if isinstance(o, (list, tuple)) and o: return _shape(o[0])
    return ''


def _sample_batch(learn):
    dls = learn.dls
    batch = dls.one_batch() if hasattr(dls, 'one_batch') else next(iter(dls.train))
    n_inp = getattr(dls, 'n_inp', 1)
    return learn._to_device(batch)[:n_inp]


def summary(learn):
    "Runs one training batch through the model in eval mode and tabulates every layer."
    learn._prepare()
    model = learn.model
    xb = _sample_batch(learn)
    rows, handles = [], []
    for m in model.modules():
        own_params = list(m.parameters(recurse=False))
        if list(m.children()) and not own_params: continue
        def record(mod, inp, out, own_params=own_params):
            n = sum(p.numel() for p in own_params)
            trainable = '' if not own_params else str(any(p.requires_grad for p in own_params))
            rows.append((type(mod).__name__, _shape(out), n, trainable))
        handles.append(m.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(): model(*xb)
    finally:
        for h in handles: h.remove()
        model.train(was_training)
    width = 78
    lines = [f"{type(model).__name__} (Input shape: {_shape(xb[0])})", '=' * width,
             f"{'Layer (type)':<24}{'Output Shape':<24}{'Param #':<14}{'Trainable':<10}", '=' * width]
    lines += [f"{name:<24}{shape:<24}{n if n else '':<14}{tr:<10}" for name, shape, n, tr in rows]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt_name = getattr(learn.opt_func, '__name__', repr(learn.opt_func))
    lines += ['=' * width, f"Total params: {total:,}", f"Total trainable params: {trainable:,}",
              f"Total non-trainable params: {total - trainable:,}", '',
              f"Optimizer used: {opt_name}", f"Loss function: {learn.loss_func!r}", '', 'Callbacks:']
    lines += [f"  - {type(cb).__name__}" for cb in sorted(learn.cbs, key=lambda c: c.order)]
    return Summary('\n'.join(lines))
