"""Out-of-distribution score: how far an input is from the training films, in the model's
own feature space.

The feature is the input of the classification head (the penultimate layer: ResNet's pooled
last stage, ViT's final CLS token, a timm model's pre-logits). On the training films we fit
one Gaussian per class with a shared covariance (Ledoit-Wolf shrinkage, scikit-learn); the
score of an image is its Mahalanobis distance to the nearest class mean (Lee et al., 2018).
The threshold is set on held-out validation films plus non-X-ray images (greyscale photos,
CT- and MR-like slices): the value that best separates the two while flagging at most
``max_val_flagged`` (1 %) of the validation films.

This module scores (serving); fitting (scikit-learn, the training data, the reference
non-X-ray images) lives in :mod:`cxr_train.ood_fit`, out of the Space. Saved next to the model as ``ood.safetensors`` (means and precision matrix; the threshold and
fit facts in its metadata), so it travels with the model folder / Hub repo.

    python -m cxr_train.ood_fit fit --model models/cxr-resnet-small-scratch --data ../shared/data/chest_xray_224
    python -m cxr_train.ood_fit score --model models/cxr-resnet-small-scratch a.png b.dcm

From Python (e.g. at the end of training)::

    from cxr_train.ood_fit import fit_ood
    scorer = fit_ood(model, processor, train_images, val_images, labels_train=labels)
    scorer.save(output_dir)
    OODScorer.from_folder(output_dir).score_images(model, processor, [image])
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .architecture import head_linear

logger = logging.getLogger(__name__)

OOD_FILE = "ood.safetensors"
MAX_VAL_FLAGGED = 0.01
OOD_WARNING = ("This does not look like a chest X-ray the model was trained on (it is far from the "
               "training films in the model's own feature space); no prediction is shown.")


# ------------------------------------------------------------------ features

class FeatureTap:
    """Records the head's input (the penultimate features) of every forward pass, per thread,
    so that a prediction's own forward gives its OOD features (no second pass)."""

    def __init__(self, model):
        self._local = local = threading.local()

        def hook(module, args):   # a plain function: copy.deepcopy(model) keeps it as is
            local.features = args[0].detach()

        self._handle = head_linear(model).register_forward_pre_hook(hook)

    def pop(self) -> np.ndarray | None:
        """Features of this thread's latest forward pass, (batch, dim) float32; then forgets them."""
        f = getattr(self._local, "features", None)
        self._local.features = None
        return None if f is None else f.float().flatten(1).cpu().numpy()

    def remove(self) -> None:
        self._handle.remove()


@torch.inference_mode()
def extract_features(model, processor, images, batch_size: int = 32) -> np.ndarray:
    """Penultimate features (n, dim) of PIL images / arrays / paths, with the saved processor."""
    from .imaging import load_image
    from .preprocessing import pixel_values

    model.eval()
    tap = FeatureTap(model)
    out = []
    try:
        for i in range(0, len(images), batch_size):
            batch = [im if isinstance(im, (Image.Image, np.ndarray)) else load_image(im)
                     for im in images[i:i + batch_size]]
            batch = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else im for im in batch]
            model(pixel_values=pixel_values(processor, batch).float())
            out.append(tap.pop())
    finally:
        tap.remove()
    return np.concatenate(out) if out else np.zeros((0, head_linear(model).in_features), np.float32)


# ------------------------------------------------------------------ the scorer

@dataclass
class OODScorer:
    means: np.ndarray                  # (classes, dim): one mean per class (or one overall)
    precision: np.ndarray              # (dim, dim): inverse of the shared shrunk covariance
    threshold: float                   # scores above it are out of distribution
    facts: dict = field(default_factory=dict)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance to the nearest class mean, one per row of ``features``."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim == 1:
            f = f[None]
        d = f[:, None, :] - self.means[None].astype(np.float64)            # (n, classes, dim)
        m2 = np.einsum("nkd,de,nke->nk", d, self.precision.astype(np.float64), d)
        return np.sqrt(np.maximum(m2.min(axis=1), 0.0))

    def is_ood(self, score: float) -> bool:
        return bool(score > self.threshold)

    def score_images(self, model, processor, images) -> np.ndarray:
        return self.score(extract_features(model, processor, images))

    # ---------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(folder) / OOD_FILE
        meta = {"threshold": repr(float(self.threshold)), "facts": json.dumps(self.facts)}
        save_file({"means": self.means.astype(np.float32), "precision": self.precision.astype(np.float32)},
                  str(path), metadata=meta)
        path.chmod(0o644)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OODScorer":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            means, precision = f.get_tensor("means"), f.get_tensor("precision")
        if means.ndim != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError("ood.safetensors has unexpected shapes")
        return cls(means=means, precision=precision, threshold=float(meta["threshold"]),
                   facts=json.loads(meta.get("facts", "{}")))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "OODScorer | None":
        """The scorer saved in a model folder, or None when the folder has none."""
        path = Path(folder) / OOD_FILE
        return cls.load(path) if path.is_file() else None
