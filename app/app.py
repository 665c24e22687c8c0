"""Gradio Space: NORMAL vs PNEUMONIA on a chest X-ray, with calibrated probabilities and an
attention map. Research and education only: not a medical device.

    MODEL_ID=user/model python app/app.py          # a Hub model (MODEL_REVISION pins it)
    python app/app.py --model outputs/my-run        # a local folder
    python app/app.py                               # the project's shipped default model

Handlers are plain functions; ``create_demo(predictor)`` only wires them. The model is
loaded once, at start-up; a missing, pickle-only or corrupt model stops start-up with a
clear error.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.explain import EXPLAINER_NAMES, heatmap_image, overlay
from cxr.imaging import ImageLoadError, load_image
from cxr.inference import DISCLAIMER, ModelLoadError, Predictor

HERE = Path(__file__).resolve().parent

logger = logging.getLogger("cxr.app")

MAX_FILE_SIZE = "10mb"
ACCEPTED_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom"]
DISPLAY_MAX_SIDE = 512
SESSION_CAPACITY = 256     # sessions kept in memory (env CXR_SESSION_CAPACITY)
STATE_TTL_S = 1800         # the opacity slider's stored image + map expire after 30 min
GENERIC_ERROR = "Something went wrong while analysing this image. Please try another file."
HEATMAP_DIR = Path(tempfile.gettempdir()) / "cxr-app-heatmaps"
EXAMPLES_DIR = HERE / "examples"

TEACHING = """
### What is transfer learning?
A network first learns general visual features on a large data set (for example ImageNet
photos, or other chest X-rays), then is **fine-tuned** on a smaller task, here NORMAL vs
PNEUMONIA. Strategies differ in how much of the network is retrained: only the final
classifier (*frozen backbone*), the last stages (*partial*), everything (*full*), or small
low-rank adapters added to the weights (*LoRA*). The model in this demo may also have been
trained *from scratch*: see its facts below.

### What does the heat map mean?
It shows which regions most influenced the score for PNEUMONIA: **Grad-CAM** for
convolutional networks, **attention rollout** for vision transformers. It is *not* a
segmentation of disease, and a plausible-looking map does not make a prediction right.
Models can rely on shortcuts such as text markers, borders or patient position.

