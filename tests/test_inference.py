import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_train.data import ImageTransform, prepare_data
from cxr_train.config import DataArguments
from cxr.imaging import ImageLoadError
from cxr.inference import DISCLAIMER, ModelLoadError, Predictor, main as cli_main
from tests.helpers import make_xray, tiny_timm_folder


@pytest.fixture(scope="module")
def predictor(trained_folder):
    return Predictor.from_pretrained(trained_folder, precision="fp32")


@pytest.mark.slow   # a trained model: the session's real training
def test_preprocessing_is_training_eval_transform(predictor, trained_folder, kermany_folder):
    """The Predictor's tensor == the training eval transform's tensor, for the same file."""
    data = prepare_data(DataArguments(dataset_name=str(kermany_folder), validation_fraction=0.25))
    val = data.splits["validation"]
    raw = val[0]["image"]
    train_side = ImageTransform(predictor.processor, augment=False)({"image": [raw], "label": [0]})["pixel_values"]
    from cxr.imaging import load_image

    serve_side = predictor.preprocess([load_image(raw["path"])])
    assert torch.equal(train_side, serve_side)
    # and the processor is the one saved in the folder, not a default
    saved = json.loads((trained_folder / "preprocessor_config.json").read_text())
    assert list(predictor.processor.image_mean) == saved["image_mean"]


@pytest.mark.slow   # a trained model: the session's real training
def test_predict_uses_saved_threshold_and_temperature(predictor, trained_folder, kermany_folder):
    op = json.loads((trained_folder / "config.json").read_text())["cxr_operating_point"]
    assert predictor.threshold == pytest.approx(op["threshold"])
    assert predictor.temperature == pytest.approx(op["temperature"])
    path = next((kermany_folder / "test" / "PNEUMONIA").iterdir())
    r = predictor.predict(path)
    assert set(r.probabilities) == {"NORMAL", "PNEUMONIA"}
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    expected = "PNEUMONIA" if r.positive_probability >= op["threshold"] else "NORMAL"
    assert r.label == expected
    # calibrated probability = softmax(logits / T)
    logits = predictor.logits(predictor.preprocess([Image.open(path).convert("RGB")]))[0]
    z = logits / op["temperature"]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert r.positive_probability == pytest.approx(float(p[1]), abs=1e-5)
    assert r.to_dict()["disclaimer"] == DISCLAIMER and "not a medical device" in DISCLAIMER


@pytest.mark.slow   # a trained model: the session's real training
def test_threshold_changes_the_decision(trained_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(trained_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    img = make_xray(5, True).convert("RGB")
    for thr, expected in ((0.0, "PNEUMONIA"), (1.0, "NORMAL")):
        cfg["cxr_operating_point"]["threshold"] = thr
        (folder / "config.json").write_text(json.dumps(cfg))
        assert Predictor.from_pretrained(folder, precision="fp32").predict(img).label == expected
    cfg["cxr_operating_point"]["threshold"] = 1.5           # a corrupt operating point: refused at load
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="invalid cxr_operating_point"):
        Predictor.from_pretrained(folder, precision="fp32")


@pytest.mark.slow   # a trained model: the session's real training
def test_bf16_and_fp32_agree(trained_folder, kermany_folder):
    fp32 = Predictor.from_pretrained(trained_folder, precision="fp32")
    bf16 = Predictor.from_pretrained(trained_folder, precision="bf16")
    files = sorted((kermany_folder / "test").rglob("*.jpeg"))[:16]
    a, b = fp32.predict_batch(files), bf16.predict_batch(files)
    for x, y in zip(a, b):
        assert abs(x.positive_probability - y.positive_probability) < 0.02


@pytest.mark.slow   # a trained model: the session's real training
def test_colour_photo_is_flagged_not_labelled(predictor):
    rng = np.random.default_rng(0)
    photo = np.zeros((96, 96, 3), np.uint8)
    photo[..., 0] = 200
    photo[..., 1] = rng.integers(0, 120, (96, 96))
    r = predictor.predict(Image.fromarray(photo))
    assert r.out_of_distribution and r.label is None and "not a chest X-ray" in r.warning


@pytest.mark.slow   # trained models: the session's real trainings (ResNet and ViT)
def test_heatmaps(predictor, trained_vit_folder, kermany_folder):
    path = next((kermany_folder / "test" / "PNEUMONIA").iterdir())
    r = predictor.predict(path, explain=True)
    assert r.explainer == "grad-cam"
    assert r.heatmap.shape == (64, 64) and 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0
    vit = Predictor.from_pretrained(trained_vit_folder, precision="fp32")
    with torch.inference_mode():                  # loaded so that the model returns its attention maps
        out = vit.model(pixel_values=vit.preprocess([Image.open(path)]), output_attentions=True)
    assert len(out.attentions) == vit.model.config.num_hidden_layers
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(()), atol=1e-4)
    r = vit.predict(path, explain=True)
    assert r.explainer == "attention-rollout"
    assert r.heatmap.shape == (32, 32) and 0.8 < r.heatmap.max() <= 1.0


