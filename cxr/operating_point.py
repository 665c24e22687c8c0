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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

CONFIG_KEY = "cxr_operating_point"
NO_OPERATING_POINT = "default 0.5 (the model has no saved operating point)"

# Policies a threshold can come from (the ``policy`` field).
POLICIES = {
    "equal_error": "sensitivity = specificity",
    "youden": "Youden's J (sensitivity + specificity - 1) maximal",
    "default": "0.5 on the calibrated probability",
    "sensitivity_floor": "the most specific threshold keeping sensitivity >= min_sensitivity",
}


def positive_class_id(id2label: dict, positive_label: str | None = None) -> int:
    """The one positive-class rule (training and serving): the named label if given and present,
    else the only class that is not NORMAL, else index 1."""
    names = {int(k): v for k, v in id2label.items()}
    if positive_label is not None and positive_label in names.values():
        return next(k for k, v in names.items() if v == positive_label)
    others = [k for k, v in names.items() if str(v).upper() != "NORMAL"]
    return others[0] if len(others) == 1 else 1


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
    threshold; with more classes the call is the argmax and ``positive`` is that it is the positive class."""
    probabilities: np.ndarray       # (N, C), temperature-scaled softmax
    probability: np.ndarray         # (N,), positive class
    positive: np.ndarray            # (N,) bool
    borderline: np.ndarray          # (N,) bool
    label_ids: np.ndarray           # (N,) the called class index


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

    # ------------------------------------------------------------ config.json
    def to_config(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

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
        return op

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
        """Calibrated (temperature-scaled) softmax, (N, C)."""
        return softmax(logits, self.temperature)

    def apply(self, logits, positive_id: int) -> Decision:
        """The one decision rule (Predictor, training's external scoring, app, experiments)."""
        probs = self.probabilities(np.atleast_2d(np.asarray(logits, dtype=np.float64)))
        p = probs[:, positive_id]
        if probs.shape[1] == 2:
            positive = self.decide(p)
            ids = np.where(positive, positive_id, 1 - positive_id)
        else:
            ids = probs.argmax(axis=1)
            positive = ids == positive_id
        return Decision(probs, p, positive, self.borderline(p), ids)

    def decide(self, positive_probability) -> np.ndarray:
        """True where the positive class is called (at or above the threshold)."""
        return np.asarray(positive_probability) >= self.threshold

    def borderline(self, positive_probability) -> np.ndarray:
        return np.abs(np.asarray(positive_probability) - self.threshold) < self.borderline_margin

    def describe(self) -> str:
        return (f"threshold {self.threshold:.3f} ({self.source}); temperature {self.temperature:.3f}"
                + (f"; high-sensitivity threshold {self.high_sensitivity_threshold:.3f} "
                   f"(sensitivity >= {self.min_sensitivity:.0%})" if self.high_sensitivity_threshold is not None
                   and self.min_sensitivity is not None else "")
                + (f"; {self.calibration_text()}" if self.calibrated_on else ""))
