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
from cxr.inference import Predictor, UnknownClassError

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
            encode_map=None, heatmap_class: str | None = None) -> list[tuple[ModelAnswer, np.ndarray | None]]:
    """Each model's answer (``Prediction.to_api``) and its evidence-weighted map (None when
    flagged - the Predictor attaches no map then - or not asked), under one of ``SLOTS``.
    ``encode_map(map) -> value``: how the caller ships the map in the answer's ``heatmap``
    (a file for the Gradio API, base64 for REST); None: not in the answer (the page).
    ``heatmap_class``: the map of this class instead of the answer's own (implies a map); a
    class one of the models does not have is refused (gr.Error naming its labels)."""
    return [(r, heat) for r, heat, _ in _analyse(image, predictors, explain=explain, encode_map=encode_map,
                                                  heatmap_class=heatmap_class)]


def _check_class(predictors: list[Predictor], heatmap_class: str | None) -> None:
    for predictor in predictors:
        if heatmap_class is not None:
            try:
                predictor.class_id(heatmap_class)
            except UnknownClassError as e:
                raise gr.Error(f"Cannot draw that map: {e}.", print_exception=False) from None


def _analyse(image: Image.Image, predictors: list[Predictor], *, explain: bool = True, encode_map=None,
             heatmap_class: str | None = None, per_class: bool = False
             ) -> list[tuple[ModelAnswer, np.ndarray | None, dict[str, np.ndarray]]]:
    """:func:`analyse`, with, for multi-class and multi-label models and ``per_class``, every
    class's evidence-weighted map ({label: map}, float16: the page's per-finding choice)."""
    _check_class(predictors, heatmap_class)
    out = []
    with SLOTS.hold():
        for predictor in predictors:
            classes = heatmap_class if heatmap_class is not None else (
                "all" if per_class and explain and predictor.task != "binary" else None)
            try:
                result = predictor.predict(image, explain=explain, heatmap_classes=classes)
            except ImageLoadError as e:
                raise gr.Error(f"Cannot use this file: {e}.", print_exception=False) from None
            except Exception:  # noqa: BLE001 - the user gets a generic message, the log the details
                logger.exception("prediction failed")
                raise gr.Error(GENERIC_ERROR, print_exception=False) from None
            heat = None if result.heatmap is None else evidence_map(result.heatmap, *result.map_weight())
            maps = {} if heat is None or classes != "all" else {
                label: evidence_map(m, *result.map_weight(label)).astype(np.float16)
                for label, m in result.heatmaps.items()}
            shipped = encode_map(heat) if heat is not None and encode_map is not None else None
            out.append((result.to_api(heatmap=shipped), heat, maps))
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


def api_predict(file: gr.FileData, show_heatmap: bool = True, heatmap_class: str | None = None, *,
                predictors: list[Predictor], client: str = "local") -> Answer:
    """Predict for one chest X-ray (PNG, JPEG or DICOM, up to 10 MB) with every loaded model, at
    each model's operating point: binary (NORMAL or PNEUMONIA), multi-class and multi-label
    models alike; every class or finding is listed under findings. Research and education
    only: not a medical device. A plain-HTTP alternative with the same answer:
    curl -F file=@chest_xray.jpeg <this app>/api/v1/predict (see /api/v1/docs).

    Args:
        file: The chest X-ray, uploaded with this app (gradio_client: handle_file("film.jpeg")).
        show_heatmap: Also return each model's heat map (a greyscale PNG file).
        heatmap_class: Draw the map for this class or finding (a label every loaded model has) instead of the answer's own; implies show_heatmap.

    Returns:
        One JSON object: the first model's answer at the top level, every model's under models.
    """
    heatmap_class = (heatmap_class or "").strip() or None
    _check_class(predictors, heatmap_class)           # before the upload is read
    path = _upload(file)
    if not path:
        raise gr.Error("Please send a chest X-ray (PNG, JPEG or DICOM).", print_exception=False)
    try:
        image = _load(path, client)
    finally:
        files.janitor().discard(path)            # the upload is not kept once read
    results = analyse(image, predictors, explain=bool(show_heatmap) or heatmap_class is not None,
                      encode_map=_gradio_file, heatmap_class=heatmap_class)
    return answer([r for r, _ in results])


