"""Structural pre-decode checks: DICOM and bitstream headers, read without decoding any pixel.

* JPEG / JPEG-LS marker walk (:func:`_check_jpeg_stream`): at most ``MAX_JPEG_SCANS`` scans and,
  inside DICOM, a frame header (SOF) that declares the DICOM size; JPEG 2000 SIZ segment
  (:func:`_check_j2k_stream`).
* Encapsulated DICOM pixel data (:func:`_check_encoded_frame`): the first frame's own header is
  checked against Rows x Columns before a decoder sees it; only known transfer syntaxes pass.
* Deflated DICOM (:func:`_inflate_if_deflated`): the file meta is scanned by hand
  (:func:`_scan_file_meta`) and the dataset inflated in a capped stream.
* Modality (:func:`_check_modality`): only radiographs (``RADIOGRAPH_MODALITIES``) are accepted.
"""

from __future__ import annotations

import io
import struct
import zlib

import pydicom
import pydicom.encaps
import pydicom.filebase
import pydicom.filereader
import pydicom.filewriter
from pydicom import uid

from .limits import _CORRUPT, ImageLoadError

MAX_JPEG_SCANS = 64  # libjpeg's progressive JPEGs have 6-10 scans; hostile ones thousands


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
