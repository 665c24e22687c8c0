"""Site calibration on real films: ``cxr-calibrate`` on one half of new patients, scored on the other.

The "new site" is the patients the shipped default model never trained or tuned on: the
patient-grouped hold-out (``docs/levers/holdout_patients.json``, carved by
:mod:`experiments.holdout` out of ``chest_xray_224``) plus the 16 full-resolution films of
``chest_xray_val_fullres``. They are split into two halves by patient (stratified by label,
``StratifiedGroupKFold``, ``--seed``); a temporary ``<LABEL>/<image>`` folder (symlinks) of the
first half is calibrated with the real command (:func:`cxr_train.calibrate.main`, default
policy, ``--min_sensitivity``), and the other half is scored through the ``Predictor`` at the new
and at the old operating point. Then ``--repeats`` other random halves repeat the fit (the library
function on the films' logits, scored once by the ``Predictor``) to show how much the outcome
varies with the sample, beside the plain policy (sample sensitivity >= floor, no margin), and
``--sizes`` smaller samples (whole patients drawn at random, the rest scoring) show what to
expect from 50-200 films.

Same-centre films: a real new site differs more. This shows the mechanics and the small-sample
margin, not how the model does elsewhere.

    python -m experiments.site_calibration_demo --model models/efficientnet-lite0-imagenet-full \\
        --data ../shared/data/chest_xray_224 --fullres ../shared/data/chest_xray_val_fullres \\
        --manifest docs/levers/holdout_patients.json --json docs/site_calibration_demo.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def new_patients(data: Path, fullres: Path | None, manifest: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Files, labels (names) and patients of the hold-out patients (+ the full-resolution films)."""
    from cxr.locate import image_files
    from cxr_train.data import patient_id_from_filename

    held = set(json.loads(manifest.read_text())["patients"])
    files = [f for f in image_files(data) if (patient_id_from_filename(f.name) or f.stem) in held]
    if fullres is not None:
        files += image_files(fullres)
    labels = np.array([f.parent.name for f in files])
    groups = np.array([patient_id_from_filename(f.name) or f.stem for f in files])
    return files, labels, groups


def halves(labels, groups, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedGroupKFold

    a, b = next(StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed).split(labels, labels, groups))
    return a, b


def link_sample(files: list[Path], folder: Path) -> Path:
    for f in files:
        dst = folder / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            raise SystemExit(f"two films named {f.name} in the sample")
        dst.symlink_to(f.resolve())
    return folder


def rates(called: np.ndarray, y: np.ndarray) -> dict:
    from cxr_train.calibrate import compute_exact_interval

    tp, tn = int((called & (y == 1)).sum()), int((~called & (y == 0)).sum())
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    return {"sensitivity": tp / n_pos, "sensitivity_ci": compute_exact_interval(tp, n_pos), "tp": tp, "n_pos": n_pos,
            "specificity": tn / n_neg, "specificity_ci": compute_exact_interval(tn, n_neg), "tn": tn, "n_neg": n_neg}


def fmt(r: dict) -> str:
    s, (sl, sh), p, (pl, ph) = r["sensitivity"], r["sensitivity_ci"], r["specificity"], r["specificity_ci"]
    return (f"sensitivity {s:.3f} [{sl:.3f}-{sh:.3f}] ({r['tp']}/{r['n_pos']}), "
            f"specificity {p:.3f} [{pl:.3f}-{ph:.3f}] ({r['tn']}/{r['n_neg']})")


