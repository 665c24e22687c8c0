"""build_model(): a checkpoint (transformers or timm via transformers) or a from-scratch
preset, a fresh head for our labels, a training strategy, and export (LoRA merged)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from cxr.architecture import CNN, VIT, ModelError, classification_head, family, find_blocks  # noqa: F401 (re-exported)
from cxr.inference import image_processor_backend
from cxr.locate import MissingFolderError, local_folder, weights_problem

logger = logging.getLogger(__name__)

# Greyscale radiographs replicated in 3 channels: centre and scale to roughly [-1, 1].
XRAY_MEAN = [0.5, 0.5, 0.5]
XRAY_STD = [0.25, 0.25, 0.25]

PRESETS = {
    # A compact ResNet-18-shaped CNN (half width): ~2.8 M parameters, ~11 MB in fp32.
    "cxr-resnet-small-scratch": dict(
        kind="resnet", image_size=224,
        config=dict(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                    depths=[2, 2, 2, 2], layer_type="basic", hidden_act="relu",
                    downsample_in_first_stage=False),
    ),
    # A DeiT-Tiny-shaped ViT: patch 16, 192 wide, 6 layers, 3 heads (~2.8 M parameters).
    "cxr-vit-small-scratch": dict(
        kind="vit", image_size=224,
        config=dict(patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                    intermediate_size=768, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    ),
    # Tiny versions for tests and smoke runs.
    "tiny-resnet-scratch": dict(
        kind="resnet", image_size=64,
        config=dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                    layer_type="basic", hidden_act="relu"),
    ),
    "tiny-vit-scratch": dict(
        kind="vit", image_size=32,
        config=dict(patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64),
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_preset(name: str, id2label: dict[int, str], image_size: int | None = None):
    spec = PRESETS[name]
    size = image_size or spec["image_size"]
    label2id = {v: k for k, v in id2label.items()}
    common = dict(num_labels=len(id2label), id2label=id2label, label2id=label2id)
    if spec["kind"] == "resnet":
        config = ResNetConfig(**spec["config"], **common)
        model = ResNetForImageClassification(config)
    else:
        config = ViTConfig(image_size=size, **spec["config"], **common)
        model = ViTForImageClassification(config)
    processor = ViTImageProcessor(
        do_resize=True, size={"height": size, "width": size}, resample=2,  # bilinear
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=XRAY_MEAN, image_std=XRAY_STD)
    model.config.cxr_preset = name
    return model, processor


def size_dict(size) -> dict:
    """transformers 5 keeps sizes in a SizeDict object; older ones in a dict."""
    if size is None:
        return {}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: v for k, v in vars(size).items() if v is not None and not k.startswith("_")}


def _set_processor_size(processor, size: int) -> None:
    """Square inputs of `size` pixels, resized directly (no centre crop left to mis-match)."""
    processor.size = {"height": size, "width": size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": size, "width": size}
    if hasattr(processor, "crop_pct"):
        processor.crop_pct = None
    if getattr(processor, "do_center_crop", None):
        processor.do_center_crop = False


def load_checkpoint(name: str, id2label: dict[int, str], image_size: int | None = None,
                    revision: str | None = None):
    """A transformers or timm (TimmWrapper) checkpoint with a fresh head for id2label."""
    label2id = {v: k for k, v in id2label.items()}
    try:
        local = local_folder(name) is not None
    except MissingFolderError as e:
        from .pypi_weights import missing_checkpoint_hint

        hint = missing_checkpoint_hint(name)
        raise ModelError(str(e) + (f"; make it with: {hint}" if hint else "")) from None
    problem = weights_problem(name, require_weights=False) if local else None
    if problem:   # a fresh head is trained, so a config-only folder (from-scratch) is fine here
        raise ModelError(problem)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as e:  # ValueError: e.g. remote code refused
        from .pypi_weights import missing_checkpoint_hint

        hint = missing_checkpoint_hint(name)
        msg = f"cannot load checkpoint '{name}': {str(e).splitlines()[0]}"
        raise ModelError(msg + (f"; offline, make it with: {hint}" if hint else "")) from None
    kwargs = dict(num_labels=len(id2label), id2label=id2label, label2id=label2id,
                  ignore_mismatched_sizes=True, revision=revision, use_safetensors=True, trust_remote_code=False)
    if family(config) == VIT and config.model_type != "timm_wrapper":
        kwargs["attn_implementation"] = "sdpa"
    try:
        model = AutoModelForImageClassification.from_pretrained(name, **kwargs)
        processor = AutoImageProcessor.from_pretrained(name, revision=revision, trust_remote_code=False,
                                                       backend=image_processor_backend(config))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load checkpoint '{name}': {str(e).splitlines()[0]}") from None
    if type(processor).__name__ == "TimmWrapperImageProcessor":
        processor = timm_processor(model.config, image_size)
    elif image_size:
        _set_processor_size(processor, image_size)
    if image_size and hasattr(model.config, "image_size"):
        model.config.image_size = image_size
    return model, processor


def timm_processor(config, image_size: int | None = None):
    """A timm checkpoint's own preprocessing (``pretrained_cfg``: mean, std, interpolation) with the
    whole film squashed to a square: ``crop_pct`` 1 and ``crop_mode`` "squash" instead of timm's
    ImageNet eval crop, which cuts 12.5% of the border, where the lung apices and
    costophrenic angles are. The config is updated in place, so the exported folder's
    ``config.json`` (which ``AutoImageProcessor`` and ``pipeline()`` read for timm models)
    holds exactly what training used."""
    from transformers import TimmWrapperImageProcessor

    cfg = dict(getattr(config, "pretrained_cfg", None) or {})
    size = image_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
    cfg.update(input_size=[3, size, size], crop_pct=1.0, crop_mode="squash")
    cfg.pop("test_input_size", None)
    cfg.pop("test_crop_pct", None)
    config.pretrained_cfg = cfg
    return TimmWrapperImageProcessor(pretrained_cfg=cfg, architecture=getattr(config, "architecture", None))


def build_model(model_name_or_path: str, id2label: dict[int, str], image_size: int | None = None,
                revision: str | None = None, reinit_head: bool = False):
    if is_preset(model_name_or_path):
        return build_preset(model_name_or_path, id2label, image_size)
    model, processor = load_checkpoint(model_name_or_path, id2label, image_size, revision)
    if reinit_head:
        reset_head(model)
    return model, processor


def reset_head(model) -> None:
    """Fresh random weights for the classification head (its modules' reset_parameters)."""
    prefixes = find_head(model)
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in prefixes) and hasattr(module, "reset_parameters"):
            module.reset_parameters()


