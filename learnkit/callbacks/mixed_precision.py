"""Mixed precision: the forward pass and the loss under `torch.autocast`, with loss scaling for float16.

bfloat16 has float32's exponent range, so it needs no loss scaling and nothing in it reads the device.
float16 does: the loss is multiplied by a `torch.amp.GradScaler` scale before backward, the gradients are
divided back right after it, and a step whose gradients overflowed is skipped while the scale shrinks.
Who decides to skip, and so whether the host waits for the GPU, depends on the optimizer:

- Most optimizers (learnkit's default Adam, i.e. torch's foreach AdamW): `GradScaler.step` reads its
  inf/NaN check on the host (`GradScaler._maybe_opt_step` reads `found_inf` back, torch 2.11 to 2.14): one
  host read per training step, made by torch itself. `MixedPrecision` reuses that answer to raise
  `CancelStepException` (so `after_cancel_step` runs) and to count the step; it adds no read of its own.
- Optimizers that take the scaler's tensors in their kernel (torch's `fused=True` Adam, AdamW and SGD:
  `Learner(opt_func=partial(Adam, fused=True))`): nothing is read on the host. The fused kernel skips the
  update on the device, the skip is counted on the device, and no `CancelStepException` is raised, since
  the host does not learn of the skip during the epoch. `skipped_steps` reads the count when asked.
"""
import torch

from ..callback import Callback, CancelStepException

__all__ = ['MixedPrecision', 'to_mixed_precision', 'to_fp32']

_DTYPES = {torch.bfloat16: 'bf16', torch.float16: 'fp16'}


class _StepProbe:
    """Stands in for the optimizer inside GradScaler, which calls `step()` only when the gradients are
    finite; the Learner then takes the real step (as fastai's MixedPrecision does)."""
    def __init__(self, learn): self.learn, self.stepped = learn, False
    @property
    def param_groups(self): return self.learn.opt.param_groups
    def step(self): self.stepped = True


