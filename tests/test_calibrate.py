"""cxr-calibrate (cxr_train.calibrate): the threshold rule on known scores, the written folder
(served by the Predictor, pipeline() and cxr-predict with the new operating point, weights
byte-identical, provenance, card section), and every bad input ending in a clear error with
nothing written."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cxr.operating_point import OperatingPoint
from cxr_train import calibrate
from cxr_train.calibrate import (CalibrationError, calibrate_site, compute_lower_bound, compute_misses_allowed,
                                 fit_site_operating_point, main)
from tests.helpers import make_model_folder, make_xray

ID2LABEL = {0: "NORMAL", 1: "PNEUMONIA"}
PREVIOUS = OperatingPoint(threshold=0.5, temperature=1.0, positive_label="PNEUMONIA", policy="equal_error",
                          source="the model's own")


def scores(n_neg, n_pos, seed=0, shift=3.0):
    """Binary logits (margin on column 1): positives ~ N(shift, 1), negatives ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    margin = rng.normal(0, 1, len(labels)) + shift * labels
    return np.stack([np.zeros(len(labels)), margin], 1), labels


def fit(logits, labels, **kw):
    return fit_site_operating_point(logits, labels, 1, ID2LABEL, previous=PREVIOUS, sample_name="site-a", **kw)


# ------------------------------------------------------------------ the threshold rule

def test_misses_allowed_is_the_exact_one_sided_bound():
    from scipy.stats import beta

    for n in (59, 100, 200, 400):
        m = compute_misses_allowed(n, 0.95, 0.95)
        # the Beta(n - m, m + 1) quantile (coverage of the order statistic) is the same bound
        assert beta.ppf(0.05, n - m, m + 1) >= 0.95 > beta.ppf(0.05, n - m - 1, m + 2)
        assert compute_lower_bound(n - m, n) >= 0.95 > compute_lower_bound(n - m - 1, n)
    assert compute_misses_allowed(58, 0.95, 0.95) is None        # 0.05 ** (1 / 58) < 0.95
    assert compute_misses_allowed(59, 0.95, 0.95) == 0


def test_threshold_keeps_the_bound_and_is_the_most_specific_one():
    logits, labels = scores(150, 250, shift=2.0)
    f = fit(logits, labels)
    op = f.operating_point
    p = op.probabilities(logits)[:, 1]
    pos = np.sort(p[labels == 1])
    m = compute_misses_allowed(250, 0.95, 0.95)
    assert f.floor_shown and f.misses_allowed == m and m > 0
    assert int((pos < op.threshold).sum()) == m                   # exactly the allowed misses
    assert f.sensitivity_lower_bound >= 0.95
    assert pos[m - 1] < op.threshold < pos[m]                      # in the gap below the m+1-th positive
    below = p[p < op.threshold].max()
    lt, lb, lp = (np.log(x / (1 - x)) for x in (op.threshold, below, pos[m]))
    assert abs(lt - (lb + lp) / 2) < 1e-6                          # the middle of the gap, on the logit scale
    # the plain policy (sample sensitivity >= floor) sits higher: fewer NORMAL alarms, more misses
    plain = fit(logits, labels, confidence=0.5)
    assert plain.operating_point.threshold > op.threshold and plain.after.sensitivity < f.after.sensitivity
    assert f.after.sensitivity >= 0.95 and f.after.tp == 250 - m


@pytest.mark.slow   # ~10 s: 300 fits
def test_the_floor_holds_on_new_films_with_the_confidence_asked():
    """Simulated sites (normal scores): the share of calibrations whose true sensitivity (on the
    whole population) is >= the floor is about the confidence; the plain policy's is about half."""
    from scipy.stats import norm

    def true_sensitivity(op):   # positives ~ N(2, 1) on the margin scale
        margin_t = op.temperature * np.log(op.threshold / (1 - op.threshold))
        return norm.sf(margin_t, loc=2.0)

    ok, ok_plain = [], []
    for seed in range(150):
        logits, labels = scores(80, 120, seed=seed, shift=2.0)
        ok.append(true_sensitivity(fit(logits, labels).operating_point) >= 0.95)
        ok_plain.append(true_sensitivity(fit(logits, labels, confidence=0.5).operating_point) >= 0.95)
    assert np.mean(ok) >= 0.9
    assert np.mean(ok_plain) < 0.75


def test_floor_that_cannot_be_shown_is_warned_and_keeps_every_positive():
    logits, labels = scores(40, 30)
    f = fit(logits, labels)
    assert not f.floor_shown and f.misses_allowed is None
    assert f.after.sensitivity == 1.0
    assert any("cannot be met" in w and "59 PNEUMONIA films are needed" in w for w in f.warnings)
    assert "too few films" in f.operating_point.source


