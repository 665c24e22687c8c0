"""Streaming: a local parquet dataset (a few thousand small films with a patient column) loaded
with ``streaming=True`` trains through the same uint8 batch path as the film store, and
``cxr-train --streaming true`` writes a complete model folder from it.
(Marked slow: each ``load_dataset(streaming=True)`` resolves the files for a few seconds.)"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch

from cxr_train.data import DataError
from tests.helpers import make_xray

import train_hf

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
    # the exported model is the plain HF model: it takes its saved processor's float pixel values
    # (the uint8 films of training went through a hook, which is not saved)
    exported = parquet_folder.parent / "exported"
    fitted.trainer.save_model(str(exported))
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(exported).eval()
    film = make_xray(3, True, size=64).convert("RGB")
    pixels = AutoImageProcessor.from_pretrained(exported)(images=[film], return_tensors="pt")["pixel_values"]
    assert pixels.dtype == torch.float32
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_streaming_errors_are_clear(tmp_path, parquet_folder):
    from cxr_train.streaming import prepare_streaming

    (tmp_path / "empty").mkdir()
    _, data_args, _ = _args(tmp_path / "empty")
    with pytest.raises(DataError, match="parquet"):
        prepare_streaming(data_args)
    _, data_args, _ = _args(parquet_folder, "--class_names", "A", "B")
    with pytest.raises(DataError, match="label names differ"):
        prepare_streaming(data_args)


# ------------------------------------------------------------------ cxr-train --streaming true

THREE = ["BACTERIAL", "NORMAL", "VIRAL"]      # string labels: the classes are their sorted names


def _encoded(seed: int, sick: bool) -> bytes:
    buf = io.BytesIO()
    make_xray(seed, sick, SIZE).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(ds, root, shards=2):
    (root / "data").mkdir(parents=True)
    for s in range(shards):
        ds.shard(shards, s).to_parquet(str(root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet"))
    return root


@pytest.fixture(scope="module")
def parquet3(tmp_path_factory):
    """1,200 films, three classes as strings, NO patient column: Kermany-style paths carry the patient
    (person<N>_bacteria_<K>, person<N>_virus_<K>, IM-<N>-<K>), two films per patient."""
    from datasets import Dataset, Features, Image, Value

    encoded = {(c, k): _encoded(k, c != "NORMAL") for c in THREE for k in range(8)}
    images, labels = [], []
    for p in range(600):
        c = THREE[p % 3]
        for k in range(2):
            name = {"BACTERIAL": f"person{p}_bacteria_{k}.jpeg", "VIRAL": f"person{p}_virus_{k}.jpeg",
                    "NORMAL": f"IM-{p:04d}-{k:04d}.jpeg"}[c]
            images.append({"bytes": encoded[(c, (p + k) % 8)], "path": name})
            labels.append(c)
    ds = Dataset.from_dict({"film": images, "diagnosis": labels},
                           features=Features({"film": Image(), "diagnosis": Value("string")}))
    return _write_parquet(ds, tmp_path_factory.mktemp("parquet3") / "k3_parquet")


def _cli(folder, out, *extra):
    return ["--model_name_or_path", "tiny-resnet-scratch", "--image_size", str(SIZE), "--dataset_name", str(folder),
            "--output_dir", str(out), "--streaming", "true", "--per_device_train_batch_size", "16",
            "--per_device_eval_batch_size", "64", "--save_strategy", "no", "--load_best_model_at_end", "False",
            "--logging_steps", "1", "--disable_tqdm", "True", "--report_to", "none", "--ood_max_train", "96", *extra]


@pytest.mark.slow
def test_cxr_train_streaming_writes_a_complete_folder(parquet_folder, tmp_path, capsys):
    """Binary, patient column: 3 steps with 2 DataLoader workers; the folder is what a loaded run
    writes (weights, processor, operating point, card, OOD statistics) and serves in the Predictor and
    pipeline(); counts are the first pass's."""
    from PIL import Image
    from transformers import pipeline

    from cxr.inference import Predictor
    from cxr_train.streaming import prepare_streaming

    out = tmp_path / "streamed"
    assert train_hf.main(_cli(parquet_folder, out, "--max_steps", "3", "--eval_strategy", "no",
                              "--dataloader_num_workers", "2", "--do_predict", "False")) == 0
    summary = capsys.readouterr().out
    _, data_args, _ = _args(parquet_folder)
    counts = prepare_streaming(data_args, seed=42).counts          # the run's seed: the same split
    n_train, n_val = counts["train"], counts["validation"]
    assert n_train + n_val == N_PATIENTS * PER_PATIENT and 0.05 < n_val / (n_train + n_val) < 0.15
    assert f"streamed: {n_train:,} training and {n_val:,} validation films" in summary
    for f in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "run_config.yaml",
              "eval_scores.json", "ood.safetensors", "ood_fit.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    cfg = json.loads((out / "config.json").read_text())
    op = cfg["cxr_operating_point"]
    assert op["fitted_on"] == "the validation split" and op["n_fit"] == n_val      # every validation film scored
    assert len(json.loads((out / "eval_scores.json").read_text())["labels"]) == n_val
    card = (out / "README.md").read_text()
    assert f"Training / validation images: {n_train} / {n_val}" in card
    assert "Not a medical device" in card or "not a medical device" in card
    run_cfg = (out / "run_config.yaml").read_text()
    assert "streaming: true" in run_cfg and "max_steps: 3" in run_cfg
    ood = json.loads((out / "ood_fit.json").read_text())
    assert ood["n_train"] == 96 and ood["n_val"] == 96                   # a bounded sample of each stream
    assert "validation stream" in ood["validation"]
    # served: the Predictor (operating point, OOD) and pipeline() (softmax of the model's logits)
    film = tmp_path / "film.png"
    make_xray(3, True, SIZE).convert("RGB").save(film)
    pred = Predictor.from_pretrained(out, precision="fp32").predict(Image.open(film))
    assert set(pred.probabilities) == {"NORMAL", "PNEUMONIA"} and 0.0 <= pred.positive_probability <= 1.0
    assert pred.ood_score is not None                                     # the streamed fit is loaded and used
    assert pred.label in ("NORMAL", "PNEUMONIA") or pred.out_of_distribution
    res = pipeline("image-classification", model=str(out), top_k=None)(str(film))
    assert {r["label"] for r in res} == {"NORMAL", "PNEUMONIA"} and sum(r["score"] for r in res) == pytest.approx(1)


