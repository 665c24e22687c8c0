"""The lever table of the three-class model (issue #29), re-made from the run folders.

Each run is a ``cxr-train`` folder trained on the same patient-grouped pool with the same
``--seed`` (so the same 447-film validation split): its figures are read from
``eval_results.json`` (validation, where a choice may be made), ``eval_scores.json`` (the
validation probabilities at the fitted temperature) and ``external_results.json`` (the
hold-out, scored once through the serving ``Predictor``). Beside each run's validation
figures this prints the paired bootstrap difference to a reference run (the same films
resampled for both), so a lever's gain can be told from the validation split's noise.

    python -m experiments.threeclass_levers \\
        --run "shipped=models/efficientnet-lite0-imagenet-3class" \\
        --run "lite2 260px=outputs/3class-lite2-260" \\
        --reference shipped --out docs/levers/3class_levers.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

PAIR = ("BACTERIAL", "VIRAL")


def _read(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing (is {folder} a finished three-class cxr-train run?)")
    return json.loads(path.read_text())


def validation_scores(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels (index into the label names), probabilities (n x classes) and label names."""
    s = _read(folder, "eval_scores.json")
    if s.get("task") != "multiclass":
        raise SystemExit(f"error: {folder} is a {s.get('task')} run, not a multi-class one")
    return np.asarray(s["labels"]), np.asarray(s["probabilities"], dtype=float), list(s["labels_names"])


def figures(y: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, float]:
    """3-class accuracy, macro one-vs-rest AUROC, log loss, and bacterial-vs-viral AUROC / accuracy
    among the bacterial and viral films (VIRAL the positive class, scored P(VIRAL) / (P(B) + P(V))): the
    figures ``cxr_train.metrics.compute_multiclass_metrics`` reports (a test holds them equal), computed
    lean here because the paired bootstrap calls this thousands of times."""
    b, v = names.index(PAIR[0]), names.index(PAIR[1])
    pair = (y == b) | (y == v)
    score = p[pair, v] / np.clip(p[pair, b] + p[pair, v], 1e-12, None)
    yv = (y[pair] == v).astype(int)
    return {
        "accuracy": float((p.argmax(1) == y).mean()),
        "macro_auroc": float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=range(len(names)))),
        "log_loss": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()),
        "bacterial_vs_viral_auroc": float(roc_auc_score(yv, score)),
        "bacterial_vs_viral_accuracy": float(((score >= 0.5).astype(int) == yv).mean()),
    }


