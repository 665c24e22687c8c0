"""Synthetic chest-film-like images for tests, smoke runs and benchmarks (no real data needed).
Not X-rays: a dark 'lung' pair on a lighter body; 'positives' get a bright blob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_xray(seed: int, positive: bool, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 150, np.float32)
    img[size // 6: -size // 6, size // 8: size // 2 - 2] = 50
    img[size // 6: -size // 6, size // 2 + 2: -size // 8] = 50
    if positive:
        y, x = rng.integers(size // 4, 3 * size // 4, 2)
        yy, xx = np.mgrid[:size, :size]
        img += 120 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (size / 8) ** 2))
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")


def write_kermany_folder(root: Path, n_patients: int = 12, per_patient: int = 2, splits=("train",),
                         size: int = 64) -> Path:
    """<split>/<LABEL>/<file>.jpeg with Kermany-style names: several images per patient;
    test-split patients are distinct from the others."""
    seed = 0
    for split in splits:
        for label in ("NORMAL", "PNEUMONIA"):
            d = Path(root) / split / label
            d.mkdir(parents=True, exist_ok=True)
            for p in range(n_patients):
                pid = p + (1000 if split == "test" else 0)
                for k in range(per_patient):
                    seed += 1
                    name = (f"IM-{pid:04d}-{k + 1:04d}.jpeg" if label == "NORMAL"
                            else f"person{pid}_bacteria_{k + 1}.jpeg")
                    make_xray(seed, label == "PNEUMONIA", size).convert("RGB").save(d / name, quality=95)
    return Path(root)


# ---------------------------------------------------------------- label sets (issue #29)

def make_film(seed: int, findings=(), size: int = 64) -> Image.Image:
    """A synthetic film with a pattern per finding index (0: a bright blob on the right lung,
    1: a bright band at the bases, 2: a dark ring on the left, ...): learnable, not anatomy."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 150, np.float32)
    img[size // 6: -size // 6, size // 8: size // 2 - 2] = 50
    img[size // 6: -size // 6, size // 2 + 2: -size // 8] = 50
    yy, xx = np.mgrid[:size, :size]
    for f in findings:
        if f % 3 == 0:
            y, x = rng.integers(size // 4, 3 * size // 4), rng.integers(size // 2, 3 * size // 4)
            img += 110 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (size / 9) ** 2))
        elif f % 3 == 1:
            img[int(size * 0.7): int(size * 0.8), size // 8: -size // 8] += 90
        else:
            r = np.hypot(yy - size / 2, xx - size / 3)
            img -= 40 * ((r > size / 8) & (r < size / 6))
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")


def write_kermany3_folder(root: Path, n_patients: int = 8, per_patient: int = 2, splits=("train",),
                          size: int = 64) -> Path:
    """Kermany's layout <split>/{NORMAL,PNEUMONIA}/<file> where the pneumonia films are
    ``person<N>_bacteria_<k>.jpeg`` and ``person<N>_virus_<k>.jpeg`` (the three-class task
    in the file names); test-split patients are distinct."""
    seed = 10_000
    for split in splits:
        for kind, folder, finding in (("normal", "NORMAL", ()), ("bacteria", "PNEUMONIA", (0,)),
                                      ("virus", "PNEUMONIA", (1,))):
            d = Path(root) / split / folder
            d.mkdir(parents=True, exist_ok=True)
            for p in range(n_patients):
                pid = p + (1000 if split == "test" else 0) + (500 if kind == "virus" else 0)
                for k in range(per_patient):
                    seed += 1
                    name = (f"IM-{pid:04d}-{k + 1:04d}.jpeg" if kind == "normal"
                            else f"person{pid}_{kind}_{seed}.jpeg")
                    make_film(seed, finding, size).convert("RGB").save(d / name, quality=95)
    return Path(root)


MULTILABEL_FINDINGS = ("Atelectasis", "Edema", "Effusion", "No Finding")


def multilabel_rows(n: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    """(patient number, finding indices) per film: findings 0-2 drawn independently (about one film
    in three each), "No Finding" (index 3) exactly when none is present; two films per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        present = [k for k in range(3) if rng.random() < 0.35]
        rows.append((i // 2, present or [3]))
    return rows


def write_multilabel_parquet(root: Path, n_train: int = 48, n_test: int = 16, size: int = 64) -> Path:
    """A Hub-style local dataset: ``<root>/data/{train,test}-00000-of-00001.parquet`` with an Image
    column ``image``, a ``Sequence(ClassLabel)`` column ``labels`` and a ``patient_id`` column."""
    from datasets import ClassLabel, Dataset, Features, Image as ImageFeature, List, Value

    features = Features({"image": ImageFeature(), "labels": List(ClassLabel(names=list(MULTILABEL_FINDINGS))),
                         "patient_id": Value("string")})
    (Path(root) / "data").mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 10_000)):
        rows = multilabel_rows(n, seed=offset)
        ds = Dataset.from_dict({"image": [make_film(offset + i, f, size).convert("RGB") for i, (_, f) in enumerate(rows)],
                                "labels": [f for _, f in rows],
                                "patient_id": [f"p{offset + p}" for p, _ in rows]}, features=features)
        ds.to_parquet(str(Path(root) / "data" / f"{split}-00000-of-00001.parquet"))
    return Path(root)


def write_chexpert_csv(root: Path, n_train: int = 48, n_valid: int = 16, size: int = 64) -> Path:
    """CheXpert's layout: ``<root>/train.csv`` and ``<root>/valid.csv`` whose ``Path`` column is
    ``CheXpert-v1.0-small/<split>/patient<N>/study1/view<k>_frontal.jpg`` (relative to the CSV's
    parent, as shipped), metadata columns (Sex, Age, Frontal/Lateral, AP/PA) and one column per
    finding with 1.0, 0.0, -1.0 (uncertain) or blank (not mentioned). Films live under
    ``<root>/../CheXpert-v1.0-small``; the training CSV has uncertain labels, the validation one none."""
    import csv

    root = Path(root)
    base = root.parent
    findings = list(MULTILABEL_FINDINGS)
    for split, csv_name, n, offset in (("train", "train.csv", n_train, 0), ("valid", "valid.csv", n_valid, 20_000)):
        rng = np.random.default_rng(offset + 1)
        rows = multilabel_rows(n, seed=offset)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / csv_name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *findings])
            for i, (p, present) in enumerate(rows):
                rel = Path("CheXpert-v1.0-small") / split / f"patient{offset + p:05d}" / "study1" / f"view{i % 2 + 1}_frontal.jpg"
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                make_film(offset + i, present, size).convert("RGB").save(base / rel, quality=95)
                cells = []
                for k in range(len(findings)):
                    if k in present:
                        cells.append("1.0" if split == "valid" or rng.random() > 0.2 else "-1.0")
                    else:
                        cells.append("0.0" if split == "valid" or rng.random() < 0.5 else "")
                w.writerow([rel.as_posix(), "Female" if i % 2 else "Male", 40 + i % 30, "Frontal", "AP", *cells])
    return root
