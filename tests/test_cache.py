"""The film store (decode once) and the uint8 batch path: the eval tensors equal the saved
processor's, the store is reused and invalidated by film / size / loader, batches are uint8,
augmentation keeps shapes and never flips."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cxr.imaging import load_image
from cxr.preprocessing import pixel_values
from cxr_train import cache as cache_mod
from cxr_train.batches import BatchAugment, UInt8Collator, attach_device_preprocess
from cxr_train.cache import CacheError, CachedImages, FilmStore, build_pixel_spec
from cxr_train.modeling import build_preset
from tests.helpers import ID2LABEL, make_xray


def _timm_processor(size=48, interpolation="bicubic"):
    from transformers import TimmWrapperImageProcessor

    return TimmWrapperImageProcessor(pretrained_cfg=dict(
        input_size=[3, size, size], crop_pct=1.0, crop_mode="squash", interpolation=interpolation,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))


PROCESSORS = {
    "torchvision (presets)": lambda: build_preset("tiny-resnet-scratch", dict(ID2LABEL), 48)[1],
    "timm (the default model)": _timm_processor,
}


@pytest.fixture
def films(tmp_path):
    """Films of several sizes and modes (resized down, up, greyscale on disk)."""
    out = []
    for i, (size, mode) in enumerate([(64, "RGB"), (100, "L"), (37, "RGB"), (48, "RGB")]):
        p = tmp_path / "films" / f"f{i}.png"
        p.parent.mkdir(exist_ok=True)
        make_xray(i, i % 2 == 1, size).convert(mode).save(p)
        out.append(p)
    return out


def _items(paths):
    return [{"path": str(p), "bytes": None} for p in paths]


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_eval_tensors_equal_the_saved_processor(name, films, tmp_path):
    processor = PROCESSORS[name]()
    spec = build_pixel_spec(processor)
    assert spec is not None
    store = FilmStore(tmp_path / "store", spec)
    data = CachedImages(store, store.rows(_items(films)), [0, 1, 0, 1])
    batch = data.__getitems__(list(range(len(films))))
    got = spec.normalise(batch["pixel_values"])
    expected = pixel_values(processor, [load_image(str(p), isolate=False) for p in films])
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_store_is_reused_and_invalidated(films, tmp_path, monkeypatch):
    spec = build_pixel_spec(PROCESSORS["torchvision (presets)"]())
    store = FilmStore(tmp_path / "store", spec)
    rows = store.rows(_items(films))
    assert rows.tolist() == [0, 1, 2, 3] and len(store) == 4
    before = store.read(rows).copy()

    decoded = []
    real = cache_mod._DecodeFilms.__getitem__
    monkeypatch.setattr(cache_mod._DecodeFilms, "__getitem__", lambda self, i: decoded.append(i) or real(self, i))
    # another run, a subset (a CV fold), a repeated film: nothing decoded again
    assert FilmStore(tmp_path / "store", spec).rows(_items(films[2:] + films[:1])).tolist() == [2, 3, 0]
    assert decoded == []

    # a changed film (new content, new mtime) is decoded again; the others are not
    make_xray(99, True, 64).convert("RGB").save(films[1])
    os.utime(films[1], ns=(1, 1_000_000_000))
    rows2 = store.rows(_items(films))
    assert rows2.tolist() == [0, 4, 2, 3] and len(decoded) == 1
    assert not np.array_equal(store.read([4])[0], before[1])

    # another size (or resample, or loader version) is another store
    spec96 = build_pixel_spec(build_preset("tiny-resnet-scratch", dict(ID2LABEL), 96)[1])
    assert FilmStore(tmp_path / "store", spec96).folder != store.folder
    monkeypatch.setattr(cache_mod, "LOADER_VERSION", "test-bump")
    assert FilmStore(tmp_path / "store", spec).folder != store.folder


def test_film_key_tracks_bytes_and_files(films):
    data = films[0].read_bytes()
    assert cache_mod.film_key({"bytes": data, "path": None}) == cache_mod.film_key({"bytes": data, "path": "x"})
    assert cache_mod.film_key({"bytes": data[:-1], "path": None}) != cache_mod.film_key({"bytes": data, "path": None})
    with pytest.raises(CacheError, match="cannot read"):
        cache_mod.film_key({"path": str(films[0]) + ".missing", "bytes": None})


def test_unreadable_film_is_named_and_not_stored(films, tmp_path):
    bad = tmp_path / "films" / "broken.png"
    bad.write_bytes(b"not an image")
    store = FilmStore(tmp_path / "store", build_pixel_spec(PROCESSORS["torchvision (presets)"]()))
    with pytest.raises(CacheError, match="broken.png"):
        store.rows(_items([films[0], bad]))
    assert len(store) == 1   # the good film is kept; the bad one has no record
    assert store.rows(_items([films[0]])).tolist() == [0]


def test_a_damaged_index_is_rebuilt(films, tmp_path):
    store = FilmStore(tmp_path / "store", build_pixel_spec(PROCESSORS["torchvision (presets)"]()))
    store.rows(_items(films))
    store.index_path.write_text("{not json")
    assert store.rows(_items(films[:2])).tolist() == [0, 1]
    assert len(store) == 2


def test_batches_are_uint8_channels_last(films, tmp_path):
    spec = build_pixel_spec(PROCESSORS["timm (the default model)"]())
    store = FilmStore(tmp_path / "store", spec)
    data = CachedImages(store, store.rows(_items(films)), [0, 1, 0, 1])
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=UInt8Collator())
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(3, 3, 48, 48), (1, 3, 48, 48)]
    assert all(b["pixel_values"].dtype == torch.uint8 for b in batches)
    assert batches[0]["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert batches[0]["labels"].tolist() == [0, 1, 0] and batches[0]["labels"].dtype == torch.int64
    one = data[1]   # single items (e.g. a custom sampler without __getitems__) agree with batches
    assert torch.equal(one["pixel_values"], batches[0]["pixel_values"][1]) and one["labels"] == 1
    stacked = UInt8Collator()([data[0], data[1]])
    assert torch.equal(stacked["pixel_values"], batches[0]["pixel_values"][:2])


@pytest.mark.parametrize("strength", ["standard", "strong"])
def test_augmentation_keeps_shape_and_never_flips(strength):
    torch.manual_seed(0)
    x = torch.full((64, 3, 48, 48), 40, dtype=torch.uint8)
    x[:, :, :, :20] = 220                          # bright left side: a flip would move it right
    y = BatchAugment(strength)(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0 and float(y.max()) <= 255.001
    left, right = y[..., :18].mean(dim=(1, 2, 3)), y[..., -18:].mean(dim=(1, 2, 3))
    assert bool((left > right + 40).all())
    assert not torch.equal(y[0], y[1])             # per-sample parameters
    assert not torch.equal(y[0], x[0].float())


def test_augmentation_geometry_matches_torchvision_definitions():
    """Identity parameters give the image back; a 90-pixel-wide crop box is what is sampled."""
    aug = BatchAugment("standard")
    x = torch.from_numpy(np.array(make_xray(3, True, 48).convert("RGB"))).permute(2, 0, 1)[None]
    ident = {"box": torch.tensor([[0.0, 0.0, 48.0, 48.0]]), "angle": torch.zeros(1), "tx": torch.zeros(1),
             "ty": torch.zeros(1), "brightness": torch.ones(1), "contrast": torch.ones(1),
             "contrast_first": torch.tensor([False])}
    assert torch.allclose(aug(x, ident), x.float(), atol=1e-3)
    shifted = dict(ident, tx=torch.tensor([5.0]))
    out = aug(x, shifted)
    assert torch.allclose(out[..., 5:], x.float()[..., :-5], atol=1e-3) and float(out[..., :5].abs().max()) == 0
    boxes = aug.crop_boxes(500, 48, 48)
    area = boxes[:, 2] * boxes[:, 3] / 48 ** 2
    assert float(area.min()) >= 0.70 and float(area.max()) <= 1.0   # scale (0.75, 1) up to rounding
    assert bool(((boxes[:, 0] >= 0) & (boxes[:, 0] + boxes[:, 2] <= 48)).all())


def test_device_preprocess_hook(films, tmp_path):
    model, processor = build_preset("tiny-resnet-scratch", dict(ID2LABEL), 48)
    spec = build_pixel_spec(processor)
    store = FilmStore(tmp_path / "store", spec)
    batch = CachedImages(store, store.rows(_items(films)), [0, 1, 0, 1]).__getitems__([0, 1, 2, 3])
    float_in = spec.normalise(batch["pixel_values"]).contiguous()   # the hook's layout (channels_last=False)
    model.eval()
    reference = model(pixel_values=float_in).logits
    handle = attach_device_preprocess(model, spec.normalise, BatchAugment("standard"), channels_last=False)
    assert torch.equal(model(pixel_values=batch["pixel_values"]).logits, reference)   # uint8, eval: no augmentation
    assert torch.equal(model(pixel_values=float_in).logits, reference)                # float passes through
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(model(pixel_values=batch["pixel_values"]).logits, reference)
    handle.remove()


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "a"))
    assert cache_mod.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CXR_CACHE_DIR")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert cache_mod.default_cache_dir() == tmp_path / "hf" / "cxr-films"


def test_unsplittable_processor_keeps_the_old_path():
    class Other:
        pass

    assert build_pixel_spec(Other()) is None


@pytest.mark.slow
def test_training_from_the_store_and_the_old_path(kermany_folder, tmp_path):
    """train_hf from the film store (default) and with --data_cache none: both train and export;
    the store holds every training and validation film once."""
    import train_hf
    from tests.helpers import base_args

    for mode in ("memmap", "none"):
        out = tmp_path / mode
        assert train_hf.main(base_args(kermany_folder / "train", out, "--data_cache", mode,
                                       "--cache_dir", str(tmp_path / "films"), "--ood_fit", "False")) == 0
        assert (out / "model.safetensors").is_file()
    (store,) = (tmp_path / "films").iterdir()
    import json

    assert len(json.loads((store / "index.json").read_text())["films"]) == 48
    assert (store / "pixels.u8").stat().st_size == 48 * 64 * 64 * 3


def test_bad_data_cache_value_is_a_config_error(tmp_path):
    from cxr_train.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="data_cache"):
        parse_args(["--dataset_name", str(tmp_path), "--data_cache", "ram"])


def test_no_films_written_for_a_mismatched_timm_resize(tmp_path, films):
    spec = build_pixel_spec(_timm_processor())
    spec.resize = lambda image: np.zeros((10, 10, 3), np.uint8)   # a wrong processor output
    store = FilmStore(tmp_path / "store", spec)
    with pytest.raises(CacheError, match="expected uint8"):
        store.rows(_items(films[:1]))
    assert len(store) == 0


def test_an_interrupted_build_resumes(films, tmp_path, monkeypatch):
    spec = build_pixel_spec(PROCESSORS["torchvision (presets)"]())
    store = FilmStore(tmp_path / "store", spec)
    real = cache_mod._DecodeFilms.__getitem__

    def dies_at_third(self, i):
        if i == 2:
            raise RuntimeError("killed")
        return real(self, i)

    monkeypatch.setattr(cache_mod, "_FLUSH_SECONDS", -1.0)      # checkpoint the index after every film
    monkeypatch.setattr(cache_mod._DecodeFilms, "__getitem__", dies_at_third)
    with pytest.raises(RuntimeError, match="killed"):
        store.rows(_items(films))
    assert len(store) == 2
    monkeypatch.setattr(cache_mod._DecodeFilms, "__getitem__", real)
    rows = store.rows(_items(films))
    assert rows.tolist() == [0, 1, 2, 3]
    assert store.pixels_path.stat().st_size == 4 * store.record
    expected = pixel_values(PROCESSORS["torchvision (presets)"](), [load_image(str(films[3]), isolate=False)])
    assert torch.equal(spec.normalise(CachedImages(store, rows, [0] * 4).__getitems__([3])["pixel_values"]), expected)


@pytest.mark.gpu
def test_batch_path_on_the_gpu(films, tmp_path):
    """Pinned uint8 batches -> GPU; eval normalisation equals the CPU's, augmentation runs there."""
    spec = build_pixel_spec(PROCESSORS["timm (the default model)"]())
    store = FilmStore(tmp_path / "store", spec)
    data = CachedImages(store, store.rows(_items(films)), [0, 1, 0, 1])
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=UInt8Collator(), pin_memory=True)
    batch = next(iter(loader))
    x = batch["pixel_values"].to("cuda", non_blocking=True)
    assert x.dtype == torch.uint8
    assert torch.allclose(spec.normalise(x).cpu(), spec.normalise(batch["pixel_values"]), atol=1e-6)
    y = BatchAugment("strong")(x)
    assert y.device.type == "cuda" and y.shape == x.shape
