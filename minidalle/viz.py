"""Pictures: image grids with captions, for notebooks and for files the CLI writes.

Matplotlib is imported inside the functions so that importing minidalle stays fast and works
without a display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch


def as_uint8_hwc(image) -> np.ndarray:
    """Accept uint8 (H, W, 3) numpy/torch, or float (3, H, W) / (H, W, 3) in [0, 1]; return uint8 (H, W, 3).

    Example: torch.zeros(3, 8, 8) -> np.zeros((8, 8, 3), uint8)
    """
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim != 3:
        raise ValueError(f"expected one image with 3 dims, got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return a


def image_grid(images, ncols: int = 8, pad: int = 1) -> np.ndarray:
    """Tile images into one uint8 array, `pad` grey pixels between tiles.

    Example: 10 images of (32, 32, 3), ncols=8 -> array of shape (2*33+1, 8*33+1, 3)
    """
    ims = [as_uint8_hwc(im) for im in images]
    if not ims:
        raise ValueError("image_grid needs at least one image")
    h, w, _ = ims[0].shape
    nrows = (len(ims) + ncols - 1) // ncols
    ncols = min(ncols, len(ims))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 64, np.uint8)
    for k, im in enumerate(ims):
        r, c = divmod(k, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return grid


def show_grid(images, captions=None, ncols: int = 4, title: str | None = None, scale: float = 2.2):
    """A matplotlib figure of images with their (wrapped) captions underneath; returns the figure."""
    import matplotlib.pyplot as plt

    ims = [as_uint8_hwc(im) for im in images]
    nrows = (len(ims) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * (scale + 0.5)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(ims):
            ax.imshow(ims[k], interpolation="nearest")
            if captions is not None:
                ax.set_title("\n".join(textwrap.wrap(captions[k], 22)), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_grid(images, path: str | Path, captions=None, ncols: int = 4, title: str | None = None) -> Path:
    """Write `show_grid`'s figure to a PNG (atomically: temp file, then rename)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = show_grid(images, captions, ncols, title)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
