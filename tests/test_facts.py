"""config.json's cxr_training: written by cxr_train.report.serving_facts, read back by the one
versioned reader (cxr.facts) that the Predictor and the app use."""

import json

import pytest

from cxr.facts import SCHEMA, FactsError, read_training_facts
from cxr.inference import ModelLoadError, Predictor
from tests.helpers import ROOT, make_model_folder

SHIPPED = ROOT / "models" / "efficientnet-lite0-imagenet-full"


def test_shipped_default_facts_read_as_written():
    raw = json.loads((SHIPPED / "config.json").read_text())["cxr_training"]
    facts = read_training_facts({"cxr_training": raw})
    assert facts.schema == 1 and facts.strategy == raw["strategy"] and facts.image_size == 224
    assert facts.validation_metrics == raw["validation_metrics"]
    assert facts.external_metrics["n"] == raw["external_metrics"]["n"] == 746
    assert read_training_facts({}).to_dict() == {"schema": SCHEMA}


def test_card_facts_round_trip_through_the_reader():
    from cxr_train.report import CVScores, serving_facts

    cv = CVScores(k=5, per_fold=[], summary={"roc_auc": {"mean": 0.97, "sd": 0.01}, "brier": {"mean": 0.1, "sd": 0}},
                  pooled={}, train_seconds=60.0)
    written = serving_facts(strategy="full", base_model="b", dataset="d", image_size=224,
                            metrics={"validation": {"roc_auc": 0.9, "accuracy": float("nan")},
                                     "external": {"n_samples": 16, "sensitivity": 1.0}}, cv=cv)
    assert written["schema"] == SCHEMA
    back = read_training_facts({"cxr_training": json.loads(json.dumps(written))})
    assert back.validation_metrics == {"roc_auc": 0.9}                 # NaN (undefined) is not written
    assert back.cv_metrics == {"k": 5, "roc_auc": {"mean": 0.97, "sd": 0.01}}
    assert back.external_metrics == {"n": 16, "sensitivity": 1.0}


def test_newer_schema_is_refused_at_load(tmp_path):
    folder = make_model_folder(tmp_path / "m", ood=False)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["cxr_training"]["schema"] = SCHEMA + 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FactsError, match="upgrade"):
        read_training_facts(cfg)
    with pytest.raises(ModelLoadError, match=f"schema {SCHEMA + 1}"):
        Predictor.from_pretrained(folder)


def test_describe_reads_facts_through_the_reader(tmp_path):
    folder = make_model_folder(tmp_path / "m", ood=False)
    d = Predictor.from_pretrained(folder).describe()
    assert d["cv_metrics"] == {"k": 5, "roc_auc": {"mean": 0.91, "sd": 0.02}}
    assert d["external_metrics"] == {"n": 16, "roc_auc": 0.87} and d["schema"] == 1
