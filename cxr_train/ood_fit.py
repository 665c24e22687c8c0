"""Fitting the out-of-distribution score (:mod:`cxr.ood` scores): Gaussians on a model's
features of its own training split, a threshold on validation films plus reference non-X-ray
images, saved as ``ood.safetensors`` into the model folder; and its command line.
Training-side code (it reads the training data and run_config.yaml), kept out of the Space.

``cxr-train`` fits it at the end of every run (:func:`fit_for_run`, on the run's own train and
validation splits; ``--ood_fit false`` skips it); the command line below fits or refits it for
a folder trained elsewhere or before that:

    python -m cxr_train.ood_fit fit --model models/cxr-resnet-small-scratch --data ../shared/data/chest_xray_224
    python -m cxr_train.ood_fit score --model models/cxr-resnet-small-scratch a.png b.dcm
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from PIL import Image

from cxr.ood import MAX_VAL_FLAGGED, OODScorer, extract_features

logger = logging.getLogger(__name__)
FIT_FACTS_FILE = "ood_fit.json"     # the fit's facts, readable beside ood.safetensors (which holds them too)


def _decode(item):
    """A PIL image or array as is; a path, bytes or a datasets image dict ({bytes, path}) decoded
    (training data: the user's own films, decoded in-process with the usual checks)."""
    from cxr.imaging import load_image

    if isinstance(item, (Image.Image, np.ndarray)):
        return item
    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    return load_image(item, isolate=False)


def compute_features(model, processor, images, batch_size: int = 32, desc: str | None = None) -> np.ndarray:
    """Penultimate features of ``images`` (PIL, arrays, paths, bytes or datasets image dicts),
    decoded one batch at a time (a few thousand films never sit in memory at once); a
    progress bar named ``desc`` counting images (none when ``desc`` is None; :mod:`.progress`)."""
    from .progress import in_chunks

    out = []
    for chunk in in_chunks(images, batch_size, desc=desc, unit="image", enabled=desc is not None):
        out.append(extract_features(model, processor, [_decode(x) for x in chunk], batch_size))
    return np.concatenate(out) if out else extract_features(model, processor, [], batch_size)


# ------------------------------------------------------------------ fitting

def choose_threshold(val_scores: np.ndarray, ood_scores: np.ndarray | None,
                     max_val_flagged: float = MAX_VAL_FLAGGED) -> float:
    """The threshold between validation films (in distribution) and non-X-ray images that
    maximises (flagged non-X-rays) - (flagged validation films), among those flagging at most
    ``max_val_flagged`` of the validation films; the middle of the best range. Without
    non-X-ray scores: the (1 - max_val_flagged) quantile of the validation scores."""
    val = np.sort(np.asarray(val_scores, dtype=np.float64))
    floor = float(np.quantile(val, 1.0 - max_val_flagged))
    if ood_scores is None or len(ood_scores) == 0:
        return floor
    ood = np.asarray(ood_scores, dtype=np.float64)
    points = np.unique(np.concatenate([val, ood]))
    cands = np.unique(np.concatenate([(points[:-1] + points[1:]) / 2, [floor]]))
    cands = cands[cands >= floor]
    j = np.array([(ood > t).mean() - (val > t).mean() for t in cands])
    best = np.flatnonzero(j >= j.max() - 1e-12)
    run = [best[0]]
    for b in best[1:]:          # the first contiguous run of best thresholds: take its middle
        if b != run[-1] + 1:
            break
        run.append(b)
    return float((cands[run[0]] + cands[run[-1]]) / 2)


def fit_ood(model, processor, images_train, images_val, *, labels_train=None, images_ood=None,
            max_val_flagged: float = MAX_VAL_FLAGGED, batch_size: int = 32, progress: bool = False) -> OODScorer:
    """Fit the scorer: Gaussians on ``images_train`` features (per class when ``labels_train``
    is given, with a shared Ledoit-Wolf covariance), threshold on ``images_val`` plus
    ``images_ood`` (default: :func:`reference_ood_images`). Images: PIL, arrays, paths, bytes
    or datasets image dicts, decoded a batch at a time; ``progress``: a bar per pass."""
    from sklearn.covariance import LedoitWolf

    if len(images_train) < 2 or len(images_val) < 1:
        raise ValueError("fit_ood needs at least 2 training and 1 validation image")
    bar = (lambda name: f"OOD fit: {name}") if progress else (lambda name: None)
    train = compute_features(model, processor, list(images_train), batch_size, bar("training films"))
    labels = np.zeros(len(train), int) if labels_train is None else np.asarray(labels_train)
    if len(labels) != len(train):
        raise ValueError("labels_train must have one label per training image")
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 2] or [labels[0]]
    means = np.stack([train[labels == c].mean(0) for c in classes])
    keep = np.isin(labels, classes)
    centred = train[keep] - means[np.searchsorted(classes, labels[keep])]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    scorer = OODScorer(means=means.astype(np.float32), precision=lw.precision_.astype(np.float32), threshold=0.0)
    val = scorer.score(compute_features(model, processor, list(images_val), batch_size, bar("validation films")))
    if images_ood is None:
        images_ood = [im for _, im in reference_ood_images()]
    ood = (scorer.score(compute_features(model, processor, list(images_ood), batch_size, bar("non-X-ray references")))
           if len(images_ood) else None)
    scorer.threshold = choose_threshold(val, ood, max_val_flagged)
    scorer.facts = {
        "method": "Mahalanobis distance to the nearest class mean, penultimate features, Ledoit-Wolf covariance",
        "feature_dim": int(train.shape[1]), "n_train": int(len(train)), "n_val": int(len(val)),
        "n_ood_reference": 0 if ood is None else int(len(ood)), "shrinkage": float(lw.shrinkage_),
        "val_flagged": float((val > scorer.threshold).mean()),
        "ood_reference_flagged": None if ood is None else float((ood > scorer.threshold).mean()),
        "val_score_quantiles": {q: float(np.quantile(val, float(q))) for q in ("0.5", "0.99")},
    }
    return scorer


