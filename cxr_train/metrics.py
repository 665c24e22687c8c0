"""Clinical metrics for binary chest X-ray classification: pure numpy / scikit-learn.

Conventions: ``y_true`` holds 0 (negative, e.g. NORMAL) and 1 (positive, e.g. PNEUMONIA);
``y_score`` is the probability of the positive class. The confusion matrix is
``[[TN, FP], [FN, TP]]``. This module is the ONE implementation: the ``evaluate`` module
in ``cxr_train/clinical_metrics`` and the Trainer's ``compute_metrics`` both call it.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(int).ravel()
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true has {y_true.size} items but y_score has {y_score.size}")
    if y_true.size == 0:
        raise ValueError("no samples to score")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("binary metrics need labels 0 (negative) and 1 (positive)")
    return y_true, y_score


def compute_confusion(y_true, y_pred) -> list[list[int]]:
    """[[TN, FP], [FN, TP]] with 0 as the negative class."""
    y_true = np.asarray(y_true).astype(int).ravel()
    y_pred = np.asarray(y_pred).astype(int).ravel()
    tn = int(((y_true == 0) & (y_pred == 0)).sum())
    fp = int(((y_true == 0) & (y_pred == 1)).sum())
    fn = int(((y_true == 1) & (y_pred == 0)).sum())
    tp = int(((y_true == 1) & (y_pred == 1)).sum())
    return [[tn, fp], [fn, tp]]


def compute_threshold_metrics(y_true, y_score, threshold: float = 0.5) -> dict:
    """Metrics that depend on the decision threshold (positive when score >= threshold)."""
    y_true, y_score = _check(y_true, y_score)
    y_pred = (y_score >= threshold).astype(int)
    (tn, fp), (fn, tp) = compute_confusion(y_true, y_pred)
    sens = _safe_div(tp, tp + fn)
    spec = _safe_div(tn, tn + fp)
    ppv = _safe_div(tp, tp + fp)
    npv = _safe_div(tn, tn + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": _safe_div(tp + tn, y_true.size),
        "sensitivity": sens,
        "specificity": spec,
        "precision": ppv,
        "npv": npv,
        "f1": f1,
        "balanced_accuracy": (sens + spec) / 2,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
    }


def compute_reliability(y_true, y_score, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reliability diagram's points: for each non-empty equal-width bin of the positive
    score, (mean predicted score, observed fraction positive, films in the bin). The one binning
    the ECE (:func:`compute_calibration`) and the plot (``plots.render_calibration``) share."""
    y_true, y_score = _check(y_true, y_score)
    bins = np.minimum((y_score * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    keep = count > 0
    predicted = np.bincount(bins, weights=y_score, minlength=n_bins)[keep] / count[keep]
    observed = np.bincount(bins, weights=y_true, minlength=n_bins)[keep] / count[keep]
    return predicted, observed, count[keep]


def compute_calibration(y_true, y_score, n_bins: int = 10) -> dict:
    """Brier score (scikit-learn's ``brier_score_loss``) and expected calibration error over
    :func:`compute_reliability`'s bins."""
    y_true, y_score = _check(y_true, y_score)
    predicted, observed, count = compute_reliability(y_true, y_score, n_bins)
    ece = float(np.sum(count / y_true.size * np.abs(predicted - observed)))
    return {"brier": float(brier_score_loss(y_true, y_score)), "ece": ece}


def compute_clinical_metrics(y_true, y_score, threshold: float = 0.5) -> dict:
    """All metrics: AUROC, PR-AUC, calibration, and the threshold metrics."""
    y_true, y_score = _check(y_true, y_score)
    both = len(np.unique(y_true)) == 2
    out = {
        "roc_auc": float(roc_auc_score(y_true, y_score)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y_true, y_score)) if both else float("nan"),
        "n_samples": int(y_true.size),
        "n_positive": int(y_true.sum()),
    }
    out.update(compute_threshold_metrics(y_true, y_score, threshold))
    out.update(compute_calibration(y_true, y_score))
    return out


def compute_operating_points(y_true, y_score, min_sensitivity: float = 0.95) -> dict:
    """Thresholds chosen on validation data.

    ``youden``: maximises sensitivity + specificity - 1.
    ``high_sensitivity``: the highest threshold whose sensitivity is >= ``min_sensitivity``
    (so specificity is as high as that constraint allows).
    """
    y_true, y_score = _check(y_true, y_score)
    fpr, tpr, thr = roc_curve(y_true, y_score, drop_intermediate=False)  # every threshold: the highest one counts
    thr = np.clip(thr, 0.0, 1.0)  # sklearn puts +inf first
    j = tpr - fpr
    youden = float(thr[int(np.argmax(j))])
    ok = np.flatnonzero(tpr >= min_sensitivity)
    high_sens = float(thr[ok[0]]) if ok.size else 0.0
    return {"youden": youden, "high_sensitivity": high_sens, "min_sensitivity": min_sensitivity}


def compute_bootstrap_ci(
    y_true, y_score, threshold: float = 0.5, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
    keys: tuple[str, ...] = ("roc_auc", "sensitivity", "specificity", "accuracy"),
) -> dict:
    """Percentile bootstrap (resampling images) confidence intervals: {key: [low, high]}."""
    y_true, y_score = _check(y_true, y_score)
    rng = np.random.default_rng(seed)
    n = y_true.size
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        t, s = y_true[idx], y_score[idx]
        m = compute_threshold_metrics(t, s, threshold)
        if "roc_auc" in keys:
            m["roc_auc"] = roc_auc_score(t, s) if 0 < t.sum() < n else float("nan")
        for k in keys:
            samples[k].append(m[k])
    ci = {}
    for k, v in samples.items():
        v = np.asarray(v, dtype=float)
        v = v[~np.isnan(v)]
        ci[k] = [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))] if v.size else [math.nan, math.nan]
    return ci


from cxr.operating_point import softmax as compute_softmax  # noqa: E402 (the one softmax; re-exported)


def compute_temperature(logits, y_true) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising validation NLL."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true).astype(int)

    def nll(log_t: float) -> float:
        p = compute_softmax(logits, math.exp(log_t))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y_true)), y_true], 1e-12, None))))

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))
