"""Data: a Hub dataset id or a local image folder -> DatasetDict with a patient-grouped
validation split, label maps, and the image transforms (augmentation + the model's own
image processor, the one definition of preprocessing)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, DatasetDict, Image as ImageFeature, load_dataset

from cxr.imaging import ImageLoadError, load_image
from cxr.locate import IMAGE_SUFFIXES, MissingFolderError, image_files, local_folder
from cxr.operating_point import positive_class_id
from cxr.preprocessing import pixel_values

logger = logging.getLogger(__name__)

VALIDATION_NAMES = ("validation", "val", "valid", "dev")
IMAGE_COLUMNS = ("image", "img", "pixel_values_raw")
LABEL_COLUMNS = ("label", "labels")
# Kermany et al. 2018 file names encode the patient.
PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),               # person<N>_<bacteria|virus>_<K>.jpeg
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),     # IM-<NNNN>-<K>.jpeg, NORMAL2-IM-<NNNN>-<K>.jpeg
)


class DataError(ValueError):
    """The dataset cannot be used as given (missing, one class, unreadable images, ...)."""


def patient_id_from_filename(name: str) -> str | None:
    stem = Path(name).name
    for pat in PATIENT_PATTERNS:
        m = pat.match(stem)
        if m:
            return m.group(1)
    return None


def _image_ref(item: dict) -> str | bytes:
    return item.get("bytes") or item.get("path")


def load_raw_dataset(dataset_name: str, config_name: str | None = None, revision: str | None = None) -> DatasetDict:
    """Hub id or local folder -> DatasetDict with undecoded 'image' and ClassLabel 'label'."""
    try:
        path = local_folder(dataset_name, kind="dataset")
    except MissingFolderError as e:
        raise DataError(str(e)) from None
    if path is not None:
        if not path.is_dir():
            raise DataError(f"dataset folder not found: {dataset_name} (not a folder)")
        images = image_files(path)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {dataset_name}; expected "
                            "<split>/<LABEL>/<image> or <LABEL>/<image>")
        classes = sorted({p.parent.name for p in images})
        if len(classes) < 2:
            raise DataError(f"only one class ({classes[0]}) in {dataset_name}: need at least two class "
                            "folders (e.g. NORMAL and PNEUMONIA)")
        try:
            ds = load_dataset("imagefolder", data_dir=str(path))
        except Exception as e:  # datasets raises several types for a malformed folder
            raise DataError(f"cannot read image folder {dataset_name}: {str(e).splitlines()[0]}") from None
    else:
        try:
            ds = load_dataset(dataset_name, config_name, revision=revision)
        except Exception as e:
            raise DataError(f"cannot load dataset '{dataset_name}' (Hub id or local folder): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(ds, DatasetDict):
        ds = DatasetDict({"train": ds})
    return _normalise_columns(ds)


def _normalise_columns(ds: DatasetDict) -> DatasetDict:
    first = next(iter(ds.values()))
    img_col = next((c for c in IMAGE_COLUMNS if c in first.column_names), None)
    lab_col = next((c for c in LABEL_COLUMNS if c in first.column_names), None)
    if img_col is None or lab_col is None:
        raise DataError(f"dataset needs an image column and a label column; it has {first.column_names}")
    if img_col != "image":
        ds = ds.rename_column(img_col, "image")
    if lab_col != "label":
        ds = ds.rename_column(lab_col, "label")
    if not isinstance(ds[next(iter(ds))].features["label"], ClassLabel):
        ds = ds.class_encode_column("label")
    ds = ds.cast_column("image", ImageFeature(decode=False))
    return ds


def add_patient_ids(ds: DatasetDict) -> DatasetDict:
    """'patient_id' column: kept if present, else parsed from Kermany file names, else one per image."""
    first = next(iter(ds.values()))
    if "patient_id" in first.column_names:
        return ds

    def pid(batch, idx):
        out = []
        for item, i in zip(batch["image"], idx):
            name = item.get("path") or ""
            out.append(patient_id_from_filename(name) or f"image-{Path(name).stem or i}")
        return {"patient_id": out}

    ds = DatasetDict({k: v.map(pid, batched=True, with_indices=True, desc=f"patient ids ({k})")
                      for k, v in ds.items()})
    n_img = len(ds["train"]) if "train" in ds else len(first)
    n_pat = len(set(ds["train"]["patient_id"])) if "train" in ds else None
    logger.info("patient ids: %s images from %s patients in train", n_img, n_pat)
    return ds


def split_by_patient(train, fraction: float, seed: int):
    """Stratified, patient-grouped split (scikit-learn StratifiedGroupKFold): (train, validation)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(train["label"])
    groups = np.asarray(train["patient_id"])
    n_splits = max(2, int(round(1.0 / fraction)))
    if len(set(groups)) < n_splits:
        raise DataError(f"only {len(set(groups))} patients: too few for a {fraction:.0%} validation split")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    tr_idx, va_idx = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return train.select(np.sort(tr_idx)), train.select(np.sort(va_idx))


