"""benchmarks/shift.py: the acquisition corruptions (fast, no marker) and the stress test run with
--quick on a tiny model and a synthetic image folder (``bench``, in a subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.shift import CORRUPTIONS, MAX_SEVERITY, corrupt, film_rng, holdout_films, load_holdout_patients
from tests.helpers import make_xray, write_kermany_folder

ROOT = Path(__file__).resolve().parent.parent
NAMES = list(CORRUPTIONS)
# Drawn from the generator: a different seed gives different pixels.
RANDOM = {"gaussian_noise", "poisson_noise", "rotation", "translation", "border_black", "border_white",
          "markers", "grid_lines"}


@pytest.fixture(scope="module")
def film() -> Image.Image:
    return make_xray(7, positive=True, size=96).convert("RGB")


def diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def test_the_table_covers_the_acquisition_changes_the_issue_lists():
    groups = {c.group for c in CORRUPTIONS.values()}
    assert {"exposure", "window width", "noise", "resolution", "compression", "positioning", "field of view",
            "collimation"} <= groups
    assert {"gaussian_noise", "poisson_noise", "gaussian_blur", "downsample", "jpeg", "rotation",
            "translation", "zoom_in", "zoom_out", "border_black"} <= set(NAMES)
    assert not any("invert" in n for n in NAMES)   # an inverted film is not a plausible acquisition
    for c in CORRUPTIONS.values():
        assert len(c.levels) == MAX_SEVERITY + 1 and c.description and c.parameter


@pytest.mark.parametrize("name", NAMES)
def test_keeps_size_mode_and_grey_and_leaves_the_input_alone(name, film):
    before = np.asarray(film).copy()
    out = corrupt(film, name, 2, np.random.default_rng(0))
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == film.size
    assert out is not film and np.array_equal(np.asarray(film), before)
    a = np.asarray(out, dtype=np.int16)
    # a grey film stays grey (colour would trip the app's "is this a radiograph" check)
    assert np.abs(a[..., 0] - a[..., 1]).max() <= 2 and np.abs(a[..., 0] - a[..., 2]).max() <= 2


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name, film):
    a = corrupt(film, name, 2.5, np.random.default_rng(123))
    b = corrupt(film, name, 2.5, np.random.default_rng(123))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    if name in RANDOM:
        others = [corrupt(film, name, 2.5, np.random.default_rng(s)) for s in (1, 2, 3)]
        assert any(not np.array_equal(np.asarray(a), np.asarray(o)) for o in others)


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_identity_and_severity_grows_the_change(name, film):
    assert np.array_equal(np.asarray(corrupt(film, name, 0, np.random.default_rng(0))), np.asarray(film))
    changes = [diff(corrupt(film, name, s, np.random.default_rng(0)), film) for s in (1, 2, 3)]
    assert 0 < changes[0] < changes[1] < changes[2], changes


def test_fractional_severity_interpolates_the_parameter():
    c = CORRUPTIONS["gamma_up"]
    assert c.parameter_at(0) == 1.0 and c.parameter_at(3) == c.levels[3]
    assert c.parameter_at(1.5) == pytest.approx((c.levels[1] + c.levels[2]) / 2)


def test_bad_arguments_are_clear_errors(film):
    with pytest.raises(KeyError, match="unknown corruption"):
        corrupt(film, "invert", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(film, "jpeg", 4)
    with pytest.raises(ValueError, match="severity"):
        corrupt(film, "jpeg", -0.5)
    with pytest.raises(TypeError, match="RGB"):
        corrupt(film.convert("L"), "jpeg", 1)


def test_film_rng_depends_on_every_part_of_the_key():
    draw = lambda *k: film_rng(*k).random()  # noqa: E731
    base = draw(1, "jpeg", 2, "a.jpeg")
    assert base == draw(1, "jpeg", 2, "a.jpeg")
    assert len({base, draw(2, "jpeg", 2, "a.jpeg"), draw(1, "rotation", 2, "a.jpeg"),
                draw(1, "jpeg", 3, "a.jpeg"), draw(1, "jpeg", 2, "b.jpeg")}) == 5


def test_holdout_films_are_the_manifest_patients(tmp_path):
    data = write_kermany_folder(tmp_path / "data", n_patients=8, per_patient=2, splits=("train",))
    from cxr_train.data import patient_id_from_filename

    all_files = sorted(data.rglob("*.jpeg"))
    patients = sorted({patient_id_from_filename(f.name) for f in all_files})
    chosen = set(patients[::3])
    (tmp_path / "m.json").write_text(json.dumps({"patients": sorted(chosen)}))
    films = holdout_films(data, load_holdout_patients(tmp_path / "m.json"))
    assert films and {patient_id_from_filename(f.name) for f, _ in films} == chosen
    assert len(films) == sum(patient_id_from_filename(f.name) in chosen for f in all_files)
    assert all(label == f.parent.name for f, label in films)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a hold-out manifest"):
        load_holdout_patients(tmp_path / "bad.json")
    with pytest.raises(SystemExit, match="not found"):
        load_holdout_patients(tmp_path / "missing.json")


# ------------------------------------------------------------------ the benchmark, end to end

@pytest.mark.bench
@pytest.mark.slow
def test_quick_run_on_a_tiny_model(tmp_path):
    from cxr_train.data import patient_id_from_filename
    from cxr_train.modeling import build_preset, save_model_folder

    data = write_kermany_folder(tmp_path / "data", n_patients=8, per_patient=2, splits=("train",))
    patients = sorted({patient_id_from_filename(f.name) for f in data.rglob("*.jpeg")})
    manifest = tmp_path / "holdout.json"
    manifest.write_text(json.dumps({"patients": patients}))
    model, processor = build_preset("tiny-resnet-scratch", {0: "NORMAL", 1: "PNEUMONIA"})
    save_model_folder(model, processor, tmp_path / "model")
    out, md = tmp_path / "shift.json", tmp_path / "shift.md"
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "benchmarks.shift", "--quick", "--data", str(data), "--model", str(tmp_path / "model"),
           "--holdout", str(manifest), "--out", str(out), "--md", str(md)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r = json.loads(out.read_text())
    assert r["benchmark"] == "shift" and r["config"]["quick"] is True
    assert {"cpu_model", "torch", "cpu_supports_bf16"} <= set(r["machine"])
    assert r["model"]["precision"] in ("bf16 autocast", "fp32") and r["command"] and r["date"]
    assert r["data"]["per_class"] == {"NORMAL": 6, "PNEUMONIA": 6} and r["data"]["n_films"] == 12
    rows = r["results"]
    assert [row["corruption"] for row in rows] == ["clean", *NAMES]
    assert rows[0]["severity"] == 0 and all(row["severity"] == 2 for row in rows[1:])
    assert rows[0]["mean_abs_pixel_change"] == 0 and all(row["mean_abs_pixel_change"] > 0 for row in rows[1:])
    for row in rows:
        for key in ("auroc", "sensitivity", "specificity", "accuracy", "normal_median_p", "pneumonia_median_p"):
            assert 0.0 <= row[key] <= 1.0, (row["corruption"], key, row[key])
        assert row["ood_flagged"] is None or 0.0 <= row["ood_flagged"] <= 1.0
    for row in rows[1:]:
        assert 0.0 <= row["flipped"] <= 1.0
        assert math.isclose(row["delta_normal_median_p"], row["normal_median_p"] - rows[0]["normal_median_p"])
    table = md.read_text()
    assert all(f"| {n} | 2 |" in table for n in NAMES) and "| clean | 0 |" in table
    assert table in proc.stdout


@pytest.mark.bench
@pytest.mark.slow
def test_a_bad_manifest_is_a_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "shift.json"
    (tmp_path / "m.json").write_text(json.dumps({"patients": ["nobody"]}))
    data = write_kermany_folder(tmp_path / "data", n_patients=2, per_patient=1, splits=("train",))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.shift", "--quick", "--data", str(data),
                           "--holdout", str(tmp_path / "m.json"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no film" in proc.stderr and not out.exists()


def test_card_section_is_written_before_limitations_and_replaced_on_rerun(tmp_path):
    from benchmarks.shift import CARD_HEADING, write_card_section

    def row(name, sev, spec, value=None):
        return {"corruption": name, "severity": sev, "value": value, "specificity": spec, "sensitivity": 0.98,
                "auroc": 0.99, "normal_median_p": 0.002, "delta_normal_median_p": 0.1 * sev}

    result = {"command": "python -m benchmarks.shift --model m", "date": "today",
              "machine": {"cpu_model": "CPU X", "logical_cores": 2},
              "model": {"precision": "fp32", "threshold": 0.34},
              "data": {"n_films": 10, "per_class": {"PNEUMONIA": 6, "NORMAL": 4}},
              "results": [row("clean", 0, 0.98)] + [row("gaussian_noise", k, 0.9 - 0.2 * k, 0.01 * k) for k in (1, 2, 3)]}
    card = tmp_path / "README.md"
    card.write_text("# m\n\n## Evaluation\n\nnumbers\n\n## Limitations\n\n- few\n")
    write_card_section(tmp_path, result)
    text = card.read_text()
    assert text.index("## Evaluation") < text.index(CARD_HEADING) < text.index("## Limitations")
    assert "| gaussian_noise (0.01 / 0.02 / 0.03) | 0.70 / 0.50 / 0.30 |" in text and "CPU X" in text
    result["results"][1]["specificity"] = 0.11
    write_card_section(tmp_path, result)                      # a rerun replaces, never duplicates
    text = card.read_text()
    assert text.count(CARD_HEADING) == 1 and "0.11 / 0.50 / 0.30" in text
