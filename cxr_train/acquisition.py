"""Acquisition changes of a chest film, one table (``CORRUPTIONS``) for the stress test that
measures them (``benchmarks/shift.py``) and the training augmentation that teaches a model to
ignore them (``--acquisition_augment``, :class:`AcquisitionAugment`).

Each entry's ``apply(image, severity, rng)`` is a pure function: a PIL RGB image in, a new PIL
RGB image of the same size out (the input is not changed); ``severity`` is a float in ``[0, 3]``
(0: the film unchanged; 1, 2, 3: the three levels of the table; in between, linear
interpolation of the parameter), ``rng`` a ``numpy.random.Generator`` (the only source of
randomness). The set follows ImageNet-C as MedMNIST-C adapted it to chest films, plus what
differs between radiography sites (positioning, field of view, collimation, burned-in markers,
vendor post-processing, anti-scatter grid lines); ``docs/shift/README.md`` has the analysis.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_SEVERITY = 3


# ====================================================================== corruptions

@dataclass(frozen=True)
class Corruption:
    """One acquisition change. ``levels[k]`` is the parameter at severity ``k`` (``levels[0]``: no change)."""

    name: str
    group: str
    parameter: str            # what the numbers in ``levels`` mean
    levels: tuple             # 4 values: severity 0 (identity), 1, 2, 3
    _apply: Callable          # (image, parameter, rng) -> image
    description: str

    def parameter_at(self, severity: float) -> float:
        return float(np.interp(severity, range(len(self.levels)), self.levels))

    def apply(self, image: Image.Image, severity: float, rng: np.random.Generator | None = None) -> Image.Image:
        """A corrupted copy of ``image`` (PIL RGB) at ``severity`` in [0, 3]."""
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise TypeError(f"{self.name}: expects a PIL RGB image, got "
                            f"{getattr(image, 'mode', type(image).__name__)}")
        severity = float(severity)
        if not 0.0 <= severity <= MAX_SEVERITY:
            raise ValueError(f"{self.name}: severity must be in [0, {MAX_SEVERITY}], got {severity}")
        if severity == 0.0:
            return image.copy()
        out = self._apply(image, self.parameter_at(severity), rng if rng is not None else np.random.default_rng(0))
        return out if out.mode == "RGB" else out.convert("RGB")

    __call__ = apply


CORRUPTIONS: dict[str, Corruption] = {}


def _corruption(name: str, group: str, parameter: str, levels: tuple):
    def register(fn: Callable) -> Callable:
        CORRUPTIONS[name] = Corruption(name, group, parameter, tuple(levels), fn,
                                       " ".join((fn.__doc__ or "").split()))
        return fn
    return register


def _to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _to_image(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), "RGB")


def _grey_field(shape: tuple, values: np.ndarray) -> np.ndarray:
    """A (H, W) field broadcast to the three channels: noise on a grey film stays grey."""
    return values.reshape(shape[0], shape[1], 1)


# ---------------------------------------------------------------- exposure and window

def _torchvision_adjust(op: str) -> Callable:
    """(image, value, rng) -> ``torchvision.transforms.v2.functional.<op>(image, value)``."""
    def apply(image, value, rng):
        from torchvision.transforms.v2 import functional as F

        return getattr(F, op)(image, value)
    return apply


for _name, _group, _parameter, _levels, _op, _doc in (
    ("gamma_up", "exposure", "gamma exponent", (1.0, 1.2, 1.45, 1.75), "adjust_gamma",
     "Darker mid-tones (under-exposed film / another detector response curve): out = in ** gamma "
     "(``torchvision`` ``adjust_gamma``). MedMNIST-C pneumonia: 1.1-1.6."),
    ("gamma_down", "exposure", "gamma exponent", (1.0, 1 / 1.2, 1 / 1.45, 1 / 1.75), "adjust_gamma",
     "Brighter mid-tones (over-exposed film): out = in ** gamma with gamma < 1 (``adjust_gamma``)."),
    ("brightness_up", "window level", "brightness factor", (1.0, 1.1, 1.2, 1.35), "adjust_brightness",
     "Window level moved down (whole film brighter, whites clipped): ``adjust_brightness``."),
    ("brightness_down", "window level", "brightness factor", (1.0, 0.9, 0.8, 0.65), "adjust_brightness",
     "Window level moved up (whole film darker): ``adjust_brightness``."),
    ("contrast_up", "window width", "contrast factor", (1.0, 1.2, 1.4, 1.7), "adjust_contrast",
     "Narrower window (more contrast about the film's mean grey, lungs and bone clipped): ``adjust_contrast``."),
    ("contrast_down", "window width", "contrast factor", (1.0, 0.83, 0.7, 0.55), "adjust_contrast",
     "Wider window (washed-out, flat film): ``adjust_contrast`` with a factor below 1."),
):
    _apply = _torchvision_adjust(_op)
    _apply.__doc__ = _doc
    _corruption(_name, _group, _parameter, _levels)(_apply)


# ---------------------------------------------------------------- detector noise

@_corruption("gaussian_noise", "noise", "noise SD (fraction of full scale)", (0.0, 0.01, 0.02, 0.04))
def _gaussian_noise(image, sigma, rng):
    """Electronic (read-out) noise: additive zero-mean Gaussian, the same field in the three channels
    (a grey film stays grey). The SD is per pixel of the 224-px film, where the native film's noise is
    already averaged over ~7x7 detector pixels, so 0.04 (10 grey levels) is heavy. MedMNIST-C
    pneumonia uses 0.04-0.08 at 28 px."""
    x = _to_float(image)
    return _to_image(x + _grey_field(x.shape, rng.normal(0.0, sigma, x.shape[:2]).astype(np.float32)))


_LOG_RANGE = 3.0   # displayed grey 0..1 taken as log-attenuation 0..3 (a 20:1 dose range)


@_corruption("poisson_noise", "noise", "noise SD at mid grey (fraction of full scale)", (0.0, 0.01, 0.02, 0.04))
def _poisson_noise(image, sigma_mid, rng):
    """Quantum (dose) noise: the film read as log-attenuation (grey 0..1 -> 0..3), photon counts
    ``I0 * exp(-mu)`` drawn from a Poisson law, back to grey. Lower dose, more noise; noisier in
    the bright (attenuating) regions, as on a real film. ``I0`` is set so that the SD at mid grey
    is the parameter."""
    x = _to_float(image)
    grey = x.mean(axis=2)
    i0 = 1.0 / (sigma_mid ** 2 * _LOG_RANGE ** 2 * math.exp(-_LOG_RANGE / 2))
    expected = i0 * np.exp(-_LOG_RANGE * grey)
    counts = np.maximum(rng.poisson(expected), 0.5)
    noisy = -np.log(counts / i0) / _LOG_RANGE
    return _to_image(x + _grey_field(x.shape, (noisy - grey).astype(np.float32)))


# ---------------------------------------------------------------- resolution and compression

@_corruption("gaussian_blur", "resolution", "blur SD (pixels at 224 px)", (0.0, 0.7, 1.2, 2.0))
def _gaussian_blur(image, sigma, rng):
    """Detector / focal-spot unsharpness or patient motion: ``torchvision`` ``gaussian_blur``."""
    from torchvision.transforms.v2 import functional as F

    k = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(image, [k, k], [sigma, sigma])


@_corruption("downsample", "resolution", "scale of the intermediate image", (1.0, 0.6, 0.4, 0.3))
def _downsample(image, scale, rng):
    """Resolution loss (a thumbnail or a low-resolution archive copy): down-sampled with antialiasing
    then up-sampled back (bilinear), ``torchvision`` ``resize``. MedMNIST-C's "pixelate"."""
    from torchvision.transforms.v2 import functional as F

    w, h = image.size
    small = F.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return F.resize(small, [h, w], antialias=True)


