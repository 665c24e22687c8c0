"""Shared helpers for the benchmark scripts in this folder.

- ``machine_info()``: CPU model, cores, load, library versions, native bf16 support.
- ``measure()`` / ``rate()``: warm-up, then the median of several timed repeats.
- ``write_json(path, dict)``: the machine-readable result.
- ``resolve_data()`` / ``find_images()``: the shared Kermany folder when present, else a
  small synthetic Kermany-style image folder (so every script also runs offline on a bare
  checkout).
- ``resolve_model()``: a model folder, or a random-init folder built from a preset
  (``cxr_train.modeling.PRESETS``) or ``vit-b16-random`` (ViT-B/16 from ``ViTConfig()`` defaults).

Import-order note: ``datasets`` reads ``HF_DATASETS_CACHE`` when it is first imported, so
``resolve_data()`` (which may point that cache at a temporary folder for synthetic data) runs
before anything imports ``cxr_train.data``, ``datasets`` or ``train_hf``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from cxr.locate import image_files

ROOT = Path(__file__).resolve().parent.parent

# Benchmarks never touch the network.
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("HF_HUB_DISABLE_TELEMETRY", "1"), ("GRADIO_ANALYTICS_ENABLED", "False"),
               ("TOKENIZERS_PARALLELISM", "false"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
               ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(_k, _v)

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "chest_xray_224"
# The shipped default (README Performance); --model models/cxr-resnet-small-scratch times the CNN.
DEFAULT_MODEL_DIR = ROOT / "models" / "efficientnet-lite0-imagenet-full"
DEFAULT_PRESET = "cxr-resnet-small-scratch"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ID2LABEL = {0: "NORMAL", 1: "PNEUMONIA"}

_TEMP_DIRS: list[tempfile.TemporaryDirectory] = []   # kept alive until the process ends


def temp_dir(prefix: str) -> Path:
    """A temporary folder removed when the process exits."""
    t = tempfile.TemporaryDirectory(prefix=f"cxr-bench-{prefix}-")
    _TEMP_DIRS.append(t)
    return Path(t.name)


# ---------------------------------------------------------------- command line

def base_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The options every benchmark has: --quick, --data, --model, --out."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-test settings: finishes in under a minute")
    ap.add_argument("--data", default=None,
                    help=f"image folder <split>/<LABEL>/<image> (default: {DEFAULT_DATA_DIR} when present, "
                         "else synthetic images)")
    ap.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"), help="where to write the JSON result")
    return ap


# ---------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """What the figures depend on: CPU, cores, load at start, threads, versions, bf16."""
    import torch
    import transformers

    from cxr.precision import cpu_supports_bf16

    info = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_supports_bf16": bool(cpu_supports_bf16()),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for mod in ("datasets", "gradio", "gradio_client"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            pass
    return info


def quiet_libraries() -> None:
    """No progress bars or info logs from the libraries: the benchmark prints its own table."""
    import logging

    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def print_machine_info(info: dict) -> None:
    print(f"CPU: {info['cpu_model']} | {info['logical_cores']} logical cores"
          f" ({info.get('physical_cores', '?')} physical), torch threads {info['torch_threads']}"
          f" | load {info['load_average_1m']}")
    print(f"native bf16 (AMX/AVX512-BF16): {info['cpu_supports_bf16']} | flags: {' '.join(info['cpu_flags'])}")
    print(f"torch {info['torch']} | transformers {info['transformers']} | python {info['python']}")
    if info["load_average_1m"] and info["logical_cores"] and info["load_average_1m"] > 0.5 * info["logical_cores"]:
        print("WARNING: the machine is busy (load average above half the cores): figures will be low and noisy")
    print()


# ---------------------------------------------------------------- timing

def measure(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (perf_counter).

    Returns ``{"median_s", "min_s", "max_s", "times_s"}``. ``fn`` should do a fixed amount of
    work per call (e.g. K steps of batch B) so that the median is a rate."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": [round(t, 6) for t in times]}


def measure_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5) -> dict:
    """Like :func:`measure` for several functions, timed in alternation (a, b, a, b, ...).

    On a shared or throttling machine the speed drifts from minute to minute; alternating
    rounds exposes every function to the same drift, so ratios between them are fair.
    Returns ``{name: measure-style dict}``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                   "times_s": [round(x, 6) for x in t]} for name, t in times.items()}


def rate(items: float, seconds: float) -> float | None:
    """items / seconds, or None when the time is not positive (too short to measure)."""
    return items / seconds if seconds and seconds > 0 else None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list; None if empty."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print()


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON (parents created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=lambda o: float(o) if hasattr(o, "__float__") else str(o))
                 + "\n")
    print(f"wrote {p}")
    return p


# ---------------------------------------------------------------- data

def write_synthetic_folder(root: Path, n_patients: int = 24, per_patient: int = 2, size: int = 224) -> Path:
    """train/<LABEL>/<file>.jpeg with Kermany-style names, RGB JPEG like the shared 224-px copy."""
    from cxr_train.synthetic import write_kermany_folder

    return write_kermany_folder(root, n_patients=n_patients, per_patient=per_patient, size=size)


