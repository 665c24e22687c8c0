"""Data: a Hub dataset id or a local image folder -> DatasetDict with a patient-grouped
validation split, label maps, and the image transforms (augmentation + the model's own
image processor, the one definition of preprocessing)."""

from __future__ import annotations

import dataclasses
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

from .labels import strata

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


PATH_PATIENT = re.compile(r"^patient\d+$")      # CheXpert: .../train/patient00001/study1/view1_frontal.jpg


def patient_id_from_path(path: str) -> str | None:
    """The patient of a CheXpert-style path (a ``patient<N>`` folder), or None."""
    parts = Path(path).parts[:-1]
    return next((p for p in reversed(parts) if PATH_PATIENT.match(p)), None)


def _image_ref(item: dict) -> str | bytes:
    return item.get("bytes") or item.get("path")


def load_raw_dataset(dataset_name: str, config_name: str | None = None, revision: str | None = None, *,
                     image_column: str | None = None, label_column: str | None = None,
                     label_columns: list[str] | None = None, label_from_filename=None) -> DatasetDict:
    """Hub id or local folder -> DatasetDict with undecoded 'image' and ClassLabel 'label'
    (one label per film; :func:`load_labelled` reads multi-label data too)."""
    data = load_labelled(dataset_name, config_name, revision, image_column=image_column, label_column=label_column,
                         label_columns=label_columns, label_from_filename=label_from_filename)
    if data.multilabel:
        raise DataError(f"{dataset_name} is multi-label ({', '.join(data.names)}): read it with load_labelled")
    return data.ds


@dataclass
class Labelled:
    """A dataset with its label set: ``ds`` has an undecoded 'image' column and a 'label' column,
    a ClassLabel (one label per film) or, multi-label, K float codes per film (1 present, 0 absent,
    -1 uncertain; :mod:`cxr_train.labels`)."""
    ds: DatasetDict
    names: list[str]
    multilabel: bool


def load_labelled(dataset_name: str, config_name: str | None = None, revision: str | None = None, *,
                  image_column: str | None = None, label_column: str | None = None,
                  label_columns: list[str] | None = None, label_from_filename=None) -> Labelled:
    """Any supported source -> :class:`Labelled`: a local image folder (<split>/<LABEL>/<image> or
    <LABEL>/<image>), a CSV file or a folder of CSV files (one per split; image paths relative to the
    CSV's folder or its parent, as CheXpert ships), a local folder of parquet files or a
    ``save_to_disk`` folder (Hub-style), or a Hub id."""
    try:
        path = local_folder(dataset_name, kind="dataset")
    except MissingFolderError as e:
        raise DataError(str(e)) from None
    base = None
    if path is not None and (path.suffix.lower() == ".csv" or (path.is_dir() and any(path.glob("*.csv")))):
        ds, base = _load_csv(path, dataset_name), path if path.is_dir() else path.parent
    elif path is not None and path.is_dir() and ((path / "dataset_dict.json").is_file()
                                                 or (path / "dataset_info.json").is_file()
                                                 and (path / "state.json").is_file()):
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"cannot read dataset folder {dataset_name}: {str(e).splitlines()[0]}") from None
    elif path is not None and path.is_dir() and not image_files(path) and any(path.rglob("*.parquet")):
        try:
            ds = load_dataset(str(path))
        except Exception as e:
            raise DataError(f"cannot read parquet dataset {dataset_name}: {str(e).splitlines()[0]}") from None
    elif path is not None:
        if not path.is_dir():
            raise DataError(f"dataset folder not found: {dataset_name} (not a folder)")
        images = image_files(path)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {dataset_name}; expected "
                            "<split>/<LABEL>/<image> or <LABEL>/<image>")
        if label_from_filename is None:
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
    return _normalise_columns(ds, image_column=image_column, label_column=label_column, label_columns=label_columns,
                              label_from_filename=label_from_filename, base=base)


