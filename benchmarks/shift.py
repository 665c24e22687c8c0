"""Acquisition-shift stress test: a model folder scored on the patient-grouped hold-out under
controlled, plausible changes of how the film was acquired and processed (issue #25).

Each corruption changes the decoded film (the output of ``cxr.imaging.load_image``, 8-bit RGB,
grey replicated in the three channels) BEFORE the model's own preprocessing, and the films are
scored through ``cxr.inference.Predictor.predict_batch`` with the model's saved operating point,
so every figure is the served one. For each corruption x severity (and the clean films):
AUROC, sensitivity / specificity / accuracy at the saved threshold, how far the median
positive-class probability of the NORMAL films and of the PNEUMONIA films moves, the share of
decisions that flip against the clean film, and the share the out-of-distribution check flags
(models with ``ood.safetensors``).

    python -m benchmarks.shift --model models/efficientnet-lite0-imagenet-full
    python -m benchmarks.shift --model models/cxr-resnet-small-scratch --quick

The corruption set follows ImageNet-C (Hendrycks & Dietterich 2019) as adapted to chest films by
MedMNIST-C (Di Salvo et al. 2024: gamma, brightness, contrast, Gaussian / shot noise, blur,
pixelation, JPEG), plus the acquisition differences that matter for radiographs: positioning
(rotation, shift, field of view), collimation borders (shuttered black or unshuttered white),
burned-in markers (a known hospital shortcut: Zech et al. 2018), vendor post-processing
(edge enhancement, histogram equalisation) and anti-scatter grid lines. Intensity inversion is
NOT included: a MONOCHROME1 film is inverted by the decoder, so an inverted film never reaches
the model from a correctly labelled file.

``CORRUPTIONS`` is the one table of definitions. Each entry's ``apply(image, severity, rng)`` is a
pure function: a PIL RGB image in, a new PIL RGB image of the same size out (the input is not
changed); ``severity`` is a float in ``[0, 3]`` (0: the film unchanged; 1, 2, 3: the three levels
of the table, in between: linear interpolation of the parameter), ``rng`` a
``numpy.random.Generator`` (the only source of randomness: the same seed gives the same image).
Training can draw a severity in ``[0, s]`` and use the same functions as acquisition-style
augmentation.
"""

from __future__ import annotations

import datetime
import json
import os
import math
import shlex
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from benchmarks.common import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, RESULTS_DIR, ROOT, machine_info, write_json
from cxr.precision import PRECISIONS

DEFAULT_HOLDOUT = ROOT / "docs" / "levers" / "holdout_patients.json"
DOCS_DIR = ROOT / "docs" / "shift"
SEED = 2026
QUICK_SEVERITY = 2
QUICK_PER_CLASS = 6
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

@_corruption("gamma_up", "exposure", "gamma exponent", (1.0, 1.2, 1.45, 1.75))
def _gamma_up(image, gamma, rng):
    """Darker mid-tones (under-exposed film / another detector response curve): out = in ** gamma
    (``torchvision`` ``adjust_gamma``). MedMNIST-C pneumonia: 1.1-1.6."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_gamma(image, gamma)


@_corruption("gamma_down", "exposure", "gamma exponent", (1.0, 1 / 1.2, 1 / 1.45, 1 / 1.75))
def _gamma_down(image, gamma, rng):
    """Brighter mid-tones (over-exposed film): out = in ** gamma with gamma < 1 (``adjust_gamma``)."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_gamma(image, gamma)


@_corruption("brightness_up", "window level", "brightness factor", (1.0, 1.1, 1.2, 1.35))
def _brightness_up(image, factor, rng):
    """Window level moved down (whole film brighter, whites clipped): ``adjust_brightness``."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_brightness(image, factor)


@_corruption("brightness_down", "window level", "brightness factor", (1.0, 0.9, 0.8, 0.65))
def _brightness_down(image, factor, rng):
    """Window level moved up (whole film darker): ``adjust_brightness``."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_brightness(image, factor)


