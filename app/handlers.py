"""The page's and the API's handlers: plain functions of (file, controls, state), wired by
app.create_demo (the REST routes, app.rest, call the same ``analyse``). A film is decoded by
the project's loader, every model answers (``analyse``: each model's answer in the one schema,
``Prediction.to_api`` / :mod:`cxr.api`, and its evidence-weighted heat map), and the answer goes
back as the page's cards and overlays or as the API's one JSON object. At most
``INFERENCE_SLOTS`` predictions run at once, page, Gradio API and REST together (``SLOTS``).
Uploads are deleted once read (files.janitor).
"""

from __future__ import annotations

import html
import json
import logging
import re
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.api import Answer, ModelAnswer, answer
from cxr.explain import evidence_map, heatmap_image, overlay
from cxr.imaging import ImageLoadError, load_image
from cxr.inference import Predictor

if __package__:     # cxr_app.handlers (pip install .) or app.handlers (the repository)
    from . import budget, files, render
else:               # a Space (python app.py): the app's modules are top-level modules beside it
    import budget
    import files
    import render

logger = logging.getLogger("cxr.app")

HERE = Path(__file__).resolve().parent
DISPLAY_MAX_SIDE = 512
GENERIC_ERROR = "Something went wrong while analysing this image. Please try another file."
EXAMPLES_DIR = HERE / "examples"


def example_paths() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpeg"))


def example_label(path: str) -> str | None:
    """The label an example film has in its data set (examples/ATTRIBUTION.md), or None."""
    try:
        return render.example_labels(EXAMPLES_DIR / "ATTRIBUTION.md").get(Path(path).name)
    except OSError:
        return None


# ------------------------------------------------------------------ one limit for every caller

INFERENCE_SLOTS = 2        # predictions that run at once: page, Gradio API and REST together


class Slots:
    """At most ``limit`` holders at once (a semaphore), with counts for the health route and the
    REST queue: ``waiting`` (blocked on a slot) and ``running``. The Gradio events run under
    Gradio's own queue (concurrency_id "predict", the same limit); taking a slot here as well
    makes the REST route, which has no Gradio queue, share that limit with them."""

    def __init__(self, limit: int = INFERENCE_SLOTS):
        self.limit = limit
        self._sem = threading.Semaphore(limit)
        self._lock = threading.Lock()
        self.waiting = self.running = 0

    @contextmanager
    def hold(self):
        with self._lock:
            self.waiting += 1
        try:
            self._sem.acquire()
        finally:
            with self._lock:
                self.waiting -= 1
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._sem.release()


SLOTS = Slots()


# ------------------------------------------------------------------ handlers

def _upload(file) -> str | None:
    """The upload's path under the one rule (files.uploaded_path); None when no file was sent."""
    if file is None:
        return None
    try:
        return files.uploaded_path(file)
    except files.NotUploaded as e:
        raise gr.Error(str(e), print_exception=False) from None


