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

``CORRUPTIONS`` (``cxr_train.acquisition``, shared with the training augmentation
``--acquisition_augment``) is the one table of definitions. Each entry's ``apply(image, severity, rng)`` is a
pure function: a PIL RGB image in, a new PIL RGB image of the same size out (the input is not
changed); ``severity`` is a float in ``[0, 3]`` (0: the film unchanged; 1, 2, 3: the three levels
of the table, in between: linear interpolation of the parameter), ``rng`` a
``numpy.random.Generator`` (the only source of randomness: the same seed gives the same image).
Training draws a severity in ``[0, 2]`` and uses the same functions (``AcquisitionAugment``), so
severity 3 stays unseen by a model trained with them.
"""

from __future__ import annotations

import datetime
import json
import os
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, RESULTS_DIR, ROOT, machine_info, write_json
from cxr.precision import PRECISIONS

DEFAULT_HOLDOUT = ROOT / "docs" / "levers" / "holdout_patients.json"
DOCS_DIR = ROOT / "docs" / "shift"
SEED = 2026
QUICK_SEVERITY = 2
QUICK_PER_CLASS = 6


from cxr_train.acquisition import (  # noqa: F401 (the table the benchmark scores; re-exported)
    CORRUPTIONS, MAX_SEVERITY, Corruption, corrupt, film_rng,
)


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
    """Score every condition; returns (rows, per-class counts). Bars count the films decoded and
    scored (on a terminal, unless ``progress`` is False or CXR_PROGRESS=0; cxr_train.progress)."""
    from cxr.imaging import ImageLoadError, load_image
    from cxr_train.progress import bar as progress_bar

    positive = predictor.id2label[predictor.positive_id]
    y = np.array([int(label == positive) for _, label in films])
    names = [f.name for f, _ in films]
    clean_images = []
    for f, _ in progress_bar(films, desc="decoding", unit="film", enabled=progress):
        clean_images.append(load_image(f))   # decoded once, exactly as the server decodes an upload
    clean_arrays = [np.asarray(im, dtype=np.int16) for im in clean_images]

    plan = conditions(quick)
    rows, clean = [], None
    chunk = batch_size * max(1, predictor_workers())
    bar = progress_bar(total=len(plan) * len(films), desc="shift", unit="film", enabled=progress)
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
