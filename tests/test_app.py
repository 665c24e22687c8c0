"""The real Gradio app on 127.0.0.1: its one API endpoint through gradio_client and raw HTTP,
the README's API snippets, uploads and their lifecycle, load, and the page's handlers."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cxr.inference import DISCLAIMER, Predictor
from tests.helpers import PHI, ROOT, greyscale_photo, make_dicom, make_model_folder, make_xray
from tests.helpers import stored_upload as _stored_upload

# Tiers on the tests themselves: tests that start a Gradio server, a client or a subprocess are
# slow; rendering and handlers called as plain functions (tiny models) are in the fast tier.

KEYS = {"model", "decision", "positive_label", "probability", "threshold", "borderline", "probabilities",
        "threshold_source", "out_of_distribution", "ood_score", "ood_threshold", "message", "heatmap",
        "heatmap_method", "heatmap_class", "disclaimer"}


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Two tiny models with a chosen answer for every film: 'edge' says P(PNEUMONIA) ~0.52 at
    threshold 0.5 (borderline PNEUMONIA); 'sure-normal' says ~0.01 (a confident NORMAL)."""
    root = tmp_path_factory.mktemp("models")
    return (make_model_folder(root / "edge", p_positive=0.52, threshold=0.5, name_seed=1),
            make_model_folder(root / "sure-normal", p_positive=0.01, threshold=0.5, name_seed=2))


@pytest.fixture(scope="module")
def server(model_folders, tmp_path_factory):
    from app import app as app_module

    predictors = [Predictor.from_pretrained(f, precision="fp32") for f in model_folders]
    demo = app_module.create_demo(predictors)
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                  quiet=True)
    yield url.rstrip("/"), tmp_path_factory.mktemp("client"), demo
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    url, downloads, _ = server
    return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


def call(client, path, heatmap=True):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), heatmap, api_name="/predict")


def film(tmp_path, name="x.png", seed=3):
    path = tmp_path / name
    make_xray(seed, True, size=96).save(path)
    return path


@pytest.mark.slow
def test_api_is_one_consistent_json_object(client, tmp_path):
    r = call(client, film(tmp_path))
    assert isinstance(r, dict) and KEYS <= set(r) and len(r["models"]) == 2
    assert {k: v for k, v in r.items() if k != "models"} == r["models"][0]
    edge, normal = r["models"]
    assert [edge["model"], normal["model"]] == ["edge", "sure-normal"]
    for m in r["models"]:
        assert m["decision"] == (m["positive_label"] if m["probability"] >= m["threshold"] else "NORMAL")
        assert m["probabilities"]["PNEUMONIA"] == pytest.approx(m["probability"])
        assert m["disclaimer"] == DISCLAIMER and not m["out_of_distribution"]
        assert m["ood_score"] <= m["ood_threshold"]
        assert m["heatmap_method"] == "Grad-CAM" and m["heatmap_class"] == "PNEUMONIA"
    assert edge["decision"] == "PNEUMONIA" and edge["borderline"] and 0.5 <= edge["probability"] < 0.55
    assert normal["decision"] == "NORMAL" and not normal["borderline"] and normal["probability"] < 0.02
    edge_map, normal_map = (np.asarray(Image.open(m["heatmap"])) for m in r["models"])
    assert edge_map.shape == normal_map.shape == (64, 64)
    assert edge_map.max() >= 250              # a PNEUMONIA answer (P 0.52 >= 0.50): the map at full strength
    # a confident NORMAL: the map at P / threshold = 0.02 of full strength, no strong blob (was min-max: 255)
    assert 0 < normal_map.max() <= round(255 * normal["probability"] / normal["threshold"]) + 1


