"""Pieces of the training recipe that train_hf.py wires together: precision, loss,
Trainer metrics, and the post-training scoring (operating point, calibration, CIs)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cxr.operating_point import POLICIES, OperatingPoint
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


class WeightedCrossEntropy:
    """Trainer ``compute_loss_func``: class-weighted cross-entropy, with optional label smoothing
    (``--label_smoothing_factor``, the TrainingArguments field, honoured here because a custom
    loss replaces the Trainer's own smoother)."""

    def __init__(self, weights, label_smoothing: float = 0.0):
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.label_smoothing = float(label_smoothing or 0.0)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        w = self.weights.to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, weight=w, reduction="sum",
                                                 label_smoothing=self.label_smoothing)
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


CARD_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "pr_auc",
                "brier", "ece")   # the metrics a model card, the CV table and config.json report


def score_split(logits, labels, positive_id: int, op: OperatingPoint, *, n_boot: int = 1000,
                seed: int = 0) -> dict:
    """All metrics for one split at the operating point (plain names; a prefix is added only
    when they are saved), with bootstrap CIs."""
    y = binary_labels(labels, positive_id)
    p = op.probabilities(logits)[:, positive_id]
    m = compute_clinical_metrics(y, p, op.threshold)
    m["temperature"] = float(op.temperature)
    raw = compute_calibration(y, positive_scores(logits, positive_id))
    m["brier_uncalibrated"], m["ece_uncalibrated"] = raw["brier"], raw["ece"]
    if n_boot:
        m["ci"] = compute_bootstrap_ci(y, p, op.threshold, n_boot=n_boot, seed=seed)
    return {k: nan_to_none(v) for k, v in m.items()}


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


def prefixed(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def summarise_folds(per_fold: list[dict], keys=CARD_METRICS) -> dict:
    """{metric: {"mean", "sd", "per_fold"}} over the folds (sd with ddof=1)."""
    out = {}
    for k in keys:
        vals = np.array([float(f[k]) for f in per_fold if f.get(k) is not None], dtype=float)
        vals = vals[~np.isnan(vals)]
        if vals.size:
            out[k] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                      "per_fold": [round(float(v), 6) for v in vals]}
    return out


def equal_error_threshold(y, p) -> float:
    """The threshold where sensitivity and specificity are closest (the ROC's equal-error point)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0.0, 1.0)
    i = int(np.argmin(np.abs(tpr - (1 - fpr))))
    return float(thr[i])


def fit_operating_point(logits, labels, positive_id: int, id2label: dict, *, policy: str = "equal_error",
                        fitted_on: str = "the validation split", min_sensitivity: float = 0.95) -> OperatingPoint:
    """Temperature scaling (NLL), then the decision threshold by ``policy``, on the given scores.

    Policies: ``equal_error`` (sensitivity = specificity: errors balanced, the threshold sits
    between the two classes' score distributions rather than at the edge of the negatives'
    as Youden's J tends to on an easy split), ``youden``, ``default`` (0.5), ``sensitivity_floor``
    (the highest threshold whose sensitivity is still >= ``min_sensitivity``: fewest false alarms
    on NORMAL films, which is where new patients' scores shift; issue #19). The
    high-sensitivity threshold (sensitivity >= ``min_sensitivity``) is kept beside it.

    Where no informative threshold exists (one class only, or sensitivity + specificity - 1 <= 0
    at the chosen one) it falls back to 0.5 and says so in ``fallback`` (the card warns on it; a
    deliberate ``policy="default"`` is not a fallback)."""
    y = binary_labels(labels, positive_id)
    positive = id2label[positive_id]
    if len(np.unique(y)) < 2:
        logger.warning("%s has one class only: keeping threshold 0.5 and temperature 1", fitted_on)
        return OperatingPoint(positive_label=positive, policy="default", fitted_on=fitted_on, n_fit=len(y),
                              source=f"default 0.5 ({fitted_on} had one class only)", fallback=True)
    temperature = compute_temperature(np.asarray(logits), np.asarray(labels))
    p = positive_scores(logits, positive_id, temperature)
    ops = compute_operating_points(y, p, min_sensitivity)
    eer = equal_error_threshold(y, p)
    chosen = {"equal_error": eer, "youden": ops["youden"], "default": 0.5,
              "sensitivity_floor": ops["high_sensitivity"]}[policy]
    source = (f"{POLICIES[policy]} on {fitted_on}".replace("min_sensitivity", f"{min_sensitivity:.0%}"))
    m = compute_threshold_metrics(y, p, chosen)
    fallback = False
    if policy != "default" and m["sensitivity"] + m["specificity"] - 1 <= 0:  # uninformative model
        chosen, policy, fallback = 0.5, "default", True
        source = f"default 0.5 (the model does not separate the classes on {fitted_on})"
    chosen = float(min(max(chosen, 1e-6), 1 - 1e-6))
    return OperatingPoint(threshold=chosen, temperature=temperature, positive_label=positive, policy=policy,
                          source=source, fitted_on=fitted_on, n_fit=int(len(y)),
                          youden_threshold=ops["youden"], equal_error_threshold=eer,
                          high_sensitivity_threshold=ops["high_sensitivity"], min_sensitivity=min_sensitivity,
                          fallback=fallback)
