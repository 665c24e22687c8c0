"""The learned out-of-distribution score (cxr/ood.py), its use by the Predictor, the DICOM
Modality check, and the helper that builds tiny model folders with a chosen answer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.imaging import ImageLoadError, load_image
from cxr.inference import Predictor
from cxr.ood import OOD_FILE, FeatureTap, OODScorer, extract_features
from cxr_train.ood_fit import choose_threshold, synthetic_ct_slice
from tests.helpers import greyscale_photo, make_dicom, make_model_folder, make_xray, xrays


@pytest.fixture(scope="module")
def ood_folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("ood") / "model")


def test_feature_tap_records_the_heads_input(ood_folder):
    p = Predictor.from_pretrained(ood_folder, precision="fp32")
    pv = p.preprocess(xrays([1, 2]))
    with torch.no_grad():
        pooled = p.model.resnet(pixel_values=pv).pooler_output.flatten(1).numpy()
    tap = FeatureTap(p.model)
    try:
        p.logits(pv)
        assert np.allclose(tap.pop(), pooled, atol=1e-5)
        assert tap.pop() is None                                   # forgotten once read
    finally:
        tap.remove()
    assert np.allclose(extract_features(p.model, p.processor, xrays([1, 2])), pooled, atol=1e-5)


def test_scorer_separates_xrays_from_photos_and_ct_and_round_trips(ood_folder):
    scorer = OODScorer.from_folder(ood_folder)
    assert scorer is not None and scorer.facts["n_train"] == 40 and scorer.facts["val_flagged"] <= 0.05
    p = Predictor.from_pretrained(ood_folder, precision="fp32")
    held_out = scorer.score_images(p.model, p.processor, xrays(range(200, 220)))
    others = scorer.score_images(p.model, p.processor, [greyscale_photo(3), synthetic_ct_slice(77),
                                                        synthetic_ct_slice(78, kind="mr")])
    assert (held_out <= scorer.threshold).mean() >= 0.9           # new films of the training kind pass
    assert (others > scorer.threshold).all(), (others, scorer.threshold)
    assert others.min() > np.median(held_out)
    again = OODScorer.load(ood_folder / OOD_FILE)
    assert again.threshold == pytest.approx(scorer.threshold)
    assert np.allclose(again.score_images(p.model, p.processor, xrays([5])), scorer.score_images(
        p.model, p.processor, xrays([5])))


def test_from_folder_without_a_scorer_is_none(tmp_path):
    assert OODScorer.from_folder(tmp_path) is None


def test_choose_threshold():
    val = np.arange(1, 101, dtype=float)
    assert choose_threshold(val, np.array([150.0, 160.0])) == pytest.approx(125.0)   # middle of the gap
    assert choose_threshold(val, None) == pytest.approx(np.quantile(val, 0.99))
    t = choose_threshold(val, np.array([50.0, 160.0]))                  # overlap: at most 1% of films flagged
    assert (val > t).mean() <= 0.01 and t < 160


def test_predictor_flags_photo_with_no_label_and_no_map(ood_folder):
    p = Predictor.from_pretrained(ood_folder, precision="fp32")
    photo = p.predict(greyscale_photo(1), explain=True)
    assert photo.out_of_distribution and photo.label is None and photo.heatmap is None
    assert photo.ood_score > photo.ood_threshold
    film = p.predict(xrays([201])[0], explain=True)
    assert not film.out_of_distribution and film.label in ("NORMAL", "PNEUMONIA") and film.heatmap is not None
    assert film.ood_score <= film.ood_threshold
    batch = p.predict_batch([xrays([201])[0], greyscale_photo(1)])   # same scores through the batch path
    assert batch[0].ood_score == pytest.approx(film.ood_score, rel=1e-4)
    assert batch[1].out_of_distribution and batch[1].label is None


def test_dicom_modality_must_be_a_radiograph():
    pixels = (np.asarray(make_xray(1, False, 64), np.uint16) * 16)
    assert load_image(make_dicom(pixels)).size == (64, 64)                       # DX
    assert load_image(make_dicom(pixels, Modality="CR")).size == (64, 64)
    for modality, words in (("CT", "CT scan"), ("MR", "MR scan"), ("ZZ", "not a radiograph")):
        with pytest.raises(ImageLoadError) as e:
            load_image(make_dicom(pixels, Modality=modality))
        assert words in str(e.value) and "CR, DX or RG" in str(e.value)
        assert "Doe" not in str(e.value)


def test_fit_cli_writes_the_stats_file(tmp_path, kermany_folder, capsys):
    from cxr_train import ood_fit as ood

    folder = make_model_folder(tmp_path / "m", ood=False)
    assert ood.main(["fit", "--model", str(folder), "--data", str(kermany_folder), "--max_train", "30"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (folder / OOD_FILE).is_file() and (folder / OOD_FILE).stat().st_size < 50_000
    assert out["n_train"] <= 30 and out["n_val"] >= 1 and out["threshold"] > 0
    img = tmp_path / "photo.png"
    greyscale_photo(2).save(img)
    assert ood.main(["score", "--model", str(folder), str(img)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["file"] == "photo.png" and "ood_score" in row
