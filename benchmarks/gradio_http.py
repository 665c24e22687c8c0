"""The one raw HTTP client of the app's ``/predict`` API (Gradio's documented HTTP API: upload,
call, the event's SSE stream, then the heat-map download), used by the latency benchmark and the
app tests alike. Inputs of ``/predict``: (file, show_heatmap)."""

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