@_corruption("jpeg", "compression", "JPEG quality", (100.0, 50.0, 25.0, 10.0))
def _jpeg(image, quality, rng):
    """Lossy re-compression (PACS export, web upload): ``torchvision`` ``jpeg``. MedMNIST-C: 50-7."""
    from torchvision.transforms.v2 import functional as F

    return F.jpeg(image, int(round(quality)))


# ---------------------------------------------------------------- positioning

def _affine(image, *, angle=0.0, translate=(0, 0), scale=1.0, fill=0):
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    return F.affine(image, angle=angle, translate=list(translate), scale=scale, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR, fill=fill)


@_corruption("rotation", "positioning", "degrees (sign drawn)", (0.0, 3.0, 6.0, 10.0))
def _rotation(image, degrees, rng):
    """Patient rotated in the detector plane; black corners (``torchvision`` ``affine``). Training's
    standard augmentation already rotates by up to 10 degrees."""
    return _affine(image, angle=float(degrees * rng.choice((-1.0, 1.0))))


@_corruption("translation", "positioning", "shift (fraction of the side, direction drawn)", (0.0, 0.03, 0.06, 0.10))
def _translation(image, fraction, rng):
    """Patient off-centre; the uncovered edge is black. The direction is drawn uniformly."""
    theta = rng.uniform(0.0, 2 * math.pi)
    w, h = image.size
    return _affine(image, translate=(int(round(fraction * w * math.cos(theta))),
                                      int(round(fraction * h * math.sin(theta)))))


