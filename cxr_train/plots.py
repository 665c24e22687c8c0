"""Figures for model cards and the comparison study (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402
from .metrics import compute_reliability  # noqa: E402


def render_roc(curves: dict[str, tuple], path: str | Path, title: str = "ROC (validation)") -> Path:
    """curves: name -> (labels, scores)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUROC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def render_calibration(y, s_raw, s_cal, path: str | Path, n_bins: int = 10) -> Path:
    """Reliability diagram before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    edges = np.linspace(0, 1, n_bins + 1)
    for name, s in (("uncalibrated", s_raw), ("temperature-scaled", s_cal)):
        xs, ys, _ = compute_reliability(y, s, n_bins)     # the ECE's own bins
        ax.plot(xs, ys, "o-", ms=3, label=name)
    ax.plot(edges, edges, "k:", lw=0.8)
    ax.set(xlabel="predicted P(positive)", ylabel="observed fraction positive", title="Calibration (validation)",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def render_confusions(matrices: dict[str, list], path: str | Path, labels=("NORMAL", "PNEUMONIA")) -> Path:
    """One confusion matrix per name (rows: true class, columns: called class), five to a row."""
    n = len(matrices)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, cm) in zip(axes.flat, matrices.items()):
        cm = np.asarray(cm)
        ax.axis("on")
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > cm.max() / 2 else "black")
        ticks = list(range(len(labels)))
        ax.set_xticks(ticks, [lab[:4] for lab in labels], fontsize=6)
        ax.set_yticks(ticks, [lab[:4] for lab in labels], fontsize=6)
        ax.set_title(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def render_learning_curves(rows: list[dict], path: str | Path, metric: str = "roc_auc") -> Path:
    """rows: dicts with 'arm', 'n_per_class' (int, or the full size), metric."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for arm in dict.fromkeys(r["arm"] for r in rows):
        pts = sorted((r["n_per_class"], r[metric]) for r in rows if r["arm"] == arm)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=arm)
    ax.set_xscale("log")
    ax.set(xlabel="training images per class (log)", ylabel=f"validation {metric}", title="Low-data study")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def render_training_curves(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """Training loss and validation AUROC against the optimizer step, one line per arm
    (``histories``: arm -> the Trainer's ``log_history``)."""
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, hist in histories.items():
        loss = [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h]
        auc = [(h["step"], h["eval_roc_auc"]) for h in hist if h.get("eval_roc_auc") is not None]
        if loss:
            ax_loss.plot(*zip(*loss), label=arm)
        if auc:
            ax_auc.plot(*zip(*auc), marker="o", label=arm)
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax_auc.set(xlabel="step", ylabel="validation AUROC", title="Validation AUROC")
    ax_auc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def render_label_set_figures(out_dir: str | Path, logits, labels, id2label: dict, op) -> dict:
    """Model-card figures of a multi-class or multi-label model on validation: one-vs-rest ROC of
    every class / finding (its calibrated probability; unknown multi-label entries left out) and,
    multi-class, the confusion matrix at the arg-max decision. Returns {"roc": ..., "confusion": ...}."""
    names = [id2label[i] for i in range(len(id2label))]
    probs = op.probabilities(np.asarray(logits, dtype=np.float64))
    y = np.asarray(labels)
    curves = {}
    for k, name in enumerate(names):
        if op.task == "multiclass":
            yk, pk = (y == k).astype(int), probs[:, k]
        else:
            m = (y[:, k] == 0) | (y[:, k] == 1)
            yk, pk = y[m, k].astype(int), probs[m, k]
        if 0 < yk.sum() < yk.size:
            curves[name] = (yk, pk)
    out_dir = Path(out_dir)
    figures = {}
    if curves:
        render_roc(curves, out_dir / "roc_validation.png", title="ROC per class, one-vs-rest (validation)")
        figures["roc"] = "roc_validation.png"
    if op.task == "multiclass":
        cm = np.zeros((len(names), len(names)), dtype=int)
        np.add.at(cm, (y.astype(int), probs.argmax(axis=1)), 1)
        render_confusions({"validation (rows: true, columns: called)": cm.tolist()},
                          out_dir / "confusion_validation.png", labels=names)
        figures["confusion"] = "confusion_validation.png"
    return figures
