"""Gradio Space: NORMAL vs PNEUMONIA on a chest X-ray: the decision at the model's operating
point, its probability with the threshold on the same scale, a heat map, and several models
side by side. Research and education only: not a medical device.

    python app/app.py                                   # the project's shipped default model
    python app/app.py --model outputs/a --model outputs/b   # compare models (or --model a,b)
    MODEL_ID=user/model-a,user/model-b python app/app.py    # Hub models (MODEL_REVISION pins one)

Handlers are plain functions; ``create_demo(predictors)`` only wires them. Models are loaded
once, at start-up; a missing, pickle-only or corrupt model stops start-up with a clear error.
The API is one endpoint, ``/predict`` (file, show_heatmap) -> one JSON object.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import html
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.explain import EXPLAINER_NAMES, colorbar_css, evidence_map, heatmap_image, overlay
from cxr.imaging import ImageLoadError, load_image
from cxr.locate import IMAGE_SUFFIXES
from cxr.inference import DISCLAIMER, ModelLoadError, Predictor

HERE = Path(__file__).resolve().parent

logger = logging.getLogger("cxr.app")

MAX_FILE_SIZE = "10mb"
MAX_REQUEST_BYTES = 10 * 1024 * 1024 + 64 * 1024   # one 10 MB file plus multipart overhead
MAX_FILES_PER_REQUEST = 1
ACCEPTED_TYPES = list(IMAGE_SUFFIXES)
DISPLAY_MAX_SIDE = 512
DEFAULT_OPACITY = 0.6
QUEUE_SIZE = 64            # waiting requests beyond the 2 running; more are refused at once (env CXR_QUEUE_SIZE)
SESSION_CAPACITY = 256     # sessions kept in memory (env CXR_SESSION_CAPACITY)
STATE_TTL_S = 1800         # a session's film + maps (for the slider / checkbox) expire after 30 min
UPLOAD_TTL_S = 300         # uploads and result files older than this are deleted (env CXR_UPLOAD_TTL_S)
SWEEP_EVERY_S = 30
GENERIC_ERROR = "Something went wrong while analysing this image. Please try another file."
EXAMPLES_DIR = HERE / "examples"
MAP_CAVEAT = ("Where the model's score came from, not a map of disease; a plausible map does not make "
              "the answer right.")

TEACHING = """
### What is transfer learning?
A network first learns general visual features on a large data set (for example ImageNet
photos, or other chest X-rays), then is **fine-tuned** on a smaller task, here NORMAL vs
PNEUMONIA. Strategies differ in how much of the network is retrained: only the final
classifier (*frozen backbone*), the last stages (*partial*), everything (*full*), or small
low-rank adapters added to the weights (*LoRA*). A model can also be trained *from scratch*.
When the Space serves several models, their answers and maps are shown side by side.

### What does the heat map mean?
**Grad-CAM** (convolutional networks) shows which regions raised the PNEUMONIA score;
**attention rollout** (vision transformers) shows where the model attended. Both are scaled
by the model's probability for PNEUMONIA, so a confident NORMAL shows little colour. A map is
*not* a segmentation of disease, and a plausible map does not make a prediction right:
models can rely on shortcuts such as text markers, borders or patient position.

### When is an image refused?
DICOM files must be radiographs (Modality CR, DX or RG). Any image far from the training films
in the model's own feature space (a distance fitted on the training films, with a limit set
on validation films and non-X-ray images) is flagged and gets no answer and no map.

