"""The shipped binary models answer exactly as before issue #29 (multi-class / multi-label serving).

tests/pins/shipped_binary_fp32.json holds every pre-#29 field of ``Prediction.to_api()`` for both
shipped models on the six app/examples films (fp32, with the heat map), computed with the code
before the change. Decisions, labels, thresholds, flags and texts must match exactly; numbers
within a tolerance far below their 4-decimal rounding's effect on any decision (fp32 kernels
differ in the last bits across CPUs). The new fields must say the same thing as the old ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr.inference import Predictor

ROOT = Path(__file__).resolve().parent.parent
PINS = json.loads((ROOT / "tests" / "pins" / "shipped_binary_fp32.json").read_text())["models"]
EXAMPLES = sorted((ROOT / "app" / "examples").glob("*.jpeg"))
NUMERIC = {"probability": 2e-4, "ood_score": 2e-3}


@pytest.mark.parametrize("model", sorted(PINS))
def test_shipped_binary_answers_are_pinned(model):
    assert len(EXAMPLES) == len(PINS[model]) == 6
    predictor = Predictor.from_pretrained(ROOT / "models" / model, precision="fp32")
    for film, pinned in zip(EXAMPLES, PINS[model]):
        pinned = dict(pinned)
        raw_p, (hm_mean, hm_argmax, hm_shape) = pinned.pop("_raw_p"), pinned.pop("_heatmap")
        result = predictor.predict(film, explain=True)
        answer = result.to_api()
        for key, want in pinned.items():
            got = answer[key]
            if key in NUMERIC:
                assert got == pytest.approx(want, abs=NUMERIC[key]), (film.name, key)
            elif key == "probabilities":
                assert got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 2e-4 for k in want), film.name
            else:
                assert got == want, (film.name, key, got, want)
        assert result.positive_probability == pytest.approx(raw_p, abs=1e-5)
        hm = result.heatmap
        assert list(hm.shape) == hm_shape and float(hm.mean()) == pytest.approx(hm_mean, abs=1e-4)
        assert hm.reshape(-1)[hm_argmax] >= hm.max() - 1e-4          # the same hottest pixel
        # the label-set fields (#29) restate the binary answer
        assert answer["task"] == "binary" and answer["screening"] is None
        findings = {f["label"]: f for f in answer["findings"]}
        assert list(findings) == list(answer["probabilities"])
        pos = findings[answer["positive_label"]]
        assert pos["threshold"] == answer["threshold"] and pos["probability"] == answer["probability"]
        assert pos["present"] == (answer["decision"] == answer["positive_label"])
        assert [f["label"] for f in answer["findings"] if f["present"]] == [answer["decision"]]
        assert np.isclose(sum(f["probability"] for f in answer["findings"]), 1, atol=2e-4)
