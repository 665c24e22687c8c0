"""Where the model looked: attention rollout for ViTs (Abnar & Zuidema, 2020), Grad-CAM for
CNNs (the ``grad-cam`` package), and an overlay on the X-ray. Maps are in [0, 1], at the
model's input resolution; ``evidence_map`` weights them by ``map_strength`` = min(1, P / threshold)
(they are min-max scaled per image) and ``overlay`` blends them, transparent below ``OVERLAY_FLOOR``.

Which map is chosen by the architecture family (``cxr.architecture.family``, read from the
config): ``cnn`` -> Grad-CAM on the last backbone stage; ``vit`` -> attention rollout
(transformers ViTs from ``output_attentions``, timm ViTs behind TimmWrapper from each block's
attention probabilities); ``other`` (Swin, MaxViT, hybrids, unknown) -> no map, said
explicitly (:func:`no_map_reason`, :class:`NoMapError`) rather than a misleading one.

Fast paths used by the Predictor (same maps, one forward pass, no backward pass):

* ViT: the attentions come from the prediction's own forward (``output_attentions=True``).
* CNNs whose logits are ``Linear(global average pool(last feature map))`` (transformers
  ResNet; timm CNNs such as EfficientNet and ResNet behind TimmWrapper, checked numerically
  at load): the gradient of a logit with respect to the last feature map is the class's
  weight row / (h*w) at every position, so Grad-CAM equals CAM (Zhou et al., 2016) computed
  from the prediction's own last feature map (:func:`last_feature_map_and_logits`).
  :func:`gradcam_from_features` does that with the grad-cam package's scaling and resize
  (written out in torch, so serving the default model does not import ``pytorch_grad_cam``,
  which pulls in scikit-learn, matplotlib and OpenCV); tests check it against
  ``pytorch_grad_cam.GradCAM`` on the same layer (:func:`cam_target_layer`).

Other CNN heads need Grad-CAM's backward pass through ``pytorch_grad_cam`` (the ``gradcam``
extra; without it such a model gets :class:`NoMapError` saying what to install).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from PIL import Image

from .architecture import CNN, VIT, classification_head, describe_architecture, family, find_blocks


class _LogitsOnly(torch.nn.Module):
    """pytorch-grad-cam expects model(x) -> logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


class NoMapError(RuntimeError):
    """This architecture has no heat map (see :func:`explainer_kind`)."""


def _is_timm(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "timm_wrapper"


def explainer_kind(model) -> str | None:
    """By architecture family (``cxr.architecture.family``): Grad-CAM for CNNs, attention
    rollout for ViTs with a class token, None (no map) for every other architecture."""
    fam = family(model)
    if fam == CNN:
        return "grad-cam"
    if fam == VIT and (not _is_timm(model) or _timm_vit_has_cls(model)):
        return "attention-rollout"
    return None


def no_map_reason(model) -> str:
    return f"no heat map for this architecture ({describe_architecture(model)}, family {family(model)})"


EXPLAINER_NAMES = {"grad-cam": "Grad-CAM", "attention-rollout": "attention rollout", None: "none"}


def _timm_vit_has_cls(model) -> bool:
    vit = getattr(model, "timm_model", None)
    return getattr(vit, "cls_token", None) is not None and hasattr(vit, "blocks") and all(
        hasattr(getattr(b, "attn", None), "attn_drop") for b in vit.blocks)


def timm_attentions(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Per block (batch, heads, tokens, tokens) attention probabilities of a timm ViT behind
    TimmWrapper, read from each block's ``attn_drop`` input (timm's unfused attention path).
    Switches the model to unfused attention: use it on the explainer's own copy."""
    outs: list[torch.Tensor] = []
    hooks = []
    for block in model.timm_model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, i, o: outs.append(o.detach())))
    try:
        model(pixel_values=pixel_values)
    finally:
        for h in hooks:
            h.remove()
    return outs


