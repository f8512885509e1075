"""Show a grid of images with titles (used by `show_batch` and `show_results`), and the titles of targets."""
import math

__all__ = ['show_images', 'label_titles']


def label_titles(y, vocab=None):
    """Readable labels of a batch of targets or decoded predictions: the class name of each class index, or for
    multi-hot rows (multi-label) the names of the classes set, joined by ';'. Without a vocab, the indices."""
    y = y.detach().cpu()  # sync-ok: titles for a plot, on request
    name = (lambda i: vocab[i]) if vocab is not None else (lambda i: i)
    if y.ndim == 2:
        return [';'.join(str(name(i)) for i in row.nonzero().flatten().tolist()) for row in y]  # sync-ok: CPU labels
    return [name(i) for i in y.tolist()]  # sync-ok: CPU labels, titles


def show_images(images, titles=None, max_n=9, figsize=None, colors=None):
    """Draw up to `max_n` float (C, H, W) images in [0, 1] on a square-ish grid, gray for one channel, each
    titled by `titles` (in the colour of `colors`, when given).

    Returns a matplotlib Figure with one axes per image shown; it is not attached to pyplot, so a notebook
    displays it once (as the cell's value) and a script can `fig.savefig(...)`."""
    from matplotlib.figure import Figure
    n = min(max_n, len(images))
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=figsize or (2 * ncols, 2 * nrows))
    for i in range(n):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        img = images[i].detach().cpu().float().clamp(0, 1)  # sync-ok: a plot, on request
        if img.shape[0] == 1: ax.imshow(img[0].numpy(), cmap='gray', vmin=0, vmax=1)  # sync-ok: a CPU image, a plot
        else: ax.imshow(img.permute(1, 2, 0).numpy())  # sync-ok: a CPU image, a plot
        if titles is not None: ax.set_title(str(titles[i]), fontsize=9, **({'color': colors[i]} if colors else {}))
        ax.axis('off')
    fig.tight_layout()
    return fig
