"""Typed results of a training run, handed from ``train_hf.run`` to the card, config.json and
the JSON files (no dicts with optional keys: a missing fact is an error, not a silent 0).

* :class:`CVResult` - what cross-validation measured: out-of-fold logits, folds, patients, the
  folds' own training time.
* :class:`CVScores` - those logits scored at the operating point: per fold, mean ± sd, pooled
  (``cv_results.json``, the card's first table).
* :class:`RunReport` - everything a run produced that the card states
  (``CardFacts.from_report`` in :mod:`cxr_train.hub`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from cxr.operating_point import OperatingPoint

from .training import binary_labels, score_split, score_split_labels, summarise_folds


@dataclass
class CVResult:
    """Patient-grouped K-fold cross-validation: every training image scored once by the model
    that never saw its patient."""
    k: int
    oof_logits: np.ndarray          # (n, classes)
    labels: np.ndarray              # (n,) class ids
    fold: np.ndarray                # (n,) fold of each image
    names: list[str]                # file names
    patients: list[str]
    train_seconds: float            # sum of the folds' Trainer.train wall time

    def score(self, op: OperatingPoint, positive_id: int, seed: int, id2label: dict | None = None) -> "CVScores":
        """Per-fold metrics at the (OOF-fitted) operating point, mean ± sd, and the pooled OOF metrics
        (multi-class / multi-label: ``id2label`` names the classes)."""
        def score(logits, labels, **kw):
            if op.task == "binary":
                return score_split(logits, labels, positive_id, op, **kw)
            return score_split_labels(logits, labels, op, id2label, **kw)

        per_fold = [score(self.oof_logits[self.fold == i], self.labels[self.fold == i], n_boot=0)
                    for i in range(self.k)]
        pooled = score(self.oof_logits, self.labels, seed=seed)
        return CVScores(k=self.k, per_fold=per_fold, summary=summarise_folds(per_fold), pooled=pooled,
                        train_seconds=float(self.train_seconds))

    def oof_json(self, op: OperatingPoint, positive_id: int, id2label: dict | None = None) -> dict:
        """``oof_scores.json``: calibrated out-of-fold score of every training image, with its file, patient, fold
        (more than two classes: every class's probability, and the labels as class ids or codes)."""
        if op.task != "binary":
            return {"operating_point": op.to_config(), "files": self.names, "patients": self.patients,
                    "fold": self.fold.tolist(), "labels_names": [id2label[i] for i in range(len(id2label))],
                    "labels": self.labels.tolist(),
                    "probabilities": np.round(op.probabilities(self.oof_logits), 6).tolist()}
        return {"operating_point": op.to_config(), "files": self.names, "patients": self.patients,
                "fold": self.fold.tolist(), "labels": binary_labels(self.labels, positive_id).tolist(),
                "scores": [round(float(x), 6) for x in op.probabilities(self.oof_logits)[:, positive_id]]}


@dataclass
class CVScores:
    k: int
    per_fold: list[dict]
    summary: dict                   # metric -> {"mean", "sd"}
    pooled: dict
    train_seconds: float

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def minutes(self) -> str:
        return f"{self.train_seconds / 60:.1f} min"


@dataclass
class RunReport:
    """What one ``train_hf.run`` produced, for the model card and config.json."""
    argv: list[str] | None
    model_args: object
    data_args: object
    training_args: object
    data: object                    # cxr_train.data.PreparedData of the shipped model
    fitted: object                  # train_hf.Fitted of the shipped model
    operating_point: OperatingPoint
    metrics: dict = field(default_factory=dict)     # split -> metrics (validation, test, external)
    cv: CVScores | None = None
