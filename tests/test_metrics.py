import math

import evaluate
import numpy as np
import pytest

from cxr_train.metrics import (
    compute_bootstrap_ci, compute_calibration, compute_clinical_metrics, compute_operating_points,
    compute_softmax, compute_temperature,
)
from cxr_train.training import METRIC_MODULE


def test_hand_computed_case():
    # 4 negatives, 6 positives; threshold 0.5
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.6, 0.4, 0.9, 0.8, 0.7, 0.3, 0.55, 0.45]
    m = compute_clinical_metrics(y, p, 0.5)
    # TN=3 (0.1,0.2,0.4) FP=1 (0.6) FN=2 (0.3,0.45) TP=4
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["npv"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    # AUROC by pair counting: positives ranked above negatives
    pairs = [(pp > pn) + 0.5 * (pp == pn) for pp, yp in zip(p, y) if yp for pn, yn in zip(p, y) if not yn]
    assert m["roc_auc"] == pytest.approx(sum(pairs) / len(pairs))
    assert m["brier"] == pytest.approx(np.mean((np.array(p) - np.array(y)) ** 2))


def test_perfect_and_inverted_scores():
    y = [0, 0, 1, 1]
    assert compute_clinical_metrics(y, [0.1, 0.2, 0.8, 0.9])["roc_auc"] == 1.0
    assert compute_clinical_metrics(y, [0.9, 0.8, 0.2, 0.1])["roc_auc"] == 0.0


def test_always_positive_matches_anchor_row():
    # 'always PNEUMONIA' on the Kermany test split: 62.5% accuracy, sensitivity 1, specificity 0
    y = [0] * 234 + [1] * 390
    m = compute_clinical_metrics(y, [1.0] * 624)
    assert m["accuracy"] == pytest.approx(0.625)
    assert (m["sensitivity"], m["specificity"]) == (1.0, 0.0)
    assert m["roc_auc"] == 0.5
    assert math.isnan(m["npv"])


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="0 .negative. and 1"):
        compute_clinical_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="items"):
        compute_clinical_metrics([0, 1, 1], [0.1, 0.2])


def test_calibration_ece():
    m = compute_calibration([1, 0], [0.95, 0.05])
    assert m["ece"] == pytest.approx(0.05)
    assert m["brier"] == pytest.approx(0.0025)


def test_operating_points():
    y = np.array([0] * 50 + [1] * 50)
    s = np.concatenate([np.linspace(0, 0.6, 50), np.linspace(0.4, 1, 50)])
    ops = compute_operating_points(y, s, min_sensitivity=0.95)
    m_y = compute_clinical_metrics(y, s, ops["youden"])
    m_hs = compute_clinical_metrics(y, s, ops["high_sensitivity"])
    assert m_hs["sensitivity"] >= 0.95
    assert m_y["balanced_accuracy"] >= m_hs["balanced_accuracy"]
    assert m_y["balanced_accuracy"] >= compute_clinical_metrics(y, s, 0.1)["balanced_accuracy"]


def test_temperature_fixes_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    true_logit = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.0, 2000)
    # the Bayes log-odds of this mixture is 2x; logits of 5x are 2.5x overconfident
    logits = np.stack([np.zeros(2000), 5.0 * true_logit], 1)
    t = compute_temperature(logits, y)
    assert 2.0 < t < 3.0
    before = compute_calibration(y, compute_softmax(logits)[:, 1])["ece"]
    after = compute_calibration(y, compute_softmax(logits, t)[:, 1])["ece"]
    assert after < before / 2


def test_bootstrap_ci_brackets_point_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.clip(y * 0.3 + rng.uniform(0, 0.7, 300), 0, 1)
    point = compute_clinical_metrics(y, s, 0.5)
    ci = compute_bootstrap_ci(y, s, 0.5, n_boot=200)
    for k in ("roc_auc", "sensitivity", "specificity"):
        lo, hi = ci[k]
        assert lo <= point[k] <= hi and hi - lo < 0.25


def test_local_evaluate_module_offline():
    metric = evaluate.load(METRIC_MODULE)
    out = metric.compute(predictions=[0.1, 0.9, 0.6, 0.3], references=[0, 1, 0, 1])
    assert out["roc_auc"] == pytest.approx(0.75)
    assert out["confusion_matrix"] == [[1, 1], [1, 1]]
    out = metric.compute(predictions=[0.1, 0.9, 0.6, 0.3], references=[0, 1, 0, 1], threshold=0.7)
    assert out["confusion_matrix"] == [[2, 0], [1, 1]]


