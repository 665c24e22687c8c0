"""Clinical metrics of chest X-ray classifiers: pure numpy / scikit-learn. Binary first; the
label sets' (multi-class, multi-label) further down.

Binary conventions: ``y_true`` holds 0 (negative, e.g. NORMAL) and 1 (positive, e.g. PNEUMONIA);
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
    the ECE (:func:`compute_calibration`), the multi-class top-label ECE and the plot
    (``plots.render_calibration``) share.

    Not scikit-learn's ``calibration_curve``, on purpose: away from the bin edges its
    ``strategy="uniform"`` points are these (a test checks it), but it returns no counts, which
    the ECE weights each bin by, and its bins are closed on the right, (k/n, (k+1)/n], where
    these are closed on the left, [k/n, (k+1)/n): a score of exactly 0.5 (two equal logits)
    falls in the bin above 0.5 here and below it there. Counting its bins again here would write
    its binning a second time; switching would move every edge score and the ECE figures
    already published."""
    y_true, y_score = _check(y_true, y_score)
    bins = np.minimum((y_score * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    keep = count > 0
    predicted = np.bincount(bins, weights=y_score, minlength=n_bins)[keep] / count[keep]
    observed = np.bincount(bins, weights=y_true, minlength=n_bins)[keep] / count[keep]
    return predicted, observed, count[keep]


def compute_calibration(y_true, y_score, n_bins: int = 10) -> dict:
    """Brier score (scikit-learn's ``brier_score_loss``) and expected calibration error: the
    films-weighted mean gap between predicted and observed over :func:`compute_reliability`'s bins."""
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


# ---------------------------------------------------------------- label sets (issue #29)
#
# Multi-class: ``y`` class ids (N,), ``probs`` (N, C) calibrated softmax; every class is scored
# one-vs-rest (AUROC of its probability; sensitivity = recall of the class under the arg-max
# decision, specificity = the other classes' films not called it). Multi-label: ``y`` (N, K) with
# 1 / 0 and NaN where the finding is unknown (uncertain), ``probs`` (N, K) calibrated sigmoids,
# each finding called at its own threshold; unknown entries are left out of that finding's figures.
# Macro = the mean over classes with a defined value; micro = the classes' one-vs-rest decisions
# (and scores) pooled.

def _auroc(y, s) -> float:
    y = np.asarray(y)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")


def _binary_rates(y, called) -> dict:
    y, called = np.asarray(y).astype(bool), np.asarray(called).astype(bool)
    tp, fn = int((y & called).sum()), int((y & ~called).sum())
    tn, fp = int((~y & ~called).sum()), int((~y & called).sum())
    sens, spec, ppv = _safe_div(tp, tp + fn), _safe_div(tn, tn + fp), _safe_div(tp, tp + fp)
    return {"sensitivity": sens, "specificity": spec, "precision": ppv,
            "f1": _safe_div(2 * tp, 2 * tp + fp + fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _nanmean(values) -> float:
    v = np.asarray([x for x in values if x == x], dtype=float)
    return float(v.mean()) if v.size else float("nan")


def compute_multiclass_metrics(y_true, probs, names, *, normal_id: int | None = None,
                               threshold: float | None = None) -> dict:
    """Per-class and summary metrics of a single-label, N-class task (arg-max decision), the C x C
    confusion matrix (rows: true class, columns: called class), and where a normal class exists
    the screening question (abnormal = not normal, P(abnormal) = 1 - P(normal) >= ``threshold``)
    and every pair of abnormal classes told apart among their own films (e.g. bacterial vs viral)."""
    y = np.asarray(y_true).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    if y.size != n:
        raise ValueError(f"y_true has {y.size} items but probs has {n} rows")
    if n == 0:
        raise ValueError("no samples to score")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"class ids outside 0..{c - 1}")
    called = probs.argmax(axis=1)
    onehot = np.eye(c, dtype=int)[y]
    per_class = {}
    for k, name in enumerate(names):
        r = _binary_rates(y == k, called == k)
        per_class[name] = {"n": int((y == k).sum()), "roc_auc": _auroc(y == k, probs[:, k]), **r}
    cm = np.zeros((c, c), dtype=int)
    np.add.at(cm, (y, called), 1)
    both = len(np.unique(onehot.ravel())) == 2
    micro = _binary_rates(onehot.ravel(), np.eye(c, dtype=int)[called].ravel())
    out = {
        "n_samples": int(n),
        "accuracy": float((called == y).mean()),
        "balanced_accuracy": _nanmean([per_class[m]["sensitivity"] for m in names]),
        "roc_auc": _nanmean([per_class[m]["roc_auc"] for m in names]),       # macro, one-vs-rest
        "micro_roc_auc": float(roc_auc_score(onehot.ravel(), probs.ravel())) if both else float("nan"),
        "macro_sensitivity": _nanmean([per_class[m]["sensitivity"] for m in names]),
        "macro_specificity": _nanmean([per_class[m]["specificity"] for m in names]),
        "macro_f1": _nanmean([per_class[m]["f1"] for m in names]),
        "micro_f1": micro["f1"],
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "labels": list(names),
    }
    out.update({f"{k}": v for k, v in compute_calibration_multiclass(y, probs).items()})
    if normal_id is not None:
        abnormal = (y != normal_id).astype(int)
        p_abn = 1.0 - probs[:, normal_id]
        out["screening"] = compute_clinical_metrics(abnormal, p_abn, 0.5 if threshold is None else threshold)
    pairs = {}
    others = [k for k in range(c) if k != normal_id] if normal_id is not None else []
    for i, a in enumerate(others):
        for b in others[i + 1:]:
            keep = (y == a) | (y == b)
            if not keep.any():
                continue
            pa, pb = probs[keep, a], probs[keep, b]
            share = pb / np.clip(pa + pb, 1e-300, None)          # P(b | a or b)
            yb = (y[keep] == b).astype(int)
            pairs[f"{names[a]} vs {names[b]}"] = {
                "n": int(keep.sum()), "positive": names[b], "roc_auc": _auroc(yb, share),
                "accuracy": float(((share >= 0.5).astype(int) == yb).mean())}
    if pairs:
        out["pairwise"] = pairs
    return out


def compute_calibration_multiclass(y_true, probs) -> dict:
    """Multi-class Brier score (scikit-learn's ``brier_score_loss`` unhalved: the squared error of
    the probability vector summed over classes, averaged over films) and top-label ECE (the binary
    ECE of "the called class is right" against the called class's probability, 10 bins)."""
    y = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(int)
    brier = brier_score_loss(y, probs, labels=np.arange(probs.shape[1]), scale_by_half=False)
    return {"brier": float(brier), "ece": compute_calibration(correct, conf)["ece"]}


def compute_multilabel_metrics(y_true, probs, names, thresholds) -> dict:
    """Per-finding and summary metrics of a multi-label task; ``y_true`` (N, K) 1 / 0 / NaN (unknown,
    left out), each finding called at its own threshold."""
    y = np.asarray(y_true, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if y.shape != probs.shape:
        raise ValueError(f"labels {y.shape} and probabilities {probs.shape} differ in shape")
    if y.shape[0] == 0:
        raise ValueError("no samples to score")
    thr = np.asarray(thresholds, dtype=np.float64)
    per = {}
    ys, ss, cs = [], [], []
    for k, name in enumerate(names):
        m = ~np.isnan(y[:, k])
        yk, pk = y[m, k].astype(int), probs[m, k]
        called = pk >= thr[k]
        r = _binary_rates(yk, called)
        per[name] = {"n": int(m.sum()), "n_positive": int(yk.sum()), "n_uncertain": int((~m).sum()),
                     "threshold": float(thr[k]), "roc_auc": _auroc(yk, pk),
                     "pr_auc": float(average_precision_score(yk, pk)) if 0 < yk.sum() < yk.size else float("nan"),
                     **r}
        ys.append(yk), ss.append(pk), cs.append(called)
    yy, sc, cc = np.concatenate(ys), np.concatenate(ss), np.concatenate(cs)
    micro = _binary_rates(yy, cc)
    known = ~np.isnan(y)
    exact = known.all(axis=1)
    return {
        "n_samples": int(y.shape[0]),
        "roc_auc": _nanmean([per[n]["roc_auc"] for n in names]),           # macro
        "micro_roc_auc": _auroc(yy, sc),
        "macro_sensitivity": _nanmean([per[n]["sensitivity"] for n in names]),
        "macro_specificity": _nanmean([per[n]["specificity"] for n in names]),
        "macro_f1": _nanmean([per[n]["f1"] for n in names]),
        "micro_f1": micro["f1"], "micro_sensitivity": micro["sensitivity"], "micro_specificity": micro["specificity"],
        "accuracy": float((yy == cc).mean()),                                # per-label (Hamming) accuracy
        "exact_match": float((((probs >= thr[None, :]) == (y == 1)) | ~known)[exact].all(axis=1).mean())
        if exact.any() else float("nan"),
        "brier": float(brier_score_loss(yy, sc)) if yy.size else float("nan"),
        "per_class": per,
        "labels": list(names),
    }


def fast_auroc(y, s) -> float:
    """AUROC by the rank-sum (Mann-Whitney) formula, ties averaged: equal to scikit-learn's
    ``roc_auc_score`` and much faster for the bootstrap; NaN with one class."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def compute_bootstrap_ci_per_class(y_true, probs, called, names, *, n_boot: int = 1000, alpha: float = 0.05,
                                   seed: int = 0, accuracy: str = "argmax") -> dict:
    """Percentile bootstrap (resampling films) of every class's AUROC, sensitivity and specificity,
    the macro AUROC and the accuracy. ``y_true`` (N, K): 1 / 0 per class (one-hot for one label per
    film), NaN where unknown (left out of that class); ``called`` (N, K) bool: the decisions.
    ``accuracy``: "argmax" (one label per film: the called class is the true one) or "per_label"
    (multi-label: the known entries called right). Returns ``{"per_class": {name: {key: [lo, hi]}},
    "roc_auc": [lo, hi], "accuracy": [lo, hi]}``."""
    y = np.asarray(y_true, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    called = np.asarray(called, dtype=bool)
    rng = np.random.default_rng(seed)
    n, k = y.shape
    keys = ("roc_auc", "sensitivity", "specificity")
    per = np.full((n_boot, k, 3), np.nan)
    summ = np.full((n_boot, 2), np.nan)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        yb, pb, cb = y[idx], probs[idx], called[idx]
        for j in range(k):
            m = ~np.isnan(yb[:, j])
            t, c = yb[m, j] == 1, cb[m, j]
            per[b, j, 0] = fast_auroc(t, pb[m, j])
            per[b, j, 1] = _safe_div((t & c).sum(), t.sum())
            per[b, j, 2] = _safe_div((~t & ~c).sum(), (~t).sum())
        aucs = per[b, :, 0][~np.isnan(per[b, :, 0])]
        summ[b, 0] = aucs.mean() if aucs.size else np.nan
        known = ~np.isnan(yb)
        summ[b, 1] = (np.all((yb == 1) == cb, axis=1).mean() if accuracy == "argmax"
                      else ((yb == 1) == cb)[known].mean())

    def interval(v):
        v = v[~np.isnan(v)]
        return [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))] if v.size else [math.nan,
                                                                                                          math.nan]

    out = {"per_class": {name: {key: interval(per[:, j, i]) for i, key in enumerate(keys)}
                         for j, name in enumerate(names)}}
    out["roc_auc"], out["accuracy"] = interval(summ[:, 0]), interval(summ[:, 1])
    return out


def compute_multilabel_temperature(logits, y_true) -> float:
    """One temperature T > 0 for every finding: minimises the binary cross-entropy of
    sigmoid(logit / T) over the known (non-NaN) labels."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.float64)
    m = ~np.isnan(y)
    z, y = z[m], y[m]

    def nll(log_t: float) -> float:
        t = z / math.exp(log_t)
        # log(1 + exp(-|t|)) + max(t, 0) - y t  (stable BCE with logits)
        return float(np.mean(np.logaddexp(0, -np.abs(t)) + np.maximum(t, 0) - y * t))

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))