### Limits
Trained on paediatric films from a single hospital, resized to a square. Unknown
performance on adults, other scanners or other findings. **Not a medical device.**
"""


# ------------------------------------------------------------------ handlers

class DecisionLabel(gr.Label):
    """gr.Label whose headline is the thresholded decision, not the most probable class
    (they differ when the saved operating threshold is not 0.5)."""

    @classmethod
    def get_block_name(cls) -> str:
        return "label"  # the same front-end component

    def postprocess(self, value):
        if isinstance(value, dict) and "decision" in value:
            data = super().postprocess(value["probabilities"])
            if data and value["decision"]:
                data.label = value["decision"]
            return data
        return super().postprocess(value)


def _display_copy(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    scale = DISPLAY_MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    return image


def _sweep_heatmaps(max_age_s: float = 600.0) -> None:
    """Gradio copies returned files into its own cache (cleaned by delete_cache); our
    originals are removed here once they are old."""
    import time

    HEATMAP_DIR.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for f in HEATMAP_DIR.glob("heatmap-*.png"):
        try:
            if now - f.stat().st_mtime > max_age_s:
                f.unlink()
        except OSError:
            pass


def _details(result) -> str:
    lines = [f"> ⚠️ **{DISCLAIMER}**", ""]
    if result.warning:
        lines += [f"**{result.warning}**", ""]
    else:
        lines += [f"**Prediction: {result.label}** — P({result.positive_label}) = "
                  f"{result.positive_probability:.3f}"]
    lines += [f"Decision threshold: **{result.threshold:.3f}** ({result.threshold_source}). "
              f"{result.positive_label} when its calibrated probability is at or above the threshold."]
    if result.explainer:
        lines += ["", f"Heat map: {EXPLAINER_NAMES.get(result.explainer, result.explainer)}, "
                      f"for the class {result.positive_label}."]
    return "\n\n".join(line for line in lines if line)


def predict(file, opacity: float = 0.4, show_heatmap: bool = True, *, predictor: Predictor):
    """Uploaded file -> (label probabilities, overlay, heat map PNG, details, JSON, state)."""
    if file is None:
        raise gr.Error("Please upload a chest X-ray (PNG, JPEG or DICOM).")
    path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
    try:
        image = load_image(path)
        result = predictor.predict(image, explain=bool(show_heatmap))
    except ImageLoadError as e:
        raise gr.Error(f"Cannot read this file: {e}.") from None
    except gr.Error:
        raise
    except Exception:  # noqa: BLE001 - the user gets a generic message, the log the details
        logger.exception("prediction failed")
        raise gr.Error(GENERIC_ERROR) from None
    display = _display_copy(image)
    label = {} if result.out_of_distribution else {"decision": result.label, "probabilities": result.probabilities}
    response = result.to_dict()
    heat_file, shown = None, display
    if result.heatmap is not None:
        shown = overlay(display, result.heatmap, opacity)
        _sweep_heatmaps()
        heat_file = str(HEATMAP_DIR / f"heatmap-{uuid.uuid4().hex}.png")
        heatmap_image(result.heatmap).save(heat_file)
        response["heatmap_size"] = list(result.heatmap.shape)
    state = {"display": display, "heatmap": result.heatmap}
    return label, shown, heat_file, _details(result), response, state


def reblend(state, opacity: float):
    """Opacity slider: re-blend the stored map, no new inference. Without a stored image
    (nothing predicted yet, or the session's state expired) the shown image is left as is."""
    if not state or state.get("display") is None:
        return gr.skip()
    if state.get("heatmap") is None:
        return state["display"]
    return overlay(state["display"], state["heatmap"], opacity)


def model_facts(predictor: Predictor) -> str:
    f = predictor.describe()
    rows = [("Model", f.get("model")), ("Architecture", f.get("architecture")),
            ("Base model", f.get("base_model")), ("Strategy", f.get("strategy")),
            ("Training data", Path(str(f.get("dataset", "?"))).name), ("Input size", f.get("image_size")),
            ("Labels", ", ".join(f.get("labels", []))), ("Decision threshold", f"{f['threshold']:.3f}"),
            ("Temperature", f"{f['temperature']:.3f}"), ("Explanation", f.get("explainer"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
    metrics = f.get("validation_metrics") or {}
    extra = ""
    if metrics:
        extra = "\n\nValidation (patient-grouped split): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    return "| fact | value |\n|---|---|\n" + table + extra


def _examples() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpeg"))


def create_demo(predictor: Predictor) -> gr.Blocks:
    run = functools.partial(predict, predictor=predictor)
    functools.update_wrapper(run, predict)
    with gr.Blocks(title="Chest X-ray transfer learning (research only)", analytics_enabled=False,
                   delete_cache=(600, 1800)) as demo:
        gr.Markdown("# Chest X-ray: NORMAL vs PNEUMONIA\n"
                    f"> ⚠️ **{DISCLAIMER}**")
        state = gr.State(time_to_live=STATE_TTL_S)
        with gr.Row():
            with gr.Column():
                file = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", file_types=ACCEPTED_TYPES,
                               type="filepath")
                show = gr.Checkbox(value=True, label="Show attention map")
                opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Heat-map opacity")
                button = gr.Button("Predict", variant="primary")
            with gr.Column():
                label = DecisionLabel(num_top_classes=2, label="Decision (saved threshold) and calibrated probabilities")
                image = gr.Image(type="pil", label="X-ray with attention map", format="jpeg")  # ~10x faster to encode than PNG
                details = gr.Markdown()
                heat = gr.File(label="Raw heat map (PNG)")
                response = gr.JSON(label="API response", visible=False)
        outputs = [label, image, heat, details, response, state]
        button.click(run, inputs=[file, opacity, show], outputs=outputs, api_name="predict",
                     concurrency_limit=2)
        opacity.release(reblend, inputs=[state, opacity], outputs=image, api_visibility="private")
        examples = _examples()
        if examples:  # outputs cached for everyone after an example's first use
            example_fn = functools.partial(predict, opacity=0.4, show_heatmap=True, predictor=predictor)
            gr.Examples(examples=[[e] for e in examples], inputs=[file], outputs=outputs, fn=example_fn,
                        cache_examples=True, cache_mode="lazy",
                        label="Examples (Kermany et al. 2018, CC BY 4.0; from the training split)")
        with gr.Accordion("Learn: transfer learning and attention maps", open=False):
            gr.Markdown(TEACHING)
            gr.Markdown("### This model\n" + model_facts(predictor))
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """The hardened launch settings, shared by __main__ and the tests."""
    # Sessions (each with a copy of the UI config and the opacity slider's state) are kept
    # for at most SESSION_CAPACITY clients, oldest evicted first: API callers that open a new
    # session per request cannot grow memory without bound (Gradio's default is 10,000).
    demo.queue(max_size=int(os.environ.get("CXR_QUEUE_SIZE", 16)), default_concurrency_limit=2)
    settings = dict(state_session_capacity=int(os.environ.get("CXR_SESSION_CAPACITY", SESSION_CAPACITY)),
                    max_file_size=MAX_FILE_SIZE, show_error=False, allowed_paths=[], footer_links=["api"],
                    theme=gr.themes.Soft())
    settings.update(kwargs)
    return demo.launch(**settings)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description="Chest X-ray demo. " + DISCLAIMER)
    ap.add_argument("--model", default=os.environ.get("MODEL_ID"), help="Hub id or local folder (env MODEL_ID)")
    ap.add_argument("--revision", default=os.environ.get("MODEL_REVISION"), help="Hub revision (env MODEL_REVISION)")
    ap.add_argument("--precision", default=os.environ.get("CXR_PRECISION", "auto"), choices=["auto", "bf16", "fp32"])
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        predictor = Predictor.from_pretrained(args.model, revision=args.revision, precision=args.precision)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.chdir(HERE)  # serve nothing outside the app's own folder
    launch(create_demo(predictor), server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
