"""Site calibration: refit a model's temperature and decision threshold on a labelled sample of
a new site, and write a complete model folder that serves with the new operating point.

    cxr-calibrate --model models/efficientnet-lite0-imagenet-full --data site_sample/ \\
        --out models/efficientnet-lite0-site-a --min_sensitivity 0.95

``--data`` is ``<LABEL>/<image>`` (PNG / JPEG / DICOM, read by :func:`cxr.imaging.load_image`;
the labels are the model's). Every film is scored through :class:`cxr.inference.Predictor`, so
decoding, preprocessing, precision and the out-of-distribution guard are the serving ones;
films the guard flags get no answer at serving and are left out of the fit (and counted).

**How the threshold is chosen.** The temperature is refitted by NLL on the sample
(:func:`cxr_train.metrics.compute_temperature`, through
:func:`cxr_train.training.fit_operating_point`). The threshold follows the project's
``sensitivity_floor`` policy (the most specific threshold keeping sensitivity on the scores at or
above a floor) with a small-sample margin: the floor must hold for the site's *new* films, not
just for the sample. A threshold placed at the k-th lowest positive score of a sample of n
positive films misses k - 1 of them; for new positive films of the same site its true
sensitivity is distributed Beta(n - k + 1, k) (the coverage of an order statistic;
distribution-free, films exchangeable), whose ``1 - confidence`` quantile is exactly the
one-sided Clopper-Pearson lower bound of (n - k + 1) / n. So the command allows the largest
number of missed positive films whose one-sided CP lower bound on sensitivity (``--confidence``,
default 95 %) is still >= ``--min_sensitivity``: with that confidence the site's sensitivity is
at least the floor. The most specific threshold at that sample sensitivity is then fitted by the
existing ``sensitivity_floor`` code. Finally the threshold is moved to the middle (on the logit
scale) of the gap between that positive score and the next lower score of the sample: every
threshold in the gap gives the same figures on the sample, and the middle leaves the same margin
to both sides for new films (a max-margin tie-break, never changing a decision on the sample).

The price: with 59-92 positive films (floor 0.95, confidence 0.95) no miss is allowed, so the
threshold rests on the single lowest positive score, and one hard positive film in the sample
can cost many false alarms (warned; docs/site_calibration.md has the measured trade-off by sample
size; ``--confidence 0.5`` is the median guarantee, close to the plain policy).

The plain policy (the most specific threshold whose *sample* sensitivity is >= the floor) puts
the threshold at the k-th lowest positive score with (n - k + 1) / n >= floor; its expected
sensitivity on new films is only (n - k + 1) / (n + 1), and about half the time it is lower: the
floor is broken on new films nearly as often as not. The margin costs specificity only where
positive and negative scores overlap.

**When the floor cannot be shown.** With n positive films even 100 % sample sensitivity has a
one-sided lower bound of (1 - confidence) ** (1 / n): below 0.95 for n < 59 at 95 % confidence.
Then the threshold is the lowest positive score of the sample (sensitivity 100 % on it; its
expected sensitivity on new films is still n / (n + 1)), and the command says loudly that the
floor is not established and how many positive films would be needed. This is a warning, not an
error: the folder is still the best operating point the sample supports, and the record
(``site_calibration.json``, the card) says the floor was not shown. Fewer than
:data:`MIN_PER_CLASS` films of a class gets a small-sample warning, a model that does not
separate the classes on the sample an error.

**What it writes.** ``--out``: every file of ``--model`` (weights byte-identical; training state
``checkpoint-*`` and ``runs`` left out), files 0644, with ``config.json``'s operating point
replaced (its provenance: policy, films per class, the sample's name, the date, the previous
operating point), ``site_calibration.json`` (the figures, before and after, with exact 95 %
intervals, the warnings, per-film scores without file names) and a "Site calibration" section in
the card. It is written into a temporary folder beside ``--out``, loaded back with the Predictor,
then renamed: bad input writes nothing.

Figures on the calibration sample are optimistic (the threshold was chosen on them): score other
films of the site to know how it does there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxr.operating_point import CONFIG_KEY, OperatingPoint
from cxr.precision import PRECISIONS

logger = logging.getLogger(__name__)

MIN_PER_CLASS = 20               # fewer films of a class than this: the small-sample warning
DEFAULT_MIN_SENSITIVITY = 0.95
DEFAULT_CONFIDENCE = 0.95
INTERVAL_LEVEL = 0.95            # the exact (Clopper-Pearson) intervals printed and recorded
FAR_BELOW = 0.05                 # the interval's lower end this far below the floor: warned
CALIBRATION_FILE = "site_calibration.json"
SKIPPED = ("checkpoint-*", "runs")  # training state, not part of the model
MAX_LISTED = 5


class CalibrationError(ValueError):
    """Bad input for a site calibration; the message is for the user, nothing was written."""


# ------------------------------------------------------------------ exact binomial intervals

def compute_exact_interval(successes: int, n: int, level: float = INTERVAL_LEVEL) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of a proportion (scipy.stats.binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="exact")
    return (float(ci.low), float(ci.high))


def compute_lower_bound(successes: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) lower confidence bound of a proportion."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n), alternative="greater").proportion_ci(
        confidence_level=confidence, method="exact")
    return float(ci.low)


def compute_misses_allowed(n_positive: int, min_sensitivity: float, confidence: float) -> int | None:
    """The most positive films a threshold may miss on the sample while the one-sided exact lower
    bound of its sensitivity stays >= ``min_sensitivity``; None when not even 0 misses do."""
    allowed = None
    for misses in range(n_positive):
        if compute_lower_bound(n_positive - misses, n_positive, confidence) < min_sensitivity:
            break
        allowed = misses
    return allowed


def compute_positives_needed(min_sensitivity: float, confidence: float) -> int:
    """The fewest positive films for which 100 % sample sensitivity shows the floor at ``confidence``."""
    return int(math.ceil(math.log(1 - confidence) / math.log(min_sensitivity)))


# ------------------------------------------------------------------ the sample

@dataclass
class SiteSample:
    """A labelled ``<LABEL>/<image>`` sample of a site."""
    folder: Path
    name: str
    files: list[Path]
    labels: np.ndarray              # class ids, as the model numbers them
    id2label: dict

    def counts(self, mask=None) -> dict:
        labels = self.labels if mask is None else self.labels[mask]
        return {name: int((labels == i).sum()) for i, name in sorted(self.id2label.items())}


def load_site_sample(folder: str | os.PathLike, id2label: dict, name: str | None = None) -> SiteSample:
    """The films of ``folder`` (``<LABEL>/<image>``, labels among the model's). Hidden files are
    skipped; every other file in a label folder is a film (a DICOM may have no suffix) and must
    load. Raises CalibrationError for anything else."""
    from cxr.locate import IMAGE_SUFFIXES

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CalibrationError(f"--data {folder}: no such folder (expected <LABEL>/<image>)")
    labels = {str(v): int(k) for k, v in id2label.items()}
    expect = f"expected <LABEL>/<image> with LABEL one of {sorted(labels)}"
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    stray = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise CalibrationError(f"--data {folder.name}: image(s) directly in the folder ({', '.join(stray[:MAX_LISTED])}"
                               f"{', ...' if len(stray) > MAX_LISTED else ''}): {expect}")
    dirs = [p for p in entries if p.is_dir()]
    unknown = [p.name for p in dirs if p.name not in labels]
    if unknown:
        raise CalibrationError(f"--data {folder.name}: folder(s) {unknown[:MAX_LISTED]} are not labels of the model: {expect}")
    if not dirs:
        raise CalibrationError(f"--data {folder.name}: no label folders: {expect}")
    files, ids = [], []
    for d in dirs:
        for p in sorted(d.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                raise CalibrationError(f"--data {folder.name}: {d.name}/{p.name} is a folder; {expect} "
                                       "(one level of label folders, films directly inside)")
            files.append(p)
            ids.append(labels[d.name])
    sample = SiteSample(folder=folder, name=name or folder.resolve().name, files=files,
                        labels=np.array(ids, dtype=int), id2label={int(k): str(v) for k, v in id2label.items()})
    present = [k for k, v in sample.counts().items() if v]
    if len(present) < 2:
        raise CalibrationError(f"--data {folder.name}: " + ("films of one class only" if present else "no films")
                               + f" ({sample.counts()}); calibration needs films of every label")
    return sample


def score_sample(predictor, sample: SiteSample, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C), out-of-distribution flags (N,)) of every film, through the serving
    ``Predictor.predict_batch`` (its decoder, checks, preprocessing, precision and OOD guard),
    a progress bar counting the films on a terminal (:mod:`.progress`).

    The logits are recovered from the calibrated probabilities as ``temperature * log p``:
    equal to the logits up to a per-row constant, which softmax (and every later step) ignores."""
    from cxr.imaging import ImageLoadError

    from .progress import predict_batch

    results = predict_batch(predictor, [str(f) for f in sample.files], batch_size=batch_size,
                            desc=f"scoring {sample.folder.name}")
    bad = [(f, r) for f, r in zip(sample.files, results) if isinstance(r, ImageLoadError)]
    if bad:
        listed = "; ".join(f"{f.parent.name}/{f.name}: {e}" for f, e in bad[:MAX_LISTED])
        raise CalibrationError(f"--data {sample.folder.name}: {len(bad)} film(s) cannot be read ({listed}"
                               f"{'; ...' if len(bad) > MAX_LISTED else ''}); remove or replace them")
    names = [predictor.id2label[i] for i in range(len(predictor.id2label))]
    probs = np.array([[r.probabilities[n] for n in names] for r in results], dtype=np.float64)
    logits = predictor.temperature * np.log(np.clip(probs, 1e-300, None))
    return logits, np.array([r.out_of_distribution for r in results], dtype=bool)


# ------------------------------------------------------------------ the fit

@dataclass
class Figures:
    """Sensitivity and specificity of one operating point on the sample, with exact intervals."""
    threshold: float
    temperature: float
    tp: int
    n_positive: int
    tn: int
    n_negative: int
    sensitivity: float
    sensitivity_ci: tuple
    specificity: float
    specificity_ci: tuple

    @classmethod
    def of(cls, op: OperatingPoint, logits, y, positive_id: int) -> "Figures":
        called = op.apply(logits, positive_id).positive
        tp, tn = int((called & (y == 1)).sum()), int((~called & (y == 0)).sum())
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        return cls(threshold=float(op.threshold), temperature=float(op.temperature), tp=tp, n_positive=n_pos,
                   tn=tn, n_negative=n_neg, sensitivity=tp / n_pos, sensitivity_ci=compute_exact_interval(tp, n_pos),
                   specificity=tn / n_neg, specificity_ci=compute_exact_interval(tn, n_neg))


@dataclass
class SiteFit:
    """The refitted operating point and what it did on the sample."""
    operating_point: OperatingPoint
    after: Figures
    before: Figures
    n_per_class: dict
    min_sensitivity: float
    confidence: float
    misses_allowed: int | None          # None: the floor cannot be shown on this sample
    sensitivity_lower_bound: float      # one-sided, at ``confidence``, of the sample sensitivity
    floor_shown: bool
    warnings: list = field(default_factory=list)

    def policy_text(self) -> str:
        return (f"the most specific threshold whose sensitivity >= {self.min_sensitivity:.0%} holds with one-sided "
                f"{self.confidence:.0%} confidence (exact Clopper-Pearson bound on the sample)")


def _mid_gap(margins: np.ndarray, chosen: float, temperature: float) -> float | None:
    """The threshold in the middle (logit scale) between ``chosen`` and the next lower sample score.
    ``margins``: the positive-vs-rest logit margins; the calibrated score is sigmoid(margin / T)."""
    score_logit = margins / temperature
    t_logit = math.log(chosen / (1 - chosen))
    below = score_logit[score_logit < t_logit - 1e-12]
    if not below.size:
        return None
    mid = (t_logit + float(below.max())) / 2
    return float(1 / (1 + math.exp(-mid)))


def fit_site_operating_point(logits, labels, positive_id: int, id2label: dict, *, previous: OperatingPoint,
                             sample_name: str, min_sensitivity: float = DEFAULT_MIN_SENSITIVITY,
                             confidence: float = DEFAULT_CONFIDENCE, date: str | None = None) -> SiteFit:
    """Temperature and threshold refitted on a site's scored sample (see the module docstring for
    the threshold rule). ``previous``: the model's operating point, kept in the new one's record
    and scored on the same films for comparison. Raises CalibrationError where the model does not
    separate the classes on the sample."""
    from .training import binary_labels, fit_operating_point

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise CalibrationError("site calibration is for binary models (two labels)")
    y = binary_labels(labels, positive_id)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if not n_pos or not n_neg:
        raise CalibrationError("the sample has films of one class only; calibration needs both")
    n_per_class = {str(id2label[i]): int((np.asarray(labels) == i).sum()) for i in sorted(id2label)}
    misses = compute_misses_allowed(n_pos, min_sensitivity, confidence)
    sample_floor = (n_pos - (misses or 0)) / n_pos
    fitted_on = f"the site sample '{sample_name}' ({len(y)} films)"
    # the existing fitting: temperature (NLL), then the most specific threshold keeping sample_floor
    op = fit_operating_point(logits, labels, positive_id, id2label, policy="sensitivity_floor",
                             min_sensitivity=sample_floor - 1e-9, fitted_on=fitted_on)
    if op.fallback:
        raise CalibrationError(f"the model does not separate the classes on '{sample_name}' "
                               "(sensitivity + specificity - 1 <= 0 at every threshold): a new threshold cannot fix "
                               "that; this site needs a model trained or fine-tuned on its own films")
    margins = logits[:, positive_id] - logits[:, 1 - positive_id]
    p = op.probabilities(logits)[:, positive_id]
    mid = _mid_gap(margins, op.threshold, op.temperature)
    if mid is not None and 0 < mid < 1 and ((p >= mid) == (p >= op.threshold)).all():
        op.threshold = mid
    conf_text = f"one-sided {confidence:.0%} confidence"
    op.policy = "sensitivity_floor"
    op.min_sensitivity = float(min_sensitivity)
    op.high_sensitivity_threshold = op.threshold
    op.source = (f"most specific threshold with sensitivity >= {min_sensitivity:.0%} at {conf_text} on {fitted_on}"
                 if misses is not None else
                 f"lowest {id2label[positive_id]} score of {fitted_on} (too few films to show sensitivity >= "
                 f"{min_sensitivity:.0%} at {conf_text})")
    op.calibrated_on = sample_name
    op.calibrated_date = date or datetime.date.today().isoformat()
    op.n_per_class = n_per_class
    op.sensitivity_confidence = float(confidence)
    op.previous = previous.to_config()
    op.fallback = False
    after = Figures.of(op, logits, y, positive_id)
    before = Figures.of(previous, logits, y, positive_id)
    lower = compute_lower_bound(after.tp, n_pos, confidence)
    fit = SiteFit(operating_point=op, after=after, before=before, n_per_class=n_per_class,
                  min_sensitivity=float(min_sensitivity), confidence=float(confidence), misses_allowed=misses,
                  sensitivity_lower_bound=lower, floor_shown=misses is not None)
    fit.warnings = _warnings(fit, id2label[positive_id])
    return fit


def _warnings(fit: SiteFit, positive: str) -> list[str]:
    out = []
    small = {k: v for k, v in fit.n_per_class.items() if v < MIN_PER_CLASS}
    if small:
        out.append("small sample: " + ", ".join(f"{v} {k}" for k, v in small.items())
                   + f" film(s) (fewer than {MIN_PER_CLASS}); the threshold rests on a handful of films and its "
                   "intervals are wide: 50-500 films with at least 20 of each class are advised")
    if not fit.floor_shown:
        n = fit.after.n_positive
        out.append(f"the floor cannot be met with confidence: with {n} {positive} film(s) even 100% sample sensitivity "
                   f"has a one-sided {fit.confidence:.0%} lower bound of "
                   f"{compute_lower_bound(n, n, fit.confidence):.3f} < {fit.min_sensitivity:.2f}; the threshold is "
                   f"the lowest {positive} score of the sample, and sensitivity >= {fit.min_sensitivity:.0%} on new "
                   f"films is NOT established (at least {compute_positives_needed(fit.min_sensitivity, fit.confidence)} "
                   f"{positive} films are needed)")
    elif fit.misses_allowed == 0 and fit.after.specificity < fit.before.specificity:
        n = fit.after.n_positive
        more = next(k for k in range(n + 1, 10 * n + 1000)
                    if (compute_misses_allowed(k, fit.min_sensitivity, fit.confidence) or 0) >= 1)
        out.append(f"with {n} {positive} films the threshold must keep every one of them, so it rests on the single "
                   f"lowest {positive} score of the sample and costs specificity ({fit.after.specificity:.1%} on the "
                   f"sample vs {fit.before.specificity:.1%} before); {more} or more {positive} films would allow a "
                   f"miss (or lower --confidence, a weaker guarantee)")
    lo = fit.after.sensitivity_ci[0]
    if lo < fit.min_sensitivity - FAR_BELOW:
        out.append(f"the 95% interval of sensitivity reaches down to {lo:.3f}, far below the floor "
                   f"{fit.min_sensitivity:.2f}")
    if fit.after.specificity < 0.5:
        out.append(f"keeping sensitivity >= {fit.min_sensitivity:.0%} costs specificity: only "
                   f"{fit.after.specificity:.1%} of the sample's negative films are called negative")
    t = fit.operating_point.temperature
    if t <= 0.051 or t >= 19.9:
        out.append(f"the temperature ({t:.3f}) hit its fitting bound: the sample is (nearly) separable and the "
                   "probabilities are over- or under-sharpened; more films of the site give a better temperature")
    return out


# ------------------------------------------------------------------ the folder

@dataclass
class SiteCalibration:
    """What ``calibrate_site`` did: the fit, the folder it wrote, and the record in it."""
    fit: SiteFit
    out: Path
    record: dict


def check_paths(model: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """--model a local model folder; --out new or empty, not the model folder, not inside it."""
    from cxr.locate import weights_problem

    model, out = Path(model).expanduser(), Path(out).expanduser()
    if not model.is_dir():
        raise CalibrationError(f"--model {model}: no such folder (site calibration copies a local model folder; "
                               "download a Hub model first, e.g. `hf download <id> --local-dir <folder>`)")
    problem = weights_problem(model)
    if problem:
        raise CalibrationError(f"--model: {problem}")
    m, o = model.resolve(), out.resolve()
    if o == m:
        raise CalibrationError("--out is the --model folder: calibration writes a new folder and never changes the "
                               "model it starts from")
    if m in o.parents:
        raise CalibrationError("--out is inside the --model folder: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise CalibrationError(f"--out {out}: exists and is not empty (nothing is overwritten: choose a new folder)")
    if o in m.parents:
        raise CalibrationError("--out contains the --model folder: choose a folder outside it")
    return model, out


def read_labels(model: Path) -> dict:
    """The model's labels from its config.json (transformers reads TimmWrapper's label_names too)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - one clear line
        raise CalibrationError(f"--model {model.name}: config.json cannot be read "
                               f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    return {int(k): str(v) for k, v in config.id2label.items()}


def read_task(model: Path) -> str:
    """The model's task from its config.json operating point ("binary" when it has none)."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return "binary"          # read_labels has already reported an unreadable config
    op = config.get(CONFIG_KEY) or {}
    task = op.get("task") if isinstance(op, dict) else None
    if task is None and len(config.get("id2label") or {}) > 2:
        return "multiclass"
    return str(task or "binary")


def _copy_model(src: Path, dst: Path) -> None:
    """Every file of the model folder (contents only, symlinks followed), 0644 files / 0755 folders."""
    ignore = shutil.ignore_patterns(*SKIPPED)
    for entry in sorted(src.iterdir()):
        if ignore(str(src), [entry.name]):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, copy_function=shutil.copyfile, ignore=ignore)
        elif entry.is_file():
            shutil.copyfile(entry, dst / entry.name)
    for root, dirs, files in os.walk(dst):
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
        for f in files:
            os.chmod(Path(root) / f, 0o644)
    os.chmod(dst, 0o755)


def _figures_json(f: Figures) -> dict:
    d = asdict(f)
    return {k: ([round(x, 4) for x in v] if isinstance(v, tuple) else round(v, 6) if isinstance(v, float) else v)
            for k, v in d.items()}


def build_record(fit: SiteFit, sample: SiteSample, *, model_name: str, excluded: dict, precision: str,
                 command: str, scores: dict) -> dict:
    """``site_calibration.json``: what the card's section renders (no file names: they may identify patients)."""
    op = fit.operating_point
    return {
        "sample": sample.name, "date": op.calibrated_date, "model": model_name, "command": command,
        "n_per_class": fit.n_per_class, "excluded_out_of_distribution": excluded, "precision": precision,
        "policy": fit.policy_text(), "min_sensitivity": fit.min_sensitivity, "confidence": fit.confidence,
        "misses_allowed": fit.misses_allowed, "floor_shown": fit.floor_shown,
        "sensitivity_lower_bound": round(fit.sensitivity_lower_bound, 4), "interval": "exact (Clopper-Pearson) 95%",
        "positive_label": op.positive_label,
        "before": _figures_json(fit.before), "after": _figures_json(fit.after),
        "previous_operating_point": op.previous, "operating_point": op.to_config(),
        "warnings": fit.warnings, "scores": scores,
    }


def _write_folder(model: Path, out: Path, op: OperatingPoint, record: dict) -> None:
    """The calibrated folder, written beside ``out`` and renamed into place once it loads."""
    from cxr.inference import ModelLoadError, Predictor

    from .hub import render_site_calibration, with_card_section

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _copy_model(model, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config[CONFIG_KEY] = op.to_config()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / CALIBRATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
        card = tmp / "README.md"
        text = card.read_text() if card.is_file() else f"# {out.name}\n"
        card.write_text(with_card_section(text, render_site_calibration(record)))
        for name in ("config.json", CALIBRATION_FILE, "README.md"):
            os.chmod(tmp / name, 0o644)
        try:   # the folder must serve before it is put in place
            back = Predictor.from_pretrained(tmp, precision="fp32").operating_point
        except ModelLoadError as e:
            raise CalibrationError(f"the calibrated folder does not load: {e}") from None
        if abs(back.threshold - op.threshold) > 1e-6 or back.calibrated_on != op.calibrated_on:
            raise CalibrationError("the calibrated folder does not read back its operating point")
        if out.is_dir():
            out.rmdir()          # checked empty before any work
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def calibrate_site(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                   min_sensitivity: float = DEFAULT_MIN_SENSITIVITY, confidence: float = DEFAULT_CONFIDENCE,
                   site: str | None = None, precision: str = "auto", batch_size: int = 16,
                   command: str | None = None) -> SiteCalibration:
    """Score ``data`` (``<LABEL>/<image>``) with the model in ``model`` through the Predictor, refit
    temperature and threshold (:func:`fit_site_operating_point`) and write the calibrated folder
    ``out``. Raises CalibrationError for bad input, before anything is written."""
    from cxr.inference import ModelLoadError, Predictor

    if not 0 < min_sensitivity < 1:
        raise CalibrationError(f"--min_sensitivity must be between 0 and 1, got {min_sensitivity}")
    if not 0.5 <= confidence < 1:
        raise CalibrationError(f"--confidence must be in [0.5, 1), got {confidence}")
    model, out = check_paths(model, out)
    id2label = read_labels(model)
    task = read_task(model)
    if len(id2label) != 2 or task != "binary":
        raise CalibrationError(
            f"--model {model.name}: site calibration is for binary models only; this one is {task} with "
            f"{len(id2label)} labels ({', '.join(id2label[i] for i in sorted(id2label))}). Its temperature"
            + (" and screening threshold" if task == "multiclass" else " and per-finding thresholds"
               if task == "multilabel" else "")
            + " stay as fitted at training time (config.json: cxr_operating_point); to refit them on a site's "
              "films, fine-tune or retrain with that site's films in the validation split")
    sample = load_site_sample(data, id2label, name=site)     # checked before the weights are loaded
    try:
        predictor = Predictor.from_pretrained(model, precision=precision)
    except ModelLoadError as e:
        raise CalibrationError(f"--model: {e}") from None
    logits, ood = score_sample(predictor, sample, batch_size=batch_size)
    excluded = {k: v for k, v in sample.counts(ood).items() if v}
    keep = ~ood
    counts = sample.counts(keep)
    if min(counts.values()) == 0:
        raise CalibrationError(f"--data {sample.folder.name}: after leaving out {int(ood.sum())} film(s) the model "
                               f"flags as out of distribution, films of one class only remain ({counts})")
    fit = fit_site_operating_point(logits[keep], sample.labels[keep], predictor.positive_id, predictor.id2label,
                                   previous=predictor.operating_point, sample_name=sample.name,
                                   min_sensitivity=min_sensitivity, confidence=confidence)
    fit.operating_point.scored_in = "fp32" if predictor.autocast_dtype is None else "bf16"
    if ood.any():
        share = ood.mean()
        fit.warnings.insert(0, f"{int(ood.sum())} of {len(ood)} film(s) ({share:.0%}) were flagged out of distribution "
                               "by the model and left out of the fit (serving gives them no answer)"
                            + ("; this many suggests the site's films differ from the training films" if share > 0.1
                               else ""))
    y = (sample.labels[keep] == predictor.positive_id).astype(int)
    scores = {"labels": y.tolist(),
              "before": [round(float(x), 5) for x in predictor.operating_point.probabilities(logits[keep])[:, predictor.positive_id]],
              "after": [round(float(x), 5) for x in fit.operating_point.probabilities(logits[keep])[:, predictor.positive_id]]}
    record = build_record(fit, sample, model_name=model.resolve().name, excluded=excluded,
                          precision=fit.operating_point.scored_in, scores=scores,
                          command=command or f"cxr-calibrate --model {shlex.quote(str(model))} --data "
                          f"{shlex.quote(str(data))} --out {shlex.quote(str(out))} --min_sensitivity {min_sensitivity}")
    _write_folder(model, out, fit.operating_point, record)
    return SiteCalibration(fit=fit, out=out, record=record)


# ------------------------------------------------------------------ the command

def _fmt_figure(value: float, ci: tuple, k: int, n: int) -> str:
    return f"{value:.3f} [{ci[0]:.3f}-{ci[1]:.3f}] ({k}/{n})"


def render_summary(result: SiteCalibration) -> str:
    fit, rec = result.fit, result.record
    op = fit.operating_point
    counts = ", ".join(f"{v} {k}" for k, v in fit.n_per_class.items())
    excluded = sum(rec["excluded_out_of_distribution"].values())
    lines = [
        f"site calibration of {rec['model']} on '{rec['sample']}': {sum(fit.n_per_class.values())} films ({counts})"
        + (f"; {excluded} left out as out of distribution" if excluded else ""),
        f"policy: {fit.policy_text()}",
        (f"  -> up to {fit.misses_allowed} missed {op.positive_label} film(s) of {fit.after.n_positive} allowed; "
         f"one-sided {fit.confidence:.0%} lower bound of sensitivity {fit.sensitivity_lower_bound:.3f}"
         if fit.floor_shown else f"  -> floor NOT shown (one-sided lower bound {fit.sensitivity_lower_bound:.3f})"),
        "",
        f"{'':18}{'threshold':>10}{'temperature':>13}  {'sensitivity [95% CI] (k/n)':<30}specificity [95% CI] (k/n)",
    ]
    for name, f in (("before (model)", fit.before), ("after (site)", fit.after)):
        lines.append(f"{name:18}{f.threshold:>10.4f}{f.temperature:>13.4f}  "
                     f"{_fmt_figure(f.sensitivity, f.sensitivity_ci, f.tp, f.n_positive):<30}"
                     f"{_fmt_figure(f.specificity, f.specificity_ci, f.tn, f.n_negative)}")
    lines += ["", "figures on the calibration sample itself are optimistic (the threshold was chosen on them); "
              "score other films of the site to know how it does there",
              f"wrote {result.out}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from cxr.cli import ArgumentParser

    ap = ArgumentParser(
        prog="cxr-calibrate",
        description="Refit a model's temperature and decision threshold on a labelled sample of a new site and write "
                    "a calibrated copy of the model folder (weights unchanged). Research and education only: "
                    "not a medical device.")
    ap.add_argument("--model", required=True, help="the model folder to start from (left unchanged)")
    ap.add_argument("--data", required=True, help="the site's labelled sample: <LABEL>/<image> (PNG, JPEG, DICOM; "
                    "50-500 films, at least 20 of each class advised)")
    ap.add_argument("--out", required=True, help="the calibrated model folder to write (new or empty)")
    ap.add_argument("--min_sensitivity", type=float, default=DEFAULT_MIN_SENSITIVITY,
                    help="the sensitivity floor the threshold must keep on the site's films (default 0.95)")
    ap.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                    help="one-sided confidence that the floor holds on new films of the site (exact binomial bound; "
                         "default 0.95; 0.5 is about the plain 'floor on the sample' policy)")
    ap.add_argument("--site", default=None, help="the site / sample's name in the record (default: --data's name)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="the Predictor's precision (default: as serving would run it)")
    ap.add_argument("--batch_size", type=int, default=16)
    return ap


def main(argv: list[str] | None = None) -> int:
    from cxr.cli import fail

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = "cxr-calibrate " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        result = calibrate_site(args.model, args.data, args.out, min_sensitivity=args.min_sensitivity,
                                confidence=args.confidence, site=args.site, precision=args.precision,
                                batch_size=args.batch_size, command=command)
    except CalibrationError as e:
        return fail(f"{e} (nothing was written)")
    for w in result.fit.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    print(render_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
