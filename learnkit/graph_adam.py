"""Graph mode's optimizer step: torch's Adam/AdamW update, on torch's own optimizer state, with hyper-parameters that
may be 0-d device tensors, in foreach ops that never read the device.

Why not torch's own step? Graph mode (`graph_mode.py`) gives the parameter groups their lr and mom as 0-d device
tensors that a captured step updates. torch accepts tensor hyper-parameters with `capturable=True`, but its foreach
implementation then reads a tensor beta1 on the host (`_foreach_pow(beta1, steps)` and `_foreach_lerp_` take
Python numbers: a sync, which fails a capture), its fused kernels take beta1 as a number, and its single-tensor
implementation, which keeps everything on the device, launches about 20 kernels per parameter. This step launches
about 20 per parameter group, and computes what torch's non-capturable step computes, up to float32 rounding of
the bias corrections (the CPU tests hold it to torch's within 1e-5).

The state stays torch's (`exp_avg`, `exp_avg_sq`, `step` per parameter), so a checkpoint or an eager fit carries on
from a graph fit. During the fit the step counts are 0-d float32 tensors on the parameters' device (as torch keeps
them for capturable and fused optimizers); `restore()` puts them back on the CPU for the others, as torch's
`load_state_dict` would.
"""
import torch

__all__ = ['GraphAdam']

_SUPPORTED = (torch.optim.Adam, torch.optim.AdamW)


class GraphAdam:
    "The Adam/AdamW step of `opt` (a learnkit OptimWrapper) for graph mode; see the module docstring."
    def __init__(self, opt):
        torch_opt = opt.opt
        if type(torch_opt) not in _SUPPORTED:
            raise ValueError(f"fit(graph=True) runs torch's Adam and AdamW (learnkit.Adam, the default opt_func); this "
                             f"learner's optimizer is {type(torch_opt).__name__}. Use opt_func=learnkit.Adam, or fit "
                             "without graph=True.")
        for flag in ('amsgrad', 'maximize', 'differentiable'):
            if any(g.get(flag) for g in torch_opt.param_groups):
                raise ValueError(f"fit(graph=True) does not run Adam with {flag}=True; fit without graph=True.")
        self.opt = torch_opt
        self.decoupled = isinstance(torch_opt, torch.optim.AdamW)
        self.groups = [(g, [p for p in g['params'] if p.requires_grad]) for g in torch_opt.param_groups]
        self._cpu_steps = []  # parameters whose step count torch keeps on the CPU, moved back by restore()
        for g, params in self.groups:
            for p in params: self._init_state(p, g)
        _check_same_steps(self.groups, torch_opt.state)

    def _init_state(self, p, group):
        state = self.opt.state[p]
        if not state:  # what torch's first step creates, made now so that capture sees it
            state['step'] = torch.zeros((), dtype=torch.float32, device=p.device)
            state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not (group['capturable'] or group['fused']): self._cpu_steps.append(p)
        elif state['step'].device != p.device:
            state['step'] = state['step'].to(p.device, torch.float32)
            self._cpu_steps.append(p)

    def state_tensors(self):
        "Every optimizer state tensor a step changes (graph mode restores them after its warm-up steps)."
        return [t for g, params in self.groups for p in params for t in self.opt.state[p].values()]

    @torch.no_grad()
    def step(self):
        "One update of every parameter with a gradient. Inside a captured step: device ops only."
        for group, params in self.groups:
            params = [p for p in params if p.grad is not None]
            if params: self._update(group, params)

    def _update(self, group, params):
        state = [self.opt.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs = [s['exp_avg'] for s in state], [s['exp_avg_sq'] for s in state]
        steps = [s['step'] for s in state]
        lr, (beta1, beta2), eps, wd = group['lr'], group['betas'], group['eps'], group['weight_decay']
        torch._foreach_add_(steps, 1)
        step = steps[0]  # the same count for the whole group (checked when graph mode starts)
        bias1, bias2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step).sqrt()
        if _nonzero(wd):
            if self.decoupled: torch._foreach_mul_(params, 1 - lr * wd)
            elif isinstance(wd, torch.Tensor): grads = torch._foreach_add(grads, torch._foreach_mul(params, wd))
            else: grads = torch._foreach_add(grads, params, alpha=wd)
        if isinstance(beta1, torch.Tensor):  # m = beta1 m + (1 - beta1) g, in ops that take a tensor beta1
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, torch._foreach_mul(grads, 1 - beta1))
        else: torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        if isinstance(beta2, torch.Tensor):
            torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(grads, 1 - beta2), grads)
        else: torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(update, -lr / bias1)
        torch._foreach_add_(params, update)

    def restore(self):
        "Step counts back on the CPU where torch keeps them (non-capturable, non-fused groups): one read per fit."
        for p in self._cpu_steps:
            state = self.opt.state.get(p)
            if state: state['step'] = state['step'].cpu()  # sync-ok: once, at the end of a graph fit
        self._cpu_steps = []


def _nonzero(v): return isinstance(v, torch.Tensor) or v != 0


def _check_same_steps(groups, state):
    "Every parameter of a group at the same step count: the bias corrections are computed once per group."
    for g, params in groups:
        steps = [state[p]['step'] for p in params]
        if len(steps) > 1 and len(set(torch.stack(steps).tolist())) > 1:  # sync-ok: once per fit
            raise ValueError("fit(graph=True) needs every parameter of an optimizer group at the same step count; this "
                             "optimizer's differ (parameters unfrozen after training?). Fit with reset_opt=True, or "
                             "without graph=True.")
