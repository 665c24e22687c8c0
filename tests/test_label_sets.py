"""Issue #29, training side: multi-class and multi-label data, losses, metrics, operating points
(cxr_train.labels / data / training / metrics, train_hf.py), on tiny synthetic datasets.

Fast tier: the label rules, the data loaders and their errors, the loss, the metrics and the
operating-point fitting. Slow tier (real 2-step trainings of a tiny model): a three-class
Kermany-named folder (--label_from_filename kermany3, with a hold-out), a Hub-style parquet dataset
with Sequence(ClassLabel), a CheXpert-style CSV with -1 and blanks; each exported, loaded in
pipeline() (softmax / sigmoid by problem_type) and in cxr.inference.Predictor, and scored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train_hf
from cxr_train.config import ConfigError, DataArguments, parse_args
from cxr_train.data import DataError, check_patient_disjoint, patient_id_from_path, prepare_data
from cxr_train.labels import FilenameLabeler, LabelError, parse_code, pos_weights, strata, targets
from cxr_train.synthetic import (MULTILABEL_FINDINGS, make_film, write_chexpert_csv, write_kermany3_folder,
                                 write_multilabel_parquet)
from tests.helpers import base_args

THREE = ["NORMAL", "BACTERIAL", "VIRAL"]
FINDINGS = list(MULTILABEL_FINDINGS)


@pytest.fixture(scope="module")
def kermany3(tmp_path_factory):
    # "chest_xray" in the path: the card treats it as Kermany data (the paper's figures beside)
    return write_kermany3_folder(tmp_path_factory.mktemp("k3") / "chest_xray_synthetic", splits=("train", "test"))


@pytest.fixture(scope="module")
def parquet_ds(tmp_path_factory):
    return write_multilabel_parquet(tmp_path_factory.mktemp("pq") / "hub_style")


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return write_chexpert_csv(tmp_path_factory.mktemp("cx") / "CheXpert-v1.0-small")


def args(path, **kw):
    return DataArguments(dataset_name=str(path), **kw)


# ------------------------------------------------------------------ label rules and codes

def test_kermany3_rule_and_custom_rules():
    lab = FilenameLabeler.parse("kermany3")
    assert lab.labels == THREE
    assert [lab(n) for n in ("IM-0115-0001.jpeg", "NORMAL2-IM-0629-0001-0002.jpeg", "person1000_bacteria_2931.jpeg",
                             "person12_virus_44.jpeg", "person1_virus__6.jpeg", "scan.png")] == \
        ["NORMAL", "NORMAL", "BACTERIAL", "VIRAL", "VIRAL", None]
    custom = FilenameLabeler.parse(["COVID=^covid", "NORMAL=^normal", "OTHER=."])
    assert custom.labels == ["COVID", "NORMAL", "OTHER"] and custom("normal_3.png") == "NORMAL"
    assert custom("x/covid_1.png") == "COVID"                     # the file's name, not its folders
    assert FilenameLabeler.parse("A=^a,B=^b").labels == ["A", "B"]
    with pytest.raises(LabelError, match="unknown --label_from_filename preset 'kermany4'"):
        FilenameLabeler.parse("kermany4")
    with pytest.raises(LabelError, match="not a valid regular expression"):
        FilenameLabeler.parse(["A=(", "B=b"])
    with pytest.raises(LabelError, match="at least two labels"):
        FilenameLabeler.parse(["A=a"])
    with pytest.raises(LabelError, match=r"2 file\(s\) of the data match no rule \(scan.png, x.jpeg\)"):
        lab.label_all(["IM-0001-0001.jpeg", "scan.png", "x.jpeg"])


def test_codes_targets_and_pos_weight():
    assert [parse_code(v) for v in ("1.0", "0", "-1.0", "", None, float("nan"), 1, True)] == \
        [1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    for bad in ("2", "yes", 0.5):
        with pytest.raises(LabelError, match="not a finding label"):
            parse_code(bad)
    codes = np.array([[1, -1], [0, 1], [-1, 0], [0, 0]], dtype=np.float32)
    assert targets(codes, "ones").tolist() == [[1, 1], [0, 1], [1, 0], [0, 0]]
    assert targets(codes, "zeros").tolist() == [[1, 0], [0, 1], [0, 0], [0, 0]]
    ignored = targets(codes, "ignore")
    assert np.isnan(ignored[0, 1]) and np.isnan(ignored[2, 0]) and ignored[1, 1] == 1
    with pytest.raises(LabelError, match="--uncertain_labels"):
        targets(codes, None)
    # negatives / positives per finding among the targets the policy makes
    assert pos_weights(codes, "ones", ["a", "b"]) == [1.0, 1.0]
    assert pos_weights(codes, "ignore", ["a", "b"]) == [2.0, 2.0]
    with pytest.raises(LabelError, match="no positive training films: b"):
        pos_weights(np.array([[1, 0], [0, 0]]), None, ["a", "b"])
    # strata: the class itself, or the rarest finding present (K when none)
    assert strata([2, 0, 1]).tolist() == [2, 0, 1]
    assert strata(np.array([[1, 1], [1, 0], [0, 0]])).tolist() == [1, 0, 2]


def test_patient_from_chexpert_paths():
    assert patient_id_from_path("CheXpert-v1.0-small/train/patient00042/study3/view1_frontal.jpg") == "patient00042"
    assert patient_id_from_path("/data/x/view1_frontal.jpg") is None


# ------------------------------------------------------------------ data: every source, every error

def test_kermany3_folder_gives_three_classes_grouped_by_patient(kermany3):
    data = prepare_data(args(kermany3, label_from_filename=["kermany3"], validation_fraction=0.25), seed=1)
    assert data.task == "multiclass" and data.id2label == dict(enumerate(THREE)) and data.normal_label == "NORMAL"
    check_patient_disjoint(data.splits)
    for split in ("train", "validation"):
        assert set(data.splits[split]["label"]) == {0, 1, 2}     # every class in both (stratified)
    names = [Path(x["path"]).name for x in data.splits["train"]["image"]]
    lab = FilenameLabeler.parse("kermany3")
    assert [THREE.index(lab(n)) for n in names] == list(data.splits["train"]["label"])   # from the names
    assert data.class_weights == pytest.approx([1.0, 1.0, 1.0], rel=0.2)
    with pytest.raises(DataError, match="positive_label is for binary tasks"):
        prepare_data(args(kermany3, label_from_filename=["kermany3"], positive_label="VIRAL"))


def test_n_class_folders_without_a_rule(tmp_path):
    from cxr_train.relabel import relabel

    src = write_kermany3_folder(tmp_path / "src", n_patients=4, per_patient=1)
    counts = relabel(src, tmp_path / "three", "kermany3")
    assert counts == {"train": {"BACTERIAL": 4, "NORMAL": 4, "VIRAL": 4}}
    assert all(p.is_symlink() for p in (tmp_path / "three" / "train" / "VIRAL").iterdir())
    data = prepare_data(args(tmp_path / "three", validation_fraction=0.5))
    assert data.task == "multiclass" and sorted(data.id2label.values()) == sorted(THREE)   # folder names
    from cxr_train.relabel import RelabelError

    with pytest.raises(RelabelError, match="not an empty folder"):         # nothing is overwritten
        relabel(src, tmp_path / "three", "kermany3")


def test_relabel_command_refuses_unmatched_files(tmp_path, capsys):
    from cxr_train.relabel import main

    src = write_kermany3_folder(tmp_path / "src", n_patients=2, per_patient=1)
    make_film(0).save(src / "train" / "NORMAL" / "scan.png")
    assert main(["--data", str(src), "--out", str(tmp_path / "out"), "--rule", "kermany3"]) == 2
    err = capsys.readouterr().err
    assert "match no rule (scan.png)" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists()


def test_parquet_sequence_classlabel_is_multilabel(parquet_ds):
    data = prepare_data(args(parquet_ds, validation_fraction=0.25), seed=0, need_test=True)
    assert data.task == "multilabel" and [data.id2label[i] for i in range(4)] == FINDINGS
    assert data.normal_label == "No Finding" and data.uncertain_labels is None
    y = np.asarray(data.splits["train"]["label"])
    assert y.shape[1] == 4 and set(np.unique(y)) <= {0.0, 1.0}
    assert ((y[:, 3] == 1) == (y[:, :3].sum(axis=1) == 0)).all()     # No Finding exactly when nothing else
    neg, pos = (y == 0).sum(0), (y == 1).sum(0)
    assert data.class_weights == pytest.approx((neg / pos).tolist())  # BCE pos_weight
    check_patient_disjoint(data.splits)
    assert len(data.splits["test"]) == 16


def test_chexpert_csv_paths_patients_and_uncertain_policy(chexpert):
    with pytest.raises(DataError, match=r"uncertain \(-1\) labels for .*--uncertain_labels ones"):
        prepare_data(args(chexpert))
    data = prepare_data(args(chexpert, uncertain_labels="zeros"))
    assert data.task == "multilabel" and [data.id2label[i] for i in range(4)] == FINDINGS
    assert data.uncertain_labels == "zeros"
    assert len(data.splits["validation"]) == 16                     # the shipped valid.csv, not carved
    train = data.splits["train"]
    assert all(p.startswith("patient") for p in train["patient_id"])  # from the path, not view1_frontal
    assert len(set(train["patient_id"])) == 24                      # two views per patient
    assert Path(train[0]["image"]["path"]).is_file()                # resolved next to the CSV's parent
    codes = np.asarray(train["label"])
    assert (codes == -1).any() and set(np.unique(codes)) <= {-1.0, 0.0, 1.0}
    # a single-label column chosen by name: the uncertain policy does not apply
    with pytest.raises(DataError, match="uncertain_labels is for multi-label"):
        prepare_data(args(chexpert, label_column="Sex", uncertain_labels="ones"))


def test_bad_label_columns_are_named(chexpert, tmp_path):
    with pytest.raises(DataError, match=r"--label_column 'Finding' is not a column of the dataset; it has 'Path', "
                                        r"'Sex', 'Age'"):
        prepare_data(args(chexpert, label_column="Finding"))
    with pytest.raises(DataError, match=r"--label_columns 'Cardiomegaly' not in the dataset"):
        prepare_data(args(chexpert, label_columns=["Edema", "Cardiomegaly"], uncertain_labels="ones"))
    with pytest.raises(DataError, match=r"finding column 'Age': 40 is not a finding label"):
        prepare_data(args(chexpert, label_columns=["Edema", "Age"], uncertain_labels="ones"))
    with pytest.raises(DataError, match=r"--image_column 'file' is not a column"):
        prepare_data(args(chexpert, image_column="file", uncertain_labels="ones"))
    # no label-like column at all: the error lists the columns and the flags
    (tmp_path / "films").mkdir()
    rows = ["Path,Site,Reader"]
    for i in range(6):
        make_film(i).save(tmp_path / "films" / f"f{i}.png")
        rows.append(f"films/f{i}.png,site-{i % 2},reader-{i % 3}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"cannot tell which column holds the labels \(columns: 'Path', 'Site', "
                                        r"'Reader'\): pass --label_column NAME .* or --label_columns"):
        prepare_data(args(tmp_path))
    # a CSV naming a film that is not there
    (tmp_path / "train.csv").write_text("Path,label\nfilms/missing.png,A\nfilms/f0.png,B\n")
    with pytest.raises(DataError, match="image file not found: 'films/missing.png'"):
        prepare_data(args(tmp_path))


def test_class_with_no_examples_and_labels_outside_the_list(parquet_ds, chexpert, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image as ImageFeature, Value

    # a ClassLabel name no training film has
    feats = Features({"image": ImageFeature(), "label": ClassLabel(names=["NORMAL", "VIRAL", "COVID"]),
                      "patient_id": Value("string")})
    ds = Dataset.from_dict({"image": [make_film(i).convert("RGB") for i in range(8)], "label": [0, 1] * 4,
                            "patient_id": [f"p{i}" for i in range(8)]}, features=feats)
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"class\(es\) with no training images: COVID"):
        prepare_data(args(tmp_path / "saved"))
    # a finding no training film has (a CSV of the fixture's films without Edema, absolute paths)
    lines = (chexpert / "valid.csv").read_text().splitlines()
    k = lines[0].split(",").index("Edema")
    keep = [str(chexpert.parent / line.split(",", 1)[0]) + "," + line.split(",", 1)[1] for line in lines[1:]
            if line.split(",")[k] not in ("1.0", "-1.0")]
    (tmp_path / "edema_free.csv").write_text("\n".join([lines[0], *keep]) + "\n")
    with pytest.raises(DataError, match="no positive training films: Edema"):
        prepare_data(args(tmp_path / "edema_free.csv"))
    # labels outside the expected list
    with pytest.raises(DataError, match=r"label names differ from the data: expected \['Edema', 'Nodule'\]"):
        prepare_data(args(parquet_ds, class_names=["Edema", "Nodule"]))


def test_config_flags_are_checked(tmp_path):
    base = ["--dataset_name", "x/y", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="unknown uncertain_labels 'maybe': choose ones, zeros, ignore"):
        parse_args(base + ["--uncertain_labels", "maybe"])
    with pytest.raises(ConfigError, match="not both"):
        parse_args(base + ["--label_column", "a", "--label_columns", "b", "c"])
    with pytest.raises(ConfigError, match="unknown --label_from_filename preset"):
        parse_args(base + ["--label_from_filename", "kermany"])
    m, d, t = parse_args(["--config", "hub_configs/efficientnet-lite0-imagenet-3class.yaml"])
    assert d.label_from_filename == ["kermany3"] and d.external_dataset == "outputs/holdout_data/holdout"
    assert d.dataset_name == "outputs/holdout_data/pool" and t.output_dir == "outputs/efficientnet-lite0-imagenet-3class"
    # the shipped recipe (chosen on validation, docs/levers/3class_soup.md, 3class_levers.md): 5 epochs at 3e-4, ~20 min of CPU
    assert model_is_imagenet_lite0(m) and m.image_size == 224 and t.num_train_epochs == 5 and t.learning_rate == 3e-4


def model_is_imagenet_lite0(m) -> bool:
    return m.model_name_or_path.endswith("tf_efficientnet_lite0.in1k") and m.strategy == "full"


def test_binary_run_config_has_no_label_set_keys(tmp_path):
    from cxr_train.config import LABEL_SET_FIELDS, resolved_config

    cfg = resolved_config(*parse_args(["--dataset_name", "x/y", "--output_dir", str(tmp_path / "o")]))
    assert not set(LABEL_SET_FIELDS) & set(cfg)                       # binary run_config.yaml as before
    cfg = resolved_config(*parse_args(["--dataset_name", "x/y", "--output_dir", str(tmp_path / "o"),
                                       "--uncertain_labels", "ignore"]))
    assert cfg["uncertain_labels"] == "ignore"


# ------------------------------------------------------------------ loss

def test_masked_bce_policies():
    from cxr_train.training import MaskedBCE

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    codes = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    pw = [2.0, 3.0]

    def bce(z, y, w):
        return -(w * y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    ignore = MaskedBCE(pw, "ignore")({"logits": logits}, codes)
    expected = (bce(2.0, 1, 2) + bce(0.5, 0, 2) + bce(0.0, 1, 3)) / 3      # the uncertain entry left out
    assert float(ignore) == pytest.approx(expected, rel=1e-6)
    ones = MaskedBCE(pw, "ones")({"logits": logits}, codes)
    assert float(ones) == pytest.approx((bce(2.0, 1, 2) + bce(-1.0, 1, 3) + bce(0.5, 0, 2) + bce(0.0, 1, 3)) / 4,
                                        rel=1e-6)
    zeros = MaskedBCE(pw, "zeros")({"logits": logits}, codes)
    assert float(zeros) == pytest.approx((bce(2.0, 1, 2) + bce(-1.0, 0, 3) + bce(0.5, 0, 2) + bce(0.0, 1, 3)) / 4,
                                         rel=1e-6)


# ------------------------------------------------------------------ metrics and operating points

def test_multiclass_metrics_by_hand():
    from cxr_train.metrics import compute_multiclass_metrics

    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .7, .2], [.1, .4, .5], [.2, .2, .6], [.1, .3, .6]])
    m = compute_multiclass_metrics(y, p, THREE, normal_id=0, threshold=0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["NORMAL"]["sensitivity"] == 0.5 and m["per_class"]["NORMAL"]["specificity"] == 1.0
    assert m["per_class"]["VIRAL"]["sensitivity"] == 1.0 and m["per_class"]["VIRAL"]["specificity"] == 0.75
    assert m["per_class"]["NORMAL"]["roc_auc"] == 1.0
    assert m["roc_auc"] == pytest.approx(np.mean([m["per_class"][n]["roc_auc"] for n in THREE]))
    # screening: abnormal = not NORMAL, P(abnormal) = 1 - P(NORMAL) >= 0.5
    assert m["screening"]["confusion_matrix"] == [[1, 1], [0, 4]]
    # bacterial vs viral among their own 4 films: P(VIRAL) / (P(BACTERIAL) + P(VIRAL))
    bv = m["pairwise"]["BACTERIAL vs VIRAL"]
    assert bv["n"] == 4 and bv["positive"] == "VIRAL" and bv["roc_auc"] == 1.0 and bv["accuracy"] == 0.75


def test_multilabel_metrics_leave_uncertain_out():
    from cxr_train.metrics import compute_multilabel_metrics

    y = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0]], dtype=float)
    p = np.array([[.9, .2], [.1, .99], [.6, .7], [.4, .4]])
    m = compute_multilabel_metrics(y, p, ["a", "b"], [0.5, 0.5])
    assert m["per_class"]["b"]["n"] == 3 and m["per_class"]["b"]["n_uncertain"] == 1
    assert m["per_class"]["a"]["roc_auc"] == 1.0 and m["per_class"]["b"]["roc_auc"] == 1.0
    assert m["per_class"]["a"]["sensitivity"] == 1.0 and m["per_class"]["b"]["specificity"] == 1.0
    assert m["accuracy"] == 1.0 and m["exact_match"] == 1.0


def test_multiclass_operating_point_screening_threshold():
    from cxr_train.training import fit_multiclass_operating_point

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    logits = rng.normal(0, 1, (120, 3)) + 3 * np.eye(3)[y]
    op = fit_multiclass_operating_point(logits, y, dict(enumerate(THREE)), policy="equal_error")
    assert op.task == "multiclass" and op.normal_label == "NORMAL" and not op.fallback
    assert 0 < op.threshold < 1 and op.temperature > 0 and op.n_fit == 120
    assert op.source.startswith("screening (1 - P(NORMAL))")
    op.validate(THREE, "single_label_classification")
    no_normal = fit_multiclass_operating_point(logits, y, {0: "A", 1: "B", 2: "C"})
    assert no_normal.normal_label is None and "no screening threshold" in no_normal.source


def test_multilabel_operating_point_per_finding():
    from cxr_train.training import fit_multilabel_operating_point

    rng = np.random.default_rng(1)
    codes = (rng.random((200, 3)) < 0.4).astype(float)
    codes[:, 2] = 0
    codes[:2, 2] = 1                                         # too rare to fit: 2 positives
    codes[5:15, 0] = -1                                      # uncertain: not fitted on
    logits = rng.normal(0, 1, codes.shape) + 4 * (codes == 1) - 2
    op = fit_multilabel_operating_point(logits, codes, {0: "a", 1: "b", 2: "rare"}, uncertain_labels="ignore")
    assert op.task == "multilabel" and op.uncertain_labels == "ignore" and op.fallback_labels == ["rare"]
    assert op.thresholds["rare"] == 0.5 and all(0 < op.thresholds[k] < 1 for k in "ab")
    assert op.thresholds["a"] != 0.5 and "per finding" in op.source and not op.fallback
    op.validate(["a", "b", "rare"], "multi_label_classification")


# ------------------------------------------------------------------ end to end (2-step trainings)

def _predictions(folder, image):
    from transformers import pipeline

    return pipeline("image-classification", model=str(folder), top_k=None)(str(image))


def _logits(folder, image):
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from PIL import Image

    model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    proc = AutoImageProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        return model(**proc(Image.open(image).convert("RGB"), return_tensors="pt")).logits[0].double().numpy()


@pytest.mark.slow
def test_three_class_training_end_to_end(kermany3, tmp_path, capsys):
    from cxr.inference import Predictor

    out = tmp_path / "k3"
    assert train_hf.main(base_args(kermany3, out, "--label_from_filename", "kermany3",
                                   "--external_dataset", str(kermany3 / "test"))) == 0
    summary = capsys.readouterr().out
    assert "macro AUROC" in summary and "BACTERIAL vs VIRAL among their own films" in summary
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["problem_type"] == "single_label_classification"
    assert [cfg["id2label"][str(i)] for i in range(3)] == THREE
    op = cfg["cxr_operating_point"]
    assert op["task"] == "multiclass" and op["normal_label"] == "NORMAL" and 0 < op["threshold"] < 1
    ev = json.loads((out / "eval_results.json").read_text())
    assert set(ev["eval_per_class"]) == set(THREE) and len(ev["eval_confusion_matrix"]) == 3
    assert set(ev["eval_per_class"]["VIRAL"]["ci"]) == {"roc_auc", "sensitivity", "specificity"}
    ext = json.loads((out / "external_results.json").read_text())
    assert ext["n_samples"] == 48 and sum(map(sum, ext["confusion_matrix"])) == 48
    assert {r["label"] for r in ext["per_image"]} == set(THREE)              # labelled by the file names
    assert "BACTERIAL vs VIRAL" in ext["pairwise"] and "screening" in ext
    card = (out / "README.md").read_text()
    assert "| class | films | AUROC (one-vs-rest) | sensitivity | specificity |" in card
    assert "Kermany et al., Cell 2018" in card and "| 90.7% | 0.940 |" in card
    assert "this model, patient-grouped hold-out (48 films)" in card
    assert "Not a medical device" in card and "--label_from_filename kermany3" in card
    from huggingface_hub import ModelCard

    metrics = {(r.dataset_split, r.metric_type) for r in ModelCard.load(out / "README.md").data.eval_results}
    assert {("validation", "roc_auc"), ("validation", "roc_auc_VIRAL"), ("validation", "accuracy")} <= metrics
    # pipeline(): softmax over the three classes (problem_type), the model's own logits
    image = next((kermany3 / "test" / "PNEUMONIA").glob("person*_virus_*"))
    res = _predictions(out, image)
    z = _logits(out, image)
    soft = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert {r["label"]: r["score"] for r in res} == pytest.approx(dict(zip(THREE, soft)), abs=1e-5)
    # the serving Predictor: arg-max + screening, every class in findings
    pred = Predictor.from_pretrained(out, precision="fp32").predict(image)
    assert pred.task == "multiclass" and [f["label"] for f in pred.findings] == THREE
    assert pred.label == THREE[int(np.argmax(z))] and pred.screening is not None


@pytest.mark.slow
def test_multilabel_parquet_training_end_to_end(parquet_ds, tmp_path):
    from cxr.inference import Predictor

    out = tmp_path / "pq"
    assert train_hf.main(base_args(parquet_ds, out, "--do_predict", "True")) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["problem_type"] == "multi_label_classification"
    op = cfg["cxr_operating_point"]
    assert op["task"] == "multilabel" and set(op["thresholds"]) == set(FINDINGS)
    assert op["normal_label"] == "No Finding" and "uncertain_labels" not in op     # no -1 in this data
    te = json.loads((out / "test_results.json").read_text())
    assert te["test_n_samples"] == 16 and set(te["test_per_class"]) == set(FINDINGS)
    card = (out / "README.md").read_text()
    assert "| finding | films | AUROC (one-vs-rest) | sensitivity | specificity | threshold |" in card
    assert "binary cross-entropy per finding, pos_weight" in card
    # pipeline(): a sigmoid per finding (problem_type), not a softmax
    from datasets import load_dataset

    row = load_dataset(str(parquet_ds), split="test")[0]
    image = tmp_path / "film.png"
    row["image"].save(image)
    res = _predictions(out, image)
    z = _logits(out, image)
    assert {r["label"]: r["score"] for r in res} == pytest.approx(dict(zip(FINDINGS, 1 / (1 + np.exp(-z)))),
                                                                  abs=1e-5)
    pred = Predictor.from_pretrained(out, precision="fp32").predict(image)
    assert pred.task == "multilabel" and [f["label"] for f in pred.findings] == FINDINGS
    thr = op["thresholds"]
    for f in pred.findings:
        assert f["threshold"] == pytest.approx(thr[f["label"]]) and f["present"] == (f["probability"] >= f["threshold"])


@pytest.mark.slow
def test_chexpert_csv_training_with_uncertain_labels(chexpert, tmp_path):
    from cxr.inference import Predictor

    out = tmp_path / "cx"
    assert train_hf.main(base_args(chexpert, out, "--uncertain_labels", "ignore", "--ood_fit", "false")) == 0
    cfg = json.loads((out / "config.json").read_text())
    op = cfg["cxr_operating_point"]
    assert cfg["problem_type"] == "multi_label_classification" and op["uncertain_labels"] == "ignore"
    assert op["fitted_on"] == "the validation split" and op["n_fit"] == 16
    ev = json.loads((out / "eval_results.json").read_text())
    assert ev["eval_n_samples"] == 16 and sum(c["n_uncertain"] for c in ev["eval_per_class"].values()) == 0
    run_cfg = (out / "run_config.yaml").read_text()
    assert "uncertain_labels: ignore" in run_cfg
    assert "masked out of the loss (U-Ignore)" in (out / "README.md").read_text()
    film = next((chexpert.parent / "CheXpert-v1.0-small" / "valid").rglob("*.jpg"))
    pred = Predictor.from_pretrained(out, precision="fp32").predict(film)
    assert pred.task == "multilabel" and len(pred.findings) == 4


@pytest.mark.slow
def test_three_class_cross_validation(kermany3, tmp_path):
    out = tmp_path / "cv"
    assert train_hf.main(base_args(kermany3, out, "--label_from_filename", "kermany3", "--cv_folds", "2",
                                   "--save_strategy", "no", "--load_best_model_at_end", "False",
                                   "--ood_fit", "false")) == 0
    cv = json.loads((out / "cv_results.json").read_text())
    assert cv["k"] == 2 and "roc_auc" in cv["summary"] and set(cv["pooled"]["per_class"]) == set(THREE)
    oof = json.loads((out / "oof_scores.json").read_text())
    assert oof["labels_names"] == THREE and len(oof["probabilities"]) == len(oof["labels"]) == 48
    assert np.allclose(np.sum(oof["probabilities"], axis=1), 1, atol=1e-4)
    op = json.loads((out / "config.json").read_text())["cxr_operating_point"]
    assert op["task"] == "multiclass" and op["fitted_on"].startswith("out-of-fold scores (2 folds")
    assert "2-fold cross-validation" in (out / "README.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--label_column", "diagnosis"], "--label_column 'diagnosis' is not a column"),
    (["--label_from_filename", "NORMAL=^IM-", "VIRAL=_virus_"], "match no rule"),
    (["--label_from_filename", "kermany3", "--positive_label", "VIRAL"], "positive_label is for binary tasks"),
    (["--uncertain_labels", "ones"], "uncertain_labels is for multi-label data"),
])
def test_bad_label_input_rejected_before_training(kermany3, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert train_hf.main(base_args(kermany3, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("error:") == 1
    assert not out.exists()                                           # nothing written


def test_external_labels_outside_the_model_list_rejected_before_training(kermany3, tmp_path, capsys):
    import shutil

    ext = tmp_path / "external"
    shutil.copytree(kermany3 / "test", ext)
    (ext / "COVID").mkdir()
    shutil.copy(next((ext / "NORMAL").iterdir()), ext / "COVID" / "covid-1.jpeg")
    out = tmp_path / "bad"
    rc = train_hf.main(base_args(kermany3, out, "--label_from_filename", "kermany3", "--external_dataset", str(ext)))
    err = capsys.readouterr().err        # the rule labels the hold-out's films: covid-1.jpeg matches none
    assert rc == 2 and "covid-1.jpeg" in err and "match no rule" in err and not out.exists()
    rc = train_hf.main(base_args(kermany3, out, "--external_dataset", str(ext)))        # binary, folder labels
    err = capsys.readouterr().err
    assert rc == 2 and "found ['COVID'] (labels outside the model's list)" in err and not out.exists()


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_site_calibration_is_binary_only_with_a_clear_error(tmp_path, capsys, task):
    from cxr.operating_point import OperatingPoint
    from cxr_train.calibrate import main
    from cxr_train.modeling import build_preset, save_model_folder

    labels = THREE if task == "multiclass" else FINDINGS
    model, processor = build_preset("tiny-resnet-scratch", dict(enumerate(labels)))
    model.config.problem_type = "single_label_classification" if task == "multiclass" else "multi_label_classification"
    op = OperatingPoint(task=task, normal_label=labels[0] if task == "multiclass" else "No Finding",
                        thresholds=None if task == "multiclass" else {n: 0.5 for n in labels})
    model.config.cxr_operating_point = op.to_config()
    save_model_folder(model, processor, tmp_path / "model")
    sample = write_kermany3_folder(tmp_path / "site", n_patients=2, per_patient=1) / "train"
    assert main(["--model", str(tmp_path / "model"), "--data", str(sample), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"site calibration is for binary models only; this one is {task}" in err
    assert "stay as fitted at training time" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists()