def _load_csv(path: Path, dataset_name: str) -> DatasetDict:
    """A CSV file (split 'train') or every ``*.csv`` of a folder (split = the file's stem)."""
    files = [path] if path.is_file() else sorted(path.glob("*.csv"))
    try:
        return load_dataset("csv", data_files={f.stem if path.is_dir() else "train": str(f) for f in files})
    except Exception as e:
        raise DataError(f"cannot read CSV {dataset_name}: {str(e).splitlines()[0]}") from None


def _columns_text(columns) -> str:
    return ", ".join(f"'{c}'" for c in columns)


def _is_image_feature(feature) -> bool:
    return isinstance(feature, ImageFeature)


def _looks_like_paths(values) -> bool:
    vals = [v for v in values if v is not None]
    return bool(vals) and all(isinstance(v, str) and Path(v).suffix.lower() in IMAGE_SUFFIXES for v in vals)


def _image_column(first, image_column: str | None) -> str:
    columns, features = first.column_names, first.features
    if image_column is not None:
        if image_column not in columns:
            raise DataError(f"--image_column '{image_column}' is not a column of the dataset; it has "
                            f"{_columns_text(columns)}")
        return image_column
    named = next((c for c in IMAGE_COLUMNS if c in columns), None)
    if named:
        return named
    typed = [c for c in columns if _is_image_feature(features[c])]
    if len(typed) == 1:
        return typed[0]
    sample = first.select(range(min(len(first), 20)))
    paths = [c for c in columns if c not in typed and _looks_like_paths(sample[c])]
    candidates = typed or paths
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(f"cannot tell which column holds the images (columns: {_columns_text(columns)}"
                    + (f"; candidates: {_columns_text(candidates)}" if candidates else "") + "): pass --image_column")


def _resolve_paths(ds: DatasetDict, col: str, base: Path | None) -> DatasetDict:
    """Image paths of a CSV made absolute: relative to the CSV's folder, else to its parent (CheXpert's
    ``CheXpert-v1.0-small/train/...`` paths); a missing file is a DataError naming it."""
    if base is None or isinstance(next(iter(ds.values())).features[col], ImageFeature):
        return ds
    roots = [base, base.parent]

    def resolve(batch):
        out = []
        for v in batch[col]:
            if v is None or not str(v).strip():
                raise DataError(f"an empty path in the image column '{col}'")
            p = Path(str(v)).expanduser()
            found = p if p.is_absolute() else next((r / p for r in roots if (r / p).is_file()), roots[0] / p)
            if not found.is_file():
                raise DataError(f"image file not found: '{v}' (column '{col}'; looked relative to {roots[0]} and "
                                f"{roots[1]})")
            out.append(str(found))
        return {col: out}

    return DatasetDict({k: v.map(resolve, batched=True, desc=f"image paths ({k})") for k, v in ds.items()})


def _label_columns(first, img_col: str, label_column, label_columns) -> tuple[str | None, list[str] | None]:
    """(one label column, None) or (None, per-finding columns)."""
    columns, features = first.column_names, first.features
    hint = ("pass --label_column NAME (one label per film, or a list of findings per film) or --label_columns "
            "A B ... (one 1/0/-1/blank column per finding)")
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"--label_column '{label_column}' is not a column of the dataset; it has "
                            f"{_columns_text(columns)}")
        return label_column, None
    if label_columns:
        missing = [c for c in label_columns if c not in columns]
        if missing:
            raise DataError(f"--label_columns {_columns_text(missing)} not in the dataset; it has {_columns_text(columns)}")
        if len(set(label_columns)) != len(label_columns):
            raise DataError("--label_columns names a column twice")
        return None, list(label_columns)
    named = next((c for c in LABEL_COLUMNS if c in columns), None)
    if named:
        return named, None
    others = [c for c in columns if c not in (img_col, "patient_id")]
    typed = [c for c in others if isinstance(features[c], ClassLabel)
             or isinstance(getattr(features[c], "feature", None), ClassLabel)]
    if len(typed) == 1:
        return typed[0], None
    if not typed:
        from .labels import is_code_column

        sample = first.select(range(min(len(first), 1000)))
        codes = [c for c in others if is_code_column(sample[c])]
        if codes:
            logger.info("multi-label: finding columns detected: %s", codes)
            return None, codes
    raise DataError(f"cannot tell which column holds the labels (columns: {_columns_text(columns)}"
                    + (f"; label-like: {_columns_text(typed)}" if typed else "") + f"): {hint}")


