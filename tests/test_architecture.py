"""One architecture family per model, read from its config, and what each family gets:
channels_last, LoRA targets, and the right heat map (Grad-CAM for CNNs, attention rollout
for ViTs) or an explicit "no heat map for this architecture". Tiny random models built
offline from configs: transformers ResNet, ViT, ConvNeXt, Swin; timm EfficientNet, ConvNeXt,
ViT and MaxViT through TimmWrapper."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from cxr.architecture import family, timm_module
from cxr.explain import Explainer, NoMapError, timm_attentions
from cxr.inference import Predictor
from cxr_train.modeling import apply_strategy, build_preset, load_checkpoint, lora_target_modules, save_model_folder
from tests.helpers import ID2LABEL, make_xray, tiny_timm_folder


def hf_folder(tmp_path, kind):
    from transformers import (ConvNextConfig, ConvNextForImageClassification, SwinConfig,
                              SwinForImageClassification, ViTImageProcessor)

    torch.manual_seed(0)
    if kind in ("tiny-resnet-scratch", "tiny-vit-scratch"):
        model, proc = build_preset(kind, ID2LABEL)
    elif kind == "convnext":
        model = ConvNextForImageClassification(ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2, id2label=ID2LABEL,
            label2id={v: k for k, v in ID2LABEL.items()}))
        proc = ViTImageProcessor(size={"height": 64, "width": 64})
    else:  # swin: windowed attention, no global attention map to roll out
        model = SwinForImageClassification(SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4,
            num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}))
        proc = ViTImageProcessor(size={"height": 32, "width": 32})
    save_model_folder(model, proc, tmp_path / kind)
    return tmp_path / kind


# (builder, expected family, expected explainer)
CASES = {
    "hf-resnet": (lambda t: hf_folder(t, "tiny-resnet-scratch"), "cnn", "grad-cam"),
    "hf-vit": (lambda t: hf_folder(t, "tiny-vit-scratch"), "vit", "attention-rollout"),
    "hf-convnext": (lambda t: hf_folder(t, "convnext"), "cnn", "grad-cam"),
    "hf-swin": (lambda t: hf_folder(t, "swin"), "other", None),
    "timm-efficientnet": (lambda t: tiny_timm_folder(t, "test_efficientnet"), "cnn", "grad-cam"),
    "timm-convnext": (lambda t: tiny_timm_folder(t, "test_convnext"), "cnn", "grad-cam"),
    "timm-vit": (lambda t: tiny_timm_folder(t, "test_vit", size=64), "vit", "attention-rollout"),
    "timm-maxvit": (lambda t: tiny_timm_folder(t, "test_maxvit", size=64), "other", None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    build, fam, explainer = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model, proc = load_checkpoint(str(build(tmp)), ID2LABEL)   # a 2-class model, as training leaves it
    save_model_folder(model, proc, tmp / "model")
    return request.param, tmp / "model", fam, explainer


def test_family_from_config_alone(case):
    name, folder, fam, _ = case
    assert family(AutoConfig.from_pretrained(folder)) == fam, name


def test_predictor_map_and_memory_format(case):
    name, folder, fam, explainer = case
    p = Predictor.from_pretrained(folder, precision="fp32")
    assert p.channels_last == (fam == "cnn")
    image = make_xray(3, True).convert("RGB")
    r = p.predict(image, explain=True)
    assert r.explainer == explainer
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    if explainer is None:
        assert r.heatmap is None
        assert p.describe()["explainer"].startswith("no heat map for this architecture")
        with pytest.raises(NoMapError, match="no heat map for this architecture"):
            Explainer(p.model)
        return
    size = tuple(p.preprocess([image]).shape[-2:])
    assert r.heatmap.shape == size and r.heatmap.dtype == np.float32
    assert 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0 and r.heatmap.max() - r.heatmap.min() > 0.1
    assert p.predict(image).probabilities == pytest.approx(r.probabilities, abs=1e-5)   # same prediction


def test_lora_targets_follow_the_family(case):
    name, folder, fam, _ = case
    model, _ = load_checkpoint(str(folder), ID2LABEL)
    targets = lora_target_modules(model)
    modules = dict(model.named_modules())
    if fam == "cnn":   # backbone convolutions
        assert targets and all(isinstance(modules[t], torch.nn.Linear) or isinstance(modules[t], torch.nn.Conv2d)
                               and modules[t].groups == 1 for t in targets)   # no depthwise convolutions
        lora = apply_strategy(model, "lora", lora_r=2)
        saved = {n for n, p in lora.named_parameters() if p.requires_grad and "modules_to_save" in n}
        assert any("lora_A" in n for n, _ in lora.named_parameters()) and saved   # head (+ norms) trained
    else:              # attention projections only
        assert set(targets) in ({"q_proj", "v_proj"}, {"query", "value"}, {"qkv"}), targets


def test_timm_vit_attentions_are_the_models_own(tmp_path):
    """The rollout of a timm ViT reads each block's attention probabilities; switching to the
    unfused path for that leaves the logits unchanged."""
    folder = tiny_timm_folder(tmp_path, "test_vit", size=64)
    model, _ = load_checkpoint(str(folder), ID2LABEL)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = model(pixel_values=x).logits
        atts = timm_attentions(model, x)
        unfused = model(pixel_values=x).logits
    vit = model.timm_model
    tokens = vit.num_prefix_tokens + (64 // vit.patch_embed.patch_size[0]) ** 2
    assert len(atts) == len(vit.blocks)
    assert all(a.shape == (1, vit.blocks[0].attn.num_heads, tokens, tokens) for a in atts)
    assert torch.allclose(atts[0].sum(-1), torch.ones(1), atol=1e-5)
    assert torch.allclose(fused, unfused, atol=1e-5)


def test_timm_family_comes_from_timms_registry():
    assert timm_module("resnet50.a1_in1k") == "resnet"
    assert timm_module("vit_base_patch16_224.augreg_in21k") == "vision_transformer"
    assert timm_module("no_such_architecture") is None
    cfg = AutoConfig.for_model("timm_wrapper", architecture="efficientnet_b0")
    assert family(cfg) == "cnn"
    assert family(AutoConfig.for_model("timm_wrapper", architecture="vit_small_patch16_224")) == "vit"
    assert family(AutoConfig.for_model("timm_wrapper", architecture="swin_tiny_patch4_window7_224")) == "other"
