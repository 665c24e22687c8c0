"""Streaming: datasets larger than the disk budget (NIH ChestX-ray14, CheXpert from the Hub)
train through the same uint8 batch path as the film store, without a local copy
(``cxr-train --streaming true``; docs/streaming.md).

``prepare_streaming(data_args, seed)`` returns the same :class:`cxr_train.data.PreparedData` as
``prepare_data``, with ``datasets.IterableDataset`` splits and ``counts`` (films per split):

1. **First pass, labels and patients only.** A parquet dataset (Hub datasets are, and so is a
   local folder of ``*.parquet``) is read a second time with ``columns=[label, patient_id]``:
   the parquet reader skips the image bytes, so this pass over 224 k films reads a few MB.
   It gives the class names and counts (class weights), the patient of every film and the
   number of films of every split (the card, the summary and the step count).
2. **Validation by patient**, by these rules in order:
   a. a ``validation``/``val`` split of the dataset (or ``--validation_split``) is used as is;
      when both splits have a patient column their patients must not overlap (checked on the
      first pass);
   b. else, with a ``patient_id`` column, the patient-grouped, stratified split of
      ``prepare_data`` (``StratifiedGroupKFold`` over the first pass's arrays) chooses the
      validation patients, and the two streams are the dataset filtered on the patient column
      (``patient_id`` in / not in the validation set): disjoint by construction;
   c. else the patient comes from the film's path as for a local folder (Kermany
      ``person<N>_`` / ``IM-<N>-`` names, CheXpert ``patient<N>/`` folders), else the film is
      its own patient (its path, or a hash of its bytes): the first pass then reads the image
      column too (the bytes are read, never decoded) and a warning says so.
3. **Training stream**: shuffled with a buffer (``--streaming_shuffle_buffer``, reshuffled every
   epoch through ``set_epoch``), capped by ``max_train_samples`` (``take``: the first N films of
   the shuffled stream, not a stratified sample; the class weights come from the whole training
   split's first pass); films are decoded one by one in the DataLoader workers
   (``--dataloader_num_workers``; each worker reads its own parquet shards), resized by the
   processor's own resize (:class:`cxr_train.cache.PixelSpec`) and batched as uint8 by the same
   collator: conversion, augmentation and normalisation then run on the training device exactly
   as for the film store.

One label per film (binary or N classes); a multi-label stream is refused ("not supported yet").
The Trainer needs ``max_steps`` for a stream (it has no length): ``cxr-train`` derives it from
the first pass's count and ``num_train_epochs`` when it is not given. A stream cannot be checked
before it is read: :func:`check_stream_start` decodes the first films of every split before
anything is written, and an unreadable film later stops training with its name.
"""

from __future__ import annotations

import hashlib
import logging
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from .data import (
    IMAGE_COLUMNS, LABEL_COLUMNS, VALIDATION_NAMES, DataError, PreparedData, check_label_names, class_weights,
    patient_id_from_filename, patient_id_from_path, split_by_patient,
)

logger = logging.getLogger(__name__)
SHUFFLE_BUFFER = 1000
CHECK_FILMS = 16          # films of every split decoded before anything is written


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


def _columns(features, image_column=None, label_column=None) -> tuple[str, str, str | None]:
    names = list(features or {})
    for flag, col in (("--image_column", image_column), ("--label_column", label_column)):
        if col is not None and col not in names:
            raise DataError(f"{flag} '{col}' is not a column of the dataset; it has {names}")
    img = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    lab = label_column or next((c for c in LABEL_COLUMNS if c in names), None)
    if img is None or lab is None:
        raise DataError(f"dataset needs an image column and a label column; it has {names} "
                        "(--image_column / --label_column name them)")
    return img, lab, "patient_id" if "patient_id" in names else None


def film_patient(item) -> str:
    """The patient of a streamed film without a patient column: from its path as for a local
    folder (Kermany names, CheXpert ``patient<N>`` folders), else the film itself (its path, or
    a hash of its bytes: the same in every DataLoader worker and every pass)."""
    path = (item or {}).get("path") or ""
    if path:
        return patient_id_from_filename(path) or patient_id_from_path(path) or f"film-{path}"
    return "film-" + hashlib.sha1((item or {}).get("bytes") or b"").hexdigest()[:20]


