"""benchmarks/data_throughput.py --quick: runs, prints one JSON line with the fields the README
quotes, and its figures are positive (speed targets are checked on the reference machine, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.bench, pytest.mark.slow]


@pytest.mark.parametrize("workers", [1])   # a DataLoader worker: the store is read from another process
def test_data_throughput_quick(tmp_path, workers):
    out = tmp_path / "data_throughput.json"
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "benchmarks.data_throughput", "--quick", "--model", "tiny-resnet-scratch",
           "--image-size", "64", "--batch-size", "16", "--sizes", "64", "256", "--old-images", "16",
           "--workers", str(workers), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("loader_img_per_s", "cpu_augment_img_per_s", "cpu_device_ready_img_per_s", "old_loader_img_per_s",
                "store_build_films_per_s"):
        assert line[key] > 0, key
    assert line["image_size"] == 64 and line["batch_size"] == 16 and line["workers"] == workers
    assert line["sizes"] == [64, 256] and len(line["peak_rss_mb"]) == 2
    assert isinstance(line["rss_growth_mb"], float) and line["cpu_model"]
    assert line["meets_img_per_s"] == (line["loader_img_per_s"] >= 5000)
    saved = json.loads(out.read_text())
    assert saved["config"]["quick"] is True and saved["runs"][0]["loader_batches"] == 4   # 64 films / 16


def test_bad_arguments_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_throughput", "--sizes", "8", "--batch-size", "32",
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--batch-size" in proc.stderr
    assert not (tmp_path / "x.json").exists()