# The order of the handlers' outputs, declared once: app.py wires its components in this order,
# and named_outputs reads a handler's list back by these names.
PANEL = ("card", "image", "caption", "map_class")   # per model: answer card, overlay, map caption, the map's class
PANEL_OUTPUTS = len(PANEL)
FILM_OUTPUTS = ("film", "notice", "button", "state", "note", "downloads")     # show_film; then the panels
RESULT_OUTPUTS = ("file", "film", "button", "note", "downloads", "state")     # predict_ui, predict_example; panels
MODELS_OUTPUTS = ("state",)                                                   # show_models; then the panels


def named_outputs(values, head: tuple[str, ...] = ()) -> dict:
    """A handler's list of outputs by name: ``head`` (``FILM_OUTPUTS``, ``RESULT_OUTPUTS``,
    ``MODELS_OUTPUTS``, or none for reblend and choose_map) and ``"panels"``: one dict per model,
    keyed by ``PANEL``."""
    values = list(values)
    if (len(values) - len(head)) % PANEL_OUTPUTS:
        raise ValueError(f"{len(values)} outputs are not {len(head)} + {PANEL_OUTPUTS} per model")
    rest = values[len(head):]
    return {**dict(zip(head, values)),
            "panels": [dict(zip(PANEL, rest[i:i + PANEL_OUTPUTS])) for i in range(0, len(rest), PANEL_OUTPUTS)]}


def _hidden_panel() -> list:
    return [gr.update(visible=False, value=""), gr.update(visible=False, value=None),
            gr.update(visible=False, value=""), gr.update(visible=False)]


def _panel_updates(state: dict | None, show_map: bool, opacity: float, n: int, *, cards: bool = True) -> list:
    """Per model: its answer card, the film with its map (or the plain film), the map's caption,
    and the choice of the map's class (a multi-class or multi-label model's, when it has maps
    per class), from the stored film and maps. A model the visitor chose not to see
    (``state["shown"]``, model names; absent: all) gets a hidden panel. ``cards=False``: the
    cards and choices are left as they are (a redraw)."""
    updates = []
    items = (state or {}).get("results") or []
    per_class = (state or {}).get("maps") or []
    chosen = (state or {}).get("map_class") or {}
    shown = (state or {}).get("shown")
    display = (state or {}).get("display")
    for i in range(n):
        if i >= len(items) or display is None or (shown is not None and items[i][0]["model"] not in shown):
            updates += _hidden_panel()
            continue
        r, heat = items[i]
        maps = per_class[i] if i < len(per_class) and per_class[i] else {}
        label = chosen.get(i) if chosen.get(i) in maps else None
        if label is not None and label != r.get("heatmap_class"):
            heat = maps[label]
        if r.get("task", "binary") != "binary" and not r["out_of_distribution"] and r.get("heatmap_class"):
            r = render.map_view(r, label or r["heatmap_class"])     # caption and alt text: the map's class
        card = gr.update(visible=True, value=render.answer_html([items[i][0]], show_model=n > 1)) if cards else gr.skip()
        value = label or r.get("heatmap_class")
        choice = (gr.update(visible=len(maps) > 1 and not r["out_of_distribution"], choices=list(maps),
                            value=value if value in maps else None) if cards else gr.skip())
        if r["out_of_distribution"]:
            updates += [card, gr.update(visible=False, value=None), gr.update(visible=False, value=""), choice]
        elif show_map and heat is not None:
            blended = overlay(display, heat, opacity)
            updates += [card, gr.update(visible=True, value=blended, alt_text=render.map_alt(r)),
                        gr.update(visible=True, value=render.map_caption(r)), choice]
        else:
            updates += [card, gr.update(visible=True, value=display, alt_text=render.film_alt(r)),
                        gr.update(visible=False, value=""), choice]
    return updates


def choose_map(index: int, label: str | None, show_map: bool, opacity: float, state, *, n_models: int):
    """A map class chosen for model ``index``: its panels redrawn from the stored maps (no new
    inference). A label the model has no stored map for, or no stored prediction: nothing changes."""
    if not state or state.get("results") is None:
        return [gr.skip()] * (PANEL_OUTPUTS * n_models)
    maps = (state.get("maps") or [])
    if not (0 <= index < len(maps)) or label not in (maps[index] or {}):
        return [gr.skip()] * (PANEL_OUTPUTS * n_models)
    state.setdefault("map_class", {})[index] = label
    return _panel_updates(state, show_map, opacity, n_models, cards=False)


