"""Show a grid of images with titles (used by `show_batch`)."""
import math

__all__ = ['show_images']


def show_images(images, titles=None, max_n=9, figsize=None):
    """Draw up to `max_n` float (C, H, W) images in [0, 1] on a square-ish grid, gray for one channel.

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
        if titles is not None: ax.set_title(str(titles[i]), fontsize=9)
        ax.axis('off')
    fig.tight_layout()
    return fig