def fit_for_run(model, processor, images_train, labels_train, images_val, *, max_train: int = 3000, seed: int = 0,
                max_val_flagged: float = MAX_VAL_FLAGGED, progress: bool = True, data: str | None = None,
                validation: str | None = None) -> OODScorer:
    """The scorer for a trained model: fitted on at most ``max_train`` of its training films (a
    seeded random sample), thresholded on its validation films and the reference non-X-ray
    images, then checked on the held-out non-X-ray set (facts only, never tuned on)."""
    idx = np.arange(len(images_train))
    if len(idx) > max_train:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_train, replace=False))
    scorer = fit_ood(model, processor, [images_train[i] for i in idx], images_val,
                     labels_train=[labels_train[i] for i in idx], max_val_flagged=max_val_flagged,
                     progress=progress)
    held = reference_ood_images(held_out=True)
    held_scores = scorer.score_images(model, processor, [im for _, im in held])
    scorer.facts["held_out_non_xray_flagged"] = float((held_scores > scorer.threshold).mean())
    scorer.facts["held_out_non_xray_n"] = len(held)
    if data is not None:
        scorer.facts["data"] = data
    if validation is not None:
        scorer.facts["validation"] = validation
    return scorer


def save_fit(scorer: OODScorer, folder: str | Path) -> Path:
    """``ood.safetensors`` (what the Predictor loads) and ``ood_fit.json`` (its facts, to read)."""
    path = scorer.save(folder)
    (Path(folder) / FIT_FACTS_FILE).write_text(
        json.dumps({"threshold": round(float(scorer.threshold), 3), **scorer.facts}, indent=1) + "\n")
    return path


# ------------------------------------------------------------------ reference non-X-ray images

