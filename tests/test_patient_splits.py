"""The experiments cut their patient-grouped splits with the library's ``split_by_patient`` and
get exactly the splits their former hand-written StratifiedGroupKFold code gave (the reference
below), so the committed hold-out manifest (docs/levers/holdout_patients.json) and the
low-data study's folders are unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from cxr_train.data import patient_id_from_filename

ROOT = Path(__file__).resolve().parent.parent


def _reference_carve(files, fraction, seed) -> set[str]:
    """experiments/holdout.py's carve() before it called split_by_patient."""
    labels = np.array([f.parent.name for f in files])
    groups = np.array([patient_id_from_filename(f.name) or f.stem for f in files])
    sgkf = StratifiedGroupKFold(n_splits=int(round(1 / fraction)), shuffle=True, random_state=seed)
    _, held = next(sgkf.split(np.zeros(len(files)), labels, groups))
    return set(groups[held].tolist())


def _kermany_like_names(seed: int, n_normal: int = 120, n_pneumonia: int = 280) -> list[Path]:
    """Kermany-style file names, uneven films per patient (1-6), classes 30/70 like the real
    training split, a few names no patient rule parses (one group per film)."""
    rng = np.random.default_rng(seed)
    files = []
    for p in range(n_normal):
        prefix = "NORMAL2-IM-" if p % 5 == 0 else "IM-"
        files += [Path("data/train/NORMAL") / f"{prefix}{p:04d}-{k + 1:04d}.jpeg" for k in range(rng.integers(1, 4))]
    for p in range(n_pneumonia):
        kind = "virus" if p % 3 == 0 else "bacteria"
        files += [Path("data/train/PNEUMONIA") / f"person{p}_{kind}_{k}.jpeg" for k in range(rng.integers(1, 7))]
    files += [Path("data/train/PNEUMONIA") / f"scan_{i}.jpeg" for i in range(7)]
    return sorted(files)


@pytest.mark.parametrize("seed, fraction", [(2026, 0.15), (0, 0.15), (7, 0.2), (3, 0.5)])
def test_holdout_carve_is_the_former_split(seed, fraction):
    from experiments.holdout import carve

    files = _kermany_like_names(seed)
    held = carve(files, fraction, seed)
    assert held == _reference_carve(files, fraction, seed)
    assert held == carve(files[::-1], fraction, seed)          # the film order does not matter
    patients = {patient_id_from_filename(f.name) or f.stem for f in files}
    assert 0 < len(held) < len(patients)
    normal = {patient_id_from_filename(f.name) for f in files if f.parent.name == "NORMAL"}
    assert held & normal and held - normal                     # stratified: both classes held out


def test_holdout_main_writes_a_manifest_then_reads_it(tmp_path):
    """No manifest: carved and written; with it, the same patients are laid out again (the
    committed manifest is what every study scores, whatever the data folder's order)."""
    from experiments.holdout import main, patient_of

    data = tmp_path / "data"
    for f in _kermany_like_names(1, 30, 50):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    manifest = tmp_path / "m.json"
    main(["--data", str(data), "--out", str(tmp_path / "a"), "--manifest", str(manifest), "--seed", "5"])
    written = json.loads(manifest.read_text())
    files = sorted(data.rglob("*.jpeg"))
    assert written == {"fraction": 0.15, "seed": 5, "patients": sorted(_reference_carve(files, 0.15, 5))}
    main(["--data", str(data), "--out", str(tmp_path / "b"), "--manifest", str(manifest), "--seed", "6"])
    for out in ("a", "b"):
        held = {patient_of(p) for p in (tmp_path / out / "holdout").rglob("*.jpeg")}
        pool = {patient_of(p) for p in (tmp_path / out / "pool" / "train").rglob("*.jpeg")}
        assert held == set(written["patients"]) and not held & pool
        assert len(list((tmp_path / out).rglob("*.jpeg"))) == len(files)


def test_committed_holdout_manifest_is_reproduced_from_a_stand_in():
    """carve() depends only on the films-per-patient-and-label table (StratifiedGroupKFold
    aggregates by patient); films named from the real training split's table
    (tests/pins/kermany_train_patients.json) give the committed manifest exactly."""
    from experiments.holdout import carve

    table = json.loads((ROOT / "tests/pins/kermany_train_patients.json").read_text())["films"]
    files = []
    for label, patients in table.items():
        for pid, n in patients.items():
            name = (lambda k: f"{pid}-{k + 1:04d}.jpeg") if label == "NORMAL" else (lambda k: f"{pid}_bacteria_{k}.jpeg")
            files += [Path("train") / label / name(k) for k in range(n)]
    assert len(files) == 5216
    manifest = json.loads((ROOT / "docs/levers/holdout_patients.json").read_text())
    held = carve(files, manifest["fraction"], manifest["seed"])
    assert sorted(held) == manifest["patients"] and len(held) == 406
    assert held == _reference_carve(files, manifest["fraction"], manifest["seed"])


def _reference_study_split(labels, groups, seed, val_fraction):
    """experiments/low_data_study.py's build_split_folders() split before split_by_patient."""
    halves = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    a_idx, b_idx = next(halves.split(np.zeros(len(labels)), labels, groups))
    k = max(2, int(round(1 / val_fraction)))
    inner = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tr, va = next(inner.split(np.zeros(len(b_idx)), labels[b_idx], groups[b_idx]))
    return {"pretrain/train": a_idx, "study/train": b_idx[tr], "study/validation": b_idx[va]}


@pytest.mark.parametrize("seed", [42, 3])
def test_low_data_study_folders_are_the_former_split(tmp_path, seed):
    from cxr_train.data import add_patient_ids, load_raw_dataset
    from cxr_train.synthetic import write_kermany_folder
    from experiments.low_data_study import build_split_folders

    data = write_kermany_folder(tmp_path / "src", n_patients=16, per_patient=2, size=16)
    for extra in range(5):      # uneven films per patient
        os.link(next((data / "train" / "PNEUMONIA").glob(f"person{extra}_*")),
                data / "train" / "PNEUMONIA" / f"person{extra}_virus_9.jpeg")
    pre, study = build_split_folders(data, tmp_path / "out", seed, 0.2)

    ds = add_patient_ids(load_raw_dataset(str(data)))["train"]
    ref = _reference_study_split(np.asarray(ds["label"]), np.asarray(ds["patient_id"]), seed, 0.2)
    names = [Path(x["path"]).name for x in ds["image"]]
    got = {"pretrain/train": pre / "train", "study/train": study / "train", "study/validation": study / "validation"}
    for split, folder in got.items():
        assert sorted(p.name for p in folder.rglob("*.jpeg")) == sorted(names[i] for i in ref[split]), split
