"""Decode untrusted PNG / JPEG / DICOM input into one canonical 8-bit RGB PIL image.

This is the ONE place in the project where pixels are decoded, so training, the app and
the tests all see the same image for the same file. Every failure raises
:class:`ImageLoadError` with a short, user-safe message: no traceback text, no file path
and no patient data (the original exception is never chained).

Canonical output: a fully loaded ``"RGB"`` image, 8 bits per channel, EXIF orientation
applied, grey values replicated in the three channels. Conversion rules:

* ``L`` / ``1`` / ``RGB`` / ``CMYK`` / ``YCbCr`` / ... -> Pillow's own ``convert("RGB")``.
* Modes with alpha (``LA``, ``RGBA``, ``P`` with transparency, ...) are composited onto
  a **black** background (the background of a radiograph), then converted to RGB.
* High bit-depth modes (``I;16*``, ``I``, ``F``) -> min-max normalised over the image's
  actual pixel range to 0..255, so 12-bit data stored in 16 bits is never clipped to
  white. A constant image becomes all black.
* DICOM: modality LUT (rescale slope/intercept), then VOI LUT / windowing, then min-max
  to 0..255; MONOCHROME1 is inverted so it matches its MONOCHROME2 twin exactly.

Pillow's global state is never modified: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False,
only ``ACCEPTED_FORMATS`` may be opened, ``DecompressionBombWarning`` is made an error
inside this package only, and the pixel count is checked from the header before decoding.

Decode budget (hostile input): every declared size is checked before decoding - the PNG /
JPEG header, the DICOM Rows x Columns *and* the header of the encoded frame inside
encapsulated DICOM pixel data (JPEG SOF, JPEG 2000 SIZ); JPEG streams with more than
``MAX_JPEG_SCANS`` scans are refused before decoding; the Deflated DICOM transfer syntax is
inflated in a capped stream; files above ``MAX_FILE_BYTES`` are refused unread. The decode
itself runs in a small pool of worker processes (:class:`DecodePool`): each file gets at most
``DECODE_TIMEOUT_S`` seconds (wall clock) and ``DECODE_MEMORY_MB`` MB of address space
(``RLIMIT_AS``); a worker over either limit is killed and replaced, and the caller gets an
:class:`ImageLoadError`. Worker and parent exchange raw pixel bytes and a small JSON header,
never pickles. pydicom's logger is silenced while a file is decoded (its messages may quote
values from the file).

Layout, one concern per module (import the public names from ``cxr.imaging`` itself):

* :mod:`.load` - :func:`load_image`: reading the source, PNG / JPEG via Pillow, the canonical
  conversion, and ``_decode``, the entry point a decode worker runs.
* :mod:`.dicom` - DICOM via pydicom: modality LUT, VOI LUT, MONOCHROME1 / MONOCHROME2.
* :mod:`.headers` - the pre-decode header checks: JPEG markers and scan count, JPEG 2000 SIZ,
  encapsulated DICOM frames, capped inflation of Deflated DICOM, Modality.
* :mod:`.sandbox` - :class:`DecodePool`: the worker processes, their wire protocol, the time and
  memory budget.
* :mod:`.radiograph` - :func:`check_is_radiograph`: colour and orientation (negative, 90-degree turn) checks.
* :mod:`.limits` - :class:`ImageLoadError` and the size limits every decoder checks.

The names below are re-exports: code reads each one in the module that uses it, so a test that
patches a limit or a helper patches it there (e.g. ``cxr.imaging.load.MAX_FILE_BYTES``), not here.
"""

from __future__ import annotations

from .headers import MAX_JPEG_SCANS, RADIOGRAPH_MODALITIES  # noqa: F401
from .limits import MAX_ASPECT, MAX_FILE_BYTES, MAX_PIXELS, MIN_SIDE, ImageLoadError
from .load import ACCEPTED_FORMATS, _to_rgb8, load_image  # noqa: F401 (_to_rgb8: tests)
from .radiograph import COLOUR_GRID, check_is_radiograph, compute_colorfulness, compute_orientation
from .sandbox import (  # noqa: F401
    DECODE_MEMORY_MB, DECODE_TIMEOUT_S, DECODE_WORKERS, DecodePool, close_default_pool, default_pool,
)

__all__ = [
    "ACCEPTED_FORMATS", "COLOUR_GRID", "DECODE_MEMORY_MB", "DECODE_TIMEOUT_S", "MAX_ASPECT", "MAX_FILE_BYTES",
    "MAX_JPEG_SCANS", "MAX_PIXELS", "MIN_SIDE", "DecodePool", "ImageLoadError", "check_is_radiograph",
    "compute_colorfulness", "compute_orientation", "load_image",
]