@pytest.mark.slow
def test_without_heatmap_and_dicom_twins(client, tmp_path):
    img = make_xray(3, True, size=96)
    img.save(tmp_path / "x.png")
    img.convert("RGB").save(tmp_path / "x.jpeg", quality=95)
    png = call(client, tmp_path / "x.png", heatmap=False)
    assert png["heatmap"] is None and png["heatmap_method"] == "Grad-CAM"
    assert call(client, tmp_path / "x.jpeg")["decision"] in ("NORMAL", "PNEUMONIA")
    arr = np.asarray(img, dtype=np.uint16) * 16
    (tmp_path / "m2.dcm").write_bytes(make_dicom(arr))
    (tmp_path / "m1.dcm").write_bytes(make_dicom(4095 - arr, photometric="MONOCHROME1"))
    r2, r1 = call(client, tmp_path / "m2.dcm"), call(client, tmp_path / "m1.dcm")
    assert r1["probability"] == pytest.approx(r2["probability"], abs=1e-6)
    assert not any(p in json.dumps(r1) for p in PHI)


@pytest.mark.slow
def test_greyscale_photo_is_flagged_with_no_label_and_no_map(client, tmp_path):
    greyscale_photo(5).save(tmp_path / "portrait.png")
    r = call(client, tmp_path / "portrait.png")
    for m in r["models"]:
        assert m["out_of_distribution"] and m["ood_score"] > m["ood_threshold"]
        assert m["decision"] is None and m["probability"] is None and m["heatmap"] is None
        assert "does not look like a chest X-ray" in m["message"] or "not meaningful" in m["message"]


@pytest.mark.slow
def test_ct_dicom_is_refused_by_modality(client, tmp_path):
    from gradio_client.exceptions import AppError

    (tmp_path / "ct.dcm").write_bytes(make_dicom(np.full((64, 64), 1000, np.uint16), Modality="CT"))
    with pytest.raises(AppError) as e:
        call(client, tmp_path / "ct.dcm")
    assert "CT scan" in str(e.value) and "CR, DX or RG" in str(e.value)
    assert not any(p in str(e.value) for p in PHI)


@pytest.mark.parametrize("name,payload,message", [
    ("fake.png", b"hello, this is text", "not a PNG, JPEG or DICOM image"),
    ("page.png", b"<html><script>alert(1)</script></html>", "not a PNG, JPEG or DICOM image"),
    ("tiny.png", None, "too small"),
    ("cut.jpeg", "truncated", "truncated or corrupt"),
    ("bad.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00", "DICOM"),
])
@pytest.mark.slow
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


# ------------------------------------------------------------------ README snippets

def readme_snippets() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```\w+\n(.*?)```", text, flags=re.S))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pipeline", "predictor", "gradio_client", "curl"])
def test_readme_api_snippets_run(name, server, model_folders, tmp_path):
    url, _, _ = server
    code = readme_snippets()[name]
    make_xray(8, True, size=96).convert("RGB").save(tmp_path / "chest_xray.jpeg")
    code = re.sub(r"models/(efficientnet-lite0-imagenet-full|cxr-resnet-small-scratch)", str(model_folders[0]), code)
    code = code.replace("http://127.0.0.1:7860", url)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = ["bash", "-c", code] if name == "curl" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    last = out.strip().splitlines()[-1].split() if out.strip() else []
    if name == "pipeline":
        assert "'label': 'PNEUMONIA'" in out and "'score'" in out
    elif name == "predictor":
        assert last[0] == "PNEUMONIA" and DISCLAIMER in out
    elif name == "gradio_client":
        assert last[0] == "PNEUMONIA" and last[3] == "True"      # decision ... borderline
    else:
        assert "event: complete" in out
        data = json.loads(out.split("data:", 1)[1].strip().splitlines()[0])
        assert data[0]["decision"] == "PNEUMONIA" and data[0]["heatmap"]["url"]


# ------------------------------------------------------------------ uploads

def upload(url, *files):
    return httpx.post(f"{url}/gradio_api/upload", files=[("files", f) for f in files], timeout=60)


@pytest.mark.slow
def test_upload_limits(server):
    url, _, _ = server
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024)
    assert upload(url, ("big.png", big, "image/png")).status_code == 413
    small = io.BytesIO()
    make_xray(1, True).save(small, "PNG")
    two = upload(url, ("a.png", small.getvalue(), "image/png"), ("b.png", small.getvalue(), "image/png"))
    assert two.status_code == 413 and "too many files" in two.text
    one = upload(url, ("a.png", small.getvalue(), "image/png"))
    assert one.status_code == 200 and len(one.json()) == 1


