"""Pictures of synthetic sets: image grids with class captions, written atomically (matplotlib, Agg)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from storage import atomic_write


GRID_PADDING = 2  # pixels between the images of a grid
CAPTION_COLUMNS = 10  # classes per line of a captioned one-image-per-class grid
LABEL_CHARS = 24  # class names longer than this are shortened with an ellipsis


def save_image_grid(images: torch.Tensor, path: str, nrow: int, min_side: int = 56, *,
                    class_names: Optional[Sequence[Optional[str]]] = None, title: Optional[str] = None) -> None:
    """Save pixel-space images in [0, 1] as one PNG grid, one class per row when ``nrow = ipc``
    (with ``nrow = 1``, i.e. one image per class, all classes go in one row instead).

    Without ``class_names`` and ``title`` the file is torchvision's ``save_image`` grid (black
    padding), as before. With either, the grid is drawn with matplotlib (Agg, no pyplot state;
    white padding, pixels drawn 1:1 at 100 dpi) and the labels sit outside the images:

    * ``class_names`` and ``nrow > 1``: one class per row, its name at the left of the row
      (images must be class-major: the ``nrow`` images of class 0, then class 1, ...).
    * ``class_names`` and ``nrow == 1`` (one image per class): the classes wrap into lines of
      ``CAPTION_COLUMNS`` images, each captioned with its name below it (one long row with
      names at its left would be unreadable for 10 or more classes).
    * ``title``: one line above the grid (``distill.py``: method, dataset, ipc, experiment,
      iteration).

    Grey images (C = 1) are drawn with a grey colour map, RGB (C = 3) as they are. Names longer
    than ``LABEL_CHARS`` characters are shortened; an empty or ``None`` name becomes ``class k``.

    Args:
        images: (N, C, H, W), C in {1, 3}, pixel values in [0, 1] (use
            ``DatasetRecord.denormalize`` first; values outside are clipped).
        path: the ``.png`` file (written atomically, :func:`atomic_write`).
        nrow: images per row (``ipc`` for a synthetic set).
        min_side: images smaller than this are enlarged by an integer factor (nearest
            neighbour) so that small sets stay legible.
        class_names: one name per class, K = N / nrow entries (``DatasetRecord.class_names``).
        title: a line above the grid.

    Raises:
        ValueError: ``class_names`` has not N / ``nrow`` entries.
        OSError: the file cannot be written (one line, :func:`atomic_write`).
    """
    from torchvision.utils import make_grid, save_image

    images = images.detach().float().cpu().clamp(0, 1)
    per_row = nrow if nrow > 1 else images.shape[0]
    if class_names is not None:
        if nrow < 1 or len(class_names) * nrow != images.shape[0]:
            raise ValueError(f"save_image_grid: {len(class_names)} class names x nrow {nrow} != "
                             f"{images.shape[0]} images")
        class_names = [_short_label(name, k) for k, name in enumerate(class_names)]
    factor = max(1, -(-min_side // images.shape[-2]))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    if class_names is None and title is None:
        atomic_write(path, lambda tmp: save_image(images, tmp, nrow=per_row, padding=GRID_PADDING, format="png"))
        return
    pad, (height, width) = GRID_PADDING, images.shape[-2:]
    captions = []  # (x, y, text) in canvas pixels
    if class_names is not None and nrow == 1:
        font_px = 8 * 100 / 72  # 8 pt at 100 dpi
        gap = max(pad, int(0.7 * font_px * max(len(n) for n in class_names)) - width + 6)
        band = int(1.6 * font_px)
        cols = min(len(class_names), CAPTION_COLUMNS)
        lines = -(-len(class_names) // cols)
        canvas = torch.ones(images.shape[1], lines * (height + band + pad) + pad, cols * (width + gap) + gap)
        for k, name in enumerate(class_names):
            top, left = pad + (k // cols) * (height + band + pad), gap + (k % cols) * (width + gap)
            canvas[:, top:top + height, left:left + width] = images[k]
            captions.append((left + width / 2, top + height + band / 2, name))
    else:
        canvas = make_grid(images, nrow=per_row, padding=pad, pad_value=1.0)
        if images.shape[1] == 1:
            canvas = canvas[:1]  # make_grid repeats a grey channel three times
    _draw_grid(canvas, path, captions,
               row_labels=class_names if class_names is not None and nrow > 1 else None,
               row_centres=[pad + r * (height + pad) + height / 2 for r in range(len(class_names or []))],
               title=title)


def _short_label(name: Optional[str], index: int) -> str:
    """A class name for a grid: ``class k`` when empty, shortened past ``LABEL_CHARS`` characters."""
    text = " ".join(str(name).split()) if name is not None else ""
    text = text or f"class {index}"
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "\u2026"


def _draw_grid(canvas: torch.Tensor, path: str, captions: list, row_labels: Optional[list],
               row_centres: list, title: Optional[str]) -> None:
    """Draw ``canvas`` (C, H, W) in [0, 1] pixel for pixel at 100 dpi with captions (x, y, text),
    row labels at the left and a title, and write the PNG through :func:`atomic_write`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    pixels = canvas[0].numpy() if canvas.shape[0] == 1 else canvas.permute(1, 2, 0).numpy()
    fig = Figure(figsize=(canvas.shape[2] / dpi, canvas.shape[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks(row_centres if row_labels else [])
    if row_labels:
        ax.set_yticklabels(row_labels, fontsize=9)
        ax.tick_params(axis="y", length=0, pad=4)
    for spine in ax.spines.values():
        spine.set_visible(False)
    for x, y, text in captions:
        ax.text(x, y, text, fontsize=8, ha="center", va="center")
    if title:
        ax.set_title(title, fontsize=10, pad=6)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05,
                                               facecolor="white"))