@pytest.mark.slow
def test_cxr_train_streaming_three_classes_patients_from_paths(parquet3, tmp_path, caplog):
    """Three classes as strings, no patient column (patients from the Kermany names), named columns,
    no --max_steps: the step count is num_train_epochs over the first pass's count; evaluation each
    epoch on the validation stream; --do_predict without a test split is a clear error."""
    from cxr.inference import Predictor
    from cxr_train.config import parse_args
    from cxr_train.data import patient_id_from_filename
    from cxr_train.streaming import prepare_streaming

    extra = ("--image_column", "film", "--label_column", "diagnosis")
    _, data_args, _ = parse_args(["--dataset_name", str(parquet3), "--streaming", "true", *extra])
    data = prepare_streaming(data_args, seed=42)
    assert data.task == "multiclass" and list(data.id2label.values()) == THREE
    seen = {s: {patient_id_from_filename(ex["image"]["path"]) for ex in d} for s, d in data.splits.items()}
    assert seen["train"] and seen["validation"] and not seen["train"] & seen["validation"]   # grouped by patient
    assert sum(data.counts.values()) == 1200

    out = tmp_path / "k3"
    caplog.set_level(logging.INFO)
    assert train_hf.main(_cli(parquet3, out, *extra, "--num_train_epochs", "0.02",
                              "--eval_strategy", "steps", "--eval_steps", "1")) == 0
    n_train = data.counts["train"]
    expected = int(np.ceil(0.02 * np.ceil(n_train / 16)))
    assert f"streaming: max_steps {expected} " in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == expected
    cfg = json.loads((out / "config.json").read_text())
    assert [cfg["id2label"][str(i)] for i in range(3)] == THREE and cfg["problem_type"] == "single_label_classification"
    assert cfg["cxr_operating_point"]["task"] == "multiclass"
    ev = json.loads((out / "eval_results.json").read_text())
    assert ev["eval_n_samples"] == data.counts["validation"] and set(ev["eval_per_class"]) == set(THREE)
    film = tmp_path / "f.png"
    make_xray(1, True, SIZE).convert("RGB").save(film)
    pred = Predictor.from_pretrained(out, precision="fp32").predict(film)
    assert pred.task == "multiclass" and [f["label"] for f in pred.findings] == THREE

    assert train_hf.main(_cli(parquet3, tmp_path / "p", *extra, "--max_steps", "1", "--do_predict", "True")) == 2
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_cxr_train_streaming_bad_inputs_write_nothing(parquet_folder, kermany_folder, tmp_path, capsys):
    from datasets import Dataset, Features, Image, List, Value

    def fails(data, *extra, message):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert train_hf.main(_cli(data, out, "--max_steps", "1", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not out.exists()

    fails(parquet_folder, "--cv_folds", "2", message="--streaming true cannot be combined with --cv_folds 2")
    fails(kermany_folder, message="streaming needs parquet files")              # an image folder: not a stream
    fails(parquet_folder, "--label_column", "nope", message="--label_column 'nope' is not a column")
    fails(parquet_folder, "--class_names", "A", "B", message="label names differ")
    # multi-label: not supported yet, said before anything is written
    ml = Dataset.from_dict({"image": [{"bytes": _encoded(i, True), "path": f"{i}.png"} for i in range(8)],
                            "label": [[0], [1], [0, 1], []] * 2},
                           features=Features({"image": Image(), "label": List(Value("string"))}))
    fails(_write_parquet(ml, tmp_path / "ml_src", shards=1), message="multi-label): streaming multi-label data is "
                                                                      "not supported yet")
    # an unreadable film among the first of a stream: named, nothing written
    bad = Dataset.from_dict({"image": [{"bytes": b"not an image", "path": f"film{i}.png"} for i in range(40)],
                             "label": [i % 2 for i in range(40)], "patient_id": [f"p{i}" for i in range(40)]},
                            features=Features({"image": Image(), "label": Value("int64"),
                                               "patient_id": Value("string")}))
    fails(_write_parquet(bad, tmp_path / "bad_src", shards=1), message="unreadable image in the 'train' stream: film")


@pytest.mark.slow
def test_cv_folds_report_progress(kermany_folder, tmp_path, caplog):
    """Issue #27 item 6: every CV fold says when it starts (its film counts) and when it is done (time
    so far, time left)."""
    from tests.helpers import base_args

    caplog.set_level(logging.INFO, logger="train_hf")
    out = tmp_path / "cv"
    assert train_hf.main(base_args(kermany_folder, out, "--cv_folds", "2", "--save_strategy", "no",
                                   "--load_best_model_at_end", "False", "--ood_fit", "false", "--max_steps", "1")) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "train_hf" and "fold" in r.getMessage()]
    n_pool = sum(1 for _ in (kermany_folder / "train").glob("*/*"))
    assert lines[0].startswith(f"cross-validation: 2 folds of {n_pool:,} films")
    starts = [m for m in lines if m.startswith("CV fold") and "training on" in m]
    done = [m for m in lines if m.startswith("CV fold") and " done " in m]
    assert [m.split(":")[0] for m in starts] == ["CV fold 1/2", "CV fold 2/2"]
    assert "left)" in done[0] and "next: the model to ship" in done[1]
    oof = json.loads((out / "oof_scores.json").read_text())
    for i, m in enumerate(starts):   # the held-out count of each start line is that fold's size
        assert f"scoring {oof['fold'].count(i):,} held-out films" in m


def test_fold_progress_lines():
    assert train_hf.fold_progress(0, 5, {"train": 3600, "validation": 400, "held_out": 1000}) == \
        "CV fold 1/5: training on 3,600 films, validation 400, scoring 1,000 held-out films"
    assert train_hf.fold_progress(1, 5, done_seconds=120.0) == \
        "CV fold 2/5 done (2 of 5 folds, 2.0 min so far, about 3.0 min left)"
    assert train_hf.fold_progress(4, 5, done_seconds=30.0).endswith("30 s so far); next: the model to ship, "
                                                                    "trained on all the data")