@pytest.mark.slow
def test_uploaded_files_are_attachments_with_nosniff(server):
    url, _, _ = server
    r = upload(url, ("page.png", b"<html><script>alert(1)</script></html>", "image/png"))
    path = r.json()[0]
    got = httpx.get(f"{url}/gradio_api/file={path}", timeout=30)
    assert got.headers.get("x-content-type-options") == "nosniff"
    if got.status_code == 200:
        assert got.headers.get("content-disposition", "").startswith("attachment")
    assert httpx.get(url, timeout=30).headers.get("x-content-type-options") == "nosniff"


@pytest.mark.slow
def test_upload_is_deleted_after_prediction_and_no_temp_files_leak(server, tmp_path):
    from benchmarks.gradio_http import HttpUser

    url, _, _ = server
    tmp = Path(tempfile.gettempdir())
    empty_before = {p for p in tmp.iterdir() if p.is_file() and p.stat().st_size == 0}
    path = film(tmp_path, "gone.png")
    user = HttpUser(url)
    try:
        stored = user.http.post("/gradio_api/upload", files={"files": ("gone.png", path.read_bytes())}).json()[0]
        assert Path(stored).is_file()
        data_path = {"path": stored, "meta": {"_type": "gradio.FileData"}}
        event = user.http.post("/gradio_api/call/predict", json={"data": [data_path, True]}).json()["event_id"]
        body = user.http.get(f"/gradio_api/call/predict/{event}").text
        assert "event: complete" in body
        assert not Path(stored).exists()                  # removed once read
        for _ in range(5):
            user.predict(path, heatmap=True)
    finally:
        user.close()
    empty_after = {p for p in tmp.iterdir() if p.is_file() and p.stat().st_size == 0}
    assert not (empty_after - empty_before)


@pytest.mark.slow
def test_janitor_sweeps_keeps_protected_survives_errors_and_cleans_at_shutdown(tmp_path, caplog):
    from app.files import Janitor

    root = tmp_path / "cache"
    (root / "examples").mkdir(parents=True)
    keep = root / "examples" / "thumb.jpeg"
    keep.write_bytes(b"x")
    jan = Janitor(root, ttl=60, every=0.05)
    jan.protect_existing()
    old, new = root / "u1" / "old.png", root / "u2" / "new.png"
    for p in (old, new):
        p.parent.mkdir()
        p.write_bytes(b"y")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(keep, (time.time() - 3600, time.time() - 3600))
    assert jan.sweep() == 1
    assert not old.exists() and not old.parent.exists() and new.exists() and keep.exists()
    calls = {"n": 0}
    real = jan.sweep

    def flaky(max_age=None):       # e.g. Gradio's "Set changed size during iteration"
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("Set changed size during iteration")
        return real(max_age)

    jan.sweep = flaky
    jan.start()
    deadline = time.time() + 10
    while calls["n"] < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert calls["n"] >= 3 and jan.errors == 1
    seen = calls["n"]
    while calls["n"] == seen and time.time() < deadline + 10:
        time.sleep(0.05)
    assert calls["n"] > seen                                  # still sweeping after the error
    assert "upload sweep failed" in caplog.text
    jan.shutdown()
    assert not root.exists()


@pytest.mark.slow
def test_demo_close_removes_the_cache_folder(model_folders):
    from app import app as app_module
    from app import files as app_files

    demo = app_module.create_demo(Predictor.from_pretrained(model_folders[1], precision="fp32"))
    app_module.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    root = app_files.janitor().root
    assert root.is_dir() and os.environ["GRADIO_TEMP_DIR"] == str(root)
    others = [b for b in app_files.janitor().blocks if b is not demo]
    demo.close()
    assert root.is_dir() == bool(others)      # removed when the last app closes


@pytest.mark.slow
def test_file_routes_refuse_traversal(server):
    url, _, _ = server
    for path in ["/gradio_api/file=/etc/passwd", "/gradio_api/file=../../../../etc/passwd", "/file=/etc/passwd",
                 "/gradio_api/file=app.py"]:
        r = httpx.get(url + path, timeout=30)
        assert r.status_code in (400, 403, 404) and "root:" not in r.text


