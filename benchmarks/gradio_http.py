"""The raw HTTP clients of the app, used by the latency benchmark and the app tests alike:
:class:`HttpUser` speaks Gradio's documented HTTP API for ``/predict`` (upload, call, the event's
SSE stream, then the heat-map download; inputs (file, show_heatmap)); :class:`RestUser` the REST
API on the same server (one multipart POST to ``/api/v1/predict``, the map inline as base64).
Both return ``[answer]``: the same JSON object (cxr.api), as Gradio's ``data`` list holds it."""

from __future__ import annotations

import json
import time
from pathlib import Path


class HttpUser:
    """One browser-like user: a kept-alive connection and Gradio's documented HTTP API."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)

    def predict(self, path: Path, heatmap: bool, steps: dict | None = None) -> list:
        t0 = time.perf_counter()
        r = self.http.post("/gradio_api/upload", files={"files": (path.name, path.read_bytes())})
        r.raise_for_status()
        t1 = time.perf_counter()
        file_data = {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}
        r = self.http.post("/gradio_api/call/predict", json={"data": [file_data, heatmap]})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        t2 = time.perf_counter()
        data, event = None, None
        with self.http.stream("GET", f"/gradio_api/call/predict/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line[5:])
                    break
        if event != "complete" or not isinstance(data, list):
            raise RuntimeError(f"request failed: {event}: {str(data)[:200]}")
        t3 = time.perf_counter()
        for model in data[0].get("models", [data[0]]):       # one JSON object; its heat-map file(s)
            heat = model.get("heatmap")
            if isinstance(heat, dict) and heat.get("url"):
                self.http.get(heat["url"]).raise_for_status()
        t4 = time.perf_counter()
        if steps is not None:
            for k, v in (("upload", t1 - t0), ("call", t2 - t1), ("queue_and_run", t3 - t2), ("download", t4 - t3)):
                steps.setdefault(k, []).append(v)
        return data

    def close(self):
        self.http.close()


class RestUser:
    """One REST client: a kept-alive connection, one POST per prediction (app/rest.py)."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)

    def predict(self, path: Path, heatmap: bool, steps: dict | None = None) -> list:
        t0 = time.perf_counter()
        r = self.http.post("/api/v1/predict", params={"heatmap": str(bool(heatmap)).lower()},
                           files={"file": (path.name, path.read_bytes())})
        if r.status_code != 200:
            raise RuntimeError(f"request failed: {r.status_code}: {r.text[:200]}")
        data = [r.json()]
        if steps is not None:
            steps.setdefault("request", []).append(time.perf_counter() - t0)
        return data

    def close(self):
        self.http.close()