def compute_attention_rollout(attentions, discard_ratio: float = 0.0, num_prefix_tokens: int | None = None
                              ) -> np.ndarray:
    """attentions: per layer (batch, heads, tokens, tokens) with the CLS token first, then any
    other prefix tokens (DeiT's distillation token, registers; default: inferred as the tokens
    beyond the largest square grid), then the patches.
    Returns (batch, grid, grid) CLS-to-patch relevance, min-max scaled to [0, 1]."""
    result = None
    for att in attentions:
        a = att.float().mean(dim=1)                                # average heads
        if discard_ratio:
            flat = a.flatten(1)
            k = int(flat.shape[1] * discard_ratio)
            idx = flat.topk(k, dim=1, largest=False).indices
            flat.scatter_(1, idx, 0)
        eye = torch.eye(a.shape[-1], device=a.device).unsqueeze(0)
        a = 0.5 * a + 0.5 * eye                                    # residual connection
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    tokens = result.shape[-1]
    grid = math.isqrt(tokens - 1)
    prefix = tokens - grid * grid if num_prefix_tokens is None else num_prefix_tokens
    grid = math.isqrt(tokens - prefix)
    cls = result[:, 0, prefix:prefix + grid * grid].reshape(-1, grid, grid)   # CLS row, patch tokens
    lo = cls.flatten(1).min(1).values[:, None, None]
    hi = cls.flatten(1).max(1).values[:, None, None]
    return ((cls - lo) / (hi - lo + 1e-8)).cpu().numpy()


class Explainer:
    """Built once per model; ``__call__(pixel_values, class_id)`` -> (H, W) map in [0, 1]."""

    def __init__(self, model):
        self.model = model
        self.kind = explainer_kind(model)
        if self.kind is None:
            raise NoMapError(no_map_reason(model))
        self._lock = threading.Lock()  # Grad-CAM keeps activations in hooks: one call at a time
        if self.kind == "grad-cam":
            try:
                from pytorch_grad_cam import GradCAM
            except ImportError:
                raise NoMapError(f"the heat map of {describe_architecture(model)} needs a Grad-CAM backward pass: "
                                 "pip install 'cxr-transfer[gradcam]' (pytorch-grad-cam)") from None

            target = cam_target_layer(model)
            self._cam = GradCAM(model=_LogitsOnly(model), target_layers=[target])

    def __call__(self, pixel_values: torch.Tensor, class_id: int) -> np.ndarray:
        with self._lock:
            return self._explain(pixel_values, class_id)

    def _explain(self, pixel_values: torch.Tensor, class_id: int) -> np.ndarray:
        size = pixel_values.shape[-2:]
        if self.kind == "grad-cam":
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            with torch.enable_grad():
                cam = self._cam(input_tensor=pixel_values.float(), targets=[ClassifierOutputTarget(class_id)])
            return np.asarray(cam[0], dtype=np.float32)
        if _is_timm(self.model):
            with torch.no_grad():
                return rollout_map(timm_attentions(self.model, pixel_values.float()), size,
                                   num_prefix_tokens=self.model.timm_model.num_prefix_tokens)
        with torch.no_grad():
            out = self.model(pixel_values=pixel_values.float(), output_attentions=True)
        return rollout_map(out.attentions, size)


def gap_linear_head(model) -> torch.nn.Linear | None:
    """The classifier's Linear layer when logits = Linear(global average pool(last feature map))
    (transformers ResNet: ``hidden_states[-1]``; timm CNNs: ``forward_features``), else None
    (other heads go through ``pytorch_grad_cam``)."""
    if _is_timm(model):
        timm_cam = _timm_cam(model)
        return timm_cam[0] if timm_cam else None
    if getattr(getattr(model, "config", None), "model_type", None) != "resnet":
        return None
    pooler = getattr(getattr(model, "resnet", None), "pooler", None)
    if not isinstance(pooler, torch.nn.AdaptiveAvgPool2d) or pooler.output_size not in (1, (1, 1)):
        return None
    _, head = classification_head(model)
    layers = list(head) if isinstance(head, torch.nn.Sequential) else [head]
    layers = [m for m in layers if not isinstance(m, (torch.nn.Flatten, torch.nn.Identity))]
    return layers[0] if len(layers) == 1 and isinstance(layers[0], torch.nn.Linear) else None


