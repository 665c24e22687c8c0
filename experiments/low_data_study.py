#!/usr/bin/env python
"""Transfer-learning comparison: from scratch vs a pre-trained checkpoint fine-tuned with
each strategy (frozen, partial, full, LoRA), at several training-set sizes.

Offline there is no ImageNet checkpoint, so by default the study makes its own
"medical-domain checkpoint": it splits the training patients into two halves (stratified,
grouped by patient), pre-trains the default CNN on half A, and runs the low-data study on
half B's patients, validated on held-out patients of half B. Pass ``--checkpoint`` (a Hub
id or folder) to use any checkpoint you have instead (e.g. an ImageNet ResNet-50).

    python -m experiments.low_data_study --out outputs/study            # the README's table
    python -m experiments.low_data_study --checkpoint microsoft/resnet-50 --sizes 50 100 all

Every run is a real ``train_hf.main()`` call; the table (CSV + Markdown) and the plots are
written to ``--out``. Research and education only.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

import train_hf  # noqa: E402
from cxr_train.data import add_patient_ids, load_raw_dataset, split_by_patient  # noqa: E402
from cxr_train.plots import render_confusions, render_learning_curves, render_roc  # noqa: E402
from cxr_train.progress import bar  # noqa: E402

logger = logging.getLogger("study")
ARMS = {  # name -> (init, strategy)
    "scratch": ("preset", "full"),
    "frozen": ("checkpoint", "frozen"),
    "partial": ("checkpoint", "partial"),
    "full": ("checkpoint", "full"),
    "lora": ("checkpoint", "lora"),
}
LEARNING_RATES = {"scratch": 2e-3, "frozen": 2e-3, "partial": 1e-3, "full": 5e-4, "lora": 2e-3}


def build_split_folders(data_dir: Path, out: Path, seed: int, val_fraction: float) -> tuple[Path, Path]:
    """Symlink folders: pretrain/train (half A) and study/{train,validation} (half B), both
    cut by ``split_by_patient`` (stratified, patient-grouped; the split ``cxr-train`` carves)."""
    from datasets import Dataset

    ds = add_patient_ids(load_raw_dataset(str(data_dir)))["train"]
    names = ds.features["label"].names
    labels = np.asarray(ds["label"])
    groups = np.asarray(ds["patient_id"])
    paths = [x["path"] for x in ds["image"]]
    rows = Dataset.from_dict({"label": labels, "patient_id": groups, "row": np.arange(len(labels))})
    half_a, half_b = split_by_patient(rows, 0.5, seed)
    study_train, study_val = split_by_patient(half_b, val_fraction, seed)
    plan = {split: np.asarray(part["row"], dtype=int) for split, part in
            (("pretrain/train", half_a), ("study/train", study_train), ("study/validation", study_val))}
    for split, idx in plan.items():
        for i in idx:
            dst = out / "data" / split / names[labels[i]] / Path(paths[i]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.symlink(paths[i], dst)
    patients = {s: set(groups[idx]) for s, idx in plan.items()}
    assert not (patients["pretrain/train"] & patients["study/train"]), "patient leak"
    assert not (patients["study/train"] & patients["study/validation"]), "patient leak"
    logger.info("split: %s", {s: len(i) for s, i in plan.items()})
    return out / "data" / "pretrain", out / "data" / "study"


def run(args_list: list[str]) -> None:
    rc = train_hf.main(args_list)
    if rc != 0:
        raise SystemExit(f"train_hf failed ({rc}): {' '.join(args_list)}")


def timed_run(args_list: list[str], run_dir: Path, size: str = "all") -> None:
    """One study run into ``run_dir`` (``size``: at most that many training films per class, or "all"),
    its wall time written to ``run_dir/wall_seconds.txt``."""
    if size != "all":
        args_list = [*args_list, "--max_samples_per_class", size]
    t0 = time.time()
    run(args_list)
    (run_dir / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray_224"))
    ap.add_argument("--out", default="outputs/study")
    ap.add_argument("--checkpoint", default=None, help="Use this checkpoint instead of pre-training one.")
    ap.add_argument("--preset", default="cxr-resnet-small-scratch", help="Architecture for scratch/pre-training.")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--sizes", nargs="+", default=["50", "100", "200", "all"], help="Images per class, or 'all'.")
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--pretrain_epochs", type=float, default=8)
    ap.add_argument("--max_steps", type=int, default=120, help="Optimizer steps per study run (batch 32).")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    pre_dir, study_dir = build_split_folders(Path(args.data), out, args.seed, 0.2)

    common = ["--image_size", str(args.image_size), "--seed", str(args.seed), "--disable_tqdm", "True",
              "--per_device_train_batch_size", "32", "--save_total_limit", "1", "--early_stopping_patience", "0"]
    checkpoint = args.checkpoint
    pretrain_minutes = None
    if checkpoint is None:
        checkpoint = str(out / "checkpoint")
        if not (Path(checkpoint) / "model.safetensors").is_file():
            t0 = time.time()
            run(["--model_name_or_path", args.preset, "--dataset_name", str(pre_dir), "--output_dir", checkpoint,
                 "--num_train_epochs", str(args.pretrain_epochs), "--learning_rate", "2e-3", *common])
            pretrain_minutes = (time.time() - t0) / 60

    rows = []
    plan = [(size, arm) for size in args.sizes for arm in args.arms]
    for size, arm in bar(plan, desc="study runs", unit="run"):
        init, strategy = ARMS[arm]
        run_dir = out / "runs" / f"{arm}-{size}"
        if not (run_dir / "eval_results.json").is_file():
            a = ["--model_name_or_path", args.preset if init == "preset" else checkpoint,
                 "--strategy", strategy, "--dataset_name", str(study_dir), "--output_dir", str(run_dir),
                 "--max_steps", str(args.max_steps), "--learning_rate", str(LEARNING_RATES[arm]),
                 "--eval_strategy", "steps", "--eval_steps", str(max(1, args.max_steps // 4)),
                 "--save_strategy", "steps", "--save_steps", str(max(1, args.max_steps // 4)), *common]
            if init == "checkpoint":
                a += ["--reinit_head", "True"]
            timed_run(a, run_dir, size)
        ev = json.loads((run_dir / "eval_results.json").read_text())
        tr = json.loads((run_dir / "train_results.json").read_text())
        n_train = json.loads((run_dir / "trainer_state.json").read_text()).get("train_batch_size")
        n_pc = int(size) if size != "all" else None
        rows.append({
            "arm": arm, "size": size, "n_per_class": n_pc,
            "roc_auc": ev["eval_roc_auc"], "roc_auc_ci": ev.get("eval_ci", {}).get("roc_auc"),
            "accuracy": ev["eval_accuracy"], "sensitivity": ev["eval_sensitivity"],
            "specificity": ev["eval_specificity"], "confusion": ev["eval_confusion_matrix"],
            "train_seconds": tr.get("train_runtime"), "batch": n_train,
        })
        logger.info("%s/%s: AUROC %.4f", arm, size, ev["eval_roc_auc"])
    write_outputs(rows, out, args, checkpoint, pretrain_minutes, time.time() - t_start)
    return 0


def write_outputs(rows, out: Path, args, checkpoint, pretrain_minutes, seconds) -> None:
    # table
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm", "size", "roc_auc", "roc_auc_ci", "accuracy", "sensitivity",
                                          "specificity", "confusion", "train_seconds"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "roc_auc_ci": json.dumps(r["roc_auc_ci"]), "confusion": json.dumps(r["confusion"])})
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| arm | " + " | ".join(f"{s}/class" if s != "all" else "all" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for arm in arms:
        cells = []
        for s in sizes:
            r = next((r for r in rows if r["arm"] == arm and r["size"] == s), None)
            if r is None:
                cells.append("–")
                continue
            ci = r["roc_auc_ci"]
            cells.append(f"{r['roc_auc']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    meta = (f"\nValidation AUROC (95% bootstrap CI) on held-out patients; checkpoint: "
            f"`{checkpoint if args.checkpoint else 'pre-trained here on the other half of the patients'}`"
            f"{f' ({pretrain_minutes:.1f} min)' if pretrain_minutes else ''}; {args.max_steps} steps of batch 32 "
            f"per run at {args.image_size} px; total {seconds / 60:.1f} min.\n")
    (out / "results.md").write_text("\n".join(lines) + "\n" + meta)
    # plots
    all_size = None
    study_train = out / "data" / "study" / "train"
    if study_train.is_dir():
        counts = [len(list(d.iterdir())) for d in study_train.iterdir()]
        all_size = min(counts)
    curve_rows = [{**r, "n_per_class": r["n_per_class"] or all_size} for r in rows if (r["n_per_class"] or all_size)]
    render_learning_curves(curve_rows, out / "learning_curves.png")
    roc = {}
    for arm in arms:
        p = out / "runs" / f"{arm}-{sizes[-1]}" / "eval_scores.json"
        if p.is_file():
            d = json.loads(p.read_text())
            roc[arm] = (d["labels"], d["scores"])
    if roc:
        render_roc(roc, out / "roc_curves.png", title=f"ROC, validation ({sizes[-1]}{'' if sizes[-1] == 'all' else '/class'})")
    render_confusions({f"{r['arm']} {r['size']}": r["confusion"] for r in rows if r["size"] == sizes[-1]},
                      out / "confusion_matrices.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
