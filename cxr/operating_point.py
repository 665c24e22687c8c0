"""The operating point: the one contract between training, the model card and serving.

A model folder's ``config.json`` holds ``cxr_operating_point``: the temperature that
calibrates the softmax, the decision threshold on the calibrated positive-class probability,
the policy that chose it and on which scores. :class:`OperatingPoint` reads and writes that
dict, turns logits into calibrated probabilities and probabilities into decisions. It needs
numpy only (serving imports it); fitting it on scores lives in :mod:`cxr_train.training`, refitting
it on a labelled sample of a new site in :mod:`cxr_train.calibrate` (``cxr-calibrate``).

Fields added later are optional and default to "not recorded", so every config.json written
before them still loads: ``fallback`` (the fitting fell back to 0.5 because the scores carried no
information), and the site-calibration provenance (``calibrated_on``, ``calibrated_date``,
``n_per_class``, ``sensitivity_confidence``, ``previous``: the operating point it replaced).

Label sets (issue #29, docs/label_sets.md): ``task`` is ``"binary"`` (the default: every
config.json written before it), ``"multiclass"`` (temperature-scaled softmax, arg-max class, and a
screening point P(abnormal) = 1 - P(``normal_label``) >= ``threshold`` when the label set has a
normal class) or ``"multilabel"`` (sigmoid(logit / temperature) per finding against its own
``thresholds[finding]``; ``fallback_labels``: findings whose threshold fell back to 0.5;
``uncertain_labels``: how -1 labels were trained). The new fields are written only when they
say something, so a binary operating point's config dict is what it was before them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

CONFIG_KEY = "cxr_operating_point"
TASKS = ("binary", "multiclass", "multilabel")
PROBLEM_TYPES = {"binary": "single_label_classification", "multiclass": "single_label_classification",
                 "multilabel": "multi_label_classification"}
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
NORMAL_NAMES = ("normal", "no finding")      # a label set's normal class, case-insensitive
NO_OPERATING_POINT = "default 0.5 (the model has no saved operating point)"

# Policies a threshold can come from (the ``policy`` field).
POLICIES = {
    "equal_error": "sensitivity = specificity",
    "youden": "Youden's J (sensitivity + specificity - 1) maximal",
    "default": "0.5 on the calibrated probability",
    "sensitivity_floor": "the most specific threshold keeping sensitivity >= min_sensitivity",
    "shift_floor": "the most specific threshold keeping sensitivity >= min_sensitivity clean and under every "
                   "simulated acquisition change of severity 1-2",
}


def positive_class_id(id2label: dict, positive_label: str | None = None) -> int:
    """The one positive-class rule (training and serving): the named label if given and present,
    else the only class that is not NORMAL, else index 1."""
    names = {int(k): v for k, v in id2label.items()}
    if positive_label is not None and positive_label in names.values():
        return next(k for k, v in names.items() if v == positive_label)
    others = [k for k, v in names.items() if str(v).upper() != "NORMAL"]
    return others[0] if len(others) == 1 else 1


def find_normal_label(labels) -> str | None:
    """The label set's normal class ("NORMAL" or "No Finding", case-insensitive), or None."""
    names = list(labels.values()) if isinstance(labels, dict) else list(labels)
    hits = [n for n in names if str(n).strip().lower() in NORMAL_NAMES]
    return hits[0] if len(hits) == 1 else None


def label_list(labels) -> list[str]:
    """Labels in class-index order from an id2label dict (int or str keys) or a sequence."""
    if isinstance(labels, dict):
        items = sorted(((int(k), v) for k, v in labels.items()), key=lambda kv: kv[0])
        if [k for k, _ in items] != list(range(len(items))):
            raise ValueError(f"id2label keys are not 0..{len(items) - 1}: {[k for k, _ in items]}")
        return [str(v) for _, v in items]
    return [str(v) for v in labels]


