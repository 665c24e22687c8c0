"""Out-of-distribution score: how far an input is from the training films, in the model's
own feature space.

The feature is the input of the classification head (the penultimate layer: ResNet's pooled
last stage, ViT's final CLS token, a timm model's pre-logits). On the training films we fit
one Gaussian per class with a shared covariance (Ledoit-Wolf shrinkage, scikit-learn); the
score of an image is its Mahalanobis distance to the nearest class mean (Lee et al., 2018).
The threshold is set on held-out validation films plus non-X-ray images (greyscale photos,
CT- and MR-like slices): the value that best separates the two while flagging at most
``max_val_flagged`` (1 %) of the validation films.

Fitting from the command line lives in :mod:`cxr.ood_fit` (it reads training data, so it
stays out of the Space). Saved next to the model as ``ood.safetensors`` (means and precision matrix; the threshold and
fit facts in its metadata), so it travels with the model folder / Hub repo.

    python -m cxr.ood_fit fit --model models/cxr-resnet-small-scratch --data ../shared/data/chest_xray_224
    python -m cxr.ood_fit score --model models/cxr-resnet-small-scratch a.png b.dcm

From Python (e.g. at the end of training)::

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

logger = logging.getLogger(__name__)

OOD_FILE = "ood.safetensors"
MAX_VAL_FLAGGED = 0.01
OOD_WARNING = ("This does not look like a chest X-ray the model was trained on (it is far from the "
               "training films in the model's own feature space); no prediction is shown.")


# ------------------------------------------------------------------ features

def head_linear(model) -> torch.nn.Linear:
    """The classification head's Linear layer: the last ``nn.Linear`` whose outputs are the labels."""
    n = int(getattr(model.config, "num_labels", 0) or len(model.config.id2label))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n]
    if not linears:
        raise ValueError("cannot find the classification head (no Linear layer with one output per label)")
    return linears[-1]


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


def choose_threshold(val_scores: np.ndarray, ood_scores: np.ndarray | None,
                     max_val_flagged: float = MAX_VAL_FLAGGED) -> float:
    """The threshold between validation films (in distribution) and non-X-ray images that
    maximises (flagged non-X-rays) - (flagged validation films), among those flagging at most
    ``max_val_flagged`` of the validation films; the middle of the best range. Without
    non-X-ray scores: the (1 - max_val_flagged) quantile of the validation scores."""
    val = np.sort(np.asarray(val_scores, dtype=np.float64))
    floor = float(np.quantile(val, 1.0 - max_val_flagged))
    if ood_scores is None or len(ood_scores) == 0:
        return floor
    ood = np.asarray(ood_scores, dtype=np.float64)
    points = np.unique(np.concatenate([val, ood]))
    cands = np.unique(np.concatenate([(points[:-1] + points[1:]) / 2, [floor]]))
    cands = cands[cands >= floor]
    j = np.array([(ood > t).mean() - (val > t).mean() for t in cands])
    best = np.flatnonzero(j >= j.max() - 1e-12)
    run = [best[0]]
    for b in best[1:]:          # the first contiguous run of best thresholds: take its middle
        if b != run[-1] + 1:
            break
        run.append(b)
    return float((cands[run[0]] + cands[run[-1]]) / 2)


def fit_ood(model, processor, images_train, images_val, *, labels_train=None, images_ood=None,
            max_val_flagged: float = MAX_VAL_FLAGGED, batch_size: int = 32) -> OODScorer:
    """Fit the scorer: Gaussians on ``images_train`` features (per class when ``labels_train``
    is given, with a shared Ledoit-Wolf covariance), threshold on ``images_val`` plus
    ``images_ood`` (default: :func:`reference_ood_images`). Images: PIL, arrays or paths."""
    from sklearn.covariance import LedoitWolf

    if len(images_train) < 2 or len(images_val) < 1:
        raise ValueError("fit_ood needs at least 2 training and 1 validation image")
    train = extract_features(model, processor, list(images_train), batch_size)
    labels = np.zeros(len(train), int) if labels_train is None else np.asarray(labels_train)
    if len(labels) != len(train):
        raise ValueError("labels_train must have one label per training image")
    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 2] or [labels[0]]
    means = np.stack([train[labels == c].mean(0) for c in classes])
    keep = np.isin(labels, classes)
    centred = train[keep] - means[np.searchsorted(classes, labels[keep])]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    scorer = OODScorer(means=means.astype(np.float32), precision=lw.precision_.astype(np.float32), threshold=0.0)
    val = scorer.score(extract_features(model, processor, list(images_val), batch_size))
    if images_ood is None:
        images_ood = [im for _, im in reference_ood_images()]
    ood = scorer.score(extract_features(model, processor, list(images_ood), batch_size)) if len(images_ood) else None
    scorer.threshold = choose_threshold(val, ood, max_val_flagged)
    scorer.facts = {
        "method": "Mahalanobis distance to the nearest class mean, penultimate features, Ledoit-Wolf covariance",
        "feature_dim": int(train.shape[1]), "n_train": int(len(train)), "n_val": int(len(val)),
        "n_ood_reference": 0 if ood is None else int(len(ood)), "shrinkage": float(lw.shrinkage_),
        "val_flagged": float((val > scorer.threshold).mean()),
        "ood_reference_flagged": None if ood is None else float((ood > scorer.threshold).mean()),
        "val_score_quantiles": {q: float(np.quantile(val, float(q))) for q in ("0.5", "0.99")},
    }
    return scorer


