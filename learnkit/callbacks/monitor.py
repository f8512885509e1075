"""HealthMonitor: the health report live, during fit; and `health_cbs()`, every callback the report needs."""
import time
import warnings

from ..callback import Callback, CancelFitException, noop
from .activations import ActivationStats
from .gradients import GradientStats
from .inputs import InputStats
from .outputs import OutputStats
from .weights import WeightStats

__all__ = ['HealthMonitor', 'health_cbs', 'live_roots', 'WHOLE_RUN_CHECKS']

# Findings that judge a run as a whole (its progress, its outcome): mid-epoch they are not shown, and they never
# stop a fit, which may still be warming up.
WHOLE_RUN_CHECKS = frozenset({'no_progress', 'loss_plateau', 'lr_too_low', 'oscillating_loss', 'overfitting',
                              'metric_at_chance', 'predictions_collapsed', 'growth_collapse_cycle', 'update_ratio',
                              'loss_diverged'})
_STOP_LEVELS = {None: (), 'error': ('error',), 'warning': ('error', 'warning')}


def live_roots(report):
    """The root causes of `report` once the findings that judge the whole run (`WHOLE_RUN_CHECKS`) are set aside: the
    warnings and errors of other checks that no finding of another such check explains. A layer's collapse that a
    growth-collapse cycle explains is one: the cycle may not be judged mid-run, the collapse can."""
    by_key = {f.key: f for f in report.findings}

    def explained(f):
        seen = set()
        while f.cause is not None and f.cause in by_key and f.key not in seen:
            seen.add(f.key)
            f = by_key[f.cause]
            if f.check not in WHOLE_RUN_CHECKS: return True
        return False
    return [f for f in report.findings if f.severity != 'info' and f.check not in WHOLE_RUN_CHECKS
            and not explained(f)]


