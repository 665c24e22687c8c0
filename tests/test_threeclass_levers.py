"""experiments.threeclass_levers: the 3-class lever table read back from run folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments.threeclass_levers import figures, table

NAMES = ["NORMAL", "BACTERIAL", "VIRAL"]


def _run(folder, y, p, holdout_auroc=0.8):
    folder.mkdir()
    (folder / "eval_scores.json").write_text(json.dumps(
        {"task": "multiclass", "labels_names": NAMES, "labels": y.tolist(), "probabilities": p.tolist()}))
    (folder / "eval_results.json").write_text(json.dumps({"eval_temperature": 1.1}))
    (folder / "external_results.json").write_text(json.dumps(
        {"n_samples": 9, "accuracy": 0.7, "roc_auc": 0.9,
         "pairwise": {"BACTERIAL vs VIRAL": {"roc_auc": holdout_auroc, "accuracy": 0.75}}}))
    (folder / "train_results.json").write_text(json.dumps({"train_runtime": 600.0}))
    return folder


def _read_probs(folder):
    return np.asarray(json.loads((folder / "eval_scores.json").read_text())["probabilities"])


def _probs(y, skill, rng):
    logits = rng.normal(size=(len(y), 3))
    logits[np.arange(len(y)), y] += skill
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def test_figures_match_sklearn_and_the_pairwise_rule():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    p = _probs(y, 1.0, rng)
    f = figures(y, p, NAMES)
    pair = y > 0
    assert f["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert f["macro_auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert f["bacterial_vs_viral_auroc"] == pytest.approx(roc_auc_score(y[pair] == 2, p[pair, 2] / p[pair, 1:].sum(1)))
    assert f["log_loss"] == pytest.approx(-np.mean(np.log(p[np.arange(120), y])))
    from cxr_train.metrics import compute_multiclass_metrics      # the figures cxr-train writes

    m = compute_multiclass_metrics(y, p, NAMES, normal_id=0)
    assert f["accuracy"] == pytest.approx(m["accuracy"]) and f["macro_auroc"] == pytest.approx(m["roc_auc"])
    assert f["bacterial_vs_viral_auroc"] == pytest.approx(m["pairwise"]["BACTERIAL vs VIRAL"]["roc_auc"])
    assert f["bacterial_vs_viral_accuracy"] == pytest.approx(m["pairwise"]["BACTERIAL vs VIRAL"]["accuracy"])


def test_table_compares_runs_on_the_same_films(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    weak = _run(tmp_path / "weak", y, _probs(y, 0.3, rng))
    strong = _run(tmp_path / "strong", y, _probs(y, 3.0, rng), holdout_auroc=0.9)
    rows = table({"weak": weak, "strong": strong}, "weak", bootstrap=40, bias_repeats=1)
    assert [r["model"] for r in rows] == ["weak", "strong"]
    assert "validation_minus_reference_95ci" not in rows[0]
    lo, hi = rows[1]["validation_minus_reference_95ci"]["bacterial_vs_viral_auroc"]
    assert 0 < lo <= hi                       # a clearly better run: its gain is outside the noise
    assert rows[1]["holdout"]["bacterial_vs_viral_auroc"] == 0.9
    assert rows[1]["train_runtime_min"] == 10.0
    from experiments.threeclass_levers import ensembles

    (ens,) = ensembles({"weak": weak, "strong": strong}, {"both": ["weak", "strong"]}, "weak")
    both = (_read_probs(weak) + _read_probs(strong)) / 2
    assert ens["validation"]["accuracy"] == pytest.approx((both.argmax(1) == y).mean())
    with pytest.raises(SystemExit, match="'nope' not among"):
        ensembles({"weak": weak}, {"x": ["weak", "nope"]}, "weak")
    assert set(rows[0]["validation_bias_corrected_check"]) >= {"accuracy_saved", "accuracy_bias_corrected"}


def test_runs_validated_on_other_films_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 60)
    a = _run(tmp_path / "a", y, _probs(y, 1.0, rng))
    b = _run(tmp_path / "b", np.roll(y, 1), _probs(y, 1.0, rng))
    with pytest.raises(SystemExit, match="not validated on the same films"):
        table({"a": a, "b": b}, "a", bootstrap=10, bias_repeats=0)
    (a / "eval_scores.json").unlink()
    with pytest.raises(SystemExit, match="eval_scores.json is missing"):
        table({"a": a}, "a", bootstrap=10, bias_repeats=0)


def test_bias_corrected_check_recovers_a_shifted_prior():
    """Scores that under-call the common class (what a class-weighted loss does) gain accuracy from
    the cross-fitted bias; scores already deciding by the right prior do not."""
    from experiments.threeclass_levers import bias_corrected_check

    rng = np.random.default_rng(3)
    y = rng.choice(3, 600, p=[0.2, 0.6, 0.2])
    logits = rng.normal(size=(600, 3))
    logits[np.arange(600), y] += 1.0
    logits[:, 1] -= 1.0                                   # the common class pushed down
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    c = bias_corrected_check(y, p, repeats=1)
    assert c["accuracy_bias_corrected"] > c["accuracy_saved"] + 0.03