def _normalise_columns(ds: DatasetDict, *, image_column=None, label_column=None, label_columns=None,
                       label_from_filename=None, base: Path | None = None) -> Labelled:
    from .labels import FilenameLabeler, LabelError

    first = next(iter(ds.values()))
    img_col = _image_column(first, image_column)
    ds = _resolve_paths(ds, img_col, base)
    if label_from_filename is not None:
        try:
            labeler = label_from_filename if isinstance(label_from_filename, FilenameLabeler) else \
                FilenameLabeler.parse(label_from_filename)
        except LabelError as e:
            raise DataError(str(e)) from None
        ds = _labels_from_filenames(ds, img_col, labeler)
        lab_col, finding_cols = "label", None
    else:
        lab_col, finding_cols = _label_columns(first, img_col, label_column, label_columns)
    if img_col != "image":
        if "image" in first.column_names:
            ds = ds.remove_columns("image")
        ds = ds.rename_column(img_col, "image")
    if finding_cols is not None:
        return _finding_columns(ds, finding_cols)
    if lab_col != "label":
        if "label" in next(iter(ds.values())).column_names:
            ds = ds.remove_columns("label")
        ds = ds.rename_column(lab_col, "label")
    feature = ds[next(iter(ds))].features["label"]
    if _is_list(feature):
        return _sequence_labels(ds)
    if not isinstance(feature, ClassLabel):
        if label_from_filename is not None:   # the rules' order is the class order
            from datasets import ClassLabel as CL

            names = FilenameLabeler.parse(label_from_filename).labels if not isinstance(
                label_from_filename, FilenameLabeler) else label_from_filename.labels
            ds = ds.cast_column("label", CL(names=names))
        else:
            try:
                ds = ds.class_encode_column("label")
            except Exception as e:
                raise DataError(f"the label column '{lab_col}' cannot be read as classes: "
                                f"{str(e).splitlines()[0]}") from None
    ds = ds.cast_column("image", ImageFeature(decode=False))
    return Labelled(ds, list(ds[next(iter(ds))].features["label"].names), False)


def _is_list(feature) -> bool:
    return type(feature).__name__ in ("List", "Sequence", "LargeList") or isinstance(feature, list)


def _labels_from_filenames(ds: DatasetDict, img_col: str, labeler) -> DatasetDict:
    from .labels import LabelError

    out = {}
    for split, d in ds.items():
        items = d.cast_column(img_col, ImageFeature(decode=False))[img_col] if not isinstance(
            d.features[img_col], ImageFeature) or d.features[img_col].decode else d[img_col]
        names = [(x.get("path") if isinstance(x, dict) else x) or "" for x in items]
        try:
            labels = labeler.label_all(names, where=f"split '{split}'")
        except LabelError as e:
            raise DataError(str(e)) from None
        d = d.remove_columns([c for c in ("label",) if c in d.column_names])
        out[split] = d.add_column("label", labels)
    return DatasetDict(out)


def _sequence_labels(ds: DatasetDict) -> Labelled:
    """A list-of-labels column (Sequence(ClassLabel), or lists of names) -> K codes per film."""
    feature = ds[next(iter(ds))].features["label"]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        names = list(inner.names)
        to_index = None
    else:
        seen = sorted({str(v) for d in ds.values() for row in d["label"] for v in (row or [])})
        if not seen:
            raise DataError("the label column holds lists, but every list is empty: no findings to learn")
        names, to_index = seen, {n: i for i, n in enumerate(seen)}
    for split, d in ds.items():
        f = d.features["label"]
        if isinstance(getattr(f, "feature", None), ClassLabel) and list(f.feature.names) != names:
            raise DataError(f"split '{split}' has findings {list(f.feature.names)}, the first split has {names}")
    k = len(names)

    def encode(batch):
        rows = []
        for row in batch["label"]:
            y = [0.0] * k
            for v in row or []:
                i = to_index[str(v)] if to_index is not None else int(v)
                if not 0 <= i < k:
                    raise DataError(f"finding index {v} outside the label list {names}")
                y[i] = 1.0
            rows.append(y)
        return {"label": rows}

    ds = DatasetDict({s: d.map(encode, batched=True, desc=f"findings ({s})",
                               features=_with_codes(d.features, k)) for s, d in ds.items()})
    ds = ds.cast_column("image", ImageFeature(decode=False))
    return Labelled(ds, names, True)


