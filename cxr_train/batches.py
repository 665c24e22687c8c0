"""The batch path: uint8 batches from the loader, float conversion + augmentation +
normalisation on the training device, in batches.

- :class:`BatchAugment`: today's augmentation definitions (``cxr_train.data.AUGMENTATIONS``:
  random resized crop, rotation, shift, brightness/contrast in random order, gamma and a slight
  blur for ``strong``; never a flip) with per-sample random parameters, applied to a whole
  batch at once: crop, rotation and shift are composed into ONE sampling grid per film (one
  bilinear resample instead of two; the area a rotation uncovers is black, as before), the
  intensity steps are per-sample broadcasts. Greyscale batches (R = G = B, chest films) are
  warped on one channel.
- :class:`DevicePreprocess`: a forward pre-hook on the model: a ``pixel_values`` uint8 batch
  becomes the model's float input (augmented first while the model is training) with the
  saved processor's own normalisation (:class:`cxr_train.cache.PixelSpec`); float inputs
  (the Predictor, ``pipeline()``) pass through untouched. Hooks are not saved: the exported
  folder is the plain Hugging Face model.
- :func:`build_inputs`: what ``train_one`` gives the Trainer: the splits (film-store records,
  streamed films, or the old per-epoch decode with ``--data_cache none``) and the collator.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

GREY = (0.299, 0.587, 0.114)          # torchvision's rgb_to_grayscale weights (ColorJitter's contrast mean)


# ---------------------------------------------------------------- augmentation

class BatchAugment:
    """Per-sample random augmentation of a (N, 3, H, W) batch (uint8, or float on the 0..255
    scale) on its own device; returns float32 on the 0..255 scale."""

    def __init__(self, strength: str = "standard"):
        from .data import AUGMENTATIONS

        if strength not in AUGMENTATIONS:
            raise ValueError(f"augment_strength must be one of {sorted(AUGMENTATIONS)}, got {strength!r}")
        self.strength = strength
        (self.scale, self.degrees, self.shift, self.bc, self.gamma, self.blur) = AUGMENTATIONS[strength]
        self.ratio = (0.9, 1.1)
        self.blur_p, self.blur_sigma = 0.3, (0.1, 1.0)

    def __repr__(self) -> str:
        from .data import describe_augmentation

        return f"BatchAugment({self.strength}: {describe_augmentation(self.strength)})"

    # -- parameters (drawn on the CPU with torch's global generator: seeded by set_seed)
    def crop_boxes(self, n: int, h: int, w: int, tries: int = 10) -> torch.Tensor:
        """(n, 4) float (top, left, height, width): torchvision RandomResizedCrop.get_params,
        vectorised (10 tries, else the whole image clipped to the ratio range)."""
        area = h * w
        target = area * torch.empty(n, tries).uniform_(*self.scale)
        log_r = torch.empty(n, tries).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r)
        cw = torch.round(torch.sqrt(target * aspect))
        ch = torch.round(torch.sqrt(target / aspect))
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = torch.argmax(ok.to(torch.int8), dim=1)
        any_ok = ok.any(dim=1)
        cw = cw.gather(1, first[:, None])[:, 0]
        ch = ch.gather(1, first[:, None])[:, 0]
        # fallback: centre crop of the whole image at the nearest allowed ratio
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fh, fw = h, round(h * self.ratio[1])
        else:
            fw, fh = w, h
        cw = torch.where(any_ok, cw, torch.tensor(float(fw)))
        ch = torch.where(any_ok, ch, torch.tensor(float(fh)))
        top = torch.floor(torch.rand(n) * (h - ch + 1))
        left = torch.floor(torch.rand(n) * (w - cw + 1))
        top = torch.where(any_ok, top, torch.floor((h - ch) / 2))
        left = torch.where(any_ok, left, torch.floor((w - cw) / 2))
        return torch.stack([top, left, ch, cw], dim=1)

    def draw(self, n: int, h: int, w: int) -> dict:
        """All random parameters of one batch."""
        p = {
            "box": self.crop_boxes(n, h, w),
            "angle": torch.empty(n).uniform_(-self.degrees, self.degrees),
            "tx": torch.round(torch.empty(n).uniform_(-self.shift * w, self.shift * w)),
            "ty": torch.round(torch.empty(n).uniform_(-self.shift * h, self.shift * h)),
            "brightness": torch.empty(n).uniform_(1 - self.bc, 1 + self.bc),
            "contrast": torch.empty(n).uniform_(1 - self.bc, 1 + self.bc),
            "contrast_first": torch.rand(n) < 0.5,
        }
        if self.gamma:
            lo, hi = self.gamma
            p["gamma"] = torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi)))
        if self.blur:
            p["blur"] = torch.rand(n) < self.blur_p
            p["sigma"] = torch.empty(n).uniform_(*self.blur_sigma)
        return p

    # -- application
    def __call__(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) batch, got {tuple(x.shape)}")
        n, _, h, w = x.shape
        p = params if params is not None else self.draw(n, h, w)
        p = {k: v.to(x.device) for k, v in p.items()}
        grey = bool(torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]))
        src = x[:, :1] if grey else x
        out = self.warp(src.to(torch.float32), p, h, w)
        out = self.intensity(out, p)
        return out.expand(-1, 3, -1, -1) if grey else out

    @staticmethod
    def grid(p: dict, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling grid (N, H, W, 2) for grid_sample (align_corners=False) and the mask of output
        pixels that come from inside the crop (N, 1, H, W). Output pixel p -> (inverse shift and
        rotation about the centre) -> q in the resized crop -> source pixel s in the film; the
        whole map is affine, so it is built from two broadcast rows per sample (normalised
        coordinates), and "inside the crop" is "s inside the crop box"."""
        n = p["angle"].shape[0]
        a = torch.deg2rad(p["angle"])
        cos, sin = torch.cos(a), torch.sin(a)
        top, left, ch, cw = p["box"].unbind(1)
        kx, ky = cw / w, ch / h                       # crop size / output size
        tx, ty = p["tx"], p["ty"]                     # shift in pixels
        a00, a01 = cos * kx, -sin * (h / w) * kx
        a10, a11 = sin * (w / h) * ky, cos * ky
        b0 = -(cos * tx - sin * ty) * (2.0 / w) * kx + (2 * left + cw) / w - 1
        b1 = -(sin * tx + cos * ty) * (2.0 / h) * ky + (2 * top + ch) / h - 1
        xn = ((torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1).view(1, 1, w)
        yn = ((torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1).view(1, h, 1)

        def v(t):
            return t.view(n, 1, 1)

        g = torch.empty(n, h, w, 2, device=device)
        g[..., 0] = v(a00) * xn + (v(a01) * yn + v(b0))
        g[..., 1] = v(a10) * xn + (v(a11) * yn + v(b1))
        gx, gy = g[..., 0], g[..., 1]
        inside = ((gx >= v(2 * left / w - 1)) & (gx <= v(2 * (left + cw) / w - 1))
                  & (gy >= v(2 * top / h - 1)) & (gy <= v(2 * (top + ch) / h - 1)))
        return g, inside.unsqueeze(1)

    def warp(self, x: torch.Tensor, p: dict, h: int, w: int) -> torch.Tensor:
        g, inside = self.grid(p, h, w, x.device)
        out = F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=False)
        return out * inside

    def intensity(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        n = x.shape[0]
        b = p["brightness"].view(n, 1, 1, 1)
        c = p["contrast"].view(n, 1, 1, 1)

        def brightness(t):
            return (t * b).clamp_(0, 255)

        def contrast(t):
            grey = t.mean(dim=(1, 2, 3), keepdim=True) if t.shape[1] == 1 else \
                (t * torch.tensor(GREY, device=t.device).view(1, 3, 1, 1)).sum(1, keepdim=True).mean(
                    dim=(1, 2, 3), keepdim=True)
            return (c * t + (1 - c) * grey).clamp_(0, 255)

        first = p["contrast_first"].view(n, 1, 1, 1)
        x = torch.where(first, contrast(brightness(x)), brightness(contrast(x)))
        if "gamma" in p:
            x = (x / 255).pow_(p["gamma"].view(n, 1, 1, 1)).mul_(255)
        if "blur" in p and bool(p["blur"].any()):
            x = torch.where(p["blur"].view(n, 1, 1, 1), _gaussian_blur3(x, p["sigma"]), x)
        return x


def _gaussian_blur3(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with a per-sample sigma (reflect padding, as torchvision's)."""
    n, c, h, w = x.shape
    t = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    k1 = torch.exp(-0.5 * (t.view(1, 3) / sigma.view(n, 1)) ** 2)
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, dim=0)   # (n*c, 3, 3)
    y = F.pad(x.reshape(1, n * c, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(y, k2[:, None], groups=n * c).reshape(n, c, h, w)


# ---------------------------------------------------------------- on the device

class DevicePreprocess:
    """Forward pre-hook: uint8 ``pixel_values`` -> [augment while training] -> normalise."""

    def __init__(self, normalise, augment: BatchAugment | None = None, channels_last: bool = True):
        self.normalise, self.augment, self.channels_last = normalise, augment, channels_last

    def __call__(self, module, args, kwargs):
        x = kwargs.get("pixel_values")
        if x is None and args and isinstance(args[0], torch.Tensor):
            x = args[0]
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
            return None
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            y = self.augment(x) if (self.augment is not None and module.training) else x
            y = self.normalise(y)
            y = y.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if "pixel_values" in kwargs:
            kwargs = {**kwargs, "pixel_values": y}
        else:
            args = (y, *args[1:])
        return args, kwargs


def attach_device_preprocess(model, normalise, augment: BatchAugment | None, channels_last: bool = True):
    """Register :class:`DevicePreprocess` on ``model``; returns the hook handle (``.remove()``)."""
    return model.register_forward_pre_hook(DevicePreprocess(normalise, augment, channels_last), with_kwargs=True)


class UInt8Collator:
    """Trainer ``data_collator``: a batch already collated by ``CachedImages.__getitems__``
    passes through; a list of samples (streamed films) is stacked into the same layout."""

    def __call__(self, features):
        if isinstance(features, dict):
            return features
        x = torch.stack([f["pixel_values"] for f in features])
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        labels = torch.tensor([int(f["labels"]) for f in features], dtype=torch.int64)
        return {"pixel_values": x, "labels": labels}


# ---------------------------------------------------------------- what train_one uses

def build_inputs(model, processor, data, data_args, num_workers: int = 0):
    """(data with its splits ready for the Trainer, data_collator or None).

    ``data_args.data_cache``: ``memmap`` (default) decodes each film once into the film store
    (:mod:`cxr_train.cache`) and registers :class:`DevicePreprocess` on ``model``; ``none`` keeps
    the per-epoch decode (``ImageTransform``), as before. Streamed splits (``IterableDataset``)
    decode per sample in the DataLoader workers and take the same uint8 batch path."""
    from datasets import IterableDataset

    from .cache import FilmStore, CachedImages, build_pixel_spec
    from .data import ImageTransform

    mode = getattr(data_args, "data_cache", "memmap") or "memmap"
    spec = build_pixel_spec(processor) if mode != "none" else None
    streamed = any(isinstance(d, IterableDataset) for d in data.splits.values())
    if spec is None:
        if streamed:
            raise ValueError("streamed datasets need the uint8 batch path, and this image processor "
                             f"({type(processor).__name__}) cannot be split at uint8")
        if mode != "none":
            logger.warning("data_cache: %s cannot be split at uint8; decoding every film every epoch",
                           type(processor).__name__)
        if getattr(data_args, "acquisition_augment", 0.0):
            raise ValueError("--acquisition_augment needs the film store (--data_cache memmap) and an image "
                             "processor that can be split at uint8")
        for split, ds in data.splits.items():
            ds.set_transform(ImageTransform(processor, augment=data_args.augment and split == "train",
                                            strength=data_args.augment_strength))
        return data, None

    store = FilmStore(getattr(data_args, "cache_dir", None), spec) if not streamed else None
    acquisition = None
    if getattr(data_args, "acquisition_augment", 0.0):
        from .acquisition import AcquisitionAugment

        acquisition = AcquisitionAugment(data_args.acquisition_augment, seed=torch.initial_seed() % 2**32)
        logger.info("training films: %r", acquisition)
    splits = {}
    for split, ds in data.splits.items():
        if isinstance(ds, IterableDataset):
            from .streaming import decode_stream

            splits[split] = decode_stream(ds, spec)
        else:
            rows = store.rows(ds["image"], num_workers=num_workers, desc=f"{split} films")
            splits[split] = CachedImages(store, rows, ds["label"],
                                         transform=acquisition if split == "train" else None)
    augment = BatchAugment(data_args.augment_strength) if data_args.augment else None
    attach_device_preprocess(model, spec.normalise, augment, channels_last=_is_channels_last(model))
    logger.info("data path: %s uint8 batches, %s on the training device", "streamed" if streamed else
                f"film store {store.folder}", augment or "no augmentation")
    return dataclasses.replace(data, splits=splits), UInt8Collator()


def _is_channels_last(model) -> bool:
    for p in model.parameters():
        if p.ndim == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False
