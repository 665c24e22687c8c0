"""Why out-of-fold specificity overstates new-patient specificity (issue #19): read a run's
``oof_scores.json`` and report

- that no patient is in two folds (the CV leak check, per fold pair);
- out-of-fold specificity per NORMAL series (``IM-`` vs ``NORMAL2-IM-`` file names) and per
  patient-number band within ``NORMAL2-IM-`` (Kermany numbers patients in order of arrival, so
  a band is an era); sensitivity per ``person<N>`` band;
- how many OOF normals the model calls PNEUMONIA with p > 0.5 (over-confidence).

    python -m experiments.oof_gap models/efficientnet-lite0-imagenet-full/oof_scores.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from cxr_train.data import fold_overlaps

NORMAL2_BANDS = ((0, 700), (700, 1100), (1100, 1300), (1300, 1500))
PERSON_BANDS = ((0, 500), (500, 1000), (1000, 1500), (1500, 2000))


def _number(name: str) -> int:
    m = re.search(r"IM-(\d+)", name) or re.search(r"person(\d+)", name)
    return int(m.group(1)) if m else -1


def analyse(oof: dict) -> dict:
    thr = float(oof["operating_point"]["threshold"])
    s, y, files = np.asarray(oof["scores"]), np.asarray(oof["labels"]), oof["files"]
    num = np.array([_number(n) for n in files])
    normal2 = np.array([n.startswith("NORMAL2-") for n in files])
    neg, pos = y == 0, y == 1

    def spec(m):
        return {"n": int(m.sum()), "specificity": round(float((s[m] < thr).mean()), 3) if m.any() else None}

    def sens(m):
        return {"n": int(m.sum()), "sensitivity": round(float((s[m] >= thr).mean()), 3) if m.any() else None}

    return {
        "threshold": thr,
        "fold_overlaps": fold_overlaps(oof["patients"], oof["fold"]),
        "patients_per_fold": {int(k): len(set(np.asarray(oof["patients"])[np.asarray(oof["fold"]) == k]))
                              for k in sorted(set(oof["fold"]))},
        "normal_series": {"IM-": spec(neg & ~normal2), "NORMAL2-IM-": spec(neg & normal2)},
        "normal2_bands": {f"{lo}-{hi - 1}": spec(neg & normal2 & (num >= lo) & (num < hi)) for lo, hi in NORMAL2_BANDS},
        "person_bands": {f"{lo}-{hi - 1}": sens(pos & (num >= lo) & (num < hi)) for lo, hi in PERSON_BANDS},
        "normals_above_0.5": int((s[neg] > 0.5).sum()), "normals": int(neg.sum()),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("oof_scores", type=Path)
    a = ap.parse_args(argv)
    print(json.dumps(analyse(json.loads(a.oof_scores.read_text())), indent=1))


if __name__ == "__main__":
    main()