def _subsample(ds, n: int | None, per_class: int | None, seed: int):
    labels = np.asarray(ds["label"])
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = len(idx)
        if per_class is not None:
            k = min(k, per_class)
        if n is not None:
            k = min(k, max(1, int(round(n * len(idx) / len(labels)))))
        keep.extend(idx[:k].tolist())
    return ds.select(sorted(keep))


@dataclass
class PreparedData:
    splits: DatasetDict           # train, validation[, test]
    id2label: dict[int, str]
    positive_id: int
    class_weights: list[float]


def prepare_data(data_args, seed: int = 42, need_test: bool = False, carve_validation: bool = True) -> PreparedData:
    """The splits to train on. ``carve_validation=False`` (cross-validation) returns the whole
    training split as 'train': :func:`cv_fold` carves each fold's own validation."""
    ds = load_raw_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision)
    if data_args.train_split not in ds:
        raise DataError(f"no '{data_args.train_split}' split in {data_args.dataset_name}; it has {list(ds)}")
    names = ds[data_args.train_split].features["label"].names
    if len(names) < 2:
        raise DataError(f"only one class ({names[0] if names else 'none'}) in {data_args.dataset_name}: "
                        "need at least two (e.g. NORMAL and PNEUMONIA)")
    if data_args.class_names is not None and list(data_args.class_names) != list(names):
        unknown = sorted(set(names) ^ set(data_args.class_names))
        raise DataError(f"label names differ from the data: expected {list(data_args.class_names)}, "
                        f"data has {names} (unknown label(s): {', '.join(unknown)})")
    for split in ds:
        if ds[split].features["label"].names != names:
            raise DataError(f"split '{split}' has labels {ds[split].features['label'].names}, train has {names}")
    id2label = dict(enumerate(names))
    if data_args.positive_label is not None and data_args.positive_label not in names:
        raise DataError(f"positive_label '{data_args.positive_label}' is not one of {names}")
    positive_id = positive_class_id(id2label, data_args.positive_label)

    ds = add_patient_ids(ds)
    train = ds[data_args.train_split]
    counts = np.bincount(np.asarray(train["label"]), minlength=len(names))
    if (counts == 0).any():
        missing = [names[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"class(es) with no training images: {', '.join(missing)}")
    val_name = data_args.validation_split or next((v for v in VALIDATION_NAMES if v in ds), None)
    if data_args.validation_split and data_args.validation_split not in ds:
        raise DataError(f"no '{data_args.validation_split}' split; the dataset has {list(ds)}")
    if not carve_validation:
        validation = None
        if val_name:
            logger.warning("cross-validation uses the '%s' split only; the '%s' split is not used",
                           data_args.train_split, val_name)
    elif val_name:
        validation = ds[val_name]
    else:
        train, validation = split_by_patient(train, data_args.validation_fraction, seed)
        logger.info("validation carved out of %s by patient: %d train / %d validation images",
                    data_args.train_split, len(train), len(validation))
    if data_args.max_train_samples or data_args.max_samples_per_class:
        train = _subsample(train, data_args.max_train_samples, data_args.max_samples_per_class, seed)
    if data_args.max_eval_samples and validation is not None:
        validation = _subsample(validation, data_args.max_eval_samples, None, seed)
    splits = {"train": train} if validation is None else {"train": train, "validation": validation}
    if need_test:
        if data_args.test_split not in ds:
            raise DataError(f"--do_predict needs a '{data_args.test_split}' split; the dataset has {list(ds)}")
        splits["test"] = ds[data_args.test_split]
    return PreparedData(DatasetDict(splits), id2label, positive_id, class_weights(train, len(names), data_args))


def class_weights(train, n_classes: int, data_args) -> list[float]:
    """The given weights, or inverse class frequency of the training images."""
    if data_args.class_weights is not None:
        if len(data_args.class_weights) != n_classes:
            raise DataError(f"class_weights needs {n_classes} values, got {len(data_args.class_weights)}")
        return [float(w) for w in data_args.class_weights]
    counts = np.bincount(np.asarray(train["label"]), minlength=n_classes).astype(float)
    return (counts.sum() / (n_classes * np.maximum(counts, 1))).tolist()


def cv_folds(train, k: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of K stratified, patient-grouped folds (StratifiedGroupKFold): every
    image is held out exactly once, and a patient's images all fall in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(train["label"])
    groups = np.asarray(train["patient_id"])
    if len(set(groups)) < k:
        raise DataError(f"only {len(set(groups))} patients: too few for {k}-fold cross-validation")
    if np.bincount(labels).min() < k:
        raise DataError(f"a class has fewer than {k} images: too few for {k}-fold cross-validation")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [np.sort(held) for _, held in sgkf.split(np.zeros(len(labels)), labels, groups)]


def fold_overlaps(patients, folds) -> list[tuple[int, int, int]]:
    """(fold i, fold j, number of shared patients) for every pair of CV folds that share a patient:
    empty when the folds are grouped by patient (checked by every ``--cv_folds`` run and by
    ``experiments.oof_gap`` on a saved ``oof_scores.json``)."""
    patients, folds = np.asarray(patients), np.asarray(folds)
    ks = sorted(set(folds.tolist()))
    members = {k: set(patients[folds == k].tolist()) for k in ks}
    return [(i, j, len(members[i] & members[j])) for a, i in enumerate(ks) for j in ks[a + 1:]
            if members[i] & members[j]]


def cv_fold(data: PreparedData, held_out: np.ndarray, data_args, seed: int) -> PreparedData:
    """One fold: the other folds' patients train (a patient-grouped validation carved out of
    them for early stopping and checkpoint choice), the fold's patients are 'held_out'."""
    pool = data.splits["train"]
    mask = np.ones(len(pool), dtype=bool)
    mask[held_out] = False
    train, validation = split_by_patient(pool.select(np.flatnonzero(mask)), data_args.validation_fraction, seed)
    splits = DatasetDict({"train": train, "validation": validation, "held_out": pool.select(held_out)})
    return PreparedData(splits, data.id2label, data.positive_id,
                        class_weights(train, len(data.id2label), data_args))


def check_images(ds: DatasetDict, max_report: int = 10) -> None:
    """Decode every image once, before training; report unreadable ones by file name."""
    bad = []
    for split, d in ds.items():
        for i, item in enumerate(d["image"]):
            try:
                load_image(_image_ref(item), isolate=False)
            except ImageLoadError as e:
                name = Path(item.get("path") or f"{split}[{i}]").name
                bad.append(f"{split}/{name}: {e}")
    if bad:
        more = f" (and {len(bad) - max_report} more)" if len(bad) > max_report else ""
        raise DataError(f"{len(bad)} unreadable image(s): " + "; ".join(bad[:max_report]) + more)


def check_patient_disjoint(splits: DatasetDict) -> None:
    seen: dict[str, str] = {}
    for split, d in splits.items():
        for p in set(d["patient_id"]):
            if p in seen and seen[p] != split:
                raise DataError(f"a patient appears in both '{seen[p]}' and '{split}'")
            seen[p] = split


# ---------------------------------------------------------------- transforms

AUGMENTATIONS = {
    # name: (crop scale, rotation degrees, shift fraction, brightness/contrast, gamma range or None, blur)
    "standard": ((0.75, 1.0), 10, 0.05, 0.2, None, False),
    "strong": ((0.55, 1.0), 12, 0.08, 0.3, (0.7, 1.4), True),
}


def describe_augmentation(strength: str) -> str:
    (lo, _), deg, shift, bc, gamma, blur = AUGMENTATIONS[strength]
    return (f"random resized crop ({lo:.0%}–100%), rotation ±{deg}°, shift {shift:.0%}, brightness/contrast "
            f"±{bc:.0%}" + (f", gamma {gamma[0]}–{gamma[1]}" if gamma else "") + (", slight blur" if blur else "")
            + "; no flips")


class RandomGamma:
    """Gamma curve with an exponent drawn log-uniformly from ``(lo, hi)`` (exposure differences between
    X-ray systems); a PIL image in, a PIL image out."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = float(lo), float(hi)

    def __call__(self, image):
        from torchvision.transforms.v2 import functional as F

        g = float(np.exp(np.random.uniform(np.log(self.lo), np.log(self.hi))))
        return F.adjust_gamma(image, g)


def build_augmentation(size: tuple[int, int], strength: str = "standard"):
    """Augmentations suited to chest films: small affine jitter, crop, contrast (and with ``strong``,
    gamma and a slight blur). No flips (anatomy is lateralised: the heart is on the left)."""
    from torchvision.transforms import v2

    if strength not in AUGMENTATIONS:
        raise ValueError(f"augment_strength must be one of {sorted(AUGMENTATIONS)}, got {strength!r}")
    scale, deg, shift, bc, gamma, blur = AUGMENTATIONS[strength]
    steps = [
        v2.RandomResizedCrop(size, scale=scale, ratio=(0.9, 1.1), antialias=True),
        v2.RandomAffine(degrees=deg, translate=(shift, shift)),
        v2.ColorJitter(brightness=bc, contrast=bc),
    ]
    if gamma:
        steps.append(RandomGamma(*gamma))
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.3))
    return v2.Compose(steps)


def processor_size(processor) -> tuple[int, int]:
    """(height, width) of the processor's output."""
    from .modeling import size_dict

    if getattr(processor, "data_config", None):  # timm (TimmWrapperImageProcessor)
        h, w = processor.data_config["input_size"][-2:]
        return int(h), int(w)
    crop = size_dict(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else {}
    size = crop or size_dict(processor.size)
    if "height" in size:
        return size["height"], size["width"]
    s = size.get("shortest_edge", 224)
    return s, s


class ImageTransform:
    """datasets set_transform: undecoded image -> load_image -> [augment] -> image processor
    (through :func:`cxr.preprocessing.pixel_values`, the same call as the Predictor's)."""

    def __init__(self, processor, augment: bool = False, strength: str = "standard"):
        self.processor = processor
        self.augment = build_augmentation(processor_size(processor), strength) if augment else None

    def __call__(self, batch: dict) -> dict:
        images = [load_image(_image_ref(x), isolate=False) for x in batch["image"]]  # training data: chosen by the user, decoded in-process (same checks)
        if self.augment is not None:
            images = [self.augment(im) for im in images]
        return {"pixel_values": pixel_values(self.processor, images), "labels": batch["label"]}
