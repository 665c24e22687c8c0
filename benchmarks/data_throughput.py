#!/usr/bin/env python
"""Data-path throughput: device-ready uint8 batches per second from the film store
(``cxr_train.cache``), and resident memory as the dataset grows.

What is measured, each dataset size in its own child process (so its peak RSS is its own):

1. **store build**: N synthetic 224-px JPEG films (Kermany-style, ``cxr_train.synthetic``; copies
   of 64 encoded films under N distinct names; with ``--data DIR`` that folder's films, linked
   cyclically under N distinct names) decoded once with ``cxr.imaging.load_image`` and
   resized by the model's image processor into the store (films/s).
2. **loader** (``loader_img_per_s``, the headline): one shuffled epoch of ``CachedImages``
   through a ``torch`` DataLoader exactly as the Trainer builds it (batch size, ``--workers``,
   pinned memory when CUDA is present, ``UInt8Collator``), batches moved to the device when
   there is a GPU. On a GPU this is everything the CPU does per batch: float conversion,
   augmentation and normalisation run on the GPU (``cxr_train.batches.DevicePreprocess``).
   The store has just been written, so it is read from the OS page cache.
3. **augmentation on the CPU** (``cpu_augment_img_per_s``): ``BatchAugment`` + the processor's
   normalisation on uint8 batches, on this CPU: the extra cost when the CPU is also the
   training device. ``cpu_device_ready_img_per_s`` combines 2 and 3 (1 / (1/a + 1/b)).
4. **old path** (``old_loader_img_per_s``, smallest size only): ``ImageTransform`` (decode +
   PIL augmentation + processor per film, every epoch) through the same DataLoader.

RSS: peak resident memory (``ru_maxrss``) of each child; ``rss_growth_mb`` is the difference
between the largest and the smallest dataset (target <= 100 MB from 5 k to 50 k films).

    python -m benchmarks.data_throughput [--quick] [--sizes 5000 50000] [--workers 0] [--out JSON]

Prints one JSON line (the summary) and writes the full result to --out.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common  # run from the repository root: python -m benchmarks.<name>

NAME = "data_throughput"
TARGET_IMG_PER_S = 5000       # above the H100 model-only training ceiling of EfficientNet-Lite0 (4,164 img/s, batch 128)
TARGET_RSS_GROWTH_MB = 100


def parse(argv=None):
    ap = common.base_parser(__doc__, NAME)
    ap.add_argument("--model", default=None,
                    help="model folder or preset whose image processor sizes the films (default: the shipped "
                         "default model, else a 224-px preset)")
    ap.add_argument("--image-size", type=int, default=224, help="film size in the store (preset models only)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (the Trainer's default is 0)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="dataset sizes in films (default 5000 50000; --quick: 300 1200)")
    ap.add_argument("--old-images", type=int, default=None, help="films timed on the old path (default 320; quick 64)")
    ap.add_argument("--child", type=int, default=None, help=argparse_hidden())
    ap.add_argument("--films", default=None, help=argparse_hidden())
    ap.add_argument("--model-dir", default=None, help=argparse_hidden())
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = [300, 1200] if args.quick else [5000, 50000]
    if args.old_images is None:
        args.old_images = 64 if args.quick else 320
    if args.batch_size < 1 or args.workers < 0 or min(args.sizes) < args.batch_size:
        ap.error("--batch-size >= 1, --workers >= 0, every --sizes value >= --batch-size")
    return args


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


# ---------------------------------------------------------------- parent

def write_films(folder: Path, n: int, size: int, source: str | None = None) -> Path:
    """n JPEG films under distinct Kermany-style names: copies of 64 encoded synthetic films, or
    (``--data``) the folder's own films, hard-linked (copied where links fail) cyclically."""
    import io
    import os
    import shutil

    from cxr_train.synthetic import make_xray

    for label in ("NORMAL", "PNEUMONIA"):
        (folder / label).mkdir(parents=True, exist_ok=True)
    if source:
        real = common.image_files(source)
        if not real:
            raise SystemExit(f"error: no images under {source}")
        for i in range(n):
            target = folder / ("PNEUMONIA" if i % 2 else "NORMAL") / f"person{i}_bacteria_1.jpeg"
            try:
                os.link(real[i % len(real)], target)
            except OSError:
                shutil.copyfile(real[i % len(real)], target)
        return folder
    encoded = []
    for i in range(64):
        buf = io.BytesIO()
        make_xray(i, i % 2 == 1, size).convert("RGB").save(buf, format="JPEG", quality=95)
        encoded.append(buf.getvalue())
    for i in range(n):
        label = "PNEUMONIA" if i % 2 else "NORMAL"
        (folder / label / f"person{i}_bacteria_1.jpeg").write_bytes(encoded[i % 64])
    return folder


def film_list(folder: Path, n: int) -> list[tuple[str, int]]:
    files = []
    for i in range(n):
        label = i % 2
        name = "PNEUMONIA" if label else "NORMAL"
        files.append((str(folder / name / f"person{i}_bacteria_1.jpeg"), label))
    return files


