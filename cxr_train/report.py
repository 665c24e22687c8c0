"""Typed values a training run hands from stage to stage (``train_hf.run``: arguments -> data ->
model -> train -> operating point -> scores -> facts -> folder -> push), and the two things made
from them: the card's facts and config.json's ``cxr_training`` (no dicts with optional keys: a
missing fact is an error, not a silent 0).

* :class:`RunEnvironment` - the machine and command of the run, captured once when it starts.
* :class:`RunData` - the prepared data of the shipped model (and the pool cross-validation folds).
* :class:`Fitted` - one trained model, its logits, its size and how long and far it trained.
* :class:`CVResult` - what cross-validation measured: out-of-fold logits, folds, patients, the
  folds' own training time.
* :class:`CVScores` - those logits scored at the operating point: per fold, mean ± sd, pooled
  (``cv_results.json``, the card's first table).
* :class:`RunReport` - everything a run produced that the card and config.json state;
  :func:`card_facts` and :func:`serving_facts` read it.
"""

from __future__ import annotations

import os
import platform
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cxr.facts import HEADLINE, SCHEMA, TrainingFacts
from cxr.operating_point import OperatingPoint

from .training import binary_labels, score_split, score_split_labels, summarise_folds

if TYPE_CHECKING:
    from transformers import Trainer

    from .config import RunArguments
    from .data import PreparedData
    from .hub import CardFacts

Precision = Literal["bf16", "fp32"]
PRECISION_TEXT: dict[str, str] = {"bf16": "bf16 autocast", "fp32": "fp32"}   # the card's and the log's words


@dataclass(frozen=True)
class RunEnvironment:
    """Where and how a run ran: captured once, at its start, for the card and the operating point."""
    precision: Precision            # what TrainingArguments.bf16 resolved to; the scores are computed in it
    hardware: str                   # the GPU's name, or "N CPU cores (machine)"
    command: str                    # "python train_hf.py ARGS", the arguments as given
    world_size: int                 # processes training together (accelerate launch)

    @classmethod
    def capture(cls, args: RunArguments) -> RunEnvironment:
        import torch

        hardware = (torch.cuda.get_device_name() if torch.cuda.is_available()
                    else f"{os.cpu_count()} CPU cores ({platform.machine()})")
        command = f"python train_hf.py {' '.join(shlex.quote(a) for a in args.argv)}".strip()
        return cls(precision="bf16" if args.training.bf16 else "fp32", hardware=hardware, command=command,
                   world_size=max(1, args.training.world_size))

    @property
    def precision_text(self) -> str:
        return PRECISION_TEXT[self.precision]


@dataclass(frozen=True)
class RunData:
    """The data of one run, prepared and checked once: ``data`` trains the shipped model; with
    ``--cv_folds``, ``pool`` is the whole training split the folds are cut from."""
    data: PreparedData
    pool: PreparedData | None = None


@dataclass
class Fitted:
    """One trained model and the logits of the splits it was asked to predict."""
    trainer: Trainer
    logits: dict[str, tuple[np.ndarray, np.ndarray]]    # split -> (logits, labels)
    trainable: int
    total: int
    train_seconds: float
    epochs: float = 0.0             # Trainer state at the end (0 without --do_train)
    steps: int = 0


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


@dataclass(frozen=True)
class RunReport:
    """What one ``train_hf.run`` produced, for the model card and config.json."""
    args: RunArguments
    env: RunEnvironment
    data: PreparedData              # the shipped model's
    fitted: Fitted                  # the shipped model
    image_size: int                 # the processor's input size
    operating_point: OperatingPoint
    metrics: dict[str, dict] = field(default_factory=dict)     # split -> metrics (validation, test, external)
    cv: CVScores | None = None
    figures: dict[str, str] = field(default_factory=dict)      # figure -> file in the folder


STRATEGY_TEXT = {
    "frozen": "frozen backbone, classification head trained",
    "partial": "last {partial_stages} backbone stage(s) and the head fine-tuned",
    "full": "all weights trained{how}",
    "lora": "LoRA (r={lora_r}, alpha={lora_alpha}) merged into the base weights",
}


