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


# ------------------------------------------------------------------ progress bars outside the Trainer

def test_bars_show_on_a_terminal_or_when_asked_and_never_with_cxr_progress_0(monkeypatch):
    from cxr_train import progress

    class Terminal:
        def isatty(self):
            return True

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress.shown()                            # pytest captures stderr: not a terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress.shown() and not progress.shown(enabled=False)
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.shown()
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.shown() and not progress.shown(enabled=False)


def test_chunks_come_in_order_and_the_bar_counts_items(monkeypatch, capsys):
    from cxr_train.progress import ENV, in_chunks

    monkeypatch.setenv(ENV, "1")
    assert [list(c) for c in in_chunks(list(range(7)), 3, desc="features", unit="film")] == [[0, 1, 2], [3, 4, 5], [6]]
    err = capsys.readouterr().err
    assert "features" in err and "7/7" in err and "film" in err
    monkeypatch.setenv(ENV, "0")
    assert [list(c) for c in in_chunks(list(range(7)), 3, desc="features")] == [[0, 1, 2], [3, 4, 5], [6]]
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError):
        next(in_chunks([1], 0))


def test_predict_batch_with_a_bar_gives_the_same_batches_and_results(monkeypatch, capsys):
    import torch

    from cxr_train.progress import ENV, predict_batch

    class Recorder:
        def __init__(self):
            self.batches = []

        def predict_batch(self, sources, batch_size=32):   # the Predictor's: batches of batch_size, in order
            self.batches += [list(sources[i:i + batch_size]) for i in range(0, len(sources), batch_size)]
            return [f"result of {s}" for s in sources]

    monkeypatch.setenv(ENV, "1")
    films = [f"film{i}.png" for i in range(23)]
    direct, with_bar = Recorder(), Recorder()
    assert predict_batch(with_bar, films, batch_size=4, desc="scoring") == direct.predict_batch(films, batch_size=4)
    assert with_bar.batches == direct.batches                              # slices are whole batches
    assert "23/23" in capsys.readouterr().err
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert predict_batch(Recorder(), films, batch_size=4) == [f"result of {f}" for f in films]


def test_ood_feature_passes_count_images(monkeypatch, capsys):
    import numpy as np

    from cxr_train import ood_fit

    seen = []
    monkeypatch.setattr(ood_fit, "extract_features",
                        lambda model, processor, images, batch_size: seen.append(len(images)) or np.ones((len(images), 2)))
    monkeypatch.setenv("CXR_PROGRESS", "1")
    images = [np.zeros((8, 8, 3), np.uint8)] * 5
    assert ood_fit.compute_features(None, None, images, batch_size=2, desc="OOD fit: training films").shape == (5, 2)
    assert seen == [2, 2, 1]
    err = capsys.readouterr().err
    assert "OOD fit: training films" in err and "5/5" in err and "image" in err
    ood_fit.compute_features(None, None, images, batch_size=2, desc=None)    # no name: no bar
    assert capsys.readouterr().err == ""


def test_cxr_train_refuses_a_missing_tracker_before_writing_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)          # as without the `track` extra
    out = tmp_path / "out"
    rc = train_hf.main(["--dataset_name", str(tmp_path), "--output_dir", str(out), "--report_to", "tensorboard"])
    assert rc == 2
    assert "pip install 'cxr-transfer[track]'" in capsys.readouterr().err
    assert not out.exists()                                         # nothing written, nothing trained