def _temp_datasets_cache(root: Path) -> None:
    """Point the datasets cache of this process at ``root`` (only possible before the first
    ``import datasets``), so throw-away folders leave nothing behind in ~/.cache."""
    if "datasets" not in sys.modules:
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets_cache")


def subset_folder(data_dir: Path, per_class: int) -> Path:
    """A temporary copy of ``per_class`` images of each <split>/<LABEL> (or <LABEL>) folder of
    ``data_dir``, spread evenly over the sorted file names (so many patients, Kermany names
    kept): real images, but a folder that ``load_dataset('imagefolder')`` reads in a moment."""
    root = temp_dir("subset")
    _temp_datasets_cache(root)
    out = root / "data"
    classes = sorted({p.parent for p in image_files(data_dir)})
    for cls in classes:
        target = out / cls.relative_to(data_dir)
        target.mkdir(parents=True, exist_ok=True)
        for f in find_images(cls, per_class, unique=True):
            shutil.copy2(f, target / f.name)
    return out


def resolve_data(arg: str | None, *, n_patients: int = 24, subset_per_class: int | None = None) -> tuple[Path, bool]:
    """(image folder, synthetic?). ``--data`` if given; else the shared folder; else synthetic
    images in a temporary folder (with a temporary datasets cache, so nothing piles up in ~).
    ``subset_per_class`` (for --quick runs): use a small copied subset of a real folder."""
    if arg:
        p = Path(arg).expanduser().resolve()
        if not p.is_dir():
            raise SystemExit(f"error: --data folder not found: {p}")
    elif DEFAULT_DATA_DIR.is_dir():
        p = DEFAULT_DATA_DIR
    else:
        root = temp_dir("data")
        _temp_datasets_cache(root)
        print(f"no data folder at {DEFAULT_DATA_DIR}: synthesising {4 * n_patients} images in {root}")
        return write_synthetic_folder(root / "data", n_patients=n_patients), True
    if subset_per_class:
        sub = subset_folder(p, subset_per_class)
        print(f"quick: a subset of {p} ({subset_per_class} images per class) in {sub}")
        return sub, False
    return p, False


def find_images(data_dir: str | os.PathLike, n: int, *, unique: bool = False) -> list[Path]:
    """``n`` image paths from ``data_dir`` (recursively), spread evenly over the sorted list so
    that every class is represented; repeated cyclically if the folder has fewer than ``n``
    (or, with ``unique``, all of them)."""
    files = image_files(data_dir)
    if not files:
        raise SystemExit(f"error: no images under {data_dir}")
    if len(files) >= n or unique:
        n = min(n, len(files))
        step = len(files) / n
        return [files[int(i * step)] for i in range(n)]
    return [files[i % len(files)] for i in range(n)]


# ---------------------------------------------------------------- models

def resolve_model(arg: str | None) -> tuple[Path, str]:
    """(model folder, description).

    - a folder: used as is;
    - ``vit-b16-random``: random-init ViT-B/16 (``ViTConfig()`` defaults, 224 px, patch 16)
      with a ``ViTImageProcessor``, saved to a temporary folder;
    - a preset name from ``cxr_train.modeling.PRESETS``: random-init preset, saved to a temporary folder;
    - nothing: the shipped default model (``DEFAULT_MODEL_DIR``), or (if it is not there) a random-init
      ``cxr-resnet-small-scratch`` of the same architecture.
    """
    from cxr_train.modeling import PRESETS, build_preset, save_model_folder

    if arg is None:
        if (DEFAULT_MODEL_DIR / "config.json").is_file():
            return DEFAULT_MODEL_DIR, f"shipped model {DEFAULT_MODEL_DIR.name}"
        arg = DEFAULT_PRESET
        print(f"no shipped model at {DEFAULT_MODEL_DIR}: using a random-init {DEFAULT_PRESET} "
              "(same architecture, so the same speed)")
    p = Path(arg).expanduser()
    if p.is_dir():
        return p.resolve(), f"folder {p.name}"
    out = temp_dir("model") / arg
    if arg == "vit-b16-random":
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        config = ViTConfig(num_labels=2, id2label=dict(ID2LABEL), label2id={v: k for k, v in ID2LABEL.items()})
        model = ViTForImageClassification(config)
        processor = ViTImageProcessor(size={"height": config.image_size, "width": config.image_size})
        save_model_folder(model, processor, out)
        return out, "random-init ViT-B/16 (ViTConfig defaults)"
    if arg in PRESETS:
        model, processor = build_preset(arg, dict(ID2LABEL))
        save_model_folder(model, processor, out)
        return out, f"random-init preset {arg}"
    raise SystemExit(f"error: --model {arg}: not a folder, not a preset ({', '.join(PRESETS)}), "
                     "not vit-b16-random")


def rss_mb() -> float:
    """Resident memory of this process in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20