# ---------------------------------------------------------------- strategies

def find_head(model) -> list[str]:
    """Names (prefixes) of the classification head's parameters."""
    return [classification_head(model)[0]]


def _final_norms(model) -> list[str]:
    """Norm layers after the last block (ViT/ConvNeXt 'layernorm', timm 'norm'/'fc_norm')."""
    out = []
    for n, m in model.named_modules():
        leaf = n.rsplit(".", 1)[-1]
        if leaf in ("layernorm", "fc_norm", "norm", "pooler") and n.count(".") <= 2:
            out.append(n)
    return out


def _after_blocks(model) -> list[str]:
    """Modules that run after the last block and before the head (EfficientNet's conv_head +
    bn2): part of the top of the network, so 'partial' trains them with the last stage."""
    last = find_blocks(model)[-1][0]
    parent_name, _, leaf = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential)):  # blocks.N inside 'blocks'
        parent_name, _, leaf = parent_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
    names = [n for n, _ in parent.named_children()]
    if leaf not in names:
        return []
    head = set(find_head(model))
    prefix = parent_name + "." if parent_name else ""
    after = [prefix + n for n in names[names.index(leaf) + 1:]]
    return [n for n in after if n not in head and any(True for _ in model.get_submodule(n).parameters())]


def keep_frozen_batchnorm_in_eval(model) -> list[str]:
    """Batch-norm layers with no trainable parameter stay in eval mode while training: a frozen
    backbone is a fixed feature extractor (running statistics kept, not re-estimated on
    16-image batches), as in Keras' transfer-learning recipe. Returns the names.

    Why not timm's ``freeze_batch_norm_2d`` (checked, timm 1.0.31): it swaps each layer for
    torchvision's ``FrozenBatchNorm2d``, whose affine weights are buffers, not parameters, and
    whose state dict has no ``num_batches_tracked``: on EfficientNet-Lite0 the card's total
    drops from 3,373,570 to 3,331,554 parameters and the state dict (Trainer checkpoints, the
    exported folder) from 296 to 247 keys. Its fused scale-and-shift forward differs from
    ``F.batch_norm`` in the last bits (1e-6 in the logits on the example films), so the
    logits scored at training time (operating point, hold-out) would not be exactly those of
    the exported model. It also covers 2-d layers only.
    Here each layer keeps its class's forward and state dict; only ``train()`` is pinned to
    eval, so training-time and exported logits are bit-identical."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()):
            module.__class__ = _eval_only(type(module))
            module.eval()
            names.append(name)
    return names


_EVAL_ONLY: dict[type, type] = {}


def _eval_only(cls: type) -> type:
    if getattr(cls, "_cxr_eval_only", False):
        return cls
    if cls not in _EVAL_ONLY:
        def train(self, mode: bool = True):
            return super(new, self).train(False)

        new = type(cls.__name__, (cls,), {"train": train, "_cxr_eval_only": True, "__module__": cls.__module__})
        _EVAL_ONLY[cls] = new
    return _EVAL_ONLY[cls]


def lora_target_modules(model) -> list[str]:
    """Default LoRA targets by architecture family: the attention projections of transformers,
    the convolutions of a CNN's backbone blocks."""
    if family(model) != CNN:
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for pair in (("q_proj", "v_proj"), ("query", "value"), ("qkv",), ("q", "v")):
            if set(pair) <= names:
                return list(pair)
        raise ModelError(f"no LoRA target modules known for {model.__class__.__name__}; set lora_target_modules")
    # CNNs: every convolution inside the backbone blocks (the stem and head stay as they are),
    # and ConvNeXt's pointwise Linear layers. Grouped/depthwise convolutions are left out: peft
    # cannot merge LoRA into them (and needs rank % groups == 0); the pointwise layers around
    # them carry the adaptation.
    blocks = [n for n, _ in find_blocks(model)]
    convs = [n for n, m in model.named_modules()
             if (isinstance(m, torch.nn.Linear) or isinstance(m, torch.nn.Conv2d) and m.groups == 1)
             and any(n.startswith(b + ".") for b in blocks)]
    if convs:
        return convs
    raise ModelError(f"no LoRA target modules known for {model.__class__.__name__}; set lora_target_modules")


