"""The page's and the API's handlers: plain functions of (file, controls, state), wired by
app.create_demo. A film is decoded by the project's loader, every model answers
(``analyse``: one API dict per model, ``result_dict``, and its evidence-weighted heat map),
and the answer goes back as the page's cards and overlays or as the API's one JSON object.
Uploads are deleted once read (files.janitor).
"""

from __future__ import annotations

import html
import logging
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.explain import EXPLAINER_NAMES, evidence_map, heatmap_image, overlay
from cxr.imaging import ImageLoadError, load_image
from cxr.inference import DISCLAIMER, Predictor

if __package__:     # cxr_app.handlers (pip install .) or app.handlers (the repository)
    from . import files, render
else:               # a Space (python app.py): the app's modules are top-level modules beside it
    import files
    import render

logger = logging.getLogger("cxr.app")

HERE = Path(__file__).resolve().parent
DISPLAY_MAX_SIDE = 512
GENERIC_ERROR = "Something went wrong while analysing this image. Please try another file."
EXAMPLES_DIR = HERE / "examples"


def example_paths() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpeg"))


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
    folder = files.janitor().root / "heatmaps"
    folder.mkdir(exist_ok=True)
    path = folder / f"heatmap-{uuid.uuid4().hex}.png"
    heatmap_image(heat).save(path)
    return str(path)


def api_predict(file: gr.FileData, show_heatmap: bool = True, *, predictors: list[Predictor]) -> dict:
    """Predict one chest X-ray (PNG, JPEG or DICOM). Returns one JSON object: the first model's
    decision, probability, threshold, borderline flag, out-of-distribution score and flag,
    heat-map file (a greyscale PNG at the model's input size) and the disclaimer; with several
    models, every model's object under ``models``."""
    path = _upload(file)
    if not path:
        raise gr.Error("Please send a chest X-ray (PNG, JPEG or DICOM).", print_exception=False)
    try:
        image = _load(path)
    finally:
        files.janitor().discard(path)            # the upload is not kept once read
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
                        gr.update(visible=True, value=render.map_caption(r))]
        else:
            updates += [gr.update(visible=True, value=display, label=r["model"]), gr.update(visible=False, value="")]
    return updates


def show_film(file, state, *, n_models: int):
    """On upload: the film decoded by the project's loader, or why it cannot be used."""
    hidden = _panel_updates(None, False, 0, n_models)
    if file is None:
        return [gr.update(value=None, visible=False), gr.update(value="", visible=False),
                gr.update(interactive=False), None, gr.update(value="", visible=False)] + hidden
    try:
        path = files.uploaded_path(file)
        image = load_image(path)
    except (ImageLoadError, files.NotUploaded) as e:
        files.janitor().discard(path)
        msg = f'<div class="cxr-notice">Cannot use this file: {html.escape(str(e))}.</div>'
        return [gr.update(value=None, visible=False), gr.update(value=msg, visible=True),
                gr.update(interactive=False), None, gr.update(value="", visible=False)] + hidden
    display = _display_copy(image)
    return [gr.update(value=display, visible=True), gr.update(value="", visible=False),
            gr.update(interactive=True), {"display": display, "path": path},
            gr.update(value="", visible=False)] + hidden


def predict_ui(file, show_map: bool, opacity: float, state, *, predictors: list[Predictor]):
    """Predict: every model's answer card, then its overlay (film + map) and map caption."""
    path = None if file is None else (file.get("path") if isinstance(file, dict) else getattr(file, "path", file))
    if state and state.get("results") is not None and state.get("path") == path:
        results = state["results"]                     # same film again: same answer
    else:
        path = _upload(file)
        if not path:
            raise gr.Error("Please upload a chest X-ray (PNG, JPEG or DICOM).", print_exception=False)
        image = _load(path)
        files.janitor().discard(path)
        results = analyse(image, predictors, explain=True)
        state = {"display": _display_copy(image), "path": path, "results": results}
    answers = render.answer_html([r for r, _ in results])
    film = gr.update(visible=all(r["out_of_distribution"] for r, _ in results))  # the panels show the film now
    return [film, gr.update(value=answers, visible=True), state] + _panel_updates(state, show_map, opacity,
                                                                                  len(predictors))


def predict_example(index: int, show_map: bool, opacity: float, *, predictors: list[Predictor]):
    path = example_paths()[index]
    image = load_image(path)
    display = _display_copy(image)
    results = analyse(image, predictors, explain=True)
    state = {"display": display, "path": f"example:{index}", "results": results}
    answers = render.answer_html([r for r, _ in results])
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