@_corruption("contrast_up", "window width", "contrast factor", (1.0, 1.2, 1.4, 1.7))
def _contrast_up(image, factor, rng):
    """Narrower window (more contrast about the film's mean grey, lungs and bone clipped): ``adjust_contrast``."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_contrast(image, factor)


@_corruption("contrast_down", "window width", "contrast factor", (1.0, 0.83, 0.7, 0.55))
def _contrast_down(image, factor, rng):
    """Wider window (washed-out, flat film): ``adjust_contrast`` with a factor below 1."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_contrast(image, factor)


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


# ====================================================================== hold-out films

def load_holdout_patients(manifest: str | Path) -> set[str]:
    """The patient ids of the committed hold-out (``experiments/holdout.py`` writes the manifest)."""
    p = Path(manifest)
    if not p.is_file():
        raise SystemExit(f"error: --holdout manifest not found: {p}")
    try:
        patients = json.loads(p.read_text())["patients"]
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {p}: not a hold-out manifest (a JSON object with a 'patients' list)") from None
    if not isinstance(patients, list) or not patients or not all(isinstance(x, str) for x in patients):
        raise SystemExit(f"error: {p}: 'patients' must be a non-empty list of patient ids")
    return set(patients)


def holdout_films(data: str | Path, patients: set[str]) -> list[tuple[Path, str]]:
    """(file, label) of every film of ``data`` (<LABEL>/<file> or <split>/<LABEL>/<file>) whose
    patient is in ``patients``; patients are read from the file names exactly as
    ``experiments/holdout.py`` carved them (``patient_id_from_filename`` or the file stem)."""
    from cxr.locate import image_files
    from cxr_train.data import patient_id_from_filename

    return [(f, f.parent.name) for f in image_files(data)
            if (patient_id_from_filename(f.name) or f.stem) in patients]


def spread(films: list, n: int) -> list:
    """``n`` items spread evenly over the sorted list (all of them when it has fewer)."""
    if len(films) <= n:
        return list(films)
    step = len(films) / n
    return [films[int(i * step)] for i in range(n)]


# ====================================================================== scoring

def conditions(quick: bool) -> list[tuple[str, int]]:
    severities = (QUICK_SEVERITY,) if quick else tuple(range(1, MAX_SEVERITY + 1))
    return [("clean", 0)] + [(name, s) for name in CORRUPTIONS for s in severities]


def _summary(y: np.ndarray, p: np.ndarray, threshold: float, clean: dict | None, ood: np.ndarray,
             pixel_change: float) -> dict:
    from cxr_train.metrics import compute_clinical_metrics

    m = compute_clinical_metrics(y, p, threshold)
    neg, pos = p[y == 0], p[y == 1]
    decided = p >= threshold
    row = {
        "auroc": m["roc_auc"] if not math.isnan(m["roc_auc"]) else None,
        "sensitivity": m["sensitivity"] if pos.size else None,
        "specificity": m["specificity"] if neg.size else None,
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"] if pos.size and neg.size else None,
        "confusion_matrix": m["confusion_matrix"],
        "brier": m["brier"],
        "normal_median_p": float(np.median(neg)) if neg.size else None,
        "normal_p90_p": float(np.percentile(neg, 90)) if neg.size else None,
        "pneumonia_median_p": float(np.median(pos)) if pos.size else None,
        "pneumonia_p10_p": float(np.percentile(pos, 10)) if pos.size else None,
        "ood_flagged": float(ood.mean()) if ood.size else None,
        "mean_abs_pixel_change": pixel_change,
    }
    if clean is not None:
        for key in ("normal_median_p", "pneumonia_median_p", "normal_p90_p", "pneumonia_p10_p"):
            row[f"delta_{key}"] = (None if row[key] is None or clean[key] is None else row[key] - clean[key])
        for key in ("auroc", "sensitivity", "specificity", "accuracy"):
            row[f"delta_{key}"] = None if row[key] is None or clean[key] is None else row[key] - clean[key]
        row["flipped"] = float(np.mean(decided != clean["_decided"]))
    else:
        row["_decided"] = decided
    return row