### Limits
Trained on paediatric films from a single hospital. Unknown performance on adults, other
scanners or other findings. **Not a medical device.**
"""

CSS = """
.cxr-cards {display: flex; flex-wrap: wrap; gap: 10px;}
.cxr-card {flex: 1 1 200px; border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 12px;}
.cxr-model {font-size: 0.85em; opacity: 0.8; margin-bottom: 2px;}
.cxr-headline {font-size: 1.6em; font-weight: 700; line-height: 1.2; margin: 2px 0 6px 0;}
.cxr-headline.cxr-flagged {font-size: 1.15em;}
.cxr-tag {display: inline-block; font-size: 0.55em; vertical-align: middle; padding: 1px 6px; border-radius: 4px;
          background: #f6c343; color: #222; margin-left: 6px;}
.cxr-bar {position: relative; height: 16px; border-radius: 8px; background: var(--neutral-200); margin: 22px 0 4px 0;}
.cxr-fill {position: absolute; left: 0; top: 0; bottom: 0; border-radius: 8px; background: #4a6fa5;}
.cxr-thr {position: absolute; top: -6px; bottom: -6px; width: 3px; background: #222; margin-left: -1px;}
.cxr-thr-label {position: absolute; top: -22px; transform: translateX(-50%); font-size: 0.75em; white-space: nowrap;}
.cxr-scale {display: flex; justify-content: space-between; font-size: 0.75em; opacity: 0.75;}
.cxr-text {font-size: 0.9em; margin-top: 4px;}
.cxr-colorbar {height: 10px; border-radius: 5px; margin: 4px 0 2px 0;}
.cxr-map-caption {font-size: 0.85em;}
.cxr-notice {border-left: 4px solid #f6c343; padding: 6px 10px; font-size: 0.95em;}
#cxr-header p {font-size: 0.9em; margin-top: 2px;}
@media (max-width: 700px) {
  #cxr-film img, .cxr-panel img {max-height: 260px; object-fit: contain;}
  #cxr-header h1 {font-size: 1.3em !important; margin: 0 !important;}
  #cxr-header p {font-size: 0.8em;}
}
"""


# ------------------------------------------------------------------ results (the one story)

def result_dict(predictor: Predictor, result, heatmap_file: str | None = None) -> dict:
    """The API object for one model. ``decision`` is None for flagged inputs."""
    flagged = bool(result.out_of_distribution)
    method = EXPLAINER_NAMES.get(predictor.explainer_kind, predictor.explainer_kind)
    return {
        "model": predictor.name,
        "decision": None if flagged else result.label,
        "positive_label": result.positive_label,
        "probability": None if flagged else round(result.positive_probability, 4),
        "threshold": round(result.threshold, 4),
        "borderline": (not flagged) and result.borderline,       # the operating point's rule (cxr.operating_point)
        "borderline_margin": predictor.operating_point.borderline_margin,
        "probabilities": None if flagged else {k: round(v, 4) for k, v in result.probabilities.items()},
        "threshold_source": result.threshold_source,
        "out_of_distribution": flagged,
        "ood_score": None if result.ood_score is None else round(result.ood_score, 3),
        "ood_threshold": None if result.ood_threshold is None else round(result.ood_threshold, 3),
        "message": result.warning,
        "heatmap": heatmap_file,
        "heatmap_method": None if flagged else method,
        "heatmap_class": None if flagged else result.positive_label,
        "disclaimer": DISCLAIMER,
    }


def answer_card(r: dict, show_model: bool) -> str:
    """One model's answer: headline = decision; one bar for P(positive) with the threshold on it."""
    e = html.escape
    model = f'<div class="cxr-model">{e(r["model"])}</div>' if show_model else ""
    if r["out_of_distribution"]:
        return (f'<div class="cxr-card" data-testid="cxr-card" data-decision="none">{model}'
                f'<div class="cxr-headline cxr-flagged">Not analysed</div>'
                f'<div class="cxr-text">{e(r["message"] or "")}</div></div>')
    p, t, pos = r["probability"], r["threshold"], r["positive_label"]
    tag = '<span class="cxr-tag">borderline</span>' if r["borderline"] else ""
    side = "at or above" if p >= t else "below"
    caution = (f" It is within {r.get('borderline_margin', 0.05):.2f} of the threshold: treat it as uncertain."
               if r["borderline"] else "")
    return (f'<div class="cxr-card" data-testid="cxr-card" data-decision="{e(r["decision"])}">{model}'
            f'<div class="cxr-headline" data-testid="cxr-headline">{e(r["decision"])}{tag}</div>'
            f'<div class="cxr-bar" role="img" aria-label="probability of {e(pos)} {p:.2f}, threshold {t:.2f}">'
            f'<div class="cxr-fill" style="width:{100 * p:.1f}%"></div>'
            f'<div class="cxr-thr" data-testid="cxr-threshold" style="left:{100 * t:.1f}%"></div>'
            f'<div class="cxr-thr-label" style="left:{100 * t:.1f}%">threshold {t:.2f}</div></div>'
            f'<div class="cxr-scale"><span>0</span><span>probability of {e(pos)}</span><span>1</span></div>'
            f'<div class="cxr-text">Probability of {e(pos)}: <b>{p:.2f}</b>, {side} the model\'s threshold '
            f'{t:.2f}, so the answer is <b>{e(r["decision"])}</b>.{caution}</div></div>')


def answer_html(results: list[dict]) -> str:
    return '<div class="cxr-cards">' + "".join(answer_card(r, len(results) > 1) for r in results) + "</div>"


def map_caption(r: dict) -> str:
    """Colour bar, the method and the class it explains, and the caveat: beside the image."""
    return (f'<div class="cxr-map-caption"><b>{html.escape(r["heatmap_method"])}</b> for '
            f'{html.escape(r["heatmap_class"])}, scaled by its probability.'
            f'<div class="cxr-colorbar" style="background:{colorbar_css()}"></div>'
            f'<div class="cxr-scale"><span>no evidence (transparent)</span><span>strong</span></div>'
            f'{MAP_CAVEAT}</div>')


# ------------------------------------------------------------------ files: uploads, results, sweeping

class Janitor:
    """Owns the app's file lifecycle (Gradio's own delete_cache is off: its sweeper could die
    on a set changed during iteration). A daemon thread deletes files in the app's cache
    folder older than ``ttl`` every ``every`` seconds; an error is logged and the next round
    runs anyway. Files present right after start-up (example thumbnails) are kept until
    shutdown, where the whole folder is removed."""

    def __init__(self, root: Path, ttl: float = UPLOAD_TTL_S, every: float = SWEEP_EVERY_S):
        self.root, self.ttl, self.every = Path(root), ttl, every
        self.protected: set[str] = set()
        self.blocks: list[gr.Blocks] = []
        self.rounds = self.removed = self.errors = 0
        self._pending: dict[str, int] = {}      # upload path -> uploads not yet read (same bytes, same path)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def protect_existing(self) -> None:
        self.protected |= {str(p) for p in self.root.rglob("*") if p.is_file()}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cxr-janitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - never die: log and sweep again next round
                self.errors += 1
                logger.exception("upload sweep failed; retrying in %.0f s", self.every)

    def sweep(self, max_age: float | None = None) -> int:
        """Delete unprotected files older than ``max_age`` (default ttl); returns how many."""
        cutoff = time.time() - (self.ttl if max_age is None else max_age)
        removed = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if path in self.protected:
                    continue
                try:
                    if os.lstat(path).st_mtime <= cutoff:
                        os.unlink(path)
                        removed.append(path)
                        with self._lock:
                            self._pending.pop(path, None)
                except FileNotFoundError:
                    pass
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            if dirpath != str(self.root):
                try:
                    os.rmdir(dirpath)       # only empty folders
                except OSError:
                    pass
        for blocks in list(self.blocks):    # Gradio's per-app sets of served paths would grow forever
            for s in [getattr(blocks, "upload_file_set", set()), *getattr(blocks, "temp_file_sets", [])]:
                for path in removed:
                    s.discard(path)
        self.rounds += 1
        self.removed += len(removed)
        return len(removed)

    def register_upload(self, paths) -> None:
        """Gradio stores an upload at <sha256 of its bytes>/<name>: two clients sending the same
        file share one path, so it is deleted only when every such upload has been read."""
        with self._lock:
            for path in paths:
                p = os.path.realpath(str(path))
                self._pending[p] = self._pending.get(p, 0) + 1

    def discard(self, path: str | None) -> None:
        """Delete one upload now (after its prediction), if it lies in the app's cache folder
        and no other upload of the same bytes is still waiting to be read."""
        if not path:
            return
        p = os.path.realpath(path)
        if p in self.protected or not p.startswith(str(self.root) + os.sep):
            return
        with self._lock:
            left = self._pending.pop(p, 1) - 1
            if left > 0:
                self._pending[p] = left
                return
        try:
            os.unlink(p)
        except OSError:
            pass

    def shutdown(self) -> None:
        self._stop.set()
        shutil.rmtree(self.root, ignore_errors=True)


_JANITOR: Janitor | None = None
_JANITOR_LOCK = threading.Lock()


def janitor() -> Janitor:
    """The process's Janitor, with its own private Gradio cache folder (GRADIO_TEMP_DIR)."""
    global _JANITOR
    with _JANITOR_LOCK:
        if _JANITOR is None or _JANITOR._stop.is_set():
            root = Path(tempfile.mkdtemp(prefix="cxr-app-")).resolve()
            os.environ["GRADIO_TEMP_DIR"] = str(root)
            _JANITOR = Janitor(root, float(os.environ.get("CXR_UPLOAD_TTL_S", UPLOAD_TTL_S)))
            atexit.register(_JANITOR.shutdown)
        return _JANITOR


class UploadGuard:
    """ASGI middleware: at most MAX_FILES_PER_REQUEST files and MAX_REQUEST_BYTES per upload
    request (413 otherwise, before Gradio stores anything), and every response carries
    ``X-Content-Type-Options: nosniff``; files served from the cache are attachments (an
    ``<img>`` still shows them, a browser never renders them as a page)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        is_file_route = "/file=" in path
        is_upload = scope.get("method") == "POST" and path.rstrip("/").endswith("/upload")
        response_body: list[bytes] = []
        status = [0]
        if is_upload:
            body, refused = await self._read_upload(scope, receive)
            if refused:
                return await self._refuse(send, refused)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()
            receive = replay

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                drop = {b"x-content-type-options"} | ({b"content-disposition"} if is_file_route else set())
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in drop]
                headers.append((b"x-content-type-options", b"nosniff"))
                if is_file_route:
                    headers.append((b"content-disposition", b"attachment"))
                message = dict(message, headers=headers)
                status[0] = message.get("status", 0)
            elif is_upload and message["type"] == "http.response.body" and status[0] == 200:
                response_body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    try:
                        janitor().register_upload(json.loads(b"".join(response_body)))
                    except (ValueError, TypeError):
                        pass
            await send(message)

        return await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _read_upload(scope, receive) -> tuple[bytes, str | None]:
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_REQUEST_BYTES:
            return b"", "upload too large: at most one file of 10 MB per request"
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", "client disconnected"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                return b"", "upload too large: at most one file of 10 MB per request"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body.count(b"filename=") > MAX_FILES_PER_REQUEST:
            return b"", f"too many files: at most {MAX_FILES_PER_REQUEST} per upload request"
        return body, None

    @staticmethod
    async def _refuse(send, text: str):
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"x-content-type-options", b"nosniff")]})
        await send({"type": "http.response.body", "body": text.encode()})


# ------------------------------------------------------------------ handlers

def _path_of(file) -> str | None:
    if file is None:
        return None
    if isinstance(file, str):
        return file
    if isinstance(file, dict):
        return file.get("path")
    return getattr(file, "path", None) or getattr(file, "name", None)


def _display_copy(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    return image


def _load(path: str) -> Image.Image:
    try:
        return load_image(path)
    except ImageLoadError as e:
        raise gr.Error(f"Cannot use this file: {e}.", print_exception=False) from None


def analyse(image: Image.Image, predictors: list[Predictor], *, explain: bool = True) -> list[tuple[dict, np.ndarray | None]]:
    """Each model's API dict and its evidence-weighted map (None when flagged or not asked)."""
    out = []
    for predictor in predictors:
        try:
            result = predictor.predict(image, explain=explain)
        except ImageLoadError as e:
            raise gr.Error(f"Cannot use this file: {e}.", print_exception=False) from None
        except Exception:  # noqa: BLE001 - the user gets a generic message, the log the details
            logger.exception("prediction failed")
            raise gr.Error(GENERIC_ERROR, print_exception=False) from None
        heat = None
        if result.heatmap is not None and not result.out_of_distribution:
            heat = evidence_map(result.heatmap, result.positive_probability)
        out.append((result_dict(predictor, result), heat))
    return out


def _write_heatmap(heat: np.ndarray) -> str:
    """The map as a PNG in the app's cache folder (served from there; swept after UPLOAD_TTL_S):
    one new file per request, no folder scan."""
    folder = janitor().root / "heatmaps"
    folder.mkdir(exist_ok=True)
    path = folder / f"heatmap-{uuid.uuid4().hex}.png"
    heatmap_image(heat).save(path)
    return str(path)


def api_predict(file: gr.FileData, show_heatmap: bool = True, *, predictors: list[Predictor]) -> dict:
    """Predict one chest X-ray (PNG, JPEG or DICOM). Returns one JSON object: the first model's
    decision, probability, threshold, borderline flag, out-of-distribution score and flag,
    heat-map file (a greyscale PNG at the model's input size) and the disclaimer; with several
    models, every model's object under ``models``."""
    path = _path_of(file)
    if not path:
        raise gr.Error("Please send a chest X-ray (PNG, JPEG or DICOM).", print_exception=False)
    try:
        image = _load(path)
    finally:
        janitor().discard(path)            # the upload is not kept once read
    results = []
    for r, heat in analyse(image, predictors, explain=bool(show_heatmap)):
        if heat is not None:
            r["heatmap"] = gr.FileData(path=_write_heatmap(heat), mime_type="image/png").model_dump()
            r["heatmap_size"] = list(heat.shape)
        results.append(r)
    return dict(results[0], models=results)


def _panel_updates(state: dict | None, show_map: bool, opacity: float, n: int) -> list:
    """Per model: overlay image and map caption, from the stored film and maps."""
    updates = []
    items = (state or {}).get("results") or []
    display = (state or {}).get("display")
    for i in range(n):
        if i >= len(items) or display is None:
            updates += [gr.update(visible=False, value=None), gr.update(visible=False, value="")]
            continue
        r, heat = items[i]
        label = f"{r['model']}: {r['heatmap_method']} for {r['heatmap_class']}" if heat is not None else r["model"]
        if r["out_of_distribution"]:
            updates += [gr.update(visible=False, value=None), gr.update(visible=False, value="")]
        elif show_map and heat is not None:
            updates += [gr.update(visible=True, value=overlay(display, heat, opacity), label=label),
                        gr.update(visible=True, value=map_caption(r))]
        else:
            updates += [gr.update(visible=True, value=display, label=r["model"]), gr.update(visible=False, value="")]
    return updates


def show_film(file, state, *, n_models: int):
    """On upload: the film decoded by the project's loader, or why it cannot be used."""
    path = _path_of(file)
    hidden = _panel_updates(None, False, 0, n_models)
    if not path:
        return [gr.update(value=None, visible=False), gr.update(value="", visible=False),
                gr.update(interactive=False), None, gr.update(value="", visible=False)] + hidden
    try:
        image = load_image(path)
    except ImageLoadError as e:
        janitor().discard(path)
        msg = f'<div class="cxr-notice">Cannot use this file: {html.escape(str(e))}.</div>'
        return [gr.update(value=None, visible=False), gr.update(value=msg, visible=True),
                gr.update(interactive=False), None, gr.update(value="", visible=False)] + hidden
    display = _display_copy(image)
    return [gr.update(value=display, visible=True), gr.update(value="", visible=False),
            gr.update(interactive=True), {"display": display, "path": path},
            gr.update(value="", visible=False)] + hidden


def predict_ui(file, show_map: bool, opacity: float, state, *, predictors: list[Predictor]):
    """Predict: every model's answer card, then its overlay (film + map) and map caption."""
    path = _path_of(file)
    if state and state.get("results") is not None and state.get("path") == path:
        results = state["results"]                     # same film again: same answer
    else:
        if not path:
            raise gr.Error("Please upload a chest X-ray (PNG, JPEG or DICOM).", print_exception=False)
        image = _load(path)
        janitor().discard(path)
        results = analyse(image, predictors, explain=True)
        state = {"display": _display_copy(image), "path": path, "results": results}
    answers = answer_html([r for r, _ in results])
    film = gr.update(visible=all(r["out_of_distribution"] for r, _ in results))  # the panels show the film now
    return [film, gr.update(value=answers, visible=True), state] + _panel_updates(state, show_map, opacity,
                                                                                  len(predictors))


def predict_example(index: int, show_map: bool, opacity: float, *, predictors: list[Predictor]):
    path = _examples()[index]
    image = load_image(path)
    display = _display_copy(image)
    results = analyse(image, predictors, explain=True)
    state = {"display": display, "path": f"example:{index}", "results": results}
    answers = answer_html([r for r, _ in results])
    film = gr.update(value=display, visible=all(r["out_of_distribution"] for r, _ in results))
    return ([gr.update(value=None), film, gr.update(value="", visible=False),
             gr.update(interactive=False), gr.update(value=answers, visible=True), state]
            + _panel_updates(state, show_map, opacity, len(predictors)))


def reblend(show_map: bool, opacity: float, state, *, n_models: int):
    """Slider or checkbox: re-draw from the stored film and maps, no new inference. Without a
    stored prediction (none yet, or the session's state expired) nothing changes."""
    if not state or state.get("results") is None:
        return [gr.skip()] * (2 * n_models)
    return _panel_updates(state, show_map, opacity, n_models)


# ------------------------------------------------------------------ model facts

_METRIC_NAMES = {"roc_auc": "AUROC", "k": "folds", "n": "films"}


def _fmt_metrics(m) -> str:
    """config.json metric dicts in plain words: floats to 3 places, counts as integers,
    cross-validated {"mean", "sd"} as "mean ± sd"."""
    if isinstance(m, dict):
        parts = []
        for k, v in m.items():
            name = _METRIC_NAMES.get(k, k.replace("_", " "))
            if isinstance(v, int) and not isinstance(v, bool):
                parts.append(f"{v} {name}" if k in ("k", "n") else f"{name} {v}")
            elif isinstance(v, dict) and "mean" in v:
                sd = v.get("sd", v.get("std"))
                parts.append(f"{name} {v['mean']:.3f}" + (f" ± {sd:.3f}" if isinstance(sd, (int, float)) else ""))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{name} {v:.3f}")
            elif isinstance(v, dict):
                parts.append(f"{k}: {_fmt_metrics(v)}")          # a data set or fold name, as written
            elif isinstance(v, str):
                parts.append(f"{k.replace('_', ' ')} {v}")
        return "; ".join(parts)
    return str(m)


def model_facts(predictor: Predictor) -> str:
    f = predictor.describe()    # config.json's training facts through cxr.facts (versioned) + the operating point
    strategy = f.get("strategy")
    base = f.get("base_model")
    how = None
    if base and strategy:
        how = ("from scratch (no pretrained weights)" if "scratch" in str(base)
               else f"transfer from {base}, {strategy} fine-tuning")
    rows = [("Model", f.get("model")), ("Architecture", f.get("architecture")), ("Trained", how),
            ("Training data", Path(str(f.get("dataset", "?"))).name if f.get("dataset") else None),
            ("Input size", f.get("image_size")),
            ("Decision threshold", f"{f['threshold']:.3f} ({predictor.threshold_source})"),
            ("Heat map", f.get("explainer"))]
    ood = getattr(predictor, "ood", None)
    rows.append(("Out-of-distribution check", f"distance limit {ood.threshold:.1f}" if ood is not None
                 else "colour check only (no fitted distance for this model)"))
    metrics = f.get("validation_metrics") or {}
    rows.append(("Validation (held-out patients)", _fmt_metrics(metrics) if metrics else "not recorded"))
    cv = f.get("cv_metrics")
    rows.append(("Cross-validated", _fmt_metrics(cv) if cv else "not measured for this model"))
    ext = f.get("external_metrics")
    rows.append(("External data", _fmt_metrics(ext) if ext else "not measured for this model"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
    return "| fact | value |\n|---|---|\n" + table


# ------------------------------------------------------------------ the page

def _examples() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpeg"))


def create_demo(predictors: Predictor | list[Predictor]) -> gr.Blocks:
    predictors = [predictors] if isinstance(predictors, Predictor) else list(predictors)
    if not predictors:
        raise ValueError("at least one model is needed")
    n = len(predictors)
    jan = janitor()
    title = "Chest X-ray: NORMAL or PNEUMONIA?" + (f" ({n} models side by side)" if n > 1 else "")
    with gr.Blocks(title="Chest X-ray demo (research only)", analytics_enabled=False, delete_cache=None) as demo:
        gr.Markdown(f"# {title}\nUpload a chest X-ray (up to 10 MB): the model says whether it sees pneumonia, "
                    f"how sure it is, and where its answer came from. **{DISCLAIMER}**", elem_id="cxr-header")
        state = gr.State(time_to_live=STATE_TTL_S)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                file = gr.File(label="Chest X-ray: PNG, JPEG or DICOM", file_types=ACCEPTED_TYPES,
                               type="filepath", height=90, elem_id="cxr-file")
                film = gr.Image(label="Your film", type="pil", format="jpeg", interactive=False, visible=False,
                                elem_id="cxr-film", buttons=[], height=300)
                button = gr.Button("Predict", variant="primary", interactive=False, elem_id="cxr-predict")
                notice = gr.HTML(visible=False, elem_id="cxr-notice")
                answers = gr.HTML(visible=False, elem_id="cxr-answers")
                with gr.Row():
                    show = gr.Checkbox(value=True, label="Show heat map", min_width=120)
                    opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Heat-map opacity",
                                        min_width=160)
                gallery = gr.Gallery(value=[(p, f"Film {i + 1}") for i, p in enumerate(_examples())],
                                     label="Or try an example film (never used in training)", columns=6, rows=1,
                                     height=120, object_fit="cover", allow_preview=False, buttons=[], elem_id="cxr-examples")
            with gr.Column(scale=3, min_width=300):
                panel_outputs = []
                with gr.Row(equal_height=False):
                    for i, p in enumerate(predictors):
                        with gr.Column(min_width=160, elem_classes=["cxr-panel"]):
                            img = gr.Image(label=p.name, type="pil", format="jpeg", interactive=False, visible=False,
                                           elem_id=f"cxr-overlay-{i}", buttons=[])
                            cap = gr.HTML(visible=False, elem_id=f"cxr-caption-{i}")
                            panel_outputs += [img, cap]
        with gr.Accordion("Learn: transfer learning, heat maps, and these models", open=False):
            gr.Markdown(TEACHING)
            for p in predictors:
                gr.Markdown(f"### {p.name}\n" + model_facts(p))
        gr.Markdown("Example films: Kermany et al. 2018, CC BY 4.0 (see examples/ATTRIBUTION.md). "
                    "API: one endpoint, `/predict` (see the API page below).")

        film_outputs = [film, notice, button, state, answers] + panel_outputs
        for event in (file.upload, file.clear):
            event(functools.partial(show_film, n_models=n), inputs=[file, state], outputs=film_outputs,
                  api_visibility="private", show_progress="hidden")
        run = functools.partial(predict_ui, predictors=predictors)
        button.click(run, inputs=[file, show, opacity, state], outputs=[film, answers, state] + panel_outputs,
                     api_visibility="private", concurrency_limit=2, concurrency_id="predict")
        redraw = functools.partial(reblend, n_models=n)
        for control in (show, opacity):
            control.change(redraw, inputs=[show, opacity, state], outputs=panel_outputs, api_visibility="private",
                           show_progress="hidden", trigger_mode="always_last", queue=False)

        def on_select(evt: gr.SelectData, show_map, opac):
            return predict_example(evt.index, show_map, opac, predictors=predictors)

        gallery.select(on_select, inputs=[show, opacity],
                       outputs=[file, film, notice, button, answers, state] + panel_outputs,
                       api_visibility="private", concurrency_limit=2, concurrency_id="predict")
        def predict(file: gr.FileData, show_heatmap: bool = True) -> dict:
            return api_predict(file, show_heatmap, predictors=predictors)

        predict.__doc__ = api_predict.__doc__
        gr.api(predict, api_name="predict", concurrency_limit=2, concurrency_id="predict")
    jan.protect_existing()          # example thumbnails cached at build time
    jan.blocks.append(demo)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """The hardened launch settings, shared by __main__, the tests and the benchmark."""
    from starlette.middleware import Middleware

    # Refusal policy: 2 requests run at once, up to CXR_QUEUE_SIZE (64) wait; beyond that a
    # request is refused at once with "queue is full" (20 clients x 10 requests: 0 refused).
    demo.queue(max_size=int(os.environ.get("CXR_QUEUE_SIZE", QUEUE_SIZE)), default_concurrency_limit=2)
    settings = dict(state_session_capacity=int(os.environ.get("CXR_SESSION_CAPACITY", SESSION_CAPACITY)),
                    max_file_size=MAX_FILE_SIZE, show_error=False, allowed_paths=[], footer_links=["api"],
                    theme=gr.themes.Soft(), css=CSS, app_kwargs={"middleware": [Middleware(UploadGuard)]})
    settings.update(kwargs)
    jan = janitor()
    jan.start()
    original_close = demo.close

    def close(*a, **k):
        try:
            return original_close(*a, **k)
        finally:
            if demo in jan.blocks:
                jan.blocks.remove(demo)
            if not jan.blocks:
                jan.shutdown()       # uploads and result files removed at shutdown
    demo.close = close
    return demo.launch(**settings)


def parse_models(values: list[str] | None) -> list[str | None]:
    """--model may be repeated and/or hold a comma-separated list; None = the shipped model."""
    names = [m.strip() for v in (values or []) for m in str(v).split(",") if m.strip()]
    return names or [None]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description="Chest X-ray demo. " + DISCLAIMER)
    ap.add_argument("--model", action="append", default=None,
                    help="Hub id or local folder; repeat (or comma-separate) to compare models (env MODEL_ID)")
    ap.add_argument("--revision", default=os.environ.get("MODEL_REVISION"), help="Hub revision (env MODEL_REVISION)")
    ap.add_argument("--precision", default=os.environ.get("CXR_PRECISION", "auto"), choices=["auto", "bf16", "fp32"])
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    specs = parse_models(args.model or ([os.environ["MODEL_ID"]] if os.environ.get("MODEL_ID") else None))
    try:
        predictors = [Predictor.from_pretrained(m, revision=args.revision, precision=args.precision) for m in specs]
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.chdir(HERE)  # serve nothing outside the app's own folder
    demo = create_demo(predictors)
    try:
        launch(demo, server_port=args.port)
    finally:
        janitor().shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