@_corruption("zoom_in", "field of view", "magnification", (1.0, 1.08, 1.16, 1.3))
def _zoom_in(image, scale, rng):
    """Tighter field of view / closer crop: the film magnified about its centre, the edges cropped."""
    return _affine(image, scale=scale)


@_corruption("zoom_out", "field of view", "magnification", (1.0, 0.93, 0.86, 0.75))
def _zoom_out(image, scale, rng):
    """Wider field of view (a small child on a large detector, a letterboxed export): the film shrunk
    about its centre inside a black frame."""
    return _affine(image, scale=scale)


# ---------------------------------------------------------------- collimation

def _border(image, width, rng, value):
    arr = np.array(image)
    h, w = arr.shape[:2]
    top, bottom, left, right = (int(round(width * s * f)) for s, f in
                                zip((h, h, w, w), rng.uniform(0.5, 1.0, 4)))
    arr[:top] = value
    arr[h - bottom:] = value
    arr[:, :left] = value
    arr[:, w - right:] = value
    return Image.fromarray(arr, "RGB")


@_corruption("border_black", "collimation", "largest border width (fraction of the side)", (0.0, 0.04, 0.08, 0.14))
def _border_black(image, width, rng):
    """Electronically shuttered collimation: black bands on the four sides, each side's width drawn
    between half and all of the parameter."""
    return _border(image, width, rng, 0)


@_corruption("border_white", "collimation", "largest border width (fraction of the side)", (0.0, 0.04, 0.08, 0.14))
def _border_white(image, width, rng):
    """Unshuttered collimation: the unexposed edge shows white (bands as in ``border_black``)."""
    return _border(image, width, rng, 255)


# ---------------------------------------------------------------- annotations

@_corruption("markers", "annotation", "number of burned-in marks", (0.0, 1.0, 2.0, 3.0))
def _markers(image, count, rng):
    """Burned-in laterality letters and text labels in white, as hospitals and vendors place them
    (a shortcut CNNs are known to learn: Zech et al. 2018). Marks are drawn near the corners; a
    fractional count draws the last mark smaller."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    texts = ("R", "L", "AP", "PORTABLE", "SUPINE")
    corners = rng.permutation(4)
    n = int(math.ceil(count))
    for i in range(n):
        size_factor = 1.0 if i < int(count) or count == int(count) else count - int(count)
        size = max(6, int(round(h * 0.07 * max(size_factor, 0.3))))
        font = ImageFont.load_default(size=size)
        text = texts[int(rng.integers(len(texts)))]
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        tw, th = x1 - x0, y1 - y0
        margin = int(rng.integers(2, max(3, w // 20)))
        cx = margin if corners[i % 4] in (0, 2) else w - tw - margin
        cy = margin if corners[i % 4] in (0, 1) else h - th - margin
        draw.text((cx - x0, cy - y0), text, fill=(255, 255, 255), font=font)
    return out


# ---------------------------------------------------------------- vendor post-processing

@_corruption("sharpen", "processing", "sharpness factor", (1.0, 2.0, 3.5, 6.0))
def _sharpen(image, factor, rng):
    """Edge enhancement (unsharp-mask style vendor processing): ``torchvision`` ``adjust_sharpness``."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_sharpness(image, factor)


@_corruption("equalize", "processing", "blend weight of the equalised film", (0.0, 0.33, 0.66, 1.0))
def _equalize(image, alpha, rng):
    """Another vendor look-up table: the film blended with its histogram-equalised version
    (``torchvision`` ``equalize``)."""
    from torchvision.transforms.v2 import functional as F

    return Image.blend(image, F.equalize(image), float(alpha))


