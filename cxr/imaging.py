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
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import queue
import select
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.filebase
import pydicom.filereader
import pydicom.filewriter
from pydicom import uid
from PIL import Image, ImageOps
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .locate import DICOM_SUFFIXES

__all__ = [
    "ACCEPTED_FORMATS", "COLOUR_GRID", "DECODE_MEMORY_MB", "DECODE_TIMEOUT_S", "MAX_ASPECT", "MAX_FILE_BYTES",
    "MAX_JPEG_SCANS", "MAX_PIXELS", "MIN_SIDE", "DecodePool", "ImageLoadError", "check_is_radiograph",
    "compute_colorfulness", "load_image",
]

MAX_PIXELS = 40_000_000  # per image, checked from the header before decoding
MIN_SIDE = 32  # smaller side below this -> error
MAX_ASPECT = 8.0  # long/short side above this -> error
COLOUR_GRID = 64  # compute_colorfulness reads at most this many pixels per side
ACCEPTED_FORMATS = ("PNG", "JPEG")  # Pillow formats; DICOM is handled by pydicom
MAX_FILE_BYTES = 128 * 2**20  # larger files are refused before they are read
MAX_JPEG_SCANS = 64  # libjpeg's progressive JPEGs have 6-10 scans; hostile ones thousands
DECODE_TIMEOUT_S = 2.0  # wall clock per file, in the worker (40 MP, the largest accepted: <= ~1 s)
DECODE_MEMORY_MB = 512  # address space per worker above its idle size (RLIMIT_AS)
DECODE_WORKERS = max(1, min(2, os.cpu_count() or 1))

_NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image"
_CORRUPT = "truncated or corrupt image"
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