def test_a_threshold_resting_on_one_film_is_warned():
    logits, labels = scores(40, 70, shift=1.5)          # 70 positives: the bound allows no miss
    f = fit(logits, labels)
    assert f.floor_shown and f.misses_allowed == 0 and f.after.sensitivity == 1.0
    assert any("rests on the single lowest PNEUMONIA score" in w and "93 or more" in w for w in f.warnings)
    assert not any("single lowest" in w for w in fit(*scores(40, 300, shift=1.5)).warnings)


def test_small_sample_is_warned():
    logits, labels = scores(12, 80)
    f = fit(logits, labels)
    assert any(w.startswith("small sample: 12 NORMAL") for w in f.warnings)
    assert not any("small sample" in w for w in fit(*scores(30, 80)).warnings)


def test_a_model_that_does_not_separate_the_classes_is_an_error():
    logits, labels = scores(60, 80)
    with pytest.raises(CalibrationError, match="does not separate"):
        fit(-logits, labels)


def test_provenance_of_the_fitted_point():
    logits, labels = scores(60, 100)
    op = fit(logits, labels, date="2026-03-04").operating_point
    assert op.calibrated_on == "site-a" and op.calibrated_date == "2026-03-04"
    assert op.n_per_class == {"NORMAL": 60, "PNEUMONIA": 100} and op.sensitivity_confidence == 0.95
    assert op.previous == PREVIOUS.to_config() and op.policy == "sensitivity_floor" and op.min_sensitivity == 0.95
    back = OperatingPoint.from_config({"cxr_operating_point": op.to_config()})
    assert back.to_config() == op.to_config() and abs(back.threshold - op.threshold) < 1e-6


# ------------------------------------------------------------------ the command and the folder

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = make_model_folder(tmp_path_factory.mktemp("model") / "tiny", ood=False)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n\n# tiny\n\nintro\n\n## Intended use\n\nteaching\n")
    (folder / "notes.txt").write_text("any other file travels too\n")
    return folder


