"""Pieces of the training recipe that train_hf.py wires together: the losses, the Trainer's
metrics, and the post-training scoring (operating point by a threshold policy of
:data:`cxr.operating_point.POLICIES`, calibration, bootstrap CIs)."""

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

    Policies (:data:`cxr.operating_point.POLICIES`): ``equal_error`` (sensitivity = specificity:
    errors balanced, the threshold sits between the two classes' score distributions rather than
    at the edge of the negatives' as Youden's J tends to on an easy split), ``youden``, ``default``
    (0.5), ``sensitivity_floor`` (the highest threshold whose sensitivity is still >=
    ``min_sensitivity``: fewest false alarms on NORMAL films, which is where new patients' scores
    shift; issue #19), ``shift_floor`` (here the clean floor, which train_hf then lowers to the
    simulated acquisition changes' with :mod:`cxr_train.shift_policy`). The high-sensitivity
    threshold (sensitivity >= ``min_sensitivity``) is kept beside it.

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
    t = choose_threshold(y, p, policy=policy, fitted_on=fitted_on, min_sensitivity=min_sensitivity)
    return OperatingPoint(temperature=temperature, positive_label=positive, n_fit=int(len(y)), **t)


def choose_threshold(y, p, *, policy: str, fitted_on: str, min_sensitivity: float) -> dict:
    """The decision threshold on scores ``p`` of 0/1 labels ``y`` by ``policy`` (both classes present),
    with the alternatives kept beside it and the fallback to 0.5 where no informative threshold
    exists: the OperatingPoint fields ``threshold``, ``policy``, ``source``, ``fitted_on``,
    ``youden_threshold``, ``equal_error_threshold``, ``high_sensitivity_threshold``,
    ``min_sensitivity``, ``fallback``. One rule for binary models, the screening question of a
    multi-class model and every finding of a multi-label model."""
    if policy not in POLICIES:
        raise ValueError(f"unknown threshold policy '{policy}': choose {', '.join(POLICIES)}")
    ops = compute_operating_points(y, p, min_sensitivity)
    eer = equal_error_threshold(y, p)
    chosen = {"equal_error": eer, "youden": ops["youden"], "default": 0.5,
              "sensitivity_floor": ops["high_sensitivity"],
              # the clean floor; train_hf lowers it to the shifted conditions' (cxr_train.shift_policy)
              "shift_floor": ops["high_sensitivity"]}[policy]
    source = (f"{POLICIES[policy]} on {fitted_on}".replace("min_sensitivity", f"{min_sensitivity:.0%}"))
    m = compute_threshold_metrics(y, p, chosen)
    fallback = False
    if policy != "default" and m["sensitivity"] + m["specificity"] - 1 <= 0:  # uninformative model
        chosen, policy, fallback = 0.5, "default", True
        source = f"default 0.5 (the model does not separate the classes on {fitted_on})"
    chosen = float(min(max(chosen, 1e-6), 1 - 1e-6))
    return dict(threshold=chosen, policy=policy, source=source, fitted_on=fitted_on,
                youden_threshold=ops["youden"], equal_error_threshold=eer,
                high_sensitivity_threshold=ops["high_sensitivity"], min_sensitivity=min_sensitivity,
                fallback=fallback)


# ---------------------------------------------------------------- label sets (issue #29)

MIN_FIT_PER_CLASS = 3      # a finding's threshold is fitted with at least this many known positives and negatives


class MaskedBCE:
    """Trainer ``compute_loss_func`` for multi-label targets: binary cross-entropy with logits, one
    ``pos_weight`` per finding (negatives / positives of the training targets), on targets made
    from the codes (1 present, 0 absent, -1 uncertain) by the uncertain policy: ``ones`` (U-Ones),
    ``zeros`` (U-Zeros) or ``ignore`` (the entry is masked out of the loss; Irvin et al. 2019).
    The loss is the mean over the entries that count."""

    def __init__(self, pos_weight, uncertain: str | None = None, label_smoothing: float = 0.0):
        self.pos_weight = torch.tensor(pos_weight, dtype=torch.float32)
        self.uncertain = uncertain
        self.label_smoothing = float(label_smoothing or 0.0)

    def targets(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets, mask) from a batch of codes."""
        codes = codes.float()
        unc = codes == -1
        mask = ~unc if self.uncertain in (None, "ignore") else torch.ones_like(codes, dtype=torch.bool)
        value = 1.0 if self.uncertain == "ones" else 0.0
        y = torch.where(unc, torch.full_like(codes, value), codes)
        return y, mask

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        y, mask = self.targets(labels.to(logits.device))
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float(), y, pos_weight=self.pos_weight.to(logits.device), reduction="none")
        m = mask.float()
        return (loss * m).sum() / m.sum().clamp_min(1.0)


def loss_for(data, label_smoothing: float = 0.0):
    """The loss of a PreparedData's task: class-weighted cross-entropy, or masked BCE (multi-label)."""
    if data.task == "multilabel":
        return MaskedBCE(data.class_weights, data.uncertain_labels, label_smoothing)
    return WeightedCrossEntropy(data.class_weights, label_smoothing)


def metrics_for(data):
    """Trainer ``compute_metrics`` of a PreparedData's task (flat scalars; ``roc_auc`` is the macro
    AUROC for more than two classes, what ``metric_for_best_model`` reads)."""
    if data.task == "binary":
        return build_compute_metrics(data.positive_id)
    from cxr.operating_point import sigmoid

    from .labels import known
    from .metrics import compute_multiclass_metrics, compute_multilabel_metrics

    names = [data.id2label[i] for i in range(len(data.id2label))]
    keys = ("roc_auc", "micro_roc_auc", "accuracy", "macro_sensitivity", "macro_specificity", "macro_f1")

    def compute_metrics(eval_pred):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        if data.task == "multiclass":
            m = compute_multiclass_metrics(labels, compute_softmax(np.asarray(logits, dtype=np.float64)), names)
        else:
            m = compute_multilabel_metrics(known(labels), sigmoid(logits), names, [0.5] * len(names))
        out = {k: m[k] for k in keys}
        out.update({f"roc_auc_{n}": m["per_class"][n]["roc_auc"] for n in names})
        return out

    return compute_metrics


def fit_multiclass_operating_point(logits, labels, id2label: dict, *, policy: str = "equal_error",
                                   fitted_on: str = "the validation split",
                                   min_sensitivity: float = 0.95) -> OperatingPoint:
    """One temperature (NLL of the softmax over all classes); the decision is the arg-max. With a
    normal class (NORMAL / No Finding) the screening question, abnormal = P(abnormal) = 1 - P(normal)
    >= ``threshold``, gets its own threshold by ``policy`` (:func:`choose_threshold`, as binary)."""
    from .labels import find_normal_label

    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels).astype(int)
    normal = find_normal_label(id2label)
    temperature = compute_temperature(logits, labels) if len(np.unique(labels)) > 1 else 1.0
    common = dict(task="multiclass", normal_label=normal, temperature=temperature, n_fit=int(len(labels)),
                  positive_label=None)
    if normal is None:
        return OperatingPoint(policy="default", fitted_on=fitted_on, threshold=0.5,
                              source=f"arg-max of the softmax (temperature fitted on {fitted_on}); no normal class, "
                                     "so no screening threshold", **common)
    normal_id = next(k for k, v in id2label.items() if v == normal)
    y = (labels != normal_id).astype(int)
    if len(np.unique(y)) < 2:
        logger.warning("%s has normal or abnormal films only: screening threshold 0.5", fitted_on)
        return OperatingPoint(policy="default", fitted_on=fitted_on, fallback=True,
                              source=f"default 0.5 ({fitted_on} had one class only for the screening question)",
                              **common)
    p = 1.0 - compute_softmax(logits, temperature)[:, normal_id]
    t = choose_threshold(y, p, policy=policy, fitted_on=fitted_on, min_sensitivity=min_sensitivity)
    t["source"] = "screening (1 - P(" + normal + ")): " + t["source"]
    return OperatingPoint(**common, **t)


