"""The colour "is this a radiograph" heuristic: :func:`check_is_radiograph`.

Chest X-rays are greyscale; a clearly colourful image (:func:`compute_colorfulness`: mean chroma
on a grid of at most ``COLOUR_GRID`` pixels per side) is most likely a photo uploaded by mistake.
Only colour is checked: a greyscale photo of something else is not detected.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

COLOUR_GRID = 64  # compute_colorfulness reads at most this many pixels per side

_OOD_WARNING = ("This looks like a colour photo, not a chest X-ray; "
                "the prediction is not meaningful.")


def compute_colorfulness(image: Image.Image | np.ndarray) -> float:
    """Mean per-pixel chroma ``(max(R,G,B) - min(R,G,B)) / 255`` in [0, 1].

    ``image``: a PIL image or an ``H x W x 3`` uint8 RGB array (``np.asarray(rgb_image)``).

    Computed on every k-th pixel in each direction, k chosen so that at most
    ``COLOUR_GRID`` pixels per side are read (k = 1 for images up to that size). Greyscale
    modes return 0. Chest X-rays score ~0; colour photos score clearly higher (typically > 0.15).
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("expected an H x W x 3 uint8 RGB array")
        pixels = image
    elif image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;"):
        return 0.0
    else:
        pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    step = max(1, -(-max(pixels.shape[:2]) // COLOUR_GRID))
    grid = pixels[::step, ::step]
    r, g, b = grid[..., 0], grid[..., 1], grid[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float(chroma.mean()) / 255.0


def check_is_radiograph(image: Image.Image | np.ndarray, *, max_colorfulness: float = 0.08) -> str | None:
    """Return ``None`` if ``image`` plausibly is a greyscale radiograph, else a warning.

    Only colour is checked: a greyscale photo of something else is not detected here.
    """
    if compute_colorfulness(image) > max_colorfulness:
        return _OOD_WARNING
    return None