def _with_codes(features, k: int):
    from datasets import Features, List, Value

    out = dict(features)
    out["label"] = List(Value("float32"), length=k)
    return Features(out)


def _finding_columns(ds: DatasetDict, cols: list[str]) -> Labelled:
    """CheXpert-style: one 1/0/-1/blank column per finding -> K codes per film in a 'label' column."""
    from .labels import LabelError, parse_code

    if len(cols) < 1:
        raise DataError("no finding columns")
    k = len(cols)

    def encode(batch):
        rows = []
        for i in range(len(batch[cols[0]])):
            row = []
            for c in cols:
                try:
                    row.append(parse_code(batch[c][i]))
                except LabelError as e:
                    raise DataError(f"finding column '{c}': {e}") from None
            rows.append(row)
        return {"label": rows}

    out = {}
    for split, d in ds.items():
        missing = [c for c in cols if c not in d.column_names]
        if missing:
            raise DataError(f"split '{split}' has no column(s) {_columns_text(missing)}")
        drop = [c for c in cols + (["label"] if "label" in d.column_names and "label" not in cols else [])]
        feats = {n: f for n, f in d.features.items() if n not in drop}
        from datasets import Features

        out[split] = d.map(encode, batched=True, remove_columns=drop, desc=f"findings ({split})",
                           features=_with_codes(Features(feats), k))
    ds = DatasetDict(out).cast_column("image", ImageFeature(decode=False))
    return Labelled(ds, list(cols), True)


def add_patient_ids(ds: DatasetDict) -> DatasetDict:
    """'patient_id' column: kept if present, else parsed from Kermany file names, else one per image."""
    first = next(iter(ds.values()))
    if "patient_id" in first.column_names:
        return ds

    def pid(batch, idx):
        out = []
        for item, i in zip(batch["image"], idx):
            name = item.get("path") or ""
            out.append(patient_id_from_filename(name) or patient_id_from_path(name) or f"image-{Path(name).stem or i}")
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

    labels = strata(train["label"])
    groups = np.asarray(train["patient_id"])
    n_splits = max(2, int(round(1.0 / fraction)))
    if len(set(groups)) < n_splits:
        raise DataError(f"only {len(set(groups))} patients: too few for a {fraction:.0%} validation split")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    tr_idx, va_idx = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return train.select(np.sort(tr_idx)), train.select(np.sort(va_idx))


def _subsample(ds, n: int | None, per_class: int | None, seed: int):
    labels = strata(ds["label"])
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
    class_weights: list[float]    # cross-entropy class weights; multi-label: BCE pos_weight per finding
    task: str = "binary"          # "binary" | "multiclass" | "multilabel" (cxr_train.labels)
    uncertain_labels: str | None = None     # multi-label: what -1 trains as (ones | zeros | ignore)
    label_from_filename: str | None = None  # the rules that labelled the films, when they were
    counts: dict | None = None    # streamed splits (no len()): films per split, from the first pass

    def size(self, split: str) -> int:
        """Films in ``split``: its length, or for a streamed split the count of its first pass."""
        if self.counts is not None and split in self.counts:
            return int(self.counts[split])
        return len(self.splits[split])

    @property
    def streamed(self) -> bool:
        return self.counts is not None

    @property
    def normal_label(self) -> str | None:
        """The normal class / finding (screening), or None."""
        from .labels import find_normal_label

        return find_normal_label(self.id2label)

    def ood_groups(self, split: str = "train") -> list:
        """A group per film for the OOD fit's per-class Gaussians: the class; multi-label: whether any
        finding is present."""
        labels = np.asarray(self.splits[split].with_format(None)["label"])
        return labels.tolist() if labels.ndim == 1 else (labels == 1).any(axis=1).astype(int).tolist()


