import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Image as ImageFeature

from cxr_train.config import DataArguments
from cxr_train.data import (
    DataError, ImageTransform, check_images, check_patient_disjoint, patient_id_from_filename, prepare_data,
)
from tests.helpers import write_kermany_folder


def args(path, **kw):
    return DataArguments(dataset_name=str(path), **kw)


@pytest.mark.parametrize("name,pid", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person12_virus_44.jpeg", "person12"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0629-0001-0002.jpeg", "NORMAL2-IM-0629"),
    ("IM-0629-0001-0002.jpeg", "IM-0629"),
    ("random.png", None),
])
def test_patient_id_from_kermany_names(name, pid):
    assert patient_id_from_filename(name) == pid


def test_split_is_patient_disjoint_and_stratified(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=30, per_patient=3, size=40)
    data = prepare_data(args(root, validation_fraction=0.2), seed=1)
    tr, va = data.splits["train"], data.splits["validation"]
    assert not set(tr["patient_id"]) & set(va["patient_id"])
    assert len(tr) + len(va) == 180
    assert 0.12 < len(va) / 180 < 0.28
    assert set(va["label"]) == {0, 1}                     # both classes in validation
    # every image of a patient lands in one split
    for pid in set(va["patient_id"]):
        assert va["patient_id"].count(pid) == 3
    check_patient_disjoint(data.splits)                   # does not raise
    assert data.id2label == {0: "NORMAL", 1: "PNEUMONIA"} and data.positive_id == 1
    assert data.class_weights == pytest.approx([1.0, 1.0], rel=0.3)


def test_check_patient_disjoint_catches_leak(tmp_path):
    from datasets import Dataset, DatasetDict

    leak = DatasetDict({"train": Dataset.from_dict({"patient_id": ["a", "b"]}),
                        "validation": Dataset.from_dict({"patient_id": ["b"]})})
    with pytest.raises(DataError, match="patient appears in both"):
        check_patient_disjoint(leak)


def test_existing_validation_split_used(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=4, per_patient=1, splits=("train", "validation"), size=40)
    data = prepare_data(args(root))
    assert len(data.splits["validation"]) == 8 and len(data.splits["train"]) == 8


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        prepare_data(args(tmp_path / "nope"))


def test_folder_without_images(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "train" / "NORMAL" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        prepare_data(args(tmp_path))


def test_one_class_only(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=4, size=40)
    shutil.rmtree(root / "train" / "PNEUMONIA")
    with pytest.raises(DataError, match="one class"):
        prepare_data(args(root))


def test_unknown_label_named(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=4, size=40)
    with pytest.raises(DataError, match="unknown label.*PNEUMONIA"):
        prepare_data(args(root, class_names=["NORMAL", "COVID"]))
    with pytest.raises(DataError, match="positive_label"):
        prepare_data(args(root, positive_label="COVID"))


def test_missing_test_split_for_predict(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=6, size=40)
    with pytest.raises(DataError, match="--do_predict needs a 'test' split"):
        prepare_data(args(root), need_test=True)


def test_unreadable_images_reported_by_file(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=6, size=40)
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"this is not an image")
    good = root / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg"
    (root / "train" / "PNEUMONIA" / "person9999_virus_1.jpeg").write_bytes(good.read_bytes()[:300])
    data = prepare_data(args(root, validation_fraction=0.3))
    with pytest.raises(DataError) as e:
        check_images(data.splits)
    msg = str(e.value)
    assert "2 unreadable image(s)" in msg
    assert "IM-9999-0001.jpeg" in msg and "person9999_virus_1.jpeg" in msg
    assert str(tmp_path) not in msg                       # names, not full paths


def test_low_data_subsampling(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=20, per_patient=2, size=40)
    data = prepare_data(args(root, max_samples_per_class=5, validation_fraction=0.2))
    assert np.bincount(data.splits["train"]["label"]).tolist() == [5, 5]


def test_class_weights_inverse_frequency(tmp_path):
    root = write_kermany_folder(tmp_path, n_patients=12, per_patient=1, size=40)
    for f in sorted((root / "train" / "NORMAL").iterdir())[:8]:
        f.unlink()
    data = prepare_data(args(root, validation_split=None, validation_fraction=0.25))
    counts = np.bincount(data.splits["train"]["label"])
    expected = counts.sum() / (2 * counts)
    assert data.class_weights == pytest.approx(expected.tolist())
    data = prepare_data(args(root, class_weights=[1.0, 3.0]))
    assert data.class_weights == [1.0, 3.0]


def test_transform_matches_processor_exactly(tmp_path):
    """Eval transform == load_image + the saved image processor (one preprocessing)."""
    import torch

    from cxr.imaging import load_image
    from cxr_train.modeling import build_preset

    root = write_kermany_folder(tmp_path, n_patients=3, per_patient=1, size=80)
    _, processor = build_preset("tiny-resnet-scratch", {0: "NORMAL", 1: "PNEUMONIA"})
    data = prepare_data(args(root, validation_fraction=0.34))
    ds = data.splits["train"]
    ds.set_transform(ImageTransform(processor, augment=False))
    item = ds[0]
    raw = ds.with_format(None)
    ds.reset_format()
    path = raw[0]["image"]["path"]
    ref = processor(images=[load_image(path)], return_tensors="pt")["pixel_values"][0]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert torch.equal(item["pixel_values"], ref)
    aug = ImageTransform(processor, augment=True)({"image": [raw[0]["image"]], "label": [0]})
    assert aug["pixel_values"].shape == (1, 3, 64, 64)