def synthetic_ct_slice(seed: int, size: int = 256, kind: str = "ct") -> Image.Image:
    """A CT- or MR-like axial slice: a round body on black, bright rim/bone, organs or brain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    a, b = rng.uniform(0.36, 0.46), rng.uniform(0.28, 0.42)
    body = (xx / a) ** 2 + (yy / b) ** 2 <= 1
    img = np.zeros((size, size), np.float32)
    if kind == "mr":                                      # head: bright scalp ring, grey brain, folds
        img[body] = 200
        inner = (xx / (a - 0.04)) ** 2 + (yy / (b - 0.04)) ** 2 <= 1
        img[inner] = 110 + 25 * np.sin(40 * xx[inner] + 10 * rng.random()) * np.cos(35 * yy[inner])
        img[(xx / 0.08) ** 2 + (yy / 0.05) ** 2 <= 1] = 40   # ventricles
    else:                                                 # chest: soft tissue, dark lungs, spine
        img[body] = 130
        for sx in (-1, 1):
            lung = ((xx - sx * a * 0.45) / (a * 0.38)) ** 2 + ((yy + 0.02) / (b * 0.7)) ** 2 <= 1
            img[lung] = 25
        img[(xx / 0.05) ** 2 + ((yy - b * 0.7) / 0.05) ** 2 <= 1] = 250   # vertebra
        ring = ((xx / a) ** 2 + (yy / b) ** 2 <= 1) & ((xx / (a - 0.015)) ** 2 + (yy / (b - 0.015)) ** 2 > 1)
        img[ring] = 220
    img += rng.normal(0, 6, img.shape) * body
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").convert("RGB")


def synthetic_photo(seed: int, size: int = 256) -> Image.Image:
    """A greyscale 'photo': smooth gradients, a horizon, blocks and texture (not an X-ray)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = 80 + 120 * yy + 40 * np.sin(6 * xx + rng.random() * 6)
    for _ in range(6):
        y0, x0 = rng.integers(0, size - 40, 2)
        h, w = rng.integers(20, 90, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").convert("RGB")


SKIMAGE_FIT = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "page", "moon")
SKIMAGE_HELD_OUT = ("clock", "brick", "grass", "gravel", "text", "cell", "hubble_deep_field", "retina")


def _skimage_grey(names) -> list[tuple[str, Image.Image]]:
    try:
        import skimage.data
    except ImportError:
        return []
    out = []
    for n in names:
        try:
            a = np.asarray(getattr(skimage.data, n)())
        except Exception:  # noqa: BLE001 - a missing sample is skipped
            continue
        im = Image.fromarray(a.astype(np.uint8) if a.dtype != bool else (a * 255).astype(np.uint8))
        out.append((f"skimage:{n}", im.convert("L").convert("RGB")))
    return out


def reference_ood_images(held_out: bool = False) -> list[tuple[str, Image.Image]]:
    """Non-X-ray images for the threshold: scikit-image's greyscale photos (when installed),
    synthetic CT- and MR-like slices and synthetic greyscale photos. ``held_out=True`` gives a
    disjoint set (other photos, other seeds) for reporting, never for fitting."""
    base = 1000 if held_out else 0
    imgs = _skimage_grey(SKIMAGE_HELD_OUT if held_out else SKIMAGE_FIT)
    imgs += [(f"synthetic-ct:{s}", synthetic_ct_slice(base + s)) for s in range(8)]
    imgs += [(f"synthetic-mr:{s}", synthetic_ct_slice(base + s, kind="mr")) for s in range(8)]
    imgs += [(f"synthetic-photo:{s}", synthetic_photo(base + s)) for s in range(8)]
    return imgs


# ------------------------------------------------------------------ command line

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
            out.append(([Path(x["path"]) for x in ds["image"]], prepared.ood_groups(name)))   # class; multi-label: any finding
        return out[0][0], out[0][1], out[1][0]
    except Exception as e:  # noqa: BLE001 - fall back to a split of our own
        logger.warning("could not reproduce the model's split (%s: %s); using a split of our own",
                       type(e).__name__, str(e)[:200])
        return None


def main(argv: list[str] | None = None) -> int:
    from cxr.cli import fail
    from cxr.inference import ModelLoadError, Predictor

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
        return fail(e)
    if args.cmd == "score":
        if predictor.ood is None:
            return fail("this model folder has no ood.safetensors (run: python -m cxr_train.ood_fit fit ...)")
        from cxr.imaging import ImageLoadError, load_image
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
            return fail(f"no images under {data}")
        if args.val_data:
            val_files, _ = _image_folder(Path(args.val_data), "val")
            train_idx = np.arange(len(files))
            how = "--val_data"
        else:
            mask = _patient_split(files, 0.1)
            val_files = [f for f, m in zip(files, mask) if m]
            train_idx = np.flatnonzero(~mask)
            how = "a patient-grouped 10% of --data"
    scorer = fit_for_run(predictor.model, predictor.processor, [files[i] for i in train_idx],
                         [labels[i] for i in train_idx], val_files, max_train=args.max_train,
                         max_val_flagged=args.max_val_flagged, data=data.name, validation=how)
    path = save_fit(scorer, args.model)
    print(json.dumps({"saved": str(path), "threshold": round(scorer.threshold, 3), **scorer.facts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
