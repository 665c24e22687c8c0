"""Acquisition-style training augmentation (cxr_train/acquisition.py): the stress test's own
corruptions, applied to training films only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_train.acquisition import ACQUISITION_AUGMENT, CORRUPTIONS, AcquisitionAugment
from tests.helpers import base_args, make_xray


def _batch(n=8, size=64) -> torch.Tensor:
    films = [np.asarray(make_xray(i, bool(i % 2), size=size).convert("RGB")) for i in range(n)]
    return torch.from_numpy(np.stack(films)).permute(0, 3, 1, 2)        # (N, 3, H, W) uint8


def test_every_named_change_is_a_stress_test_corruption():
    assert set(ACQUISITION_AUGMENT) <= set(CORRUPTIONS)
    assert not {"gamma_up", "rotation", "markers"} & set(ACQUISITION_AUGMENT)   # what the model already withstands


def test_films_keep_shape_dtype_and_grey_and_the_input_is_untouched():
    x = _batch()
    before = x.clone()
    out = AcquisitionAugment(1.0, seed=3)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8 and torch.equal(x, before)
    assert all(not torch.equal(out[i], x[i]) for i in range(len(x)))        # p = 1: every film changed
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])   # grey stays grey
    assert torch.equal(AcquisitionAugment(1.0, seed=3)(x), out)              # reproducible for a seed
    some = AcquisitionAugment(0.25, seed=1)(_batch(64))
    changed = sum(not torch.equal(some[i], _batch(64)[i]) for i in range(64))
    assert 5 <= changed <= 30


@pytest.mark.parametrize("kwargs", [{"p": 0.0}, {"p": 1.5}, {"p": 0.5, "names": ("no_such",)},
                                    {"p": 0.5, "max_severity": 4}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        AcquisitionAugment(**kwargs)


@pytest.mark.slow
def test_a_two_step_training_with_acquisition_augmentation(kermany_folder, tmp_path, monkeypatch):
    """Only the training split's films are changed; validation is scored on the films as stored."""
    import train_hf
    from cxr_train import cache

    calls = {"train": 0, "other": 0}
    real = cache.CachedImages.__getitems__

    def spy(self, idx):
        calls["train" if self.transform is not None else "other"] += 1
        return real(self, idx)

    monkeypatch.setattr(cache.CachedImages, "__getitems__", spy)
    out = tmp_path / "acq"
    assert train_hf.main(base_args(kermany_folder, out, "--acquisition_augment", "0.5", "--ood_fit", "false")) == 0
    assert calls["train"] >= 2 and calls["other"] >= 1 and (out / "model.safetensors").is_file()
    assert train_hf.main(base_args(kermany_folder, tmp_path / "x", "--acquisition_augment", "0.5",
                                   "--data_cache", "none")) == 2