def _display_copy(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    return image


def _load(source, client: str = "local") -> Image.Image:
    """Decode an upload (its path, or the bytes a REST request sent) with the project's loader,
    within ``client``'s share of the decode workers (budget.py)."""
    try:
        with budget.budget().spend(client):
            return load_image(source)
    except budget.OverBudget as e:
        raise gr.Error(str(e), print_exception=False) from None
    except ImageLoadError as e:
        raise gr.Error(f"Cannot use this file: {e}.", print_exception=False) from None


class _Decoded:
    """The last few films decoded on upload (show_film), so that Predict does not decode them
    again: at most ``size`` films (<= 2048 px each, ~12 MB), the oldest dropped first; a miss
    (dropped, or another worker process) decodes the upload again."""

    def __init__(self, size: int = 8):
        self.size, self._items, self._lock = size, {}, threading.Lock()

    def put(self, path: str, image: Image.Image) -> None:
        with self._lock:
            self._items.pop(path, None)
            self._items[path] = image
            while len(self._items) > self.size:
                self._items.pop(next(iter(self._items)))

    def pop(self, path: str) -> Image.Image | None:
        with self._lock:
            return self._items.pop(path, None)


DECODED = _Decoded()


def analyse(image: Image.Image, predictors: list[Predictor], *, explain: bool = True,
            encode_map=None) -> list[tuple[ModelAnswer, np.ndarray | None]]:
    """Each model's answer (``Prediction.to_api``) and its evidence-weighted map (None when
    flagged - the Predictor attaches no map then - or not asked), under one of ``SLOTS``.
    ``encode_map(map) -> value``: how the caller ships the map in the answer's ``heatmap``
    (a file for the Gradio API, base64 for REST); None: not in the answer (the page)."""
    out = []
    with SLOTS.hold():
        for predictor in predictors:
            try:
                result = predictor.predict(image, explain=explain)
            except ImageLoadError as e:
                raise gr.Error(f"Cannot use this file: {e}.", print_exception=False) from None
            except Exception:  # noqa: BLE001 - the user gets a generic message, the log the details
                logger.exception("prediction failed")
                raise gr.Error(GENERIC_ERROR, print_exception=False) from None
            heat = None if result.heatmap is None else evidence_map(result.heatmap, *result.map_weight())
            shipped = encode_map(heat) if heat is not None and encode_map is not None else None
            out.append((result.to_api(heatmap=shipped), heat))
    return out


def _write_heatmap(heat: np.ndarray) -> str:
    """The map as a PNG in the app's cache folder (served from there; swept after UPLOAD_TTL_S):
    one new file per request, no folder scan."""
    folder = files.janitor().root / "heatmaps"
    folder.mkdir(exist_ok=True)
    path = folder / f"heatmap-{uuid.uuid4().hex}.png"
    heatmap_image(heat).save(path)
    return str(path)


def _gradio_file(heat: np.ndarray) -> dict:
    return gr.FileData(path=_write_heatmap(heat), mime_type="image/png").model_dump()


def api_predict(file: gr.FileData, show_heatmap: bool = True, *, predictors: list[Predictor],
                client: str = "local") -> Answer:
    """Predict NORMAL or PNEUMONIA for one chest X-ray (PNG, JPEG or DICOM, up to 10 MB) with every
    loaded model, at each model's operating point. Research and education only: not a medical
    device. A plain-HTTP alternative with the same answer: curl -F file=@chest_xray.jpeg
    <this app>/api/v1/predict (see /api/v1/docs).

    Args:
        file: The chest X-ray, uploaded with this app (gradio_client: handle_file("film.jpeg")).
        show_heatmap: Also return each model's heat map (a greyscale PNG file).

    Returns:
        One JSON object: the first model's answer at the top level, every model's under models.
    """
    path = _upload(file)
    if not path:
        raise gr.Error("Please send a chest X-ray (PNG, JPEG or DICOM).", print_exception=False)
    try:
        image = _load(path, client)
    finally:
        files.janitor().discard(path)            # the upload is not kept once read
    results = analyse(image, predictors, explain=bool(show_heatmap), encode_map=_gradio_file)
    return answer([r for r, _ in results])


PANEL_OUTPUTS = 3     # per model: answer card, overlay image, map caption


def _panel_updates(state: dict | None, show_map: bool, opacity: float, n: int, *, cards: bool = True) -> list:
    """Per model: its answer card, the film with its map (or the plain film), the map's caption,
    from the stored film and maps. ``cards=False``: the cards are left as they are (a redraw)."""
    updates = []
    items = (state or {}).get("results") or []
    display = (state or {}).get("display")
    for i in range(n):
        if i >= len(items) or display is None:
            updates += [gr.update(visible=False, value=""), gr.update(visible=False, value=None),
                        gr.update(visible=False, value="")]
            continue
        r, heat = items[i]
        card = gr.update(visible=True, value=render.answer_html([r], show_model=n > 1)) if cards else gr.skip()
        if r["out_of_distribution"]:
            updates += [card, gr.update(visible=False, value=None), gr.update(visible=False, value="")]
        elif show_map and heat is not None:
            blended = overlay(display, heat, opacity)
            updates += [card, gr.update(visible=True, value=blended, alt_text=render.map_alt(r)),
                        gr.update(visible=True, value=render.map_caption(r))]
        else:
            updates += [card, gr.update(visible=True, value=display, alt_text=render.film_alt(r)),
                        gr.update(visible=False, value="")]
    return updates


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80] or "film"


def write_result_files(state: dict, opacity: float, film_name: str, label: str | None = None) -> list[str]:
    """The result to download, in a new folder of the app's cache (swept with the uploads after
    UPLOAD_TTL_S): each model's overlay PNG (film + map at ``opacity``, or the plain film when it
    has no map), a short report (Markdown) and the answers in the one schema (JSON)."""
    folder = files.janitor().root / "results" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    results = [r for r, _ in state["results"]]
    paths, overlay_names = [], {}
    for r, heat in state["results"]:
        if r["out_of_distribution"] or heat is None:
            continue
        name = f"cxr-overlay-{_safe_name(r['model'])}.png"
        overlay(state["display"], heat, opacity).save(folder / name)
        overlay_names[r["model"]] = name
        paths.append(str(folder / name))
    (folder / "cxr-report.md").write_text(render.report_markdown(results, film_name, overlay_names, label))
    (folder / "cxr-answer.json").write_text(render.report_json(results, film_name, label))
    return paths + [str(folder / "cxr-report.md"), str(folder / "cxr-answer.json")]