def run(predictor, films: list[tuple[Path, str]], *, quick: bool, seed: int, batch_size: int,
        progress: bool = True) -> tuple[list[dict], dict]:
    """Score every condition; returns (rows, per-class counts)."""
    from tqdm.auto import tqdm

    from cxr.imaging import ImageLoadError, load_image

    positive = predictor.id2label[predictor.positive_id]
    y = np.array([int(label == positive) for _, label in films])
    names = [f.name for f, _ in films]
    clean_images = []
    for f, _ in films:   # decoded once, exactly as the server decodes an upload
        clean_images.append(load_image(f))
    clean_arrays = [np.asarray(im, dtype=np.int16) for im in clean_images]

    plan = conditions(quick)
    rows, clean = [], None
    chunk = batch_size * max(1, predictor_workers())
    bar = tqdm(total=len(plan) * len(films), unit="film", disable=not progress, dynamic_ncols=True,
               desc="shift", file=sys.stderr)
    try:
        for name, severity in plan:
            bar.set_postfix_str(f"{name} s{severity}")
            probs, ood, change = [], [], []
            for start in range(0, len(films), chunk):
                batch = []
                for i in range(start, min(start + chunk, len(films))):
                    im = clean_images[i] if name == "clean" else corrupt(
                        clean_images[i], name, severity, film_rng(seed, name, severity, names[i]))
                    change.append(float(np.abs(np.asarray(im, dtype=np.int16) - clean_arrays[i]).mean()))
                    batch.append(im)
                for pred in predictor.predict_batch(batch, batch_size=batch_size):
                    if isinstance(pred, ImageLoadError):
                        raise SystemExit(f"error: a corrupted film failed to load ({name} s{severity}): {pred}")
                    probs.append(pred.positive_probability)
                    ood.append(pred.out_of_distribution)
                bar.update(len(batch))
            row = _summary(y, np.asarray(probs), predictor.threshold, clean, np.asarray(ood, dtype=bool),
                           float(np.mean(change)))
            corr = CORRUPTIONS.get(name)
            row = {"corruption": name, "severity": severity,
                   "group": corr.group if corr else "none",
                   "parameter": corr.parameter if corr else None,
                   "value": corr.parameter_at(severity) if corr else None, **row}
            if clean is None:
                clean = row
            rows.append(row)
    finally:
        bar.close()
    for r in rows:
        r.pop("_decided", None)
    counts = {positive: int(y.sum()), next(v for k, v in predictor.id2label.items() if k != predictor.positive_id):
              int((1 - y).sum())}
    return rows, counts


def predictor_workers() -> int:
    import torch

    return torch.get_num_threads()


# ====================================================================== report