@pytest.mark.slow
def test_api_refuses_a_path_that_was_not_uploaded(server):
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=60) as http:
        data = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
        r = http.post("/gradio_api/call/predict", json={"data": [data, True]})
        body = http.get(f"/gradio_api/call/predict/{r.json()['event_id']}").text if r.status_code == 200 else r.text
    assert "event: complete" not in body and "root:" not in body


def raw_call(http, url, data: list, film_path=None) -> tuple[str, list | None]:
    """One raw HTTP call of /predict (as the README's curl snippet makes it), the uploaded film
    first in ``data`` when given: (the event stream's last event, its data)."""
    if film_path is not None:
        path = upload(url, (film_path.name, film_path.read_bytes(), "image/png")).json()[0]
        data = [{"path": path, "meta": {"_type": "gradio.FileData"}}, *data]
    r = http.post("/gradio_api/call/predict", json={"data": data})
    if r.status_code != 200:
        return f"HTTP {r.status_code}", None
    body = http.get(f"/gradio_api/call/predict/{r.json()['event_id']}").text
    events = re.findall(r"event: (\w+)\ndata: (.*)", body)
    event, payload = events[-1]
    return event, json.loads(payload) if event == "complete" else None


@pytest.mark.slow
def test_raw_http_calls_may_leave_out_the_optional_arguments(server, tmp_path):
    """/predict's raw HTTP body: [file, show_heatmap] as written before heatmap_class was added
    (the README's curl snippet), [file] alone, and the full [file, show_heatmap, heatmap_class]
    all answer; a map class a model lacks, or no file, is refused with nothing answered."""
    url, _, _ = server
    path = film(tmp_path)
    with httpx.Client(base_url=url, timeout=120) as http:
        event, data = raw_call(http, url, [True], path)
        assert event == "complete" and data[0]["decision"] == "PNEUMONIA" and data[0]["heatmap"]["url"]
        assert data[0]["heatmap_class"] == "PNEUMONIA"
        event, data = raw_call(http, url, [False], path)
        assert event == "complete" and data[0]["heatmap"] is None
        event, data = raw_call(http, url, [], path)                       # show_heatmap's default: True
        assert event == "complete" and data[0]["heatmap"]["url"]
        event, data = raw_call(http, url, [False, "NORMAL"], path)        # a chosen class implies a map
        assert event == "complete" and [m["heatmap_class"] for m in data[0]["models"]] == ["NORMAL", "NORMAL"]
        assert data[0]["decision"] == "PNEUMONIA" and data[0]["heatmap"]["url"]
        assert raw_call(http, url, [True, "VIRAL"], path)[0] == "error"
        assert raw_call(http, url, [])[0] in ("error", "HTTP 422")        # no file at all


# ------------------------------------------------------------------ load and queue policy

@pytest.mark.slow
def test_twenty_clients_are_served_without_refusal(server, tmp_path):
    from benchmarks.app_latency import load_test

    url, _, _ = server
    path = film(tmp_path, "load.png")
    out = load_test(url, [path], concurrency=20, total=40, time_limit=120, heatmap=True)
    assert out["errors"] == 0, out["error_examples"]
    assert out["n"] == 40


@pytest.mark.slow
def test_overload_is_refused_quickly(model_folders, monkeypatch, tmp_path):
    """A bounded queue: with 2 running and 1 waiting, further requests are refused at once."""
    from gradio_client import Client, handle_file

    from app import app as app_module

    monkeypatch.setenv("CXR_QUEUE_SIZE", "1")
    predictor = Predictor.from_pretrained(model_folders[0], precision="fp32")
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
                handle_file(str(tmp_path / "q.png")), False, api_name="/predict")
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
    assert app_module.QUEUE_SIZE >= 20          # the documented policy: 20 clients are never refused


