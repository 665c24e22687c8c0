"""The command lines' shared manners: which model a command serves when none is named
(cxr.locate.resolve_model), unknown flags with the nearest known one, the decision rule
cxr-predict states, and cxr-train writing nothing before its data passed the checks.
(The non-editable install in a fresh venv: tests/test_package.py.)"""

import json
import os

import pytest

from cxr import locate
from cxr.cli import suggest
from cxr.inference import ModelLoadError, Predictor, image_processor_backend
from cxr.inference import main as predict_main
from cxr.locate import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, NoDefaultModelError, resolve_model
from tests.helpers import ROOT

FILM = ROOT / "app" / "examples" / "film-1.jpeg"


@pytest.fixture
def no_env(monkeypatch):
    for var in (*locate.MODEL_ENV, "SPACE_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_default(monkeypatch, tmp_path, no_env):
    """As if neither the checkout nor the installed package held the default."""
    places = [tmp_path / "checkout" / "models" / DEFAULT_MODEL, tmp_path / "site" / "cxr_models" / DEFAULT_MODEL]
    monkeypatch.setattr(locate, "default_model_folders", lambda: places)
    return places


# ------------------------------------------------------------------ which model

def test_the_default_is_declared_once_and_shipped_in_the_checkout(no_env):
    from cxr_train.space import DEFAULT_MODEL_ID

    assert DEFAULT_MODEL_ID == DEFAULT_MODEL_HUB_ID == f"cxr-transfer/cxr-{DEFAULT_MODEL}"
    folder = locate.default_model_folder()
    assert folder == ROOT / "models" / DEFAULT_MODEL
    assert resolve_model(None) == str(folder) and resolve_model("") == str(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "ood.safetensors").is_file()


def test_explicit_model_then_environment_then_default(monkeypatch, no_env):
    assert resolve_model("some/model") == "some/model"
    monkeypatch.setenv("MODEL_ID", "user/from-model-id")
    assert resolve_model(None) == "user/from-model-id"
    monkeypatch.setenv("CXR_MODEL", "user/from-cxr-model")
    assert resolve_model(None) == "user/from-cxr-model"             # CXR_MODEL first
    assert resolve_model("outputs/mine") == "outputs/mine"            # an explicit model always wins
    monkeypatch.delenv("CXR_MODEL")
    monkeypatch.setenv("MODEL_ID", "user/a,user/b")                   # the app's list: one model here
    with pytest.raises(ValueError, match="names several models"):
        resolve_model(None)


def test_installed_package_data_is_found(monkeypatch, tmp_path, no_env):
    """pip install . copies models/<default> into the data package cxr_models: found there
    when the checkout is not (an installed copy run from any folder)."""
    site = tmp_path / "site"
    (site / "cxr_models" / DEFAULT_MODEL).mkdir(parents=True)
    (site / "cxr_models" / DEFAULT_MODEL / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(site))
    places = locate.default_model_folders()
    assert places[0] == ROOT / "models" / DEFAULT_MODEL                 # the checkout first
    assert site / "cxr_models" / DEFAULT_MODEL in places


def test_no_default_anywhere_is_one_clear_error(no_default):
    with pytest.raises(NoDefaultModelError) as e:
        resolve_model(None)
    text = str(e.value)
    assert DEFAULT_MODEL in text and str(no_default[0]) in text and str(no_default[1]) in text
    assert "--model" in text and "CXR_MODEL" in text
    with pytest.raises(ModelLoadError, match="shipped default"):
        Predictor.from_pretrained(None)


def test_a_space_without_the_default_serves_its_hub_copy(monkeypatch, no_default):
    monkeypatch.setenv("SPACE_ID", "someone/cxr-demo")
    assert resolve_model(None) == DEFAULT_MODEL_HUB_ID


def test_cxr_predict_without_a_model_anywhere_says_so(no_default, capsys):
    assert predict_main([str(FILM)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model given") and "Traceback" not in err


# ------------------------------------------------------------------ flags

def test_misspelt_flag_names_the_nearest(capsys):
    with pytest.raises(SystemExit) as e:
        predict_main(["--modle", "models/x", str(FILM)])
    assert e.value.code == 2
    assert "unknown argument: --modle (did you mean --model?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main([str(FILM), "--precison=fp32"])
    assert "unknown argument: --precison (did you mean --precision?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict_main([str(FILM), "--zzz"])
    err = capsys.readouterr().err
    assert "unknown argument: --zzz" in err and "did you mean" not in err
    from cxr_train.space import main as space_main

    with pytest.raises(SystemExit):
        space_main(["--dry_rn", "/tmp/never-built"])
    assert "unknown argument: --dry_rn (did you mean --dry_run?)" in capsys.readouterr().err


def test_one_suggestion_rule_for_every_command():
    from cxr_train.config import ConfigError, parse_args

    assert suggest("learnin_rate", ["learning_rate", "seed"]) == " (did you mean --learning_rate?)"
    assert suggest("--modle", ["--model", "--revision"]) == " (did you mean --model?)"
    with pytest.raises(ConfigError) as e:                                   # cxr-train says what suggest says
        parse_args(["--learnin_rate", "1"])
    assert str(e.value) == "unknown argument: --learnin_rate" + suggest("learnin_rate", ["learning_rate"])


def test_a_verbs_failure_is_one_error_line_and_status_2(capsys):
    from cxr.cli import answer

    assert answer(lambda: "outputs/model", KeyError) == 0
    assert capsys.readouterr().out == "outputs/model\n"

    def fails():
        raise KeyError("no such model")

    assert answer(fails, KeyError, ValueError) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: 'no such model'\n"
    with pytest.raises(ZeroDivisionError):                                  # anything else is a bug: not hidden
        answer(lambda: 1 / 0, KeyError)


def test_every_verb_prints_its_errors_by_the_one_rule(tmp_path, capsys):
    """cxr.cli.fail is the rule answer prints by; a verb that printed its own output returns None
    (nothing more printed). cxr-push, cxr-soup, the OOD fit and cxr-train fail through it: one
    line, status 2."""
    from cxr.cli import answer, fail
    from cxr_train import ood_fit, soup
    from cxr_train.hub import push_main
    from train_hf import main as main_train

    assert fail("no images under x") == 2 and capsys.readouterr() == ("", "error: no images under x\n")
    assert answer(lambda: None, KeyError) == 0 and capsys.readouterr() == ("", "")
    missing = str(tmp_path / "missing")
    for verb in (lambda: push_main(["--folder", missing, "--repo_id", "someone/cxr"]),
                 lambda: soup.main(["--members", missing, "--", "--output_dir", str(tmp_path / "soup")]),
                 lambda: ood_fit.main(["score", "--model", missing, "film.png"]),
                 lambda: main_train(["--dataset_name", missing, "--output_dir", str(tmp_path / "out")])):
        assert verb() == 2
        out, err = capsys.readouterr()
        assert err.count("error:") == 1 and "Traceback" not in err
        assert [line for line in err.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------ what cxr-predict says

def test_timm_models_ask_for_the_backend_they_have():
    """TimmWrapperImageProcessor exists only as a PIL-backend class: asking for the default
    (torchvision) made every load of the shipped model warn and fall back."""
    from transformers import TimmWrapperConfig, ViTConfig

    assert image_processor_backend(TimmWrapperConfig(architecture="test_resnet")) == "pil"
    assert image_processor_backend(ViTConfig()) is None                   # has a torchvision class: the default


@pytest.mark.slow   # loads the shipped model
def test_cxr_predict_with_no_model_serves_the_default_and_states_its_rule(no_env, capfd):
    assert predict_main(["--precision", "fp32", str(FILM)]) == 0
    out, err = capfd.readouterr()
    row = json.loads(out.strip().splitlines()[-1])
    assert row["file"] == FILM.name and row["decision"] in ("NORMAL", "PNEUMONIA") and row["ood_score"] is not None
    # the operating point the label was decided at, and why pipeline() can differ
    assert f"{row['threshold']:.3f}" in err and "transformers.pipeline()" in err and "argmax" in err
    assert DEFAULT_MODEL in err
    assert "backend is not available" not in err                          # no torchvision fallback warning


# ------------------------------------------------------------------ cxr-train writes nothing on bad input

def _train_args(data, out, *extra):
    return ["--model_name_or_path", "tiny-resnet-scratch", "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", "2", *extra]


def test_wrong_dataset_writes_no_output_folder(tmp_path, capsys):
    import train_hf

    out = tmp_path / "runs" / "out"
    assert train_hf.main(_train_args(tmp_path / "no-such-data", out)) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_wrong_labels_write_no_output_folder(kermany_folder, tmp_path, capsys):
    import train_hf

    out = tmp_path / "out"
    assert train_hf.main(_train_args(kermany_folder, out, "--class_names", "NORMAL", "COVID")) == 2
    assert "label names differ" in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_folder_is_refused_before_the_data(tmp_path, capsys):
    import train_hf

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train_hf.main(_train_args(tmp_path / "no-such-data", blocker / "out")) == 2
    assert "cannot create output_dir" in capsys.readouterr().err         # before the (missing) data is read
    if os.geteuid() != 0:                                                 # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert train_hf.main(_train_args(tmp_path / "no-such-data", ro / "out")) == 2
        assert not (ro / "out").exists()


def test_end_of_run_summary_names_the_folder_the_figures_and_what_next(tmp_path):
    from types import SimpleNamespace

    from cxr.operating_point import OperatingPoint
    from train_hf import render_summary

    m = {"n_samples": 447, "roc_auc": 0.9981, "sensitivity": 0.9789, "specificity": 0.9739, "accuracy": 0.9776}
    ext = {"n_samples": 746, "roc_auc": 0.9984, "sensitivity": 0.9838, "specificity": 0.9792, "accuracy": 0.9826}
    ood = {"threshold": 69.03, "val_flagged": 0.009, "held_out_non_xray_flagged": 0.97}
    result = {"output_dir": str(tmp_path / "run"), "operating_point": OperatingPoint(threshold=0.34),
              "metrics": {"validation": m, "external": ext}, "cv": None, "ood": ood, "train_seconds": 396.0}
    text = render_summary(result)
    assert f"Model folder: {tmp_path / 'run'}" in text and "threshold 0.340" in text
    assert "validation, where the operating point was fitted (447 films): AUROC 0.998, sensitivity 0.979" in text
    assert "hold-out / external, scored once (746 films): AUROC 0.998, sensitivity 0.984, specificity 0.979" in text
    assert "OOD statistics: ood.safetensors written (threshold 69.03, 0.9% of validation films flagged" in text
    assert "training time: 6.6 min" in text
    assert f"cxr-predict --model {tmp_path / 'run'} film.jpeg" in text and "cxr-push --folder" in text
    cv = SimpleNamespace(k=5, summary={"roc_auc": {"mean": 0.91, "sd": 0.02}})
    text = render_summary({**result, "cv": cv, "ood": {"error": "fit_ood needs at least 2 training images"}})
    assert "5-fold cross-validation (operating point fitted on its out-of-fold scores): AUROC 0.910 ± 0.020" in text
    assert "validation (447 films)" in text
    assert "OOD statistics: not written (fit_ood needs at least 2 training images)" in text
