"""Streaming: a local parquet dataset (a few thousand small films with a patient column) loaded
with ``streaming=True`` trains through the same uint8 batch path as the film store.
(Marked slow: each ``load_dataset(streaming=True)`` resolves the files for a few seconds.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from cxr_train.data import DataError
from tests.helpers import make_xray

N_PATIENTS, PER_PATIENT, SIZE = 1000, 2, 32     # 2,000 films


@pytest.fixture(scope="module")
def parquet_folder(tmp_path_factory):
    from datasets import ClassLabel, Dataset, Features, Image, Value

    images, labels, patients = [], [], []
    encoded = {}
    for p in range(N_PATIENTS):
        y = p % 2
        for k in range(PER_PATIENT):
            key = (y, (p * PER_PATIENT + k) % 16)
            if key not in encoded:   # 32 distinct PNGs, reused: the test is about the data path
                buf = io.BytesIO()
                make_xray(key[1], bool(y), SIZE).convert("RGB").save(buf, format="PNG")
                encoded[key] = buf.getvalue()
            images.append({"bytes": encoded[key], "path": f"p{p}_{k}.png"})
            labels.append(y)
            patients.append(f"patient{p}")
    ds = Dataset.from_dict({"image": images, "label": labels, "patient_id": patients},
                           features=Features({"image": Image(), "label": ClassLabel(names=["NORMAL", "PNEUMONIA"]),
                                              "patient_id": Value("string")}))
    root = tmp_path_factory.mktemp("parquet") / "cxr_parquet"
    (root / "data").mkdir(parents=True)
    for s in range(4):   # 4 shards: DataLoader workers each read their own
        ds.shard(4, s).to_parquet(str(root / "data" / f"train-{s:05d}-of-00004.parquet"))
    return root


def _args(folder, *extra):
    from cxr_train.config import parse_args

    return parse_args(["--model_name_or_path", "tiny-resnet-scratch", "--image_size", str(SIZE),
                       "--dataset_name", str(folder), "--output_dir", str(folder.parent / "out"),
                       "--max_steps", "4", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64",
                       "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "False",
                       "--logging_steps", "1", "--disable_tqdm", "True", "--report_to", "none", *extra])


@pytest.mark.slow
def test_streamed_splits_are_patient_disjoint(parquet_folder):
    from datasets import IterableDataset

    from cxr_train.streaming import prepare_streaming

    _, data_args, _ = _args(parquet_folder)
    data = prepare_streaming(data_args, seed=0)
    assert all(isinstance(d, IterableDataset) for d in data.splits.values())
    assert data.id2label == {0: "NORMAL", 1: "PNEUMONIA"} and data.positive_id == 1
    seen = {s: [ex["patient_id"] for ex in d.select_columns(["patient_id"])] for s, d in data.splits.items()}
    assert not set(seen["train"]) & set(seen["validation"])
    assert len(seen["train"]) + len(seen["validation"]) == N_PATIENTS * PER_PATIENT
    assert 0.05 < len(seen["validation"]) / (N_PATIENTS * PER_PATIENT) < 0.15   # validation_fraction 0.1
    assert data.class_weights == pytest.approx([1.0, 1.0], abs=0.1)


@pytest.mark.slow
def test_streamed_films_take_the_uint8_batch_path(parquet_folder, tmp_path):
    """A streamed film is the very uint8 the film store holds for it, batched by the same collator."""
    from cxr_train.batches import UInt8Collator
    from cxr_train.cache import CachedImages, FilmStore, build_pixel_spec
    from cxr_train.modeling import build_preset
    from cxr_train.streaming import decode_stream, prepare_streaming

    _, data_args, _ = _args(parquet_folder)
    spec = build_pixel_spec(build_preset("tiny-resnet-scratch", {0: "a", 1: "b"}, SIZE)[1])
    stream = prepare_streaming(data_args, seed=0).splits["validation"]
    loader = torch.utils.data.DataLoader(decode_stream(stream, spec), batch_size=8, collate_fn=UInt8Collator(),
                                         num_workers=2)
    batch = next(iter(loader))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (8, 3, SIZE, SIZE)
    first = next(iter(stream))
    store = FilmStore(tmp_path / "store", spec)
    cached = CachedImages(store, store.rows([first["image"]]), [first["label"]])[0]
    assert any(torch.equal(cached["pixel_values"], x) for x in batch["pixel_values"])


@pytest.mark.slow
def test_streaming_training_end_to_end(parquet_folder):
    import train_hf
    from cxr_train.streaming import prepare_streaming

    model_args, data_args, training_args = _args(parquet_folder, "--dataloader_num_workers", "2")
    data = prepare_streaming(data_args, seed=0)
    n_val = sum(1 for _ in data.splits["validation"].select_columns(["label"]))
    fitted = train_hf.train_one(model_args, data_args, training_args, data, predict=("validation",))
    logits, labels = fitted.logits["validation"]
    assert logits.shape == (n_val, 2) and np.isfinite(logits).all()
    assert sorted(set(labels.tolist())) == [0, 1]
    assert fitted.trainer.state.global_step == 4
    # the exported model is the plain HF model: it takes float pixel values (no hook is saved)
    fitted.trainer.save_model(str(parquet_folder.parent / "exported"))
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(parquet_folder.parent / "exported")
    assert not model._forward_pre_hooks


def test_streaming_errors_are_clear(tmp_path, parquet_folder):
    from cxr_train.streaming import prepare_streaming

    (tmp_path / "empty").mkdir()
    _, data_args, _ = _args(tmp_path / "empty")
    with pytest.raises(DataError, match="parquet"):
        prepare_streaming(data_args)
    _, data_args, _ = _args(parquet_folder, "--class_names", "A", "B")
    with pytest.raises(DataError, match="label names differ"):
        prepare_streaming(data_args)
