"""The REST API (app/rest.py) on the app's own server: each endpoint, each refusal, the shared
queue with the Gradio API, the schema (one, from cxr.api) and its docs; the README's REST
snippets. Server tests are marked slow one by one; the schema and slot tests are fast."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import threading
import time
import typing

import httpx
import numpy as np
import pytest
from PIL import Image

from cxr.api import FIELDS, MODEL_INFO_FIELDS, Answer, ModelAnswer, ModelInfo, answer, model_answer
from cxr.inference import DISCLAIMER, Prediction, Predictor
from tests.helpers import PHI, ROOT, greyscale_photo, make_dicom, make_model_folder, make_xray

ANSWER_KEYS = set(typing.get_type_hints(Answer))


# ------------------------------------------------------------------ the schema (fast)

def test_every_field_of_the_one_schema_is_described():
    assert set(typing.get_type_hints(Answer)) == set(FIELDS) == set(typing.get_type_hints(ModelAnswer)) | {"models"}
    assert set(typing.get_type_hints(ModelInfo)) == set(MODEL_INFO_FIELDS)
    assert all(len(d) > 20 for d in [*FIELDS.values(), *MODEL_INFO_FIELDS.values()])
    from app import rest

    for model in (rest.RestAnswer, rest.RestModelAnswer, rest.RestModelInfo, rest.Health, rest.ErrorBody,
                  rest.FindingModel, rest.ScreeningModel):
        assert all(f.description for f in model.model_fields.values()), model
    assert set(rest.RestAnswer.model_fields) == ANSWER_KEYS
    # the label-set fields (#29) are typed and described down to their own fields
    schema = rest.RestAnswer.model_json_schema()
    assert set(schema["$defs"]["Finding"]["properties"]) == {"label", "probability", "threshold", "present"}
    assert set(schema["$defs"]["Screening"]["properties"]) == {"abnormal_probability", "threshold", "abnormal"}
    assert all(p.get("description") for d in ("Finding", "Screening") for p in schema["$defs"][d]["properties"].values())


def _prediction(flagged: bool) -> Prediction:
    return Prediction(label=None if flagged else "PNEUMONIA", probabilities={"NORMAL": 0.3, "PNEUMONIA": 0.7},
                      positive_label="PNEUMONIA", positive_probability=0.7, threshold=0.5, threshold_source="test",
                      out_of_distribution=flagged, warning="Not a chest X-ray." if flagged else None,
                      heatmap=np.ones((8, 6), np.float32), ood_score=30.0 if flagged else 3.0, ood_threshold=19.0,
                      borderline=False, model="m", heatmap_method="Grad-CAM")


def test_flagged_rule_in_one_place():
    ok, flagged = _prediction(False).to_api(heatmap="PNG"), _prediction(True).to_api(heatmap="PNG")
    assert set(ok) == set(flagged) == set(typing.get_type_hints(ModelAnswer))
    assert ok["decision"] == "PNEUMONIA" and ok["probability"] == 0.7 and ok["heatmap"] == "PNG"
    assert ok["heatmap_size"] == [8, 6] and ok["heatmap_method"] == "Grad-CAM" and ok["heatmap_class"] == "PNEUMONIA"
    for key in ("decision", "probability", "probabilities", "heatmap", "heatmap_size", "heatmap_method",
                "heatmap_class"):
        assert flagged[key] is None, key
    assert flagged["out_of_distribution"] and flagged["borderline"] is False and flagged["message"]
    whole = answer([ok, flagged])
    assert whole["models"] == [ok, flagged] and {k: v for k, v in whole.items() if k != "models"} == ok
    assert model_answer(_prediction(False))["heatmap"] is None
    with pytest.raises(ValueError):
        answer([])


def test_slots_limit_every_caller_to_the_same_number():
    from app.handlers import Slots

    slots, lock = Slots(2), threading.Lock()
    now, peak, seen_waiting = [0], [0], []

    def hold():
        with slots.hold():
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
                seen_waiting.append(slots.waiting)
            time.sleep(0.1)
            with lock:
                now[0] -= 1

    threads = [threading.Thread(target=hold) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak[0] == 2 and max(seen_waiting) >= 1
    assert slots.running == 0 and slots.waiting == 0


# ------------------------------------------------------------------ a real server

@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest-models")
    return (make_model_folder(root / "edge", p_positive=0.52, threshold=0.5, name_seed=1),
            make_model_folder(root / "sure-normal", p_positive=0.01, threshold=0.5, name_seed=2))


def _launch(predictors):
    from app import app as app_module

    demo = app_module.create_demo(predictors)
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    return demo, url.rstrip("/")


@pytest.fixture(scope="module")
def server(model_folders):
    demo, url = _launch([Predictor.from_pretrained(f, precision="fp32") for f in model_folders])
    yield url
    demo.close()


def png_bytes(seed=3, size=96) -> bytes:
    buf = io.BytesIO()
    make_xray(seed, True, size=size).save(buf, "PNG")
    return buf.getvalue()


def post(url, data: bytes | None, name="film.png", mime="image/png", params=None, form=None, field="file"):
    files = None if data is None else {field: (name, data, mime)}
    return httpx.post(f"{url}/api/v1/predict", files=files, params=params, data=form, timeout=120)


@pytest.mark.slow
def test_predict_answers_the_same_object_as_the_gradio_api(server, tmp_path):
    from gradio_client import Client, handle_file

    r = post(server, png_bytes())
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == ANSWER_KEYS and [m["model"] for m in body["models"]] == ["edge", "sure-normal"]
    assert {k: v for k, v in body.items() if k != "models"} == body["models"][0]
    edge, normal = body["models"]
    assert edge["decision"] == "PNEUMONIA" and edge["borderline"] and 0.5 <= edge["probability"] < 0.55
    assert normal["decision"] == "NORMAL" and normal["probability"] < 0.02
    assert all(m["heatmap"] is None and m["disclaimer"] == DISCLAIMER for m in body["models"])  # not asked
    (tmp_path / "film.png").write_bytes(png_bytes())
    client = Client(server, verbose=False, download_files=str(tmp_path / "dl"), analytics_enabled=False)
    gradio = client.predict(handle_file(str(tmp_path / "film.png")), False, api_name="/predict")
    assert gradio == body                       # the same object, field for field


@pytest.mark.slow
@pytest.mark.parametrize("where", ["query", "form"])
def test_heatmap_inline_as_base64_png(server, where):
    options = {"heatmap": "true", "model": "edge"}
    r = post(server, png_bytes(), params=options if where == "query" else None,
             form=options if where == "form" else None)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["model"] for m in body["models"]] == ["edge"] and body["model"] == "edge"
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap"], validate=True)))
    assert heat.format == "PNG" and list(heat.size[::-1]) == body["heatmap_size"] == [64, 64]
    assert np.asarray(heat).max() > 100 and body["heatmap_method"] == "Grad-CAM"


@pytest.mark.slow
def test_flagged_film_gets_no_answer_and_no_map(server):
    buf = io.BytesIO()
    greyscale_photo(5).save(buf, "PNG")
    body = post(server, buf.getvalue(), params={"heatmap": "true"}).json()
    for m in body["models"]:
        assert m["out_of_distribution"] and m["decision"] is None and m["probability"] is None
        assert m["heatmap"] is None and m["heatmap_size"] is None and m["heatmap_method"] is None
        assert "not meaningful" in m["message"] or "does not look like a chest X-ray" in m["message"]


@pytest.mark.slow
def test_dicom_and_jpeg_are_accepted_without_patient_data(server):
    img = make_xray(3, True, size=96)
    dcm = make_dicom(np.asarray(img, dtype=np.uint16) * 16)
    r = post(server, dcm, name="film.dcm", mime="application/dicom")
    assert r.status_code == 200 and set(r.json()) == ANSWER_KEYS      # decoded and answered (flagged or not)
    assert not any(p in r.text for p in PHI)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=95)
    jpeg = post(server, buf.getvalue(), name="film.jpeg", mime="image/jpeg")
    assert jpeg.status_code == 200 and jpeg.json()["decision"] == "PNEUMONIA"


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    make_xray(1, True, 128).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.slow
@pytest.mark.parametrize("case,status,words", [
    ("text", 415, "not a PNG, JPEG or DICOM image"),
    ("html", 415, "not a PNG, JPEG or DICOM image"),
    ("truncated", 400, "truncated or corrupt"),
    ("ct", 400, "CT"),
    ("empty", 400, "empty"),
    ("big", 413, "10 MB"),
    ("no-file-field", 400, "file"),
    ("unknown-model", 400, "edge, sure-normal"),
    ("bad-option", 400, "heatmap"),
])
def test_refusals_have_status_and_a_json_error_without_internals(server, tmp_path, case, status, words):
    kwargs = {}
    if case == "text":
        kwargs = dict(data=b"hello, this is text", name="fake.png")
    elif case == "html":
        kwargs = dict(data=b"<html><script>alert(1)</script></html>", name="page.png")
    elif case == "truncated":
        kwargs = dict(data=_truncated_jpeg(), name="cut.jpeg", mime="image/jpeg")
    elif case == "ct":
        kwargs = dict(data=make_dicom(np.full((64, 64), 1000, np.uint16), Modality="CT"), name="ct.dcm")
    elif case == "empty":
        kwargs = dict(data=b"")
    elif case == "big":
        kwargs = dict(data=b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024))
    elif case == "no-file-field":
        kwargs = dict(data=png_bytes(), field="image")
    elif case == "unknown-model":
        kwargs = dict(data=png_bytes(), params={"model": "nope"})
    elif case == "bad-option":
        kwargs = dict(data=png_bytes(), params={"heatmap": "perhaps"})
    r = post(server, **kwargs)
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and words in body["error"]
    assert "Traceback" not in r.text and str(tmp_path) not in r.text and "/tmp" not in r.text
    assert not any(p in r.text for p in PHI)


@pytest.mark.slow
def test_a_client_over_its_decode_budget_gets_429(server, monkeypatch):
    from app import budget

    monkeypatch.setattr(budget, "_BUDGET", budget.DecodeBudget(seconds=1e-6, window=1000.0))
    assert post(server, png_bytes()).status_code == 200          # the first decode spends the whole share
    r = post(server, png_bytes())
    assert r.status_code == 429 and "share of image decoding" in r.json()["error"]
    assert int(r.headers["retry-after"]) >= 1


@pytest.mark.slow
def test_never_opens_a_path_given_by_a_client(server):
    for value in ("/etc/passwd", str(ROOT / "app" / "app.py")):
        r = httpx.post(f"{server}/api/v1/predict", data={"file": value}, timeout=60)
        assert r.status_code == 400 and "root:" not in r.text and "import" not in r.text
    r = httpx.post(f"{server}/api/v1/predict", json={"file": "/etc/passwd"}, timeout=60)
    assert r.status_code in (400, 413, 415) and "root:" not in r.text


@pytest.mark.slow
def test_model_info_health_and_docs(server):
    info = httpx.get(f"{server}/api/v1/model-info", timeout=60).json()
    assert [m["model"] for m in info["models"]] == ["edge", "sure-normal"] and info["disclaimer"] == DISCLAIMER
    for m in info["models"]:
        assert set(m) == set(MODEL_INFO_FIELDS)
        assert m["labels"] == ["NORMAL", "PNEUMONIA"] and m["positive_label"] == "PNEUMONIA"
        assert m["threshold"] == 0.5 and m["operating_point"]["threshold"] == 0.5 and m["threshold_source"]
        assert m["input_size"] == [64, 64] and m["ood_threshold"] > 0 and m["heatmap_method"] == "Grad-CAM"
        assert m["figures"]["cross_validated"]["metrics"]["k"] == 5 and m["figures"]["external"]["measured_on"]
    health = httpx.get(f"{server}/health", timeout=60)
    h = health.json()
    assert health.status_code == 200 and h["status"] == "ok" and h["ready"] and h["models"] == ["edge", "sure-normal"]
    assert h["decode_workers"]["alive"] >= 1 and h["queue"]["limit"] == 2 and h["queue"]["max_waiting"] == 64
    schema = httpx.get(f"{server}/api/v1/openapi.json", timeout=60).json()
    assert {"/api/v1/predict", "/api/v1/model-info", "/health"} <= set(schema["paths"])
    predict = schema["paths"]["/api/v1/predict"]["post"]
    assert {"200", "400", "413", "415", "429", "503"} <= set(predict["responses"])
    props = schema["components"]["schemas"]["Answer"]["properties"]
    assert set(props) == ANSWER_KEYS and all(p.get("description") for p in props.values())
    params = {p["name"]: p for p in predict["parameters"]}
    assert {"heatmap", "model", "heatmap_class"} <= set(params) and all(p.get("description") for p in params.values())
    assert {"Finding", "Screening"} <= set(schema["components"]["schemas"])
    docs = httpx.get(f"{server}/api/v1/docs", timeout=60)
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/api/v1/openapi.json" in docs.text
    assert httpx.get(f"{server}/api/v1/docs", timeout=60).headers.get("x-content-type-options") == "nosniff"


@pytest.mark.slow
def test_gradio_api_page_documents_itself(server):
    from gradio_client import Client

    info = Client(server, verbose=False, analytics_enabled=False).view_api(print_info=False, return_format="dict")
    endpoint = info["named_endpoints"]["/predict"]
    params = {p["parameter_name"]: p for p in endpoint["parameters"]}
    assert set(params) == {"file", "show_heatmap", "heatmap_class"}
    assert params["heatmap_class"]["python_type"]["description"].startswith("Draw the map for this class")
    assert params["file"]["label"] == "file" and "handle_file" in params["file"]["python_type"]["description"]
    assert params["show_heatmap"]["python_type"]["description"].startswith("Also return")
    assert params["file"]["example_input"]["meta"]["_type"] == "gradio.FileData"     # handle_file(...) on the page
    returned = endpoint["returns"][0]["python_type"]["type"]
    for field in ANSWER_KEYS:
        assert re.search(rf"\b{field}: ", returned), field
    assert "(The model's answer at its operating point" in returned
    page = httpx.get(server, timeout=60).text
    assert "?view=api" in page and "api/v1/predict" in page


# ------------------------------------------------------------------ the shared queue

def _slow(predictor, seconds, counter):
    original = predictor.predict

    def slow_predict(*a, **k):
        with counter["lock"]:
            counter["now"] += 1
            counter["peak"] = max(counter["peak"], counter["now"])
        try:
            time.sleep(seconds)
            return original(*a, **k)
        finally:
            with counter["lock"]:
                counter["now"] -= 1
    predictor.predict = slow_predict


@pytest.mark.slow
def test_rest_and_gradio_share_one_limit(model_folders, tmp_path):
    from gradio_client import Client, handle_file

    counter = {"lock": threading.Lock(), "now": 0, "peak": 0}
    predictor = Predictor.from_pretrained(model_folders[0], precision="fp32")
    _slow(predictor, 0.6, counter)
    demo, url = _launch(predictor)
    (tmp_path / "film.png").write_bytes(png_bytes())
    outcomes, lock = [], threading.Lock()

    def rest_call():
        r = post(url, png_bytes())
        with lock:
            outcomes.append(("rest", r.status_code))

    def gradio_call():
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"), analytics_enabled=False)
        r = client.predict(handle_file(str(tmp_path / "film.png")), False, api_name="/predict")
        with lock:
            outcomes.append(("gradio", 200 if r["decision"] else 0))

    try:
        threads = [threading.Thread(target=f) for f in [rest_call, gradio_call] * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        demo.close()
    assert sorted(outcomes) == sorted([("rest", 200), ("gradio", 200)] * 3)
    assert counter["peak"] == 2           # never more than the 2 slots, REST and Gradio together


@pytest.mark.slow
def test_full_queue_is_refused_with_503_at_once(model_folders, monkeypatch):
    monkeypatch.setenv("CXR_QUEUE_SIZE", "1")
    counter = {"lock": threading.Lock(), "now": 0, "peak": 0}
    predictor = Predictor.from_pretrained(model_folders[0], precision="fp32")
    _slow(predictor, 1.5, counter)
    demo, url = _launch(predictor)
    outcomes, lock = [], threading.Lock()

    def one():
        t0 = time.perf_counter()
        r = post(url, png_bytes())
        with lock:
            outcomes.append((r.status_code, r.json(), r.headers.get("retry-after"), time.perf_counter() - t0))

    try:
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        h = httpx.get(f"{url}/health", timeout=30).json()
        for t in threads:
            t.join(120)
    finally:
        demo.close()
    ok = [o for o in outcomes if o[0] == 200]
    refused = [o for o in outcomes if o[0] != 200]
    assert len(outcomes) == 6 and 1 <= len(ok) <= 3 and refused
    assert all(s == 503 and "queue is full" in b["error"] and ra == "5" and dt < 1.5 for s, b, ra, dt in refused)
    assert h["queue"]["max_waiting"] == 1 and h["queue"]["running"] >= 1


# ------------------------------------------------------------------ README

def readme_snippets() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```\w+\n(.*?)```", text, flags=re.S))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rest_curl", "rest_httpx"])
def test_readme_rest_snippets_run(name, server, tmp_path):
    snippets = readme_snippets()
    assert name in snippets, f"README.md has no '<!-- snippet: {name} -->' block (its API section leads with it)"
    make_xray(8, True, size=96).convert("RGB").save(tmp_path / "chest_xray.jpeg")
    code = snippets[name].replace("http://127.0.0.1:7860", server)
    cmd = ["bash", "-c", code] if name == "rest_curl" else [sys.executable, "-c", code]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip()
    if name == "rest_curl":
        import json

        body = json.loads(out)
        assert set(body) == ANSWER_KEYS and body["decision"] == "PNEUMONIA"
    else:
        assert out.splitlines()[-1].split()[0] == "PNEUMONIA"


@pytest.mark.slow
def test_benchmark_clients_get_the_same_answer(server, tmp_path):
    from benchmarks.gradio_http import HttpUser, RestUser

    path = tmp_path / "film.png"
    path.write_bytes(png_bytes())
    rest, gradio = RestUser(server), HttpUser(server)
    try:
        a, b = rest.predict(path, heatmap=True)[0], gradio.predict(path, heatmap=True)[0]
    finally:
        rest.close()
        gradio.close()
    for x, y in zip(a["models"], b["models"], strict=True):
        assert isinstance(x["heatmap"], str) and y["heatmap"]["url"] and x["heatmap_size"] == y["heatmap_size"]
        assert {k: v for k, v in x.items() if k != "heatmap"} == {k: v for k, v in y.items() if k != "heatmap"}
