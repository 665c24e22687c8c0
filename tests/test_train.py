"""End-to-end: train_hf.main() on tiny synthetic data, offline, on CPU."""

import json
import os
import subprocess
import sys

import pytest
import yaml

import train_hf
from cxr.precision import resolve_bf16
from tests.helpers import ROOT, base_args, write_kermany_folder

# Tiers on the tests themselves: the fast tier keeps one real 2-step training (the session's
# trained_folder: hub-ready folder, card metadata) and the checks made before training starts;
# the other trainings, subprocesses and the accelerate launch are slow.


def test_folder_is_hub_ready(trained_folder):
    files = {p.name for p in trained_folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "eval_results.json",
            "test_results.json", "run_config.yaml"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    cfg = json.loads((trained_folder / "config.json").read_text())
    assert cfg["id2label"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    op = cfg["cxr_operating_point"]
    assert 0.0 <= op["threshold"] <= 1.0 and op["temperature"] > 0 and op["positive_label"] == "PNEUMONIA"
    # the precision its scores were computed in, which the Predictor's "auto" follows
    precision = yaml.safe_load((trained_folder / "run_config.yaml").read_text())["precision"]
    assert op["scored_in"] == ("bf16" if resolve_bf16(precision) else "fp32")
    ev = json.loads((trained_folder / "eval_results.json").read_text())
    te = json.loads((trained_folder / "test_results.json").read_text())
    for key in ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "npv", "f1", "pr_auc"):
        assert f"eval_{key}" in ev and f"test_{key}" in te
    assert te["test_n_samples"] == 48                     # the test split, scored only with --do_predict
    assert set(te["test_ci"]) >= {"roc_auc", "sensitivity", "specificity"}
    (tn, fp), (fn, tp) = te["test_confusion_matrix"]
    assert tn + fp == 24 and fn + tp == 24


def test_model_card_metadata_parses(trained_folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_folder / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "transformers"
    assert "medical" in card.data.tags
    metrics = {(r.dataset_split, r.metric_type) for r in card.data.eval_results}
    assert {("validation", "roc_auc"), ("test", "sensitivity"), ("test", "specificity")} <= metrics
    assert "Not a medical device" in card.text
    assert "python train_hf.py" in card.text


@pytest.mark.slow
def test_pipeline_loads_in_fresh_process_without_project_code(trained_folder, kermany_folder):
    image = next((kermany_folder / "test" / "PNEUMONIA").iterdir())
    code = (
        "import json, sys\n"
        "from transformers import pipeline\n"
        f"clf = pipeline('image-classification', model={str(trained_folder)!r})\n"
        f"res = clf({str(image)!r})\n"
        "assert not any(m == 'cxr' or m.startswith('cxr.') for m in sys.modules), 'project code imported'\n"
        "print(json.dumps(res))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["label"] for r in res} == {"NORMAL", "PNEUMONIA"}
    assert sum(r["score"] for r in res) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_lora_run_exports_merged_and_adapter(kermany_folder, tmp_path):
    from transformers import pipeline

    out = tmp_path / "lora"
    assert train_hf.main(base_args(kermany_folder, out, "--model_name_or_path", "tiny-vit-scratch",
                                   "--strategy", "lora", "--lora_r", "4")) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("lora" in k for k in f.keys())
    res = pipeline("image-classification", model=str(out))(str(next((kermany_folder / "test" / "NORMAL").iterdir())))
    assert {r["label"] for r in res} == {"NORMAL", "PNEUMONIA"}


@pytest.mark.slow
def test_resume_after_kill(kermany_folder, tmp_path, monkeypatch):
    from cxr_train import training

    out = tmp_path / "resume"
    args = base_args(kermany_folder, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                     "--eval_strategy", "steps", "--eval_steps", "2")
    calls = {"n": 0}
    original = training.WeightedCrossEntropy.__call__

    def dying(self, *a, **k):
        import torch

        calls["n"] += torch.is_grad_enabled()  # count training steps, not evaluation batches
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill during step 3")
        return original(self, *a, **k)

    monkeypatch.setattr(training.WeightedCrossEntropy, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        train_hf.main(args)
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert not (out / "checkpoint-4").exists()
    before = (out / "checkpoint-2" / "model.safetensors").read_bytes()

    calls["n"] = -100  # no more kills
    assert train_hf.main(args + ["--resume_from_checkpoint", "True"]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert calls["n"] == -100 + 2                          # only steps 3 and 4 were run again
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() == before  # nothing lost
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_push_failure_is_clear_and_keeps_folder(kermany_folder, tmp_path, capsys, monkeypatch):
    """The early check passed (as with a token and a network), then the upload fails."""
    monkeypatch.setattr(train_hf, "check_push_access", lambda repo_id, token=None: repo_id)
    out = tmp_path / "push"
    rc = train_hf.main(base_args(kermany_folder, out, "--push_to_hub", "True", "--hub_model_id", "someone/cxr-test",
                                 "--save_strategy", "no", "--load_best_model_at_end", "False"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "push to someone/cxr-test failed" in err and "local folder" in err
    assert "Traceback" not in err
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--dataset_name", "/nonexistent/folder"], "dataset folder not found"),
    (["--strategy", "everything"], "unknown strategy 'everything'"),
    (["--model_name_or_path", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
    (["--bogus_flag", "1"], "unknown argument: --bogus_flag"),
    (["--learnin_rate", "1"], "unknown argument: --learnin_rate (did you mean --learning_rate?)"),
])
def test_bad_input_rejected_before_training(kermany_folder, tmp_path, capsys, extra, message):
    rc = train_hf.main(base_args(kermany_folder, tmp_path / "bad", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert err.count("error:") == 1                          # printed once
    assert not (tmp_path / "bad" / "model.safetensors").exists()


@pytest.mark.slow
def test_accelerate_two_cpu_processes(kermany_folder, tmp_path):
    out = tmp_path / "ddp"
    # accelerate's torch.distributed launcher; on a CPU-only machine it runs DDP over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train_hf.py"), *base_args(kermany_folder, out, "--precision", "fp32")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # two processes x 4 images per device: the card records a global batch of 8
    assert "| batch size | 8 |" in (out / "README.md").read_text()


@pytest.mark.slow
def test_cv_folds_trains_k_models_and_fits_the_operating_point_out_of_fold(kermany_folder, tmp_path):
    """--cv_folds 5 on a small subset: every training image scored once by a model that never saw its
    patient; per-fold + mean ± sd metrics; threshold/temperature fitted on those scores."""
    from cxr_train.data import patient_id_from_filename

    out = tmp_path / "cv"
    args = base_args(kermany_folder, out, "--cv_folds", "5", "--save_strategy", "no",
                     "--load_best_model_at_end", "False", "--external_dataset", str(kermany_folder / "test"))
    assert train_hf.main(args) == 0
    oof = json.loads((out / "oof_scores.json").read_text())
    n_train_pool = sum(1 for _ in (kermany_folder / "train").glob("*/*"))
    assert len(oof["scores"]) == len(oof["files"]) == n_train_pool        # every training image, once
    assert sorted(set(oof["fold"])) == [0, 1, 2, 3, 4]
    fold_of_patient = {}
    for f, k in zip(oof["files"], oof["fold"]):
        pid = patient_id_from_filename(f)
        assert fold_of_patient.setdefault(pid, k) == k                      # a patient lives in one fold
    cv = json.loads((out / "cv_results.json").read_text())
    assert cv["k"] == 5 and len(cv["per_fold"]) == 5
    aucs = [f["roc_auc"] for f in cv["per_fold"]]
    assert abs(cv["summary"]["roc_auc"]["mean"] - sum(aucs) / 5) < 1e-9
    assert cv["pooled"]["n_samples"] == n_train_pool
    cfg = json.loads((out / "config.json").read_text())
    op = cfg["cxr_operating_point"]
    assert op["fitted_on"].startswith("out-of-fold scores (5 folds") and op["n_fit"] == n_train_pool
    assert op["policy"] in ("equal_error", "default")
    assert cfg["cxr_training"]["cv_metrics"]["k"] == 5
    assert cfg["cxr_training"]["external_metrics"]["n"] == 48
    for i in range(5):                                                       # fold weights kept, checkpoints not
        assert (out / "cv" / f"fold{i}" / "model" / "model.safetensors").is_file()
        assert not list((out / "cv" / f"fold{i}").glob("checkpoint-*"))
    card = (out / "README.md").read_text()
    assert "5-fold cross-validation" in card and "mean ± sd" in card
    assert "External check" in card and "is **unknown**" in card
    assert "Warning: not a usable model" in card                           # 2 steps: a smoke run, said so
    cv_seconds = sum(json.loads((out / "cv" / f"fold{i}" / "train_results.json").read_text())["train_runtime"]
                     for i in range(5))
    assert cv["train_seconds"] >= 0.9 * cv_seconds > 0                      # the folds' own training time
    assert f"(+ {cv['train_seconds'] / 60:.1f} min for 5-fold CV)" in card  # the card quotes that time

    # the robustness-lever study re-scores every image with the fold model that never saw it
    from experiments import oof_levers

    levers = tmp_path / "levers"
    assert oof_levers.main(["--run", str(out), "--data", str(kermany_folder / "train"), "--out", str(levers),
                            "--external", str(kermany_folder / "test"),
                            "--variants", "base", "res192", "tta_shift"]) == 0
    res = json.loads((levers / "results.json").read_text())
    assert set(res["variants"]) == {"base", "res192", "tta_shift"}
    assert all(m["n"] == n_train_pool and 0 <= m["roc_auc"] <= 1 for m in res["variants"].values())
    assert res["base_reproduces_saved_auroc"] < 0.05     # same fold models, same images (fp32 vs the run's precision)
    assert res["external"]["fold_ensemble"]["n"] == 48 and len(res["external"]["single_folds"]) == 5
    assert (levers / "results.md").read_text().count("\n| ") == 3


def test_cv_folds_bad_values_are_rejected_before_training(kermany_folder, tmp_path):
    assert train_hf.main(base_args(kermany_folder, tmp_path / "a", "--cv_folds", "1")) == 2
    assert train_hf.main(base_args(kermany_folder, tmp_path / "b", "--threshold_policy", "median")) == 2
    assert train_hf.main(base_args(kermany_folder, tmp_path / "c", "--external_dataset", str(tmp_path / "nope"))) == 2
    assert not (tmp_path / "a" / "model.safetensors").exists()


@pytest.mark.slow
def test_training_writes_ood_statistics_the_predictor_uses(trained_folder, kermany_folder):
    """A 2-step cxr-train writes ood.safetensors (fitted on its own training films, threshold
    on its validation films) and the Predictor loaded from the folder scores with it."""
    from cxr.inference import Predictor
    from cxr.ood import OODScorer

    saved = OODScorer.from_folder(trained_folder)
    facts = json.loads((trained_folder / "ood_fit.json").read_text())
    assert facts["n_train"] + facts["n_val"] == 48 and facts["n_val"] == 12       # the run's own split
    assert facts["validation"] == "the run's own validation split" and facts["held_out_non_xray_n"] > 0
    p = Predictor.from_pretrained(trained_folder, precision="fp32")
    assert p.ood is not None and p.ood.threshold == pytest.approx(saved.threshold) == pytest.approx(facts["threshold"],
                                                                                                   abs=1e-3)
    r = p.predict(next((kermany_folder / "test" / "NORMAL").iterdir()))
    assert r.ood_score is not None and r.ood_score > 0 and r.ood_threshold == pytest.approx(saved.threshold)


@pytest.mark.slow
def test_ood_fit_false_skips_it_and_the_summary_says_what_next(kermany_folder, tmp_path, capsys):
    from cxr.inference import Predictor

    out = tmp_path / "no-ood"
    assert train_hf.main(base_args(kermany_folder, out, "--ood_fit", "false")) == 0
    assert not (out / "ood.safetensors").exists() and not (out / "ood_fit.json").exists()
    assert Predictor.from_pretrained(out, precision="fp32").ood is None
    summary = capsys.readouterr().out
    assert f"Model folder: {out.resolve()}" in summary
    assert "validation, where the operating point was fitted (12 films): AUROC" in summary
    assert "OOD statistics: not written (--ood_fit false)" in summary
    for command in (f"cxr-predict --model {out.resolve()} film.jpeg", f"cxr-app --model {out.resolve()}",
                    f"cxr-push --folder {out.resolve()} --repo_id"):
        assert command in summary
    assert yaml.safe_load((out / "run_config.yaml").read_text())["ood_fit"] is False


@pytest.mark.slow
def test_a_run_can_be_watched_in_tensorboard(kermany_folder, tmp_path):
    """--report_to tensorboard (the track extra): the loss and every clinical metric per evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "watched"
    assert train_hf.main(base_args(kermany_folder, out, "--report_to", "tensorboard", "--ood_fit", "false")) == 0
    events = sorted((out / "runs").rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/roc_auc", "eval/sensitivity", "eval/specificity", "eval/brier", "eval/ece"} <= tags


def test_cv_run_checks_the_shipped_models_own_validation_films_before_writing(tmp_path, capsys):
    """With --cv_folds the folds come from the pool, but the shipped model also reads the dataset's
    own validation split: an unreadable film there is named before anything is written."""
    root = write_kermany_folder(tmp_path / "data", n_patients=8, size=40, splits=("train", "test"))
    (root / "test").rename(root / "val")                 # its own validation split, other patients
    bad = next((root / "val" / "NORMAL").iterdir())
    bad.write_bytes(b"this is not an image")
    out = tmp_path / "out"
    assert train_hf.main(base_args(root, out, "--cv_folds", "2")) == 2
    captured = capsys.readouterr()
    assert f"validation/{bad.name}" in captured.err     # named by the up-front check ...
    assert "'loss'" not in captured.out and not out.exists()    # ... before any fold trained or anything was written
