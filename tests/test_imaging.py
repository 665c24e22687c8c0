"""Tests for cxr.imaging: reliability cases 1-15 (docs/reliability.md, "Bad input" + "DICOM").

Every test image is built in memory or in tmp_path; nothing is read from shared data.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import traceback
import time
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from cxr.imaging import (
    MAX_PIXELS,
    DecodePool,
    ImageLoadError,
    _to_rgb8,
    check_is_radiograph,
    compute_colorfulness,
    load_image,
)

from tests.helpers import PHI, ROOT, make_dicom  # noqa: F401 (shared with test_app)

# ----------------------------------------------------------------------------- builders


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """Horizontal 8-bit grey ramp 0..255."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return Image.fromarray(np.tile(row, (height, 1)), "L")


def png_with_header(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose IHDR declares width x height (8-bit grey)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def jpeg_with_header(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 segment is patched to declare width x height."""
    data = bytearray(encode(gradient(64, 64), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def ramp12(rows: int = 64, cols: int = 80) -> np.ndarray:
    """12-bit ramp 0..4095 along the columns."""
    return np.tile(np.linspace(0, 4095, cols).astype(np.uint16), (rows, 1))


def assert_clean(error: ImageLoadError, *forbidden: str) -> None:
    """User-safe error: short, unchained, with none of the forbidden strings."""
    text = f"{error} {error!r}"
    assert len(str(error)) < 160
    assert "Traceback" not in text
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__
    chain = "".join(traceback.format_exception(error))
    assert "During handling" not in chain and "direct cause" not in chain
    for word in forbidden:
        assert word not in text and word not in chain


# ------------------------------------------------------------- 1. non-image bytes


@pytest.mark.parametrize("payload", [b"hello, world" * 20, b"", bytes(range(256)) * 4])
def test_non_image_bytes_named_png(tmp_path, payload):
    path = tmp_path / "upload.png"
    path.write_bytes(payload)
    with pytest.raises(ImageLoadError, match="not a PNG, JPEG or DICOM image") as info:
        load_image(path)
    assert_clean(info.value, str(tmp_path), "upload.png")


def test_missing_file_does_not_leak_path(tmp_path):
    path = tmp_path / "Doe_Jane_PHI-12345.png"
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_image(str(path))
    assert_clean(info.value, str(tmp_path), "Doe_Jane", "PHI-12345")


def test_wrong_input_type():
    with pytest.raises(ImageLoadError, match="unsupported input"):
        load_image(12345)


# ------------------------------------------------------ 2. huge declared size (bomb)


@pytest.mark.parametrize("data", [png_with_header(30_000, 30_000),
                                  jpeg_with_header(30_000, 30_000),
                                  png_with_header(8_000, 8_000),  # > 40 M, < Pillow's limit
                                  jpeg_with_header(8_000, 8_000)])
def test_huge_header_rejected_before_decoding(data, monkeypatch):
    assert len(data) < 2_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(data)
    assert decoded == []                                   # refused from the header, nothing decoded


def test_max_pixels_argument_is_honoured():
    data = encode(gradient(200, 100))
    assert load_image(data).size == (200, 100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(data, max_pixels=10_000)
    assert MAX_PIXELS == 40_000_000


# ------------------------------------------------------------- 3. truncated files


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
def test_truncated_image(fmt, fraction):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "RGB")
    data = encode(noisy, fmt)
    with pytest.raises(ImageLoadError, match="truncated or corrupt image") as info:
        load_image(data[: int(len(data) * fraction)])
    assert_clean(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ------------------------------------------------------- 4. other formats renamed


def _other_format_bytes(kind: str) -> bytes:
    image = gradient(64, 64)
    if kind in ("TIFF", "GIF", "BMP", "PDF"):
        return encode(image.convert("RGB"), kind)
    return {
        "SVG": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        "HTML": b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
        "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n",
        "PSD": b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 1, 64, 64, 8, 1),
    }[kind]


@pytest.mark.parametrize("kind", ["TIFF", "GIF", "BMP", "PDF", "SVG", "HTML", "EPS", "PSD"])
def test_other_formats_renamed_png_are_rejected(tmp_path, kind):
    path = tmp_path / "xray.png"
    path.write_bytes(_other_format_bytes(kind))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert "not a PNG, JPEG or DICOM image" in message
    assert kind.split("/")[0] in message  # the sniffed format is named
    assert_clean(info.value, str(tmp_path))


# ----------------------------------------------------------- 5. EXIF orientation


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (96, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 32))  # white block at the top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.mode == "RGB" and out.size == (64, 96)  # width/height swapped
    assert out.getpixel((out.width - 8, 8))[0] > 200  # block moved to the top-right
    assert out.getpixel((8, 8))[0] < 50
    plain = load_image(encode(image, "JPEG", quality=95))
    assert plain.size == (96, 64)


# ---------------------------------------------------------- 6. 16-bit greyscale PNG


@pytest.mark.parametrize("peak", [4095, 65535])
def test_16bit_png_is_scaled_not_clipped(peak):
    ramp = np.tile(np.linspace(0, peak, 256).astype(np.uint16), (64, 1))
    data = encode(Image.fromarray(ramp))
    out = np.asarray(load_image(data))
    assert out.shape == (64, 256, 3) and out.dtype == np.uint8
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert len(np.unique(out)) > 200 and (out == 255).mean() < 0.05
    assert np.array_equal(out[..., 0], out[..., 2])


def test_12bit_and_16bit_versions_match():
    ramp = np.tile(np.linspace(0, 4095, 256).astype(np.uint16), (64, 1))
    a = np.asarray(load_image(encode(Image.fromarray(ramp))))
    b = np.asarray(load_image(encode(Image.fromarray(ramp * 16))))
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- 7. Pillow modes


def _mode_cases():
    grey = Image.new("L", (40, 40), 100)
    la = Image.new("LA", (40, 40), (200, 255))
    la.paste((200, 0), (0, 0, 20, 40))  # left half fully transparent
    rgba = Image.new("RGBA", (40, 40), (10, 20, 30, 255))
    rgba.paste((250, 250, 250, 0), (0, 0, 20, 40))
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 90, 90, 90] + [0] * 762)
    bw = Image.new("1", (40, 40), 1)
    cmyk = Image.new("CMYK", (40, 40), (0, 0, 0, 0))
    return [  # (name, encoded bytes, expected pixel at left, expected pixel at right)
        ("L", encode(grey), (100,) * 3, (100,) * 3),
        ("LA", encode(la), (0, 0, 0), (200,) * 3),
        ("RGBA", encode(rgba), (0, 0, 0), (10, 20, 30)),
        ("P", encode(pal), (90,) * 3, (90,) * 3),
        ("1", encode(bw), (255,) * 3, (255,) * 3),
        ("CMYK", encode(cmyk, "JPEG", quality=100), (255,) * 3, (255,) * 3),
    ]


@pytest.mark.parametrize("name,data,left,right", _mode_cases(), ids=lambda v: str(v)[:8])
def test_modes_become_deterministic_rgb(name, data, left, right):
    out = load_image(data)
    assert out.mode == "RGB" and out.size == (40, 40)
    tolerance = 2 if name == "CMYK" else 0
    assert np.allclose(out.getpixel((5, 20)), left, atol=tolerance)
    assert np.allclose(out.getpixel((35, 20)), right, atol=tolerance)
    assert load_image(data).tobytes() == out.tobytes()  # deterministic


@pytest.mark.parametrize("mode,dtype", [("I;16", np.uint16), ("I", np.int32), ("F", np.float32)])
def test_high_bit_depth_modes(mode, dtype):
    values = np.tile(np.linspace(-1000, 3000, 64), (40, 1)).astype(dtype)
    if dtype == np.uint16:
        values = np.tile(np.linspace(0, 3000, 64), (40, 1)).astype(dtype)
    image = Image.fromarray(values)
    if mode == "I;16":
        assert image.mode == "I;16"
    out = _to_rgb8(image)
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr[..., 1].min() == 0 and arr[..., 1].max() == 255
    assert np.array_equal(arr[..., 0], arr[..., 1])
    constant = _to_rgb8(Image.fromarray(np.full((40, 40), 7, dtype)))
    assert np.asarray(constant).max() == 0  # constant image -> black, no division by 0


def test_binary_file_object_and_path_agree(tmp_path):
    data = encode(gradient(), "JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    a = load_image(tmp_path / "a.jpg")
    with open(tmp_path / "a.jpg", "rb") as handle:
        b = load_image(handle)
    assert a.tobytes() == b.tobytes() == load_image(data).tobytes()
    assert a.mode == "RGB" and a.size == (64, 48)


# -------------------------------------------------------------- 8. degenerate sizes


@pytest.mark.parametrize("size,message", [
    ((1, 1), "too small"), ((10_000, 10), "too small"), ((31, 100), "too small"),
    ((400, 40), "aspect ratio"), ((40, 400), "aspect ratio"),
])
def test_degenerate_sizes(size, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(encode(Image.new("L", size, 128)))


def test_limits_are_inclusive():
    assert load_image(encode(Image.new("L", (32, 256), 128))).size == (32, 256)


# ------------------------------------------------------- 9. out-of-distribution


def test_colour_photo_is_flagged():
    rng = np.random.default_rng(1)
    photo = np.zeros((120, 160, 3), np.uint8)
    photo[:60] = (120, 180, 240)  # sky
    photo[60:] = (40, 160, 60)  # grass
    photo = np.clip(photo + rng.integers(-20, 20, photo.shape), 0, 255).astype(np.uint8)
    image = load_image(encode(Image.fromarray(photo), "JPEG"))
    assert compute_colorfulness(image) > 0.2
    warning = check_is_radiograph(image)
    assert warning and "colour photo" in warning and "not meaningful" in warning


def test_greyscale_radiograph_passes():
    xray = load_image(encode(gradient(256, 256), "JPEG"))
    assert compute_colorfulness(xray) < 0.01
    assert check_is_radiograph(xray) is None
    tinted = Image.fromarray(np.dstack([np.asarray(gradient()) + 0] * 2
                                       + [np.asarray(gradient()) // 2 + 40]).astype(np.uint8))
    assert 0.0 < compute_colorfulness(tinted) <= 1.0
    assert compute_colorfulness(gradient()) == 0.0
    assert check_is_radiograph(tinted, max_colorfulness=1.0) is None


# ---------------------------------------------------------------------- 10. MONOCHROME1


def test_monochrome1_matches_monochrome2_twin():
    stored = ramp12()
    stored[10:20, 10:20] = 3000
    m2 = load_image(make_dicom(stored, photometric="MONOCHROME2"))
    m1 = load_image(make_dicom(4095 - stored, photometric="MONOCHROME1"))
    assert m1.mode == m2.mode == "RGB" and m1.size == (80, 64)
    assert m1.tobytes() == m2.tobytes()
    arr = np.asarray(m2)[..., 0]
    assert arr[:, 0].max() == 0 and arr[:, -1].min() == 255  # 0 is black in MONOCHROME2


# --------------------------------------------------- 11. modality LUT before windowing


def test_rescale_applied_before_window():
    stored = ramp12(32, 101)  # stored 0..4095 -> HU -1000..+1000 (slope 0.5, int -1000)
    data = make_dicom(stored, RescaleSlope=0.5, RescaleIntercept=-1000,
                      WindowCenter=0, WindowWidth=400, RescaleType="HU")
    out = np.asarray(load_image(data))[..., 0]
    hu = stored[0] * 0.5 - 1000
    assert (out[0][hu < -250] == 0).all() and (out[0][hu > 250] == 255).all()
    middle = int(np.argmin(np.abs(hu)))  # HU ~ 0: window centre -> mid-grey
    assert 110 < out[0, middle] < 145
    # Windowing the raw stored values instead would make almost everything white.
    assert (out == 255).mean() < 0.5


def test_dicom_without_window_uses_full_range():
    out = np.asarray(load_image(make_dicom(ramp12())))[..., 0]
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 60


# -------------------------------------------------------- 12. compressed syntaxes


def test_rle_compressed_dicom_is_decoded():
    stored = ramp12()
    plain = load_image(make_dicom(stored))
    ds = pydicom.dcmread(io.BytesIO(make_dicom(stored)))
    ds.compress(RLELossless, stored)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert load_image(buf.getvalue()).tobytes() == plain.tobytes()


def _with_syntax(uid: str, pixel_data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_dicom(ramp12())))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_undecodable_compressed_dicom_names_transfer_syntax():
    fragment = b"\xff\x4f\xff\x51" + b"\x00" * 62  # J2K start marker, then garbage
    data = _with_syntax(JPEG2000, pydicom.encaps.encapsulate([fragment]))
    with pytest.raises(ImageLoadError, match="JPEG 2000 Image Compression") as info:
        load_image(data)
    assert_clean(info.value, *PHI)


def test_unknown_transfer_syntax_is_not_echoed():
    private = "1.2.826.0.1.3680043.99999.1.2.3"
    data = _with_syntax(private, pydicom.encaps.encapsulate([b"\x00" * 64]))
    with pytest.raises(ImageLoadError) as info:
        load_image(data)
    assert "transfer syntax" in str(info.value) or "unreadable" in str(info.value)
    assert_clean(info.value, private, *PHI)


# ------------------------------------------- 13. preamble, pixel data, RGB, frames


def test_preambleless_dicom_needs_dicom_suffix(tmp_path):
    data = make_dicom(ramp12(), preamble=False)
    assert data[128:132] != b"DICM"
    path = tmp_path / "scan.dcm"
    path.write_bytes(data)
    out = load_image(path)
    assert out.size == (80, 64) and out.tobytes() == load_image(make_dicom(ramp12())).tobytes()
    for source in (data, tmp_path / "scan.png"):
        if not isinstance(source, bytes):
            source.write_bytes(data)
        with pytest.raises(ImageLoadError, match="not a PNG, JPEG or DICOM image"):
            load_image(source)


def test_dicom_suffix_with_garbage(tmp_path):
    path = tmp_path / "scan.dicom"
    path.write_bytes(b"this is not dicom at all" * 10)
    with pytest.raises(ImageLoadError, match="DICOM") as info:
        load_image(path)
    assert_clean(info.value, str(tmp_path))


@pytest.mark.parametrize("case,message", [
    ("missing_pixels", "no pixel data"),
    ("truncated_pixels", "truncated"),
    ("truncated_file", "truncated"),
    ("rgb", "colour"),
    ("palette", "colour"),
    ("multi_frame", "multi-frame"),
    ("no_rows", "missing image attributes"),
])
def test_bad_dicom_gives_clear_phi_free_error(tmp_path, case, message, caplog, recwarn):
    caplog.set_level(logging.DEBUG)
    pixels = ramp12()
    if case == "missing_pixels":
        data = make_dicom(None, Rows=64, Columns=80)
    elif case == "truncated_pixels":  # element length consistent, but too few bytes
        ds = pydicom.dcmread(io.BytesIO(make_dicom(pixels)))
        ds.PixelData = ds.PixelData[:1000]
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
    elif case == "truncated_file":  # file cut in the middle of PixelData
        data = make_dicom(pixels)[:-3000]
    elif case == "rgb":
        data = make_dicom(pixels, SamplesPerPixel=3, photometric="RGB")
    elif case == "palette":
        data = make_dicom(pixels, photometric="PALETTE COLOR")
    elif case == "multi_frame":
        data = make_dicom(np.stack([pixels, pixels]), NumberOfFrames=2)
    else:
        data = make_dicom(None)
    path = tmp_path / "Doe_Jane_PHI-12345.dcm"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(ImageLoadError, match=message) as info:
            load_image(source)
        assert_clean(info.value, *PHI, "Doe_Jane", str(tmp_path))
    logged = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert not any(word in logged for word in PHI)


# ---------------------------------------------------- 14. header-only size check


def test_dicom_size_checked_before_pixels_are_read(monkeypatch):
    huge = make_dicom(None, Rows=30_000, Columns=30_000, PixelData=b"\x00" * 64)
    calls = []
    real = pydicom.dcmread

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stop_before_pixels", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(huge, isolate=False)  # in this process, where the spy can see the reads
    assert calls == [True]  # only the header-only read happened
    frames = make_dicom(None, Rows=2000, Columns=2000, NumberOfFrames=20,
                        PixelData=b"\x00" * 64)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(frames, max_pixels=50_000_000)
    with pytest.raises(ImageLoadError, match="too small"):
        load_image(make_dicom(np.zeros((1, 1), np.uint16)))


# ------------------------------------------------------------------------ 15. PHI


def test_successful_dicom_load_exposes_no_metadata():
    out = load_image(make_dicom(ramp12()))
    assert out.info == {} or not any(word in str(out.info) for word in PHI)
    assert isinstance(out, Image.Image) and out.mode == "RGB"


def test_colorfulness_of_array_equals_image():
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    assert compute_colorfulness(np.asarray(photo)) == compute_colorfulness(photo) > 0.2
    assert check_is_radiograph(np.asarray(photo)) is not None
    grey = np.repeat(rng.integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    assert compute_colorfulness(grey) == 0.0
    with pytest.raises(ValueError, match="uint8"):
        compute_colorfulness(np.zeros((8, 8), dtype=np.uint8))


# ------------------------------------ decode budget (hostile files; issue 12, items 1, 2, 7)


def _encapsulated_dicom(syntax: str, frame: bytes, rows: int, columns: int) -> bytes:
    """8-bit MONOCHROME2 DICOM whose pixel data is one encapsulated ``frame``."""
    ds = pydicom.dcmread(io.BytesIO(make_dicom(ramp12())))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pydicom.encaps.encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _j2k_codestream(image: Image.Image, declare: tuple[int, int] | None = None) -> bytes:
    """A real JPEG 2000 codestream; ``declare`` = (width, height) patched into its SIZ segment."""
    data = bytearray(encode(image, "JPEG2000", no_jp2=True))
    if declare:
        siz = data.index(b"\xff\x4f\xff\x51")
        data[siz + 8:siz + 16] = struct.pack(">II", *declare)   # Xsiz, Ysiz
        data[siz + 24:siz + 32] = struct.pack(">II", *declare)  # one tile of that size
    return bytes(data)


def test_legit_compressed_dicom_frames_are_decoded():
    image = gradient(96, 64)
    for syntax, frame in ((JPEG2000Lossless, _j2k_codestream(image)),
                          (JPEGBaseline8Bit, encode(image, "JPEG", quality=95))):
        out = load_image(_encapsulated_dicom(syntax, frame, 64, 96))
        assert out.size == (96, 64) and out.mode == "RGB"


def test_dicom_frame_larger_than_its_header_is_refused_before_decoding():
    """Header 512x512, embedded JPEG 2000 frame 13000x13000 (a 7 KB file): the old loader
    trusted Rows/Columns, silenced Pillow's bomb warning and decoded ~169 M pixels."""
    frame = _j2k_codestream(gradient(512, 512), declare=(13_000, 13_000))
    data = _encapsulated_dicom(JPEG2000, frame, 512, 512)
    assert len(data) < 20_000
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="13000x13000") as info:
        load_image(data)
    assert time.perf_counter() - start < 1.0
    assert "JPEG 2000" in str(info.value)
    assert_clean(info.value, *PHI)
    jpeg = jpeg_with_header(13_000, 13_000)  # the same lie in a baseline JPEG frame
    with pytest.raises(ImageLoadError, match="13000x13000"):
        load_image(_encapsulated_dicom(JPEGBaseline8Bit, jpeg, 512, 512))


def _deflated_dicom(zero_bytes: int) -> bytes:
    """Deflated Explicit VR Little Endian DICOM (64x80 12-bit ramp) with a private OB element
    of ``zero_bytes`` zeros after the pixel data, compressed as a stream (never held in full)."""
    plain = make_dicom(ramp12())
    ds = pydicom.dcmread(io.BytesIO(plain))
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    body = plain[meta_end:]
    creator = b"ACME"
    body += struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", len(creator)) + creator
    body += struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, zero_bytes)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [plain[:132], meta.getvalue(), deflate.compress(body)]
    zeros = bytes(1 << 20)
    for _ in range(zero_bytes >> 20):
        parts.append(deflate.compress(zeros))
    parts.append(deflate.compress(bytes(zero_bytes & ((1 << 20) - 1))))
    parts.append(deflate.flush())
    return b"".join(parts)