class HealthMonitor(Callback):
    """Runs the health checks during fit: at the end of every epoch and every `check_every` training batches
    (None: epoch ends only), reading all the records in one transfer each time, and shows each new root cause in
    the progress output (`show=True`). With `stop_on='error'` (or 'warning') it ends the fit as soon as a finding
    of that severity appears that nothing explains but findings that judge the whole run (`live_roots`), so a
    doomed run stops early; those findings (no progress, a plateau, overfitting, a growth-collapse cycle, ...)
    never stop a fit themselves, and are shown only when the fit's last epoch ends. `report` is the last report, `stopped_by` the finding that ended
    the fit (or None). Keywords override the report's `Thresholds`, validated now. It stays silent inside
    `learn.no_logging()` and does nothing during `lr_find`, whose loss diverges on purpose.

    Cost: a check reads the records back (one host transfer) and runs the checks on the CPU, over the whole run so
    far, so a check costs more the longer the fit. `max_share` (default 1%) bounds what the mid-epoch checks take: one
    is skipped (and counted in `skipped_checks`) while the last check took more than `max_share` of the time since it
    ended; epoch-end checks always run. `max_share=None` runs every check. `checked_at` lists the training batches
    checked. In graph mode (`fit(..., graph=True)`) it checks at epoch ends only, and warns once when `check_every`
    asked for more."""
    order = 90  # after every recorder has recorded the batch

    def __init__(self, check_every=200, stop_on=None, show=True, max_share=0.01, **thresholds):
        from ..diagnostics.findings import thresholds as make_thresholds
        if check_every is not None and (not isinstance(check_every, int) or isinstance(check_every, bool)
                                        or check_every < 1):
            raise ValueError(f"HealthMonitor(check_every={check_every!r}): a number of training batches, an int >= 1, "
                             "or None to check at epoch ends only")
        if stop_on not in _STOP_LEVELS:
            raise ValueError(f"HealthMonitor(stop_on={stop_on!r}): use None (never stop), 'error' or 'warning'")
        if max_share is not None and (isinstance(max_share, bool) or not isinstance(max_share, (int, float))
                                      or not 0 < max_share <= 1):
            raise ValueError(f"HealthMonitor(max_share={max_share!r}): the largest share of the fit's time the "
                             "mid-epoch checks may take, a number in (0, 1], or None to run every check")
        self.check_every, self.stop_on, self.show, self.max_share = check_every, stop_on, show, max_share
        self.thresholds = make_thresholds(**thresholds)
        self.report, self.stopped_by, self._shown, self._off, self._quiet = None, None, set(), False, False
        self.checked_at, self.skipped_checks, self._graph_warned = [], 0, False

    def before_fit(self):
        from .schedule import LRFinder
        self.report, self.stopped_by, self._shown = None, None, set()
        self.checked_at, self.skipped_checks, self._last_cost, self._last_end = [], 0, 0., time.perf_counter()
        # lr_find diverges on purpose: nothing to check there. Inside no_logging() (get_preds...) nothing is shown.
        self._off = any(isinstance(cb, LRFinder) for cb in self.learn.cbs)
        self._quiet = self.learn.logger is noop

    # Graph mode (learnkit.graph_mode): no per-batch host work can run inside the captured step, so it checks at
    # epoch ends only.
    graph_safe = True

    def graph_setup(self, graph):
        if self.check_every and not self._graph_warned:
            self._graph_warned = True
            warnings.warn(f"HealthMonitor(check_every={self.check_every}): in graph mode (fit(graph=True)) the health "
                          "checks run at the end of each epoch only; pass check_every=None to say so and silence this "
                          "warning", UserWarning, stacklevel=2)

    def after_batch(self):
        if not (self.check_every and self.learn.training and self.learn.train_iter % self.check_every == 0): return
        if self.max_share is not None and self._last_cost > self.max_share * (time.perf_counter() - self._last_end):
            self.skipped_checks += 1  # the checks would take more than their share of the fit's time
            return
        self.check(mid_epoch=True)

    def after_epoch(self): self.check(mid_epoch=False)

    def check(self, mid_epoch=False):
        "Run the checks on what is recorded so far; show new root causes; stop the fit if asked to."
        from ..diagnostics.health import RunData, run_checks
        if self._off: return
        start = time.perf_counter()
        self.report = report = run_checks(RunData.from_learner(self.learn), self.thresholds)
        self.checked_at.append(self.learn.train_iter)
        self._last_end = time.perf_counter()
        self._last_cost = self._last_end - start
        live = live_roots(report)
        # Findings that judge the whole run wait for its end: after an earlier epoch a plateau may be the warm-up of
        # fit_one_cycle, a learning rate "too low" its first steps.
        run_ended = not mid_epoch and self.learn.epoch >= self.learn.n_epoch - 1
        roots = report.root_causes if run_ended else live
        new = [f for f in roots if f.key not in self._shown]
        self._shown.update(f.key for f in new)
        if self.show and new and not self._quiet: self._write(new)
        stop = [f for f in live if f.severity in _STOP_LEVELS[self.stop_on]]
        if stop:
            self.stopped_by = stop[0]
            if not self._quiet:
                self._write([], f"HealthMonitor: stopping the fit at training batch {self.learn.train_iter} "
                                f"({stop[0].severity} {stop[0].key})")
            raise CancelFitException()

    def _write(self, findings, extra=None):
        lines = [f"{f.severity.upper()} {f.key} (batch {self.learn.train_iter}): {f.message}. Try: {f.advice}"
                 for f in findings] + ([extra] if extra else [])
        bar = getattr(getattr(self.learn, 'progress', None), 'mbar', None)
        for line in lines:
            if bar is not None: bar.write(line)
            else: print(line, flush=True)


def health_cbs(check_every=200, stop_on=None, show=True, grad_every=4, max_share=0.01, **thresholds):
    """Every callback the health report needs, for `Learner(..., cbs=health_cbs())`: InputStats, OutputStats,
    ActivationStats (histograms, and the bounded activations such as tanh hooked too, for saturation),
    GradientStats, WeightStats and a `HealthMonitor(check_every, stop_on, show, max_share, **thresholds)`.

    Gradients are recorded on every `grad_every`-th training step (`GradientStats(every=grad_every)`; its dead-unit
    windows then span 50 recorded steps, 200 batches): their norms, update ratios and dead units change slowly, and
    one step in four costs a quarter as much (for the chapter's simple_cnn on a 2-core CPU, about 2% of the training
    time rather than 8%; see `bench/overhead.py`). Pass `grad_every=1` to record every step."""
    if not isinstance(grad_every, int) or isinstance(grad_every, bool) or grad_every < 1:
        raise ValueError(f"health_cbs(grad_every={grad_every!r}): grad_every must be a positive int (record the "
                         "gradients on every N-th training step; 1: every step)")
    return [InputStats(), OutputStats(), ActivationStats(with_hist=True, include_saturating=True),
            GradientStats(every=None if grad_every == 1 else grad_every), WeightStats(),
            HealthMonitor(check_every, stop_on, show, max_share, **thresholds)]