def sigmoid(logits, temperature: float = 1.0) -> np.ndarray:
    """sigmoid(logit / T), element-wise, without overflow."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Decision:
    """What the operating point says of a batch of logits: per row the calibrated probabilities,
    the positive-class probability, whether the positive class is called, and whether the call
    is borderline (within ``borderline_margin`` of the threshold). Binary tasks only decide by
    threshold; a binary-task operating point on more than two classes (a legacy config) calls the
    argmax and ``positive`` is that it is the positive class.

    multiclass: ``label_ids`` the arg-max; ``probability`` / ``positive`` / ``borderline`` are the
    screening decision (P(abnormal) = 1 - P(normal) against ``threshold``), None without a normal class.
    multilabel: ``probabilities`` are per-finding sigmoids, ``present`` each against its threshold,
    ``label_ids`` the most probable finding; ``probability`` / ``positive`` / ``borderline`` the
    screening decision (abnormal = the normal finding is not present), None without one.
    ``present`` (N, C): binary and multiclass one-hot of the called class; ``thresholds`` (C,):
    each class's threshold (NaN where the class has none)."""
    probabilities: np.ndarray       # (N, C), temperature-scaled softmax (sigmoid for multilabel)
    probability: np.ndarray | None  # (N,), positive class (binary) / P(abnormal) (screening)
    positive: np.ndarray | None     # (N,) bool: positive class called / abnormal
    borderline: np.ndarray | None   # (N,) bool
    label_ids: np.ndarray           # (N,) the called class index (multilabel: the most probable finding)
    task: str = "binary"
    present: np.ndarray | None = None       # (N, C) bool
    thresholds: np.ndarray | None = None    # (C,) float, NaN: no threshold for that class
    screening_threshold: float | None = None  # on P(abnormal); None: no screening decision

    @property
    def screening(self) -> bool:
        """True where a screening (abnormal vs normal) decision exists: binary always."""
        return self.positive is not None