@pytest.mark.slow
def test_sessions_are_bounded_for_api_callers(model_folders, monkeypatch, tmp_path):
    from app import app as app_module
    from benchmarks.gradio_http import HttpUser

    monkeypatch.setenv("CXR_SESSION_CAPACITY", "3")
    demo = app_module.create_demo(Predictor.from_pretrained(model_folders[0], precision="fp32"))
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    make_xray(5, True).save(tmp_path / "s.png")
    user = HttpUser(url)
    try:
        for _ in range(7):
            assert user.predict(tmp_path / "s.png", heatmap=True)[0]["disclaimer"] == DISCLAIMER
        assert 1 <= len(demo.state_holder.session_data) <= 3
    finally:
        user.close()
        demo.close()


# ------------------------------------------------------------------ page handlers

def test_answer_card_headline_bar_and_api_agree():
    from app.render import answer_card
    from cxr.operating_point import OperatingPoint

    for p in np.linspace(0, 1, 41):
        for t in (0.256, 0.5):
            op = OperatingPoint(threshold=t)
            logits = np.log([[1 - p + 1e-12, p + 1e-12]])       # softmax(logits)[1] == p (temperature 1)
            d = op.apply(logits, positive_id=1)
            decision = "PNEUMONIA" if d.positive[0] else "NORMAL"
            r = {"model": "m", "out_of_distribution": False, "probability": float(p), "threshold": t,
                 "positive_label": "PNEUMONIA", "decision": decision, "borderline": bool(d.borderline[0]),
                 "borderline_margin": op.borderline_margin}
            card = answer_card(r, show_model=False)
            assert f'data-decision="{decision}"' in card and f">{decision}<" in card.replace(
                '<span class="cxr-tag">borderline</span>', "<")
            assert f"left:{100 * t:.1f}%" in card and f"width:{100 * p:.1f}%" in card
            assert ("borderline" in card) == bool(d.borderline[0])
            assert bool(d.borderline[0]) == (abs(d.probability[0] - t) < 0.05)


def test_flagged_card_has_no_decision():
    from app.render import answer_card

    card = answer_card({"model": "m", "out_of_distribution": True, "message": "Not an X-ray <b>"}, True)
    assert "Not analysed" in card and "PNEUMONIA" not in card and "&lt;b&gt;" in card


def test_controls_redraw_without_prediction():
    import gradio as gr

    from app import handlers

    assert all(isinstance(u, type(gr.skip())) for u in handlers.reblend(True, 0.5, None, n_models=1))

    def panel(show_map, opacity):                                       # the one model's panel, by name
        return handlers.named_outputs(handlers.reblend(show_map, opacity, state, n_models=1))["panels"][0]

    display = make_xray(1, False).convert("RGB")
    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    r = {"model": "m", "out_of_distribution": False, "heatmap_method": "Grad-CAM", "heatmap_class": "PNEUMONIA",
         "decision": "PNEUMONIA", "probability": 0.7, "threshold": 0.5, "positive_label": "PNEUMONIA"}
    state = {"display": display, "results": [(r, heat)]}
    faint, strong = (panel(True, o)["image"]["value"] for o in (0.0, 1.0))
    assert np.abs(np.asarray(faint, int) - np.asarray(strong, int)).max() > 50
    assert np.array_equal(np.asarray(faint), np.asarray(display))      # opacity 0: the plain film
    assert isinstance(panel(True, 1.0)["card"], type(gr.skip()))        # the card stays
    hidden = panel(False, 1.0)                                          # unticked: film, no map, no caption
    assert hidden["image"]["value"] is display and hidden["caption"]["visible"] is False
    shown = panel(True, 1.0)
    assert shown["caption"]["visible"] and "colorbar" in shown["caption"]["value"]
    assert "not a map of disease" in shown["caption"]["value"]
    assert "heat map for PNEUMONIA" in shown["image"]["alt_text"] and "100 % strength" in shown["image"]["alt_text"]


