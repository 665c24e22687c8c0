"""DICOM decoding via pydicom: header checks, modality LUT, VOI LUT, photometric interpretation.

:func:`_load_dicom` reads the header only, runs the checks of :mod:`.headers` and the size check,
then decodes the one MONOCHROME1 / MONOCHROME2 frame; :func:`_dicom_to_uint8` applies the modality
LUT (rescale slope/intercept), then the VOI LUT / windowing, then min-max to 0..255, and inverts
MONOCHROME1 so that it matches its MONOCHROME2 twin exactly. Every pydicom error becomes a generic
:class:`~cxr.imaging.ImageLoadError`. pydicom's warnings are ignored, and its logger silenced
(:class:`_quiet_pydicom`) while a file is decoded: both may quote values from the file.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .headers import _check_encoded_frame, _check_modality, _inflate_if_deflated, _pixel_error_message
from .limits import ImageLoadError, _check_size, _strips_to_uint8

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class _PydicomFilter(logging.Filter):
    """Drops pydicom's records emitted by a thread that is decoding a file (they may quote
    values from the file: names, IDs, encodings)."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_PYDICOM_FILTER = _PydicomFilter()
for _name in ("pydicom", "pydicom.config"):
    logging.getLogger(_name).addFilter(_PYDICOM_FILTER)


class _quiet_pydicom:
    def __enter__(self):
        _PydicomFilter.local.depth = getattr(_PydicomFilter.local, "depth", 0) + 1

    def __exit__(self, *exc):
        _PydicomFilter.local.depth -= 1
        return False


def _load_dicom(data: bytes, max_pixels: int, *, force: bool) -> Image.Image:
    """Header-only checks first, then decode; every pydicom error becomes generic."""
    data = _inflate_if_deflated(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings may quote element values (PHI)
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
            rows, columns = int(header.Rows), int(header.Columns)
            frames = int(header.get("NumberOfFrames") or 1)
            samples = int(header.get("SamplesPerPixel") or 1)
            photometric = str(header.get("PhotometricInterpretation", "")).strip().upper()
        except Exception:
            raise ImageLoadError("unreadable DICOM file or missing image attributes") from None
        _check_modality(header)
        if rows * columns * frames > max_pixels:
            raise ImageLoadError(f"image too large ({columns}x{rows} pixels x {frames} "
                                 f"frame(s); the limit is {max_pixels:,} pixels)")
        if frames > 1:
            raise ImageLoadError("multi-frame DICOM is not supported (one image per file)")
        if samples != 1 or photometric not in _MONOCHROME:
            raise ImageLoadError("colour (RGB/palette/YBR) DICOM is not supported; "
                                 "only MONOCHROME1/MONOCHROME2 radiographs")
        _check_size(columns, rows, max_pixels)

        try:
            dataset = pydicom.dcmread(io.BytesIO(data), force=force)
        except Exception:
            raise ImageLoadError("unreadable or truncated DICOM file") from None
        if "PixelData" not in dataset:
            raise ImageLoadError("DICOM file has no pixel data")
        _ensure_transfer_syntax(dataset)
        _check_encoded_frame(dataset, rows, columns)
        try:
            pixels = dataset.pixel_array
        except MemoryError:
            raise
        except Exception:
            raise ImageLoadError(_pixel_error_message(dataset)) from None
        if pixels.ndim != 2 or pixels.shape != (rows, columns):
            raise ImageLoadError("unexpected DICOM pixel data layout")
        del dataset.PixelData  # the encoded bytes are no longer needed
        try:
            grey = _dicom_to_uint8(pixels, dataset, invert=photometric == "MONOCHROME1")
        except MemoryError:
            raise
        except Exception:
            raise ImageLoadError("invalid DICOM rescale or window (VOI LUT) attributes") from None
    return Image.fromarray(grey, "L")


def _dicom_to_uint8(pixels: np.ndarray, dataset, *, invert: bool) -> np.ndarray:
    """Modality LUT, VOI LUT, then min-max to uint8: the same numbers as
    ``_scale_to_uint8(apply_voi_lut(apply_modality_lut(pixels)))`` (every step is a function
    of the pixel's stored value), without float64 copies of the whole image: integer pixels
    go through a table of their stored values (min-max over the values present), others
    through strips of rows."""
    if pixels.dtype.kind in "iu" and pixels.size:
        lo, hi = int(pixels.min()), int(pixels.max())
        if hi - lo < 1 << 20:  # integer pixels: map each stored value once, then index
            index = (pixels - lo).astype(np.intp) if lo else pixels.astype(np.intp, copy=False)
            present = np.bincount(index.ravel(), minlength=hi - lo + 1) > 0
            domain = np.arange(lo, hi + 1).astype(pixels.dtype)
            mapped = apply_voi_lut(apply_modality_lut(domain, dataset), dataset)
            mapped = np.nan_to_num(np.asarray(mapped, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            low, high = float(mapped[present].min()), float(mapped[present].max())
            if high <= low:
                return np.zeros(pixels.shape, dtype=np.uint8)
            offset = (high - mapped) if invert else (mapped - low)
            table = np.rint(np.clip(offset, 0, None) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
            return table[index]
    step = max(1, (1 << 20) // max(1, pixels.shape[1]))

    def values(y: int) -> np.ndarray:
        v = apply_voi_lut(apply_modality_lut(pixels[y:y + step], dataset), dataset)
        return np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)

    return _strips_to_uint8(values, pixels.shape[0], step, pixels.shape, invert=invert)


def _ensure_transfer_syntax(dataset) -> None:
    """A preamble-less file may lack file meta; record the encoding it was read with."""
    if "TransferSyntaxUID" in dataset.file_meta:
        return
    implicit, little = dataset.original_encoding
    syntax = (uid.ImplicitVRLittleEndian if implicit else
              uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    dataset.file_meta.TransferSyntaxUID = syntax
