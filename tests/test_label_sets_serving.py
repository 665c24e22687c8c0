"""Issue #29, serving side: binary, multi-class and multi-label models (docs/label_sets.md).

Step 1: the OperatingPoint contract (task, normal_label, thresholds, fallback_labels,
uncertain_labels), its decision rule for the three tasks, its config round trip and its errors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr.operating_point import (CONFIG_KEY, OperatingPoint, find_normal_label, label_list, sigmoid,
                                 softmax)

ROOT = Path(__file__).resolve().parents[1]
THREE = ["NORMAL", "BACTERIAL", "VIRAL"]
FOUR = ["No Finding", "Effusion", "Edema", "Nodule"]
NEW_FIELDS = {"task", "normal_label", "thresholds", "fallback_labels", "uncertain_labels"}


def multiclass_op(**kw) -> OperatingPoint:
    return OperatingPoint(**{"task": "multiclass", "normal_label": "NORMAL", "threshold": 0.4,
                             "temperature": 1.5, "policy": "equal_error", "source": "s", **kw})


def multilabel_op(**kw) -> OperatingPoint:
    return OperatingPoint(**{"task": "multilabel", "normal_label": "No Finding", "temperature": 1.25,
                             "thresholds": {"No Finding": 0.6, "Effusion": 0.3, "Edema": 0.2, "Nodule": 0.5},
                             "fallback_labels": ["Nodule"], "uncertain_labels": "ones",
                             "policy": "equal_error", "source": "s", **kw})


# ------------------------------------------------------------------ binary stays binary
@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "models").iterdir() if (p / "config.json").exists()))
def test_shipped_binary_configs_load_unchanged(folder):
    """Every shipped config.json (no task key) is a binary operating point; writing it back adds
    no key, and its decision is the temperature-scaled softmax against the threshold."""
    cfg = json.loads((ROOT / "models" / folder / "config.json").read_text())
    op = OperatingPoint.from_config(cfg)
    assert op.task == "binary" and op.thresholds is None and op.normal_label is None
    written = op.to_config()
    assert not NEW_FIELDS & set(written)
    assert set(cfg[CONFIG_KEY]) <= set(written)
    assert OperatingPoint.from_config({CONFIG_KEY: written}).to_config() == written   # (floats rounded to 6)
    logits = np.array([[1.0, -0.5], [0.0, 0.3], [-2.0, 2.0]])
    d = op.apply(logits, 1)
    p = softmax(logits / op.temperature)[:, 1]
    assert np.array_equal(d.probability, p) and np.array_equal(d.positive, p >= op.threshold)
    assert d.task == "binary" and d.screening and d.screening_threshold == op.threshold
    assert np.array_equal(d.present, np.eye(2, dtype=bool)[d.label_ids])
    # labels instead of the index: the one positive-class rule picks PNEUMONIA
    assert np.array_equal(op.apply(logits, labels=["NORMAL", "PNEUMONIA"]).positive, d.positive)
    with pytest.raises(ValueError, match="positive_id or labels"):
        op.apply(logits)


# ------------------------------------------------------------------ multi-class
def test_multiclass_softmax_argmax_and_screening():
    op = multiclass_op()
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.4, 0.45], [-1.0, 4.0, 0.0]])
    d = op.apply(logits, labels={"0": "NORMAL", "1": "BACTERIAL", "2": "VIRAL"})
    z = logits / 1.5
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert np.allclose(d.probabilities, expected, atol=1e-12)
    assert d.label_ids.tolist() == [0, 2, 0, 1]
    assert d.present.tolist() == np.eye(3, dtype=bool)[[0, 2, 0, 1]].tolist()
    p_abn = 1 - expected[:, 0]
    assert np.allclose(d.probability, p_abn)
    assert d.positive.tolist() == (p_abn >= 0.4).tolist()
    # row 2: arg-max NORMAL, yet P(abnormal) = 0.66 >= 0.4: the screening point calls it abnormal
    assert d.label_ids[2] == 0 and bool(d.positive[2])
    assert d.borderline.tolist() == (np.abs(p_abn - 0.4) < 0.05).tolist()
    assert d.screening_threshold == 0.4 and np.isnan(d.thresholds).all()
    # the normal class anywhere in the order
    shuffled = op.apply(logits[:, [1, 0, 2]], labels=["BACTERIAL", "NORMAL", "VIRAL"])
    assert np.allclose(shuffled.probability, p_abn)


def test_multiclass_without_a_normal_class_has_no_screening():
    op = multiclass_op(normal_label=None)
    d = op.apply(np.array([[0.0, 2.0, 1.0]]), labels=["BACTERIAL", "VIRAL", "FUNGAL"])
    assert d.label_ids.tolist() == [1] and not d.screening
    assert d.probability is None and d.positive is None and d.borderline is None
    assert d.screening_threshold is None and op.screening_threshold is None
    assert "no screening" in op.describe()


# ------------------------------------------------------------------ multi-label
def test_multilabel_sigmoid_per_finding_against_its_threshold():
    import torch

    op = multilabel_op()
    logits = np.array([[2.0, -1.0, -3.0, 0.0], [-2.0, 1.0, 0.0, -5.0], [0.5, 0.5, 0.5, 0.5]])
    d = op.apply(logits, labels=FOUR)
    expected = torch.sigmoid(torch.tensor(logits) / 1.25).numpy()
    assert np.allclose(d.probabilities, expected, atol=1e-12)
    assert not np.allclose(d.probabilities.sum(1), 1)             # not a softmax
    t = np.array([0.6, 0.3, 0.2, 0.5])
    assert np.array_equal(d.thresholds, t)
    assert np.array_equal(d.present, expected >= t)
    # screening: abnormal exactly when "No Finding" is not present
    assert d.positive.tolist() == (~(expected[:, 0] >= 0.6)).tolist()
    assert np.allclose(d.probability, 1 - expected[:, 0])
    assert d.screening_threshold == pytest.approx(0.4) and op.screening_threshold == pytest.approx(0.4)
    assert d.label_ids.tolist() == expected.argmax(1).tolist()
    # a threshold moves only its own finding
    d2 = multilabel_op(thresholds={**op.thresholds, "Edema": 0.9}).apply(logits, labels=FOUR)
    assert np.array_equal(d2.present[:, [0, 1, 3]], d.present[:, [0, 1, 3]])
    assert d2.present[:, 2].sum() == 0 and d.present[:, 2].sum() == 2
    # label order comes from the labels, not from the thresholds dict's order
    reordered = multilabel_op(thresholds=dict(reversed(list(op.thresholds.items()))))
    assert np.array_equal(reordered.apply(logits, labels=FOUR).present, d.present)


def test_multilabel_without_normal_finding_and_sigmoid_is_stable():
    op = multilabel_op(normal_label=None, thresholds={"Effusion": 0.5, "Edema": 0.5}, fallback_labels=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = op.apply(np.array([[1000.0, -1000.0]]), labels=["Effusion", "Edema"])
        assert sigmoid(np.array([-800.0, 0.0, 800.0])).tolist() == [0.0, 0.5, 1.0]
    assert d.present.tolist() == [[True, False]] and not d.screening and d.probability is None


# ------------------------------------------------------------------ config.json
@pytest.mark.parametrize("make,labels,problem_type", [
    (multiclass_op, THREE, "single_label_classification"),
    (multilabel_op, FOUR, "multi_label_classification"),
])
def test_round_trip_through_config_json(make, labels, problem_type):
    op = make()
    cfg = {"id2label": {str(i): n for i, n in enumerate(labels)}, "problem_type": problem_type,
           CONFIG_KEY: op.to_config()}
    back = OperatingPoint.from_config(json.loads(json.dumps(cfg)))
    assert back == op and back.to_config() == op.to_config()
    assert back.to_config()["task"] == op.task


def test_round_trip_through_a_transformers_config():
    from transformers import PretrainedConfig

    op = multilabel_op()
    config = PretrainedConfig(id2label=dict(enumerate(FOUR)), problem_type="multi_label_classification",
                              **{CONFIG_KEY: op.to_config()})
    assert OperatingPoint.from_config(config) == op
    config.problem_type = "single_label_classification"
    with pytest.raises(ValueError, match="problem_type"):
        OperatingPoint.from_config(config)


def test_thresholds_are_rounded_like_every_float():
    op = multilabel_op(thresholds={n: 1 / 3 for n in FOUR})
    assert op.to_config()["thresholds"] == {n: 0.333333 for n in FOUR}


@pytest.mark.parametrize("change,labels,problem_type,message", [
    ({"thresholds": {"No Finding": 0.6, "Effusion": 0.3, "Edema": 0.2}}, FOUR, None,
     r"no threshold for finding\(s\) \['Nodule'\]"),
    ({"thresholds": {**{n: 0.5 for n in FOUR}, "Mass": 0.5}}, FOUR, None, r"unknown finding\(s\) \['Mass'\]"),
    ({"normal_label": "Normal"}, FOUR, None, "normal_label 'Normal' is not one of them"),
    ({"fallback_labels": ["Mass"]}, FOUR, None, "fallback_labels"),
    ({}, FOUR, "single_label_classification", "problem_type"),
    ({"thresholds": None}, FOUR, None, "needs thresholds"),
    ({"thresholds": {**{n: 0.5 for n in FOUR}, "Edema": 1.2}}, FOUR, None, "threshold of 'Edema'"),
    ({"thresholds": {**{n: 0.5 for n in FOUR}, "Edema": "high"}}, FOUR, None, "threshold of 'Edema'"),
    ({"uncertain_labels": "maybe"}, FOUR, None, "uncertain_labels"),
    ({"task": "regression"}, FOUR, None, "task 'regression'"),
    ({"fallback_labels": "Nodule"}, FOUR, None, "fallback_labels"),
])
def test_multilabel_config_errors_are_clear(change, labels, problem_type, message):
    raw = {**multilabel_op().to_config(), **change}
    cfg = {"id2label": dict(enumerate(labels)), CONFIG_KEY: raw}
    if problem_type:
        cfg["problem_type"] = problem_type
    with pytest.raises(ValueError, match=message):
        OperatingPoint.from_config(cfg)


def test_multiclass_and_binary_config_errors_are_clear():
    raw = multiclass_op().to_config()
    with pytest.raises(ValueError, match="at least 3 classes"):
        OperatingPoint.from_config({"id2label": {0: "NORMAL", 1: "VIRAL"}, CONFIG_KEY: raw})
    with pytest.raises(ValueError, match="normal_label 'NORMAL' is not one of them"):
        OperatingPoint.from_config({"id2label": dict(enumerate(["A", "B", "C"])), CONFIG_KEY: raw})
    with pytest.raises(ValueError, match="expected 'single_label_classification'"):
        OperatingPoint.from_config({"id2label": dict(enumerate(THREE)), "problem_type": "multi_label_classification",
                                    CONFIG_KEY: raw})
    binary = OperatingPoint(threshold=0.3).to_config()     # a binary operating point on a multi-label config
    with pytest.raises(ValueError, match="no task 'multilabel'"):
        OperatingPoint.from_config({"label_names": FOUR, "problem_type": "multi_label_classification",
                                    CONFIG_KEY: binary})
    with pytest.raises(ValueError, match="needs the model's labels"):
        multiclass_op().apply(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="3 logits per row but 2 labels"):
        multiclass_op().apply(np.zeros((1, 3)), labels=["NORMAL", "VIRAL"])


def test_find_normal_label_and_label_list():
    assert find_normal_label(THREE) == "NORMAL"
    assert find_normal_label({0: "Effusion", 1: "no finding"}) == "no finding"
    assert find_normal_label(["BACTERIAL", "VIRAL"]) is None
    assert label_list({"1": "b", "0": "a"}) == ["a", "b"]
    with pytest.raises(ValueError, match="not 0..1"):
        label_list({0: "a", 2: "b"})


def test_describe_names_the_task():
    assert "multi-label" in multilabel_op().describe() and "Nodule" in multilabel_op().describe()
    assert "1 - P(NORMAL) >= 0.400" in multiclass_op().describe()
    assert OperatingPoint(threshold=0.3).describe().startswith("threshold 0.300")


# ================================================================== step 2: Predictor, to_api, pipeline, cxr-predict

def _last_linear(model):
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def make_label_set_folder(out: Path, labels: list[str], op: OperatingPoint | dict | None, *,
                          logits: list[float] | None = None, problem_type: str | None = None,
                          preset: str = "tiny-resnet-scratch", seed: int = 0) -> Path:
    """A tiny model folder for any label set, saved as training saves it: ``problem_type`` and the
    operating point in config.json. With ``logits`` every film gets about those logits (head
    weights scaled down, bias set), while its heat maps stay real, non-constant maps."""
    import torch

    from cxr_train.modeling import build_preset, save_model_folder

    torch.manual_seed(seed)
    model, processor = build_preset(preset, dict(enumerate(labels)))
    if logits is not None:
        lin = _last_linear(model)
        with torch.no_grad():
            lin.weight.mul_(1e-3)
            lin.bias.copy_(torch.tensor(logits, dtype=torch.float32))
    if problem_type:
        model.config.problem_type = problem_type
    if op is not None:
        model.config.cxr_operating_point = op.to_config() if isinstance(op, OperatingPoint) else op
    save_model_folder(model, processor, out)
    return out


# The 3-class model says about P = softmax([0.2, 1.0, 0.1] / 1.5); the multi-label model about
# sigmoid([-1.4, 0.85, -0.4, -2.2] / 1.25) = No Finding 0.25, Effusion 0.66, Edema 0.42, Nodule 0.15.
LOGITS3 = [0.2, 1.0, 0.1]
LOGITS4 = [-1.4, 0.85, -0.4, -2.2]


@pytest.fixture(scope="module")
def label_set_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("label-sets")
    three = make_label_set_folder(root / "cxr-3class-tiny", THREE, multiclass_op(), logits=LOGITS3,
                                  problem_type="single_label_classification")
    four = make_label_set_folder(root / "cxr-4finding-tiny", FOUR, multilabel_op(), logits=LOGITS4,
                                 problem_type="multi_label_classification", seed=1)
    return three, four


def _film(tmp_path, seed=3):
    from tests.helpers import make_xray

    path = tmp_path / f"film-{seed}.png"
    make_xray(seed, True, size=96).save(path)
    return path


def test_predictor_multiclass_answer(label_set_folders, tmp_path):
    from cxr.inference import Predictor

    p = Predictor.from_pretrained(label_set_folders[0], precision="fp32")
    assert p.task == "multiclass" and p.labels == THREE
    film = _film(tmp_path)
    logits = p.logits(p.preprocess([__import__("cxr.imaging", fromlist=["load_image"]).load_image(film)]))[0]
    expected = softmax(logits / 1.5)
    r = p.predict(film)
    assert r.task == "multiclass" and r.label == THREE[int(expected.argmax())] == "BACTERIAL"
    assert np.allclose([r.probabilities[n] for n in THREE], expected, atol=1e-7)
    assert [f["label"] for f in r.findings] == THREE
    assert [f["present"] for f in r.findings] == [False, True, False]
    assert all(f["threshold"] is None for f in r.findings)
    assert r.positive_label == "BACTERIAL" and r.threshold is None
    assert r.screening["abnormal_probability"] == pytest.approx(1 - expected[0])
    assert r.screening["abnormal"] == (1 - expected[0] >= 0.4) and r.screening["threshold"] == 0.4
    a = r.to_api()
    assert a["task"] == "multiclass" and a["decision"] == "BACTERIAL" and a["threshold"] is None
    assert a["findings"][1] == {"label": "BACTERIAL", "probability": round(float(expected[1]), 4),
                                "threshold": None, "present": True}
    assert a["screening"] == {"abnormal_probability": round(float(1 - expected[0]), 4), "threshold": 0.4,
                              "abnormal": bool(1 - expected[0] >= 0.4)}
    assert sum(f["probability"] for f in a["findings"]) == pytest.approx(1, abs=2e-4)


def test_predictor_multilabel_answer_and_per_finding_maps(label_set_folders, tmp_path):
    import torch

    from cxr.inference import Predictor

    p = Predictor.from_pretrained(label_set_folders[1], precision="fp32")
    assert p.task == "multilabel" and p.labels == FOUR
    film = _film(tmp_path)
    r = p.predict(film, explain=True)
    probs = np.array([r.probabilities[n] for n in FOUR])
    assert np.allclose(probs, torch.sigmoid(torch.tensor(LOGITS4) / 1.25).numpy(), atol=0.02)
    assert probs.sum() != pytest.approx(1, abs=0.05)
    # thresholds No Finding 0.6, Effusion 0.3, Edema 0.2, Nodule 0.5
    assert [f["present"] for f in r.findings] == [False, True, True, False]
    assert [f["threshold"] for f in r.findings] == [0.6, 0.3, 0.2, 0.5]
    assert r.label == "Effusion, Edema"
    # headline: the non-normal finding furthest above its threshold (Effusion 0.66 / 0.3 > Edema 0.42 / 0.2)
    assert r.positive_label == "Effusion" and r.threshold == 0.3 and r.heatmap_class == "Effusion"
    assert r.screening == {"abnormal_probability": pytest.approx(1 - probs[0]), "threshold": pytest.approx(0.4),
                           "abnormal": True}
    assert r.heatmap.shape == (64, 64) and r.map_weight() == (pytest.approx(probs[1]), 0.3)
    # maps per finding on request: the same maps whether asked one by one or all at once
    every = p.predict(film, heatmap_classes="all")
    assert list(every.heatmaps) == FOUR and every.heatmap_class == "No Finding"
    assert np.array_equal(every.heatmaps["Effusion"], r.heatmap)
    one = p.predict(film, heatmap_classes="Nodule")
    assert one.heatmap_class == "Nodule" and np.array_equal(one.heatmap, every.heatmaps["Nodule"])
    assert np.array_equal(p.predict(film, heatmap_classes=3).heatmap, one.heatmap)
    assert not np.allclose(every.heatmaps["Nodule"], every.heatmaps["Effusion"])   # a map per class
    assert one.map_weight() == (pytest.approx(probs[3]), 0.5)
    assert one.to_api()["heatmap_class"] == "Nodule"


def test_closed_form_maps_match_the_backward_pass_for_every_class(label_set_folders, tmp_path):
    """The per-class maps read off one forward pass equal pytorch-grad-cam's, class by class."""
    pytest.importorskip("pytorch_grad_cam")
    from cxr.inference import Predictor

    p = Predictor.from_pretrained(label_set_folders[0], precision="fp32")
    pv = p.preprocess([__import__("cxr.imaging", fromlist=["load_image"]).load_image(_film(tmp_path))])
    _, maps = p.logits_and_heatmaps(pv, [0, 1, 2])
    for k in range(3):
        assert np.abs(maps[k] - p.explain_tensor(pv, k)).max() < 1e-4