def _timm_cam(model) -> tuple[torch.nn.Linear, torch.nn.Module] | None:
    """For a timm CNN behind TimmWrapper whose ``forward_head(f)`` is exactly
    ``classifier(mean over h, w of f)`` for ``f = forward_features(x)`` (checked on two random
    inputs, so heads with layers after the pooling, e.g. ConvNeXt's or MobileNetV3's, are
    excluded): its classifier and the module whose output is ``f`` (the outermost one to
    return that very tensor: EfficientNet's ``bn2``, ResNet's ``layer4``); else None."""
    tm = getattr(model, "timm_model", None)
    if family(model) != CNN or tm is None or not hasattr(tm, "forward_features") or not hasattr(tm, "forward_head"):
        return None
    _, head = classification_head(model)
    if not isinstance(head, torch.nn.Linear):
        return None
    size = (getattr(model.config, "pretrained_cfg", None) or {}).get("input_size", [3, 64, 64])[-1]
    x = torch.randn(2, 3, int(size), int(size), generator=torch.Generator().manual_seed(0))
    finished: list[tuple[torch.nn.Module, object]] = []
    hooks = [m.register_forward_hook(lambda mod, _args, out: finished.append((mod, out)))
             for m in tm.modules() if m is not tm]
    was_training = tm.training
    try:
        tm.eval()
        with torch.no_grad():
            f = tm.forward_features(x)
            if f.ndim != 4:
                return None
            ok = torch.allclose(head(f.float().mean((2, 3))), tm.forward_head(f).float(), atol=1e-4, rtol=1e-4)
    except Exception:  # noqa: BLE001 - an unusual head: the library explainer handles it
        return None
    finally:
        for h in hooks:
            h.remove()
        tm.train(was_training)
    layers = [m for m, out in finished if out is f]
    return (head, layers[-1]) if ok and layers else None


def cam_target_layer(model) -> torch.nn.Module:
    """The layer whose output Grad-CAM explains: for timm CNNs with a pool + linear head, the
    one that produces ``forward_features`` (what the closed-form path reads), else the last
    backbone stage."""
    timm_cam = _timm_cam(model) if _is_timm(model) else None
    return timm_cam[1] if timm_cam else find_blocks(model)[-1][1]


def last_feature_map_and_logits(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the feature map a pool + linear head averages (the closed-form
    Grad-CAM's input; see :func:`gap_linear_head`) and the logits."""
    if _is_timm(model):
        tm = model.timm_model
        features = tm.forward_features(pixel_values)
        return features, tm.forward_head(features)
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def gradcam_from_features(features: torch.Tensor, head: torch.nn.Linear, class_id: int,
                          size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM of ``class_id`` from the last stage's output ``features`` (1, C, h, w) for a
    global-average-pool + ``head`` classifier, resized to ``size`` (H, W); the same steps as
    ``pytorch_grad_cam.GradCAM`` (weights = mean gradient, ReLU, min-max scaling, resize)."""
    a = features[0].float()
    h, w = a.shape[-2:]
    weights = head.weight[class_id].detach().float() / (h * w)   # d logit / d features, at every position
    cam = _min_max(torch.einsum("c,chw->hw", weights, a).detach().clamp(min=0))
    up = torch.nn.functional.interpolate(cam[None, None], size=(int(size[0]), int(size[1])), mode="bilinear",
                                         align_corners=False)[0, 0]     # = cv2.resize INTER_LINEAR
    return _min_max(up.clamp(min=0)).cpu().numpy().astype(np.float32)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """``pytorch_grad_cam.utils.image.scale_cam_image``'s scaling: (x - min) / (1e-7 + max)."""
    x = x - x.min()
    return x / (1e-7 + x.max())


def rollout_map(attentions, size: tuple[int, int], num_prefix_tokens: int | None = None) -> np.ndarray:
    """Attention rollout of one image, bilinearly resized to ``size`` (H, W), in [0, 1]."""
    if not attentions or attentions[0] is None:
        raise RuntimeError("the model returned no attentions (load it with attn_implementation='eager')")
    grid = compute_attention_rollout(attentions, num_prefix_tokens=num_prefix_tokens)[0]
    up = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=tuple(size),
                                         mode="bilinear", align_corners=False)
    return up[0, 0].clamp(0, 1).numpy().astype(np.float32)


# A sequential colour map (ColorBrewer YlOrRd anchors): pale yellow for weak, dark red for
# strong evidence. The overlay is transparent where the map is 0 and most opaque where it is 1,
# so a film without evidence stays a plain film (no blue wash, no blob from rescaling).
COLORMAP_ANCHORS = ((255, 255, 178), (254, 204, 92), (253, 141, 60), (240, 59, 32), (189, 0, 38))


def colormap_lut() -> np.ndarray:
    """(256, 3) uint8 lookup table of the overlay colours."""
    anchors = np.asarray(COLORMAP_ANCHORS, dtype=np.float32)
    x = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], -1).round().astype(np.uint8)