def _f(x, digits=3, signed=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def render_markdown(result: dict) -> str:
    cfg, rows = result["config"], result["results"]
    has_ood = result["model"]["ood_scorer"]
    head = ["corruption", "sev.", "parameter", "AUROC", "sens.", "spec.", "acc.", "Δ median p NORMAL",
            "Δ median p PNEUMONIA", "flipped"] + (["OOD flagged"] if has_ood else [])
    lines = [f"# Acquisition-shift stress test: `{result['model']['name']}`", "",
             f"Hold-out: {result['data']['n_films']} films ({', '.join(f'{n} {k}' for k, n in result['data']['per_class'].items())}), "
             f"patients from `{cfg['holdout']}`; operating point: threshold {result['model']['threshold']:.3f} "
             f"({result['model']['threshold_source']}); precision: {result['model']['precision']}.",
             f"Clean: median p(PNEUMONIA) of the NORMAL films {_f(rows[0]['normal_median_p'])}, "
             f"of the PNEUMONIA films {_f(rows[0]['pneumonia_median_p'])}.", "",
             f"CPU: {result['machine']['cpu_model']} ({result['machine']['logical_cores']} logical cores, "
             f"native bf16 {result['machine']['cpu_supports_bf16']}), torch {result['machine']['torch']}; "
             f"{result['date']}; {result['runtime_s']:.0f} s.",
             f"Command: `{result['command']}`", ""]
    if result["model"].get("note"):
        lines += [f"**Note:** {result['model']['note']}", ""]
    lines += ["Δ: change against the clean films; flipped: share of films whose decision at the saved "
              "threshold differs from the clean film's." + (" OOD flagged: share the out-of-distribution "
                                                             "check flags (the app withholds their label)."
                                                             if has_ood else ""), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.3g}"
        cells = [r["corruption"], str(r["severity"]), value, _f(r["auroc"]), _f(r["sensitivity"]),
                 _f(r["specificity"]), _f(r["accuracy"]),
                 _f(r.get("delta_normal_median_p"), signed=True), _f(r.get("delta_pneumonia_median_p"), signed=True),
                 _f(r.get("flipped"))]
        if has_ood:
            cells.append(_f(r["ood_flagged"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Parameters (severity 1 / 2 / 3; severity 0 is the film unchanged):", ""]
    for c in CORRUPTIONS.values():
        lines.append(f"- `{c.name}` ({c.group}; {c.parameter}: "
                     f"{' / '.join(f'{v:.3g}' for v in c.levels[1:])}): {c.description}")
    return "\n".join(lines) + "\n"


CARD_HEADING = "## How the operating point moves under acquisition changes"


def render_card_section(result: dict) -> str:
    """The model card's section: specificity and sensitivity at the saved threshold per
    corruption and severity, AUROC and the NORMAL films' median move at severity 3."""
    rows = result["results"]
    by = {}
    for r in rows:
        by.setdefault(r["corruption"], {})[r["severity"]] = r
    clean = rows[0]
    m = result["machine"]
    lines = [CARD_HEADING, "",
             f"The acquisition-shift stress test (`{result['command']}`; {m['cpu_model']}, "
             f"{m['logical_cores']} logical cores, {result['model']['precision']}, {result['date']}) scores this "
             f"model on the patient-grouped hold-out ({result['data']['n_films']} films: "
             f"{', '.join(f'{n} {k}' for k, n in result['data']['per_class'].items())}) after changing each film the "
             "way another hospital, detector or export path would, at its saved threshold "
             f"{result['model']['threshold']:.3f}. The ranking (AUROC) and the operating point (sensitivity, "
             "specificity) are reported apart: a shift that keeps the ranking but moves the scores needs a new "
             "threshold, which a site calibration (`cxr-calibrate` on local films) gives.", "",
             "| corruption (parameter at severity 1 / 2 / 3) | specificity 1 / 2 / 3 | sensitivity 1 / 2 / 3 | "
             "AUROC at 3 | Δ median p NORMAL at 3 |", "|---|---:|---:|---:|---:|",
             f"| clean | {_f(clean['specificity'], 2)} | {_f(clean['sensitivity'], 2)} | {_f(clean['auroc'])} | "
             f"(median {_f(clean['normal_median_p'])}) |"]
    for name, levels in by.items():
        if name == "clean" or sorted(levels) != [1, 2, 3]:
            continue
        params = " / ".join(f"{levels[k]['value']:.3g}" for k in (1, 2, 3))
        spec = " / ".join(_f(levels[k]["specificity"], 2) for k in (1, 2, 3))
        sens = " / ".join(_f(levels[k]["sensitivity"], 2) for k in (1, 2, 3))
        lines.append(f"| {name} ({params}) | {spec} | {sens} | {_f(levels[3]['auroc'])} | "
                     f"{_f(levels[3].get('delta_normal_median_p'), signed=True)} |")
    lines += ["", "Corruptions, parameters and the analysis: `docs/shift/` in the project's repository.", ""]
    return "\n".join(lines)


def write_card_section(model_dir: str | os.PathLike, result: dict) -> Path:
    """Put :func:`render_card_section` into ``model_dir``'s card (README.md), before "## Limitations"."""
    from cxr_train.hub import with_card_section

    card = Path(model_dir) / "README.md"
    if not card.is_file():
        raise SystemExit(f"error: no model card at {card}")
    card.write_text(with_card_section(card.read_text(), render_card_section(result), before="## Limitations"))
    return card


# ====================================================================== command line

def build_parser():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model folder or Hub id (default: the shipped model)")
    ap.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="image folder <LABEL>/<file> or <split>/<LABEL>/<file>")
    ap.add_argument("--holdout", default=str(DEFAULT_HOLDOUT), help="hold-out manifest (JSON with a 'patients' list)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_PER_CLASS} films per class and severity {QUICK_SEVERITY} only (a smoke test)")
    ap.add_argument("--out", default=None,
                    help="JSON result (default: benchmarks/results/shift-<model>.json; -quick suffix with --quick)")
    ap.add_argument("--md", default=None,
                    help="Markdown table (default: docs/shift/<model>.md; none with --quick unless given)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="as the server: auto keeps the precision the operating point was fitted in")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--card", default=None, metavar="RESULT_JSON",
                    help="only write the section of RESULT_JSON (a finished run) into --model's card, score nothing")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.card:
        result = json.loads(Path(args.card).read_text())
        print(f"wrote {write_card_section(args.model, result)}")
        return result
    from benchmarks.common import quiet_libraries
    from cxr.inference import ModelLoadError, Predictor

    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be >= 1")
    data = Path(args.data).expanduser()
    if not data.is_dir():
        raise SystemExit(f"error: --data folder not found: {data}")
    patients = load_holdout_patients(args.holdout)
    films = holdout_films(data, patients)
    if not films:
        raise SystemExit(f"error: no film of {data} belongs to a patient of {args.holdout}")
    quiet_libraries()
    try:
        predictor = Predictor.from_pretrained(args.model, precision=args.precision)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}") from None
    if len(predictor.id2label) != 2:
        raise SystemExit(f"error: {predictor.name}: the stress test scores binary models, "
                         f"this one has {len(predictor.id2label)} classes")
    unknown = sorted({label for _, label in films} - set(predictor.id2label.values()))
    if unknown:
        raise SystemExit(f"error: folder labels {unknown} are not the model's labels "
                         f"{sorted(predictor.id2label.values())}")
    if args.quick:
        by_class: dict[str, list] = {}
        for f in films:
            by_class.setdefault(f[1], []).append(f)
        films = [f for label in sorted(by_class) for f in spread(by_class[label], QUICK_PER_CLASS)]
    name = predictor.name.rstrip("/").split("/")[-1]
    suffix = "-quick" if args.quick else ""
    out = Path(args.out) if args.out else RESULTS_DIR / f"shift-{name}{suffix}.json"
    md = Path(args.md) if args.md else (None if args.quick else DOCS_DIR / f"{name}.md")

    info = machine_info()
    t0 = time.perf_counter()
    rows, counts = run(predictor, films, quick=args.quick, seed=args.seed, batch_size=args.batch_size,
                       progress=not args.no_progress)
    runtime = time.perf_counter() - t0
    training = getattr(predictor.training_facts, "to_dict", lambda: {})()
    trained_on = training.get("dataset")
    note = None
    if trained_on and Path(str(trained_on)).name == data.name:
        note = (f"this model was trained on the whole of {trained_on} (its run_config), hold-out patients "
                "included: the clean figures are optimistic, only the moves under shift are informative.")
    result = {
        "benchmark": "shift",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.shift " + " ".join(shlex.quote(a) for a in
                                                            (sys.argv[1:] if argv is None else argv)),
        "runtime_s": round(runtime, 1),
        "machine": info,
        "config": {"quick": args.quick, "seed": args.seed, "batch_size": args.batch_size,
                   "holdout": _rel(args.holdout), "data": _rel(data),
                   "severities": [QUICK_SEVERITY] if args.quick else list(range(1, MAX_SEVERITY + 1))},
        "model": {"name": name, "path": _rel(args.model), "threshold": predictor.threshold,
                  "threshold_source": predictor.threshold_source, "temperature": predictor.temperature,
                  "positive_label": predictor.id2label[predictor.positive_id],
                  "precision": "bf16 autocast" if predictor.autocast_dtype is not None else "fp32",
                  "bf16": predictor.autocast_dtype is not None,
                  "ood_scorer": predictor.ood is not None,
                  "ood_threshold": None if predictor.ood is None else float(predictor.ood.threshold),
                  "trained_on": trained_on, "note": note},
        "data": {"n_films": len(films), "per_class": counts, "n_patients": len(patients)},
        "corruptions": {c.name: {"group": c.group, "parameter": c.parameter, "levels": list(c.levels),
                                 "description": c.description} for c in CORRUPTIONS.values()},
        "results": rows,
    }
    table = render_markdown(result)
    print(table)
    write_json(out, result)
    if md is not None:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(table)
        print(f"wrote {md}")
    return result


def _rel(p) -> str:
    """A path relative to the repository root (``../shared/...`` for the shared data)."""
    import os

    q = Path(p).expanduser()
    return os.path.relpath(q.resolve(), ROOT) if q.exists() else str(p)


if __name__ == "__main__":
    main()
