"""Gradio Space: NORMAL vs PNEUMONIA on a chest X-ray: the decision at the model's operating
point, its probability with the threshold on the same scale, a heat map, and several models
side by side (a visitor can choose which to see). Multi-class models (e.g. NORMAL / BACTERIAL /
VIRAL) show every class's probability; multi-label models the findings above their own
thresholds, with a heat map per class on request. Research and education only: not a medical device.

    python app/app.py          # every shipped model in models/, side by side (the default alone after a plain install)
    python app/app.py --model outputs/a --model outputs/b   # compare models (or --model a,b)
    MODEL_ID=user/model-a,user/model-b python app/app.py    # Hub models (MODEL_REVISION pins one)

Handlers are plain functions; ``create_demo(predictors)`` only wires them. Models are loaded
once, at start-up; a missing, pickle-only or corrupt model stops start-up with a clear error.
Two doors to the same answer (one JSON object, the schema in cxr.api): the Gradio API's
``/predict`` (file, show_heatmap; its page documents every field) and the REST API on the same
server (rest.py: ``curl -F file=@film.jpeg http://127.0.0.1:7860/api/v1/predict``, ``/api/v1/docs``).

This module builds the page and launches it; beside it:

    handlers.py   the handlers (page and Gradio API), the shared prediction slots
    rest.py       the REST routes (/api/v1/predict, /api/v1/model-info, /health, OpenAPI docs)
    render.py     CSS, teaching notes, answer cards, map captions, the model-facts table
    files.py      uploads and result files: cache folder, Janitor (sweeping), UploadGuard (limits)
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from pathlib import Path

import gradio as gr

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.imaging import close_default_pool
from cxr.api import Answer
from cxr.inference import DISCLAIMER, ModelLoadError, Predictor
from cxr.precision import PRECISIONS
from cxr.locate import IMAGE_SUFFIXES

if __package__:     # cxr_app.app (pip install .) or app.app (the repository)
    from . import budget, files, handlers, render, rest
else:               # python app.py in a Space, or python app/app.py: its modules are top-level beside it
    import budget
    import files
    import handlers
    import render
    import rest

HERE = Path(__file__).resolve().parent

ACCEPTED_TYPES = list(IMAGE_SUFFIXES)
DEFAULT_OPACITY = 0.6
QUEUE_SIZE = 64            # waiting requests beyond the 2 running; more are refused at once (env CXR_QUEUE_SIZE)
SESSION_CAPACITY = 256     # sessions kept in memory (env CXR_SESSION_CAPACITY)
STATE_TTL_S = 1800         # a session's film + maps (for the slider / checkbox) expire after 30 min


# ------------------------------------------------------------------ the page

def create_demo(predictors: Predictor | list[Predictor]) -> gr.Blocks:
    predictors = [predictors] if isinstance(predictors, Predictor) else list(predictors)
    if not predictors:
        raise ValueError("at least one model is needed")
    n = len(predictors)
    jan = files.janitor()
    binary = all(p.task == "binary" for p in predictors)
    title = ("Chest X-ray: NORMAL or PNEUMONIA?" if binary else "Chest X-ray: what does each model see?") + (
        f" ({n} models side by side)" if n > 1 else "")
    with gr.Blocks(title="Chest X-ray demo (research only)", analytics_enabled=False, delete_cache=None) as demo:
        what = "whether it sees pneumonia" if binary else "what it sees (for some models: which class, or which findings)"
        gr.Markdown(f"# {title}\nUpload a chest X-ray (up to 10 MB): the model says {what}, "
                    f"how sure it is, and where its answer came from. **{DISCLAIMER}**", elem_id="cxr-header")
        state = gr.State(time_to_live=STATE_TTL_S)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):                       # the film
                file = gr.File(label="Chest X-ray: PNG, JPEG or DICOM", file_types=ACCEPTED_TYPES,
                               type="filepath", elem_id="cxr-file")
                button = gr.Button("Predict", variant="primary", interactive=False, elem_id="cxr-predict")
                notice = gr.HTML(visible=False, elem_id="cxr-notice")
                film = gr.Image(show_label=False, type="pil", format="jpeg", interactive=False, visible=False,
                                elem_id="cxr-film", buttons=[], height=360, alt_text=render.film_alt())
            # the answers, next to their maps: three models take more of the width, so that their
            # panels stay side by side on a 1366-pixel screen
            with gr.Column(scale=3 if n <= 2 else 4, min_width=300, elem_id="cxr-results"):
                names = [p.name for p in predictors]
                chooser = gr.CheckboxGroup(choices=names, value=names, label="Models to show (each one answers; "
                                           "research and education only)", visible=n > 1, elem_id="cxr-models")
                panel_outputs, choices = [], []
                with gr.Row(equal_height=False):
                    for i, p in enumerate(predictors):
                        with gr.Column(min_width=240 if n <= 2 else 220, elem_classes=["cxr-panel"]):
                            card = gr.HTML(visible=False, elem_id=f"cxr-answer-{i}")
                            img = gr.Image(show_label=False, type="pil", format="jpeg", interactive=False,
                                           visible=False, elem_id=f"cxr-overlay-{i}", buttons=[])
                            cap = gr.HTML(visible=False, elem_id=f"cxr-caption-{i}")
                            choice = gr.Dropdown(choices=list(p.labels), value=None, label="Heat map for",
                                                 visible=False, interactive=True, elem_id=f"cxr-map-class-{i}")
                            panel = {"card": card, "image": img, "caption": cap, "map_class": choice}
                            panel_outputs += [panel[k] for k in handlers.PANEL]
                            choices.append(choice)
                note = gr.HTML(render.PLACEHOLDER, elem_id="cxr-note")
                with gr.Row():
                    show = gr.Checkbox(value=True, label="Show heat map", min_width=120)
                    opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Heat-map opacity",
                                        min_width=160)
                downloads = gr.File(label="Download the result: overlay PNG, report (Markdown), answer (JSON)",
                                    file_count="multiple", interactive=False, visible=False, elem_id="cxr-download")
                gallery = gr.Gallery(value=[(p, f"Film {i + 1}") for i, p in enumerate(handlers.example_paths())],
                                     label="Or try an example film (never used in training; its label is shown "
                                           "after the answer)", columns=6, rows=1, height="auto",
                                     object_fit="contain", allow_preview=False, buttons=[], elem_id="cxr-examples")
        with gr.Accordion("Learn: transfer learning, heat maps, and these models", open=False):
            gr.Markdown(render.TEACHING)
            for p in predictors:
                gr.Markdown(f"### {p.name}\n" + render.model_facts(p), elem_classes=["cxr-facts"])
        gr.Markdown("Example films: Kermany et al. 2018, CC BY 4.0 (see examples/ATTRIBUTION.md). "
                    "API: [the API page](?view=api) (Python and JavaScript clients) or plain HTTP, "
                    "`curl -F file=@film.jpeg <this address>/api/v1/predict` "
                    "([REST docs](api/v1/docs)).", elem_id="cxr-api-links")

        # The footer's "Use via API" loads the API page's code when the pointer reaches it and shows
        # it on a click; a visit straight to ?view=api (the link above) would show nothing (Gradio
        # 6.31), so here the code is loaded and the panel toggled off and on once.
        demo.load(None, js="""() => { if (new URLSearchParams(location.search).get('view') !== 'api') return;
            let tries = 0;
            const step = () => {
              if (document.body.innerText.includes('gradio_client')) return;      // the API page is shown
              const link = [...document.querySelectorAll('footer button')].find(e => e.textContent.includes('API'));
              if (link) {
                link.dispatchEvent(new MouseEvent('mouseenter'));
                setTimeout(() => { link.click(); setTimeout(() => link.click(), 300); }, 1000);
              }
              if (++tries < 10) setTimeout(step, 2500);
            };
            step(); }""", api_visibility="private")

        by_name = {"file": file, "film": film, "notice": notice, "button": button, "state": state, "note": note,
                   "downloads": downloads}
        film_outputs = [by_name[k] for k in handlers.FILM_OUTPUTS] + panel_outputs
        result_outputs = [by_name[k] for k in handlers.RESULT_OUTPUTS] + panel_outputs
        # on a narrow screen, bring the first answer and its map into view once they are there
        show_result_js = """() => { const el = document.querySelector('#cxr-results');
            if (el && window.innerWidth <= 700) el.scrollIntoView({block: 'start'}); }"""

        # Handlers that decode take the client's address (gr.Request) for its decode budget (budget.py).
        def on_file(file, state, request: gr.Request):
            return handlers.show_film(file, state, n_models=n, client=budget.client_key(request))

        def run(file, show_map, opac, state, shown, request: gr.Request):
            return handlers.predict_ui(file, show_map, opac, state, predictors=predictors,
                                       client=budget.client_key(request), shown=shown)

        for event in (file.upload, file.clear):
            event(on_file, inputs=[file, state], outputs=film_outputs, api_visibility="private", show_progress="hidden")
        button.click(run, inputs=[file, show, opacity, state, chooser], outputs=result_outputs,
                     api_visibility="private", concurrency_limit=handlers.INFERENCE_SLOTS,
                     concurrency_id="predict").success(None, js=show_result_js, api_visibility="private")
        redraw = functools.partial(handlers.reblend, n_models=n)
        for control in (show, opacity):
            control.change(redraw, inputs=[show, opacity, state], outputs=panel_outputs, api_visibility="private",
                           show_progress="hidden", trigger_mode="always_last", queue=False)

        def on_select(evt: gr.SelectData, show_map, opac, shown):
            return handlers.predict_example(evt.index, show_map, opac, predictors=predictors, shown=shown)

        gallery.select(on_select, inputs=[show, opacity, chooser], outputs=result_outputs,
                       api_visibility="private", concurrency_limit=handlers.INFERENCE_SLOTS,
                       concurrency_id="predict").success(None, js=show_result_js, api_visibility="private")
        chooser.change(functools.partial(handlers.show_models, n_models=n), inputs=[chooser, show, opacity, state],
                       outputs=[by_name[k] for k in handlers.MODELS_OUTPUTS] + panel_outputs,
                       api_visibility="private", show_progress="hidden",
                       queue=False).then(handlers.refresh_downloads, inputs=[opacity, state], outputs=downloads,
                                         api_visibility="private", show_progress="hidden", queue=False)
        for i, choice in enumerate(choices):      # a multi-class / multi-label model's map, class by class
            choice.input(functools.partial(handlers.choose_map, i, n_models=n),
                         inputs=[choice, show, opacity, state], outputs=panel_outputs, api_visibility="private",
                         show_progress="hidden", trigger_mode="always_last", queue=False)

        def predict(file: gr.FileData, show_heatmap: bool = True, heatmap_class: str | None = None,
                    request: gr.Request = None) -> Answer:
            return handlers.api_predict(file, show_heatmap, heatmap_class, predictors=predictors,
                                        client=budget.client_key(request))

        predict.__doc__ = handlers.api_predict.__doc__
        gr.api(predict, api_name="predict", concurrency_limit=handlers.INFERENCE_SLOTS, concurrency_id="predict")
        describe_api(demo, "predict", predict)
        accept_earlier_calls(demo, "predict", predict)
    demo.cxr_predictors = predictors       # launch() serves them over REST too (rest.build_router)
    jan.protect_existing()          # example thumbnails cached at build time
    jan.blocks.append(demo)
    return demo


EXAMPLE_FILE = {"url": "chest_xray.jpeg", "meta": {"_type": "gradio.FileData"}}   # the page shows handle_file(...)


def describe_api(demo: gr.Blocks, api_name: str, fn) -> None:
    """The API page documents itself: each parameter named and described (the docstring's Args),
    a working file example (``handle_file``), and the return typed with every field described
    (cxr.api's schema). ``gr.api`` labels its parameters "1st", "2nd" and types the return from
    the annotation alone, without field descriptions."""
    from gradio.utils import get_function_description

    block_fn = next(f for f in demo.fns.values() if f.api_name == api_name)
    _, params, _ = get_function_description(fn)
    for component, name in zip(block_fn.inputs, params):
        component.label = name
        component._api_info = dict(component._api_info, additional_description=params[name])
        if name == "file":
            component.example_payload = component.example_value = lambda: EXAMPLE_FILE
    _, whole = rest.schema_models(gr.FileData | None, "Here: a file; its `url` downloads it.")
    schema = whole.model_json_schema()
    schema["description"] = "One JSON object: the first model's answer at the top level, every model's under `models`."
    for component in block_fn.outputs:
        component.label = "answer"
        component._api_info = schema


def accept_earlier_calls(demo: gr.Blocks, api_name: str, fn) -> None:
    """A call that leaves out trailing optional arguments gets their defaults: raw HTTP callers
    of ``/gradio_api/call/predict`` written before ``heatmap_class`` was added send
    ``[file, show_heatmap]`` (the README's curl snippet did), which Gradio refuses ("didn't
    receive enough input values"); gradio_client fills defaults itself. A call without the
    required arguments is still refused by Gradio, as before."""
    import inspect

    block_fn = next(f for f in demo.fns.values() if f.api_name == api_name)
    params = [p for p in inspect.signature(fn).parameters.values() if p.annotation is not gr.Request
              and p.name != "request"][:len(block_fn.inputs)]
    required = sum(p.default is inspect.Parameter.empty for p in params)
    defaults = [None if p.default is inspect.Parameter.empty else p.default for p in params]
    validate = demo.validate_inputs

    def validate_inputs(block, inputs):
        if block is block_fn and isinstance(inputs, list) and required <= len(inputs) < len(defaults):
            inputs.extend(defaults[len(inputs):])     # the list Gradio goes on to preprocess
        return validate(block, inputs)

    demo.validate_inputs = validate_inputs


def launch(demo: gr.Blocks, **kwargs):
    """The hardened launch settings, shared by __main__, the tests and the benchmark."""
    from starlette.middleware import Middleware

    # Refusal policy: 2 requests run at once, up to CXR_QUEUE_SIZE (64) wait; beyond that a
    # request is refused at once with "queue is full" (20 clients x 10 requests: 0 refused).
    queue_size = int(os.environ.get("CXR_QUEUE_SIZE", QUEUE_SIZE))
    demo.queue(max_size=queue_size, default_concurrency_limit=2)
    # The REST routes (rest.py) are routes of the same FastAPI app, ahead of Gradio's own, behind
    # the same UploadGuard; they share the prediction slots and the queue's size with the page.
    router = rest.build_router(demo, getattr(demo, "cxr_predictors", []), max_waiting=queue_size)
    settings = dict(state_session_capacity=int(os.environ.get("CXR_SESSION_CAPACITY", SESSION_CAPACITY)),
                    max_file_size=files.MAX_FILE_SIZE, show_error=False, allowed_paths=[], footer_links=["api"],
                    theme=gr.themes.Soft(), css=render.CSS, ssr_mode=False,   # Python serves page and REST alike
                    app_kwargs={"middleware": [Middleware(files.UploadGuard)], "routes": list(router.routes)})
    settings.update(kwargs)
    jan = files.janitor()
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


SHUTDOWN_GRACE_S = 10.0    # after a stop signal, the longest the server may take to close


def stop_on_signals(grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """SIGTERM (how containers and Spaces stop a process), SIGHUP and SIGINT end the app as Ctrl-C
    does: Gradio's main-thread loop closes the server, then :func:`main` removes the upload cache and
    stops the decode workers. Should closing the server hang (a CI run once saw Gradio's close take
    more than 30 s after SIGINT), a watchdog armed by the first signal does the same cleanup after
    ``grace_s`` and ends the process (exit status 128 + signal). Main thread only (Python delivers
    signals there)."""
    import threading

    def force_exit(signum: int) -> None:
        logging.getLogger("cxr.app").warning("the server did not close within %.0f s of %s: cleaning up and "
                                             "exiting", grace_s, signal.Signals(signum).name)
        try:
            files.janitor().shutdown()
            close_default_pool()
        finally:
            os._exit(128 + signum)

    def interrupt(signum, frame):
        if not getattr(interrupt, "armed", False):
            interrupt.armed = True
            watchdog = threading.Timer(grace_s, force_exit, args=(signum,))
            watchdog.daemon = True              # a clean close exits at once; only a hang meets it
            watchdog.start()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupt)


def parse_models(values: list[str] | None) -> list[str | None]:
    """--model may be repeated and/or hold a comma-separated list; None = the shipped model."""
    names = [m.strip() for v in (values or []) for m in str(v).split(",") if m.strip()]
    return names or [None]


SHIPPED_ENV = "CXR_SHIPPED_MODELS"    # a comma-separated list of models/ folder names to serve beside the default


def is_shipped_folder(folder: Path) -> bool:
    """A model folder as shipped in models/: config.json and safetensors weights."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def shipped_models() -> list[str | None]:
    """What a plain ``cxr-app`` serves (no --model, no CXR_MODEL / MODEL_ID): the shipped default
    (``cxr.locate.resolve_model``) first and, where it lies in a checkout's models/ folder, every
    other shipped model folder beside it (config.json + model.safetensors; sorted by name - a
    binary NORMAL/PNEUMONIA model, a three-class NORMAL/BACTERIAL/VIRAL one, ...), side by side;
    ``CXR_SHIPPED_MODELS=a,b`` names the ones to serve instead (folder names in models/; an unknown
    name stops start-up with a clear error). After a plain install (the package data holds only
    the default) or on a Space: the default alone (a Space names its models in MODEL_ID)."""
    from cxr.locate import MODEL_ENV, resolve_model

    if any(os.environ.get(v, "").strip() for v in MODEL_ENV):
        return [None]
    try:
        default = Path(resolve_model())
    except Exception:  # noqa: BLE001 - the loader reports a missing default with its own message
        return [None]
    if not default.is_dir() or default.parent.name != "models":
        return [None]
    listed = [m.strip() for m in os.environ.get(SHIPPED_ENV, "").split(",") if m.strip()]
    if listed:
        missing = [m for m in listed if not is_shipped_folder(default.parent / m)]
        if missing:
            raise ModelLoadError(f"{SHIPPED_ENV}: no shipped model folder {', '.join(missing)} in {default.parent} "
                                 f"(shipped: {', '.join(p.name for p in sorted(default.parent.iterdir()) if is_shipped_folder(p))})")
        others = [default.parent / m for m in listed if m != default.name]
    else:
        others = [p for p in sorted(default.parent.iterdir()) if p != default and p.is_dir() and is_shipped_folder(p)]
    return [None] + [str(o) for o in others]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description="Chest X-ray demo. " + DISCLAIMER)
    ap.add_argument("--model", action="append", default=None,
                    help="Hub id or local folder; repeat (or comma-separate) to compare models (env MODEL_ID)")
    ap.add_argument("--revision", default=os.environ.get("MODEL_REVISION"), help="Hub revision (env MODEL_REVISION)")
    ap.add_argument("--precision", default=os.environ.get("CXR_PRECISION", "auto"), choices=PRECISIONS)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    specs = parse_models(args.model or ([os.environ["MODEL_ID"]] if os.environ.get("MODEL_ID") else None))
    try:
        if specs == [None]:
            specs = shipped_models()    # a checkout: every shipped model, side by side
        predictors = [Predictor.from_pretrained(m, revision=args.revision, precision=args.precision) for m in specs]
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.chdir(HERE)  # serve nothing outside the app's own folder
    stop_on_signals()
    try:
        demo = create_demo(predictors)
        logging.getLogger("cxr.app").info("upload cache: %s (removed at shutdown)", files.janitor().root)
        launch(demo, server_port=args.port)
    except KeyboardInterrupt:
        pass
    finally:
        files.janitor().shutdown()
        close_default_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