@dataclass
class OperatingPoint:
    threshold: float = 0.5
    temperature: float = 1.0
    positive_label: str | None = None
    policy: str = "default"
    source: str = NO_OPERATING_POINT           # one plain sentence: what chose it, on what
    fitted_on: str | None = None               # e.g. "out-of-fold scores (5 folds, 5,216 images)"
    n_fit: int | None = None
    youden_threshold: float | None = None
    equal_error_threshold: float | None = None
    high_sensitivity_threshold: float | None = None
    min_sensitivity: float | None = None
    borderline_margin: float = 0.05            # |p - threshold| below this: "borderline"
    scored_in: str | None = None               # precision of the scores it was fitted on: "bf16" or "fp32"
    fallback: bool = False                     # True: fitting fell back to 0.5 (one class, or no separation)
    # site calibration (cxr_train.calibrate); None for an operating point fitted at training time
    calibrated_on: str | None = None           # the site / sample's name
    calibrated_date: str | None = None         # ISO date of the calibration
    n_per_class: dict | None = None            # films per label in the calibration sample
    sensitivity_confidence: float | None = None  # one-sided confidence that sensitivity >= min_sensitivity
    previous: dict | None = None               # the operating point this one replaced (its to_config())
    # label sets (issue #29); absent: a binary model
    task: str = "binary"                       # "binary" | "multiclass" | "multilabel"
    normal_label: str | None = None            # the normal class / finding (screening); None: none
    thresholds: dict | None = None             # multilabel: {finding: threshold}, one per finding
    fallback_labels: list | None = None        # multilabel: findings whose threshold fell back to 0.5
    uncertain_labels: str | None = None        # multilabel: how -1 labels were trained: ones|zeros|ignore

    _OPTIONAL = ("normal_label", "thresholds", "fallback_labels", "uncertain_labels")

    # ------------------------------------------------------------ config.json
    def to_config(self) -> dict:
        """The config.json dict. The label-set fields are written only when they say something
        (``task`` when not binary, the others when set), so binary dicts are unchanged."""
        out = {}
        for k, v in asdict(self).items():
            if (k == "task" and v == "binary") or (k in self._OPTIONAL and v is None):
                continue
            if isinstance(v, float):
                v = round(v, 6)
            elif k == "thresholds":
                v = {str(name): round(float(t), 6) for name, t in v.items()}
            elif k == "fallback_labels":
                v = [str(x) for x in v]
            out[k] = v
        return out

    @classmethod
    def from_config(cls, config) -> "OperatingPoint":
        """From a transformers config (or its dict); a model without one gets the 0.5 default."""
        raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
        if not raw:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"invalid {CONFIG_KEY}: not a mapping")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "fallback" not in raw:   # written before the field: the fitting's fallback said so in its source
            kwargs["fallback"] = raw.get("policy") == "default" and str(raw.get("source", "")).startswith(
                "default 0.5 (") and raw.get("source") != NO_OPERATING_POINT
        op = cls(**kwargs)
        if not (0.0 <= float(op.threshold) <= 1.0) or not float(op.temperature) > 0:
            raise ValueError(f"invalid {CONFIG_KEY}: threshold {op.threshold}, temperature {op.temperature}")
        for name in ("n_per_class", "previous"):
            if getattr(op, name) is not None and not isinstance(getattr(op, name), dict):
                raise ValueError(f"invalid {CONFIG_KEY}: {name} is not a mapping")
        op.fallback = bool(op.fallback)
        op._check_fields()
        labels, problem_type = _labels_and_problem_type(config)
        if labels is not None:
            op.validate(labels, problem_type)
        return op

    def _check_fields(self) -> None:
        """Types and ranges of the label-set fields (ValueError with the field's name)."""
        bad = f"invalid {CONFIG_KEY}:"
        if self.task is None:
            self.task = "binary"
        if self.task not in TASKS:
            raise ValueError(f"{bad} task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.normal_label is not None and not isinstance(self.normal_label, str):
            raise ValueError(f"{bad} normal_label is not a label name: {self.normal_label!r}")
        if self.thresholds is not None:
            if not isinstance(self.thresholds, dict):
                raise ValueError(f"{bad} thresholds is not a mapping of finding -> threshold")
            for name, t in self.thresholds.items():
                if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
                    raise ValueError(f"{bad} threshold of '{name}' is {t!r}, not a number in [0, 1]")
        if self.fallback_labels is not None and (
                not isinstance(self.fallback_labels, (list, tuple))
                or not all(isinstance(x, str) for x in self.fallback_labels)):
            raise ValueError(f"{bad} fallback_labels is not a list of label names")
        if self.uncertain_labels is not None and self.uncertain_labels not in UNCERTAIN_POLICIES:
            raise ValueError(f"{bad} uncertain_labels {self.uncertain_labels!r} is not one of "
                             f"{', '.join(UNCERTAIN_POLICIES)}")
        if self.task == "multilabel" and not self.thresholds:
            raise ValueError(f"{bad} a multilabel operating point needs thresholds (one per finding)")

    def validate(self, labels, problem_type: str | None = None) -> None:
        """Raise ValueError unless this operating point fits the model's labels (id2label dict or
        the label list) and its ``problem_type``: a multilabel threshold for every finding and for
        nothing else, the normal / positive label among the labels, at least three classes for
        multiclass. Binary operating points are checked as before (leniently: legacy configs load)."""
        names = label_list(labels)
        bad = f"{CONFIG_KEY} does not match the model's labels {names}:"
        if problem_type is not None and problem_type not in ("regression",) and self.task != "binary" \
                and problem_type != PROBLEM_TYPES[self.task]:
            raise ValueError(f"{CONFIG_KEY}.task is {self.task!r} but config.json's problem_type is "
                             f"{problem_type!r} (expected {PROBLEM_TYPES[self.task]!r})")
        if self.task == "binary":
            if problem_type == "multi_label_classification":
                raise ValueError(f"config.json's problem_type is 'multi_label_classification' but "
                                 f"{CONFIG_KEY} has no task 'multilabel' (a binary operating point)")
            return
        if len(set(names)) != len(names):
            raise ValueError(f"{bad} the labels are not unique")
        if self.task == "multiclass" and len(names) < 3:
            raise ValueError(f"{bad} a multiclass operating point needs at least 3 classes")
        if self.normal_label is not None and self.normal_label not in names:
            raise ValueError(f"{bad} normal_label '{self.normal_label}' is not one of them")
        if self.task == "multilabel":
            missing = [n for n in names if n not in self.thresholds]
            extra = [n for n in self.thresholds if n not in names]
            if missing:
                raise ValueError(f"{bad} no threshold for finding(s) {missing}")
            if extra:
                raise ValueError(f"{bad} thresholds for unknown finding(s) {extra}")
            unknown = [n for n in (self.fallback_labels or []) if n not in names]
            if unknown:
                raise ValueError(f"{bad} fallback_labels {unknown} are not findings of the model")

    @property
    def n_calibration(self) -> int | None:
        """Films in the site-calibration sample (None: not site-calibrated)."""
        return sum(int(v) for v in self.n_per_class.values()) if self.n_per_class else None

    def calibration_text(self) -> str | None:
        """"calibrated at site X on N films (date)", or None for a training-time operating point."""
        if not self.calibrated_on:
            return None
        counts = ", ".join(f"{v} {k}" for k, v in (self.n_per_class or {}).items())
        return (f"calibrated at site '{self.calibrated_on}' on {self.n_calibration or 0} films"
                + (f" ({counts})" if counts else "") + (f" on {self.calibrated_date}" if self.calibrated_date else ""))

    # ------------------------------------------------------------ use
    def probabilities(self, logits) -> np.ndarray:
        """Calibrated probabilities, (N, C): temperature-scaled softmax; for multilabel the
        sigmoid of each logit / temperature."""
        if self.task == "multilabel":
            return sigmoid(logits, self.temperature)
        return softmax(logits, self.temperature)

    def threshold_vector(self, labels) -> np.ndarray:
        """Each class's threshold in label order (multilabel: ``thresholds``; NaN elsewhere)."""
        names = label_list(labels)
        if self.task != "multilabel":
            return np.full(len(names), np.nan)
        missing = [n for n in names if n not in self.thresholds]
        if missing:
            raise ValueError(f"{CONFIG_KEY}: no threshold for finding(s) {missing}")
        return np.array([float(self.thresholds[n]) for n in names])

    @property
    def screening_threshold(self) -> float | None:
        """The threshold on P(abnormal) (None: no screening decision). multiclass: ``threshold``;
        multilabel: 1 - the normal finding's threshold; binary: ``threshold`` (on the positive class)."""
        if self.task == "binary":
            return float(self.threshold)
        if self.normal_label is None:
            return None
        if self.task == "multiclass":
            return float(self.threshold)
        return 1.0 - float(self.thresholds[self.normal_label])

    def apply(self, logits, positive_id: int | None = None, labels=None) -> Decision:
        """The one decision rule (Predictor, training's external scoring, app, experiments).

        binary: ``positive_id`` (or, without it, the positive class of ``labels``) is called at
        or above ``threshold``. multiclass / multilabel need ``labels`` (id2label or the label
        list, for the normal class and the per-finding thresholds); ``positive_id`` is ignored."""
        logits = np.atleast_2d(np.asarray(logits, dtype=np.float64))
        probs = self.probabilities(logits)
        n, c = probs.shape
        if self.task == "binary":
            if positive_id is None:
                if labels is None:
                    raise ValueError("OperatingPoint.apply: a binary decision needs positive_id or labels")
                positive_id = positive_class_id(dict(enumerate(label_list(labels))), self.positive_label)
            p = probs[:, positive_id]
            if c == 2:
                positive = self.decide(p)
                ids = np.where(positive, positive_id, 1 - positive_id)
            else:
                ids = probs.argmax(axis=1)
                positive = ids == positive_id
            return Decision(probs, p, positive, self.borderline(p), ids, task="binary",
                            present=np.eye(c, dtype=bool)[ids], thresholds=np.full(c, np.nan),
                            screening_threshold=float(self.threshold))
        if labels is None:
            raise ValueError(f"OperatingPoint.apply: a {self.task} decision needs the model's labels")
        names = label_list(labels)
        if len(names) != c:
            raise ValueError(f"OperatingPoint.apply: {c} logits per row but {len(names)} labels")
        self.validate(names)
        thresholds = self.threshold_vector(names)
        p_abn = positive = border = None
        if self.task == "multiclass":
            ids = probs.argmax(axis=1)
            present = np.eye(c, dtype=bool)[ids]
            if self.normal_label is not None:
                p_abn = 1.0 - probs[:, names.index(self.normal_label)]
                positive, border = self.decide(p_abn), self.borderline(p_abn)
        else:
            present = probs >= thresholds[None, :]
            ids = probs.argmax(axis=1)
            if self.normal_label is not None:
                k = names.index(self.normal_label)
                p_abn, positive = 1.0 - probs[:, k], ~present[:, k]
                border = np.abs(probs[:, k] - thresholds[k]) < self.borderline_margin
        return Decision(probs, p_abn, positive, border, ids, task=self.task, present=present,
                        thresholds=thresholds, screening_threshold=self.screening_threshold)

    def decide(self, positive_probability) -> np.ndarray:
        """True where the positive class is called (at or above the threshold)."""
        return np.asarray(positive_probability) >= self.threshold

    def borderline(self, positive_probability) -> np.ndarray:
        return np.abs(np.asarray(positive_probability) - self.threshold) < self.borderline_margin

    def describe(self) -> str:
        if self.task == "multilabel":
            ts = ", ".join(f"{k} {float(v):.3f}" for k, v in (self.thresholds or {}).items())
            return (f"multi-label: sigmoid per finding, temperature {self.temperature:.3f}; thresholds {ts} "
                    f"({self.source})" + (f"; fell back to 0.5: {', '.join(self.fallback_labels)}"
                                          if self.fallback_labels else "")
                    + (f"; {self.calibration_text()}" if self.calibrated_on else ""))
        if self.task == "multiclass":
            return (f"multi-class: arg-max of the softmax, temperature {self.temperature:.3f}"
                    + (f"; screening: abnormal when 1 - P({self.normal_label}) >= {self.threshold:.3f} "
                       f"({self.source})" if self.normal_label else "; no normal class, no screening threshold")
                    + (f"; {self.calibration_text()}" if self.calibrated_on else ""))
        return (f"threshold {self.threshold:.3f} ({self.source}); temperature {self.temperature:.3f}"
                + (f"; high-sensitivity threshold {self.high_sensitivity_threshold:.3f} "
                   f"(sensitivity >= {self.min_sensitivity:.0%})" if self.high_sensitivity_threshold is not None
                   and self.min_sensitivity is not None else "")
                + (f"; {self.calibration_text()}" if self.calibrated_on else ""))


def _labels_and_problem_type(config) -> tuple[list[str] | None, str | None]:
    """The model's labels and problem_type from a transformers config or its dict (None: not given)."""
    if isinstance(config, dict):
        id2label, names = config.get("id2label"), config.get("label_names")
        problem_type = config.get("problem_type")
    else:
        id2label, names = getattr(config, "id2label", None), None
        problem_type = getattr(config, "problem_type", None)
    if id2label:
        return label_list(id2label), problem_type
    if names:
        return label_list(names), problem_type
    return None, problem_type