def card_facts(report: RunReport) -> CardFacts:
    """The model card's facts of a run, from its typed report alone."""
    from .data import describe_augmentation
    from .hub import KERMANY_NOTE, CardFacts
    from .modeling import is_preset

    args, data, fitted, cv, env = report.args, report.data, report.fitted, report.cv, report.env
    model_args, data_args, training_args = args.model, args.data, args.training
    preset = is_preset(model_args.model_name_or_path)
    dataset = data_args.dataset_name
    local = Path(dataset).exists()
    is_kermany = ("chest_xray" in dataset.lower() or "kermany" in dataset.lower()
                  or data_args.label_from_filename == "kermany3")   # Kermany's own file names
    strategy_text = STRATEGY_TEXT[model_args.strategy].format(
        partial_stages=model_args.partial_stages, lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
        how=" from random initialisation" if preset else ", fine-tuned")
    return CardFacts(
        model_name=training_args.hub_model_id or Path(training_args.output_dir).name,
        repo_id=training_args.hub_model_id or training_args.output_dir,
        dataset_id=Path(dataset).name if local else dataset, dataset_is_hub=not local,
        dataset_name="Kermany 2018 paediatric chest X-ray" if is_kermany else Path(dataset).name,
        dataset_note=KERMANY_NOTE if is_kermany else "",
        base_model=None if preset else model_args.model_name_or_path,
        base_model_text=f"none: {model_args.model_name_or_path} preset, random init" if preset
        else model_args.model_name_or_path,
        labels=list(data.id2label.values()),
        positive_label=data.id2label[data.positive_id] if data.task == "binary" else "",
        task=data.task, uncertain_labels=data.uncertain_labels, label_rule=data.label_from_filename,
        strategy=model_args.strategy, strategy_text=strategy_text,
        trainable_text=f"{fitted.trainable:,} of {fitted.total:,} ({100 * fitted.trainable / fitted.total:.1f}%)",
        n_train=data.size("train"), n_validation=data.size("validation"),   # a stream: its first pass's count
        validation_text=("carved out of the training split, stratified and grouped by patient "
                         f"({data_args.validation_fraction:.0%} of patients, seed {training_args.seed})")
        if not data_args.validation_split else f"the dataset's '{data_args.validation_split}' split",
        image_size=report.image_size,
        epochs=round(fitted.epochs, 2), steps=fitted.steps,
        batch_size=training_args.per_device_train_batch_size * env.world_size,
        learning_rate=training_args.learning_rate,
        class_weights=[round(w, 3) for w in data.class_weights],
        precision=env.precision_text,
        augmentation=describe_augmentation(data_args.augment_strength) if data_args.augment else "none",
        train_time=f"{fitted.train_seconds / 60:.1f} min" + (f" (+ {cv.minutes} for {cv.k}-fold CV)" if cv else ""),
        hardware=env.hardware, command=env.command,
        operating_point=report.operating_point, metrics=report.metrics, cv=cv, is_kermany=is_kermany,
        figures=report.figures,
    )


def serving_facts(*, strategy: str, base_model: str, dataset: str, image_size: int, metrics: dict[str, dict],
                  cv: CVScores | None) -> dict:
    """config.json's ``cxr_training``, the serving contract: what the app's facts panel shows, read
    back by :func:`cxr.facts.read_training_facts` (versioned by ``schema``). Undefined (NaN) figures
    are left out."""
    def pick(m):
        return {k: round(float(m[k]), 4) for k in HEADLINE if m.get(k) is not None and m[k] == m[k]}

    facts = TrainingFacts(strategy=strategy, base_model=base_model, dataset=dataset, image_size=image_size)
    if metrics.get("validation"):
        facts.validation_metrics = pick(metrics["validation"])
    if cv:
        facts.cv_metrics = {"k": cv.k, **{k: {"mean": round(v["mean"], 4), "sd": round(v["sd"], 4)}
                                          for k, v in cv.summary.items() if k in HEADLINE}}
    if metrics.get("external"):
        facts.external_metrics = {"n": metrics["external"]["n_samples"], **pick(metrics["external"])}
    return {"schema": SCHEMA, **facts.to_dict()}

