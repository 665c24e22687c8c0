"""What every decoder in :mod:`cxr.imaging` shares: :class:`ImageLoadError` and the size limits.

``MAX_PIXELS``, ``MIN_SIDE`` and ``MAX_ASPECT`` are checked by :func:`_check_size` on the declared
(header) size, before any pixel is decoded: PNG / JPEG (:mod:`.load`) and DICOM (:mod:`.dicom`)
alike. Files above ``MAX_FILE_BYTES`` are refused unread (:mod:`.load`).
"""

from __future__ import annotations

MAX_PIXELS = 40_000_000  # per image, checked from the header before decoding
MIN_SIDE = 32  # smaller side below this -> error
MAX_ASPECT = 8.0  # long/short side above this -> error
MAX_FILE_BYTES = 128 * 2**20  # larger files are refused before they are read
# Decoded films whose longer side is above this are reduced by a whole factor (box average) in
# the decoder: every model reads <= 512 px and the app shows <= 512 px, so the caller (the app's
# process) never holds a full 40-megapixel film (6320 x 6320 -> 2107 x 2107: 4 MB greyscale).
MAX_DECODED_SIDE = 2048

_CORRUPT = "truncated or corrupt image"


class ImageLoadError(ValueError):
    """Short, user-safe message: no traceback text, no file path, no patient data."""


def _reduce(image, max_side: int | None):
    """``image`` reduced by the smallest whole factor that brings its longer side to at most
    ``max_side`` (Pillow's ``Image.reduce``: the mean of each factor x factor block); unchanged
    when it already fits or ``max_side`` is None."""
    if not max_side:
        return image
    factor = -(-max(image.size) // int(max_side))
    return image.reduce(factor) if factor > 1 else image


def _check_size(width: int, height: int, max_pixels: int) -> None:
    """Reject images that are too large, too small or too elongated (header values)."""
    if width * height > max_pixels:
        raise ImageLoadError(f"image too large ({width}x{height} pixels; "
                             f"the limit is {max_pixels:,} pixels)")
    short, long = min(width, height), max(width, height)
    if short < MIN_SIDE:
        raise ImageLoadError(f"image too small ({width}x{height} pixels; "
                             f"each side must be at least {MIN_SIDE} pixels)")
    if long / short > MAX_ASPECT:
        raise ImageLoadError(f"unusual aspect ratio ({width}x{height} pixels; "
                             f"at most {MAX_ASPECT:g}:1 is accepted)")


def _strips_to_uint8(values, rows: int, step: int, shape: tuple, *, invert: bool = False):
    """Min-max to uint8 over strips of rows, without a float64 copy of the whole image:
    ``values(y)`` gives rows ``y:y + step`` as float64; two passes (range, then scaling) give the
    numbers of the whole-image formula. ``invert`` maps the maximum to 0."""
    import numpy as np

    low, high = np.inf, -np.inf
    for y in range(0, rows, step):
        v = values(y)
        low, high = min(low, float(v.min())), max(high, float(v.max()))
    out = np.zeros(shape, dtype=np.uint8)
    if high <= low:
        return out
    for y in range(0, rows, step):
        v = values(y)
        offset = (high - v) if invert else (v - low)
        out[y:y + step] = np.rint(offset * (255.0 / (high - low))).astype(np.uint8)
    return out