def test_attention_rollout_identity_attention():
    from cxr.explain import compute_attention_rollout

    # 1 CLS + 4 patches; every layer attends CLS -> patch 3 only
    att = torch.zeros(1, 2, 5, 5)
    att[:, :, :, 0] = 1.0
    att[:, :, 0, 0] = 0.0
    att[:, :, 0, 3] = 1.0
    out = compute_attention_rollout([att, att])
    assert out.shape == (1, 2, 2)
    assert np.unravel_index(out[0].argmax(), (2, 2)) == (1, 0)   # patch index 2 -> row 1, col 0


@pytest.mark.slow   # a trained model: the session's real training
def test_predict_batch_keeps_going_after_bad_file(predictor, kermany_folder, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"<html>not an image</html>")
    good = next((kermany_folder / "test" / "NORMAL").iterdir())
    out = predictor.predict_batch([good, bad, good])
    assert isinstance(out[1], ImageLoadError)
    assert out[0].probabilities == out[2].probabilities


@pytest.mark.slow   # a trained model: the session's real training
def test_pickle_only_and_truncated_weights_fail_clearly(trained_folder, tmp_path):
    pickle_only = tmp_path / "pickle"
    shutil.copytree(trained_folder, pickle_only)
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        Predictor.from_pretrained(pickle_only)
    truncated = tmp_path / "trunc"
    shutil.copytree(trained_folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        Predictor.from_pretrained(truncated)
    with pytest.raises(ModelLoadError, match="not found"):
        Predictor.from_pretrained(tmp_path / "nothing")


@pytest.mark.slow   # a trained model: the session's real training
def test_cli(trained_folder, kermany_folder, capsys, tmp_path):
    good = next((kermany_folder / "test" / "NORMAL").iterdir())
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    rc = cli_main(["--model", str(trained_folder), "--precision", "fp32", str(good), str(bad)])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert rc == 1
    assert lines[0]["decision"] in ("NORMAL", "PNEUMONIA") and lines[0]["disclaimer"] == DISCLAIMER
    assert "not a PNG, JPEG or DICOM" in lines[1]["error"]


@pytest.mark.slow   # a trained model: the session's real training
def test_concurrent_explanations_do_not_mix(predictor, kermany_folder):
    """Grad-CAM hooks are shared: concurrent calls must each get their own map."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted((kermany_folder / "test").rglob("*.jpeg"))[:6]
    alone = [predictor.predict(f, explain=True).heatmap for f in files]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda f: predictor.predict(f, explain=True).heatmap, files * 3))
    for i, h in enumerate(together):
        assert np.allclose(h, alone[i % len(files)], atol=1e-4)


@pytest.mark.slow   # a trained model: the session's real training
def test_greyscale_pil_input(predictor):
    r = predictor.predict(make_xray(2, False))   # mode "L"
    assert set(r.probabilities) == {"NORMAL", "PNEUMONIA"}


@pytest.mark.slow   # a trained model: the session's real training
def test_predict_batch_across_chunks_matches_predict(predictor, kermany_folder, tmp_path):
    """Batches run in parallel worker threads: order, errors and values must not change."""
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)   # JPEG magic, corrupt body
    files = sorted((kermany_folder / "test" / "NORMAL").iterdir())[:3] + \
        sorted((kermany_folder / "test" / "PNEUMONIA").iterdir())[:3]
    sources = [files[0], bad, *files[1:4], bad, *files[4:]]
    for batch_size, workers in ((1, None), (2, 1), (3, 2), (2, 4), (64, None)):
        out = predictor.predict_batch(sources, batch_size=batch_size, workers=workers)
        assert len(out) == len(sources)
        assert [isinstance(r, ImageLoadError) for r in out] == [s is bad for s in sources]
        for src, r in zip(sources, out):
            if src is not bad:
                single = predictor.predict(src)
                assert r.label == single.label
                assert r.positive_probability == pytest.approx(single.positive_probability, abs=1e-6)
    assert predictor.predict_batch([]) == []
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict_batch(files, batch_size=0)


@pytest.mark.slow   # a trained model: the session's real training
def test_torch_threads_of_the_caller_are_untouched(predictor, kermany_folder):
    """Workers run single-threaded; neither the caller nor threads started later inherit that."""
    import threading

    def in_new_thread() -> int:
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    before, new_before = torch.get_num_threads(), in_new_thread()
    predictor.predict_batch(sorted((kermany_folder / "test" / "NORMAL").iterdir())[:4], batch_size=2)
    assert in_new_thread() == new_before
    predictor.predict_batch(sorted((kermany_folder / "test" / "NORMAL").iterdir())[:4], batch_size=1, workers=3)
    assert torch.get_num_threads() == before


@pytest.mark.slow   # trained models: the session's real trainings (ResNet and ViT)
def test_single_pass_maps_equal_the_library_explainers(predictor, trained_vit_folder, kermany_folder):
    """predict(explain=True) computes the map from its own forward pass; it must equal the
    separate explainer's map (pytorch_grad_cam.GradCAM for the ResNet, a rollout forward for the
    ViT), and its probabilities must equal predict() without a map."""
    from cxr.imaging import load_image

    vit = Predictor.from_pretrained(trained_vit_folder, precision="fp32")
    assert predictor.single_pass_maps and vit.single_pass_maps   # the closed-form Grad-CAM / rollout paths
    for p in (predictor, vit):
        peaks = []
        for f in sorted((kermany_folder / "test" / "PNEUMONIA").iterdir())[:3]:
            image = load_image(f)
            fused = p.predict(image, explain=True)
            plain = p.predict(image)
            assert fused.positive_probability == pytest.approx(plain.positive_probability, abs=1e-6)
            library = p.explain_tensor(p.preprocess([image]), p.positive_id)
            assert fused.heatmap.shape == library.shape
            assert np.abs(fused.heatmap - library).max() < 1e-3
            peaks.append(fused.heatmap.max())
        assert max(peaks) > 0.9   # real maps (min-max scaled), not all-zero ones that match trivially


@pytest.mark.parametrize("arch, closed_form", [("test_efficientnet", True), ("test_resnet", True),
                                                ("test_convnext", False)])
def test_timm_cnn_map_from_the_prediction_pass_equals_grad_cam(tmp_path, arch, closed_form):
    """timm CNNs whose head is Linear(average pool(forward_features)) get Grad-CAM in closed form
    from the prediction's own forward pass (the default EfficientNet: ~3 ms instead of a backward
    pass); it equals pytorch_grad_cam.GradCAM on the same layer. ConvNeXt (a norm after the
    pooling) is detected and left to the library."""
    p = Predictor.from_pretrained(tiny_timm_folder(tmp_path, arch), precision="fp32")
    assert p.single_pass_maps == closed_form
    image = make_xray(3, True, size=96).convert("RGB")
    x = p.preprocess([image])
    peaks = []
    for class_id in range(4):
        logits, fused = p.logits_and_heatmap(x, class_id)
        assert np.allclose(logits, p.logits(x), atol=1e-5)
        library = p.explain_tensor(x, class_id)
        assert fused.shape == library.shape and np.abs(fused - library).max() <= 0.01 * fused.max() + 1e-6
        peaks.append(fused.max())
    assert max(peaks) > 0.01       # not all-zero maps that match trivially (random tiny nets give faint ones)


@pytest.mark.slow   # a trained model: the session's real training
def test_bf16_map_agrees_with_fp32(trained_folder, kermany_folder):
    from cxr.precision import resolve_bf16

    if not resolve_bf16("auto"):
        pytest.skip("no native bf16 on this CPU")
    fp32 = Predictor.from_pretrained(trained_folder, precision="fp32")
    bf16 = Predictor.from_pretrained(trained_folder, precision="bf16")
    for f in sorted((kermany_folder / "test" / "NORMAL").iterdir())[:3]:
        a, b = fp32.predict(f, explain=True).heatmap, bf16.predict(f, explain=True).heatmap
        assert np.abs(a - b).max() < 0.1


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "app" / "examples").glob("*.jpeg"))


def test_bf16_and_fp32_agree_on_real_xrays_with_the_scratch_model():
    """The precision switch on real films: the shipped from-scratch CNN on the app's six Kermany
    examples (CC BY 4.0) gives the same decision in bf16 and fp32, probabilities within 0.01.
    bf16 autocast also runs (emulated, slowly) on CPUs without native bf16."""
    examples = EXAMPLES
    assert len(examples) == 6
    scratch = ROOT / "models" / "cxr-resnet-small-scratch"
    fp32 = Predictor.from_pretrained(scratch, precision="fp32")
    bf16 = Predictor.from_pretrained(scratch, precision="bf16")
    assert fp32.autocast_dtype is None and bf16.autocast_dtype == torch.bfloat16
    for a, b in zip(fp32.predict_batch(examples), bf16.predict_batch(examples)):
        assert a.label == b.label or abs(a.positive_probability - a.threshold) < 0.01   # film 1 sits on it
        assert abs(a.positive_probability - b.positive_probability) < 0.01
    # the shipped model on these patient-disjoint films (app/examples/ATTRIBUTION.md): film 1 is a
    # NORMAL just above the threshold, film 6 a missed PNEUMONIA; none is flagged as out of distribution
    results = fp32.predict_batch(examples)
    assert [r.label for r in results] == ["PNEUMONIA", "PNEUMONIA", "NORMAL", "PNEUMONIA", "NORMAL", "NORMAL"]
    assert not any(r.out_of_distribution for r in results)


def test_shipped_default_follows_the_precision_its_operating_point_was_fitted_in(monkeypatch):
    """The default (ImageNet-transfer EfficientNet-Lite0, 224 px) had its threshold fitted on bf16
    validation scores: "auto" uses bf16 where the CPU has it and fp32 elsewhere; either way all six
    example films (app/examples/ATTRIBUTION.md) get the right label (three NORMAL, three PNEUMONIA)
    and none is flagged as unlike the training films."""
    import cxr.precision
    from cxr.inference import DEFAULT_MODEL_DIR

    assert DEFAULT_MODEL_DIR.name == "efficientnet-lite0-imagenet-full"
    monkeypatch.setattr(cxr.precision, "cpu_supports_bf16", lambda: True)
    p = Predictor.from_pretrained()
    assert p.operating_point.scored_in == "bf16" and p.autocast_dtype == torch.bfloat16
    monkeypatch.setattr(cxr.precision, "cpu_supports_bf16", lambda: False)
    fp32 = Predictor.from_pretrained()
    assert fp32.autocast_dtype is None
    expected = ["NORMAL", "PNEUMONIA", "NORMAL", "PNEUMONIA", "NORMAL", "PNEUMONIA"]
    for pred in (p, fp32):
        results = pred.predict_batch(EXAMPLES)
        assert [r.label for r in results] == expected
        assert not any(r.out_of_distribution for r in results)
    assert abs(p.threshold - 0.4769) < 1e-3 and p.ood is not None       # the shift-fitted threshold (issue #25)


@pytest.mark.parametrize("name", ["{tmp}/nothing", "./nothing", "models_here/typo", "models_here/a/b", "~/no-such-cxr-model-dir"])
def test_wrong_local_path_says_the_folder_does_not_exist(tmp_path, monkeypatch, name):
    """Not a Hub connection error: the folder is named as missing, for the Predictor and training."""
    from cxr_train.modeling import ModelError, load_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models_here").mkdir()
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelLoadError, match=r"model folder not found: .*\(no such folder\)") as e:
        Predictor.from_pretrained(name)
    assert "huggingface.co" not in str(e.value) and "Hub" not in str(e.value)
    with pytest.raises(ModelError, match=r"model folder not found: .*\(no such folder\)"):
        load_checkpoint(name, {0: "NORMAL", 1: "PNEUMONIA"})


def test_hub_id_failure_says_it_is_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                        # offline (conftest): the Hub cannot be reached
    with pytest.raises(ModelLoadError, match=r"cannot load model 'someone/cxr-model' \(not a local folder"):
        Predictor.from_pretrained("someone/cxr-model")
