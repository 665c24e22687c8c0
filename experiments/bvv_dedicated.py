"""A dedicated bacterial-vs-viral model on the pneumonia films alone (Kermany et al. 2018's second
task), laid out so that it is judged on **the same validation films** as the three-class model.

The three-class recipe carves its validation split from the pool by patient (``cxr-train``'s own
carve, re-run here from the YAML); this writes that split's bacterial and viral films as the
dedicated model's ``validation`` folder, the rest of the pool's bacterial and viral films as its
``train`` folder, and the hold-out's as a separate ``<LABEL>/<image>`` folder (symbolic links):

    python -m experiments.bvv_dedicated --config hub_configs/efficientnet-lite0-imagenet-3class.yaml \\
        --holdout outputs/holdout_data/holdout --out outputs/bvv_data
    cxr-train --model_name_or_path checkpoints/tf_efficientnet_lite0.in1k --strategy full --reinit_head true \\
        --dataset_name outputs/bvv_data/pool --external_dataset outputs/bvv_data/holdout --positive_label VIRAL \\
        --num_train_epochs 5 --learning_rate 3e-4 --weight_decay 0.05 --output_dir outputs/bvv-dedicated

Then ``eval_results.json``'s AUROC is comparable film for film with the three-class model's
``eval_pairwise`` BACTERIAL-vs-VIRAL AUROC (docs/levers/3class_levers.md).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PAIR = ("BACTERIAL", "VIRAL")


def _paths(split) -> list[str]:
    from datasets import Image

    return [x["path"] for x in split.cast_column("image", Image(decode=False))["image"]]


def layout(config: str, holdout: Path, out: Path) -> dict:
    from cxr_train.config import parse_args
    from cxr_train.data import prepare_data
    from cxr_train.labels import FilenameLabeler

    _, data_args, training_args = parse_args(["--config", config])
    data = prepare_data(data_args, seed=training_args.seed)
    names = data.id2label
    counts: dict = {}
    for split, folder in (("train", out / "pool" / "train"), ("validation", out / "pool" / "validation")):
        ds = data.splits[split]
        for path, label in zip(_paths(ds), ds["label"]):
            if names[label] in PAIR:
                _link(Path(path), folder / names[label])
                counts.setdefault(split, {}).setdefault(names[label], 0)
                counts[split][names[label]] += 1
    label_of = FilenameLabeler.parse(data_args.label_from_filename)
    for f in sorted(p for p in holdout.rglob("*") if p.is_file()):
        label = label_of(f.name)
        if label in PAIR:
            _link(f, out / "holdout" / label)
            counts.setdefault("holdout", {}).setdefault(label, 0)
            counts["holdout"][label] += 1
    return counts


def _link(src: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the three-class recipe whose validation split to reuse")
    ap.add_argument("--holdout", type=Path, required=True, help="the hold-out folder the recipe scores once")
    ap.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    a = ap.parse_args(argv)
    if a.out.exists() and any(a.out.iterdir()):
        ap.error(f"--out {a.out} is not empty")
    print(json.dumps(layout(a.config, a.holdout, a.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
