"""The decode entry points: :func:`load_image`, and PNG / JPEG via Pillow.

:func:`load_image` reads the source (at most ``MAX_FILE_BYTES``) and decodes it in the decode
sandbox (:mod:`.sandbox`) or, with ``isolate=False``, in this thread (:func:`_decode_guarded`).
:func:`_decode`, which a sandbox worker runs, sends DICOM to :mod:`.dicom` and everything else to
Pillow, which may open only ``ACCEPTED_FORMATS``. The result is made canonical here
(:func:`_to_canonical`, :func:`_to_rgb8`; the rules are in the :mod:`cxr.imaging` docstring).
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..locate import DICOM_SUFFIXES
from .dicom import _load_dicom, _quiet_pydicom
from .headers import _check_jpeg_stream
from .limits import (
    _CORRUPT, MAX_DECODED_SIDE, MAX_FILE_BYTES, MAX_PIXELS, ImageLoadError, _check_size, _reduce, _strips_to_uint8,
)
from .sandbox import DecodePool, default_pool

ACCEPTED_FORMATS = ("PNG", "JPEG")  # Pillow formats; DICOM is handled by pydicom

_NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Formats people upload by mistake, named in the error message (sniffed, never decoded).
_OTHER_FORMATS = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"RIFF", "WebP"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
)


def load_image(source, *, max_pixels: int = MAX_PIXELS, isolate: "bool | DecodePool" = True,
               max_side: int | None = MAX_DECODED_SIDE) -> Image.Image:
    """Decode ``source`` into a fully loaded 8-bit RGB image.

    ``source`` is a ``str`` / ``os.PathLike`` path, ``bytes``, a binary file object or a PIL
    image (already decoded by the caller: the same checks and conversions are applied - size
    limits, EXIF orientation, 16-bit scaling, alpha onto black). DICOM is recognised by the
    ``DICM`` magic at offset 128, or - for files without the 128-byte preamble - by a ``.dcm`` /
    ``.dicom`` suffix. Everything else must be PNG or JPEG by content (the file name is not
    trusted). Raises :class:`ImageLoadError`.

    ``isolate``: decode in the shared :class:`DecodePool` (default; time and memory limits), in
    a given pool, or - ``False`` - in this thread without those two limits (trusted files only).

    ``max_side``: a film whose longer side is above it comes back reduced by a whole factor
    (``MAX_DECODED_SIDE``, 2048, by default; the reduction runs where the decode runs, so a
    pooled decode hands this process only the reduced pixels). ``None`` keeps the full size.
    """
    with _quiet_pydicom():
        if isinstance(source, Image.Image):
            return _from_pil(source, max_pixels, max_side)
        data, suffix = _read_source(source)
        if isolate is False:
            image = _decode_guarded(data, suffix, max_pixels, max_side)
        else:
            pool = isolate if isinstance(isolate, DecodePool) else default_pool()
            image = pool.decode(data, suffix, max_pixels, max_side)
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_pil(image: Image.Image, max_pixels: int, max_side: int | None = MAX_DECODED_SIDE) -> Image.Image:
    """An image the caller opened: the loader's checks and canonical conversion, on a copy."""
    try:
        _check_size(*image.size, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            rotated = ImageOps.exif_transpose(image)  # a copy; the caller's image is untouched
            out = _reduce(_to_canonical(rotated), max_side)   # one copy: _to_rgb8 would canonicalise again
            out = out if out.mode == "RGB" else out.convert("RGB")
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError("image too large (decompression bomb protection)") from None
    except Exception:
        raise ImageLoadError(_CORRUPT) from None
    out.info.clear()
    return out


def _decode_guarded(data: bytes, suffix: str, max_pixels: int, max_side: int | None = MAX_DECODED_SIDE) -> Image.Image:
    """In-process decode: ``L`` or ``RGB`` image, or :class:`ImageLoadError` (never another error)."""
    try:
        image = _decode(data, suffix, max_pixels, max_side)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError("image needs too much memory to decode") from None
    except Exception:  # anything unexpected: never leak its text (may hold a path)
        raise ImageLoadError("could not read the image") from None
    image.info.clear()
    return image


def _decode(data: bytes, suffix: str, max_pixels: int, max_side: int | None = MAX_DECODED_SIDE) -> Image.Image:
    """Decode (DICOM or Pillow), then reduce to ``max_side`` (see :func:`load_image`)."""
    head = data[:132]
    if head[128:132] == b"DICM":
        image = _load_dicom(data, max_pixels, force=False)
    elif suffix in DICOM_SUFFIXES and not head.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        image = _load_dicom(data, max_pixels, force=True)
    else:
        image = _load_pillow(io.BytesIO(data), head, max_pixels)
    return _reduce(image, max_side)


def _read_source(source) -> tuple[bytes, str]:
    """Return ``(the file's bytes, lower-case suffix)``; at most ``MAX_FILE_BYTES`` are read."""
    too_big = f"file too large (the limit is {MAX_FILE_BYTES // 2**20} MB)"
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > MAX_FILE_BYTES:
            raise ImageLoadError(too_big)
        return bytes(source), ""
    if isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block
        except FileNotFoundError:
            raise ImageLoadError("file not found") from None
        except OSError:
            raise ImageLoadError("could not open the file") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
            os.close(fd)
            raise ImageLoadError("not a regular file" if not stat.S_ISREG(info.st_mode) else too_big)
        with os.fdopen(fd, "rb") as fp:
            try:
                data = fp.read(MAX_FILE_BYTES + 1)
            except OSError:
                raise ImageLoadError("could not read the file") from None
        if len(data) > MAX_FILE_BYTES:
            raise ImageLoadError(too_big)
        return data, os.path.splitext(path)[1].lower()
    if hasattr(source, "read"):
        name = getattr(source, "name", "")
        suffix = os.path.splitext(name)[1].lower() if isinstance(name, str) else ""
        try:
            data = source.read(MAX_FILE_BYTES + 1)
        except (OSError, ValueError):
            raise ImageLoadError("could not read the file") from None
        if not isinstance(data, bytes):
            raise ImageLoadError("file must be opened in binary mode")
        if len(data) > MAX_FILE_BYTES:
            raise ImageLoadError(too_big)
        return data, suffix
    raise ImageLoadError("unsupported input: expected a path, bytes or a binary file")


def _load_pillow(fp, head: bytes, max_pixels: int) -> Image.Image:
    """Open PNG/JPEG only, check the header size, then decode and canonicalise."""
    looks_accepted = head.startswith((_PNG_MAGIC, _JPEG_MAGIC))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp, formats=ACCEPTED_FORMATS)  # lazy: header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageLoadError("image too large (decompression bomb protection)") from None
        except Exception:
            if looks_accepted:  # right magic number, unreadable header
                raise ImageLoadError(_CORRUPT) from None
            raise ImageLoadError(_unsupported_message(head)) from None
        with image:
            _check_size(*image.size, max_pixels)  # before any pixel is decoded
            if image.format == "JPEG":
                _check_jpeg_stream(fp.getvalue())
            try:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return _to_canonical(image)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageLoadError("image too large (decompression bomb protection)") from None
            except MemoryError:
                raise
            except Exception:  # OSError "image file is truncated", SyntaxError, zlib...
                raise ImageLoadError(_CORRUPT) from None


