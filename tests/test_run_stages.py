"""One run, one shape (issue #27 items 1 and 3): the argument groups and their one declaration of
each choice, and a 2-step training whose folder keeps its contract (config.json's serving keys,
the result files, the card's facts of the run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from cxr.operating_point import POLICIES
from cxr.precision import PRECISIONS
from cxr_train.config import (
    ConfigError, DataArguments, EvaluationArguments, ExportArguments, ExtraTrainingArguments, help_parser,
    parse_run_args,
)
from tests.helpers import ROOT, base_args

EVALUATION = {"cv_folds", "threshold_policy", "min_sensitivity"}


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("config", sorted((ROOT / "hub_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_into_its_groups(config):
    args = parse_run_args(["--config", str(config)])
    raw = yaml.safe_load(config.read_text())
    for key, value in raw.items():       # every YAML key lands in one group, with the YAML's value
        group = next(g for g in (args.model, args.data, args.evaluation, args.export, args.extra, args.training)
                     if key in {f.name for f in dataclasses.fields(g)})
        assert same(getattr(group, key), value), key


def same(got, value) -> bool:
    """A parsed value equals the YAML's (a single value for a list field; an enum by its value; 3e-5 as a float)."""
    got = getattr(got, "value", got)
    if isinstance(got, list) and not isinstance(value, list):
        value = [value]
    if isinstance(got, list):
        return len(got) == len(value) and all(same(g, v) for g, v in zip(got, value))
    if isinstance(got, float) and not isinstance(value, bool):
        return got == pytest.approx(float(value))
    return got == value or str(got) == str(value)


def test_evaluation_is_apart_from_data_and_flags_keep_their_names(tmp_path):
    assert EVALUATION == names(EvaluationArguments) and not EVALUATION & names(DataArguments)
    assert not ({"precision", "early_stopping_patience", "ood_fit", "ood_max_train", "hub_private"}
                & names(DataArguments))
    args = parse_run_args(["--dataset_name", "x/y", "--output_dir", str(tmp_path / "o"), "--cv_folds", "3",
                           "--threshold_policy", "youden", "--min_sensitivity", "0.9", "--ood_fit", "false",
                           "--hub_private", "true", "--precision", "fp32", "--early_stopping_patience", "2"])
    assert (args.evaluation.cv_folds, args.evaluation.threshold_policy, args.evaluation.min_sensitivity) == (3, "youden", 0.9)
    assert args.export.ood_fit is False and args.export.hub_private is True
    assert args.extra.precision == "fp32" and args.extra.early_stopping_patience == 2 and args.training.bf16 is False
    # run_config.yaml round-trips through --config, every group included
    cfg = args.resolved()
    assert {"cv_folds", "threshold_policy", "ood_fit", "precision", "dataset_name", "learning_rate"} <= set(cfg)
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    again = parse_run_args(["--config", str(path)])
    assert again.resolved() == cfg
    assert (again.evaluation, again.export, again.extra, again.data) == (args.evaluation, args.export, args.extra,
                                                                         args.data)


def test_each_choice_is_declared_once():
    from cxr_train.training import choose_threshold

    help_text = help_parser().format_help()
    for policy in POLICIES:       # the help names every declared policy, and each one picks a threshold
        assert policy in help_text
        t = choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], policy=policy, fitted_on="t", min_sensitivity=0.9)
        assert 0 < t["threshold"] < 1
    with pytest.raises(ValueError, match="equal_error"):
        choose_threshold([0, 1], [0.1, 0.9], policy="median", fitted_on="t", min_sensitivity=0.9)
    with pytest.raises(ConfigError, match="choose " + " or ".join([", ".join(PRECISIONS[:-1]), PRECISIONS[-1]])):
        parse_run_args(["--dataset_name", "x/y", "--precision", "fp16"])
    assert ExtraTrainingArguments().precision in PRECISIONS and ExportArguments().ood_fit is True


def test_the_library_does_not_import_the_entry_script():
    for f in (ROOT / "cxr_train").glob("*.py"):
        if f.name == "soup.py":      # cxr-soup finishes a soup by running the cxr-train command itself
            continue
        assert "train_hf" not in "".join(l for l in f.read_text().splitlines(True) if "import" in l), f.name


@pytest.mark.slow
def test_a_two_step_run_writes_the_folder_contract(kermany_folder, tmp_path):
    """One 2-step training with CV (2 folds) and an external folder: the files, config.json's serving
    keys and the card's run facts, each from the stage that owns it."""
    import train_hf
    from cxr.facts import SCHEMA
    from cxr.precision import resolve_bf16

    out = tmp_path / "run"
    argv = base_args(kermany_folder, out, "--cv_folds", "2", "--save_strategy", "no", "--load_best_model_at_end",
                     "False", "--external_dataset", str(kermany_folder / "test"), "--ood_fit", "false",
                     "--precision", "fp32")
    result = train_hf.run(argv)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "run_config.yaml", "eval_results.json",
            "eval_scores.json", "cv_results.json", "oof_scores.json", "external_results.json",
            "roc_validation.png", "calibration_validation.png"} <= files
    cfg = json.loads((out / "config.json").read_text())
    op, facts = cfg["cxr_operating_point"], cfg["cxr_training"]
    assert op["scored_in"] == "fp32" and op["fitted_on"].startswith("out-of-fold scores (2 folds")
    assert facts["schema"] == SCHEMA and facts["strategy"] == "full" and facts["cv_metrics"]["k"] == 2
    assert facts["external_metrics"]["n"] == 48 and facts["dataset"] == Path(kermany_folder).name
    assert facts["base_model"] == "none: tiny-resnet-scratch preset, random init"
    # each fold trained in its own folder with its own copy of the arguments; the run's own folder untouched
    for i in range(2):
        assert (out / "cv" / f"fold{i}" / "trainer_state.json").is_file()
    assert yaml.safe_load((out / "run_config.yaml").read_text())["output_dir"] == str(out)
    assert result["output_dir"] == str(out) and result["operating_point"].scored_in == "fp32"
    card = (out / "README.md").read_text()
    state = json.loads((out / "trainer_state.json").read_text())
    assert f"| epochs / steps | {round(state['epoch'], 2)} / {state['global_step']} |" in card
    assert "| precision | fp32 |" in card and "| batch size | 4 |" in card
    assert "python train_hf.py --model_name_or_path tiny-resnet-scratch" in card and "--cv_folds 2" in card
    assert "roc_validation.png" in card and "5-fold" not in card and "2-fold cross-validation" in card
    assert not resolve_bf16("fp32")