def labelled_from_args(data_args) -> Labelled:
    return load_labelled(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision,
                         image_column=getattr(data_args, "image_column", None),
                         label_column=getattr(data_args, "label_column", None),
                         label_columns=getattr(data_args, "label_columns", None),
                         label_from_filename=getattr(data_args, "label_from_filename", None) or None)


def check_label_names(names: list[str], multilabel: bool, data_args) -> str:
    """The training split's label names against the arguments (enough classes, ``class_names``,
    ``positive_label``), for a local dataset and a stream alike; returns the task."""
    from .labels import task_of

    if len(names) < (1 if multilabel else 2):
        raise DataError(f"only one class ({names[0] if names else 'none'}) in {data_args.dataset_name}: "
                        "need at least two (e.g. NORMAL and PNEUMONIA)")
    if data_args.class_names is not None and list(data_args.class_names) != list(names):
        unknown = sorted(set(names) ^ set(data_args.class_names))
        raise DataError(f"label names differ from the data: expected {list(data_args.class_names)}, "
                        f"data has {list(names)} (unknown label(s): {', '.join(unknown)})")
    task = task_of(len(names), multilabel)
    if data_args.positive_label is not None and data_args.positive_label not in names:
        raise DataError(f"positive_label '{data_args.positive_label}' is not one of {list(names)}")
    if data_args.positive_label is not None and task != "binary":
        raise DataError(f"positive_label is for binary tasks; this one is {task} ({', '.join(names)}): each class "
                        "is scored one-vs-rest, and the screening question uses the NORMAL / No Finding class")
    return task


@dataclass
class _Checked:
    """The dataset as read once: labelled, patient ids parsed, labels checked against the arguments;
    every set of splits of a run is cut from it (:func:`_cut`)."""
    ds: DatasetDict
    names: list[str]
    multilabel: bool
    task: str
    positive_id: int
    uncertain: str | None
    val_name: str | None


