"""Streaming: datasets larger than the disk budget (NIH ChestX-ray14, CheXpert from the Hub)
train through the same uint8 batch path as the film store, without a local copy.

``prepare_streaming(data_args, seed)`` returns the same :class:`cxr_train.data.PreparedData` as
``prepare_data``, with ``datasets.IterableDataset`` splits:

1. **First pass, labels and patients only.** A parquet dataset (Hub datasets are, and so is a
   local folder of ``*.parquet``) is read a second time with ``columns=[label, patient_id]``:
   the parquet reader skips the image bytes, so this pass over 224 k films reads a few MB.
   It gives the class names and counts (class weights) and the patient of every film.
2. **Validation by patient.** A ``validation``/``val`` split of the dataset is used as is;
   otherwise the patient-grouped, stratified split of ``prepare_data``
   (``StratifiedGroupKFold`` over the first pass's arrays) chooses the validation patients,
   and the two streams are the dataset filtered on the patient column (``patient_id`` in /
   not in the validation set): disjoint by construction. Without a patient column, every
   film is its own patient (a warning says so).
3. **Training stream**: shuffled with a buffer (``--streaming_shuffle_buffer``, reshuffled every
   epoch through ``set_epoch``), capped by ``max_train_samples`` (``take``); films are decoded
   one by one in the DataLoader workers (``--dataloader_num_workers``; each worker reads its
   own parquet shards), resized by the processor's own resize (:class:`cxr_train.cache.PixelSpec`)
   and batched as uint8 by the same collator: conversion, augmentation and normalisation then
   run on the training device exactly as for the film store.

The Trainer needs ``max_steps`` for a stream (it has no length). An unreadable film stops
training with its name (a stream cannot be checked before it is read).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .data import (
    IMAGE_COLUMNS, LABEL_COLUMNS, VALIDATION_NAMES, DataError, PreparedData, class_weights, split_by_patient,
)

logger = logging.getLogger(__name__)
SHUFFLE_BUFFER = 1000


def _load(dataset_name: str, config_name=None, revision=None, **kwargs):
    """A streaming DatasetDict: a local folder of parquet files or a Hub id."""
    from datasets import IterableDatasetDict, load_dataset

    from cxr.locate import MissingFolderError, local_folder

    try:
        path = local_folder(dataset_name, kind="dataset")
    except MissingFolderError as e:
        raise DataError(str(e)) from None
    try:
        if path is not None:
            if not path.is_dir() or not any(path.rglob("*.parquet")):
                raise DataError(f"streaming needs parquet files; none under {dataset_name}")
            ds = load_dataset(str(path), streaming=True, **kwargs)
        else:
            ds = load_dataset(dataset_name, config_name, revision=revision, streaming=True, **kwargs)
    except DataError:
        raise
    except Exception as e:  # datasets raises several types
        raise DataError(f"cannot stream dataset '{dataset_name}': "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(ds, IterableDatasetDict):
        ds = IterableDatasetDict({"train": ds})
    return ds


def _columns(features) -> tuple[str, str, str | None]:
    names = list(features or {})
    img = next((c for c in IMAGE_COLUMNS if c in names), None)
    lab = next((c for c in LABEL_COLUMNS if c in names), None)
    if img is None or lab is None:
        raise DataError(f"dataset needs an image column and a label column; it has {names}")
    return img, lab, "patient_id" if "patient_id" in names else None


def _first_pass(data_args, split: str, label_col: str, patient_col: str | None):
    """(labels, patients) of one split, reading only those columns."""
    cols = [label_col] + ([patient_col] if patient_col else [])
    try:
        ds = _load(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision, columns=cols)[split]
    except DataError:   # not a parquet builder: the full stream, other columns dropped after reading
        ds = _load(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision)[split]
        ds = ds.select_columns(cols)
    labels, patients = [], []
    for batch in ds.iter(batch_size=4096):
        labels.extend(batch[label_col])
        patients.extend(batch[patient_col] if patient_col else [None] * len(batch[label_col]))
    if patient_col is None:
        patients = [f"image-{i}" for i in range(len(labels))]
    return labels, [str(p) for p in patients]


class _Table:
    """What split_by_patient reads: ``t["label"]``, ``t["patient_id"]``, ``t.select(idx)``."""

    def __init__(self, labels, patients):
        self.cols = {"label": np.asarray(labels), "patient_id": np.asarray(patients)}

    def __getitem__(self, k):
        return self.cols[k]

    def select(self, idx):
        return _Table(self.cols["label"][idx], self.cols["patient_id"][idx])


def prepare_streaming(data_args, seed: int = 42, shuffle_buffer: int = SHUFFLE_BUFFER) -> PreparedData:
    """Streamed train/validation splits (see the module docstring)."""
    from datasets import ClassLabel, Image as ImageFeature

    from cxr.operating_point import positive_class_id

    ds = _load(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision)
    if data_args.train_split not in ds:
        raise DataError(f"no '{data_args.train_split}' split in {data_args.dataset_name}; it has {list(ds)}")
    train = ds[data_args.train_split]
    img_col, label_col, patient_col = _columns(train.features)
    labels, patients = _first_pass(data_args, data_args.train_split, label_col, patient_col)
    if not labels:
        raise DataError(f"the '{data_args.train_split}' split of {data_args.dataset_name} is empty")
    feature = train.features[label_col]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        y = np.asarray(labels, dtype=np.int64)
    else:
        names = sorted({str(v) for v in labels})
        lookup = {n: i for i, n in enumerate(names)}
        y = np.asarray([lookup[str(v)] for v in labels], dtype=np.int64)
    if len(names) < 2:
        raise DataError(f"only one class ({names[0] if names else 'none'}) in {data_args.dataset_name}: "
                        "need at least two (e.g. NORMAL and PNEUMONIA)")
    if data_args.class_names is not None and list(data_args.class_names) != names:
        raise DataError(f"label names differ from the data: expected {list(data_args.class_names)}, data has {names}")
    id2label = dict(enumerate(names))
    if data_args.positive_label is not None and data_args.positive_label not in names:
        raise DataError(f"positive_label '{data_args.positive_label}' is not one of {names}")

    def standardise(stream):
        stream = stream.select_columns([c for c in (img_col, label_col, patient_col) if c])
        if img_col != "image":
            stream = stream.rename_column(img_col, "image")
        if label_col != "label":
            stream = stream.rename_column(label_col, "label")
        stream = stream.cast_column("image", ImageFeature(decode=False))
        if not isinstance(feature, ClassLabel):
            lookup = {n: i for i, n in enumerate(names)}
            stream = stream.map(lambda ex: {"label": lookup[str(ex["label"])]})
        if patient_col is None:
            stream = stream.map(lambda ex, i: {"patient_id": f"image-{i}"}, with_indices=True)
        elif patient_col != "patient_id":
            stream = stream.rename_column(patient_col, "patient_id")
        return stream

    val_name = data_args.validation_split or next((v for v in VALIDATION_NAMES if v in ds), None)
    full = standardise(train)
    if val_name:
        if val_name not in ds:
            raise DataError(f"no '{val_name}' split; the dataset has {list(ds)}")
        validation, kept = standardise(ds[val_name]), np.ones(len(y), dtype=bool)
    else:
        if patient_col is None:
            logger.warning("streaming: no patient_id column; every film is its own patient in the validation split")
        _, val_table = split_by_patient(_Table(y, patients), data_args.validation_fraction, seed)
        val_patients = set(val_table["patient_id"].tolist())
        kept = np.array([p not in val_patients for p in patients])
        validation = full.filter(lambda ex: str(ex["patient_id"]) in val_patients)
        full = full.filter(lambda ex: str(ex["patient_id"]) not in val_patients)
        logger.info("streaming: validation carved by patient: %d train / %d validation films (%d patients held out)",
                    int(kept.sum()), int((~kept).sum()), len(val_patients))
    train_labels = y[kept]
    counts = np.bincount(train_labels, minlength=len(names))
    if (counts == 0).any():
        raise DataError(f"class(es) with no training images: {', '.join(names[i] for i in np.flatnonzero(counts == 0))}")
    full = full.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if data_args.max_train_samples:
        full = full.take(int(data_args.max_train_samples))
    if data_args.max_eval_samples:
        validation = validation.take(int(data_args.max_eval_samples))

    class _Labels:   # class_weights reads t["label"]
        def __getitem__(self, k):
            return train_labels

    return PreparedData({"train": full, "validation": validation}, id2label,
                        positive_class_id(id2label, data_args.positive_label),
                        class_weights(_Labels(), len(names), data_args))


class StreamedImages(torch.utils.data.IterableDataset):
    """A streamed split as uint8 samples: ``{"pixel_values": uint8 (3, H, W), "labels": int}``,
    each film decoded by ``load_image`` and resized by the processor's own resize. Iterated in
    DataLoader workers, the underlying ``datasets.IterableDataset`` gives each worker its own
    shards."""

    def __init__(self, stream, spec):
        self.stream, self.spec = stream, spec

    def set_epoch(self, epoch: int) -> None:   # the Trainer reshuffles the stream every epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        from cxr.imaging import ImageLoadError, load_image

        for i, ex in enumerate(self.stream):
            item = ex["image"]
            try:
                image = load_image(item.get("bytes") or item.get("path"), isolate=False)
            except ImageLoadError as e:
                name = Path(str(item.get("path") or f"streamed film {i}")).name
                raise DataError(f"unreadable image in the stream: {name}: {e}") from None
            x = torch.from_numpy(np.ascontiguousarray(self.spec.resize(image))).permute(2, 0, 1)
            yield {"pixel_values": x, "labels": int(ex["label"])}


def decode_stream(stream, spec) -> StreamedImages:
    return StreamedImages(stream, spec)
