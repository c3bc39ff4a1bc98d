"""Pictures: image grids with captions, for notebooks and for files the CLI writes, and
`as_uint8_hwc`, the one reader of "an image" (numpy or torch, uint8 or float, either channel
order) that these helpers and the judge share.

Matplotlib is imported inside the functions so that importing minidalle stays fast and works
without a display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from .errors import DataError


def as_uint8_hwc(image) -> np.ndarray:
    """Any single RGB image the project makes -> uint8 numpy (H, W, 3), the one normaliser that
    the plotting helpers and the judge share.

    Accepted: numpy arrays or torch tensors (any device, with or without grad); channels last
    (H, W, 3) or first (3, H, W), as a generator emits; uint8 kept as is. Any other dtype is read
    as 0..1 when its largest value is <= 1 (floats from a decoder or `/ 255`) and as 0..255
    otherwise, then rounded and clipped; NaN becomes 0. An all-dark 0..255 float image (max <= 1)
    is therefore read as 0..1: a near-black image either way. (H, W, 3) wins when both ends are 3.
    Anything else (grey (H, W), RGBA, a batch) raises DataError.
    Example: torch.zeros(3, 32, 32) -> np.zeros((32, 32, 3), np.uint8)
    Example: np.full((8, 8, 3), 0.5) -> np.full((8, 8, 3), 128, np.uint8)  (0..1 floats)
    Example: np.full((8, 8, 3), 200.0) -> np.full((8, 8, 3), 200, np.uint8)  (0..255 floats)
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = image.float()  # numpy has no bfloat16
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] != 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise DataError(f"expected one RGB image, (H, W, 3) or (3, H, W); got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    a = np.nan_to_num(a.astype(np.float32), nan=0.0)
    # Scaling by the value range, not the dtype: decoders emit 0..1 floats, but a uint8 image
    # converted with .float() is 0..255, and treating it as 0..1 turned every such image white.
    if a.max(initial=0) <= 1.0:
        a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


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


CAPTION_LINES = 3  # lines of a prompt a ranked grid writes above its images (60 characters each)


def save_ranked_grid(prompts: list[str], images, scores, path: str | Path, title: str | None = None,
                     scale: float = 1.8, colours=None, ncols: int = 1) -> Path:
    """Each prompt above its ranked images (best first) with their scores; a PNG written atomically.

    images: per prompt a sequence of k images; scores: per prompt k numbers; colours: per prompt None
    or k (mark, colour) pairs for the labels, e.g. ("✓", "tab:green") for an image the judge accepts;
    ncols: prompts side by side (row by row). A prompt is written in at most CAPTION_LINES lines.
    The layout is computed here (one axes per prompt, its images side by side in one picture), not by
    matplotlib's layout engine, so the cost grows with the number of prompts and stays small; glyphs
    the font lacks (emoji, CJK) are drawn as boxes without a warning each.
    Example: save_ranked_grid(["a red circle"], [imgs (4, 32, 32, 3)], [[0.31, 0.29, 0.2, 0.1]], "grid.png")
    """
    import warnings

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = max((len(row) for row in images), default=1)
    n = max(len(prompts), 1)
    nrows = -(-n // ncols)
    cell_w, cell_h, head = max(k, 3) * scale, scale + 0.95, 0.45 if title else 0.1  # inches
    fig = plt.figure(figsize=(cell_w * ncols, nrows * cell_h + head))
    width, height = cell_w * ncols, nrows * cell_h + head
    colours = colours or [None] * len(prompts)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # emoji / CJK prompts: boxes, no noise
        for i, (prompt, row, row_scores, row_colours) in enumerate(zip(prompts, images, scores, colours)):
            r, c = divmod(i, ncols)
            x0, top = c * cell_w, height - head - r * cell_h  # the cell's left edge and top, in inches
            lines = textwrap.wrap(prompt, 60) or [""]
            if len(lines) > CAPTION_LINES:
                lines = lines[:CAPTION_LINES - 1] + [lines[CAPTION_LINES - 1][:56] + " ..."]
            fig.text((x0 + cell_w / 2) / width, (top - 0.08) / height, "\n".join(lines), ha="center", va="top",
                     fontsize=9 if len(lines) == 1 else 8)
            side = scale * 0.9  # each image's side, in inches, below up to 3 caption lines and its score
            gap = (cell_w - k * side) / (k + 1)
            for j in range(len(row)):
                ax = fig.add_axes(((x0 + gap + j * (side + gap)) / width, (top - 0.82 - side) / height,
                                   side / width, side / height))
                ax.axis("off")
                ax.imshow(as_uint8_hwc(row[j]), interpolation="nearest")
                mark = f" {row_colours[j][0]}" if row_colours else ""
                ax.set_title(f"#{j + 1}{mark}: {row_scores[j]:.3g}", fontsize=8, pad=2,
                             color=row_colours[j][1] if row_colours else "black")
        if title:
            fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=10)
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), the datasets' layout."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
