"""Issue 12: crash-safe checkpoints, no remote code / no pickle, small robustness items.

Everything offline on CPU; every hostile input is built by the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import train_hf
from cxr_train.checkpointing import find_resume_checkpoint, incomplete_reason
from cxr_train.hub import METRIC_ROWS
from tests.helpers import ROOT, base_args, subprocess_env

# ------------------------------------------------------------------ crash-safe checkpoints

# Runs train_hf.main in a real subprocess and SIGKILLs it at a chosen point of the save of
# checkpoint-<step>: the files on disk are exactly those a kill at that moment leaves.
KILLER = textwrap.dedent('''
    import os, signal, sys
    import transformers.trainer as T
    from transformers.trainer_callback import TrainerState

    point, step = sys.argv[1], int(sys.argv[2])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def at(self):
        return self.state.global_step == step

    if point == "mid_weights":            # weights file half written
        orig_save_model = T.Trainer.save_model
        def save_model(self, output_dir=None, _internal_call=False):
            orig_save_model(self, output_dir, _internal_call)
            if _internal_call and at(self):
                f = os.path.join(output_dir, "model.safetensors")
                os.truncate(f, os.path.getsize(f) // 2)
                die()
        T.Trainer.save_model = save_model
    elif point == "before_optimizer":     # weights written, optimizer not yet
        orig_opt = T.Trainer._save_optimizer_and_scheduler
        def save_opt(self, output_dir):
            if at(self):
                die()
            orig_opt(self, output_dir)
        T.Trainer._save_optimizer_and_scheduler = save_opt
    elif point == "mid_state":            # trainer_state.json half written (it is written last)
        orig_json = TrainerState.save_to_json
        def save_to_json(self, json_path):
            if self.global_step == step and "checkpoint-" in json_path:
                orig_json(self, json_path)
                os.truncate(json_path, os.path.getsize(json_path) // 2)
                die()
            orig_json(self, json_path)
        TrainerState.save_to_json = save_to_json

    import train_hf
    sys.exit(train_hf.main(sys.argv[3:]))
''')

MAX_STEPS = 6


def _run_args(data, out):
    return base_args(data, out, "--max_steps", str(MAX_STEPS), "--save_strategy", "steps", "--save_steps", "2",
                     "--eval_strategy", "no", "--load_best_model_at_end", "False", "--save_total_limit", "2",
                     "--augment", "False")


def _env():
    return subprocess_env(OMP_NUM_THREADS="1")


def _check_resumed(out: Path) -> None:
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == list(range(1, MAX_STEPS + 1))          # the step count continued, no step twice
    assert incomplete_reason(out / f"checkpoint-{MAX_STEPS}") is None
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow   # a real training in a subprocess, killed and resumed
@pytest.mark.parametrize("point", ["mid_weights", "before_optimizer", "mid_state", "external"])
def test_killed_during_a_save_resumes_to_the_same_final_step(kermany_folder, tmp_path, point):
    """SIGKILL while checkpoint-4 is being written; then --resume_from_checkpoint true.
    Before: every resume crashed (FileNotFoundError trainer_state.json / Can't find a valid
    checkpoint), and every rerun the same way."""
    out = tmp_path / "run"
    args = [str(a) for a in _run_args(kermany_folder, out)]
    if point == "external":   # a real kill from outside, as soon as checkpoint-4/ appears
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_hf.py"), *args], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-4").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
    else:
        script = tmp_path / "killer.py"
        script.write_text(KILLER.format(root=str(ROOT)))
        rc = subprocess.run([sys.executable, str(script), point, "4", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300).returncode
    assert rc == -signal.SIGKILL
    assert (out / "checkpoint-4").is_dir() or point == "external"
    assert incomplete_reason(out / "checkpoint-2") is None
    if point != "external":
        assert incomplete_reason(out / "checkpoint-4") is not None

    assert train_hf.main(args + ["--resume_from_checkpoint", "true"]) == 0
    _check_resumed(out)
    assert incomplete_reason(out / "checkpoint-4") is None   # rewritten, complete


def test_incomplete_checkpoints_are_ignored_and_removed(tmp_path, caplog):
    good = tmp_path / "checkpoint-2"
    good.mkdir()
    (tmp_path / "checkpoint-3").mkdir()                       # created, nothing written yet
    assert find_resume_checkpoint(tmp_path, clean=False) is None
    assert incomplete_reason(tmp_path / "checkpoint-3") == "no trainer_state.json"
    partial = tmp_path / "checkpoint-5"
    partial.mkdir()
    (partial / "trainer_state.json").write_text('{"global_step": 5, "log_hi')
    assert "truncated" in incomplete_reason(partial)
    assert find_resume_checkpoint(tmp_path) is None
    assert not partial.exists() and not (tmp_path / "checkpoint-3").exists()


def test_resume_from_a_named_incomplete_checkpoint_is_a_clear_error(kermany_folder, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    rc = train_hf.main(base_args(kermany_folder, out, "--resume_from_checkpoint", str(out / "checkpoint-3")))
    err = capsys.readouterr().err
    assert rc == 2 and "incomplete checkpoint" in err and "Traceback" not in err


def test_output_dir_that_is_a_file_is_a_clear_error(kermany_folder, tmp_path, capsys):
    target = tmp_path / "not_a_folder"
    target.write_text("x")
    rc = train_hf.main(base_args(kermany_folder, target))
    err = capsys.readouterr().err
    assert rc == 2 and "is not a folder" in err and "Traceback" not in err
    rc = train_hf.main(base_args(kermany_folder, target / "sub"))
    err = capsys.readouterr().err
    assert rc == 2 and "output_dir" in err and "Traceback" not in err


# ------------------------------------------------------------- no remote code, no pickle


def _tiny_model_folder(path: Path) -> Path:
    from cxr_train.modeling import build_preset, save_model_folder

    model, processor = build_preset("tiny-resnet-scratch", {0: "NORMAL", 1: "PNEUMONIA"})
    save_model_folder(model, processor, path)
    return path


EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('remote code ran')\n"


def _plant_remote_code(folder: Path, marker: Path, *, where: str) -> None:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)) + "class Evil: pass\n")
    if where == "config":   # a model type transformers does not know: only the folder's code could build it
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="evil-net", architectures=["EvilModel"],
                      auto_map={"AutoConfig": "evil.Evil", "AutoModelForImageClassification": "evil.Evil"})
        (folder / "config.json").write_text(json.dumps(config))
    else:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        pre.update(image_processor_type="EvilImageProcessor", auto_map={"AutoImageProcessor": "evil.Evil"})
        (folder / "preprocessor_config.json").write_text(json.dumps(pre))


@pytest.mark.parametrize("where", ["config", "processor"])
def test_auto_map_never_runs_the_folders_code(tmp_path, monkeypatch, where):
    """`echo y | python app/app.py --model folder` ran the folder's Python: the loaders left
    trust_remote_code unset, so transformers asked on stdin. Answer 'y' to any prompt here."""
    from cxr.inference import ModelLoadError, Predictor
    from cxr_train.modeling import ModelError, load_checkpoint

    folder = _tiny_model_folder(tmp_path / "model")
    marker = tmp_path / "MARKER"
    _plant_remote_code(folder, marker, where=where)
    monkeypatch.setattr("builtins.input", lambda *a, **k: "y")
    monkeypatch.syspath_prepend(str(folder))
    try:
        Predictor.from_pretrained(folder)
    except ModelLoadError:
        pass
    try:
        load_checkpoint(str(folder), {0: "NORMAL", 1: "PNEUMONIA"})
    except ModelError:
        pass
    assert not marker.exists()


def test_index_naming_a_pickle_file_is_refused(tmp_path):
    """A model.safetensors.index.json whose shard is a torch.save file passed the
    'safetensors only' check and was loaded (unpickled)."""
    import torch
    from safetensors.torch import load_file

    from cxr.inference import ModelLoadError, Predictor
    from cxr_train.modeling import ModelError, load_checkpoint

    folder = _tiny_model_folder(tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "model-00001-of-00001.bin")
    for shard in ("model-00001-of-00001.bin", "../outside.safetensors", "model-00001-of-00001.safetensors"):
        if shard.endswith(".safetensors") and "/" not in shard:  # a pickle renamed .safetensors
            (folder / shard).write_bytes((folder / "model-00001-of-00001.bin").read_bytes())
        index = {"metadata": {}, "weight_map": {k: shard for k in weights}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ModelLoadError, match="safetensors") as info:
            Predictor.from_pretrained(folder)
        assert str(tmp_path) not in str(info.value)
        with pytest.raises(ModelError, match="safetensors"):
            load_checkpoint(str(folder), {0: "NORMAL", 1: "PNEUMONIA"})


def test_sharded_safetensors_folder_still_loads(tmp_path):
    from cxr.inference import Predictor

    folder = _tiny_model_folder(tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(folder / "model-00001-of-00001.safetensors", "pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert Predictor.from_pretrained(folder).id2label == {0: "NORMAL", 1: "PNEUMONIA"}


# ------------------------------------------------------------------ smaller items (issue 9)


def _exif_rotated_jpeg(path: Path) -> Path:
    from PIL import Image

    from cxr_train.synthetic import make_xray

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    make_xray(1, True, 96).crop((0, 0, 96, 64)).save(path, "JPEG", exif=exif.tobytes())
    return path


@pytest.mark.slow   # a trained model: the session's real training
def test_predict_on_a_pil_image_equals_the_file_upload(trained_folder, tmp_path):
    """Predictor.predict(PIL.Image) skipped the loader: EXIF, 16-bit scaling and alpha differed."""
    import numpy as np
    from PIL import Image

    from cxr.inference import Predictor
    from cxr_train.synthetic import make_xray

    predictor = Predictor.from_pretrained(trained_folder, precision="fp32")
    grey = np.asarray(make_xray(2, False, 64), dtype=np.uint16) * 16  # 12-bit values in 16 bits
    rgba = make_xray(3, True, 64).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))))
    files = [_exif_rotated_jpeg(tmp_path / "rotated.jpg"), tmp_path / "deep.png", tmp_path / "alpha.png"]
    Image.fromarray(grey).save(files[1])
    rgba.save(files[2])
    for path in files:
        from_file = predictor.predict(path)
        with Image.open(path) as opened:
            from_pil = predictor.predict(opened)
            batch = predictor.predict_batch([opened])[0]
        assert from_pil.probabilities == from_file.probabilities == batch.probabilities, path.name


@pytest.mark.slow   # a trained model: the session's real training
def test_cli_refuses_a_fifo_instead_of_hanging(trained_folder, tmp_path, capsys):
    import threading

    from cxr import inference

    fifo = tmp_path / "film.png"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "rc", inference.main([str(fifo), "--model", str(trained_folder)])), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the CLI hangs on a FIFO"
    assert result["rc"] == 1
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["file"] == "film.png" and "regular file" in row["error"]


def test_undefined_metrics_are_null_in_json_and_na_in_the_card(kermany_folder, tmp_path):
    """NORMAL with one image: precision (no positive prediction) etc. were NaN in the JSON and
    .nan in the card."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(kermany_folder / "train", data / "train")
    normal = sorted((data / "train" / "NORMAL").iterdir())
    for f in normal[1:]:
        f.unlink()                                   # NORMAL: one image
    out = tmp_path / "run"
    assert train_hf.main(base_args(data, out, "--max_steps", "1", "--save_strategy", "no",
                                   "--load_best_model_at_end", "False")) == 0
    text = (out / "eval_results.json").read_text()
    assert "NaN" not in text
    ev = json.loads(text)
    undefined = [k for k, v in ev.items() if v is None]
    assert undefined  # this split leaves at least one metric undefined (0/0)
    card = (out / "README.md").read_text()
    assert "nan" not in card.lower().replace("nan-", "")
    names = dict(METRIC_ROWS)
    for key in undefined:
        if key[len("eval_"):] in names:
            assert f"| {names[key[len('eval_'):]]} | n/a" in card
    for name in ("config.json", "all_results.json", "eval_scores.json"):
        assert "NaN" not in (out / name).read_text(), name
    from cxr.inference import Predictor

    facts = Predictor.from_pretrained(out).describe()
    assert all(v == v for v in facts["validation_metrics"].values())


def test_score_split_of_a_one_class_split_has_no_nan():
    import numpy as np

    from cxr.operating_point import OperatingPoint
    from cxr_train.training import prefixed, score_split

    logits = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = prefixed(score_split(logits, np.array([1, 1, 1]), 1, OperatingPoint(), n_boot=50), "test")
    json.dumps(m, allow_nan=False)
    assert m["test_roc_auc"] is None and m["test_specificity"] is None and m["test_ci"]["roc_auc"] is None
    assert m["test_sensitivity"] == 2 / 3