def paired_bootstrap(y, p_run, p_ref, names, n: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95 % interval of (run - reference) for each figure, resampling the same films for both."""
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        a, r = figures(y[idx], p_run[idx], names), figures(y[idx], p_ref[idx], names)
        for k in a:
            diffs.setdefault(k, []).append(a[k] - r[k])
    return {k: [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)]
            for k, d in diffs.items()}


def _fit_bias_corrected(logp: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Bias-corrected temperature scaling (Alexandari et al. 2020): one scale and one bias per
    class on the log-probabilities, fitted by log loss (scipy's L-BFGS-B, analytic gradient)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    onehot = np.eye(logp.shape[1])[y]

    def loss(theta):
        scale, bias = np.exp(theta[0]), theta[1:]
        lq = log_softmax(logp * scale + bias, axis=1)
        g = (np.exp(lq) - onehot) / len(y)                 # d loss / d logits
        return -(lq * onehot).sum() / len(y), np.concatenate([[(g * logp).sum() * scale], g.sum(0)])

    theta = minimize(loss, np.zeros(1 + logp.shape[1]), jac=True, method="L-BFGS-B").x
    return float(np.exp(theta[0])), theta[1:]


def bias_corrected_check(y: np.ndarray, p: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """Would a per-class bias on top of the temperature (undoing the class-weighted loss's prior)
    decide better? Cross-fitted inside the validation split (5 stratified folds x ``repeats``):
    fit on four fifths, decide on the fifth. Returns mean accuracy / balanced accuracy as saved
    and with the bias."""
    from sklearn.model_selection import StratifiedKFold

    logp = np.log(np.clip(p, 1e-12, None))

    def rates(q, yy):
        d = q.argmax(1)
        return (d == yy).mean(), np.mean([(d[yy == k] == k).mean() for k in np.unique(yy)])

    saved, biased = [], []
    for r in range(repeats):
        for fit, held in StratifiedKFold(5, shuffle=True, random_state=r).split(logp, y):
            scale, bias = _fit_bias_corrected(logp[fit], y[fit])
            saved.append(rates(logp[held], y[held]))
            biased.append(rates(logp[held] * scale + bias, y[held]))
    (a0, b0), (a1, b1) = np.mean(saved, 0), np.mean(biased, 0)
    return {"accuracy_saved": float(a0), "accuracy_bias_corrected": float(a1),
            "balanced_accuracy_saved": float(b0), "balanced_accuracy_bias_corrected": float(b1)}


def holdout_figures(folder: Path) -> dict:
    ext = _read(folder, "external_results.json")
    pair = ext["pairwise"][f"{PAIR[0]} vs {PAIR[1]}"]
    return {"n": ext["n_samples"], "accuracy": ext["accuracy"], "macro_auroc": ext["roc_auc"],
            "bacterial_vs_viral_auroc": pair["roc_auc"], "bacterial_vs_viral_accuracy": pair["accuracy"]}


def table(runs: dict[str, Path], reference: str, bootstrap: int = 2000, bias_repeats: int = 5) -> list[dict]:
    y_ref, p_ref, names = validation_scores(runs[reference])
    rows = []
    for label, folder in runs.items():
        y, p, run_names = validation_scores(folder)
        if run_names != names or not np.array_equal(y, y_ref):
            raise SystemExit(f"error: {folder} was not validated on the same films as {runs[reference]} "
                             "(same pool, --seed and --validation_fraction are needed to compare)")
        train = json.loads((folder / "train_results.json").read_text()) if (folder / "train_results.json").is_file() else {}
        row = {"model": label, "folder": str(folder),
               "validation": {"n": int(len(y)), **figures(y, p, names)},
               "holdout": holdout_figures(folder),
               "temperature": _read(folder, "eval_results.json").get("eval_temperature"),
               "train_runtime_min": round(train["train_runtime"] / 60, 1) if "train_runtime" in train else None}
        if bias_repeats:
            row["validation_bias_corrected_check"] = bias_corrected_check(y, p, bias_repeats)
        if label != reference:
            row["validation_minus_reference_95ci"] = paired_bootstrap(y, p, p_ref, names, n=bootstrap)
        rows.append(row)
    return rows


def ensembles(runs: dict[str, Path], groups: dict[str, list[str]], reference: str) -> list[dict]:
    """Validation figures of prediction ensembles: the runs' validation probabilities averaged (what
    serving several models would buy; not one checkpoint, so not shippable as one model)."""
    y, p_ref, names = validation_scores(runs[reference])
    rows = []
    for label, members in groups.items():
        unknown = [m for m in members if m not in runs]
        if unknown:
            raise SystemExit(f"error: ensemble {label!r}: {', '.join(map(repr, unknown))} not among the --run labels")
        p = np.mean([validation_scores(runs[m])[1] for m in members], axis=0)
        rows.append({"model": label, "members": members,
                     "validation": {"n": int(len(y)), **figures(y, p, names)}})
    return rows


def _rounded(obj, digits: int = 4):
    """Figures written to 4 decimals (rounded once, from the full-precision values)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=FOLDER")
    ap.add_argument("--reference", required=True, help="the LABEL the others are compared with")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    ap.add_argument("--bias_repeats", type=int, default=5,
                    help="repeats of the cross-fitted per-class bias check (0: skip it)")
    ap.add_argument("--ensemble", action="append", default=[], metavar="LABEL=RUN1,RUN2",
                    help="also report the averaged validation probabilities of these --run labels")
    ap.add_argument("--machine", default="", help="the CPU the runs trained on (written with the rows)")
    a = ap.parse_args(argv)
    runs = {}
    for item in a.run:
        label, sep, folder = item.partition("=")
        if not sep:
            ap.error(f"--run {item!r}: expected LABEL=FOLDER")
        runs[label] = Path(folder)
    if a.reference not in runs:
        ap.error(f"--reference {a.reference!r} is not one of the --run labels: {', '.join(runs)}")
    rows = table(runs, a.reference, a.bootstrap, a.bias_repeats)
    for r in rows:
        v, h = r["validation"], r["holdout"]
        print(f"{r['model']:<40} val acc {v['accuracy']:.3f} macro {v['macro_auroc']:.3f} bvv {v['bacterial_vs_viral_auroc']:.3f} "
              f"loss {v['log_loss']:.3f} | hold-out acc {h['accuracy']:.3f} macro {h['macro_auroc']:.3f} "
              f"bvv {h['bacterial_vs_viral_auroc']:.3f}")
        c = r.get("validation_bias_corrected_check")
        if c:
            print(f"{'':<40} per-class bias (cross-fitted on validation): accuracy {c['accuracy_saved']:.3f} -> "
                  f"{c['accuracy_bias_corrected']:.3f}, balanced {c['balanced_accuracy_saved']:.3f} -> "
                  f"{c['balanced_accuracy_bias_corrected']:.3f}")
        if "validation_minus_reference_95ci" in r:
            print(f"{'':<40} minus {a.reference}, 95% CI: {r['validation_minus_reference_95ci']}")
    groups = {}
    for item in a.ensemble:
        label, sep, members = item.partition("=")
        if not sep:
            ap.error(f"--ensemble {item!r}: expected LABEL=RUN1,RUN2")
        groups[label] = members.split(",")
    ens = ensembles(runs, groups, a.reference)
    for r in ens:
        v = r["validation"]
        print(f"{r['model']:<40} val acc {v['accuracy']:.3f} macro {v['macro_auroc']:.3f} bvv {v['bacterial_vs_viral_auroc']:.3f} "
              f"loss {v['log_loss']:.3f} (prediction ensemble, validation only)")
    if a.out:
        a.out.write_text(json.dumps({"study": "three-class levers (issue #29)", "machine": a.machine,
                                     "reference": a.reference, "rows": _rounded(rows),
                                     "prediction_ensembles": _rounded(ens)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