def main(argv=None) -> int:
    args = parse(argv)
    if args.child is not None:
        return child(args)
    common.quiet_libraries()
    info = common.machine_info()
    model_dir, model_desc = resolve_processor_model(args)
    root = common.temp_dir("films")
    t0 = time.perf_counter()
    films = write_films(root / "films", max(args.sizes), args.image_size, args.data)
    print(f"wrote {max(args.sizes)} {'linked' if args.data else 'synthetic'} films in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    runs = []
    for i, n in enumerate(sorted(args.sizes)):
        cmd = [sys.executable, "-m", "benchmarks.data_throughput", "--child", str(n), "--films", str(films),
               "--model-dir", str(model_dir), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--old-images", str(args.old_images if i == 0 else 0), "--out", str(root / f"child{n}.json")]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"error: the {n}-film run failed (exit {proc.returncode})")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{n} films: {runs[-1]}", file=sys.stderr)
    small, big = runs[0], runs[-1]
    growth = big["peak_rss_mb"] - small["peak_rss_mb"]
    summary = {
        "benchmark": NAME,
        "loader_img_per_s": small["loader_img_per_s"],
        "loader_img_per_s_largest": big["loader_img_per_s"],
        "cpu_augment_img_per_s": small["cpu_augment_img_per_s"],
        "cpu_device_ready_img_per_s": small["cpu_device_ready_img_per_s"],
        "old_loader_img_per_s": small.get("old_loader_img_per_s"),
        "store_build_films_per_s": small["build_films_per_s"],
        "image_size": small["image_size"], "batch_size": args.batch_size, "workers": args.workers,
        "sizes": [r["films"] for r in runs], "peak_rss_mb": [r["peak_rss_mb"] for r in runs],
        "rss_growth_mb": round(growth, 1),
        "target_img_per_s": TARGET_IMG_PER_S, "target_rss_growth_mb": TARGET_RSS_GROWTH_MB,
        "meets_img_per_s": small["loader_img_per_s"] >= TARGET_IMG_PER_S,
        "meets_rss": growth <= TARGET_RSS_GROWTH_MB,
        "device": small["device"], "cpu_model": info["cpu_model"], "logical_cores": info["logical_cores"],
        "load_average_1m": info["load_average_1m"], "processor": model_desc,
        "films": f"--data {args.data} (cycled under distinct names)" if args.data else "synthetic 224-px JPEG",
    }
    common.write_json(args.out, {**summary, "config": {**vars(args), "quick": args.quick}, "runs": runs,
                                 "machine": info})
    print(json.dumps(summary))
    return 0


def resolve_processor_model(args) -> tuple[Path, str]:
    if args.model is None and (common.DEFAULT_MODEL_DIR / "config.json").is_file() and args.image_size == 224:
        return common.DEFAULT_MODEL_DIR, f"shipped model {common.DEFAULT_MODEL_DIR.name}"
    from cxr_train.modeling import PRESETS, build_preset, save_model_folder

    name = args.model or common.DEFAULT_PRESET
    if Path(name).is_dir():
        return Path(name).resolve(), f"folder {Path(name).name}"
    if name not in PRESETS:
        raise SystemExit(f"error: --model {name}: not a folder, not a preset ({', '.join(PRESETS)})")
    out = common.temp_dir("model") / name
    model, processor = build_preset(name, dict(common.ID2LABEL), args.image_size)
    save_model_folder(model, processor, out)
    return out, f"preset {name} at {args.image_size} px"


# ---------------------------------------------------------------- child (one dataset size)

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def child(args) -> int:
    import torch
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from transformers import AutoImageProcessor

    from cxr_train.batches import BatchAugment, UInt8Collator
    from cxr_train.cache import CachedImages, FilmStore, build_pixel_spec

    common.quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoImageProcessor.from_pretrained(args.model_dir)
    spec = build_pixel_spec(processor)
    if spec is None:
        raise SystemExit(f"error: {type(processor).__name__} cannot be split at uint8 (no film store)")
    files = film_list(Path(args.films), args.child)
    ds = Dataset.from_dict({"image": [{"path": p, "bytes": None} for p, _ in files], "label": [y for _, y in files]},
                           features=Features({"image": ImageFeature(decode=False), "label": Value("int64")}))
    out = {"films": args.child, "image_size": spec.size[0], "device": str(device),
           "rss_start_mb": round(common.rss_mb(), 1)}

    store = FilmStore(common.temp_dir("store"), spec)
    t0 = time.perf_counter()
    rows = store.rows(ds["image"], num_workers=args.workers)
    out["build_films_per_s"] = round(args.child / (time.perf_counter() - t0), 1)
    out["rss_after_build_mb"] = round(common.rss_mb(), 1)
    data = CachedImages(store, rows, ds["label"])

    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", collate_fn=UInt8Collator(),
                                         persistent_workers=False)
    n_img, t0 = 0, time.perf_counter()
    for batch in loader:
        x = batch["pixel_values"].to(device, non_blocking=True)
        n_img += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    out["loader_img_per_s"] = round(n_img / secs, 1)
    out["loader_batches"] = len(loader)
    out["rss_after_epoch_mb"] = round(common.rss_mb(), 1)

    # Augmentation + normalisation on the CPU (the training device when there is no GPU).
    augment = BatchAugment("standard")
    batches = [data.__getitems__(list(range(i, i + args.batch_size)))["pixel_values"]
               for i in range(0, min(len(data), args.batch_size * (4 if args.quick else 12)), args.batch_size)]
    spec.normalise(augment(batches[0]))
    t0 = time.perf_counter()
    for x in batches:
        spec.normalise(augment(x))
    a = len(batches) * args.batch_size / (time.perf_counter() - t0)
    out["cpu_augment_img_per_s"] = round(a, 1)
    out["cpu_device_ready_img_per_s"] = round(1 / (1 / a + 1 / out["loader_img_per_s"]), 1)

    if args.old_images:
        from cxr_train.data import ImageTransform

        old = ds.select(range(min(args.old_images, len(ds))))
        old.set_transform(ImageTransform(processor, augment=True))
        old_loader = torch.utils.data.DataLoader(old, batch_size=args.batch_size, shuffle=True,
                                                 num_workers=args.workers)
        n_img, t0 = 0, time.perf_counter()
        for batch in old_loader:
            n_img += batch["pixel_values"].shape[0]
        out["old_loader_img_per_s"] = round(n_img / (time.perf_counter() - t0), 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