def _read_and_check(data_args) -> _Checked:
    from .labels import LabelError

    labelled = labelled_from_args(data_args)
    ds, names, multilabel = labelled.ds, labelled.names, labelled.multilabel
    if data_args.train_split not in ds:
        raise DataError(f"no '{data_args.train_split}' split in {data_args.dataset_name}; it has {list(ds)}")
    task = check_label_names(names, multilabel, data_args)
    if not multilabel:
        for split in ds:
            if ds[split].features["label"].names != names:
                raise DataError(f"split '{split}' has labels {ds[split].features['label'].names}, train has {names}")
    id2label = dict(enumerate(names))
    uncertain = getattr(data_args, "uncertain_labels", None)
    if uncertain is not None and not multilabel:
        raise DataError(f"--uncertain_labels is for multi-label data; {data_args.dataset_name} has one label per "
                        "film")
    positive_id = positive_class_id(id2label, data_args.positive_label)

    ds = add_patient_ids(ds)
    train = ds[data_args.train_split]
    if multilabel:
        codes = np.asarray(train["label"], dtype=np.float32)
        unsure = [names[i] for i in np.flatnonzero((codes == -1).any(axis=0))]
        if unsure and uncertain is None:
            raise DataError(f"the training data has uncertain (-1) labels for {', '.join(unsure)}: choose what they "
                            "train as with --uncertain_labels ones (U-Ones), zeros (U-Zeros) or ignore (masked out "
                            "of the loss)")
        try:   # every finding needs positive and negative training films
            from .labels import pos_weights

            pos_weights(codes, uncertain, names)
        except LabelError as e:
            raise DataError(str(e)) from None
    else:
        counts = np.bincount(np.asarray(train["label"]), minlength=len(names))
        if (counts == 0).any():
            missing = [names[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"class(es) with no training images: {', '.join(missing)}")
    val_name = data_args.validation_split or next((v for v in VALIDATION_NAMES if v in ds), None)
    if data_args.validation_split and data_args.validation_split not in ds:
        raise DataError(f"no '{data_args.validation_split}' split; the dataset has {list(ds)}")
    return _Checked(ds, names, multilabel, task, positive_id, uncertain, val_name)


def _cut(checked: _Checked, data_args, seed: int, need_test: bool, carve_validation: bool) -> PreparedData:
    """One set of splits from the checked dataset: the validation split (the dataset's own, or carved
    out of train by patient), then the sample caps, each with ``seed``."""
    ds, names, uncertain, val_name = checked.ds, checked.names, checked.uncertain, checked.val_name
    train = ds[data_args.train_split]
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
    rules = getattr(data_args, "label_from_filename", None)
    return PreparedData(DatasetDict(splits), dict(enumerate(names)), checked.positive_id,
                        class_weights(train, len(names), data_args, task=checked.task, uncertain=uncertain,
                                      names=names),
                        task=checked.task, uncertain_labels=uncertain if checked.multilabel else None,
                        label_from_filename=" ".join(rules) if rules else None)


def prepare_data(data_args, seed: int = 42, need_test: bool = False, carve_validation: bool = True) -> PreparedData:
    """The splits to train on. ``carve_validation=False`` (cross-validation) returns the whole
    training split as 'train': :func:`cv_fold` carves each fold's own validation."""
    return _cut(_read_and_check(data_args), data_args, seed, need_test, carve_validation)


def prepare_cv_data(data_args, seed: int = 42, need_test: bool = False) -> tuple[PreparedData, PreparedData]:
    """A ``--cv_folds`` run's two sets of splits from one preparation (images listed, labelled,
    patient-parsed and checked once): the pool the folds are cut from (``carve_validation=False``)
    and the shipped model's splits, each the same as its own :func:`prepare_data` call. The shipped
    model's validation split is cut from the full training split, not from the pool, because the
    pool is already capped (``--max_train_samples``, ``--max_samples_per_class``): caps drawn before
    the patient-grouped carve would pick other films."""
    checked = _read_and_check(data_args)
    return (_cut(checked, data_args, seed, need_test, carve_validation=False),
            _cut(checked, data_args, seed, need_test, carve_validation=True))


def class_weights(train, n_classes: int, data_args, *, task: str = "binary", uncertain: str | None = None,
                  names=None) -> list[float]:
    """The given weights, or inverse class frequency of the training images; multi-label: BCE
    ``pos_weight`` per finding (negatives / positives among the training targets)."""
    if data_args.class_weights is not None:
        if len(data_args.class_weights) != n_classes:
            kind = "findings" if task == "multilabel" else "classes"
            raise DataError(f"class_weights needs {n_classes} values (one per {kind[:-1] if n_classes == 1 else kind}),"
                            f" got {len(data_args.class_weights)}")
        return [float(w) for w in data_args.class_weights]
    if task == "multilabel":
        from .labels import LabelError, pos_weights

        try:
            return pos_weights(np.asarray(train["label"], dtype=np.float32), uncertain,
                               names or [str(i) for i in range(n_classes)])
        except LabelError as e:
            raise DataError(str(e)) from None
    counts = np.bincount(np.asarray(train["label"]), minlength=n_classes).astype(float)
    return (counts.sum() / (n_classes * np.maximum(counts, 1))).tolist()


def cv_folds(train, k: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of K stratified, patient-grouped folds (StratifiedGroupKFold): every
    image is held out exactly once, and a patient's images all fall in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    raw = np.asarray(train["label"])
    labels = strata(raw)
    groups = np.asarray(train["patient_id"])
    if len(set(groups)) < k:
        raise DataError(f"only {len(set(groups))} patients: too few for {k}-fold cross-validation")
    if raw.ndim == 1 and np.bincount(labels).min() < k:
        raise DataError(f"a class has fewer than {k} images: too few for {k}-fold cross-validation")
    if raw.ndim == 2 and (raw == 1).sum(axis=0).min() < k:
        raise DataError(f"a finding has fewer than {k} positive images: too few for {k}-fold cross-validation")
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
    return dataclasses.replace(data, splits=splits, class_weights=class_weights(
        train, len(data.id2label), data_args, task=data.task, uncertain=data.uncertain_labels,
        names=list(data.id2label.values())))


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