def write_sample(root: Path, n_normal=30, n_pneumonia=30, size=64) -> Path:
    for label, n in (("NORMAL", n_normal), ("PNEUMONIA", n_pneumonia)):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            seed = i + (5000 if label == "PNEUMONIA" else 0)
            make_xray(seed, label == "PNEUMONIA", size).convert("RGB").save(d / f"{label.lower()}-{i}.png")
    return root


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("site") / "site-a")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_command_writes_a_complete_calibrated_folder(model_dir, sample, tmp_path, capsys):
    before = {p.name: sha(p) for p in model_dir.iterdir()}
    out = tmp_path / "calibrated"
    assert main(["--model", str(model_dir), "--data", str(sample), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "after (site)" in printed.out and "optimistic" in printed.out and "(30/30)" in printed.out
    assert {p.name: sha(p) for p in model_dir.iterdir()} == before            # the source is untouched
    names = {p.name for p in out.iterdir()}
    assert set(before) | {"site_calibration.json"} == names                   # every file travels
    assert sha(out / "model.safetensors") == before["model.safetensors"]      # weights byte-identical
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in out.iterdir())
    assert not list(tmp_path.glob(".*partial"))

    cfg = json.loads((out / "config.json").read_text())
    old = json.loads((model_dir / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "cxr_operating_point"} == \
        {k: v for k, v in old.items() if k != "cxr_operating_point"}
    op = OperatingPoint.from_config(cfg)
    assert op.calibrated_on == "site-a" and op.n_per_class == {"NORMAL": 30, "PNEUMONIA": 30}
    assert op.calibrated_date == datetime.date.today().isoformat() and op.policy == "sensitivity_floor"
    assert op.previous == OperatingPoint.from_config(old).to_config()
    assert op.threshold != old["cxr_operating_point"]["threshold"]
    record = json.loads((out / "site_calibration.json").read_text())
    assert record["after"]["threshold"] == pytest.approx(op.threshold, abs=1e-6)
    assert record["n_per_class"] == op.n_per_class and len(record["scores"]["labels"]) == 60
    assert "png" not in json.dumps(record)                                     # no file names

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense") and "## Site calibration" in card
    assert card.index("## Site calibration") < card.index("## Intended use")
    section = card[card.index("## Site calibration"):card.index("## Intended use")]
    assert "`site-a`, 60 films (30 NORMAL, 30 PNEUMONIA)" in section and "optimistic" in section
    assert f"{op.threshold:.4f}" in section and "0.5000" in section           # new and old threshold
    assert "Clopper-Pearson" in section and "(30/30)" in section


def test_written_folder_serves_with_the_new_operating_point(model_dir, sample, tmp_path, capsys):
    from transformers import pipeline

    from cxr.inference import Predictor
    from cxr.inference import main as predict_main

    out = tmp_path / "served"
    result = calibrate_site(model_dir, sample, out, site="Site A", min_sensitivity=0.9)
    op = result.fit.operating_point
    predictor = Predictor.from_pretrained(out)
    assert predictor.threshold == pytest.approx(op.threshold, abs=1e-6)
    assert predictor.temperature == pytest.approx(op.temperature, abs=1e-5)
    assert predictor.operating_point.calibrated_on == "Site A"
    assert "calibrated at site 'Site A' on 60 films" in predictor.describe()["threshold_source"] + \
        predictor.operating_point.describe()
    film = sorted((sample / "PNEUMONIA").iterdir())[0]
    pred = predictor.predict(film)
    assert pred.threshold == pytest.approx(op.threshold, abs=1e-6)
    assert pred.label == ("PNEUMONIA" if pred.positive_probability >= op.threshold else "NORMAL")
    top = pipeline("image-classification", model=str(out), device="cpu")(str(film))
    assert {r["label"] for r in top} == {"NORMAL", "PNEUMONIA"}
    capsys.readouterr()
    assert predict_main([str(film), "--model", str(out)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["threshold"] == pytest.approx(op.threshold, abs=1e-4)          # the answer schema rounds to 4 places


def test_recalibrating_replaces_the_section_and_chains_the_record(model_dir, sample, tmp_path):
    first = calibrate_site(model_dir, sample, tmp_path / "one", site="first").out
    second = calibrate_site(first, sample, tmp_path / "two", site="second").out
    card = (second / "README.md").read_text()
    assert card.count("## Site calibration") == 1 and "`second`" in card and "`first`" not in card
    op = OperatingPoint.from_config(json.loads((second / "config.json").read_text()))
    assert op.previous["calibrated_on"] == "first"


def test_floor_that_cannot_be_met_and_small_sample_are_warned(model_dir, tmp_path, capsys):
    data = write_sample(tmp_path / "tiny-site", n_normal=8, n_pneumonia=10)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", str(data), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: small sample: 8 NORMAL, 10 PNEUMONIA" in err
    assert "WARNING: the floor cannot be met" in err
    record = json.loads((out / "site_calibration.json").read_text())
    assert record["floor_shown"] is False and len(record["warnings"]) >= 2
    assert "too small to show the floor" in (out / "README.md").read_text()


# ------------------------------------------------------------------ bad input: an error, nothing written

def _bad_data(kind: str, root: Path) -> Path:
    data = root / "data"
    if kind == "one class":
        write_sample(data, n_normal=0, n_pneumonia=6)
    elif kind == "unreadable file":
        write_sample(data, n_normal=4, n_pneumonia=4)
        (data / "NORMAL" / "broken.png").write_bytes(b"not an image at all")
    elif kind == "flat folder":
        data.mkdir()
        make_xray(0, False).save(data / "film.png")
    elif kind == "nested folder":
        write_sample(data / "NORMAL" / "more", n_normal=3, n_pneumonia=0)
        write_sample(data, n_normal=3, n_pneumonia=3)
    elif kind == "foreign label":
        write_sample(data, n_normal=3, n_pneumonia=3)
        write_sample(data / "x", n_normal=0, n_pneumonia=0)
        (data / "x").rename(data / "COVID")
    elif kind == "no such folder":
        pass
    return data


@pytest.mark.parametrize("kind, message", [
    ("one class", "one class only"),
    ("unreadable file", "cannot be read"),
    ("flat folder", "<LABEL>/<image>"),
    ("nested folder", "is a folder"),
    ("foreign label", "not labels of the model"),
    ("no such folder", "no such folder"),
])
def test_bad_data_is_a_clear_error_and_writes_nothing(kind, message, model_dir, tmp_path, capsys):
    data = _bad_data(kind, tmp_path)
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err and "nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("case", ["out not empty", "out is model", "out inside model", "out is a file",
                                  "model missing", "bad floor"])
def test_bad_paths_are_a_clear_error_and_write_nothing(case, model_dir, sample, tmp_path, capsys):
    before = {p.name: sha(p) for p in model_dir.iterdir()}
    out, extra = tmp_path / "out", []
    model = model_dir
    if case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out is model":
        out = model_dir
    elif case == "out inside model":
        out = model_dir / "calibrated"
    elif case == "out is a file":
        out.write_text("x")
    elif case == "model missing":
        model = tmp_path / "nope"
    elif case == "bad floor":
        extra = ["--min_sensitivity", "1.5"]
    assert main(["--model", str(model), "--data", str(sample), "--out", str(out), *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert {p.name: sha(p) for p in model_dir.iterdir()} == before
    if case == "out not empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    if case in ("model missing", "bad floor"):
        assert not out.exists()
    assert not list(tmp_path.glob(".*partial")) and not list(model_dir.glob(".*partial"))


def test_missing_argument_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main(["--model", "x"])
    assert e.value.code == 2


def test_an_empty_out_folder_is_used(model_dir, sample, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    calibrate_site(model_dir, sample, out)
    assert (out / "site_calibration.json").is_file()


def test_a_failure_while_writing_leaves_nothing(model_dir, sample, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(calibrate, "build_record", broken)
    with pytest.raises(OSError):
        calibrate_site(model_dir, sample, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    import cxr_train.hub as hub

    monkeypatch.setattr(hub, "with_card_section", broken)      # fails inside the temporary folder
    with pytest.raises(OSError):
        calibrate_site(model_dir, sample, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
