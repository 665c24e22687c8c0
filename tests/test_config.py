import json

import pytest
import yaml

from cxr_train.config import ConfigError, parse_args, resolved_config


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(p)


def test_yaml_defaults_and_cli_override(tmp_path):
    cfg = write(tmp_path, {"dataset_name": "some/dataset", "learning_rate": "3e-5", "strategy": "lora",
                           "num_train_epochs": 3, "output_dir": str(tmp_path / "o"), "bf16": False})
    m, d, t = parse_args(["--config", cfg, "--num_train_epochs", "7", "--strategy", "partial"])
    assert d.dataset_name == "some/dataset"
    assert t.learning_rate == pytest.approx(3e-5) and isinstance(t.learning_rate, float)  # YAML string converted
    assert t.num_train_epochs == 7                       # CLI wins over YAML
    assert m.strategy == "partial"
    assert t.metric_for_best_model == "roc_auc"          # project default kept
    assert t.remove_unused_columns is False


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted(Path("hub_configs").glob("*.yaml"))
    assert len(configs) >= 4
    for c in configs:
        if c.name.startswith("space"):
            continue
        m, d, t = parse_args(["--config", str(c)])
        assert d.dataset_name and t.output_dir


def test_unknown_yaml_key_named(tmp_path):
    cfg = write(tmp_path, {"dataset_name": "x/y", "learnin_rate": 0.1})
    with pytest.raises(ConfigError, match=r"learnin_rate \(did you mean learning_rate\?\)"):
        parse_args(["--config", cfg])


def test_unknown_cli_flag_named():
    with pytest.raises(ConfigError, match="--no_such_flag") as e:
        parse_args(["--dataset_name", "x/y", "--no_such_flag", "1"])
    assert "did you mean" not in str(e.value)                # nothing near it: no guess
    with pytest.raises(ConfigError, match=r"unknown argument: --stratgy \(did you mean --strategy\?\)"):
        parse_args(["--dataset_name", "x/y", "--stratgy", "full"])
    with pytest.raises(ConfigError, match=r"did you mean --config\?"):
        parse_args(["--dataset_name", "x/y", "--confg", "a.yaml"])


def test_bad_value_is_one_config_error(capsys):
    """argparse's own message (no usage dump, no SystemExit), as one ConfigError."""
    with pytest.raises(ConfigError, match="--num_train_epochs.*invalid float value: 'abc'"):
        parse_args(["--dataset_name", "x/y", "--num_train_epochs", "abc"])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_unknown_strategy_rejected():
    with pytest.raises(ConfigError, match="unknown strategy 'half'"):
        parse_args(["--dataset_name", "x/y", "--strategy", "half"])


def test_missing_dataset_and_config_file(tmp_path):
    with pytest.raises(ConfigError, match="dataset_name is required"):
        parse_args([])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="mapping"):
        parse_args(["--config", write(tmp_path, "- a\n- b\n")])


def test_push_needs_repo_id():
    with pytest.raises(ConfigError, match="hub_model_id"):
        parse_args(["--dataset_name", "x/y", "--push_to_hub", "True"])


def test_resolved_config_round_trips(tmp_path):
    m, d, t = parse_args(["--dataset_name", "x/y", "--output_dir", str(tmp_path), "--lora_r", "4"])
    cfg = resolved_config(m, d, t)
    json.dumps(cfg)
    assert cfg["lora_r"] == 4 and cfg["dataset_name"] == "x/y" and cfg["output_dir"] == str(tmp_path)
    assert "hub_token" not in cfg
    # the saved config re-parses to the same values
    m2, d2, t2 = parse_args(["--config", write(tmp_path, cfg)])
    assert (m2, d2) == (m, d)
    assert resolved_config(m2, d2, t2) == cfg


def test_help_prints_fields(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--strategy" in out and "--learning_rate" in out
    # --config first, then the project's own fields, then TrainingArguments' ~150
    order = [out.index(s) for s in ("--config", "--model_name_or_path", "--dataset_name", "--precision",
                                    "training (transformers.TrainingArguments", "--learning_rate")]
    assert order == sorted(order)
    assert out.startswith("usage: train_hf.py [--config FILE.yaml]")


# ------------------------------------------------------------------ --streaming (issue #28 item 3)

@pytest.mark.parametrize("extra, named", [
    (["--cv_folds", "3"], "--cv_folds 3: K-fold cross-validation"),
    (["--max_samples_per_class", "10"], "--max_samples_per_class 10"),
    (["--acquisition_augment", "0.5"], "--acquisition_augment 0.5"),
    (["--data_cache", "none"], "--data_cache none"),
    (["--label_from_filename", "kermany3"], "--label_from_filename kermany3"),
    (["--label_columns", "A", "B"], "multi-label (one column per finding) streaming is not supported yet"),
    (["--uncertain_labels", "ones"], "multi-label streaming is not supported yet"),
    (["--streaming_shuffle_buffer", "0"], "streaming_shuffle_buffer must be at least 1"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "needs --max_steps or a positive --num_train_epochs"),
])
def test_streaming_conflicts_are_named(extra, named):
    with pytest.raises(ConfigError, match="streaming") as e:
        parse_args(["--dataset_name", "x/y", "--streaming", "true", *extra])
    assert named in str(e.value)


def test_streaming_fields_and_run_config(tmp_path):
    m, d, t = parse_args(["--dataset_name", "x/y", "--streaming", "true", "--streaming_shuffle_buffer", "64",
                          "--max_train_samples", "500", "--image_column", "film", "--label_column", "finding"])
    assert d.streaming is True and d.streaming_shuffle_buffer == 64 and d.max_train_samples == 500
    cfg = resolved_config(m, d, t)
    assert cfg["streaming"] is True and cfg["streaming_shuffle_buffer"] == 64
    m2, d2, _ = parse_args(["--config", write(tmp_path, cfg)])                # run_config.yaml passes back
    assert d2.streaming is True and d2.streaming_shuffle_buffer == 64
    # a loaded (non-streaming) run's run_config.yaml has no streaming keys: it is what it was before them
    m, d, t = parse_args(["--dataset_name", "x/y"])
    assert d.streaming is False
    assert not {"streaming", "streaming_shuffle_buffer"} & set(resolved_config(m, d, t))
    # the same options stay allowed without --streaming
    parse_args(["--dataset_name", "x/y", "--cv_folds", "3", "--data_cache", "none"])
