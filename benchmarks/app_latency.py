#!/usr/bin/env python
"""Gradio app latency and throughput, through the real app and the real client.

The app is launched in-process exactly as ``app/app.py`` does it (``create_demo`` +
``launch``: the hardened settings, queue, ``concurrency_limit=2`` on /predict) on
127.0.0.1 and a free port. A user is a kept-alive HTTP connection (as a browser tab has)
speaking Gradio's documented HTTP API: ``POST /gradio_api/upload`` (the file),
``POST /gradio_api/call/predict`` (file, show_heatmap), the event's SSE stream until
``complete`` (one JSON object), then ``GET`` of the heat-map PNG it names.
A request's latency is the wall time of those steps: upload, queue, decode, inference, heat
map (if asked), overlay, encoding and the download of the results.

1. **sequential**: ``--requests`` single requests one after the other, with the heat map
   (Grad-CAM / attention rollout) and without; p50/p95/mean latency (2 untimed warm-ups each)
   and the median time of each step. The same with ``gradio_client.Client.predict`` (the
   Python client) for comparison: it adds its own overhead (status polling every 50 ms).
2. **load**: ``--concurrency`` users (threads, each its own ``httpx.Client``, created
   before the clock starts) share a budget of ``--load-requests`` requests and a ``--time-limit``;
   p50/p95 latency, throughput (successful requests/s over the test's wall time), errors.
3. **memory**: this process's RSS (the server runs in it) after start-up, after model load +
   launch, every 100 sequential requests, after the sequential runs and after the load test.
   Each HTTP API call opens a new Gradio session (a browser tab keeps one), so this is the
   worst case for per-session memory. The download step also fetches the raw heat-map PNG,
   which a browser only offers as a link: slightly pessimistic.

Models: ``--model DIR`` (default: the shipped from-scratch model ``models/cxr-resnet-small-scratch``,
which most of the README's figures use, or a random-init cxr-resnet-small-scratch if it is
missing), a preset name, or ``vit-b16-random`` for a random-init ViT-B/16 (``ViTConfig()``
defaults, 224 px) so that ViT-B/16 latency is measurable offline.

    python -m benchmarks.app_latency [--quick] [--data DIR] [--model DIR|PRESET|vit-b16-random]
                                     [--requests N] [--concurrency C] [--out JSON]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks import common  # run from the repository root: python -m benchmarks.<name>
from benchmarks.gradio_http import HttpUser
from cxr.precision import PRECISIONS

NAME = "app_latency"


def parse(argv=None):
    ap = common.base_parser(__doc__, NAME)
    ap.add_argument("--model", default=None,
                    help="model folder, preset name or vit-b16-random (default: models/cxr-resnet-small-scratch)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--requests", type=int, default=None,
                    help="sequential requests per mode (heat map on / off); default 30, quick 4")
    ap.add_argument("--client-requests", type=int, default=None,
                    help="sequential gradio_client requests (default: --requests; it polls, so it is slow)")
    ap.add_argument("--concurrency", type=int, default=None, help="load-test client threads (default 4; quick 2)")
    ap.add_argument("--load-requests", type=int, default=None,
                    help="total load-test requests (default 60; quick 6)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="load-test time limit in seconds (default 180; quick 20)")
    ap.add_argument("--no-load-heatmap", action="store_true", help="load test without the heat map")
    args = ap.parse_args(argv)
    q = args.quick
    args.requests = args.requests or (4 if q else 30)
    args.concurrency = args.concurrency or (2 if q else 4)
    args.load_requests = args.load_requests or (6 if q else 60)
    args.time_limit = args.time_limit or (20.0 if q else 180.0)
    return args


def summary(latencies: list[float]) -> dict:
    """p50/p95/mean/min/max in milliseconds."""
    if not latencies:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None, "min_ms": None, "max_ms": None}
    ms = [x * 1000 for x in latencies]
    return {"n": len(ms), "p50_ms": common.percentile(ms, 50), "p95_ms": common.percentile(ms, 95),
            "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "max_ms": max(ms)}


def make_gradio_client(url: str, downloads: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


def gradio_client_call(client, path: Path, heatmap: bool):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), heatmap, api_name="/predict")


def sequential(call, images: list[Path], n: int, heatmap: bool, rss_every: int = 100) -> dict:
    """``call(path, heatmap, steps)`` ``n`` times after 2 warm-ups; latency summary, step medians
    and this process's RSS every ``rss_every`` requests (the server runs in it)."""
    for i in range(2):                                  # warm-up
        call(images[i % len(images)], heatmap, None)
    lat, steps, rss = [], {}, []
    for i in range(n):
        t0 = time.perf_counter()
        call(images[i % len(images)], heatmap, steps)
        lat.append(time.perf_counter() - t0)
        if (i + 1) % rss_every == 0:
            rss.append([i + 1, round(common.rss_mb(), 1)])
    out = summary(lat)
    window = max(100, n // 10)                          # is latency flat over a long run?
    if n >= 2 * window:
        out["p50_ms_by_window"] = {"window": window, "p50_ms": [
            round(statistics.median(lat[i:i + window]) * 1000, 1) for i in range(0, n - window + 1, window)]}
    if rss:
        out["rss_mb_every_%d" % rss_every] = rss
    if steps:
        out["step_p50_ms"] = {k: statistics.median(v) * 1000 for k, v in steps.items()}
    return out


def load_test(url: str, images: list[Path], *, concurrency: int, total: int,
              time_limit: float, heatmap: bool) -> dict:
    """``concurrency`` threads, each an :class:`HttpUser`, share ``total`` requests until
    ``time_limit`` seconds have passed."""
    clients = [HttpUser(url) for _ in range(concurrency)]
    lock, start = threading.Lock(), threading.Barrier(concurrency + 1)
    state = {"next": 0}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = [0.0]

    def worker(client):
        start.wait()
        while True:
            with lock:
                i = state["next"]
                if i >= total or time.perf_counter() >= deadline[0]:
                    return
                state["next"] += 1
            t0 = time.perf_counter()
            try:
                client.predict(images[i % len(images)], heatmap)
            except Exception as e:  # noqa: BLE001 - counted and reported, the test goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + time_limit
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join(timeout=time_limit + 120)   # a request in flight at the deadline may finish
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    out = summary(latencies)
    out.update(concurrency=concurrency, requests_sent=state["next"], errors=len(errors),
               error_examples=sorted(set(errors))[:5], wall_s=wall,
               throughput_rps=common.rate(len(latencies), wall), heatmap=heatmap,
               hit_time_limit=state["next"] < total)
    return out


def main(argv=None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    data_dir, synthetic = common.resolve_data(args.data)
    common.quiet_libraries()
    from app import app as app_module
    from cxr_train.data import processor_size
    from cxr.inference import Predictor

    info = common.machine_info()
    common.print_machine_info(info)
    memory = {"rss_start_mb": common.rss_mb()}
    model_dir, model_desc = common.resolve_model(args.model)
    images = common.find_images(data_dir, 16)
    downloads = common.temp_dir("client")

    predictor = Predictor.from_pretrained(model_dir, precision=args.precision)
    demo = app_module.create_demo(predictor)
    _, url, _ = app_module.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    url = url.rstrip("/")
    memory["rss_after_launch_mb"] = common.rss_mb()
    h, w = processor_size(predictor.processor)
    print(f"model: {model_desc} ({predictor.config.model_type}, {h}x{w} px, "
          f"{'bf16' if predictor.autocast_dtype is not None else 'fp32'}, explainer {predictor.describe()['explainer']})"
          f" | app at {url} | images from {data_dir}{' (synthetic)' if synthetic else ''}\n", flush=True)
    try:
        user = HttpUser(url)
        print(f"sequential: {args.requests} requests with the heat map, {args.requests} without ...", flush=True)
        seq_on = sequential(user.predict, images, args.requests, heatmap=True)
        seq_off = sequential(user.predict, images, args.requests, heatmap=False)
        user.close()
        n_gc = args.client_requests or args.requests
        print(f"sequential through gradio_client: {n_gc} requests with the heat map ...", flush=True)
        gclient = make_gradio_client(url, downloads)
        seq_gc = sequential(lambda p, h, _steps: gradio_client_call(gclient, p, h), images, n_gc, heatmap=True)
        memory["rss_after_sequential_mb"] = common.rss_mb()
        heat = not args.no_load_heatmap
        print(f"load: {args.concurrency} clients, {args.load_requests} requests, limit {args.time_limit:.0f} s, "
              f"heat map {'on' if heat else 'off'} ...", flush=True)
        load = load_test(url, images, concurrency=args.concurrency, total=args.load_requests,
                         time_limit=args.time_limit, heatmap=heat)
        memory["rss_after_load_mb"] = common.rss_mb()
    finally:
        demo.close()

    print()
    common.print_table(["requests", "n", "p50 ms", "p95 ms", "mean ms"], [
        ["sequential, heat map", seq_on["n"], seq_on["p50_ms"], seq_on["p95_ms"], seq_on["mean_ms"]],
        ["sequential, no heat map", seq_off["n"], seq_off["p50_ms"], seq_off["p95_ms"], seq_off["mean_ms"]],
        ["sequential, heat map, gradio_client", seq_gc["n"], seq_gc["p50_ms"], seq_gc["p95_ms"], seq_gc["mean_ms"]],
        [f"load, {args.concurrency} clients", load["n"], load["p50_ms"], load["p95_ms"], load["mean_ms"]],
    ])
    print("median step times, heat map (ms): " + ", ".join(
        f"{k} {common.fmt(v)}" for k, v in seq_on.get("step_p50_ms", {}).items()))
    shipped = Path(model_dir).resolve().parent == (common.ROOT / "models").resolve()
    goal = "OK" if seq_on["p50_ms"] is not None and seq_on["p50_ms"] <= 150 else "BELOW GOAL"
    print(f"p50 with the heat map (HTTP API): {common.fmt(seq_on['p50_ms'])} ms; goal for a shipped model "
          f"<= 150 ms: {goal if shipped else 'n/a (not a shipped model)'}")
    print(f"load test: {common.fmt(load['throughput_rps'], 2)} requests/s, {load['errors']} error(s) of "
          f"{load['requests_sent']} sent{' (time limit hit)' if load['hit_time_limit'] else ''}")
    for e in load["error_examples"]:
        print(f"  error: {e}")
    print("RSS MiB: " + ", ".join(f"{k[4:-3]} {v:,.0f}" for k, v in memory.items()))
    for name, seq in (("heat map", seq_on), ("no heat map", seq_off)):
        if seq.get("rss_mb_every_100"):
            print(f"RSS MiB during the sequential requests ({name}), every 100: "
                  + ", ".join(f"{v:,.0f}" for _, v in seq["rss_mb_every_100"]))
        if seq.get("p50_ms_by_window"):
            w = seq["p50_ms_by_window"]
            print(f"p50 ms per {w['window']} sequential requests ({name}): "
                  + ", ".join(f"{v:.0f}" for v in w["p50_ms"]))
    print()

    common.write_json(args.out, {
        "benchmark": NAME, "machine": info,
        "config": {"model": str(model_dir), "model_description": model_desc,
                   "model_type": predictor.config.model_type, "input_size": [h, w],
                   "precision": "bf16" if predictor.autocast_dtype is not None else "fp32",
                   "requests": args.requests, "client_requests": n_gc, "concurrency": args.concurrency,
                   "load_requests": args.load_requests, "time_limit_s": args.time_limit,
                   "data": str(data_dir), "synthetic_data": synthetic, "quick": args.quick},
        "results": {"sequential_heatmap": seq_on, "sequential_no_heatmap": seq_off,
                    "sequential_heatmap_gradio_client": seq_gc, "load": load,
                    "memory": memory},
        "goals": {"sequential_heatmap_p50_ms_max": 150},
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