class MixedPrecision(Callback):
    """Train with `torch.autocast(device_type, dtype)`: `dtype` is `torch.bfloat16` (no loss scaling) or
    `torch.float16` (with a GradScaler; `scaler_kwargs` such as `init_scale` go to `torch.amp.GradScaler`).

    Predictions are cast back to float32 after the forward pass, so metrics and `get_preds` see float32.
    With float16 the gradients are unscaled at `after_backward`, so later callbacks (gradient statistics,
    clipping) see their true values. `skipped_steps` counts the steps skipped on overflow in the last fit;
    see the module docstring for which optimizers make that count cost no host read.
    """
    order = 10

    def __init__(self, dtype=torch.bfloat16, **scaler_kwargs):
        if dtype not in _DTYPES:
            raise ValueError(f"MixedPrecision dtype must be torch.bfloat16 or torch.float16; got {dtype!r}")
        if scaler_kwargs and dtype != torch.float16:
            raise ValueError(f"GradScaler options {sorted(scaler_kwargs)} apply to float16 only; bfloat16 needs "
                             "no loss scaling. Drop them, or use MixedPrecision(torch.float16, ...).")
        self.dtype, self.scaler_kwargs = dtype, scaler_kwargs
        self.scaler, self._autocast, self._in_autocast, self._scaled, self._unscaled = None, None, False, False, False
        self._skipped_host, self._skipped_device = 0, None

    def before_fit(self):
        self._skipped_host, self._skipped_device = 0, torch.zeros((), device=self.learn.device)
        if self.dtype == torch.float16:
            device_type = self.learn.device.type
            # One scaler per device, kept across fits so the scale it has found carries over.
            if self.scaler is None or self._scaler_device != device_type:
                self.scaler, self._scaler_device = torch.amp.GradScaler(device_type, **self.scaler_kwargs), device_type
            self._probe = _StepProbe(self.learn)
            self._fused = getattr(self.learn.opt.opt, '_step_supports_amp_scaling', False)

    # validate() and get_preds() run only the validation events, so autocast is set up per phase.
    def before_train(self): self._setup_autocast()
    def before_validate(self): self._setup_autocast()

    def _setup_autocast(self):
        device_type = self.learn.device.type
        _check_supported(device_type, self.dtype)
        self._autocast = torch.autocast(device_type, dtype=self.dtype)

    def before_batch(self):
        self._autocast.__enter__()
        self._in_autocast = True

    def after_pred(self):
        pred = self.learn.pred
        if isinstance(pred, torch.Tensor) and pred.dtype in _DTYPES: self.learn.pred = pred.float()

    def after_loss(self): self._exit_autocast()   # backward runs outside autocast, as torch recommends

    def before_backward(self):
        if self.scaler is None: return
        self.learn.loss_grad = self.scaler.scale(self.learn.loss_grad)
        self._scaled = True

    def after_cancel_backward(self): self._scaled = False

    def after_backward(self):
        # Unscale (on the device, no read) so that callbacks from here on see true gradients.
        if not self._scaled: return
        self.scaler.unscale_(self._probe)
        self._scaled, self._unscaled = False, True

    def before_step(self):
        if not self._unscaled: return
        if self._fused:
            # The fused kernel reads `found_inf` and skips the update on the device. `_found_inf_per_device`
            # is private but is how GradScaler.step itself hands the check to fused optimizers.
            found_inf = sum(self.scaler._found_inf_per_device(self._probe).values())
            self.learn.opt.opt.found_inf = found_inf
            self._skipped_device += found_inf
            return
        self._probe.stepped = False
        self.scaler.step(self._probe)   # sync-ok: GradScaler's own inf check .item(), fp16 only (module docstring)
        if not self._probe.stepped:
            self._skipped_host += 1
            raise CancelStepException()

    def after_step(self):
        if not self._unscaled: return
        self.learn.opt.opt.__dict__.pop('found_inf', None)
        self.scaler.update()            # grows or shrinks the scale on the device
        self._unscaled = False

    def after_batch(self): self._exit_autocast()   # a batch cancelled before after_loss
    def cleanup_fit(self):
        self._exit_autocast()
        if self.learn is not None and self.learn.opt is not None: self.learn.opt.opt.__dict__.pop('found_inf', None)
        self._scaled = self._unscaled = False

    def _exit_autocast(self):
        if self._in_autocast:
            self._in_autocast = False
            self._autocast.__exit__(None, None, None)

    @property
    def skipped_steps(self):
        "Optimizer steps skipped on float16 overflow in the last fit (reads the device count once)."
        device_count = int(self._skipped_device.item()) if self._skipped_device is not None else 0  # sync-ok: on request
        return self._skipped_host + device_count

    @property
    def loss_scale(self):
        "The GradScaler's current scale (float16 only; one host read), or None."
        return self.scaler.get_scale() if self.scaler is not None else None

    def state_dict(self):
        return {'scaler': self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state):
        if 'scaler' not in state: return
        if self.scaler is None:
            raise ValueError("This checkpoint holds a float16 GradScaler state, but this MixedPrecision has none: "
                             "load it after a fit with MixedPrecision(torch.float16), or learn.to_fp16() first")
        self.scaler.load_state_dict(state['scaler'])

    def __repr__(self): return f"MixedPrecision({_DTYPES[self.dtype]})"


def _check_supported(device_type, dtype):
    if device_type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{torch.cuda.get_device_name()} has no bfloat16 support: use learn.to_fp16() "
                           "(float16 with loss scaling) instead of learn.to_bf16()")


def to_mixed_precision(learn, dtype, **scaler_kwargs):
    "Replace any MixedPrecision callback on `learn` by one with `dtype`; returns `learn`."
    learn.remove_cb(MixedPrecision)
    return learn.add_cb(MixedPrecision(dtype, **scaler_kwargs))


def to_fp32(learn):
    "Train in full precision again: remove MixedPrecision from `learn`; returns `learn`."
    return learn.remove_cb(MixedPrecision)
