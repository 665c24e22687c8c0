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
