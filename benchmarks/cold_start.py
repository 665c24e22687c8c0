#!/usr/bin/env python
"""Cold start: how long a new process takes to give its first answer, and its memory then.

Each round starts fresh processes (nothing imported, the OS page cache warm after the first
round, as on a machine that has run the tool before):

1. **library** (``cxr-predict``'s path): a ``python -c`` child that imports ``cxr.inference``,
   loads the ``Predictor`` from the model folder and predicts one film. It reports, from inside,
   the seconds to import, to load, to the first answer, and to a second answer (warm), and its
   peak RSS. The wall time around the child (interpreter start included) is measured outside.
2. **app** (``cxr-app``'s path): ``python app/app.py --model M --port P`` started as a user
   starts it; the clock stops when ``GET /health`` answers 200 (the page and the API are served
   then), then the first ``POST /api/v1/predict`` of one film is timed and the app's RSS read.

    python -m benchmarks.cold_start [--quick] [--model DIR] [--rounds N] [--out JSON]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common  # run from the repository root: python -m benchmarks.<name>

NAME = "cold_start"

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from cxr.inference import Predictor
t1 = time.perf_counter()
p = Predictor.from_pretrained(sys.argv[1])
t2 = time.perf_counter()
p.predict(sys.argv[2])
t3 = time.perf_counter()
p.predict(sys.argv[2])
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_predict_s": t3 - t2, "second_predict_s": t4 - t3,
                  "to_first_answer_s": t3 - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def parse(argv=None):
    ap = common.base_parser(__doc__, NAME)
    ap.add_argument("--model", default=str(common.DEFAULT_MODEL_DIR), help="model folder (default: the shipped default)")
    ap.add_argument("--rounds", type=int, default=None, help="fresh-process rounds of each kind (default 5; quick 1)")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def library_round(model: str, film: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(film)], capture_output=True, text=True,
                         cwd=common.ROOT, timeout=600)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"error: the library child failed:\n{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall    # interpreter start + import + load + both answers + exit
    return res


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def app_round(model: str, film: Path) -> dict:
    import httpx

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    log = common.temp_dir("app") / "app.log"     # a file, not a pipe: a full pipe would stall the app
    proc = subprocess.Popen([sys.executable, "app/app.py", "--model", model, "--port", str(port)], cwd=common.ROOT,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    try:
        ready = None
        while time.perf_counter() - t0 < 300:
            if proc.poll() is not None:
                raise SystemExit(f"error: the app exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    ready = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        if ready is None:
            raise SystemExit("error: the app did not answer /health within 300 s")
        rss_ready = _rss_mb(proc.pid)
        t1 = time.perf_counter()
        with film.open("rb") as f:
            r = httpx.post(f"http://127.0.0.1:{port}/api/v1/predict", files={"file": (film.name, f, "image/jpeg")},
                           timeout=120)
        first = time.perf_counter() - t1
        if r.status_code != 200:
            raise SystemExit(f"error: first /api/v1/predict answered {r.status_code}: {r.text[:300]}")
        return {"to_health_s": ready, "first_predict_s": first, "to_first_answer_s": ready + first,
                "rss_ready_mb": rss_ready, "rss_after_first_mb": _rss_mb(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def summary(rounds: list[dict]) -> dict:
    keys = [k for k, v in rounds[0].items() if isinstance(v, (int, float))]
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in keys}


def main(argv=None) -> int:
    args = parse(argv)
    info = common.machine_info()
    common.print_machine_info(info)
    data_dir, _ = common.resolve_data(args.data)
    film = common.find_images(data_dir, 1)[0]
    model = str(Path(args.model).resolve())
    print(f"model {model} | film {film.name} | {args.rounds} round(s) of each, fresh processes\n", flush=True)
    lib, app = [], []
    for i in range(args.rounds):
        lib.append(library_round(model, film))
        app.append(app_round(model, film))
        print(f"round {i + 1}: library first answer {lib[-1]['to_first_answer_s']:.2f} s (process "
              f"{lib[-1]['process_wall_s']:.2f} s) | app /health {app[-1]['to_health_s']:.2f} s, first answer "
              f"{app[-1]['to_first_answer_s']:.2f} s", flush=True)
    res = {"library": summary(lib), "app": summary(app)}
    common.print_table(["path (median of rounds)", "seconds / MB"], [
        ["library: import cxr.inference", res["library"]["import_s"]],
        ["library: load the Predictor", res["library"]["load_s"]],
        ["library: first predict", res["library"]["first_predict_s"]],
        ["library: import to first answer", res["library"]["to_first_answer_s"]],
        ["library: second predict (warm)", res["library"]["second_predict_s"]],
        ["library: peak RSS (MB)", res["library"]["peak_rss_mb"]],
        ["app: start to /health 200", res["app"]["to_health_s"]],
        ["app: first /api/v1/predict", res["app"]["first_predict_s"]],
        ["app: RSS when ready (MB)", res["app"]["rss_ready_mb"]],
    ])
    common.write_json(args.out, {
        "benchmark": NAME, "machine": info,
        "config": {"model": model, "film": film.name, "rounds": args.rounds, "quick": args.quick},
        "results": res, "rounds": {"library": lib, "app": app},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
