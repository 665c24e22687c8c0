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
inside this module only, and the pixel count is checked from the header before decoding.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pydicom
from pydicom import uid
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut, apply_voi_lut

__all__ = [
    "ACCEPTED_FORMATS", "COLOUR_GRID", "MAX_ASPECT", "MAX_PIXELS", "MIN_SIDE", "ImageLoadError",
    "check_is_radiograph", "compute_colorfulness", "load_image",
]

MAX_PIXELS = 40_000_000  # per image, checked from the header before decoding
MIN_SIDE = 32  # smaller side below this -> error
MAX_ASPECT = 8.0  # long/short side above this -> error
COLOUR_GRID = 64  # compute_colorfulness reads at most this many pixels per side
ACCEPTED_FORMATS = ("PNG", "JPEG")  # Pillow formats; DICOM is handled by pydicom

_NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image"
_CORRUPT = "truncated or corrupt image"
_DICOM_SUFFIXES = (".dcm", ".dicom")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Formats people upload by mistake, named in the error message (sniffed, never decoded).
_OTHER_FORMATS = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"RIFF", "WebP"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_OOD_WARNING = ("This looks like a colour photo, not a chest X-ray; "
                "the prediction is not meaningful.")


class ImageLoadError(ValueError):
    """Short, user-safe message: no traceback text, no file path, no patient data."""


# --------------------------------------------------------------------------- public API


def load_image(source, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``source`` into a fully loaded 8-bit RGB image.

    ``source`` is a ``str`` / ``os.PathLike`` path, ``bytes`` or a binary file object.
    DICOM is recognised by the ``DICM`` magic at offset 128, or - for files without the
    128-byte preamble - by a ``.dcm`` / ``.dicom`` suffix. Everything else must be PNG or
    JPEG by content (the file name is not trusted). Raises :class:`ImageLoadError`.
    """
    fp, suffix, owned = _open_source(source)
    try:
        head = fp.read(132)
        fp.seek(0)
        if not isinstance(head, bytes):
            raise ImageLoadError("file must be opened in binary mode")
        if head[128:132] == b"DICM":
            return _load_dicom(fp, max_pixels, force=False)
        if suffix in _DICOM_SUFFIXES and not head.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
            return _load_dicom(fp, max_pixels, force=True)
        return _load_pillow(fp, head, max_pixels)
    except ImageLoadError:
        raise
    except Exception:  # anything unexpected: never leak its text (may hold a path)
        raise ImageLoadError("could not read the image") from None
    finally:
        if owned:
            fp.close()


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


# ------------------------------------------------------------------------------ helpers


def _open_source(source):
    """Return ``(binary seekable file, lower-case suffix, whether we own the file)``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), "", True
    if isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(source))
        try:
            return open(path, "rb"), os.path.splitext(path)[1].lower(), True
        except FileNotFoundError:
            raise ImageLoadError("file not found") from None
        except OSError:
            raise ImageLoadError("could not open the file") from None
    if hasattr(source, "read"):
        name = getattr(source, "name", "")
        suffix = os.path.splitext(name)[1].lower() if isinstance(name, str) else ""
        try:
            if source.seekable():
                if source.tell() == 0:
                    return source, suffix, False
        except (OSError, ValueError):
            pass
        try:  # non-seekable (or mid-stream) object: read what is left into memory
            data = source.read()
        except (OSError, ValueError):
            raise ImageLoadError("could not read the file") from None
        if not isinstance(data, bytes):
            raise ImageLoadError("file must be opened in binary mode")
        return io.BytesIO(data), suffix, True
    raise ImageLoadError("unsupported input: expected a path, bytes or a binary file")


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
            try:
                image.load()
                ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb8(image)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageLoadError("image too large (decompression bomb protection)") from None
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
    """Convert any Pillow mode to 8-bit RGB, deterministically (see module docstring)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()  # detached from the source file
    if mode in ("I", "F") or mode.startswith("I;"):
        grey = _scale_to_uint8(np.asarray(image))
        return Image.fromarray(grey, "L").convert("RGB")
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
    """
    data = np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(data.min()), float(data.max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    offset = (high - data) if invert else (data - low)
    return np.rint(offset * (255.0 / (high - low))).astype(np.uint8)


# -------------------------------------------------------------------------------- DICOM


def _load_dicom(fp, max_pixels: int, *, force: bool) -> Image.Image:
    """Header-only checks first, then decode; every pydicom error becomes generic."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings may quote element values (PHI)
        try:
            header = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
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
            fp.seek(0)
            dataset = pydicom.dcmread(fp, force=force)
        except Exception:
            raise ImageLoadError("unreadable or truncated DICOM file") from None
        if "PixelData" not in dataset:
            raise ImageLoadError("DICOM file has no pixel data")
        _ensure_transfer_syntax(dataset)
        try:
            pixels = dataset.pixel_array
        except Exception:
            raise ImageLoadError(_pixel_error_message(dataset)) from None
        if pixels.ndim != 2 or pixels.shape != (rows, columns):
            raise ImageLoadError("unexpected DICOM pixel data layout")
        try:
            values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
        except Exception:
            raise ImageLoadError("invalid DICOM rescale or window (VOI LUT) attributes") from None
    grey = _scale_to_uint8(values, invert=photometric == "MONOCHROME1")
    return Image.fromarray(grey, "L").convert("RGB")


RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")
_MODALITY_NAMES = {"CT": "a CT scan", "MR": "an MR scan", "US": "an ultrasound image", "NM": "a nuclear medicine image",
                   "PT": "a PET scan", "MG": "a mammogram", "XA": "an angiogram", "RF": "a fluoroscopy image",
                   "OT": "an 'other' modality image", "SC": "a secondary capture", "IO": "an intra-oral X-ray",
                   "PX": "a panoramic dental X-ray", "OP": "an eye photograph", "XC": "a photograph", "SM": "a microscopy slide"}


def _check_modality(header) -> None:
    """Refuse DICOMs whose Modality says they are not a radiograph (CR, DX, RG); a file
    without Modality is accepted. Only known codes are named (never free text from the file)."""
    modality = str(header.get("Modality", "") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        what = _MODALITY_NAMES.get(modality, "not a radiograph")
        raise ImageLoadError(f"this DICOM is {what}" + (f" (Modality {modality})" if modality in _MODALITY_NAMES else "")
                             + "; only chest radiographs (Modality CR, DX or RG) are accepted")


def _ensure_transfer_syntax(dataset) -> None:
    """A preamble-less file may lack file meta; record the encoding it was read with."""
    if "TransferSyntaxUID" in dataset.file_meta:
        return
    implicit, little = dataset.original_encoding
    syntax = (uid.ImplicitVRLittleEndian if implicit else
              uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    dataset.file_meta.TransferSyntaxUID = syntax


def _pixel_error_message(dataset) -> str:
    """Why pixel decoding failed, naming the transfer syntax only if it is a standard one
    (its name comes from pydicom's UID dictionary, never from the file)."""
    try:
        syntax = dataset.file_meta.TransferSyntaxUID
        known = syntax.is_transfer_syntax and syntax.name != str(syntax)
        compressed = known and syntax.is_compressed
    except Exception:
        return "truncated or corrupt DICOM pixel data"
    if not known:
        return "unsupported DICOM transfer syntax"
    if compressed:
        return f"could not decode compressed DICOM pixel data ({syntax.name})"
    return "truncated or corrupt DICOM pixel data"