def test_deflated_dicom_inflates_in_a_capped_stream():
    """A ~100 KB deflated DICOM holding 120 MB of zeros: the old loader let pydicom inflate
    all of it (972 KB -> +3.8 GB in the red-team run), then accepted the file."""
    bomb = _deflated_dicom(120 << 20)
    assert len(bomb) < 300_000
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="deflated DICOM inflates to more than") as info:
        load_image(bomb)
    assert time.perf_counter() - start < 4.0  # inflating up to the 88 MB cap: ~0.7 s here
    assert_clean(info.value, *PHI)
    # the same syntax within the cap decodes like its uncompressed twin
    small = _deflated_dicom(1000)
    assert load_image(small).tobytes() == load_image(make_dicom(ramp12())).tobytes()


def _progressive_jpeg(size: int, scans: int) -> bytes:
    """A flat progressive JPEG whose smallest AC scan is repeated ``scans`` times."""
    data = encode(Image.new("L", (size, size), 128), "JPEG", progressive=True, quality=90)
    marks = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"] + [len(data) - 2]
    sizes = {i: marks[i + 1] - marks[i] for i in range(1, len(marks) - 1)}
    smallest = min(sizes, key=sizes.get)
    scan = data[marks[smallest]:marks[smallest + 1]]
    return data[:-2] + scan * scans + data[-2:]


