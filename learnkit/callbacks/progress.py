"""Progress display: fastprogress bars in Jupyter and terminals, plain epoch lines without a tty."""
import sys
import time

from ..callback import Callback, noop

__all__ = ['ProgressCallback']


def _display_mode():
    "'notebook' in Jupyter, 'console' on a terminal, 'lines' otherwise (CI logs, pipes)."
    from fastprogress.fastprogress import IN_NOTEBOOK
    if IN_NOTEBOOK: return 'notebook'
    return 'console' if getattr(sys.stdout, 'isatty', lambda: False)() else 'lines'


def _format_row(row):
    return [f'{v:.6f}' if isinstance(v, float) else ('' if v is None else str(v)) for v in row]


class ProgressCallback(Callback):
    """A master bar over epochs and a bar over batches, with the results table updated each epoch.

    The loss shown on the batch bar is read from the device at most once every `refresh` seconds, so the
    bar never syncs the GPU on every batch. Without a terminal only the epoch lines are printed.
    """
    order = 60
    graph_safe = True  # graph mode: no per-batch call; the batch bar is closed at the end of training

    def __init__(self, refresh=0.5):
        self.refresh = refresh
        self.mbar = self.pbar = self.mode = None
        self._saved_logger = None

    def before_fit(self):
        self.mode = _display_mode()
        self._saved_logger = self.learn.logger
        # Inside no_logging() (lr_find, get_preds) the bars still show, the results table does not.
        silent = self._saved_logger is noop
        names = self.learn.recorder.metric_names if hasattr(self.learn, 'recorder') and not silent else []
        if self.mode == 'lines':
            self.mbar = None
            self._widths = [max(len(n), 9) for n in names]
            if not silent: self.learn.logger = self._print_line
            if names: print('  '.join(n.ljust(w) for n, w in zip(names, self._widths)), flush=True)
        else:
            from fastprogress.fastprogress import master_bar
            self.mbar = master_bar(range(self.learn.n_epoch))
            self.mbar.on_iter_begin()
            if not silent: self.learn.logger = lambda row: self.mbar.write(_format_row(row), table=True)
            if names: self.mbar.write(names, table=True)

    def _print_line(self, row):
        print('  '.join(v.ljust(w) for v, w in zip(_format_row(row), self._widths)), flush=True)

    def before_epoch(self):
        if self.mbar is not None: self.mbar.update(self.learn.epoch)

    def before_train(self): self._launch_bar()
    def before_validate(self): self._launch_bar()

    def _launch_bar(self):
        if (self.mode or _display_mode()) == 'lines': return
        from fastprogress.fastprogress import progress_bar
        n = len(self.learn.dl) if hasattr(self.learn.dl, '__len__') else None
        self.pbar = progress_bar(range(n or 0), total=n, parent=self.mbar, leave=False)
        self.pbar.update(0)
        self._last_read = time.monotonic()

    def after_batch(self):
        if self.pbar is None: return
        now = time.monotonic()
        if self.learn.training and now - self._last_read > self.refresh and hasattr(self.learn, 'recorder'):
            self._last_read = now
            self.pbar.comment = f'{self.learn.recorder.smooth_loss.value.item():.4f}'  # sync-ok: throttled
        self.pbar.update(self.learn.iter + 1)

    def after_train(self): self._close_bar()
    def after_validate(self): self._close_bar()

    def _close_bar(self):
        if self.pbar is not None: self.pbar.on_iter_end()
        self.pbar = None

    def after_fit(self):
        if self.mbar is not None: self.mbar.on_iter_end()
        self.cleanup_fit()

    def cleanup_fit(self):
        if self._saved_logger is not None: self.learn.logger = self._saved_logger
        self._saved_logger, self.mbar, self.pbar, self.mode = None, None, None, None