def test_operating_point_policies_and_round_trip():
    import numpy as np

    from cxr.operating_point import OperatingPoint
    from cxr_train.training import equal_error_threshold, fit_operating_point

    rng = np.random.default_rng(0)
    # negatives tight, positives spread: the two policies pick different thresholds
    neg = rng.normal(-3.0, 0.5, 400)
    pos = rng.normal(1.0, 2.0, 1200)
    margin = np.concatenate([neg, pos])
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    labels = np.r_[np.zeros(400, int), np.ones(1200, int)]
    eer = fit_operating_point(logits, labels, 1, {0: "NORMAL", 1: "PNEUMONIA"}, policy="equal_error")
    you = fit_operating_point(logits, labels, 1, {0: "NORMAL", 1: "PNEUMONIA"}, policy="youden")
    assert eer.policy == "equal_error" and you.policy == "youden"
    assert eer.youden_threshold == you.threshold and eer.equal_error_threshold == eer.threshold
    p = eer.probabilities(logits)[:, 1]
    sens = eer.decide(p[labels == 1]).mean()
    spec = 1 - eer.decide(p[labels == 0]).mean()
    assert abs(sens - spec) < 0.01                                     # errors balanced
    j = lambda op: (op.decide(p[labels == 1]).mean() - op.decide(p[labels == 0]).mean())  # noqa: E731
    assert j(you) >= j(eer) and you.threshold != eer.threshold        # Youden maximises J, EER balances
    assert (p[labels == 1] >= eer.high_sensitivity_threshold).mean() >= 0.95
    assert abs(equal_error_threshold((labels == 1).astype(int), p) - eer.threshold) < 1e-12
    # sensitivity_floor: the highest threshold still keeping sensitivity >= the floor
    floor = fit_operating_point(logits, labels, 1, {0: "NORMAL", 1: "PNEUMONIA"}, policy="sensitivity_floor",
                                min_sensitivity=0.9)
    pf = floor.probabilities(logits)[:, 1]
    assert floor.policy == "sensitivity_floor" and "90%" in floor.source
    assert (pf[labels == 1] >= floor.threshold).mean() >= 0.9
    above = np.sort(pf[labels == 1])
    nxt = above[above > floor.threshold][0]                           # the next higher positive score
    assert (pf[labels == 1] >= nxt).mean() < 0.9                      # one step higher breaks the floor
    # config round trip, and the 0.5 default for a model without one
    back = OperatingPoint.from_config({"cxr_operating_point": eer.to_config()})
    assert abs(back.threshold - eer.threshold) < 1e-6 and back.fitted_on == "the validation split"
    assert OperatingPoint.from_config({}).threshold == 0.5
    with pytest.raises(ValueError):
        OperatingPoint.from_config({"cxr_operating_point": {"threshold": 1.5}})


def test_operating_point_apply_is_the_one_decision_rule():
    """apply(): temperature-scaled softmax, threshold on the positive class, borderline band, and
    the called class index, on either positive index."""
    from cxr.operating_point import OperatingPoint, softmax

    op = OperatingPoint(threshold=0.3, temperature=2.0, borderline_margin=0.05)
    logits = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [1.0, 0.2]])
    for pos in (0, 1):
        d = op.apply(logits, positive_id=pos)
        p = softmax(logits, 2.0)[:, pos]
        assert np.allclose(d.probability, p) and np.allclose(d.probabilities.sum(1), 1)
        assert (d.positive == (p >= 0.3)).all()
        assert (d.label_ids == np.where(p >= 0.3, pos, 1 - pos)).all()
        assert (d.borderline == (np.abs(p - 0.3) < 0.05)).all()
    one = op.apply(np.array([0.0, 3.0]), positive_id=1)            # a single row is accepted
    assert one.positive.shape == (1,) and bool(one.positive[0])


def test_one_positive_class_rule():
    from cxr.operating_point import positive_class_id

    assert positive_class_id({0: "NORMAL", 1: "PNEUMONIA"}) == 1
    assert positive_class_id({0: "PNEUMONIA", 1: "NORMAL"}) == 0           # the one that is not NORMAL
    assert positive_class_id({0: "PNEUMONIA", 1: "NORMAL"}, "NORMAL") == 1  # named wins
    assert positive_class_id({0: "a", 1: "b"}, "missing") == 1             # unknown name: index 1
    assert positive_class_id({"0": "NORMAL", "1": "x"}) == 1               # config.json string keys


