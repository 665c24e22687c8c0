"""The lever table of :mod:`experiments.levers`: per run, validation, out-of-fold (CV runs), hold-out
and external-film figures, threshold policies on the hold-out, and the fold ensemble (CV runs).

Every figure is read from the run folders (``eval_results.json``, ``cv_results.json``,
``external_results.json`` = the hold-out scored once at the saved operating point) or measured
here through the project's ``Predictor`` (the 16 external films; the fold ensemble), so the
table can be re-made from the runs at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "ece")


def _rates(y, p, thr):
    y, p = np.asarray(y), np.asarray(p)
    call = p >= thr
    return {"sensitivity": float(call[y == 1].mean()), "specificity": float((~call)[y == 0].mean()),
            "accuracy": float((call == (y == 1)).mean())}


def policy_thresholds(y, p) -> dict[str, float]:
    """Thresholds chosen on fitting scores (the run's validation split) by each policy."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0, 1)
    eer = thr[np.argmin(np.abs(tpr - (1 - fpr)))]
    youden = thr[np.argmax(tpr - fpr)]
    spec99 = thr[np.flatnonzero(1 - fpr >= 0.99)[-1]]    # the most sensitive threshold keeping spec >= 0.99
    from cxr_train.metrics import compute_operating_points

    floor97 = compute_operating_points(np.asarray(y), np.asarray(p), 0.97)["high_sensitivity"]
    return {"equal_error": float(eer), "youden": float(youden), "spec>=0.99": float(spec99),
            "sensitivity_floor 0.97": float(floor97), "0.5": 0.5}


def _films(folder: Path) -> tuple[list[Path], np.ndarray]:
    files = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return files, np.array([int(f.parent.name != "NORMAL") for f in files])


def _predict(model_dir: Path, files: list[Path]) -> tuple[np.ndarray, float]:
    from cxr.inference import Predictor
    from cxr_train.progress import predict_batch

    pred = Predictor.from_pretrained(str(model_dir), precision="fp32")
    pred.ood = None                       # the lever runs have no OOD file; the default's is not what is measured
    res = predict_batch(pred, [str(f) for f in files], desc=model_dir.name)
    return np.array([r.positive_probability for r in res]), float(pred.threshold)


def score_run(run: Path, external: Path, holdout: Path) -> dict:
    row: dict = {"run": run.name}
    ev = json.loads((run / "eval_results.json").read_text())
    row["validation_auroc"] = ev.get("eval_roc_auc")
    cfg = json.loads((run / "config.json").read_text())
    op = cfg["cxr_operating_point"]
    row["threshold"], row["temperature"], row["fitted_on"] = op["threshold"], op["temperature"], op["fitted_on"]
    if (run / "cv_results.json").is_file():
        pooled = json.loads((run / "cv_results.json").read_text())["pooled"]
        row["oof"] = {k: pooled[k] for k in METRICS}
    ho = json.loads((run / "external_results.json").read_text())
    row["holdout"] = {k: ho[k] for k in METRICS}
    row["holdout"]["n"] = len(ho["per_image"])
    y_h = np.array([int(r["label"] != "NORMAL") for r in ho["per_image"]])
    p_h = np.array([r["p_positive"] for r in ho["per_image"]])
    val = json.loads((run / "eval_scores.json").read_text())
    row["policies_on_holdout"] = {name: {"threshold": round(t, 4), **_rates(y_h, p_h, t)}
                                  for name, t in policy_thresholds(val["labels"], val["scores"]).items()}
    files, y_e = _films(external)
    p_e, thr = _predict(run, files)
    if (run / "oof_scores.json").is_file():   # the same policies fitted on the out-of-fold scores instead
        oof = json.loads((run / "oof_scores.json").read_text())
        row["oof_policies"] = {name: {"threshold": round(t, 4), "holdout": _rates(y_h, p_h, t),
                                      "external16": _rates(y_e, p_e, t), "oof": _rates(oof["labels"], oof["scores"], t)}
                               for name, t in policy_thresholds(oof["labels"], oof["scores"]).items()}
    row["external16"] = {"normal_correct": int(((p_e < thr) & (y_e == 0)).sum()), "normals": int((y_e == 0).sum()),
                         "pneumonia_correct": int(((p_e >= thr) & (y_e == 1)).sum()), "pneumonias": int(y_e.sum()),
                         "max_p_normal": round(float(p_e[y_e == 0].max()), 3),
                         "min_p_pneumonia": round(float(p_e[y_e == 1].min()), 3)}
    wall = run / "wall_seconds.json"
    if wall.is_file():
        row["wall_minutes"] = round(json.loads(wall.read_text())["wall_seconds"] / 60, 1)
    folds = sorted((run / "cv").glob("fold*/model")) if (run / "cv").is_dir() else []
    if folds:                             # mean probability of the K fold models (none saw a hold-out patient)
        from sklearn.metrics import roc_auc_score

        hfiles, y_hh = _films(holdout)
        ph = np.mean([_predict(f, hfiles)[0] for f in folds], axis=0)
        pe = np.mean([_predict(f, files)[0] for f in folds], axis=0)
        row["fold_ensemble"] = {"holdout": {"roc_auc": float(roc_auc_score(y_hh, ph)), **_rates(y_hh, ph, thr)},
                                "external16": {**_rates(y_e, pe, thr), "n": len(files)},
                                "threshold": thr, "k": len(folds)}
    return row


def _fmt(x):
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def report(runs: Path, out: Path, external: Path, holdout: Path = Path("outputs/holdout_data/holdout")) -> dict:
    rows = [score_run(r, external, holdout) for r in sorted(runs.iterdir())
            if (r / "external_results.json").is_file() and (r / "eval_scores.json").is_file()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    lines = ["| run | val AUROC | OOF AUROC | OOF spec | hold-out AUROC | hold-out acc | hold-out sens | "
             "hold-out spec | hold-out ECE | threshold | 16 new-patient films (N / P correct) | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, h, e = r.get("oof", {}), r["holdout"], r["external16"]
        lines.append(f"| {r['run']} | {_fmt(r['validation_auroc'])} | {_fmt(o.get('roc_auc'))} | "
                     f"{_fmt(o.get('specificity'))} | {_fmt(h['roc_auc'])} | {_fmt(h['accuracy'])} | "
                     f"{_fmt(h['sensitivity'])} | {_fmt(h['specificity'])} | {_fmt(h['ece'])} | "
                     f"{r['threshold']:.3f} | {e['normal_correct']}/{e['normals']} · {e['pneumonia_correct']}/"
                     f"{e['pneumonias']} | {_fmt(r.get('wall_minutes'))} |")
    lines += ["", "Threshold policies (fitted on each run's validation split, applied to the hold-out): "
              "sensitivity / specificity", "", "| run | " + " | ".join(rows[0]["policies_on_holdout"]) + " |",
              "|---|" + "---|" * len(rows[0]["policies_on_holdout"])]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(
            f"{v['sensitivity']:.3f} / {v['specificity']:.3f} (t={v['threshold']:.2f})"
            for v in r["policies_on_holdout"].values()) + " |")
    for r in (r for r in rows if "oof_policies" in r):
        lines += ["", f"Threshold policies fitted on the out-of-fold scores of `{r['run']}` (sensitivity / specificity):",
                  "", "| policy | threshold | OOF | hold-out | 16 new-patient films |", "|---|---|---|---|---|"]
        for name, v in r["oof_policies"].items():
            lines.append(f"| {name} | {v['threshold']:.3f} | " + " | ".join(
                f"{v[k]['sensitivity']:.3f} / {v[k]['specificity']:.3f}" for k in ("oof", "holdout", "external16")) + " |")
    ens = [r for r in rows if "fold_ensemble" in r]
    if ens:
        lines += ["", "Fold ensemble (mean probability of the fold models, at the run's threshold):", "",
                  "| run | hold-out AUROC | hold-out sens | hold-out spec | 16 films acc |", "|---|---|---|---|---|"]
        for r in ens:
            f = r["fold_ensemble"]
            lines.append(f"| {r['run']} ({f['k']} folds) | {f['holdout']['roc_auc']:.4f} | "
                         f"{f['holdout']['sensitivity']:.3f} | {f['holdout']['specificity']:.3f} | "
                         f"{f['external16']['accuracy']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}