def _downloads(state: dict, opacity: float, film_name: str, label: str | None = None):
    try:
        return gr.update(value=write_result_files(state, opacity, film_name, label), visible=True)
    except OSError:
        logger.exception("could not write the result files")
        return gr.update(value=None, visible=False)


def _film_name(file) -> str:
    """The uploaded file's own name (the cache keeps it as the last part of the path)."""
    if isinstance(file, dict):
        path = file.get("orig_name") or file.get("path")
    else:
        path = getattr(file, "orig_name", None) or getattr(file, "path", file)
    return Path(str(path or "film")).name


def show_film(file, state, *, n_models: int, client: str = "local"):
    """On upload: the film decoded by the project's loader (kept for Predict in ``DECODED``), or
    why it cannot be used. Outputs: film, notice, Predict button, state, note, downloads, then
    the panels."""
    hidden = _panel_updates(None, False, 0, n_models)
    no_result = [gr.update(value=render.PLACEHOLDER, visible=True), gr.update(value=None, visible=False)]
    if file is None:
        return [gr.update(value=None, visible=False), gr.update(value="", visible=False),
                gr.update(interactive=False), None] + no_result + hidden
    path = None
    try:
        path = files.uploaded_path(file)
        image = _load(path, client)
    except (gr.Error, files.NotUploaded) as e:
        files.janitor().discard(path)
        text = e.message if isinstance(e, gr.Error) else str(e)
        msg = f'<div class="cxr-notice">{html.escape(text)}</div>'
        return [gr.update(value=None, visible=False), gr.update(value=msg, visible=True),
                gr.update(interactive=False), None] + no_result + hidden
    DECODED.put(path, image)
    display = _display_copy(image)
    return [gr.update(value=display, visible=True, alt_text=render.film_alt()), gr.update(value="", visible=False),
            gr.update(interactive=True), {"display": display, "path": path, "name": _film_name(file)}] + [
        gr.update(value=render.PLACEHOLDER_READY, visible=True), gr.update(value=None, visible=False)] + hidden


def predict_ui(file, show_map: bool, opacity: float, state, *, predictors: list[Predictor], client: str = "local"):
    """Predict: every model's answer card, its overlay (film + map) and map caption, and the
    result to download. The file box is emptied (the upload is deleted once read, so its link
    would be dead) and ready for the next film; the film stays shown. Outputs: file box, film,
    Predict button, note, downloads, state, then the panels."""
    path = None if file is None else (file.get("path") if isinstance(file, dict) else getattr(file, "path", file))
    same_film = bool(state) and state.get("results") is not None and (path is None or state.get("path") == path)
    if same_film:
        results = state["results"]                     # same film again: same answer
    else:
        path = _upload(file)
        if not path:
            raise gr.Error("Please upload a chest X-ray (PNG, JPEG or DICOM).", print_exception=False)
        decoded_here = bool(state) and state.get("path") == path
        image = DECODED.pop(path) if decoded_here else None   # decoded once, on upload (show_film)
        try:
            image = image if image is not None else _load(path, client)
        finally:
            files.janitor().discard(path)
        results = analyse(image, predictors, explain=True)
        state = {"display": state["display"] if decoded_here and state.get("display") is not None
                 else _display_copy(image), "path": path, "results": results,
                 "name": (state or {}).get("name") if decoded_here else _film_name(file)}   # the full film is not kept
    return ([gr.update(value=None), gr.update(visible=True), gr.update(interactive=False),
             gr.update(value=render.AFTER_ANSWER, visible=True),
             _downloads(state, opacity, state.get("name") or "film"), state]
            + _panel_updates(state, show_map, opacity, len(predictors)))


def predict_example(index: int, show_map: bool, opacity: float, *, predictors: list[Predictor]):
    """An example film: the answers, then the film's label in its data set. Outputs as predict_ui."""
    path = example_paths()[index]
    image = load_image(path)
    display = _display_copy(image)
    results = analyse(image, predictors, explain=True)
    name = f"Film {index + 1} (example)"
    state = {"display": display, "path": f"example:{index}", "results": results, "name": name}
    label = example_label(path)
    note = (render.example_reveal(label, [r for r, _ in results]) if label else "") + render.AFTER_ANSWER
    return ([gr.update(value=None), gr.update(value=display, visible=True, alt_text=f"Example chest X-ray, {name}"),
             gr.update(interactive=False), gr.update(value=note, visible=True),
             _downloads(state, opacity, name, label), state]
            + _panel_updates(state, show_map, opacity, len(predictors)))


def reblend(show_map: bool, opacity: float, state, *, n_models: int):
    """Slider or checkbox: re-draw from the stored film and maps, no new inference. Without a
    stored prediction (none yet, or the session's state expired) nothing changes."""
    if not state or state.get("results") is None:
        return [gr.skip()] * (PANEL_OUTPUTS * n_models)
    return _panel_updates(state, show_map, opacity, n_models, cards=False)
