"""`export_learner` / `load_learner`: an inference file in the checkpoints' safe format, and the Learner read from it.

The file holds the weights, the vocab, the model's registry name and arguments (`model.learnkit_spec`), and how an
item becomes the model's input (the image mode and the transforms that act in validation, as names and arguments):
nothing in it is pickled code.
"""
from pathlib import Path

from torch import nn

from .checkpoint_io import EXPORT_FORMAT, VERSIONS, atomic_save, bare_model, find_normalize, load_weights, plain, read_checkpoint

__all__ = ['export_learner', 'ExportedData', 'load_learner']


def export_learner(learn, path='export.pth', with_tfms=True):
    """Write what inference needs to `learn.path/path`, with no pickled code: the weights, the model's
    registry name and arguments (`model.learnkit_spec`, from `learnkit.models.register_model`), the vocab,
    the loss function's torch.nn class name, and how the validation loader prepares an item (`TfmdDL.pipeline`):
    the image mode ('L' or 'RGB', as the training data), the item transforms (Resize...) and the batch
    transforms that act in validation (Normalize...), each as its name and arguments (`to_spec()`).

    A transform that cannot be written so (a class not registered with `register_transform`) raises a
    TypeError naming it. `with_tfms=False` writes no transforms (only the image mode and the Normalize
    statistics); pass them again to `load_learner(path, item_tfms=..., batch_tfms=...)`."""
    model = bare_model(learn.model)
    spec = getattr(model, 'learnkit_spec', None)
    vocab = getattr(learn.dls, 'vocab', None)
    norm = find_normalize(getattr(learn.dls, 'train', None))
    loss = type(learn.loss_func)
    pipe = getattr(getattr(learn.dls, 'valid', None), 'pipeline', None)  # None for plain torch loaders
    if pipe is None: pipeline = None
    elif with_tfms: pipeline = pipe.to_spec()
    else: pipeline = {'mode': pipe.mode, 'item_tfms': None, 'batch_tfms': None}
    state = {'format': EXPORT_FORMAT, 'version': VERSIONS[EXPORT_FORMAT], 'state_dict': model.state_dict(),
             'model': plain(spec, 'model.learnkit_spec') if spec is not None else None,
             'model_class': f'{type(model).__module__}.{type(model).__qualname__}',
             'vocab': plain(list(vocab), 'dls.vocab') if vocab is not None else None,
             'normalize': {'mean': norm.mean, 'std': norm.std} if norm is not None else None,
             'pipeline': pipeline, 'n_inp': getattr(learn.dls, 'n_inp', 1),
             'loss_func': loss.__name__ if getattr(nn, loss.__name__, None) is loss else None}
    return atomic_save(state, Path(learn.path) / path)


class ExportedData:
    """The data side of a loaded learner: no loaders, but the `vocab`, `c`, `n_inp` and the `pipeline` (an
    `ItemPipeline`) that makes an item into the model's input as the validation loader did."""
    train = valid = None

    def __init__(self, vocab, pipeline, n_inp):
        self.vocab, self.pipeline, self.n_inp = vocab, pipeline, n_inp

    @property
    def c(self): return len(self.vocab) if self.vocab is not None else None

    @property
    def normalize(self):
        "The pipeline's `Normalize`, or None."
        return next((t for t in self.pipeline.batch_tfms if type(t).__name__ == 'Normalize'), None)

    def prepare(self, item):
        """One item (an image file's path, a PIL image or an image tensor) as a float batch of one, as the
        validation loader made its batches: decoded in the exported image mode, through the item transforms
        (Resize...), scaled, then through the batch transforms that act in validation (Normalize...)."""
        return self.pipeline(item, 'cpu')

    def __repr__(self): return f"ExportedData(vocab={self.vocab}, pipeline={self.pipeline})"


def _exported_pipeline(state, file, item_tfms, batch_tfms):
    "The `ItemPipeline` of an export: the transforms the file names, each replaced by `item_tfms`/`batch_tfms` if given."
    from .data.items import ItemPipeline, mode_for
    from .data.loaders import check_batch_tfms
    from .data.specs import transform_from_spec
    from .data.transforms import Normalize, check_item_tfms
    norm = state['normalize']
    # A version-1 file (or one written with_tfms=False) has no transforms: only its Normalize, whose channel
    # count gives the mode files are decoded in.
    spec = state.get('pipeline') or {'mode': mode_for(len(norm['mean'])) if norm is not None else None,
                                     'item_tfms': None, 'batch_tfms': None}
    if item_tfms is None: item_tfms = [transform_from_spec(t, file) for t in spec['item_tfms'] or ()]
    if batch_tfms is None:
        if spec['batch_tfms'] is not None: batch_tfms = [transform_from_spec(t, file) for t in spec['batch_tfms']]
        else: batch_tfms = [Normalize(norm['mean'], norm['std'])] if norm is not None else []
    return ItemPipeline(spec['mode'], check_item_tfms(item_tfms), check_batch_tfms(batch_tfms))


def load_learner(path, model=None, loss_func=None, device=None, item_tfms=None, batch_tfms=None):
    """A Learner for inference from a file written by `learn.export`, read without unpickling anything.

    The model is rebuilt from learnkit's registry (`get_model(name, **kwargs)`) unless `model` is given:
    an `nn.Module` to load the weights into, or a callable called with the saved constructor arguments
    (none if the model was not built by a registered constructor). The exported transforms are rebuilt by
    name (`register_transform`); `item_tfms` / `batch_tfms`, when given, replace them. `learn.predict(item)`
    then prepares a file, PIL image (any mode: converted to the training data's L or RGB) or image tensor of
    any size as the validation loader did: item transforms (Resize...), scaling, Normalize.

    Files exported before learnkit exported transforms (or with `with_tfms=False`) hold only the Normalize
    statistics: their inputs must already have the training size, unless `item_tfms` is given."""
    from .learner import Learner
    from .models import get_model
    state = read_checkpoint(path, EXPORT_FORMAT)
    spec = state['model']
    if isinstance(model, nn.Module): net = model
    elif callable(model): net = model(**(spec['kwargs'] if spec is not None else {}))
    elif model is None:
        if spec is None:
            raise ValueError(f"{path} holds the weights of a {state['model_class']}, which was not built by a "
                             "registered constructor, so it cannot be rebuilt by name: pass model=<the module or "
                             "a function that builds it> (or decorate its constructor with @register_model)")
        net = get_model(spec['name'], **spec['kwargs'])
    else: raise TypeError(f"model must be None, an nn.Module or a callable that builds one; got {model!r}")
    if not isinstance(net, nn.Module):
        raise TypeError(f"model={model!r} returned {type(net).__name__}, not an nn.Module")
    load_weights(net, state['state_dict'], path)
    dls = ExportedData(state['vocab'], _exported_pipeline(state, path, item_tfms, batch_tfms), state['n_inp'])
    if loss_func is None and state['loss_func'] is not None: loss_func = getattr(nn, state['loss_func'])()
    if loss_func is None and dls.vocab is None:
        raise ValueError(f"{path} records neither a torch.nn loss nor a vocab; pass loss_func=...")
    return Learner(dls, net.eval(), loss_func=loss_func, device=device)
