"""The real Gradio app on 127.0.0.1, called through gradio_client (and raw HTTP for the
server-level checks)."""

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from cxr.inference import DISCLAIMER, Predictor
from tests.helpers import make_xray
from tests.helpers import PHI, make_dicom


@pytest.fixture(scope="module")
def server(trained_folder, tmp_path_factory):
    from app import app as app_module

    predictor = Predictor.from_pretrained(trained_folder, precision="fp32")
    demo = app_module.create_demo(predictor)
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                  quiet=True)
    yield url.rstrip("/"), tmp_path_factory.mktemp("client")
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    url, downloads = server
    return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


def call(client, path, opacity=0.4, heatmap=True):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), opacity, heatmap, api_name="/predict")


def check_ok(result, size=64):
    label, overlay_path, heat_path, details, response = result[:5]
    confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(confidences) == {"NORMAL", "PNEUMONIA"}
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-5)
    assert label["label"] == response["label"]            # the headline is the thresholded decision
    assert response["disclaimer"] == DISCLAIMER and "not a medical device" in details
    assert response["threshold_source"]
    assert Image.open(heat_path).size == (size, size)
    assert Image.open(overlay_path).mode == "RGB"
    assert Image.open(overlay_path).format == "JPEG"         # display copy; the raw map stays PNG
    return response


def test_png_jpeg_and_monochrome1_dicom(client, tmp_path):
    img = make_xray(3, True, size=96)
    img.save(tmp_path / "x.png")
    img.convert("RGB").save(tmp_path / "x.jpeg", quality=95)
    check_ok(call(client, tmp_path / "x.png"))
    check_ok(call(client, tmp_path / "x.jpeg"))
    arr = (np.asarray(img, dtype=np.uint16) * 16)  # 12-bit
    (tmp_path / "m2.dcm").write_bytes(make_dicom(arr))
    (tmp_path / "m1.dcm").write_bytes(make_dicom(4095 - arr, photometric="MONOCHROME1"))
    r2 = check_ok(call(client, tmp_path / "m2.dcm"))
    r1 = check_ok(call(client, tmp_path / "m1.dcm"))
    assert r1["probabilities"] == pytest.approx(r2["probabilities"], abs=1e-6)
    text = json.dumps(r1)
    assert not any(p in text for p in PHI)


def test_without_heatmap(client, tmp_path):
    make_xray(4, False).save(tmp_path / "n.png")
    label, overlay_path, heat_path, details, response = call(client, tmp_path / "n.png", heatmap=False)[:5]
    assert heat_path is None and "heatmap_size" not in response


@pytest.mark.parametrize("name,payload,message", [
    ("fake.png", b"hello, this is text", "not a PNG, JPEG or DICOM image"),
    ("page.png", b"<html><script>alert(1)</script></html>", "not a PNG, JPEG or DICOM image"),
    ("tiny.png", None, "too small"),
    ("cut.jpeg", "truncated", "truncated or corrupt"),
    ("bad.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00", "DICOM"),
])
def test_bad_inputs_give_clear_errors(client, tmp_path, name, payload, message):
    from gradio_client.exceptions import AppError

    path = tmp_path / name
    if payload is None:
        Image.new("L", (1, 1)).save(path)
    elif payload == "truncated":
        buf = io.BytesIO()
        make_xray(1, True, 128).convert("RGB").save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        path.write_bytes(payload)
    with pytest.raises(AppError) as e:
        call(client, path)
    text = str(e.value)
    assert message in text
    assert "Traceback" not in text and str(tmp_path) not in text


def test_colour_photo_flagged(client, tmp_path):
    rng = np.random.default_rng(0)
    photo = np.stack([np.full((96, 96), 220), rng.integers(0, 90, (96, 96)), np.full((96, 96), 30)], -1)
    Image.fromarray(photo.astype(np.uint8)).save(tmp_path / "photo.png")
    label, _, _, details, response = call(client, tmp_path / "photo.png")[:5]
    assert response["out_of_distribution"] and response["label"] is None
    assert "not a chest X-ray" in details
    assert not label.get("confidences")


def test_phi_never_returned_for_failing_dicom(client, tmp_path):
    from gradio_client.exceptions import AppError

    frames = np.zeros((2, 64, 64), np.uint16)
    (tmp_path / "multi.dcm").write_bytes(make_dicom(frames, NumberOfFrames=2))
    with pytest.raises(AppError) as e:
        call(client, tmp_path / "multi.dcm")
    assert "multi-frame" in str(e.value)
    assert not any(p in str(e.value) for p in PHI)


def test_upload_over_limit_is_413(server):
    url, _ = server
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024)
    r = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert r.status_code == 413


@pytest.mark.parametrize("path", ["/gradio_api/file=/etc/passwd", "/gradio_api/file=../../../../etc/passwd",
                                  "/file=/etc/passwd", "/gradio_api/file=app.py"])