def test_reliability_bins_are_the_eces_and_the_plots():
    from cxr_train.metrics import compute_calibration, compute_reliability

    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.05, 0.15, 0.85, 0.95, 0.55, 0.55])
    predicted, observed, count = compute_reliability(y, s, n_bins=10)
    assert count.tolist() == [1, 1, 2, 1, 1]                  # bins 0, 1, 5, 8, 9 (empty ones dropped)
    assert np.allclose(predicted, [0.05, 0.15, 0.55, 0.85, 0.95]) and np.allclose(observed, [0, 0, 0.5, 1, 1])
    expected_ece = (0.05 + 0.15 + 2 * 0.05 + 0.15 + 0.05) / 6
    got = compute_calibration(y, s)
    assert got["ece"] == pytest.approx(expected_ece) and got["brier"] == pytest.approx(np.mean((s - y) ** 2))


# ------------------------------------------- calibration figures pinned (issue #27 item 4)
# The figures below were computed by the code before scikit-learn's brier_score_loss replaced the
# hand-written multi-class and multi-label Brier scores and the top-label ECE reused the binary
# binning (it had its own loop); they must not move beyond floating-point noise.

def _binary_scores():
    rng = np.random.default_rng(27)
    s = rng.beta(0.7, 0.7, 200)
    y = (rng.random(200) < s ** 1.5).astype(int)
    # then scores on bin edges (0.2, 0.5, 0.7) and at the ends
    return np.concatenate([y, [0, 1, 0, 1, 0, 1]]), np.concatenate([s, [0.0, 0.5, 0.5, 1.0, 0.2, 0.7]])


def _three_class_probs():
    rng = np.random.default_rng(29)
    z = rng.normal(0, 2, (90, 3))
    y = rng.integers(0, 3, 90)
    z[np.arange(90), y] += 1.5
    return y, compute_softmax(z)


def test_calibration_figures_are_the_pinned_ones():
    from cxr_train.metrics import compute_calibration_multiclass, compute_multilabel_metrics, compute_reliability

    y, s = _binary_scores()
    predicted, observed, count = compute_reliability(y, s)
    assert predicted == pytest.approx([0.033727344979799546, 0.15733583235589524, 0.2505915680785941,
                                       0.3518626181816215, 0.4573893246053546, 0.5507135734447499,
                                       0.6619742583210495, 0.7531783271675461, 0.8525370996853403,
                                       0.9628686270937578], abs=1e-12)
    assert observed == pytest.approx([0.0, 0.05, 0.15, 0.3333333333333333, 0.38461538461538464, 0.5625, 0.6,
                                      0.7692307692307693, 0.8, 0.9090909090909091], abs=1e-12)
    assert count.tolist() == [41, 20, 20, 21, 13, 16, 15, 13, 25, 22]
    assert compute_calibration(y, s) == pytest.approx({"brier": 0.133023808629446, "ece": 0.05194155868574298},
                                                      abs=1e-12)
    _, _, count5 = compute_reliability(y, s, n_bins=5)
    assert count5.tolist() == [61, 41, 29, 28, 47]

    ym, p = _three_class_probs()
    assert compute_calibration_multiclass(ym, p) == pytest.approx({"brier": 0.682331793473814,
                                                                   "ece": 0.2397169744134443}, abs=1e-12)
    yl = (np.random.default_rng(3).random((90, 3)) < p).astype(float)
    yl[::7, 1] = np.nan                                                     # unknown entries left out
    got = compute_multilabel_metrics(yl, p, ["a", "b", "c"], [0.3, 0.5, 0.4])["brier"]
    assert got == pytest.approx(0.07996840548288035, abs=1e-12)


def test_reliability_points_are_scikit_learns_calibration_curve_off_the_edges():
    """compute_reliability keeps its own binning (its docstring says why); away from the bin edges
    its points are scikit-learn's, and on an edge its bins are closed on the left, sklearn's on the right."""
    from sklearn.calibration import calibration_curve

    from cxr_train.metrics import compute_reliability

    y, s = _binary_scores()
    y, s = y[:200], s[:200]                                                 # no score on an edge
    observed_sk, predicted_sk = calibration_curve(y, s, n_bins=10, strategy="uniform")
    predicted, observed, _ = compute_reliability(y, s)
    assert predicted == pytest.approx(predicted_sk, abs=1e-12) and observed == pytest.approx(observed_sk, abs=1e-12)
    # on an edge: 0.5 shares [0.5, 0.6) with 0.55 here; scikit-learn puts it in (0.4, 0.5], apart
    assert compute_reliability([1, 1], [0.5, 0.55])[2].tolist() == [2]
    assert len(calibration_curve([1, 1], [0.5, 0.55], n_bins=10)[1]) == 2