def fit_multilabel_operating_point(logits, codes, id2label: dict, *, policy: str = "equal_error",
                                   fitted_on: str = "the validation split", min_sensitivity: float = 0.95,
                                   uncertain_labels: str | None = None) -> OperatingPoint:
    """One temperature for every finding (BCE of sigmoid(logit / T) on the known labels), then one
    threshold per finding by ``policy`` on its known labels (:func:`choose_threshold`). A finding with
    fewer than :data:`MIN_FIT_PER_CLASS` known positive or negative films, or whose scores carry no
    information, keeps 0.5 and is listed in ``fallback_labels``. Uncertain labels are not fitted on."""
    from cxr.operating_point import sigmoid

    from .labels import find_normal_label, known
    from .metrics import compute_multilabel_temperature

    names = [id2label[i] for i in range(len(id2label))]
    y = known(codes)
    logits = np.asarray(logits, dtype=np.float64)
    temperature = compute_multilabel_temperature(logits, y) if np.isfinite(y).any() else 1.0
    p = sigmoid(logits, temperature)
    thresholds, fallback, chosen = {}, [], []
    for k, name in enumerate(names):
        m = ~np.isnan(y[:, k])
        yk = y[m, k].astype(int)
        if min(int(yk.sum()), int((1 - yk).sum())) < MIN_FIT_PER_CLASS:
            thresholds[name] = 0.5
            fallback.append(name)
            continue
        t = choose_threshold(yk, p[m, k], policy=policy, fitted_on=fitted_on, min_sensitivity=min_sensitivity)
        thresholds[name] = t["threshold"]
        if t["fallback"]:
            fallback.append(name)
        chosen.append(t["policy"])
    source = (f"{POLICIES[policy]} per finding on {fitted_on}".replace("min_sensitivity", f"{min_sensitivity:.0%}")
              + (f"; 0.5 for {', '.join(fallback)} (too few known films of a class, or no separation)"
                 if fallback else ""))
    return OperatingPoint(task="multilabel", temperature=temperature, thresholds=thresholds,
                          fallback_labels=fallback, normal_label=find_normal_label(names),
                          uncertain_labels=uncertain_labels, positive_label=None,
                          policy=policy if chosen else "default", source=source, fitted_on=fitted_on,
                          n_fit=int(len(y)), min_sensitivity=min_sensitivity, fallback=len(fallback) == len(names))