def test_overlay_is_transparent_where_the_map_is_zero():
    from cxr.explain import evidence_map, overlay

    display = make_xray(2, False, 64).convert("RGB")
    heat = np.zeros((64, 64), np.float32)
    heat[20:30, 20:30] = 1.0
    out = np.asarray(overlay(display, heat, 1.0), int)
    base = np.asarray(display, int)
    assert np.array_equal(out[:10, :10], base[:10, :10]) and np.abs(out[25, 25] - base[25, 25]).max() > 50
    weak = np.asarray(overlay(display, evidence_map(heat, 0.01), 1.0), int)
    assert np.abs(weak - base).max() <= 4
    low = np.full((64, 64), 0.2, np.float32)                             # below the floor: not drawn
    assert np.array_equal(np.asarray(overlay(display, low, 1.0)), np.asarray(display))


def test_map_strength_follows_the_answer_and_the_legend_says_so():
    """Any PNEUMONIA answer (P >= threshold) gets the full map, so P = 0.50 is visible; below the
    threshold the map fades as P / threshold; the caption states the strength used."""
    from app.render import map_caption
    from cxr.explain import evidence_map, map_strength

    heat = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    assert evidence_map(heat, 0.50, 0.34).max() == pytest.approx(1.0)
    assert evidence_map(heat, 0.17, 0.34).max() == pytest.approx(0.5)
    assert evidence_map(heat, 0.60).max() == pytest.approx(0.6)            # no threshold: the old scaling
    for p, t in ((0.5, 0.34), (0.99, 0.34), (0.17, 0.34), (0.01, 0.5)):
        r = {"model": "m", "heatmap_method": "Grad-CAM", "heatmap_class": "PNEUMONIA", "probability": p,
             "threshold": t, "positive_label": "PNEUMONIA"}
        cap = map_caption(r)
        s = map_strength(p, t)
        assert f'data-strength="{s:.3f}"' in cap and (f"drawn at {100 * s:.0f} % strength" in cap) == (p < t)
        assert ("drawn at full strength" in cap) == (p >= t) and ("cxr-colorbar-unused" in cap) == (s < 0.995)
        assert "no evidence" not in cap


def test_example_labels_come_from_the_attribution():
    from app import handlers

    paths = handlers.example_paths()
    labels = [handlers.example_label(p) for p in paths]
    assert len(paths) == 6 and all(labels)
    assert [lab.split()[0] for lab in labels] == ["NORMAL", "PNEUMONIA"] * 3




def test_show_film_and_predict_button(model_folders, tmp_path):
    from app import handlers

    film(tmp_path, "f.png")
    def show(file):
        return handlers.named_outputs(handlers.show_film(file, None, n_models=1), handlers.FILM_OUTPUTS)

    out = show(_stored_upload(tmp_path, "f.png"))
    assert out["film"]["visible"] and out["film"]["value"].size == (96, 96) and out["button"]["interactive"] is True
    assert out["state"]["name"] == "f.png" and len(out["panels"]) == 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    bad = show(_stored_upload(tmp_path, "bad.png"))
    assert bad["notice"]["visible"] and "Cannot use this file" in bad["notice"]["value"]
    assert bad["button"]["interactive"] is False and bad["state"] is None
    assert show(None)["button"]["interactive"] is False