def load_image(source, *, max_pixels: int = MAX_PIXELS, isolate: "bool | DecodePool" = True) -> Image.Image:
    """Decode ``source`` into a fully loaded 8-bit RGB image.

    ``source`` is a ``str`` / ``os.PathLike`` path, ``bytes``, a binary file object or a PIL
    image (already decoded by the caller: the same checks and conversions are applied - size
    limits, EXIF orientation, 16-bit scaling, alpha onto black). DICOM is recognised by the
    ``DICM`` magic at offset 128, or - for files without the 128-byte preamble - by a ``.dcm`` /
    ``.dicom`` suffix. Everything else must be PNG or JPEG by content (the file name is not
    trusted). Raises :class:`ImageLoadError`.

    ``isolate``: decode in the shared :class:`DecodePool` (default; time and memory limits), in
    a given pool, or - ``False`` - in this thread without those two limits (trusted files only).
    """
    with _quiet_pydicom():
        if isinstance(source, Image.Image):
            return _from_pil(source, max_pixels)
        data, suffix = _read_source(source)
        if isolate is False:
            image = _decode_guarded(data, suffix, max_pixels)
        else:
            pool = isolate if isinstance(isolate, DecodePool) else default_pool()
            image = pool.decode(data, suffix, max_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_pil(image: Image.Image, max_pixels: int) -> Image.Image:
    """An image the caller opened: the loader's checks and canonical conversion, on a copy."""
    try:
        _check_size(*image.size, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            rotated = ImageOps.exif_transpose(image)  # a copy; the caller's image is untouched
            out = _to_rgb8(rotated)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError("image too large (decompression bomb protection)") from None
    except Exception:
        raise ImageLoadError(_CORRUPT) from None
    out.info.clear()
    return out


def _decode_guarded(data: bytes, suffix: str, max_pixels: int) -> Image.Image:
    """In-process decode: ``L`` or ``RGB`` image, or :class:`ImageLoadError` (never another error)."""
    try:
        image = _decode(data, suffix, max_pixels)
    except ImageLoadError:
        raise
    except MemoryError:
        raise ImageLoadError("image needs too much memory to decode") from None
    except Exception:  # anything unexpected: never leak its text (may hold a path)
        raise ImageLoadError("could not read the image") from None
    image.info.clear()
    return image


def _decode(data: bytes, suffix: str, max_pixels: int) -> Image.Image:
    head = data[:132]
    if head[128:132] == b"DICM":
        return _load_dicom(data, max_pixels, force=False)
    if suffix in DICOM_SUFFIXES and not head.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        return _load_dicom(data, max_pixels, force=True)
    return _load_pillow(io.BytesIO(data), head, max_pixels)


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


# ------------------------------------------------------------------------- decode pool


class DecodePool:
    """A few long-lived worker processes that decode files under a time and memory limit.

    Each worker is a fresh Python (not a fork of the caller: no model, no threads) that
    imports this module, caps its address space at its idle size + ``memory_mb`` MB
    (``RLIMIT_AS``) and then decodes one file at a time. The caller sends the file's bytes
    and gets back a small JSON header and raw ``L``/``RGB`` pixel bytes (no pickle crosses
    the pipe). A worker that runs past ``timeout_s`` or dies (memory limit, crash) is killed
    and replaced; the caller gets an :class:`ImageLoadError`. Thread-safe: a caller waits for
    a free worker.
    """

    def __init__(self, workers: int = DECODE_WORKERS, *, timeout_s: float = DECODE_TIMEOUT_S,
                 memory_mb: int = DECODE_MEMORY_MB, start_timeout_s: float = 60.0):
        self.timeout_s, self.memory_mb, self.start_timeout_s = timeout_s, memory_mb, start_timeout_s
        self.pid = os.getpid()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all = [_Worker(memory_mb) for _ in range(max(1, workers))]
        for w in self._all:
            self._idle.put(w)

    def start(self) -> "DecodePool":
        """Start every worker now (otherwise each starts on first use)."""
        for w in self._all:
            w.spawn()
        return self

    def close(self) -> None:
        for w in self._all:
            w.kill()

    def decode(self, data: bytes, suffix: str, max_pixels: int) -> Image.Image:
        worker = self._idle.get()
        try:
            return worker.decode(data, suffix, max_pixels, self.timeout_s, self.start_timeout_s)
        finally:
            self._idle.put(worker)


class _WorkerGone(Exception):
    pass


class _Worker:
    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen | None = None
        self.ready = False

    def spawn(self) -> None:
        if self.proc is not None:
            return
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"from cxr.imaging import _worker_main; _worker_main({int(self.memory_mb)})"
        # the worker imports this same cxr package (installed, or a source checkout)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=path)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     close_fds=True, bufsize=0)
        self.ready = False
        try:  # 1 MB pipes (Linux): a 1.5-megapixel film crosses in two reads, not 24
            import fcntl

            for f in (self.proc.stdin, self.proc.stdout):
                fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass

    def kill(self) -> None:
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass

    def _read(self, n: int, deadline: float) -> bytearray:
        buf, view, got = bytearray(n), None, 0
        view = memoryview(buf)
        fd = self.proc.stdout.fileno()
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.readv(fd, [view[got:]]) if hasattr(os, "readv") else None
            if chunk is None:
                data = os.read(fd, n - got)
                view[got:got + len(data)] = data
                chunk = len(data)
            if chunk == 0:
                raise _WorkerGone
            got += chunk
        return buf

    def decode(self, data: bytes, suffix: str, max_pixels: int, timeout_s: float,
               start_timeout_s: float) -> Image.Image:
        for attempt in (1, 2):  # a worker that died while idle is replaced once
            self.spawn()
            try:
                if not self.ready:
                    self._read(1, time.monotonic() + start_timeout_s)
                    self.ready = True
                request = json.dumps({"suffix": suffix[:16], "max_pixels": int(max_pixels)}).encode()
                self.proc.stdin.write(struct.pack(">IQ", len(request), len(data)) + request)
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (_WorkerGone, OSError, ValueError, TimeoutError):
                self.kill()
                if attempt == 2:
                    raise ImageLoadError("the image decoder is not available") from None
                continue
            break
        deadline = time.monotonic() + timeout_s
        try:
            size = struct.unpack(">I", self._read(4, deadline))[0]
            if size > 4096:
                raise _WorkerGone
            reply = json.loads(bytes(self._read(size, deadline)))
            if not reply.get("ok"):
                if reply.get("restart"):
                    self.kill()
                    self.spawn()
                raise ImageLoadError(_safe_text(reply.get("error")))
            mode, (width, height) = reply["mode"], reply["size"]
            bands = {"L": 1, "RGB": 3}[mode]
            if not (0 < width and 0 < height and width * height <= max_pixels):
                raise _WorkerGone
            pixels = self._read(width * height * bands, deadline)
        except TimeoutError:
            self.kill()
            self.spawn()  # its replacement starts now, in the background
            raise ImageLoadError(f"image takes too long to decode (the limit is {timeout_s:g} s)") from None
        except ImageLoadError:
            raise
        except Exception:  # noqa: BLE001 - died (memory limit, crash) or broke the protocol
            self.kill()
            self.spawn()
            raise ImageLoadError(f"image needs too much memory or time to decode "
                                 f"(the limit is {self.memory_mb} MB)") from None
        return Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)


def _safe_text(text) -> str:
    text = str(text or "could not read the image")[:300]
    return "".join(c if c.isprintable() else "?" for c in text)


_POOL: DecodePool | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> DecodePool:
    """The process's shared :class:`DecodePool` (a new one after a fork)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = DecodePool().start()  # workers import in the background meanwhile
        return _POOL


@atexit.register
def _close_default_pool() -> None:
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _worker_main(memory_mb: int) -> None:
    """Decode loop of a :class:`DecodePool` worker (stdin: requests, stdout: replies)."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.disable(logging.CRITICAL)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)  # nothing else may write into the protocol stream
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    base = _vm_size()
    if base:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = base + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def read(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = inp.read(min(n - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def reply(obj: dict) -> None:
        text = json.dumps(obj).encode()
        out.write(struct.pack(">I", len(text)) + text)

    out.write(b"R")
    while True:
        try:
            size, length = struct.unpack(">IQ", read(12))
            request = json.loads(read(size))
            data = read(length)
        except EOFError:
            return
        try:
            with _quiet_pydicom():
                image = _decode(data, request.get("suffix", ""), int(request["max_pixels"]))
            del data
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
        except ImageLoadError as e:
            reply({"ok": False, "error": str(e)})
            continue
        except MemoryError:
            reply({"ok": False, "restart": True,
                   "error": f"image needs too much memory to decode (the limit is {memory_mb} MB)"})
            return
        except Exception:  # noqa: BLE001 - never leak the text
            reply({"ok": False, "error": "could not read the image"})
            continue
        text = json.dumps({"ok": True, "mode": image.mode, "size": list(image.size)}).encode()
        width, height = image.size
        if width * height * len(image.mode) <= 1 << 23:  # one write: header and pixels
            out.write(struct.pack(">I", len(text)) + text + image.tobytes())
        else:  # in strips: no full-size copy of the pixels
            out.write(struct.pack(">I", len(text)) + text)
            step = max(1, (1 << 22) // (width * len(image.mode)))
            for y in range(0, height, step):
                out.write(image.crop((0, y, width, min(height, y + step))).tobytes())
        del image


# ------------------------------------------------------------------------------ helpers


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
    """Convert any Pillow mode to 8-bit RGB, deterministically (see module docstring)."""
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
    """
    data = np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(data.min()), float(data.max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    offset = (high - data) if invert else (data - low)
    return np.rint(offset * (255.0 / (high - low))).astype(np.uint8)


# -------------------------------------------------------------------------------- DICOM


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

    low, high = np.inf, -np.inf
    for y in range(0, pixels.shape[0], step):
        v = values(y)
        low, high = min(low, float(v.min())), max(high, float(v.max()))
    out = np.zeros(pixels.shape, dtype=np.uint8)
    if high <= low:
        return out
    for y in range(0, pixels.shape[0], step):
        v = values(y)
        offset = (high - v) if invert else (v - low)
        out[y:y + step] = np.rint(offset * (255.0 / (high - low))).astype(np.uint8)
    return out


# ------------------------------------------------------------ structural pre-decode checks


def _check_jpeg_stream(data: bytes, expect: tuple[int, int] | None = None, samples: int | None = None) -> None:
    """Walk a JPEG / JPEG-LS stream's markers without decoding: refuse more than
    ``MAX_JPEG_SCANS`` scans, and (``expect`` = (rows, columns)) a frame whose SOF header
    declares another size than the DICOM header."""
    scans, frame, pos, n = 0, None, 2, len(data)
    if not data.startswith(b"\xff\xd8"):
        raise ImageLoadError("not a JPEG stream" if expect else _CORRUPT)
    while pos < n:
        if data[pos] != 0xFF:  # entropy-coded data after a scan: jump to the next marker
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        if pos + 1 >= n:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x00 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stuffed, RSTn, TEM
            pos += 2
            continue
        if marker == 0xD9:  # EOI
            break
        if pos + 4 > n:
            break
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS and frame is None and pos + 10 <= n:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            frame = (height, width, data[pos + 9])
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageLoadError(f"JPEG with too many scans (more than {MAX_JPEG_SCANS}; "
                                     "progressive JPEGs normally have at most 10)")
        pos += 2 + length
    if expect is not None:
        if frame is None:
            raise ImageLoadError("no JPEG frame header")
        if (frame[0], frame[1]) != expect or (samples is not None and frame[2] != samples):
            raise ImageLoadError(f"frame is {frame[1]}x{frame[0]}x{frame[2]}, "
                                 f"header says {expect[1]}x{expect[0]}x{samples}")


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # + JPEG-LS SOF55


def _check_j2k_stream(data: bytes, expect: tuple[int, int], samples: int) -> None:
    """The JPEG 2000 SIZ segment (codestream or inside a JP2 file) must declare the DICOM size."""
    pos = data.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
    if pos < 0 or pos + 42 > len(data):
        raise ImageLoadError("no JPEG 2000 size header")
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[pos + 8:pos + 24])
    components = struct.unpack(">H", data[pos + 40:pos + 42])[0]
    width, height = xsiz - xo, ysiz - yo
    if (height, width) != expect or components != samples:
        raise ImageLoadError(f"frame is {width}x{height}x{components}, "
                             f"header says {expect[1]}x{expect[0]}x{samples}")


_JPEG_SYNTAXES = {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
                  uid.JPEGLSLossless, uid.JPEGLSNearLossless}
_J2K_SYNTAXES = {uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K,
                 "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"}


def _check_encoded_frame(dataset, rows: int, columns: int) -> None:
    """Encapsulated pixel data: check the frame's own header before a decoder sees it."""
    syntax = dataset.file_meta.TransferSyntaxUID
    try:
        encapsulated = syntax.is_transfer_syntax and syntax.is_encapsulated
    except Exception:  # noqa: BLE001 - not a transfer syntax pydicom knows
        encapsulated = None
    if not encapsulated:
        if encapsulated is None or not syntax.is_transfer_syntax:
            raise ImageLoadError(_pixel_error_message(dataset))
        return
    try:
        frame = pydicom.encaps.get_frame(dataset.PixelData, 0, number_of_frames=1)
    except Exception:
        raise ImageLoadError("truncated or corrupt DICOM pixel data") from None
    samples = int(dataset.get("SamplesPerPixel") or 1)
    try:
        if syntax in _JPEG_SYNTAXES:
            _check_jpeg_stream(frame, (rows, columns), samples)
        elif syntax in _J2K_SYNTAXES:
            _check_j2k_stream(frame, (rows, columns), samples)
    except ImageLoadError as e:
        if str(e).startswith("JPEG with too many scans"):
            raise
        raise ImageLoadError(f"compressed DICOM frame does not match its header ({syntax.name}): {e}") from None
    if syntax not in _JPEG_SYNTAXES | _J2K_SYNTAXES | {uid.RLELossless}:  # RLE output size comes from Rows x Columns
        raise ImageLoadError(_pixel_error_message(dataset))


def _inflate_if_deflated(data: bytes, max_pixels: int) -> bytes:
    """Deflated Explicit VR Little Endian: inflate the dataset in a capped stream and return an
    equivalent Explicit VR Little Endian file; other files are returned unchanged. pydicom
    would inflate the whole dataset, whatever its size, before any header could be checked."""
    start = 132 if data[128:132] == b"DICM" else 0
    meta_end, syntax = _scan_file_meta(data, start)
    if syntax != uid.DeflatedExplicitVRLittleEndian:
        return data
    limit = 2 * max_pixels + (8 << 20)  # 16-bit pixels + 8 MB of other elements
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    chunks, total = [], 0
    try:
        for i in range(meta_end, len(data), 1 << 16):
            chunk = inflater.decompress(data[i:i + (1 << 16)], limit + 1 - total)
            total += len(chunk)
            chunks.append(chunk)
            if total > limit or inflater.unconsumed_tail:
                raise ImageLoadError(f"deflated DICOM inflates to more than {limit // 2**20} MB")
    except zlib.error:
        raise ImageLoadError("corrupt deflated DICOM file") from None
    meta = pydicom.filereader._read_file_meta_info(io.BytesIO(data[start:meta_end]))
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    out = pydicom.filebase.DicomBytesIO()
    out.write(data[:start])
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=False)
    out.write(b"".join(chunks))
    return out.getvalue()


def _scan_file_meta(data: bytes, pos: int) -> tuple[int, str | None]:
    """(end offset of the group 0002 file meta elements, their TransferSyntaxUID)."""
    syntax = None
    while pos + 8 <= len(data):
        group, element = struct.unpack("<HH", data[pos:pos + 4])
        if group != 2:
            break
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            if pos + 12 > len(data):
                break
            length, header = struct.unpack("<I", data[pos + 8:pos + 12])[0], 12
        else:
            length, header = struct.unpack("<H", data[pos + 6:pos + 8])[0], 8
        if element == 0x0010:
            syntax = data[pos + header:pos + header + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos += header + length
    return pos, syntax


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
