"""The "is this a radiograph, the right way round" heuristics: :func:`check_is_radiograph`.

Chest X-rays are greyscale; a clearly colourful image (:func:`compute_colorfulness`: mean chroma
on a grid of at most ``COLOUR_GRID`` pixels per side) is most likely a photo uploaded by mistake.
A chest film read upright has a bright vertical band (spine and mediastinum) between two dark
lung fields; :func:`compute_orientation` measures it against the same band turned 90 degrees, so
a negative (inverted) film or one rotated by 90 degrees scores below zero, where a model would
otherwise answer with confidence (a negative film got PNEUMONIA 0.9996). A greyscale photo of
something else, or a film upside down (180 degrees), is not detected here (the model's OOD check
is the next line).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

COLOUR_GRID = 64  # compute_colorfulness reads at most this many pixels per side

_OOD_WARNING = ("This looks like a colour photo, not a chest X-ray; "
                "the prediction is not meaningful.")
_ORIENTATION_WARNING = ("This looks like a negative (inverted) or rotated film; upload the film upright, "
                        "bones bright: a prediction on it is not meaningful.")
ORIENTATION_GRID = 64         # compute_orientation reads a 64 x 64 greyscale thumbnail
# Below this the film is called inverted or rotated. On the 5,216 Kermany training films (each
# upright): minimum -0.004; the same films inverted or turned 90 degrees score at most about -0.05
# (python -m benchmarks.orientation prints the figures).
MIN_ORIENTATION = -0.03


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


def compute_orientation(image: Image.Image | np.ndarray) -> float:
    """Upright-film score: on a ``ORIENTATION_GRID``-pixel greyscale thumbnail (values 0..1), how
    much brighter the central vertical band (columns 42-58 %, rows 25-75 %) is than the two lung
    bands beside it (columns 15-35 % and 65-85 %), minus the same contrast measured across rows.
    Upright chest films score ~0.1-0.4; negatives and 90-degree turns score the opposite."""
    grey = (Image.fromarray(image) if isinstance(image, np.ndarray) else image).convert("L")
    a = np.asarray(grey.resize((ORIENTATION_GRID, ORIENTATION_GRID), Image.BILINEAR), dtype=np.float64) / 255.0
    n = ORIENTATION_GRID

    def band(r0, r1, c0, c1):
        return float(a[int(r0 * n):int(r1 * n), int(c0 * n):int(c1 * n)].mean())

    columns = band(.25, .75, .42, .58) - (band(.25, .75, .15, .35) + band(.25, .75, .65, .85)) / 2
    rows = band(.42, .58, .25, .75) - (band(.15, .35, .25, .75) + band(.65, .85, .25, .75)) / 2
    return columns - rows


def check_is_radiograph(image: Image.Image | np.ndarray, *, max_colorfulness: float = 0.08,
                        min_orientation: float = MIN_ORIENTATION) -> str | None:
    """Return ``None`` if ``image`` plausibly is a greyscale radiograph read upright, else a
    warning: colour (:func:`compute_colorfulness`), then a negative or 90-degree rotation
    (:func:`compute_orientation`)."""
    if compute_colorfulness(image) > max_colorfulness:
        return _OOD_WARNING
    if compute_orientation(image) < min_orientation:
        return _ORIENTATION_WARNING
    return None