def test_predict_button_uses_the_film_decoded_on_upload(model_folders, tmp_path):
    """One decode per upload: Predict uses the film show_film decoded (no second decode), answers
    in the one schema, removes the upload, empties the file box, keeps no full-size film, and
    writes the result to download (overlay PNG, report, answer JSON)."""
    from app import handlers
    from cxr.api import ModelAnswer

    predictor = Predictor.from_pretrained(model_folders[0], precision="fp32")
    film(tmp_path, "g.png")
    path = _stored_upload(tmp_path, "g.png")
    state = handlers.named_outputs(handlers.show_film(path, None, n_models=1), handlers.FILM_OUTPUTS)["state"]
    Path(path).write_bytes(b"not an image")                         # a second decode would fail
    out = handlers.named_outputs(handlers.predict_ui(path, True, 0.5, state, predictors=[predictor]),
                                 handlers.RESULT_OUTPUTS)
    file_box, film_box, button, downloads, new_state = (out[k] for k in ("file", "film", "button", "downloads",
                                                                         "state"))
    (panel,) = out["panels"]
    card, image, caption, map_class = (panel[k] for k in handlers.PANEL)
    assert not Path(path).exists()                                  # decoded once (on upload), then removed
    assert file_box["value"] is None and button["interactive"] is False and film_box["visible"]
    assert set(new_state) == {"display", "path", "results", "maps", "name"} and max(new_state["display"].size) <= 512
    assert new_state["maps"] == [{}] and map_class["visible"] is False     # a binary model: no per-class choice
    (r, heat), = new_state["results"]
    assert set(r) == set(typing.get_type_hints(ModelAnswer)) and r["decision"] == "PNEUMONIA" and heat.shape == (64, 64)
    assert 'data-decision="PNEUMONIA"' in card["value"] and image["visible"] and caption["visible"]
    got = {Path(p).name: Path(p) for p in downloads["value"]}
    assert set(got) == {"cxr-overlay-edge.png", "cxr-report.md", "cxr-answer.json"}
    assert Image.open(got["cxr-overlay-edge.png"]).size == new_state["display"].size
    assert "**PNEUMONIA**" in got["cxr-report.md"].read_text() and "g.png" in got["cxr-report.md"].read_text()
    assert json.loads(got["cxr-answer.json"].read_text())["models"][0]["decision"] == "PNEUMONIA"
    from app import files
    assert all(str(p).startswith(str(files.janitor().root)) for p in got.values())   # swept like uploads


def test_choosing_models_after_the_answer_rewrites_the_result_files(model_folders, tmp_path):
    """The result to download follows the visitor's choice of models (the chooser's chained
    event): a hidden model's overlay and section leave the report and the JSON; an example
    film keeps its label; no model shown: nothing to download; no answer yet: nothing changes."""
    import gradio as gr

    from app import handlers

    predictors = [Predictor.from_pretrained(f, precision="fp32") for f in model_folders]
    film(tmp_path, "h.png")
    def result(values):
        return handlers.named_outputs(values, handlers.RESULT_OUTPUTS)

    def choose(names, state):
        return handlers.named_outputs(handlers.show_models(names, True, 0.6, state, n_models=2),
                                      handlers.MODELS_OUTPUTS)["state"]

    out = result(handlers.predict_ui(_stored_upload(tmp_path, "h.png"), True, 0.6, None, predictors=predictors))
    state = out["state"]
    assert {Path(p).name for p in out["downloads"]["value"]} >= {"cxr-overlay-edge.png", "cxr-overlay-sure-normal.png"}
    state = choose(["sure-normal"], state)
    got = {Path(p).name: Path(p) for p in handlers.refresh_downloads(0.6, state)["value"]}
    assert set(got) == {"cxr-overlay-sure-normal.png", "cxr-report.md", "cxr-answer.json"}
    report = got["cxr-report.md"].read_text()
    assert "## sure-normal" in report and "## edge" not in report and "h.png" in report
    assert [m["model"] for m in json.loads(got["cxr-answer.json"].read_text())["models"]] == ["sure-normal"]
    state = choose([], state)
    assert handlers.refresh_downloads(0.6, state) == gr.update(value=None, visible=False)
    assert isinstance(handlers.refresh_downloads(0.6, None), type(gr.skip()))
    example = result(handlers.predict_example(0, True, 0.6, predictors=predictors))["state"]
    example = choose(["edge"], example)
    answer = next(Path(p) for p in handlers.refresh_downloads(0.6, example)["value"] if p.endswith(".json"))
    label = handlers.example_label(handlers.example_paths()[0])
    assert label and json.loads(answer.read_text())["label_in_data_set"] == label


@pytest.mark.slow   # a trained model: the session's real training
def test_model_facts_in_visitor_words(model_folders, trained_folder):
    from app import render

    facts = render.model_facts(Predictor.from_pretrained(model_folders[0], precision="fp32"))
    assert "Cross-validated | 5 folds; AUROC 0.910 ± 0.020" in facts
    assert "Set-aside films | 16 films; AUROC 0.870" in facts and "External data" not in facts
    assert "further than" in facts and "Another hospital's films | not measured" in facts
    plain = render.model_facts(Predictor.from_pretrained(trained_folder, precision="fp32"))
    predictor = Predictor.from_pretrained(trained_folder, precision="fp32")
    assert "Cross-validated | not measured" in plain
    assert ("colour check only" in plain) == (predictor.ood is None) != ("further than" in plain)
    assert "transfer learning" in render.TEACHING.lower()