def _unsupported_message(head: bytes) -> str:
    """Name the (sniffed) format of a rejected file, and the accepted ones."""
    text = head.lstrip().lower()
    name = next((n for magic, n in _OTHER_FORMATS if head.startswith(magic)), None)
    if name is None and text.startswith((b"<?xml", b"<svg")):
        name = "SVG/XML"
    elif name is None and text.startswith((b"<!doctype", b"<html", b"<head", b"<body")):
        name = "HTML"
    return f"{_NOT_AN_IMAGE} (looks like {name})" if name else _NOT_AN_IMAGE


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, deterministically (see the :mod:`cxr.imaging` docstring)."""
    out = _to_canonical(image)
    return out if out.mode == "RGB" else out.convert("RGB")


def _to_canonical(image: Image.Image) -> Image.Image:
    """:func:`_to_rgb8`, except that greyscale results stay ``L`` (a third of the bytes to
    move; ``convert("RGB")`` of the result is the same image)."""
    mode = image.mode
    if mode in ("RGB", "L") and "transparency" not in image.info:
        return image.copy()  # detached from the source file
    if mode in ("I", "F") or mode.startswith("I;"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), "L")
    if mode == "1":
        return image.convert("L")
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))  # alpha-blend onto black
        return canvas
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _scale_to_uint8(array: np.ndarray, *, invert: bool = False) -> np.ndarray:
    """Min-max normalise ``array`` over its actual range to uint8 (0..255).

    ``invert=True`` maps the maximum to 0; it scales ``(max - x)`` rather than
    inverting afterwards, so an image and its stored-inverted twin give identical bytes.
    Integer pixels (16-bit PNGs) go through a table of their values, floats through strips of
    rows: the numbers of the float64 formula, without a float64 copy of the whole image (a
    40-megapixel 16-bit film needs ~130 MB here, not ~1 GB).
    """
    array = np.asarray(array)
    out = np.zeros(array.shape, dtype=np.uint8)
    if not array.size:
        return out
    step = max(1, (1 << 20) // max(1, int(np.prod(array.shape[1:]))))
    if array.dtype.kind in "iub":
        low, high = int(array.min()), int(array.max())
        if high <= low:
            return out
        if high - low < 1 << 20:
            domain = np.arange(low, high + 1, dtype=np.float64)
            offset = (high - domain) if invert else (domain - low)
            table = np.rint(offset * (255.0 / (high - low))).astype(np.uint8)
            for y in range(0, array.shape[0], step):
                out[y:y + step] = table[array[y:y + step].astype(np.int64) - low]
            return out

    def values(y: int) -> np.ndarray:
        return np.nan_to_num(np.asarray(array[y:y + step], dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)

    return _strips_to_uint8(values, array.shape[0], step, array.shape, invert=invert)
