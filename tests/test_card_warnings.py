"""The card's warnings (cxr_train.hub.CardFacts.warnings) and the operating point's explicit
``fallback`` field: set where fitting falls back, written to config.json, read back, and the
only thing the "no informative operating point" warning looks at."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.operating_point import NO_OPERATING_POINT, OperatingPoint
from cxr_train.hub import CardFacts
from cxr_train.training import fit_operating_point

ID2LABEL = {0: "NORMAL", 1: "PNEUMONIA"}
NO_OP = "no informative operating point"


def card(op: OperatingPoint, epochs: float = 3.0, auroc: float = 0.95) -> CardFacts:
    return CardFacts(
        model_name="m", repo_id="m", dataset_id="d", dataset_is_hub=False, dataset_name="d", dataset_note="",
        base_model=None, base_model_text="none", labels=["NORMAL", "PNEUMONIA"], positive_label="PNEUMONIA",
        strategy="full", strategy_text="all weights trained", trainable_text="1 of 1", n_train=10, n_validation=4,
        validation_text="v", image_size=64, epochs=epochs, steps=10, batch_size=4, learning_rate=1e-3,
        class_weights=[1.0, 1.0], precision="fp32", augmentation="none", train_time="1 min", hardware="cpu",
        command="python train_hf.py", operating_point=op, metrics={"validation": {"roc_auc": auroc}})


def separable(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    margin = rng.normal(0, 1, n) + 3 * labels
    return np.stack([np.zeros(n), margin], 1), labels


def test_one_class_fallback_is_flagged_and_warned():
    logits, _ = separable()
    op = fit_operating_point(logits, np.ones(len(logits), int), 1, ID2LABEL)
    assert op.fallback and op.policy == "default" and op.threshold == 0.5
    warnings = card(op).warnings()
    assert any(NO_OP in w for w in warnings)


def test_uninformative_scores_fall_back_and_are_warned():
    logits, labels = separable()
    op = fit_operating_point(-logits, labels, 1, ID2LABEL)      # the model ranks the classes backwards
    assert op.fallback and op.policy == "default" and "does not separate" in op.source
    assert any(NO_OP in w for w in card(op).warnings())


@pytest.mark.parametrize("policy", ["default", "equal_error", "sensitivity_floor"])
def test_a_fitted_or_deliberate_default_operating_point_gets_no_such_warning(policy):
    logits, labels = separable()
    op = fit_operating_point(logits, labels, 1, ID2LABEL, policy=policy)
    assert not op.fallback and op.policy == policy
    assert card(op).warnings() == []


def test_temperature_at_its_bound_is_warned_and_nothing_else():
    for t in (0.05, 20.0):
        warnings = card(OperatingPoint(threshold=0.4, temperature=t, policy="equal_error", source="s")).warnings()
        assert len(warnings) == 1 and "fitting bound" in warnings[0]
    assert card(OperatingPoint(threshold=0.4, temperature=1.3, policy="equal_error", source="s")).warnings() == []


def test_fallback_round_trips_and_legacy_configs_are_read():
    logits, _ = separable()
    op = fit_operating_point(logits, np.zeros(len(logits), int), 1, ID2LABEL)
    cfg = op.to_config()
    assert cfg["fallback"] is True
    assert OperatingPoint.from_config({"cxr_operating_point": cfg}).fallback is True
    # a config.json written before the field: the fallback's own source sentence says it
    legacy = {k: v for k, v in cfg.items() if k != "fallback"}
    assert OperatingPoint.from_config({"cxr_operating_point": legacy}).fallback is True
    deliberate = {"threshold": 0.5, "temperature": 1.0, "policy": "default",
                  "source": "0.5 on the calibrated probability on the validation split"}
    assert OperatingPoint.from_config({"cxr_operating_point": deliberate}).fallback is False
    assert OperatingPoint.from_config({"cxr_operating_point": {"source": NO_OPERATING_POINT}}).fallback is False
    assert OperatingPoint.from_config({}).fallback is False


def test_shipped_model_configs_still_load_with_no_provenance():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "models"
    configs = sorted(root.glob("*/config.json"))
    if not configs:
        pytest.skip("no shipped model folders in this checkout")
    for path in configs:
        op = OperatingPoint.from_config(json.loads(path.read_text()))
        assert op.fallback is False and op.calibrated_on is None and op.previous is None
        assert op.calibration_text() is None and "calibrated" not in op.describe()


def test_site_provenance_round_trips_and_is_described():
    prev = OperatingPoint(threshold=0.34, temperature=0.98, policy="equal_error", source="s")
    op = OperatingPoint(threshold=0.2, temperature=1.1, policy="sensitivity_floor", source="site",
                        calibrated_on="site-a", calibrated_date="2026-01-02",
                        n_per_class={"NORMAL": 40, "PNEUMONIA": 80}, sensitivity_confidence=0.95,
                        previous=prev.to_config())
    back = OperatingPoint.from_config({"cxr_operating_point": op.to_config()})
    assert back == op
    assert back.n_calibration == 120
    assert back.calibration_text() == "calibrated at site 'site-a' on 120 films (40 NORMAL, 80 PNEUMONIA) on 2026-01-02"
    assert "calibrated at site 'site-a'" in back.describe()
    assert OperatingPoint.from_config({"cxr_operating_point": back.previous}).threshold == 0.34
    with pytest.raises(ValueError):
        OperatingPoint.from_config({"cxr_operating_point": {**op.to_config(), "previous": "0.3"}})
