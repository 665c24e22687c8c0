"""Watching a run: --report_to reaches the Trainer from the command line and from YAML, a missing
tracker is named with the extra that installs it, and a 2-step training logs every clinical
metric at each evaluation to TensorBoard's event files and to a local, offline trackio project."""

from __future__ import annotations

import sys

import pytest
import yaml

import train_hf
from cxr_train.config import ConfigError, parse_args, resolved_config
from cxr_train.tracking import TRACKERS, check_report_to
from tests.helpers import base_args

CLINICAL = ("roc_auc", "sensitivity", "specificity", "brier", "ece")
PER_EVAL = ("--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "no",
            "--load_best_model_at_end", "False", "--ood_fit", "false")   # 2 steps: 2 evaluations


def _args(tmp_path, *extra):
    return parse_args(["--dataset_name", str(tmp_path), "--output_dir", str(tmp_path / "out"), *extra])


# ------------------------------------------------------------------ the flag reaches the Trainer

@pytest.mark.parametrize("tracker", ["tensorboard", "trackio"])
def test_report_to_passes_through_from_the_command_line_and_yaml(tmp_path, tracker):
    assert _args(tmp_path)[2].report_to == []                           # default: none
    model_args, data_args, training_args = _args(tmp_path, "--report_to", tracker)
    assert training_args.report_to == [tracker]
    saved = resolved_config(model_args, data_args, training_args)
    assert saved["report_to"] == [tracker]                              # run_config.yaml records it
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(saved))                            # ... and gives it back
    assert _args(tmp_path, "--config", str(config))[2].report_to == [tracker]
    config.write_text(yaml.safe_dump({"report_to": tracker}))           # a hand-written YAML
    assert _args(tmp_path, "--config", str(config))[2].report_to == [tracker]
    assert _args(tmp_path, "--config", str(config), "--report_to", "none")[2].report_to == []   # the flag wins


# ------------------------------------------------------------------ a missing tracker names its extra

@pytest.mark.parametrize("tracker", sorted(TRACKERS))
def test_a_missing_tracker_names_the_extra_that_installs_it(monkeypatch, tracker):
    module, extra = TRACKERS[tracker]
    monkeypatch.setitem(sys.modules, module, None)        # unimportable, as without the extra
    for report_to in (tracker, [tracker], ["none", tracker]):
        with pytest.raises(ConfigError, match=rf"--report_to {tracker} needs {module}.*"
                                              rf"pip install 'cxr-transfer\[{extra}\]'"):
            check_report_to(report_to)


def test_installed_trackers_and_other_choices_pass():
    for report_to in ("none", [], None, "all", ["wandb"]):
        check_report_to(report_to)                         # transformers' own integrations are its business
    for tracker, (module, _) in TRACKERS.items():
        pytest.importorskip(module)
        check_report_to([tracker])


def test_every_extra_named_exists():
    import tomllib

    from tests.helpers import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for tracker, (module, extra) in TRACKERS.items():
        assert any(r.startswith(module) for r in extras[extra]), (tracker, extra)
        assert extra in extras["dev"][0]                   # the tests' install has every tracker


# ------------------------------------------------------------------ real 2-step trainings

@pytest.mark.slow
def test_tensorboard_gets_the_clinical_metrics_of_every_evaluation(kermany_folder, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    out = tmp_path / "watched"
    assert train_hf.main(base_args(kermany_folder, out, "--report_to", "tensorboard", *PER_EVAL)) == 0
    events = sorted((out / "runs").rglob("events.out.tfevents*"))
    assert events
    scalars: dict[str, list] = {}
    for path in events:
        acc = event_accumulator.EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    assert "train/loss" in scalars
    for metric in CLINICAL:
        steps = sorted(e.step for e in scalars[f"eval/{metric}"])
        assert steps[:2] == [1, 2], (metric, steps)                     # one point per evaluation
        assert all(0.0 <= e.value <= 1.0 for e in scalars[f"eval/{metric}"])


@pytest.mark.slow
def test_trackio_logs_locally_and_offline(kermany_folder, tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))           # read when trackio is imported ...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    import trackio
    for name, module in list(sys.modules.items()):          # ... or already was: its modules keep the path
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", store)
    from trackio.sqlite_storage import SQLiteStorage

    out = tmp_path / "watched"
    assert train_hf.main(base_args(kermany_folder, out, "--report_to", "trackio", "--project", "cxr-test",
                                   "--run_name", "two-steps", *PER_EVAL)) == 0
    if trackio.context_vars.current_run.get() is not None:   # the final scoring's logs re-open the run
        trackio.finish()
    assert (store / "cxr-test.db").is_file()
    assert "cxr-test" in SQLiteStorage.get_projects() and "two-steps" in SQLiteStorage.get_runs("cxr-test")
    logs = SQLiteStorage.get_logs("cxr-test", "two-steps")
    for metric in CLINICAL:
        points = [(r["train/global_step"], r[f"eval/{metric}"]) for r in logs if f"eval/{metric}" in r]
        assert [s for s, _ in points][:2] == [1, 2], (metric, points)    # one point per evaluation
        assert all(0.0 <= v <= 1.0 for _, v in points)
    assert any("train/loss" in r for r in logs)
