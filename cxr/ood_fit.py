"""Command line for the out-of-distribution score (:mod:`cxr.ood`): fit it on a model's own
training split and save ``ood.safetensors`` into the model folder, or print the score of files.
Training-side code (it reads the training data and run_config.yaml), kept out of the Space.

    python -m cxr.ood_fit fit --model models/cxr-resnet-small-scratch --data ../shared/data/chest_xray_224
    python -m cxr.ood_fit score --model models/cxr-resnet-small-scratch a.png b.dcm
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .ood import MAX_VAL_FLAGGED, fit_ood, reference_ood_images

logger = logging.getLogger(__name__)

def _image_folder(folder: Path, split: str) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    base = folder / split if (folder / split).is_dir() else folder
    for k, d in enumerate(sorted(p for p in base.iterdir() if p.is_dir())):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"):
                files.append(f)
                labels.append(k)
    return files, labels


def _patient_split(files: list[Path], fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of validation files, grouped by patient (Kermany names) when possible."""
    from .data import patient_id_from_filename

    groups = np.array([patient_id_from_filename(f.name) or f.name for f in files])
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    val_groups = set(rng.choice(uniq, max(1, int(round(len(uniq) * fraction))), replace=False))
    return np.array([g in val_groups for g in groups])


def _model_split(model_dir: Path, data: Path):
    """(train files, train labels, validation files) exactly as train_hf.py split ``data`` for
    this model (its run_config.yaml: seed, validation fraction), or None when not reproducible."""
    import tempfile

    cfg = model_dir / "run_config.yaml"
    if not cfg.is_file():
        return None
    try:
        import datasets

        from .config import parse_args
        from .data import prepare_data

        with tempfile.TemporaryDirectory() as tmp:
            _, data_args, training_args = parse_args(["--config", str(cfg), "--dataset_name", str(data),
                                                      "--output_dir", tmp])
            prepared = prepare_data(data_args, seed=training_args.seed)
        out = []
        for name in ("train", "validation"):
            ds = prepared.splits[name].cast_column("image", datasets.Image(decode=False))
            out.append(([Path(x["path"]) for x in ds["image"]], list(ds["label"])))
        return out[0][0], out[0][1], out[1][0]
    except Exception as e:  # noqa: BLE001 - fall back to a split of our own
        logger.warning("could not reproduce the model's split (%s: %s); using a split of our own",
                       type(e).__name__, str(e)[:200])
        return None


def main(argv: list[str] | None = None) -> int:
    from .inference import ModelLoadError, Predictor

    ap = argparse.ArgumentParser(description="Fit or apply the out-of-distribution score of a model folder.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fit = sub.add_parser("fit", help="fit on an image folder and save ood.safetensors into the model folder")
    fit.add_argument("--model", required=True, help="local model folder (written to)")
    fit.add_argument("--data", required=True, help="image folder: [train/]<LABEL>/<image>")
    fit.add_argument("--val_data", default=None,
                     help="validation folder; default: a patient-grouped 10%% of --data, not used for the fit")
    fit.add_argument("--max_train", type=int, default=3000, help="at most this many training images")
    fit.add_argument("--max_val_flagged", type=float, default=MAX_VAL_FLAGGED)
    sc = sub.add_parser("score", help="print the score of image files")
    sc.add_argument("--model", required=True)
    sc.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        predictor = Predictor.from_pretrained(args.model, precision="fp32")
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "score":
        if predictor.ood is None:
            print("error: this model folder has no ood.safetensors (run: python -m cxr.ood_fit fit ...)", file=sys.stderr)
            return 2
        from .imaging import ImageLoadError, load_image
        for p in args.images:
            try:
                s = float(predictor.ood.score_images(predictor.model, predictor.processor, [load_image(p)])[0])
                print(json.dumps({"file": Path(p).name, "ood_score": round(s, 3),
                                  "out_of_distribution": predictor.ood.is_ood(s)}))
            except ImageLoadError as e:
                print(json.dumps({"file": Path(p).name, "error": str(e)}))
        return 0
    data = Path(args.data)
    split = None if args.val_data else _model_split(Path(args.model), data)
    if split is not None:                # the very train/validation split the model was trained with
        files, labels, val_files = split
        train_idx = np.arange(len(files))
        how = "the model's own patient-grouped split (run_config.yaml)"
    else:
        files, labels = _image_folder(data, "train")
        if not files:
            print(f"error: no images under {data}", file=sys.stderr)
            return 2
        if args.val_data:
            val_files, _ = _image_folder(Path(args.val_data), "val")
            train_idx = np.arange(len(files))
            how = "--val_data"
        else:
            mask = _patient_split(files, 0.1)
            val_files = [f for f, m in zip(files, mask) if m]
            train_idx = np.flatnonzero(~mask)
            how = "a patient-grouped 10% of --data"
    rng = np.random.default_rng(0)
    if len(train_idx) > args.max_train:
        train_idx = np.sort(rng.choice(train_idx, args.max_train, replace=False))
    scorer = fit_ood(predictor.model, predictor.processor, [files[i] for i in train_idx], val_files,
                     labels_train=[labels[i] for i in train_idx], max_val_flagged=args.max_val_flagged)
    held = reference_ood_images(held_out=True)
    held_scores = scorer.score_images(predictor.model, predictor.processor, [im for _, im in held])
    scorer.facts["held_out_non_xray_flagged"] = float((held_scores > scorer.threshold).mean())
    scorer.facts["held_out_non_xray_n"] = len(held)
    scorer.facts["data"] = data.name
    scorer.facts["validation"] = how
    path = scorer.save(args.model)
    print(json.dumps({"saved": str(path), "threshold": round(scorer.threshold, 3), **scorer.facts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
