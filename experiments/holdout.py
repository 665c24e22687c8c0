"""A patient-grouped hold-out carved out of the training split *before* any lever is tuned (issue #19).

Out-of-fold scores of a K-fold CV are the scores every choice of the recipe was made on (the
threshold included), so they flatter the recipe. This carves ~15 % of the patients, stratified
by label and grouped by patient (``cxr_train.data.split_by_patient``, fixed seed), writes the
list of held-out patients (``--manifest``, committed, so every study scores the same films) and
lays out two symlinked image folders for ``train_hf.py``:

    <out>/pool/train/<LABEL>/<file>   the ~85 % that trains (validation is carved out of it by patient)
    <out>/holdout/<LABEL>/<file>      scored once per lever, never trained or tuned on

    python -m experiments.holdout --data ../shared/data/chest_xray_224 --out outputs/holdout_data \\
        --manifest docs/levers/holdout_patients.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxr.locate import image_files


def carve(files: list[Path], fraction: float, seed: int) -> set[str]:
    """Patient ids of a stratified, patient-grouped hold-out of about ``fraction`` of the films:
    the validation side of ``cxr_train.data.split_by_patient`` (the split ``cxr-train`` carves),
    with the label a film's folder name and the patient its file name's (else the file stem)."""
    from datasets import Dataset

    from cxr_train.data import split_by_patient

    names = [f.parent.name for f in files]
    classes = sorted(set(names))       # codes in name order: the strata StratifiedGroupKFold sorts by
    table = Dataset.from_dict({"label": [classes.index(n) for n in names],
                               "patient_id": [patient_of(f) for f in files]})
    return set(split_by_patient(table, fraction, seed)[1]["patient_id"])


def patient_of(f: Path) -> str:
    from cxr_train.data import patient_id_from_filename

    return patient_id_from_filename(f.name) or f.stem


def layout(files: list[Path], held: set[str], out: Path) -> dict:
    counts: dict = {}
    for f in files:
        part = "holdout" if patient_of(f) in held else "pool/train"
        dst = out / part / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(f.resolve())
        counts.setdefault(part, {}).setdefault(f.parent.name, 0)
        counts[part][f.parent.name] += 1
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="image folder <split>/<LABEL>/<file> or <LABEL>/<file>")
    ap.add_argument("--out", required=True, help="where the symlinked pool/ and holdout/ folders go")
    ap.add_argument("--manifest", required=True, help="JSON list of held-out patients (read if it exists)")
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args(argv)
    files = image_files(a.data)
    manifest = Path(a.manifest)
    if manifest.exists():   # the committed hold-out: the same films for every study
        held = set(json.loads(manifest.read_text())["patients"])
    else:
        held = carve(files, a.fraction, a.seed)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"fraction": a.fraction, "seed": a.seed, "patients": sorted(held)},
                                       indent=1) + "\n")
    counts = layout(files, held, Path(a.out))
    print(json.dumps({"patients_held_out": len(held), "images": counts}))


if __name__ == "__main__":
    main()