def _first_pass(data_args, split: str, label_col: str, patient_col: str | None, img_col: str):
    """(labels, patients) of one split, reading only those columns (and the image column, for its
    paths, when there is no patient column)."""
    from datasets import Image as ImageFeature

    cols = [label_col] + ([patient_col] if patient_col else [img_col])
    try:
        ds = _load(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision,
                   columns=cols)[split]
    except DataError:   # not a parquet builder: the full stream, other columns dropped after reading
        ds = _load(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision)[split]
        ds = ds.select_columns(cols)
    if not patient_col:
        ds = ds.cast_column(img_col, ImageFeature(decode=False))
    labels, patients = [], []
    for batch in ds.iter(batch_size=4096):
        labels.extend(batch[label_col])
        patients.extend(batch[patient_col] if patient_col else [film_patient(x) for x in batch[img_col]])
    return labels, [str(p) for p in patients]


class _Table:
    """What split_by_patient reads: ``t["label"]``, ``t["patient_id"]``, ``t.select(idx)``."""

    def __init__(self, labels, patients):
        self.cols = {"label": np.asarray(labels), "patient_id": np.asarray(patients)}

    def __getitem__(self, k):
        return self.cols[k]

    def select(self, idx):
        return _Table(self.cols["label"][idx], self.cols["patient_id"][idx])


def _is_list(feature) -> bool:
    return type(feature).__name__ in ("List", "Sequence", "LargeList") or isinstance(feature, list)