def fit_for_task(data, logits, labels, *, policy: str, fitted_on: str, min_sensitivity: float) -> OperatingPoint:
    """The operating point of a PreparedData's task, fitted on ``logits`` / ``labels``."""
    if data.task == "multiclass":
        return fit_multiclass_operating_point(logits, labels, data.id2label, policy=policy, fitted_on=fitted_on,
                                              min_sensitivity=min_sensitivity)
    if data.task == "multilabel":
        return fit_multilabel_operating_point(logits, labels, data.id2label, policy=policy, fitted_on=fitted_on,
                                              min_sensitivity=min_sensitivity,
                                              uncertain_labels=data.uncertain_labels)
    return fit_operating_point(logits, labels, data.positive_id, data.id2label, policy=policy,
                               min_sensitivity=min_sensitivity, fitted_on=fitted_on)


def score_split_labels(logits, labels, op: OperatingPoint, id2label: dict, *, n_boot: int = 1000,
                       seed: int = 0) -> dict:
    """All metrics of a multi-class or multi-label split at the operating point, with bootstrap CIs
    (per class: AUROC, sensitivity, specificity; summary: macro AUROC, accuracy)."""
    from functools import partial

    from .labels import known
    from .metrics import (compute_bootstrap_ci_per_class, compute_multiclass_metrics,
                          compute_multilabel_metrics)

    names = [id2label[i] for i in range(len(id2label))]
    probs = op.probabilities(np.asarray(logits, dtype=np.float64))
    if op.task == "multiclass":
        normal_id = names.index(op.normal_label) if op.normal_label in names else None
        fn = partial(compute_multiclass_metrics, names=names, normal_id=normal_id, threshold=op.threshold)
        y = np.asarray(labels).astype(int)
    else:
        fn = partial(compute_multilabel_metrics, names=names, thresholds=op.threshold_vector(names))
        y = known(labels)
    m = fn(y, probs)
    m["temperature"] = float(op.temperature)
    m["task"] = op.task
    if n_boot:
        if op.task == "multiclass":
            eye = np.eye(len(names))
            ci = compute_bootstrap_ci_per_class(eye[y], probs, eye[probs.argmax(axis=1)].astype(bool), names,
                                                n_boot=n_boot, seed=seed, accuracy="argmax")
        else:
            ci = compute_bootstrap_ci_per_class(y, probs, probs >= op.threshold_vector(names)[None, :], names,
                                                n_boot=n_boot, seed=seed, accuracy="per_label")
        for name in names:
            m["per_class"][name]["ci"] = ci["per_class"][name]
        m["ci"] = {"roc_auc": ci["roc_auc"], "accuracy": ci["accuracy"]}
        if "screening" in m:      # the screening question's own CIs, as a binary model's
            normal_id = names.index(op.normal_label)
            m["screening"]["ci"] = compute_bootstrap_ci((y != normal_id).astype(int), 1.0 - probs[:, normal_id],
                                                        op.threshold, n_boot=n_boot, seed=seed)
    return {k: nan_to_none(v) for k, v in m.items()}


def score_for_task(logits, labels, data, op: OperatingPoint, *, n_boot: int = 1000, seed: int = 0) -> dict:
    if op.task == "binary":
        return score_split(logits, labels, data.positive_id, op, n_boot=n_boot, seed=seed)
    return score_split_labels(logits, labels, op, data.id2label, n_boot=n_boot, seed=seed)
