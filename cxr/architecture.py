"""The architecture family of a model, read from its config: the one answer used by the
training strategies, channels_last, the LoRA targets and the explainer.

* ``cnn``: convolutional networks (ResNet, ConvNeXt, EfficientNet, RegNet, ...): channels_last,
  LoRA on the backbone's convolutions, Grad-CAM.
* ``vit``: plain vision transformers with global self-attention over patch tokens and a class
  token (ViT, DeiT, BEiT, DINOv2, EVA): LoRA on the attention projections, attention rollout.
* ``other``: everything else (Swin, MaxViT, hybrids, unknown types): no heat map, no
  channels_last, LoRA only on attention projections it can name.

transformers models are classified by ``config.model_type``; timm models loaded through
``TimmWrapper`` by the timm module that registers ``config.architecture`` (timm's own
registry, no name matching). Imports torch only (timm lazily): serving uses it too.
"""

from __future__ import annotations

import torch

CNN, VIT, OTHER = "cnn", "vit", "other"
FAMILIES = (CNN, VIT, OTHER)

# transformers model types
HF_CNN_TYPES = frozenset({"resnet", "convnext", "convnextv2", "efficientnet", "regnet", "mobilenet_v1",
                          "mobilenet_v2", "bit", "van"})
HF_VIT_TYPES = frozenset({"vit", "deit", "beit", "data2vec-vision", "dinov2", "dinov2_with_registers",
                          "vit_msn"})
# timm modules (timm.models.<module>) that register the architecture
TIMM_CNN_MODULES = frozenset({
    "resnet", "resnetv2", "efficientnet", "convnext", "regnet", "mobilenetv3", "densenet", "dla", "dpn",
    "ghostnet", "hrnet", "inception_v3", "inception_v4", "inception_resnet_v2", "nasnet", "pnasnet", "rexnet",
    "res2net", "resnest", "selecsls", "senet", "sknet", "tresnet", "vgg", "xception", "xception_aligned",
    "cspnet", "byobnet", "nfnet", "hgnet", "repghost", "rdnet"})
TIMM_VIT_MODULES = frozenset({"vision_transformer", "deit", "beit", "eva"})


class ModelError(ValueError):
    """The checkpoint cannot be used (missing, not an image classifier, unsafe weights)."""


def _config(obj):
    """A model (transformers or peft) or a config -> the transformers config."""
    if hasattr(obj, "model_type") and not isinstance(obj, torch.nn.Module):
        return obj
    config = getattr(obj, "config", None)
    if config is None and hasattr(obj, "get_base_model"):
        config = getattr(obj.get_base_model(), "config", None)
    return config


def timm_module(architecture: str | None) -> str | None:
    """The timm.models module that registers ``architecture`` ('resnet50.a1_in1k' -> 'resnet')."""
    if not architecture:
        return None
    try:
        import timm.models
    except ImportError:
        return None
    name = timm.models.get_arch_name(architecture)
    if not timm.models.is_model(name):
        return None
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def timm_architecture(config) -> str | None:
    arch = getattr(config, "architecture", None)
    if not arch:
        arch = (getattr(config, "pretrained_cfg", None) or {}).get("architecture")
    return arch


def family(obj) -> str:
    """'cnn', 'vit' or 'other' for a model or its config."""
    config = _config(obj)
    model_type = getattr(config, "model_type", None)
    if model_type == "timm_wrapper":
        module = timm_module(timm_architecture(config))
        return CNN if module in TIMM_CNN_MODULES else VIT if module in TIMM_VIT_MODULES else OTHER
    if model_type in HF_CNN_TYPES:
        return CNN
    if model_type in HF_VIT_TYPES:
        return VIT
    return OTHER


def describe_architecture(obj) -> str:
    """'resnet', 'timm vit_base_patch16_224', ... for messages."""
    config = _config(obj)
    model_type = getattr(config, "model_type", None) or type(obj).__name__
    if model_type == "timm_wrapper":
        return f"timm {timm_architecture(config)}"
    return model_type


def find_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The backbone's stages/blocks in forward order, as (name, module)."""
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) and len(mod) > 1:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("layer", "stages", "blocks", "layers"):
                candidates.append((name, mod))
    if candidates:
        name, mod = candidates[0]
        return [(f"{name}.{i}", m) for i, m in enumerate(mod)]
    # timm ResNet: layer1..layer4
    layers = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("layer1", "layer2", "layer3", "layer4")]
    if layers:
        return layers
    raise ModelError(f"cannot find backbone blocks in {model.__class__.__name__} for the partial strategy")


def classification_head(model) -> tuple[str, torch.nn.Module]:
    """The classification head as (name, module): what timm's ``get_classifier()`` returns for
    a model behind ``TimmWrapper``, else transformers' ``classifier``. The one head finder used
    by the training strategies, the OOD feature tap and the explainer."""
    tm = getattr(model, "timm_model", None)
    if tm is not None and hasattr(tm, "get_classifier"):
        head = tm.get_classifier()
        for name, module in model.named_modules():
            if module is head:
                return name, head
    head = getattr(model, "classifier", None)
    if isinstance(head, torch.nn.Module):
        return "classifier", head
    raise ModelError(f"cannot find the classification head of {model.__class__.__name__} "
                     "(no timm get_classifier(), no 'classifier' module)")


def head_linear(model) -> torch.nn.Linear:
    """The head's Linear layer whose outputs are the logits (a bare Linear, or the last Linear of
    a Sequential head such as transformers ResNet's Flatten + Linear)."""
    _, head = classification_head(model)
    linears = [head] if isinstance(head, torch.nn.Linear) else [m for m in head.modules()
                                                                 if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ModelError(f"the classification head of {model.__class__.__name__} has no Linear layer")
    return linears[-1]
