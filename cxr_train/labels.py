"""Label sets (issue #29, docs/label_sets.md): binary, multi-class and multi-label, as training sees them.

* **binary** and **multiclass**: one label per film, a ``ClassLabel`` column ``label`` (class ids);
  the task is "binary" with two classes, "multiclass" with three or more.
* **multilabel**: 0..K findings per film, a ``label`` column of K float codes per film:
  ``1`` present, ``0`` absent, ``-1`` uncertain (CheXpert's "uncertain" mention). A blank CheXpert
  cell ("not mentioned") is read as ``0``, the usual convention (Irvin et al. 2019). The uncertain
  policy (``--uncertain_labels``) decides what ``-1`` trains as: ``ones`` (U-Ones), ``zeros``
  (U-Zeros) or ``ignore`` (masked out of the loss, U-Ignore). Uncertain labels are never scored:
  metrics and per-finding thresholds use the films whose finding is known (0 or 1).

:class:`FilenameLabeler` maps file names to labels (``--label_from_filename``): the Kermany file
names carry a second task, bacterial vs viral pneumonia (``person<N>_bacteria_*`` /
``person<N>_virus_*``), so ``kermany3`` gives NORMAL / BACTERIAL / VIRAL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr.operating_point import NORMAL_NAMES, PROBLEM_TYPES, UNCERTAIN_POLICIES, find_normal_label  # noqa: F401

UNCERTAIN = -1.0          # the code of an uncertain label in a multi-label target

# Named rules for --label_from_filename: label -> regular expression searched in the file name,
# tried in order (the first match wins; the order is also the class order of the model).
FILENAME_PRESETS = {
    # Kermany et al. 2018: NORMAL films are IM-<n>-<k>.jpeg / NORMAL2-IM-<n>-<k>.jpeg; pneumonia films
    # person<N>_bacteria_<k>.jpeg / person<N>_virus_<k>.jpeg.
    "kermany3": (("NORMAL", r"^(NORMAL2-)?IM-\d+"), ("BACTERIAL", r"^person\d+_bacteria_"),
                 ("VIRAL", r"^person\d+_virus_")),
}


class LabelError(ValueError):
    """A label specification that cannot be used (raised as the data's DataError by its callers)."""


def task_of(n_labels: int, multilabel: bool) -> str:
    """"binary" | "multiclass" | "multilabel"."""
    if multilabel:
        return "multilabel"
    return "binary" if n_labels == 2 else "multiclass"


def problem_type(task: str) -> str:
    """transformers' ``problem_type`` for a task: what ``pipeline()`` reads to apply softmax or sigmoid."""
    return PROBLEM_TYPES[task]


@dataclass(frozen=True)
class FilenameLabeler:
    """File name -> label by regular expressions (``re.search`` on the file's name, not its folders);
    the first rule that matches wins. ``labels``: the class order (the rules' order)."""
    rules: tuple                   # ((label, compiled pattern), ...)
    spec: str                      # how it was given (for the card and run_config)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(label for label, _ in self.rules))

    @classmethod
    def parse(cls, spec) -> "FilenameLabeler":
        """``spec``: a preset name (``kermany3``), or ``LABEL=REGEX`` items (a list, or one string
        separated by commas), e.g. ``NORMAL=^IM- BACTERIAL=_bacteria_ VIRAL=_virus_``."""
        items = [spec] if isinstance(spec, str) else list(spec or [])
        if len(items) == 1 and "=" not in items[0] and "," not in items[0]:
            name = items[0].strip()
            if name not in FILENAME_PRESETS:
                raise LabelError(f"unknown --label_from_filename preset '{name}': choose one of "
                                 f"{', '.join(FILENAME_PRESETS)} or give LABEL=REGEX pairs")
            pairs = FILENAME_PRESETS[name]
            text = name
        else:
            flat = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
            pairs = []
            for p in flat:
                label, sep, pattern = p.partition("=")
                if not sep or not label.strip() or not pattern:
                    raise LabelError(f"--label_from_filename: '{p}' is not LABEL=REGEX")
                pairs.append((label.strip(), pattern))
            text = " ".join(flat)
        rules = []
        for label, pattern in pairs:
            try:
                rules.append((label, re.compile(pattern)))
            except re.error as e:
                raise LabelError(f"--label_from_filename: the pattern of {label} ('{pattern}') is not a valid "
                                 f"regular expression: {e}") from None
        labeler = cls(tuple(rules), text)
        if len(labeler.labels) < 2:
            raise LabelError(f"--label_from_filename needs at least two labels, got {labeler.labels}")
        return labeler

    def __call__(self, name: str) -> str | None:
        stem = Path(str(name)).name
        for label, pattern in self.rules:
            if pattern.search(stem):
                return label
        return None

    def label_all(self, names, where: str = "the data") -> list[str]:
        """The label of every file name; a LabelError naming a few files no rule matches."""
        out = [self(n) for n in names]
        missed = [Path(str(n)).name for n, lab in zip(names, out) if lab is None]
        if missed:
            raise LabelError(f"--label_from_filename ({self.spec}): {len(missed)} file(s) of {where} match no rule "
                             f"({', '.join(missed[:5])}{', ...' if len(missed) > 5 else ''}); the rules: "
                             + "; ".join(f"{lab}={pat.pattern}" for lab, pat in self.rules))
        return out


# ---------------------------------------------------------------- multi-label codes

def parse_code(value) -> float:
    """One CheXpert-style cell -> 1.0, 0.0 or -1.0 (blank / None / NaN -> 0.0: not mentioned).
    Raises LabelError for anything else."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return 0.0
        try:
            value = float(s)
        except ValueError:
            raise LabelError(f"'{value}' is not a finding label (1, 0, -1 or blank)") from None
    if isinstance(value, bool):
        return float(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"{value!r} is not a finding label (1, 0, -1 or blank)") from None
    if v != v:
        return 0.0
    if v not in (1.0, 0.0, -1.0):
        raise LabelError(f"{value!r} is not a finding label (1, 0, -1 or blank)")
    return v


def is_code_column(values) -> bool:
    """True when every value is a finding label (1, 0, -1, blank) and at least one is 1 or -1 or 0."""
    seen = False
    for v in values:
        try:
            c = parse_code(v)
        except LabelError:
            return False
        if v is not None and not (isinstance(v, str) and not v.strip()) and not (isinstance(v, float) and v != v):
            seen = seen or c in (1.0, 0.0, -1.0)
    return seen


def targets(codes, policy: str | None) -> np.ndarray:
    """Training targets from codes (N, K): -1 -> 1 (ones), 0 (zeros) or NaN (ignore: masked)."""
    y = np.asarray(codes, dtype=np.float32).copy()
    unc = y == UNCERTAIN
    if unc.any():
        if policy not in UNCERTAIN_POLICIES:
            raise LabelError("uncertain (-1) labels need --uncertain_labels ones|zeros|ignore")
        y[unc] = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[policy]
    return y


def known(codes) -> np.ndarray:
    """Codes (N, K) -> float with uncertain labels as NaN: what metrics and thresholds are fitted on."""
    y = np.asarray(codes, dtype=np.float64).copy()
    y[y == UNCERTAIN] = np.nan
    return y


def pos_weights(codes, policy: str | None, names) -> list[float]:
    """BCE ``pos_weight`` per finding: negatives / positives among the training targets. A finding with
    no positive (or no negative) training film is a LabelError naming it."""
    y = targets(codes, policy)
    pos = np.nansum(y == 1, axis=0)
    neg = np.nansum(y == 0, axis=0)
    no_pos = [names[i] for i in np.flatnonzero(pos == 0)]
    if no_pos:
        raise LabelError(f"finding(s) with no positive training films: {', '.join(no_pos)} (a class with no "
                         "examples cannot be learned; drop the column or add films)")
    no_neg = [names[i] for i in np.flatnonzero(neg == 0)]
    if no_neg:
        raise LabelError(f"finding(s) present on every training film: {', '.join(no_neg)} (nothing to tell apart)")
    return (neg / pos).astype(float).tolist()


def strata(labels) -> np.ndarray:
    """A class id per film for stratified splits: the label itself (one label per film), or for
    multi-label codes the rarest finding present on the film (K when none is)."""
    y = np.asarray(labels)
    if y.ndim == 1:
        return y
    present = y == 1
    prevalence = present.sum(axis=0)
    order = np.argsort(prevalence, kind="stable")          # rarest first
    key = np.full(len(y), y.shape[1], dtype=int)
    for k in order[::-1]:                                  # the rarest present finding is written last
        key[present[:, k]] = k
    return key
