"""The drawing shared by the diagnostics: series side by side, the colorful-dimension image, subplot grids.

Every function returns the matplotlib figure and never calls `plt.show()`.
"""
import math

__all__ = ['fig_ax', 'grid', 'plot_series', 'plot_color_dim']


def fig_ax(ax=None, figsize=(6, 4)):
    "`(figure, ax)`: a new figure when `ax` is None, else `ax` and its figure."
    import matplotlib.pyplot as plt
    if ax is None: fig, ax = plt.subplots(figsize=figsize)
    else: fig = ax.figure
    return fig, ax


def grid(n, ncols=3, figsize=None, size=(5, 3)):
    "A figure with `n` axes in rows of `ncols` (unused cells hidden); returns `(figure, flat list of axes)`."
    import matplotlib.pyplot as plt
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=figsize or (size[0] * ncols, size[1] * nrows), squeeze=False)
    axs = list(axs.flatten())
    for ax in axs[n:]: ax.set_visible(False)
    return fig, axs


def plot_series(x, series, title=None, xlabel='batch', logy=(), figsize=None):
    "One panel per `{name: values}` entry, each plotted against `x`; names in `logy` get a log scale."
    fig, axs = grid(len(series), len(series), figsize=figsize or (4 * len(series), 3))
    for ax, (name, y) in zip(axs, series.items()):
        ax.plot(x, y)
        ax.set_title(name); ax.set_xlabel(xlabel)
        if name in logy: ax.set_yscale('log')
    if title: fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_color_dim(hist, hist_range, title=None, figsize=(10, 5), ax=None):
    """Draw `hist` (bins x batches, already log1p) as an image: batches along x, bin 0 at the bottom
    (`origin='lower'`), as fastai's `color_dim`. The y axis is labelled with the activation values."""
    fig, ax = fig_ax(ax, figsize)
    lo, hi = hist_range
    n_batches = hist.shape[1]
    ax.imshow(hist.numpy(), origin='lower', aspect='auto', interpolation='nearest',  # sync-ok: a CPU tensor, a plot
              extent=(0, n_batches, lo, hi))
    ax.set_xlabel('batch'); ax.set_ylabel('activation')
    if title: ax.set_title(title)
    return fig