def test_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding():
    """2000x2000, one AC scan repeated 3,000 times: 60 KB, ~10 s in Pillow with the old loader."""
    data = _progressive_jpeg(2000, 3000)
    assert len(data) < 200_000
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="too many scans"):
        load_image(data)
    assert time.perf_counter() - start < 1.0
    assert load_image(_progressive_jpeg(64, 0)).size == (64, 64)  # an ordinary progressive JPEG


def test_decode_time_limit_kills_the_worker_and_the_pool_recovers():
    """Within every structural limit (61 scans, 36 M pixels) but seconds of CPU: the worker is
    killed at the pool's time limit and replaced; the caller's thread is free again."""
    slow = _progressive_jpeg(6000, 55)
    pool = DecodePool(1, timeout_s=0.5).start()
    try:
        assert load_image(encode(gradient()), isolate=pool).size == (64, 48)  # warm
        start = time.perf_counter()
        with pytest.raises(ImageLoadError, match="too long to decode"):
            load_image(slow, isolate=pool)
        assert time.perf_counter() - start < 2.0
        assert load_image(encode(gradient()), isolate=pool).size == (64, 48)
    finally:
        pool.close()


def test_decode_memory_limit_is_enforced_in_the_worker():
    """A 4000x4000 RGB PNG (16 M pixels, 64 MB once decoded) in a pool capped at 48 MB."""
    big = encode(Image.new("RGB", (4000, 4000), (90, 90, 90)), "PNG")
    pool = DecodePool(1, memory_mb=48).start()
    try:
        with pytest.raises(ImageLoadError, match="too much memory"):
            load_image(big, isolate=pool)
        assert load_image(encode(gradient()), isolate=pool).size == (64, 48)  # replaced
    finally:
        pool.close()
    assert load_image(big, max_side=None).size == (4000, 4000)  # within the default budget
    assert load_image(big).size == (2000, 2000)                  # reduced in the worker by default