def test_unknown_heatmap_class_is_refused_before_any_work(label_set_folders, tmp_path):
    from cxr.inference import Predictor, UnknownClassError

    p = Predictor.from_pretrained(label_set_folders[1], precision="fp32")
    missing = tmp_path / "never-read.png"          # not there: the class is checked first
    for bad in ("Pneumothorax", 4, -1, [], ["Edema", "PNEUMONIA"]):
        with pytest.raises(UnknownClassError, match="labels are No Finding, Effusion, Edema, Nodule"
                           if bad != [] else "no class asked for"):
            p.predict(missing, heatmap_classes=bad)


@pytest.mark.parametrize("which", [0, 1])
def test_pipeline_applies_softmax_or_sigmoid_from_problem_type(label_set_folders, tmp_path, which):
    """transformers.pipeline('image-classification') reads config.json's problem_type: softmax of
    the raw logits for the 3-class model, sigmoid for the multi-label one (no temperature)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    folder = label_set_folders[which]
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    from PIL import Image

    image = Image.open(_film(tmp_path)).convert("RGB")
    with torch.no_grad():
        logits = model(**processor(images=image, return_tensors="pt")).logits[0].double()
    expected = (torch.softmax(logits, -1) if which == 0 else torch.sigmoid(logits)).numpy()
    out = pipeline("image-classification", model=str(folder))(image, top_k=None)
    got = {o["label"]: o["score"] for o in out}
    labels = THREE if which == 0 else FOUR
    assert np.allclose([got[n] for n in labels], expected, atol=1e-5)
    if which == 1:
        assert sum(got.values()) != pytest.approx(1, abs=0.05)      # not a softmax


def test_cxr_predict_prints_every_class_and_finding(label_set_folders, tmp_path, capsys):
    from cxr.inference import main

    film = _film(tmp_path)
    assert main([str(film), "--model", str(label_set_folders[0]), "--precision", "fp32"]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out.strip())
    assert row["task"] == "multiclass" and [f["label"] for f in row["findings"]] == THREE
    assert row["decision"] == "BACTERIAL" and "3 classes: NORMAL, BACTERIAL, VIRAL" in err
    assert main([str(film), "--model", str(label_set_folders[1]), "--precision", "fp32"]) == 0
    out, err = capsys.readouterr()
    row = json.loads(out.strip())
    assert row["task"] == "multilabel" and row["decision"] == "Effusion, Edema"
    assert [f["present"] for f in row["findings"]] == [False, True, True, False]
    assert "multi-label, 4 findings" in err and "Nodule >= 0.500" in err


@pytest.mark.parametrize("op,problem_type,message", [
    ({**multilabel_op().to_config(), "thresholds": {"No Finding": 0.6, "Effusion": 0.3, "Edema": 0.2}},
     "multi_label_classification", r"no threshold for finding\(s\) \['Nodule'\]"),
    (multilabel_op().to_config(), "single_label_classification", "problem_type"),
    ({**multilabel_op().to_config(), "normal_label": "NORMAL"}, "multi_label_classification",
     "normal_label 'NORMAL' is not one of them"),
])
def test_a_model_whose_operating_point_disagrees_with_its_labels_is_refused(tmp_path, op, problem_type, message):
    from cxr.inference import ModelLoadError, Predictor

    folder = make_label_set_folder(tmp_path / "bad", FOUR, op, problem_type=problem_type)
    with pytest.raises(ModelLoadError, match=message):
        Predictor.from_pretrained(folder)


def test_cxr_predict_refuses_a_bad_label_set_model_in_one_line(tmp_path, capsys):
    from cxr.inference import main

    op = {**multilabel_op().to_config(), "thresholds": {"No Finding": 0.6}}
    folder = make_label_set_folder(tmp_path / "bad", FOUR, op, problem_type="multi_label_classification")
    film = _film(tmp_path)
    capsys.readouterr()
    assert main([str(film), "--model", str(folder)]) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]             # after transformers' loading progress bar
    assert out == "" and last.startswith("error: bad: ") and "no threshold for finding(s)" in last
    assert "Traceback" not in err