# ------------------------------------------------------------------ reference non-X-ray images

def synthetic_ct_slice(seed: int, size: int = 256, kind: str = "ct") -> Image.Image:
    """A CT- or MR-like axial slice: a round body on black, bright rim/bone, organs or brain."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    a, b = rng.uniform(0.36, 0.46), rng.uniform(0.28, 0.42)
    body = (xx / a) ** 2 + (yy / b) ** 2 <= 1
    img = np.zeros((size, size), np.float32)
    if kind == "mr":                                      # head: bright scalp ring, grey brain, folds
        img[body] = 200
        inner = (xx / (a - 0.04)) ** 2 + (yy / (b - 0.04)) ** 2 <= 1
        img[inner] = 110 + 25 * np.sin(40 * xx[inner] + 10 * rng.random()) * np.cos(35 * yy[inner])
        img[(xx / 0.08) ** 2 + (yy / 0.05) ** 2 <= 1] = 40   # ventricles
    else:                                                 # chest: soft tissue, dark lungs, spine
        img[body] = 130
        for sx in (-1, 1):
            lung = ((xx - sx * a * 0.45) / (a * 0.38)) ** 2 + ((yy + 0.02) / (b * 0.7)) ** 2 <= 1
            img[lung] = 25
        img[(xx / 0.05) ** 2 + ((yy - b * 0.7) / 0.05) ** 2 <= 1] = 250   # vertebra
        ring = ((xx / a) ** 2 + (yy / b) ** 2 <= 1) & ((xx / (a - 0.015)) ** 2 + (yy / (b - 0.015)) ** 2 > 1)
        img[ring] = 220
    img += rng.normal(0, 6, img.shape) * body
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").convert("RGB")


def synthetic_photo(seed: int, size: int = 256) -> Image.Image:
    """A greyscale 'photo': smooth gradients, a horizon, blocks and texture (not an X-ray)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = 80 + 120 * yy + 40 * np.sin(6 * xx + rng.random() * 6)
    for _ in range(6):
        y0, x0 = rng.integers(0, size - 40, 2)
        h, w = rng.integers(20, 90, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").convert("RGB")


SKIMAGE_FIT = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "page", "moon")
SKIMAGE_HELD_OUT = ("clock", "brick", "grass", "gravel", "text", "cell", "hubble_deep_field", "retina")


def _skimage_grey(names) -> list[tuple[str, Image.Image]]:
    try:
        import skimage.data
    except ImportError:
        return []
    out = []
    for n in names:
        try:
            a = np.asarray(getattr(skimage.data, n)())
        except Exception:  # noqa: BLE001 - a missing sample is skipped
            continue
        im = Image.fromarray(a.astype(np.uint8) if a.dtype != bool else (a * 255).astype(np.uint8))
        out.append((f"skimage:{n}", im.convert("L").convert("RGB")))
    return out


def reference_ood_images(held_out: bool = False) -> list[tuple[str, Image.Image]]:
    """Non-X-ray images for the threshold: scikit-image's greyscale photos (when installed),
    synthetic CT- and MR-like slices and synthetic greyscale photos. ``held_out=True`` gives a
    disjoint set (other photos, other seeds) for reporting, never for fitting."""
    base = 1000 if held_out else 0
    imgs = _skimage_grey(SKIMAGE_HELD_OUT if held_out else SKIMAGE_FIT)
    imgs += [(f"synthetic-ct:{s}", synthetic_ct_slice(base + s)) for s in range(8)]
    imgs += [(f"synthetic-mr:{s}", synthetic_ct_slice(base + s, kind="mr")) for s in range(8)]
    imgs += [(f"synthetic-photo:{s}", synthetic_photo(base + s)) for s in range(8)]
    return imgs