def test_hub_dataset_id_offline_is_a_clear_error():
    # HF_DATASETS_OFFLINE=1 (conftest): the Hub code path runs and fails with a named dataset
    with pytest.raises(DataError, match="cannot load dataset 'someone/no-such-cxr-dataset'"):
        prepare_data(DataArguments(dataset_name="someone/no-such-cxr-dataset"))


def test_cv_folds_share_no_patient(tmp_path):
    """Every pair of CV folds is checked for shared patients (several films per patient)."""
    from cxr_train.data import cv_folds, fold_overlaps

    root = write_kermany_folder(tmp_path, n_patients=25, per_patient=3, size=40)
    train = prepare_data(args(root), seed=3, carve_validation=False).splits["train"]
    held = cv_folds(train, 5, seed=3)
    fold = np.full(len(train), -1)
    for k, idx in enumerate(held):
        fold[idx] = k
    assert (fold >= 0).all() and sorted(np.concatenate(held).tolist()) == list(range(len(train)))
    assert fold_overlaps(train["patient_id"], fold) == []
    leaked = fold.copy()
    first = np.flatnonzero(fold == 0)[0]                       # move one film of a fold-0 patient to fold 1
    leaked[first] = 1
    assert fold_overlaps(train["patient_id"], leaked) == [(0, 1, 1)]


def test_shipped_out_of_fold_scores_share_no_patient_between_folds():
    """The previous default recipe's out-of-fold scores (5-fold CV of 4,470 pool films, kept in
    docs/levers/previous_default/): no patient in two folds, every fold non-empty."""
    import json

    from pathlib import Path

    from cxr_train.data import fold_overlaps

    root = Path(__file__).resolve().parent.parent
    oof = json.loads((root / "docs" / "levers" / "previous_default" / "recipe_oof_scores.json").read_text())
    assert len(oof["patients"]) == len(oof["fold"]) == len(oof["scores"]) > 1000
    assert set(oof["fold"]) == set(range(5))
    assert fold_overlaps(oof["patients"], oof["fold"]) == []


def _films(prepared):
    """Every split's files, in order, with the facts the run reads off the preparation."""
    return ({name: [x["path"] for x in split.cast_column("image", ImageFeature(decode=False))["image"]]
             for name, split in prepared.splits.items()},
            prepared.id2label, prepared.positive_id, prepared.class_weights, prepared.task)


@pytest.fixture(scope="module")
def cv_folders(tmp_path_factory):
    """Two tiny Kermany folders, read by every combination below: without and with a 'val' split."""
    return {own: write_kermany_folder(tmp_path_factory.mktemp("own" if own else "carved"), n_patients=10,
                                      per_patient=2, size=32,
                                      splits=("train", "val", "test") if own else ("train", "test"))
            for own in (False, True)}


@pytest.mark.parametrize("own_validation", [False, True], ids=["carved", "own-validation"])
@pytest.mark.parametrize("caps", [{}, {"max_train_samples": 20, "max_eval_samples": 6},
                                  {"max_samples_per_class": 7}], ids=["no-caps", "max-train-eval", "per-class"])
def test_cv_run_prepares_once_with_the_same_splits(cv_folders, own_validation, caps):
    """A --cv_folds run's pool and shipped-model splits come from one preparation (prepare_cv_data)
    and are the very files, in the same order, of the two prepare_data calls a run made before:
    with and without the dataset's own validation split, with and without sample caps."""
    from cxr_train.data import prepare_cv_data

    root = cv_folders[own_validation]
    a = args(root, validation_fraction=0.25, **caps)
    pool, shipped = prepare_cv_data(a, seed=5, need_test=True)
    assert _films(pool) == _films(prepare_data(a, seed=5, need_test=True, carve_validation=False))
    assert _films(shipped) == _films(prepare_data(a, seed=5, need_test=True))
    assert set(pool.splits) == {"train", "test"} and set(shipped.splits) == {"train", "validation", "test"}
    files = _films(shipped)[0]
    if own_validation:     # the dataset's own validation split, the pool's train split (same caps)
        assert all("/val/" in f for f in files["validation"]) and files["train"] == _films(pool)[0]["train"]
    else:                  # carved out of the full train split by patient, then capped
        assert not {patient_id_from_filename(f.rsplit("/", 1)[1]) for f in files["train"]} & \
            {patient_id_from_filename(f.rsplit("/", 1)[1]) for f in files["validation"]}
    if caps:
        assert len(files["train"]) < len(_films(prepare_data(args(root, validation_fraction=0.25), seed=5))[0]["train"])