def prepare_streaming(data_args, seed: int = 42, need_test: bool = False,
                      shuffle_buffer: int | None = None) -> PreparedData:
    """Streamed train/validation[/test] splits and their counts (see the module docstring)."""
    from datasets import ClassLabel, Image as ImageFeature

    from cxr.operating_point import positive_class_id

    if shuffle_buffer is None:
        shuffle_buffer = int(getattr(data_args, "streaming_shuffle_buffer", SHUFFLE_BUFFER) or SHUFFLE_BUFFER)
    ds = _load(data_args.dataset_name, data_args.dataset_config_name, data_args.dataset_revision)
    if data_args.train_split not in ds:
        raise DataError(f"no '{data_args.train_split}' split in {data_args.dataset_name}; it has {list(ds)}")
    train = ds[data_args.train_split]
    img_col, label_col, patient_col = _columns(train.features, getattr(data_args, "image_column", None),
                                               getattr(data_args, "label_column", None))
    feature = train.features[label_col]
    if _is_list(feature) or isinstance(getattr(feature, "feature", None), ClassLabel):
        raise DataError(f"the label column '{label_col}' of {data_args.dataset_name} holds lists of findings "
                        "(multi-label): streaming multi-label data is not supported yet; train it without "
                        "--streaming (a local copy)")
    if not patient_col:
        logger.warning("streaming: no patient_id column; patients come from the films' paths (Kermany names, "
                       "CheXpert patient folders) or each film is its own patient; the first pass reads the image "
                       "column too (bytes read, not decoded). A patient_id column makes it cheap and exact.")

    def read(split):
        return _first_pass(data_args, split, label_col, patient_col, img_col)

    labels, patients = read(data_args.train_split)
    if not labels:
        raise DataError(f"the '{data_args.train_split}' split of {data_args.dataset_name} is empty")
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        names = sorted({str(v) for v in labels})
    lookup = {n: i for i, n in enumerate(names)}

    def encode(values, split):
        if isinstance(feature, ClassLabel):
            return np.asarray(values, dtype=np.int64)
        unknown = sorted({str(v) for v in values} - set(names))
        if unknown:
            raise DataError(f"split '{split}' has labels {unknown} that the training split lacks ({names})")
        return np.asarray([lookup[str(v)] for v in values], dtype=np.int64)

    y = encode(labels, data_args.train_split)
    task = check_label_names(names, False, data_args)
    id2label = dict(enumerate(names))

    def standardise(stream, split):
        f = stream.features[label_col] if stream.features and label_col in stream.features else None
        if isinstance(feature, ClassLabel) and isinstance(f, ClassLabel) and list(f.names) != names:
            raise DataError(f"split '{split}' has labels {list(f.names)}, train has {names}")
        stream = stream.select_columns([c for c in (img_col, label_col, patient_col) if c])
        # undecoded BEFORE any rename: renaming a decoding Image column decodes and re-encodes every film,
        # and the re-encoded film has lost its path (datasets 5.2)
        stream = stream.cast_column(img_col, ImageFeature(decode=False))
        if img_col != "image":
            stream = stream.rename_column(img_col, "image")
        if label_col != "label":
            stream = stream.rename_column(label_col, "label")
        if not isinstance(feature, ClassLabel):
            stream = stream.map(lambda ex: {"label": lookup[str(ex["label"])]})
        if patient_col is None:
            stream = stream.map(lambda ex: {"patient_id": film_patient(ex["image"])})
        elif patient_col != "patient_id":
            stream = stream.rename_column(patient_col, "patient_id")
        return stream

    val_name = data_args.validation_split or next((v for v in VALIDATION_NAMES if v in ds), None)
    full = standardise(train, data_args.train_split)
    if val_name:
        if val_name not in ds:
            raise DataError(f"no '{val_name}' split; the dataset has {list(ds)}")
        val_labels, val_patients = read(val_name)
        encode(val_labels, val_name)
        shared = set(patients) & set(val_patients)
        if shared:
            raise DataError(f"a patient appears in both '{data_args.train_split}' and '{val_name}' "
                            f"({len(shared)} patients, e.g. {sorted(shared)[0]})")
        validation, kept, n_val = standardise(ds[val_name], val_name), np.ones(len(y), dtype=bool), len(val_labels)
    else:
        held = split_by_patient(_Table(y, patients), data_args.validation_fraction, seed)[1]
        val_set = set(held["patient_id"].tolist())
        kept = np.array([p not in val_set for p in patients])
        validation = full.filter(lambda ex: str(ex["patient_id"]) in val_set)
        full = full.filter(lambda ex: str(ex["patient_id"]) not in val_set)
        n_val = int((~kept).sum())
        logger.info("streaming: validation carved by patient: %d train / %d validation films (%d patients held out)",
                    int(kept.sum()), n_val, len(val_set))
    train_labels = y[kept]
    counts = np.bincount(train_labels, minlength=len(names))
    if (counts == 0).any():
        raise DataError(f"class(es) with no training images: {', '.join(names[i] for i in np.flatnonzero(counts == 0))}")
    full = full.shuffle(seed=seed, buffer_size=shuffle_buffer)
    n_train = int(kept.sum())
    if data_args.max_train_samples:
        full = full.take(int(data_args.max_train_samples))
        n_train = min(n_train, int(data_args.max_train_samples))
    if data_args.max_eval_samples:
        validation = validation.take(int(data_args.max_eval_samples))
        n_val = min(n_val, int(data_args.max_eval_samples))
    splits = {"train": full, "validation": validation}
    sizes = {"train": n_train, "validation": n_val}
    if need_test:
        if data_args.test_split not in ds:
            raise DataError(f"--do_predict needs a '{data_args.test_split}' split; the dataset has {list(ds)}")
        test_labels, _ = read(data_args.test_split)
        encode(test_labels, data_args.test_split)
        splits["test"], sizes["test"] = standardise(ds[data_args.test_split], data_args.test_split), len(test_labels)

    class _Labels:   # class_weights reads t["label"]
        def __getitem__(self, k):
            return train_labels

    return PreparedData(splits, id2label, positive_class_id(id2label, data_args.positive_label),
                        class_weights(_Labels(), len(names), data_args), task=task, counts=sizes)


def check_stream_start(splits: dict, n: int = CHECK_FILMS) -> None:
    """Decode the first ``n`` films of every streamed split (what can be checked before anything is
    written: the image column holds films this loader reads); an unreadable one is a DataError."""
    from cxr.imaging import ImageLoadError, load_image

    for split, stream in splits.items():
        seen = 0
        for i, ex in enumerate(islice(stream.select_columns(["image"]), n)):
            item = ex["image"]
            try:
                load_image(item.get("bytes") or item.get("path"), isolate=False)
            except ImageLoadError as e:
                name = Path(str(item.get("path") or f"{split}[{i}]")).name
                raise DataError(f"unreadable image in the '{split}' stream: {name}: {e}") from None
            seen += 1
        if not seen:
            raise DataError(f"the '{split}' stream holds no films")


def sample_stream(stream, n: int) -> tuple[list, list]:
    """(image dicts, labels) of the first ``n`` films of a stream (the training stream is shuffled:
    shard order and a buffer), undecoded: what the OOD fit reads from a streamed run."""
    images, labels = [], []
    for ex in islice(stream.select_columns(["image", "label"]), n):
        images.append(ex["image"])
        labels.append(int(ex["label"]))
    return images, labels


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
