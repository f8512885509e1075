"""The callback base class, the event list, the cancel exceptions and the dispatch table.

A callback is a class with an `order` and methods named after events. The Learner calls
`DispatchTable.run(event)` at each point of the loop; the table maps each event to the bound methods
that handle it, sorted by `order`, and is rebuilt only when callbacks are added or removed.
"""
import difflib
import re
import warnings

__all__ = ['EVENTS', 'INNER_LOOP_EVENTS', 'Callback', 'DispatchTable',
           'CancelFitException', 'CancelEpochException', 'CancelTrainException', 'CancelValidException',
           'CancelBatchException', 'CancelStepException', 'CancelBackwardException', 'CANCEL_EXCEPTIONS', 'noop']


class CancelFitException(Exception):
    "Raise in a callback to stop `fit`: runs `after_cancel_fit`, then `after_fit`."
class CancelEpochException(Exception):
    "Raise to skip the rest of this epoch: runs `after_cancel_epoch`, then `after_epoch`."
class CancelTrainException(Exception):
    "Raise to skip the rest of this epoch's training: runs `after_cancel_train`, then `after_train`."
class CancelValidException(Exception):
    "Raise to skip the rest of this validation: runs `after_cancel_validate`, then `after_validate`."
class CancelBatchException(Exception):
    "Raise to skip the rest of this batch: runs `after_cancel_batch`, then `after_batch`."
class CancelStepException(Exception):
    "Raise in `before_step` to skip the optimizer step: runs `after_cancel_step`, then `after_step`."
class CancelBackwardException(Exception):
    "Raise in `before_backward` to skip the backward pass: runs `after_cancel_backward`, then `after_backward`."

# Phase name -> the exception that cancels it. The Learner's phase wrapper reads this map.
CANCEL_EXCEPTIONS = {
    'fit': CancelFitException, 'epoch': CancelEpochException, 'train': CancelTrainException,
    'validate': CancelValidException, 'batch': CancelBatchException, 'step': CancelStepException,
    'backward': CancelBackwardException,
}

# fastai's events, in the order a training epoch meets them.
EVENTS = ('after_create before_fit before_epoch before_train before_batch after_pred after_loss '
          'before_backward after_cancel_backward after_backward before_step after_cancel_step after_step '
          'after_cancel_batch after_batch after_cancel_train after_train before_validate after_cancel_validate '
          'after_validate after_cancel_epoch after_epoch after_cancel_fit after_fit').split()

# Events gated by `run_train` / `run_valid` (as in fastai); the others always run.
INNER_LOOP_EVENTS = frozenset('before_batch after_pred after_loss before_backward after_cancel_backward '
                              'after_backward before_step after_cancel_step after_step after_cancel_batch '
                              'after_batch'.split())

# Loop state the Learner owns. Assigning one of these on a callback is almost always a bug
# (`self.loss = ...` instead of `self.learn.loss = ...`), so it warns.
LEARNER_STATE = frozenset('x y xb yb pred loss loss_grad opt epoch n_epoch iter n_iter training pct_train '
                          'train_iter dl dls model loss_func lr wd metrics'.split())

def noop(*args, **kwargs):
    "Does nothing: the logger inside `learn.no_logging()`."


def _snake_name(cls_name):
    "`ActivationStatsCallback` -> `activation_stats`, as fastai names callbacks."
    name = re.sub(r'Callback$', '', cls_name) or cls_name
    name = re.sub(r'([a-z0-9])([A-Z])', r'\1_\2', re.sub(r'([A-Z]+)([A-Z][a-z])', r'\1_\2', name))
    return name.lower()


class Callback:
    """Base class for callbacks: override methods named after events (`before_fit`, `after_batch`, ...).

    Reading an attribute the callback does not have reads the learner's: `self.loss`, `self.model`,
    `self.training` and so on work as in fastai, so fastai callbacks port by changing their imports.
    Writes must go to `self.learn.<name>`; writing a learner attribute on the callback warns.
    Resources a callback acquires in `before_fit` (hooks, files) are released in `cleanup_fit`, which
    the Learner calls however fit ends, exception included. Setting `run = False` switches the callback off until the
    end of the current fit: every callback's `run` is True again when a fit ends, as in fastai.
    """
    order = 0
    run_train, run_valid = True, True
    learn = None
    run = True

    @property
    def name(self):
        "The attribute name on the learner: class name in snake_case, without a trailing 'Callback'."
        return _snake_name(type(self).__name__)

    # The one place where callbacks delegate to the learner (which in turn hands what it lacks to its model, see
    # `Learner.__getattr__`). `__getattr__` only runs when normal lookup fails, so the callback's own attributes win.
    def __getattr__(self, k):
        learn = self.__dict__.get('learn')
        if k.startswith('_') or learn is None:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {k!r}")
        try: return getattr(learn, k)
        except AttributeError as e:
            if getattr(e, 'obj', None) is not learn or e.name != k: raise    # raised inside a property: keep it
            raise AttributeError(f"{type(self).__name__!r} has no attribute {k!r}, and {e}", name=k, obj=self) from None

    def __setattr__(self, k, v):
        if k in LEARNER_STATE and self.__dict__.get('learn') is not None:
            warnings.warn(f"{type(self).__name__} sets `self.{k}`, which only changes the callback; "
                          f"write `self.learn.{k} = ...` to change the learner's {k}.", stacklevel=2)
        super().__setattr__(k, v)

    def cleanup_fit(self):
        "Release what `before_fit` acquired. Called in a `finally` whenever fit, validate or get_preds ends."

    def state_dict(self):
        "State to keep in a checkpoint; override in callbacks that carry state across epochs."
        return {}

    def load_state_dict(self, state):
        "Restore what `state_dict` returned."

    def __repr__(self): return type(self).__name__


def event_methods(cb):
    "The event handlers `cb` defines; warns about names that look like a misspelt event."
    handlers = {}
    for attr in dir(type(cb)):
        if attr in EVENTS:
            if getattr(type(cb), attr) is not getattr(Callback, attr, None): handlers[attr] = getattr(cb, attr)
        elif re.match(r'(before|after)_', attr) and callable(getattr(cb, attr)):
            close = difflib.get_close_matches(attr, EVENTS, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else f" Events are: {', '.join(EVENTS)}."
            warnings.warn(f"{type(cb).__name__}.{attr} is not an event, so it will never be called.{hint}",
                          stacklevel=3)
    return handlers


class DispatchTable:
    "event -> [(callback, bound method)] in `order`, built once per change of the callback set."
    def __init__(self, cbs=()):
        self.table = {e: [] for e in EVENTS}
        for cb in sorted(cbs, key=lambda c: c.order):
            for event, method in event_methods(cb).items(): self.table[event].append((cb, method))

    def run(self, event, training):
        for cb, method in self.table[event]:
            if not cb.run: continue
            if event in INNER_LOOP_EVENTS and not (cb.run_train if training else cb.run_valid): continue
            try: method()
            except CANCEL_TYPES: raise
            except BaseException as e:
                _name_origin(e, f"callback {type(cb).__name__} (learn.{cb.name}) during `{event}`")
                raise


CANCEL_TYPES = tuple(CANCEL_EXCEPTIONS.values())


def _name_origin(e, where):
    "Say where `e` came from, once, in its message (so `str(e)` shows it) or as a note."
    if getattr(e, '_learnkit_origin', None): return
    try: e._learnkit_origin = where
    except AttributeError: return
    if isinstance(e, Exception) and e.args and isinstance(e.args[0], str):
        e.args = (f"{e.args[0]}\n  (raised in {where})",) + e.args[1:]
    else: e.add_note(f"(raised in {where})")