def apply_strategy(model, strategy: str, *, partial_stages: int = 1, lora_r: int = 16, lora_alpha: int = 16,
                   lora_dropout: float = 0.1, lora_target_modules_: list[str] | None = None):
    """Returns the model to train (a PeftModel for LoRA)."""
    head = find_head(model)

    def under(n: str, prefixes) -> bool:
        return any(n == p or n.startswith(p + ".") for p in prefixes)

    if strategy == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model
    if strategy == "frozen":
        for n, p in model.named_parameters():
            p.requires_grad = under(n, head)
        keep_frozen_batchnorm_in_eval(model)
        return model
    if strategy == "partial":
        blocks = [n for n, _ in find_blocks(model)][-partial_stages:]
        train = head + blocks + _after_blocks(model) + _final_norms(model)
        for n, p in model.named_parameters():
            p.requires_grad = under(n, train)
        keep_frozen_batchnorm_in_eval(model)
        return model
    if strategy == "lora":
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules_ or lora_target_modules(model)
        _check_lora_targets(model, targets)
        to_save = list(head)
        if family(model) == CNN:  # batch-norm statistics and affine must adapt too
            to_save += sorted({n for n, m in model.named_modules()
                               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=targets, modules_to_save=to_save, bias="none")
        return get_peft_model(model, cfg)
    raise ModelError(f"unknown strategy '{strategy}'")


def _check_lora_targets(model, targets: list[str]) -> None:
    """Refuse, before training, targets peft would reject or could not merge for export."""
    matched = False
    for n, m in model.named_modules():
        if not (n in targets or n.rsplit(".", 1)[-1] in targets):
            continue
        matched = True
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1:
            raise ModelError(f"LoRA target '{n}' is a grouped/depthwise convolution (groups={m.groups}): peft "
                             "cannot merge LoRA into it for export; target the pointwise convolutions instead "
                             "(leave lora_target_modules unset to choose them automatically)")
    if not matched:
        raise ModelError(f"LoRA target modules {targets} match nothing in {model.__class__.__name__}")


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def merge_for_export(model):
    """A plain transformers model: LoRA merged into the base weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_model_folder(model, processor, output_dir: str | os.PathLike) -> None:
    """Hub-ready weights: safetensors + config + image processor, world-readable."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "label_names"):  # TimmWrapperConfig writes label_names, not id2label
        model.config.label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    for f in out.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
