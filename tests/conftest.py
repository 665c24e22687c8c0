"""Shared fixtures: everything offline, on CPU, with tiny synthetic data and models.

Markers (registered in pyproject.toml), written on the tests themselves: ``slow`` (real
trainings beyond one 2-step run, Gradio servers, subprocesses), ``browser``, ``gpu``, ``bench``
(the browser, benchmark and GPU modules mark all their tests). The fast subset keeps one real
2-step training (``trained_folder``, used unmarked by tests/test_train.py's hub-ready folder and
card metadata tests); every other test that asks for ``trained_folder`` or ``trained_vit_folder``
says ``@pytest.mark.slow`` itself:

    python -m pytest -m "not slow and not browser and not bench"
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import base_args, write_kermany_folder  # noqa: E402

def pytest_collection_modifyitems(config, items):
    import torch

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def kermany_folder(tmp_path_factory):
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
