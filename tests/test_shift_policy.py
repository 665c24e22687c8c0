"""threshold_policy shift_floor: the most specific threshold keeping the sensitivity floor clean and under
every simulated acquisition change of severity 1-2 (cxr_train.shift_policy, issue #25)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr.operating_point import OperatingPoint
from cxr_train.shift_policy import apply_shift_floor, floor_threshold, shifted_scores
from tests.helpers import base_args, xrays


def _op(**kw):
    return OperatingPoint(**{"threshold": 0.6, "temperature": 1.0, "positive_label": "PNEUMONIA",
                             "policy": "shift_floor", **kw})


def test_the_lowest_condition_floor_binds():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.ones(100)].astype(int)
    clean = np.r_[rng.uniform(0, 0.3, 100), rng.uniform(0.6, 1.0, 100)]
    darker = clean.copy()
    darker[y == 1] -= 0.25            # a change that lowers the PNEUMONIA scores: its floor is lower
    scores = {"clean": clean, "equalize@2": darker, "jpeg@1": clean + 0.01}
    op = apply_shift_floor(_op(), y, scores, 0.95, "the validation split")
    assert op.threshold == pytest.approx(floor_threshold(y, darker, 0.95))
    assert op.threshold < floor_threshold(y, clean, 0.95)
    assert op.high_sensitivity_threshold == pytest.approx(floor_threshold(y, clean, 0.95))
    for p in scores.values():          # the floor holds in every condition
        assert (p[y == 1] >= op.threshold).mean() >= 0.95
    assert op.policy == "shift_floor" and "binding: equalize@2" in op.source and "2 conditions" in op.source


def test_fallback_and_one_class_are_not_refitted():
    fallen = _op(fallback=True, threshold=0.5, policy="default")
    assert apply_shift_floor(fallen, [0, 1], {"clean": np.array([0.2, 0.8])}, 0.95, "v") is fallen
    with pytest.raises(ValueError, match="both classes"):
        apply_shift_floor(_op(), [1, 1], {"clean": np.array([0.2, 0.8])}, 0.95, "v")


def test_shifted_scores_cover_every_corruption_at_severities_1_and_2_with_the_stress_test_pixels():
    from cxr_train.acquisition import CORRUPTIONS, corrupt, film_rng

    images = xrays([1, 2], size=64)
    seen = []

    def predict(batch):
        seen.append([np.asarray(b).copy() for b in batch])
        return [float(np.asarray(b).mean()) / 255 for b in batch]

    out = shifted_scores(predict, images, ["a", "b"], seed=2026)
    assert set(out) == {"clean"} | {f"{c}@{s}" for c in CORRUPTIONS for s in (1, 2)}
    want = corrupt(images[1], "gaussian_noise", 2, film_rng(2026, "gaussian_noise", 2, "b"))
    assert out["gaussian_noise@2"][1] == pytest.approx(float(np.asarray(want).mean()) / 255)


def test_shift_floor_with_cv_or_more_classes_is_refused_before_anything_is_written(kermany_folder, tmp_path):
    import train_hf

    out = tmp_path / "run"
    rc = train_hf.main(base_args(kermany_folder, out, "--threshold_policy", "shift_floor", "--cv_folds", "2"))
    assert rc == 2 and not out.exists()


@pytest.mark.slow
def test_a_run_with_shift_floor_saves_the_shifted_threshold(kermany_folder, tmp_path):
    import train_hf

    out = tmp_path / "run"
    assert train_hf.main(base_args(kermany_folder, out, "--threshold_policy", "shift_floor",
                                   "--min_sensitivity", "0.9", "--ood_fit", "false")) == 0
    op = json.loads((out / "config.json").read_text())["cxr_operating_point"]
    assert op["policy"] in ("shift_floor", "default")       # a 2-step model may be uninformative: the fallback
    if op["policy"] == "shift_floor":
        assert "conditions; binding:" in op["source"] and op["threshold"] <= op["high_sensitivity_threshold"] + 1e-9
    assert json.loads((out / "eval_scores.json").read_text())["threshold"] == pytest.approx(op["threshold"], abs=1e-6)