@_corruption("grid_lines", "processing", "stripe amplitude (fraction of full scale)", (0.0, 0.01, 0.02, 0.04))
def _grid_lines(image, amplitude, rng):
    """Anti-scatter grid lines / moire: vertical or horizontal sinusoidal stripes (period 3-6 px,
    drawn, as is the orientation and phase)."""
    x = _to_float(image)
    h, w = x.shape[:2]
    period = rng.uniform(3.0, 6.0)
    phase = rng.uniform(0.0, 2 * math.pi)
    vertical = bool(rng.integers(2))
    coord = np.arange(w if vertical else h, dtype=np.float32)
    wave = amplitude * np.sin(2 * math.pi * coord / period + phase)
    field = np.broadcast_to(wave[None, :] if vertical else wave[:, None], (h, w))
    return _to_image(x + _grey_field(x.shape, np.ascontiguousarray(field, dtype=np.float32)))


def corrupt(image: Image.Image, name: str, severity: float, rng: np.random.Generator | None = None) -> Image.Image:
    """``CORRUPTIONS[name].apply(image, severity, rng)`` with a clear error for an unknown name."""
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name].apply(image, severity, rng)


def film_rng(seed: int, corruption: str, severity: float, film: str) -> np.random.Generator:
    """The generator for one film under one condition: fixed by (seed, corruption, severity, file
    name), so a film gets the same corrupted pixels in a full run, a --quick run, or any order."""
    key = [seed, zlib.crc32(corruption.encode()), int(round(severity * 1000)), zlib.crc32(film.encode())]
    return np.random.default_rng(key)


# ====================================================================== training augmentation

# What moved the shipped default's operating point on the hold-out and is plausible at another
# site (docs/shift/README.md, "Acquisition-style augmentation chosen from the stress test");
# gamma, brightness, contrast, rotation, shift and markers are left out (the model withstands
# them, and the standard augmentation already has rotation, shift and brightness/contrast).
ACQUISITION_AUGMENT = ("gaussian_noise", "poisson_noise", "gaussian_blur", "downsample", "jpeg", "sharpen",
                       "grid_lines", "equalize", "border_black", "border_white", "zoom_in")
TRAIN_MAX_SEVERITY = 2.0      # severity 3 stays unseen: the stress test judges a trained model there


class AcquisitionAugment:
    """With probability ``p`` per film, one of ``names`` at a severity drawn uniformly in
    ``[0, max_severity]``; applied to uint8 (N, 3, H, W) batches on the CPU before the device
    preprocessing (a 224-px film costs ~1 ms). Randomness from ``numpy``'s generator seeded by
    ``seed`` and the batch counter, so a run is reproducible."""

    def __init__(self, p: float, names: tuple = ACQUISITION_AUGMENT, max_severity: float = TRAIN_MAX_SEVERITY,
                 seed: int = 0):
        unknown = [n for n in names if n not in CORRUPTIONS]
        if unknown or not 0.0 < p <= 1.0 or not 0.0 < max_severity <= MAX_SEVERITY:
            raise ValueError(f"acquisition augmentation: p in (0, 1], severity in (0, {MAX_SEVERITY}], "
                             f"known corruptions (unknown: {unknown})")
        self.p, self.names, self.max_severity = float(p), tuple(names), float(max_severity)
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"AcquisitionAugment(p={self.p}, severity <= {self.max_severity}, {', '.join(self.names)})"

    def __call__(self, x):
        """A (N, 3, H, W) uint8 tensor -> the same shape and dtype, some films corrupted."""
        import torch

        chosen = np.flatnonzero(self.rng.random(x.shape[0]) < self.p)
        if chosen.size == 0:
            return x
        out = x.clone()
        for i in chosen:
            film = Image.fromarray(x[i].permute(1, 2, 0).contiguous().numpy(), "RGB")
            name = self.names[int(self.rng.integers(len(self.names)))]
            severity = float(self.rng.uniform(0.0, self.max_severity))
            changed = CORRUPTIONS[name].apply(film, severity, self.rng)
            out[i] = torch.from_numpy(np.array(changed)).permute(2, 0, 1)
        return out