def colorbar_css() -> str:
    """A CSS linear-gradient with the overlay's colours (for a colour bar beside the image)."""
    stops = ", ".join(f"rgb{tuple(int(v) for v in c)} {100 * i / (len(COLORMAP_ANCHORS) - 1):.0f}%"
                      for i, c in enumerate(COLORMAP_ANCHORS))
    return f"linear-gradient(to right, {stops})"


def map_strength(probability: float, threshold: float | None = None) -> float:
    """How strongly a film's map is drawn, 0-1: ``min(1, probability / threshold)``. An answer at
    or above the threshold (the positive label) gets the full map, so a PNEUMONIA answer at
    P = 0.50 is as visible as one at 0.99; below it the map fades in proportion to how far P is
    from 0 towards the threshold, so a confident NORMAL (P near 0) shows almost nothing.
    Without a threshold: the probability itself (the older scaling)."""
    p = float(np.clip(probability, 0, 1))
    if threshold is None or not threshold > 0:
        return p
    return float(min(1.0, p / float(threshold)))


def evidence_map(heatmap: np.ndarray, weight: float, threshold: float | None = None) -> np.ndarray:
    """Scale a per-image [0, 1] map by :func:`map_strength` (``weight`` = the class's calibrated
    probability, ``threshold`` = the model's decision threshold on it). Grad-CAM and rollout maps
    are min-max scaled per image (0 = this film's weakest region, 1 = its strongest), so without
    this a confident negative would show as strong a blob as a confident positive."""
    return (np.clip(heatmap, 0, 1) * map_strength(weight, threshold)).astype(np.float32)


# The overlay draws nothing below this share of full strength: the min-max scaled map is above 0
# almost everywhere, so without a floor a confident answer tints the whole chest. The legend
# (app.render.map_caption) shows the same floor.
OVERLAY_FLOOR = 0.25


def overlay_alpha(value: np.ndarray, opacity: float = 0.6, floor: float = OVERLAY_FLOOR) -> np.ndarray:
    """Per-pixel opacity of the overlay for map values in [0, 1]: 0 up to ``floor``, rising
    linearly to ``opacity`` at 1."""
    ramp = np.clip((np.asarray(value, np.float32) - floor) / max(1e-6, 1.0 - floor), 0.0, 1.0)
    return float(np.clip(opacity, 0.0, 1.0)) * ramp


def overlay(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.6,
            floor: float = OVERLAY_FLOOR) -> Image.Image:
    """``heatmap`` (any size, [0, 1]) blended over ``image``: colour from :func:`colormap_lut`,
    per-pixel alpha from :func:`overlay_alpha` (transparent at and below ``floor``)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    hm8 = np.asarray(Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    colour = colormap_lut()[hm8].astype(np.float32)
    alpha = overlay_alpha(hm8.astype(np.float32) / 255.0, opacity, floor)[..., None]
    return Image.fromarray((rgb * (1 - alpha) + colour * alpha).round().astype(np.uint8))


def heatmap_image(heatmap: np.ndarray) -> Image.Image:
    """The raw map as an 8-bit greyscale PNG-able image."""
    return Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), "L")
