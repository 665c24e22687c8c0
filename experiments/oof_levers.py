"""Test-time robustness levers, measured on out-of-fold scores (issue #9).

A ``--cv_folds K`` run keeps each fold's model (``cv/fold*/model``) and the out-of-fold score of
every training image (``oof_scores.json``). Every image is re-scored here by the one fold model
that never saw its patient, under each test-time variant, so each lever is judged on all
~5,200 training films without touching any held-out split:

- ``base``: the training recipe's preprocessing (reproduces the saved OOF scores);
- ``res192`` / ``res224``: the same weights fed larger inputs (train-test resolution gap);
- ``tta_shift``: mean probability over the film and four shifts of 5 % (no flips: the heart
  is on the left);
- ``tta_zoom``: mean probability over zoom 0.9, 1.0 and 1.1.

Per variant: AUROC, and at its own equal-error threshold (the shipped policy) sensitivity,
specificity and accuracy, plus specificity at the highest threshold keeping sensitivity
>= 95 %. The fold ensemble (mean probability of the K fold models) cannot be scored
out of fold; it is scored on the external folder (``--external``; 16 films: indicative only)
beside the shipped single model.

    python -m experiments.oof_levers --run outputs/efficientnet-lite0-imagenet-full \\
        --data ../shared/data/chest_xray_224 --external ../shared/data/chest_xray_val_fullres \\
        --out docs/oof_levers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr_train.progress import bar

VARIANTS = ("base", "res192", "res224", "tta_shift", "tta_zoom")


def _find_files(data: Path, names: list[str]) -> list[Path]:
    index = {p.name: p for p in data.rglob("*") if p.is_file()}
    missing = [n for n in names if n not in index]
    if missing:
        raise SystemExit(f"{len(missing)} out-of-fold files not found under {data} (e.g. {missing[0]})")
    return [index[n] for n in names]


def _processor(model_dir: Path, size: int | None):
    """The run's own image processor; ``size`` swaps only the input size (same resize and normalisation)."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(model_dir)
    if size is None:
        return proc
    if hasattr(proc, "data_config"):          # timm models (TimmWrapperImageProcessor)
        import timm.data

        cfg = dict(proc.data_config, input_size=(3, size, size))
        proc.data_config = cfg
        proc.val_transforms = timm.data.create_transform(**cfg, is_training=False)
    else:                                     # transformers processors (ViT, ResNet, ...)
        proc.size = {"height": size, "width": size}
    return proc


def _views(x: torch.Tensor, variant: str) -> list[torch.Tensor]:
    """Test-time views of a normalised batch (fill 0 = the normalisation mean)."""
    import torchvision.transforms.v2.functional as TF

    if variant == "tta_shift":
        d = round(0.05 * x.shape[-1])
        return [x] + [TF.affine(x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0])
                      for dx, dy in ((d, 0), (-d, 0), (0, d), (0, -d))]
    if variant == "tta_zoom":
        return [TF.affine(x, angle=0.0, translate=[0, 0], scale=s, shear=[0.0, 0.0]) for s in (0.9, 1.0, 1.1)]
    return [x]


@torch.inference_mode()
def _score(model, proc, images: list[Image.Image], variant: str, positive_id: int, batch: int = 64) -> np.ndarray:
    from cxr.preprocessing import pixel_values
    from cxr_train.progress import in_chunks

    out = []
    for chunk in in_chunks(images, batch, desc=f"scoring ({variant})", unit="film"):
        x = pixel_values(proc, chunk).contiguous(memory_format=torch.channels_last)
        probs = [torch.softmax(model(pixel_values=v).logits.float(), -1)[:, positive_id] for v in _views(x, variant)]
        out.append(torch.stack(probs).mean(0).numpy())
    return np.concatenate(out)