def show_models(names, show_map: bool, opacity: float, state, *, n_models: int):
    """The visitor's choice of models to see (every model answers each film; the choice shows or
    hides their panels, no new inference). Without a prediction yet, only the choice is kept."""
    state = dict(state or {})
    state["shown"] = list(names or [])
    if state.get("results") is None:
        return [state] + [gr.skip()] * (PANEL_OUTPUTS * n_models)
    return [state] + _panel_updates(state, show_map, opacity, n_models)


def refresh_downloads(opacity: float, state):
    """After the visitor's choice of models changed: the result files again, of the models now
    shown (as Predict writes them); no prediction yet, or none stored: nothing changes."""
    if not state or state.get("results") is None:
        return gr.skip()
    if state.get("shown") is not None and not set(state["shown"]) & {r["model"] for r, _ in state["results"]}:
        return gr.update(value=None, visible=False)           # no model shown: nothing to download
    where = str(state.get("path") or "")
    label = None
    if where.startswith("example:"):
        index = int(where.split(":", 1)[1])
        label = example_label(example_paths()[index]) if 0 <= index < len(example_paths()) else None
    return _downloads(state, opacity, state.get("name") or "film", label)


def _analyse_page(image: Image.Image, predictors: list[Predictor]) -> tuple[list, list]:
    """The page's analysis: ([(answer, map)], [per-class maps]) in panel order."""
    done = _analyse(image, predictors, explain=True, per_class=True)
    return [(r, heat) for r, heat, _ in done], [m for _, _, m in done]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80] or "film"


def write_result_files(state: dict, opacity: float, film_name: str, label: str | None = None) -> list[str]:
    """The result to download, in a new folder of the app's cache (swept with the uploads after
    UPLOAD_TTL_S): each model's overlay PNG (film + map at ``opacity``, or the plain film when it
    has no map), a short report (Markdown) and the answers in the one schema (JSON)."""
    folder = files.janitor().root / "results" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    shown = state.get("shown")
    items = [item for item in state["results"] if shown is None or item[0]["model"] in shown]
    results = [r for r, _ in items]
    paths, overlay_names = [], {}
    for r, heat in items:
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
    why it cannot be used. Outputs (``FILM_OUTPUTS``): film, notice, Predict button, state, note,
    downloads, then the panels."""
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
            gr.update(interactive=True), {"display": display, "path": path, "name": _film_name(file),
                                          **({"shown": state["shown"]} if state and state.get("shown") is not None
                                             else {})}] + [
        gr.update(value=render.PLACEHOLDER_READY, visible=True), gr.update(value=None, visible=False)] + hidden


def predict_ui(file, show_map: bool, opacity: float, state, *, predictors: list[Predictor], client: str = "local",
               shown: list[str] | None = None):
    """Predict: every model's answer card, its overlay (film + map) and map caption, and the
    result to download. The file box is emptied (the upload is deleted once read, so its link
    would be dead) and ready for the next film; the film stays shown. ``shown``: the names of
    the models the visitor chose to see (None: all; every model answers regardless). Outputs:
    file box, film, Predict button, note, downloads, state, then the panels (``RESULT_OUTPUTS``)."""
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
        results, maps = _analyse_page(image, predictors)
        state = {"display": state["display"] if decoded_here and state.get("display") is not None
                 else _display_copy(image), "path": path, "results": results, "maps": maps,
                 "name": (state or {}).get("name") if decoded_here else _film_name(file),
                 **({"shown": state["shown"]} if state and state.get("shown") is not None else {})}
        # the full film is not kept
    if shown is not None:
        state["shown"] = list(shown)
    return ([gr.update(value=None), gr.update(visible=True), gr.update(interactive=False),
             gr.update(value=render.AFTER_ANSWER, visible=True),
             _downloads(state, opacity, state.get("name") or "film"), state]
            + _panel_updates(state, show_map, opacity, len(predictors)))


def predict_example(index: int, show_map: bool, opacity: float, *, predictors: list[Predictor],
                    shown: list[str] | None = None):
    """An example film: the answers, then the film's label in its data set. ``shown``: the
    models the visitor chose to see (None: all). Outputs as predict_ui."""
    path = example_paths()[index]
    image = load_image(path)
    display = _display_copy(image)
    results, maps = _analyse_page(image, predictors)
    name = f"Film {index + 1} (example)"
    state = {"display": display, "path": f"example:{index}", "results": results, "maps": maps, "name": name,
             **({"shown": list(shown)} if shown is not None else {})}
    label = example_label(path)
    note = (render.example_reveal(label, [r for r, _ in results if shown is None or r["model"] in shown])
            if label else "") + render.AFTER_ANSWER
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
