"""Training-side levers, each scored on a patient-grouped hold-out that no choice was tuned on (issue #19).

Every lever is one ``train_hf.py`` run of the default recipe
(``hub_configs/efficientnet-lite0-imagenet-full.yaml``, one change each) trained on the pool
of :mod:`experiments.holdout` (validation for early stopping and the operating point carved
out of the pool by patient) and then scored, once, on

- the hold-out (~15 % of the training split's patients, ``docs/levers/holdout_patients.json``),
  at the operating point the run saved (fitted on its validation split), and
- the 16 full-resolution films of later patients (``../shared/data/chest_xray_val_fullres``),
  the only films of *new* patients here (indicative: 8 + 8 films).

Runs are skipped when their folder is complete, so the queue can be restarted.

    python -m experiments.holdout --data ../shared/data/chest_xray_224 --out outputs/holdout_data \\
        --manifest docs/levers/holdout_patients.json
    python -m experiments.levers run --levers base res224 label_smoothing strong_aug res192 epochs6
    python -m experiments.levers report --out docs/levers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "hub_configs/efficientnet-lite0-imagenet-full.yaml"
POOL, HOLDOUT = "outputs/holdout_data/pool", "outputs/holdout_data/holdout"
RUNS = Path("outputs/levers")
COMMON = ["--config", CONFIG, "--cv_folds", "0", "--dataset_name", POOL, "--external_dataset", HOLDOUT]
LEVERS = {
    "base": [],                                                    # the shipped recipe: 160 px, 2 epochs
    "res192": ["--image_size", "192"],
    "res224": ["--image_size", "224"],
    "epochs6": ["--num_train_epochs", "6", "--early_stopping_patience", "2"],
    "strong_aug": ["--augment_strength", "strong"],
    "label_smoothing": ["--label_smoothing_factor", "0.1"],
}


def done(run: Path) -> bool:
    return (run / "model.safetensors").exists() and (run / "external_results.json").exists()


def run(levers: list[str], extra: dict[str, list[str]] | None = None) -> None:
    from cxr_train.progress import bar

    for name in bar(levers, desc="levers", unit="run"):
        args = (extra or {}).get(name, LEVERS.get(name))
        if args is None:
            raise SystemExit(f"unknown lever {name!r}: {sorted(LEVERS)}")
        out = RUNS / name
        if done(out):
            print(f"{name}: done, skipped", flush=True)
            continue
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "train_hf.py", *COMMON, "--output_dir", str(out), *args]
        t0 = time.time()
        with open(out / "train.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        (out / "wall_seconds.json").write_text(json.dumps({"wall_seconds": time.time() - t0, "rc": rc,
                                                           "command": " ".join(cmd[1:])}) + "\n")
        print(f"{name}: rc {rc}, {(time.time() - t0) / 60:.1f} min", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--levers", nargs="+", default=list(LEVERS))
    rep = sub.add_parser("report")
    rep.add_argument("--out", default="docs/levers")
    rep.add_argument("--external", default="../shared/data/chest_xray_val_fullres")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        run(a.levers)
    else:
        from experiments.lever_report import report
        report(RUNS, Path(a.out), Path(a.external))


if __name__ == "__main__":
    main()