def test_file_routes_refuse_traversal(server, path):
    url, _ = server
    r = httpx.get(url + path, timeout=30)
    assert r.status_code in (400, 403, 404)
    assert "root:" not in r.text


def test_model_facts_and_teaching_panel(trained_folder):
    from app import app as app_module

    predictor = Predictor.from_pretrained(trained_folder, precision="fp32")
    facts = app_module.model_facts(predictor)
    assert "tiny-resnet-scratch" in facts and "Grad-CAM" in facts and "full" in facts
    assert "transfer learning" in app_module.TEACHING.lower()


def test_app_refuses_bad_model_at_startup(trained_folder, tmp_path, capsys):
    import shutil

    from app import app as app_module

    bad = tmp_path / "pickle"
    shutil.copytree(trained_folder, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    assert app_module.main(["--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "only pickle weights" in err and "Traceback" not in err


def test_overload_is_refused_quickly(trained_folder, monkeypatch, tmp_path):
    """A bounded queue: with 2 running and 1 waiting, further requests are refused at once."""
    import threading
    import time

    from gradio_client import Client, handle_file

    from app import app as app_module

    monkeypatch.setenv("CXR_QUEUE_SIZE", "1")
    predictor = Predictor.from_pretrained(trained_folder, precision="fp32")
    original = predictor.predict

    def slow_predict(*a, **k):  # hold the workers so the queue fills
        time.sleep(1.5)
        return original(*a, **k)

    predictor.predict = slow_predict
    demo = app_module.create_demo(predictor)
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    make_xray(9, True).save(tmp_path / "q.png")
    outcomes, lock = [], threading.Lock()

    def one():
        t0 = time.perf_counter()
        try:
            Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False).predict(
                handle_file(str(tmp_path / "q.png")), 0.4, False, api_name="/predict")
            result = "ok"
        except Exception as e:  # noqa: BLE001
            result = str(e)
        with lock:
            outcomes.append((result, time.perf_counter() - t0))

    try:
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        demo.close()
    assert len(outcomes) == 6
    ok = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[0] != "ok"]
    assert 1 <= len(ok) <= 3 and refused
    assert all("queue" in r.lower() for r, _ in refused), refused
    assert all(dt < 30 for _, dt in refused)


def test_cache_cleaning_and_analytics_configured(trained_folder):
    from app import app as app_module

    demo = app_module.create_demo(Predictor.from_pretrained(trained_folder, precision="fp32"))
    assert demo.delete_cache == (600, 1800)      # gradio removes cached uploads/outputs on a timer
    assert demo.analytics_enabled is False


def test_headline_is_thresholded_decision_not_argmax(trained_folder):
    from app import app as app_module

    widget = app_module.DecisionLabel(num_top_classes=2)
    data = widget.postprocess({"decision": "PNEUMONIA", "probabilities": {"NORMAL": 0.7, "PNEUMONIA": 0.3}})
    assert data.label == "PNEUMONIA"                       # threshold 0.256 < 0.3: positive
    assert [c.label for c in data.confidences] == ["NORMAL", "PNEUMONIA"]
    assert app_module.DecisionLabel.get_block_name() == "label"


def test_sessions_are_bounded_for_api_callers(trained_folder, monkeypatch, tmp_path):
    """Each raw HTTP API call opens a new Gradio session holding a UI-config copy and the
    slider state; the app keeps at most CXR_SESSION_CAPACITY of them (memory stays bounded)."""
    from app import app as app_module
    from tests.helpers import GradioHttp

    monkeypatch.setenv("CXR_SESSION_CAPACITY", "3")
    demo = app_module.create_demo(Predictor.from_pretrained(trained_folder, precision="fp32"))
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    make_xray(5, True).save(tmp_path / "s.png")
    user = GradioHttp(url)
    try:
        for _ in range(7):
            data = user.predict(tmp_path / "s.png", heatmap=True)
            assert data[4]["disclaimer"] == DISCLAIMER
        sessions = demo.state_holder.session_data
        assert 1 <= len(sessions) <= 3
        stored = [s.state_data for s in sessions.values() if s.state_data]
        assert stored, "the newest sessions keep the slider state"
    finally:
        user.close()
        demo.close()
    assert app_module.SESSION_CAPACITY <= 1000 and app_module.STATE_TTL_S > 0


def test_reblend_keeps_the_image_when_the_state_is_gone():
    import gradio as gr

    from app import app as app_module

    assert isinstance(app_module.reblend(None, 0.5), type(gr.skip()))      # expired / evicted state
    display = make_xray(1, False).convert("RGB")
    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    a = app_module.reblend({"display": display, "heatmap": heat}, 0.0)
    b = app_module.reblend({"display": display, "heatmap": heat}, 1.0)
    assert a.size == b.size == display.size and np.abs(np.asarray(a, int) - np.asarray(b, int)).max() > 50
    assert app_module.reblend({"display": display, "heatmap": None}, 0.5) is display