def _metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from cxr_train.metrics import compute_operating_points, compute_threshold_metrics
    from cxr_train.training import equal_error_threshold
    from sklearn.metrics import roc_auc_score

    t = equal_error_threshold(y, p)
    at = compute_threshold_metrics(y, p, t)
    hs = compute_operating_points(y, p, 0.95)["high_sensitivity"]
    return {"roc_auc": float(roc_auc_score(y, p)), "threshold": t, "sensitivity": at["sensitivity"],
            "specificity": at["specificity"], "accuracy": at["accuracy"],
            "specificity_at_sens95": compute_threshold_metrics(y, p, hs)["specificity"], "n": int(len(y))}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForImageClassification

    from cxr.imaging import load_image

    ap = argparse.ArgumentParser(description="Test-time levers on out-of-fold scores of a --cv_folds run.")
    ap.add_argument("--run", required=True, help="output folder of a train_hf.py --cv_folds run (cv/fold*/model)")
    ap.add_argument("--data", required=True, help="the training image folder the run used")
    ap.add_argument("--external", default=None, help="<LABEL>/<image> folder for the fold-ensemble check")
    ap.add_argument("--out", required=True, help="folder for results.json and results.md")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--max_per_fold", type=int, default=None, help="quick runs: at most this many images a fold")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    oof_file = run / "oof_scores.json"   # a shipped folder calls the recipe's copy recipe_oof_scores.json
    oof = json.loads((oof_file if oof_file.is_file() else run / "recipe_oof_scores.json").read_text())
    folds_dirs = sorted((run / "cv").glob("fold*/model"))
    if not folds_dirs:
        raise SystemExit(f"no fold models under {run / 'cv'}: run train_hf.py with --cv_folds")
    files = _find_files(Path(args.data), oof["files"])
    fold = np.asarray(oof["fold"])
    positive = oof["operating_point"]["positive_label"]
    results: dict = {"run": str(run), "n_folds": len(folds_dirs), "variants": {}, "seconds": {}}
    y_all: list[np.ndarray] = []
    p_all: dict[str, list[np.ndarray]] = {v: [] for v in args.variants}
    saved_all: list[np.ndarray] = []
    for k, mdir in enumerate(folds_dirs):
        model = AutoModelForImageClassification.from_pretrained(mdir).eval().to(memory_format=torch.channels_last)
        pos_id = {v: int(i) for i, v in model.config.id2label.items()}[positive]
        idx = np.flatnonzero(fold == k)
        if args.max_per_fold and len(idx) > args.max_per_fold:   # a random subset, both classes
            idx = np.sort(np.random.default_rng(k).choice(idx, args.max_per_fold, replace=False))
        images = [load_image(files[i]) for i in bar(idx, desc=f"fold {k}: decoding", unit="film")]
        y_all.append((np.asarray(oof["labels"])[idx] == pos_id).astype(int))
        saved_all.append(np.asarray(oof["scores"])[idx])
        for v in args.variants:
            t0 = time.perf_counter()
            size = {"res192": 192, "res224": 224}.get(v)
            p_all[v].append(_score(model, _processor(run, size), images, v, pos_id))
            results["seconds"][v] = results["seconds"].get(v, 0.0) + time.perf_counter() - t0
        print(f"fold {k}: {len(idx)} images", flush=True)
    y = np.concatenate(y_all)
    for v in args.variants:
        p = np.concatenate(p_all[v])
        results["variants"][v] = _metrics(y, p)
        if v == "base":   # the saved OOF scores are temperature-scaled: same ranking, same AUROC
            from sklearn.metrics import roc_auc_score
            results["base_reproduces_saved_auroc"] = abs(roc_auc_score(y, np.concatenate(saved_all))
                                                         - results["variants"][v]["roc_auc"])
        print(v, json.dumps(results["variants"][v]), flush=True)
    if args.external:
        from cxr.locate import image_files

        ext = image_files(args.external)
        ye = np.array([int(p.parent.name.upper() == positive.upper()) for p in ext])
        images = [load_image(p) for p in bar(ext, desc="external: decoding", unit="film")]
        proc = _processor(run, None)
        def ext_scores(folder: Path) -> np.ndarray:
            m = AutoModelForImageClassification.from_pretrained(folder).eval().to(memory_format=torch.channels_last)
            return _score(m, proc, images, "base", {v: int(i) for i, v in m.config.id2label.items()}[positive])

        per_fold = [ext_scores(mdir) for mdir in folds_dirs]
        ps = ext_scores(run)
        t = results["variants"].get("base", {}).get("threshold")   # raw-probability equal-error threshold (OOF)
        from sklearn.metrics import roc_auc_score

        def ext_row(p):
            row = {"roc_auc": float(roc_auc_score(ye, p)), "n": int(len(ye))}
            if t is not None:
                row.update(correct=int(((p >= t) == ye).sum()), false_alarms=int(((p >= t) & (ye == 0)).sum()),
                           missed=int(((p < t) & (ye == 1)).sum()))
            return row
        results["external"] = {"shipped_model": ext_row(ps), "fold_ensemble": ext_row(np.mean(per_fold, 0)),
                               "single_folds": [ext_row(p) for p in per_fold], "threshold_raw": t}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| variant | AUROC (OOF) | sens / spec at its equal-error point | accuracy | spec at sens ≥ 95 % | s |",
             "|---|---|---|---|---|---|"]
    for v, m in results["variants"].items():
        lines.append(f"| {v} | {m['roc_auc']:.4f} | {m['sensitivity']:.3f} / {m['specificity']:.3f} | "
                     f"{m['accuracy']:.3f} | {m['specificity_at_sens95']:.3f} | {results['seconds'][v]:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
