"""Shared fixtures: everything offline, on CPU, with tiny synthetic data and models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from cxr.synthetic import make_xray, write_kermany_folder  # noqa: E402,F401


@pytest.fixture(scope="session")
def kermany_folder(tmp_path_factory) -> Path:
    return write_kermany_folder(tmp_path_factory.mktemp("cxr") / "data", splits=("train", "test"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    yield
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old


def base_args(data, out, *extra):
    """train_hf.py arguments for a 2-step run of a tiny model."""
    return ["--model_name_or_path", "tiny-resnet-scratch", "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
            "--validation_fraction", "0.25", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--disable_tqdm", "True", *extra]


@pytest.fixture(scope="session")
def trained_folder(kermany_folder, tmp_path_factory):
    """A model folder written by train_hf.main(): tiny ResNet, 2 steps, with --do_predict."""
    import train_hf

    out = tmp_path_factory.mktemp("run") / "model"
    assert train_hf.main(base_args(kermany_folder, out, "--do_predict", "True")) == 0
    return out


@pytest.fixture(scope="session")
def trained_vit_folder(kermany_folder, tmp_path_factory):
    import train_hf

    out = tmp_path_factory.mktemp("run") / "vit"
    assert train_hf.main(base_args(kermany_folder, out, "--model_name_or_path", "tiny-vit-scratch",
                                   "--save_strategy", "no", "--load_best_model_at_end", "False")) == 0
    return out
