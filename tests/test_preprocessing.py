"""cxr.preprocessing.pixel_values must return exactly what the saved image processor returns."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ConvNextImageProcessor, ViTImageProcessor

from cxr.preprocessing import has_fast_path, pixel_values


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


PROCESSORS = {
    "project-default": lambda: ViTImageProcessor(size={"height": 192, "width": 192}, image_mean=[0.5] * 3,
                                                 image_std=[0.25] * 3),
    "imagenet-stats": lambda: ViTImageProcessor(),  # per-channel mean/std: the broadcast branch
    "bicubic-non-square": lambda: ViTImageProcessor(resample=3, size={"height": 160, "width": 128}),
    "no-normalize": lambda: ViTImageProcessor(do_normalize=False),
    "crop (fallback)": lambda: ConvNextImageProcessor(size={"shortest_edge": 96}, crop_pct=0.875),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.parametrize("sizes", [[(224, 224)] * 3, [(224, 224), (300, 250), (224, 224), (97, 131)], [(64, 64)]],
                         ids=["same-size", "mixed-sizes", "one-small"])
def test_pixel_values_equal_the_processor(name, sizes):
    processor = PROCESSORS[name]()
    images = _images(sizes)
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    got = pixel_values(processor, images)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    # numpy H x W x 3 arrays (what the Predictor's batch path passes) give the same tensor
    assert torch.equal(pixel_values(processor, [np.asarray(im) for im in images]), expected)


def test_fast_path_is_taken_for_the_shipped_processor_only_when_safe(trained_folder):
    saved = AutoImageProcessor.from_pretrained(trained_folder)
    assert has_fast_path(saved)
    assert has_fast_path(PROCESSORS["imagenet-stats"]())
    assert not has_fast_path(PROCESSORS["crop (fallback)"]())
    assert not has_fast_path(ViTImageProcessor(do_resize=False))


def test_fast_path_output_is_channels_last_for_uniform_stats():
    out = pixel_values(PROCESSORS["project-default"](), _images([(224, 224)] * 2))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        pixel_values(PROCESSORS["project-default"](), [])
