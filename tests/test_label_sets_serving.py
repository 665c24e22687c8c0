"""Issue #29, serving side: binary, multi-class and multi-label models (docs/label_sets.md).

Step 1: the OperatingPoint contract (task, normal_label, thresholds, fallback_labels,
uncertain_labels), its decision rule for the three tasks, its config round trip and its errors.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from cxr.operating_point import (CONFIG_KEY, OperatingPoint, find_normal_label, label_list, sigmoid,
                                 softmax)
from tests.helpers import stored_upload as _stored_upload

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
def _shipped(task: str) -> list[str]:
    out = []
    for p in sorted((ROOT / "models").iterdir()):
        if (p / "config.json").exists():
            op = json.loads((p / "config.json").read_text()).get(CONFIG_KEY, {})
            if op.get("task", "binary") == task:
                out.append(p.name)
    return out


def test_the_shipped_three_class_model_is_multiclass_with_a_screening_point():
    assert _shipped("multiclass") == ["efficientnet-lite0-imagenet-3class"]
    cfg = json.loads((ROOT / "models" / "efficientnet-lite0-imagenet-3class" / "config.json").read_text())
    op = OperatingPoint.from_config(cfg)
    assert cfg["problem_type"] == "single_label_classification" and cfg["label_names"] == ["NORMAL", "BACTERIAL", "VIRAL"]
    assert op.task == "multiclass" and op.normal_label == "NORMAL" and 0 < op.threshold < 1
    d = op.apply(np.array([[3.0, 0.0, 0.0], [0.0, 0.5, 2.0]]), labels=cfg["label_names"])
    assert d.screening and d.screening_threshold == op.threshold
    assert d.positive.tolist() == [False, True]                    # abnormal = 1 - P(NORMAL) >= threshold
    assert d.label_ids.tolist() == [0, 2]                          # the arg-max class: NORMAL, VIRAL


@pytest.mark.parametrize("folder", _shipped("binary"))
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
    assert list(every.heatmaps) == FOUR and every.heatmap_class == "Effusion"     # "all": the answer's own first
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


# ================================================================== step 3: the app's handlers (fast: no server)

@pytest.fixture(scope="module")
def page_predictors(label_set_folders, tmp_path_factory):
    from cxr.inference import Predictor
    from tests.helpers import make_model_folder

    binary = make_model_folder(tmp_path_factory.mktemp("binary") / "edge", p_positive=0.52, threshold=0.5,
                               name_seed=1, ood=False)
    return [Predictor.from_pretrained(f, precision="fp32") for f in (binary, *label_set_folders)]




def test_page_shows_every_class_every_finding_and_a_map_per_finding(page_predictors, tmp_path):
    from app import handlers
    from cxr.explain import evidence_map

    film = _film(tmp_path)
    path = _stored_upload(tmp_path, film.name)
    out = handlers.named_outputs(handlers.predict_ui(path, True, 0.6, None, predictors=page_predictors),
                                 handlers.RESULT_OUTPUTS)
    state, panels = out["state"], out["panels"]
    assert len(panels) == 3
    (binary, binary_heat), (three, _), (four, four_heat) = state["results"]
    # binary: as before (its map drawn at P / threshold, no per-class choice)
    b = page_predictors[0].predict(film, explain=True)
    assert np.array_equal(binary_heat, evidence_map(b.heatmap, b.positive_probability, b.threshold))
    assert state["maps"][0] == {} and panels[0]["map_class"]["visible"] is False
    # multi-class: every class's probability on the card, the decided one in bold, the screening call
    card3 = panels[1]["card"]["value"]
    assert 'data-task="multiclass"' in card3 and 'data-decision="BACTERIAL"' in card3
    assert [re.search(rf'data-label="{n}" data-present="(\w+)"', card3).group(1) for n in THREE] == [
        "false", "true", "false"]
    assert "Screening: probability of an abnormal film" in card3 and "highest probability decides" in card3
    for f in three["findings"]:
        assert f"<span>{f['probability']:.2f}</span>" in card3
    # multi-label: the findings above their thresholds, each finding's threshold marked
    card4 = panels[2]["card"]["value"]
    assert 'data-decision="Effusion, Edema"' in card4 and card4.count('data-testid="cxr-finding"') == 4
    assert "<b>Effusion</b> 0.66 (threshold 0.30)" in card4 and card4.count('class="cxr-thr"') == 4
    choice = panels[2]["map_class"]
    assert choice["visible"] and choice["choices"] == FOUR and choice["value"] == "Effusion"
    assert "for Effusion" in panels[2]["caption"]["value"]
    # another finding's map, from the stored maps (no new inference)
    redraw = handlers.named_outputs(handlers.choose_map(2, "Nodule", True, 0.6, state, n_models=3))["panels"]
    assert all(isinstance(u, type(__import__("gradio").skip()))                      # other panels: as they were
               for panel in redraw[:2] for u in panel.values())
    nodule_img, nodule_cap = redraw[2]["image"], redraw[2]["caption"]
    assert "for Nodule" in nodule_cap["value"] and "heat map for Nodule" in nodule_img["alt_text"]
    # Nodule 0.15 against its threshold 0.5: the map is drawn at 0.15 / 0.5 = 30 % strength
    assert 'data-strength="0.3' in nodule_cap["value"] or 'data-strength="0.29' in nodule_cap["value"]
    assert not np.array_equal(np.asarray(nodule_img["value"]), np.asarray(panels[2]["image"]["value"]))
    assert float(state["maps"][2]["Nodule"].max()) <= 0.31 and np.array_equal(
        state["maps"][2]["Effusion"], four_heat.astype(np.float16))
    # a class the model has no map for, or no prediction: nothing changes
    assert all(isinstance(u, type(__import__("gradio").skip()))
               for u in handlers.choose_map(2, "Pneumothorax", True, 0.6, state, n_models=3))
    assert all(isinstance(u, type(__import__("gradio").skip()))
               for u in handlers.choose_map(2, "Nodule", True, 0.6, None, n_models=3))
    # the multi-class map of a class that is not the answer fades relative to the answer's class
    cls = handlers.named_outputs(handlers.choose_map(1, "VIRAL", True, 0.6, state, n_models=3))["panels"][1]
    cls = cls["caption"]["value"]
    assert "of the top class's probability" in cls


def test_visitor_chooses_which_models_to_see(page_predictors, tmp_path):
    import gradio as gr

    from app import handlers

    film = _film(tmp_path, seed=5)
    path = _stored_upload(tmp_path, film.name)
    names = [p.name for p in page_predictors]
    out = handlers.named_outputs(handlers.predict_ui(path, True, 0.6, None, predictors=page_predictors,
                                                     shown=[names[1]]), handlers.RESULT_OUTPUTS)
    state, panels = out["state"], out["panels"]
    assert [panel["card"]["visible"] for panel in panels] == [False, True, False]    # only the 3-class model
    downloads = [Path(p).name for p in out["downloads"]["value"]]
    assert "cxr-overlay-cxr-3class-tiny.png" in downloads and "cxr-overlay-edge.png" not in downloads
    report = next(Path(p) for p in out["downloads"]["value"] if p.endswith(".md")).read_text()
    assert "## cxr-3class-tiny" in report and "## edge" not in report and "  - VIRAL: " in report
    # both again: no new inference, every panel shown
    again = handlers.named_outputs(handlers.show_models(names, True, 0.6, state, n_models=3), handlers.MODELS_OUTPUTS)
    assert again["state"]["shown"] == names and [panel["image"]["visible"] for panel in again["panels"]] == [True] * 3
    assert again["state"]["results"] is state["results"]
    # before any prediction, only the choice is kept
    first = handlers.named_outputs(handlers.show_models(names[:1], True, 0.6, None, n_models=3),
                                   handlers.MODELS_OUTPUTS)
    assert first["state"] == {"shown": names[:1]}
    assert all(isinstance(u, type(gr.skip())) for panel in first["panels"] for u in panel.values())


def test_api_refuses_an_unknown_map_class_before_reading_the_file(page_predictors, tmp_path):
    import gradio as gr

    from app import handlers

    with pytest.raises(gr.Error, match="unknown class 'Nodule': this model's labels are NORMAL, PNEUMONIA"):
        handlers.api_predict({"path": str(tmp_path / "never-uploaded.png")}, True, "Nodule",
                             predictors=page_predictors)


def test_api_answer_for_every_model_and_a_chosen_map(page_predictors, tmp_path):
    from app import handlers

    film = _film(tmp_path, seed=7)
    path = _stored_upload(tmp_path, film.name)
    body = handlers.api_predict({"path": path}, False, "Edema", predictors=page_predictors[2:])
    assert body["task"] == "multilabel" and body["heatmap_class"] == "Edema" and body["heatmap"] is not None
    assert [f["label"] for f in body["findings"]] == FOUR
    assert body["screening"]["abnormal"] is True
    assert not Path(path).exists()                            # the upload is not kept


def test_example_reveal_and_facts_for_other_label_sets(page_predictors):
    from app import render

    three = {"model": "m3", "out_of_distribution": False, "task": "multiclass", "decision": "BACTERIAL",
             "screening": {"abnormal": True}, "findings": [{"label": n} for n in THREE]}
    four = {"model": "m4", "out_of_distribution": False, "task": "multilabel", "decision": "Effusion",
            "screening": {"abnormal": True}, "findings": [{"label": n} for n in FOUR]}
    text = render.example_reveal("PNEUMONIA (bacterial)", [three, four])
    assert "m3: right" in text and "m4: abnormal (right; its labels are not this data set's)" in text
    assert "m3: wrong" in render.example_reveal("PNEUMONIA (bacterial)", [{**three, "decision": "VIRAL"}])
    assert "m3: right" in render.example_reveal("NORMAL", [{**three, "decision": "NORMAL"}])
    facts = render.model_facts(page_predictors[2])
    assert "| Labels | multi-label: No Finding, Effusion, Edema, Nodule |" in facts
    assert "| Decision rule | multi-label: sigmoid per finding" in facts and "| Decision threshold |" not in facts
    assert "| Decision threshold | 0.500: PNEUMONIA" in render.model_facts(page_predictors[0])


def test_model_info_says_the_task(page_predictors):
    from cxr.api import model_info

    info = [model_info(p) for p in page_predictors]
    assert [i["task"] for i in info] == ["binary", "multiclass", "multilabel"]
    assert [i["positive_label"] for i in info] == ["PNEUMONIA", None, None]
    assert info[2]["operating_point"]["thresholds"] == {"No Finding": 0.6, "Effusion": 0.3, "Edema": 0.2,
                                                        "Nodule": 0.5}


def test_plain_app_serves_every_shipped_model_folder(monkeypatch, tmp_path):
    import cxr.locate
    from app.app import SHIPPED_ENV, shipped_models
    from cxr.inference import ModelLoadError

    models = tmp_path / "models"
    for name, weights in (("efficientnet-default", True), ("cxr-3class-tiny", True), ("a-binary", True),
                          ("half-copied", False)):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
        if weights:
            (models / name / "model.safetensors").write_bytes(b"")
    for var in ("CXR_MODEL", "MODEL_ID", SHIPPED_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cxr.locate, "resolve_model", lambda *a, **k: models / "efficientnet-default")
    assert shipped_models() == [None, str(models / "a-binary"), str(models / "cxr-3class-tiny")]
    monkeypatch.setenv(SHIPPED_ENV, "cxr-3class-tiny")
    assert shipped_models() == [None, str(models / "cxr-3class-tiny")]
    monkeypatch.setenv(SHIPPED_ENV, "cxr-3class-tiny,half-copied")
    with pytest.raises(ModelLoadError, match="no shipped model folder half-copied"):
        shipped_models()
    monkeypatch.setenv("MODEL_ID", "someone/model")
    assert shipped_models() == [None]


# ================================================================== the REST route (slow: a server)

@pytest.mark.slow
def test_rest_route_answers_label_set_models_in_the_one_schema(label_set_folders):
    import base64
    import io

    import httpx
    from PIL import Image

    from app import app as app_module
    from cxr.inference import Predictor
    from tests.helpers import make_xray

    demo = app_module.create_demo([Predictor.from_pretrained(f, precision="fp32") for f in label_set_folders])
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    url = url.rstrip("/")
    try:
        buf = io.BytesIO()
        make_xray(3, True, size=96).save(buf, "PNG")

        def post(**params):
            return httpx.post(f"{url}/api/v1/predict", files={"file": ("film.png", buf.getvalue(), "image/png")},
                              params=params, timeout=120)

        body = post().json()
        three, four = body["models"]
        assert three["task"] == "multiclass" and three["decision"] == "BACTERIAL" and three["threshold"] is None
        assert [f["label"] for f in three["findings"]] == THREE and three["screening"]["threshold"] == 0.4
        assert four["task"] == "multilabel" and four["decision"] == "Effusion, Edema"
        assert [f["present"] for f in four["findings"]] == [False, True, True, False]
        assert four["heatmap"] is None
        nodule = post(model="cxr-4finding-tiny", heatmap_class="Nodule").json()
        assert nodule["heatmap_class"] == "Nodule" and nodule["models"][0]["model"] == "cxr-4finding-tiny"
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(nodule["heatmap"]))))
        assert heat.shape == (64, 64) and 0 < heat.max() <= round(255 * 0.15 / 0.5) + 8     # Nodule: P / threshold
        bad = post(heatmap_class="Nodule")               # the 3-class model has no Nodule
        assert bad.status_code == 400 and bad.json() == {
            "error": "unknown heatmap_class 'Nodule' for model 'cxr-3class-tiny': its labels are NORMAL, BACTERIAL, VIRAL"}
        info = httpx.get(f"{url}/api/v1/model-info", timeout=60).json()["models"]
        assert [m["task"] for m in info] == ["multiclass", "multilabel"] and info[1]["labels"] == FOUR
        schema = httpx.get(f"{url}/api/v1/openapi.json", timeout=60).json()
        assert {"task", "findings", "screening"} <= set(schema["components"]["schemas"]["Answer"]["properties"])
    finally:
        demo.close()


# ================================================================== trained by cxr-train, served here (slow)

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kermany3", "multilabel"])
def test_a_model_trained_by_train_hf_is_served(kind, tmp_path):
    """The contract end to end: train_hf writes problem_type and the operating point; Predictor,
    pipeline(), the page's handlers and the API read them back."""
    import train_hf
    from app import handlers
    from cxr.inference import Predictor
    from cxr_train.synthetic import write_kermany3_folder, write_multilabel_parquet
    from tests.helpers import base_args

    if kind == "kermany3":
        data = write_kermany3_folder(tmp_path / "data", splits=("train", "test"))
        extra = ["--label_from_filename", "kermany3"]
    else:
        data = write_multilabel_parquet(tmp_path / "data")
        extra = []
    out = tmp_path / "model"
    assert train_hf.main(base_args(data, out, "--max_steps", "4", *extra)) == 0
    config = json.loads((out / "config.json").read_text())
    p = Predictor.from_pretrained(out, precision="fp32")
    labels = p.labels
    if kind == "kermany3":
        assert labels == THREE and config["problem_type"] == "single_label_classification"
        assert p.task == "multiclass" and p.operating_point.normal_label == "NORMAL"
    else:
        assert config["problem_type"] == "multi_label_classification" and p.task == "multilabel"
        assert set(p.operating_point.thresholds) == set(labels) and p.operating_point.normal_label == "No Finding"
    from cxr_train.synthetic import make_film

    film = tmp_path / "film.png"                     # a film like the training films (not flagged as unlike them)
    make_film(77, (0,), 64).save(film)
    r = p.predict(film, heatmap_classes="all")
    assert not r.out_of_distribution, r.warning
    assert r.task == p.task and [f["label"] for f in r.findings] == labels and set(r.heatmaps) == set(labels)
    answer = handlers.analyse(__import__("cxr.imaging", fromlist=["load_image"]).load_image(film), [p])[0][0]
    assert answer["task"] == p.task and len(answer["findings"]) == len(labels)
    assert answer["screening"] is not None


def test_a_flagged_film_loses_findings_and_screening_too(label_set_folders, tmp_path):
    """The one flagged-film rule (cxr.api.model_answer) covers the new fields: a film unlike the
    training films gets no decision, probabilities, findings, screening or map, whatever the task."""
    from cxr.inference import Predictor
    from tests.helpers import greyscale_photo

    photo = tmp_path / "portrait.png"
    greyscale_photo(5).convert("RGB").save(photo)
    for folder in label_set_folders:
        p = Predictor.from_pretrained(folder, precision="fp32")
        r = p.predict(photo, heatmap_classes="all")
        if not r.out_of_distribution:             # these tiny models have no OOD scorer: flag it as the scorer would
            r.out_of_distribution, r.warning = True, "This does not look like a chest X-ray."
        a = r.to_api(heatmap="not shipped")
        assert a["decision"] is None and a["probabilities"] is None and a["findings"] is None
        assert a["screening"] is None and a["heatmap"] is None and a["heatmap_class"] is None
        assert a["task"] == p.task and a["message"]
