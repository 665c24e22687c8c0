"""Smoke tests for benchmarks/*.py: each script runs with --quick and tiny settings (a tiny
ResNet folder, a small synthetic image folder) in a subprocess, exits 0 and writes a JSON with
the expected keys and positive figures. They check that the scripts work, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_kermany_folder

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240
pytestmark = [pytest.mark.bench, pytest.mark.slow]
MACHINE_KEYS = {"cpu_model", "logical_cores", "torch", "transformers", "cpu_supports_bf16"}


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    """(synthetic data folder, tiny model folder, scratch folder)."""
    from cxr_train.modeling import build_preset, save_model_folder

    root = tmp_path_factory.mktemp("bench")
    data = write_kermany_folder(root / "data", n_patients=12, per_patient=2, splits=("train",))
    model, processor = build_preset("tiny-resnet-scratch", {0: "NORMAL", 1: "PNEUMONIA"})
    save_model_folder(model, processor, root / "model")
    return data, root / "model", root


def run_script(name: str, inputs, *extra: str) -> dict:
    data, model, root = inputs
    out = root / f"{name}.json"
    env = dict(os.environ, HF_DATASETS_CACHE=str(root / "hf_cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--data", str(data),
           "--model", str(model), "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert MACHINE_KEYS <= set(result["machine"])
    assert result["config"]["quick"] is True
    return result


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def positive_or_none(x) -> bool:
    return x is None or positive(x)


def test_train_throughput(bench_inputs):
    r = run_script("train_throughput", bench_inputs, "--image-size", "64", "--batch-size", "8",
                   "--steps", "3", "--train-samples", "32")["results"]
    for key in ("dataloader_img_s", "plain_model_only_img_s", "plain_loop_img_s", "trainer_reported_img_s"):
        assert positive(r[key]), (key, r[key])
    # 2N-N differences: None only if a run was too short to tell apart on a busy machine
    for key in ("trainer_steady_img_s", "trainer_steady_wall_img_s", "ratio_trainer_over_plain",
                "ratio_trainer_wall_over_plain"):
        assert key in r and positive_or_none(r[key]), (key, r[key])


def test_batch_inference(bench_inputs):
    result = run_script("batch_inference", bench_inputs, "--images", "16", "--batch-size", "8", "--sizes", "64")
    r, bf16 = result["results"], result["machine"]["cpu_supports_bf16"]
    for key in ("predictor_fp32_img_s", "pipeline_fp32_img_s", "ceiling_fp32_img_s"):
        assert positive(r[key]), (key, r[key])
    for key in ("predictor_bf16_img_s", "ceiling_bf16_img_s", "ratio_predictor_bf16_over_ceiling"):
        assert positive(r[key]) if bf16 else r[key] is None, (key, r[key])
    assert [row["image_size"] for row in result["scaling"]] == [64]
    assert positive(result["scaling"][0]["inference_img_s"]) and positive(result["scaling"][0]["train_img_s"])


def test_app_latency(bench_inputs):
    r = run_script("app_latency", bench_inputs, "--requests", "2", "--client-requests", "1", "--concurrency", "2",
                   "--load-requests", "4", "--time-limit", "60")["results"]
    assert r["sequential_heatmap_gradio_client"]["n"] == 1
    for key in ("sequential_heatmap", "sequential_no_heatmap"):
        assert r[key]["n"] == 2 and positive(r[key]["p50_ms"]) and positive(r[key]["p95_ms"]), r[key]
    load = r["load"]
    assert load["requests_sent"] == 4 and load["n"] + load["errors"] == 4, load
    if load["n"]:
        assert positive(load["p50_ms"]) and positive(load["throughput_rps"]), load
    assert all(positive(v) for v in r["memory"].values()) and len(r["memory"]) == 4


def test_cold_start(bench_inputs):
    result = run_script("cold_start", bench_inputs)
    lib, app = result["results"]["library"], result["results"]["app"]
    for key in ("import_s", "load_s", "first_predict_s", "to_first_answer_s", "second_predict_s", "peak_rss_mb"):
        assert positive(lib[key]), (key, lib[key])
    assert lib["to_first_answer_s"] >= lib["load_s"] + lib["first_predict_s"]
    for key in ("to_health_s", "first_predict_s", "to_first_answer_s", "rss_ready_mb"):
        assert positive(app[key]), (key, app[key])
    assert len(result["rounds"]["library"]) == len(result["rounds"]["app"]) == 1


def test_train_throughput_of_a_recipe_takes_its_data_path(bench_inputs, tmp_path):
    """--recipe: the recipe's model, size and film store; both the plain loop and the Trainer read uint8
    batches from the store (the JSON names the data path)."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": "tiny-resnet-scratch", "image_size": 64, "data_cache": "memmap",
                                      "cache_dir": str(tmp_path / "store"), "acquisition_augment": 0.5,
                                      "output_dir": "ignored", "threshold_policy": "shift_floor"}))
    result = run_script("train_throughput", bench_inputs, "--recipe", str(recipe), "--batch-size", "8",
                        "--steps", "3", "--train-samples", "32")
    assert result["config"]["data_path"] == "memmap" and result["config"]["image_size"] == 64
    assert result["config"]["recipe"] == str(recipe)
    for key in ("dataloader_img_s", "plain_model_only_img_s", "plain_loop_img_s", "trainer_reported_img_s"):
        assert positive(result["results"][key]), (key, result["results"][key])
    assert any((tmp_path / "store").iterdir())      # the film store was written and read


def test_common_jpeg_decodes_under_10ms():
    """A timing claim (kept out of the unit tests): a 224-px JPEG decodes and passes the checks
    in under 10 ms on average."""
    import io
    import time

    from PIL import Image

    from cxr.imaging import load_image

    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (80, 80, 80)).save(buf, format="JPEG")
    data = buf.getvalue()
    load_image(data)
    start = time.perf_counter()
    for _ in range(50):
        load_image(data)
    assert (time.perf_counter() - start) / 50 < 0.01