def test_shipped_default_facts_name_the_hold_out_and_every_figure_it_has():
    """The shipped default's facts panel names the films each of its figures was measured on and
    shows the figures its folder holds - read from the folder, not pinned here: the default's
    weights and threshold are replaced from time to time (tests/test_shipped_pins.py pins them)."""
    from app import render
    from cxr.api import model_info

    predictor = Predictor.from_pretrained(ROOT / "models" / "efficientnet-lite0-imagenet-full", precision="fp32")
    facts = render.model_facts(predictor)
    rows = dict(line.strip("|").split("|", 1) for line in facts.splitlines() if line.startswith("| "))
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    figures = model_info(predictor)["figures"]
    held = figures["external"]["metrics"]
    assert held, "the shipped default has no hold-out figures"
    assert "hold-out" in rows["Set-aside films"] and "same hospital" in rows["Set-aside films"]
    for key, name in (("specificity", "specificity"), ("sensitivity", "sensitivity"), ("roc_auc", "AUROC")):
        if key in held:
            assert f"{name} {held[key]:.3f}" in rows["Set-aside films"], key
    if "n" in held:
        assert f"{held['n']} films" in rows["Set-aside films"]
    cv = figures["cross_validated"]["metrics"]
    if cv:
        auc = cv["roc_auc"]
        assert rows["Cross-validated"].startswith(f"{cv['k']} folds; AUROC {auc['mean']:.3f} ± {auc['sd']:.3f}")
    else:
        assert rows["Cross-validated"] == "not measured for this model"
    other = figures.get("independent")
    if other:
        assert f"specificity about {other['metrics']['specificity']:.2f}" in rows["Another hospital's films"]
        assert "is called PNEUMONIA" in rows["Another hospital's films"]
    else:
        assert rows["Another hospital's films"].startswith("not measured for this model: expect lower specificity")
    assert "cxr-calibrate" in rows["Another hospital's films"]
    assert f"{predictor.operating_point.threshold:.3f}: PNEUMONIA" in rows["Decision threshold"]
    assert "External" not in facts and "timm_wrapper" not in facts and "| pool |" not in facts
    assert "EfficientNet" in rows["Network"]


def test_plain_app_serves_every_shipped_model_default_first(monkeypatch):
    """A plain ``cxr-app`` in this checkout serves the default first, then every other complete
    model folder in models/ by name (whatever the lead ships there: two binary models, a
    three-class one, ...); CXR_SHIPPED_MODELS narrows it; a Hub model in MODEL_ID serves alone."""
    from app.app import SHIPPED_ENV, is_shipped_folder, shipped_models

    for var in ("CXR_MODEL", "MODEL_ID", SHIPPED_ENV):
        monkeypatch.delenv(var, raising=False)
    models = ROOT / "models"
    others = sorted(str(p) for p in models.iterdir()
                    if p.name != "efficientnet-lite0-imagenet-full" and is_shipped_folder(p))
    assert str(models / "cxr-resnet-small-scratch") in others
    assert shipped_models() == [None, *others]
    monkeypatch.setenv(SHIPPED_ENV, "cxr-resnet-small-scratch")
    assert shipped_models() == [None, str(models / "cxr-resnet-small-scratch")]
    monkeypatch.setenv("MODEL_ID", "someone/model")
    assert shipped_models() == [None]


def test_parse_models():
    from app.app import parse_models

    assert parse_models(None) == [None]
    assert parse_models(["a,b", "c"]) == ["a", "b", "c"]


@pytest.mark.slow
def test_app_refuses_bad_model_at_startup(trained_folder, tmp_path, capsys):
    import shutil

    from app import app as app_module

    bad = tmp_path / "pickle"
    shutil.copytree(trained_folder, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    assert app_module.main(["--model", str(trained_folder), "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "only pickle weights" in err and "Traceback" not in err
