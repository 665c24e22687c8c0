"""Pieces of the training recipe that train_hf.py wires together: precision, loss,
Trainer metrics, and the post-training scoring (operating point, calibration, CIs)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .metrics import (
    compute_bootstrap_ci,
    compute_calibration,
    compute_clinical_metrics,
    compute_operating_points,
    compute_softmax,
    compute_temperature,
    compute_threshold_metrics,
)

logger = logging.getLogger(__name__)
METRIC_MODULE = str(Path(__file__).resolve().parent / "clinical_metrics")


def cpu_supports_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls/convs are native and fast."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve_bf16(precision: str) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


class WeightedCrossEntropy:
    """Trainer ``compute_loss_func``: class-weighted cross-entropy."""

    def __init__(self, weights):
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        w = self.weights.to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, weight=w, reduction="sum")
        # normalise by the summed weights of the batch (the usual weighted-mean definition)
        return loss / w[labels].sum()


def positive_scores(logits, positive_id: int, temperature: float = 1.0) -> np.ndarray:
    return compute_softmax(np.asarray(logits, dtype=np.float64), temperature)[:, positive_id]


def binary_labels(labels, positive_id: int) -> np.ndarray:
    return (np.asarray(labels) == positive_id).astype(int)


def build_compute_metrics(positive_id: int):
    """Trainer ``compute_metrics`` through the local evaluate module (works offline)."""
    import evaluate

    metric = evaluate.load(METRIC_MODULE)

    def compute_metrics(eval_pred):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        m = metric.compute(predictions=positive_scores(logits, positive_id),
                           references=binary_labels(labels, positive_id))
        (tn, fp), (fn, tp) = m.pop("confusion_matrix")
        m.update(tn=tn, fp=fp, fn=fn, tp=tp)
        return m

    return compute_metrics


def score_split(logits, labels, positive_id: int, prefix: str, *, threshold: float = 0.5,
                temperature: float = 1.0, n_boot: int = 1000, seed: int = 0) -> dict:
    """All metrics for one split, with the calibrated scores, plus bootstrap CIs."""
    y = binary_labels(labels, positive_id)
    p = positive_scores(logits, positive_id, temperature)
    m = compute_clinical_metrics(y, p, threshold)
    m["temperature"] = float(temperature)
    raw = compute_calibration(y, positive_scores(logits, positive_id))
    m["brier_uncalibrated"], m["ece_uncalibrated"] = raw["brier"], raw["ece"]
    if n_boot:
        m["ci"] = compute_bootstrap_ci(y, p, threshold, n_boot=n_boot, seed=seed)
    return {f"{prefix}_{k}": nan_to_none(v) for k, v in m.items()}


def nan_to_none(value):
    """Undefined metrics (NaN: e.g. AUROC of a one-class split) become ``None``: ``null`` in
    JSON (not the non-standard ``NaN``), "n/a" in the model card. An interval with an
    undefined end becomes ``None`` as a whole."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return None if any(v != v for v in value) else list(value)
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    return value


def fit_operating_point(logits, labels, positive_id: int, id2label: dict, min_sensitivity: float = 0.95) -> dict:
    """Temperature scaling, then Youden's J and a high-sensitivity threshold, on validation."""
    y = binary_labels(labels, positive_id)
    if len(np.unique(y)) < 2:
        logger.warning("validation has one class only: keeping threshold 0.5 and temperature 1")
        return {"threshold": 0.5, "temperature": 1.0, "source": "default (validation had one class)",
                "positive_label": id2label[positive_id]}
    temperature = compute_temperature(np.asarray(logits), np.asarray(labels))
    p = positive_scores(logits, positive_id, temperature)
    ops = compute_operating_points(y, p, min_sensitivity)
    j = compute_threshold_metrics(y, p, ops["youden"])
    source = "Youden's J on the validation split (temperature-scaled probabilities)"
    if j["sensitivity"] + j["specificity"] - 1 <= 0:  # an uninformative model: keep the neutral default
        ops["youden"] = 0.5
        source = "default 0.5 (Youden's J on validation was not above 0)"
    return {
        "threshold": ops["youden"],
        "source": source,
        "youden_threshold": ops["youden"],
        "high_sensitivity_threshold": ops["high_sensitivity"],
        "min_sensitivity": min_sensitivity,
        "temperature": temperature,
        "positive_label": id2label[positive_id],
    }