def main(argv=None) -> dict:
    from cxr.inference import Predictor
    from cxr_train.calibrate import fit_site_operating_point, main as calibrate_main, score_sample, SiteSample
    from cxr_train.progress import predict_batch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/efficientnet-lite0-imagenet-full")
    ap.add_argument("--data", default="../shared/data/chest_xray_224")
    ap.add_argument("--fullres", default="../shared/data/chest_xray_val_fullres")
    ap.add_argument("--manifest", default="docs/levers/holdout_patients.json")
    ap.add_argument("--min_sensitivity", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=20, help="other random patient-grouped halves (library fit)")
    ap.add_argument("--sizes", default="50,100,200", help="smaller calibration samples to draw (films)")
    ap.add_argument("--size_repeats", type=int, default=100)
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    files, labels, groups = new_patients(Path(a.data), Path(a.fullres) if a.fullres else None, Path(a.manifest))
    cal, rest = halves(labels, groups, a.seed)
    print(f"new patients: {len(files)} films, {len(set(groups))} patients; calibration half {len(cal)} films, "
          f"scoring half {len(rest)} films (seed {a.seed})")
    out: dict = {"cpu": cpu_name(), "model": Path(a.model).name, "min_sensitivity": a.min_sensitivity,
                 "seed": a.seed, "n_films": len(files)}
    with tempfile.TemporaryDirectory(prefix="site-demo-") as tmp:
        sample = link_sample([files[i] for i in cal], Path(tmp) / "site-sample")
        calibrated = Path(tmp) / "calibrated"
        rc = calibrate_main(["--model", a.model, "--data", str(sample), "--out", str(calibrated),
                             "--min_sensitivity", str(a.min_sensitivity), "--site", "hold-out half A"])
        if rc:
            raise SystemExit(rc)
        record = json.loads((calibrated / "site_calibration.json").read_text())
        # the other half, through the Predictor, at the new and at the old operating point
        old, new = Predictor.from_pretrained(a.model), Predictor.from_pretrained(calibrated)
        label2id = {v: k for k, v in old.id2label.items()}
        everyone = SiteSample(folder=Path(a.data), name="all", files=files,
                              labels=np.array([label2id[x] for x in labels]), id2label=old.id2label)
        logits, ood = score_sample(old, everyone)       # every film once, old operating point
        rest_preds = predict_batch(new, [str(files[i]) for i in rest], desc="scoring half B (site point)")
        y_all = (everyone.labels == old.positive_id).astype(int)
        y_rest = y_all[rest]
        p_new = np.array([r.positive_probability for r in rest_preds])
        called_new = p_new >= new.threshold
        called_old = old.operating_point.apply(logits[rest], old.positive_id).positive
        out["calibration"] = {k: record[k] for k in ("n_per_class", "policy", "misses_allowed", "floor_shown",
                                                     "before", "after", "warnings")}
        out["holdout_half_B"] = {"n": len(rest), "flagged_out_of_distribution": int(ood[rest].sum()),
                                 "old": {"threshold": old.threshold, "temperature": old.temperature,
                                         **rates(called_old, y_rest)},
                                 "new": {"threshold": new.threshold, "temperature": new.temperature,
                                         **rates(called_new, y_rest)}}
    b = out["holdout_half_B"]
    print(f"\nscoring half ({b['n']} films of other patients; {b['flagged_out_of_distribution']} flagged OOD, "
          "scored anyway at the threshold):")
    print(f"  old operating point (threshold {b['old']['threshold']:.4f}, T {b['old']['temperature']:.3f}): "
          f"{fmt(b['old'])}")
    print(f"  new operating point (threshold {b['new']['threshold']:.4f}, T {b['new']['temperature']:.3f}): "
          f"{fmt(b['new'])}")

    # other random halves: the same fit (library), margin vs the plain policy
    reps = []
    for seed in range(a.seed + 1, a.seed + 1 + a.repeats):
        c, r = halves(labels, groups, seed)
        row = {"seed": seed}
        for name, conf in (("margin", 0.95), ("plain", 0.5)):
            fit = fit_site_operating_point(logits[c], everyone.labels[c], old.positive_id, old.id2label,
                                           previous=old.operating_point, sample_name=f"half {seed}",
                                           min_sensitivity=a.min_sensitivity, confidence=conf)
            called = fit.operating_point.apply(logits[r], old.positive_id).positive
            row[name] = {"threshold": fit.operating_point.threshold, **rates(called, y_all[r])}
        reps.append(row)
    summary = {}
    for name in ("margin", "plain"):
        sens = np.array([r[name]["sensitivity"] for r in reps])
        spec = np.array([r[name]["specificity"] for r in reps])
        summary[name] = {"sensitivity_mean": float(sens.mean()), "sensitivity_min": float(sens.min()),
                         "specificity_mean": float(spec.mean()), "specificity_min": float(spec.min()),
                         "share_sens_ge_floor": float((sens >= a.min_sensitivity).mean()),
                         "share_sens_ge_0.93_and_spec_ge_0.90": float(((sens >= 0.93) & (spec >= 0.90)).mean())}
    out["repeats"] = {"n": len(reps), "summary": summary, "per_split": reps}
    if reps:
        print(f"\n{len(reps)} other random patient-grouped halves (calibrate on one, score the other):")
        for name, label in (("margin", "default (one-sided 95% bound)"), ("plain", "plain (sample sens >= floor)")):
            s = summary[name]
            print(f"  {label:32} sensitivity mean {s['sensitivity_mean']:.3f} (min {s['sensitivity_min']:.3f}), "
                  f"specificity mean {s['specificity_mean']:.3f} (min {s['specificity_min']:.3f}); "
                  f"sens >= {a.min_sensitivity} in {s['share_sens_ge_floor']:.0%} of splits")
    # smaller samples: N films of random patients calibrate, every other film scores
    sizes = [int(x) for x in a.sizes.split(",") if x]
    rng = np.random.default_rng(a.seed)
    patients = np.unique(groups)
    out["sizes"] = {}
    if sizes:
        print(f"\nsmaller samples ({a.size_repeats} random draws of whole patients each; the rest of the new patients "
              "scores): share of draws with sensitivity >= 0.93 and specificity >= 0.90 on the rest")
    for size in sizes:
        rows = {"margin": [], "plain": []}
        for _ in range(a.size_repeats):
            chosen: list[int] = []
            for pid in rng.permutation(patients):
                chosen.extend(np.flatnonzero(groups == pid).tolist())
                if len(chosen) >= size:
                    break
            c = np.array(chosen)
            r = np.setdiff1d(np.arange(len(files)), c)
            if len(set(y_all[c].tolist())) < 2:
                continue
            for name, conf in (("margin", 0.95), ("plain", 0.5)):
                fit = fit_site_operating_point(logits[c], everyone.labels[c], old.positive_id, old.id2label,
                                               previous=old.operating_point, sample_name="draw",
                                               min_sensitivity=a.min_sensitivity, confidence=conf)
                got = rates(fit.operating_point.apply(logits[r], old.positive_id).positive, y_all[r])
                rows[name].append((got["sensitivity"], got["specificity"]))
        out["sizes"][size] = {}
        for name, label in (("margin", "default"), ("plain", "plain")):
            v = np.array(rows[name])
            d = {"draws": len(v), "sensitivity_mean": float(v[:, 0].mean()), "sensitivity_p5": float(np.quantile(v[:, 0], 0.05)),
                 "specificity_mean": float(v[:, 1].mean()), "specificity_p5": float(np.quantile(v[:, 1], 0.05)),
                 "share_target": float(((v[:, 0] >= 0.93) & (v[:, 1] >= 0.90)).mean())}
            out["sizes"][size][name] = d
            print(f"  {size:4d} films, {label:8}: sensitivity mean {d['sensitivity_mean']:.3f} (5th pct "
                  f"{d['sensitivity_p5']:.3f}), specificity mean {d['specificity_mean']:.3f} (5th pct "
                  f"{d['specificity_p5']:.3f}); target met in {d['share_target']:.0%}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{out['seconds']} s on {out['cpu']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