def test_worker_and_in_process_decodes_are_identical(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (200, 10, 10, 128))
    cases = [encode(gradient()), encode(Image.fromarray(ramp12() * 16)), encode(rgba),
             make_dicom(ramp12(), photometric="MONOCHROME1", RescaleSlope=2, WindowCenter=3000,
                        WindowWidth=2000)]
    for data in cases:
        assert load_image(data).tobytes() == load_image(data, isolate=False).tobytes()


def test_dicom_lut_table_equals_per_pixel_formula():
    rng = np.random.default_rng(5)
    stored = rng.integers(0, 4096, (70, 90)).astype(np.uint16)
    data = make_dicom(stored, RescaleSlope=0.5, RescaleIntercept=-1024, WindowCenter=-200, WindowWidth=900)
    ds = pydicom.dcmread(io.BytesIO(data))
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
    expected = np.rint((values - values.min()) * (255.0 / (values.max() - values.min()))).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(data))[..., 0], expected)


def test_pydicom_log_never_quotes_file_values(caplog, recwarn):
    """pydicom logged 'Unknown encoding 'Doe^Jane'' and 'Invalid value for VR UI' from the file."""
    data = make_dicom(ramp12(), SpecificCharacterSet="Doe^Jane", StudyInstanceUID="1.2.3.Doe^Jane")
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    recwarn.clear()  # building the file warned; loading it must not
    for isolate in (False, True):
        assert load_image(data, isolate=isolate).size == (80, 64)
    assert "Doe^Jane" not in caplog.text
    assert not [w for w in recwarn if "Doe^Jane" in str(w.message)]


