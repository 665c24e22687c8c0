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


@pytest.mark.slow   # a trained model: the session's real training
def test_fast_path_is_taken_for_the_shipped_processor_only_when_safe(trained_folder):
    saved = AutoImageProcessor.from_pretrained(trained_folder)
    assert has_fast_path(saved)
    assert has_fast_path(PROCESSORS["imagenet-stats"]())
    assert not has_fast_path(PROCESSORS["crop (fallback)"]())
    assert not has_fast_path(ViTImageProcessor(do_resize=False))


def test_fast_path_output_is_channels_last_for_uniform_stats():
    out = pixel_values(PROCESSORS["project-default"](), _images([(224, 224)] * 2))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("make", [
    lambda: __import__("transformers").EfficientNetImageProcessor(),           # offset rescale
    lambda: __import__("transformers").MobileViTImageProcessor(size={"height": 96, "width": 96},
                                                                 do_center_crop=False),  # channel flip
    lambda: __import__("transformers").DPTImageProcessor(keep_aspect_ratio=True, ensure_multiple_of=32),
], ids=["efficientnet", "mobilevit", "dpt"])
def test_processors_with_their_own_steps_are_not_batched(make):
    processor = make()
    assert not has_fast_path(processor)
    images = _images([(120, 100), (120, 100)])
    assert torch.equal(pixel_values(processor, images), processor(images=images, return_tensors="pt")["pixel_values"])


def test_non_rgb_inputs_follow_the_processors_own_rules():
    processor = ViTImageProcessor(do_convert_rgb=True)
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (80, 90, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (80, 90), dtype=np.uint8), "L")
    for images in ([rgba], [grey], [rgba, _images([(80, 90)])[0]]):
        expected = processor(images=images, return_tensors="pt")["pixel_values"]
        assert torch.equal(pixel_values(processor, images), expected)


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        pixel_values(PROCESSORS["project-default"](), [])
