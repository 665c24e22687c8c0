"""On a CUDA machine (skipped elsewhere, see conftest): precision resolves from the GPU, a
tiny training runs on it, and its folder serves on the CPU."""

import pytest
import yaml

from tests.helpers import base_args, make_xray

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_tiny_training_on_the_gpu(kermany_folder, tmp_path):
    import torch

    import train_hf
    from cxr.inference import Predictor
    from cxr.precision import resolve_bf16

    assert resolve_bf16("auto") == torch.cuda.is_bf16_supported()
    out = tmp_path / "gpu"
    assert train_hf.main(base_args(kermany_folder, out)) == 0
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert bool(cfg.get("bf16", False)) == torch.cuda.is_bf16_supported() and not cfg.get("use_cpu", False)
    r = Predictor.from_pretrained(out, precision="fp32").predict(make_xray(0, True), explain=True)
    assert r.heatmap is not None and sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