def test_fifo_and_other_non_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    start = time.perf_counter()
    for source in (fifo, tmp_path):
        with pytest.raises(ImageLoadError) as info:
            load_image(source)
        assert_clean(info.value, str(tmp_path))
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------- the largest accepted films (reliability 30)

def _png16(side: int) -> bytes:
    """A 16-bit greyscale PNG of side x side (a smooth 12-bit ramp: small file, large film)."""
    ramp = (np.add.outer(np.arange(side), np.arange(side)) % 4096).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")          # uint16 -> mode I;16


@pytest.mark.parametrize("side", [4288, 6320])   # a common detector size, and the 40 MP limit
def test_sixteen_bit_png_up_to_the_pixel_limit_decodes_in_the_default_budget(side):
    """Within the worker's default memory budget (what refused them before). The wall-clock limit
    is widened here only so that a loaded CI machine cannot fail it (~0.5 s on a quiet core)."""
    pool = DecodePool(1, timeout_s=20).start()
    try:
        out = load_image(_png16(side), isolate=pool)
    finally:
        pool.close()
    factor = -(-side // 2048)
    assert out.mode == "RGB" and out.size == (-(-side // factor),) * 2
    values = np.asarray(out)[..., 0]
    assert values.min() == 0 and values.max() > 200        # scaled over its range, not clipped


def test_large_films_are_reduced_by_a_whole_factor_where_they_are_decoded():
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (3000, 5000), dtype=np.uint8), "L")
    data = encode(big, "PNG")
    full = load_image(data, max_side=None)
    assert full.size == (5000, 3000)
    reduced = load_image(data)                                # the default: 5000 -> ceil(5000/2048) = 3
    assert reduced.size == (1667, 1000)
    assert reduced.tobytes() == full.reduce(3).tobytes()
    assert load_image(data, isolate=False).tobytes() == reduced.tobytes()   # worker == in-process
    assert load_image(big).tobytes() == reduced.tobytes()                   # a PIL image: the same rule
    small = encode(gradient())
    assert load_image(small).tobytes() == load_image(small, max_side=None).tobytes()


# ---------------------------------------------------------- negative and rotated films (issue 24)

def test_negative_and_rotated_films_are_flagged_upright_ones_are_not():
    from cxr.imaging import compute_orientation

    examples = sorted((ROOT / "app" / "examples").glob("*.jpeg"))
    assert len(examples) == 6
    for path in examples:
        grey = np.asarray(load_image(path).convert("L"))
        assert check_is_radiograph(np.asarray(load_image(path))) is None
        for turned in (255 - grey, np.rot90(grey, 1), np.rot90(grey, 3)):
            image = Image.fromarray(np.ascontiguousarray(turned)).convert("RGB")
            assert compute_orientation(image) < -0.03
            assert "inverted" in check_is_radiograph(image)
            assert "inverted" in check_is_radiograph(np.asarray(image))      # the batch path's arrays
