"""Pixel values for the model: the saved Hugging Face image processor, applied fast.

The model folder's image processor (``preprocessor_config.json``) is the one definition of
preprocessing: ``pipeline("image-classification")`` applies it, and so do training's
transform, the Predictor, the app and the tests, all through :func:`pixel_values`.

For the processors this project writes (the torchvision backend doing resize -> rescale ->
normalize, no crop or pad), :func:`pixel_values` calls the processor's own ``resize`` on one
stacked **channels_last** uint8 batch per image size (torchvision's vectorised uint8 resize
is ~2x faster there than on the channels-first tensors the processor builds from a list of
PIL images), then rescales and normalises with the same float32 operations as the processor.
The output equals the processor's output (tests assert it); any other processor
configuration goes through ``processor(...)``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["has_fast_path", "pixel_values", "to_uint8_batch"]


def has_fast_path(processor) -> bool:
    """True for a torchvision-backend processor that only resizes to a fixed size, rescales
    and normalises (what ``cxr_train.modeling`` saves), so :func:`pixel_values` may batch it."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # pragma: no cover - older transformers
        return False
    size = getattr(processor, "size", None)
    cls = type(processor)
    # A subclass that overrides any step (EfficientNet's offset rescale, MobileViT's channel
    # flip, DPT's aspect-preserving resize...) does something else: let it run itself.
    inherited = all(getattr(cls, name, None) is getattr(TorchvisionBackend, name, None)
                    for name in ("_preprocess", "_preprocess_image_like_inputs", "preprocess", "resize",
                                 "rescale_and_normalize", "process_image"))
    return bool(isinstance(processor, TorchvisionBackend) and inherited
            and bool(getattr(processor, "do_resize", False))
            and size is not None and getattr(size, "height", None) and getattr(size, "width", None)
            and not getattr(processor, "do_center_crop", False)
            and not getattr(processor, "do_pad", False)
            and getattr(processor, "do_convert_rgb", None) in (None, True))


def _is_rgb8(image) -> bool:
    """The fast path takes RGB PIL images and H x W x 3 uint8 arrays; anything else (alpha,
    greyscale, channels-first...) goes through the processor's own conversion rules."""
    if isinstance(image, Image.Image):
        return image.mode == "RGB"
    return isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def to_uint8_batch(images: list) -> torch.Tensor:
    """Same-size RGB images (PIL or HxWx3 uint8 arrays) -> (N, 3, H, W) uint8 in channels_last."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


def pixel_values(processor, images: list) -> torch.Tensor:
    """``processor(images=images, return_tensors="pt")["pixel_values"]``, batched by image size.

    ``images``: RGB PIL images (any sizes). Returns a float32 (N, 3, H, W) tensor; on the fast
    path it is channels_last in memory (values identical, ``.contiguous()`` if that matters).
    """
    if not images:
        raise ValueError("no images to preprocess")
    if not (has_fast_path(processor) and all(_is_rgb8(im) for im in images)):
        return processor(images=list(images), return_tensors="pt")["pixel_values"]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        w, h = im.size if isinstance(im, Image.Image) else (im.shape[1], im.shape[0])
        groups.setdefault((h, w), []).append(i)
    out = None
    for idx in groups.values():
        x = processor.resize(to_uint8_batch([images[i] for i in idx]), size=processor.size,
                             resample=processor.resample)
        x = _rescale_and_normalize(processor, x)
        if len(groups) == 1:
            return x
        if out is None:
            out = torch.empty((len(images), *x.shape[1:]), dtype=x.dtype)
        out[idx] = x
    return out


def _rescale_and_normalize(processor, x: torch.Tensor) -> torch.Tensor:
    """The processor's fused ``(x - mean / factor) / (std / factor)`` in float32, the same
    operations in the same order as ``TorchvisionBackend.rescale_and_normalize``; with equal
    per-channel statistics (this project's processors) it runs as two scalar ops straight on
    the channels_last batch, several times faster than a per-channel broadcast."""
    if not (processor.do_rescale and processor.do_normalize):
        return processor.rescale_and_normalize(x, processor.do_rescale, processor.rescale_factor,
                                                processor.do_normalize, processor.image_mean, processor.image_std)
    scale = 1.0 / processor.rescale_factor
    mean = torch.tensor(processor.image_mean) * scale
    std = torch.tensor(processor.image_std) * scale
    if mean.numel() == 1 or (torch.all(mean == mean[0]) and torch.all(std == std[0])):
        out = torch.empty(x.shape, dtype=torch.float32, memory_format=torch.channels_last).copy_(x)
        return out.sub_(mean.flatten()[0].item()).div_(std.flatten()[0].item())
    return x.contiguous().to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
