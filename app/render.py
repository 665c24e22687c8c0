"""What the page shows, as text: the CSS, the teaching notes, one answer card per model (the
decision, P(positive) on a bar with the threshold on it), the heat map's caption, and the
model-facts table. Pure functions of the answers in the one schema (:mod:`cxr.api`,
``Prediction.to_api``) and of a model's facts (``cxr.api.model_info``, also served as
``/api/v1/model-info``): no Gradio, no files. Research and education only: not a medical device.
"""

from __future__ import annotations

import html
from pathlib import Path

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.api import model_info
from cxr.explain import colorbar_css
from cxr.inference import Predictor

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


# ------------------------------------------------------------------ answers and heat-map captions

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
    """The facts panel: ``cxr.api.model_info`` (what /api/v1/model-info answers) as a table."""
    f = model_info(predictor)
    strategy, base = f.get("strategy"), f.get("base_model")
    how = None
    if base and strategy:
        how = ("from scratch (no pretrained weights)" if "scratch" in str(base)
               else f"transfer from {base}, {strategy} fine-tuning")
    size = f.get("input_size")
    figures = f["figures"]
    rows = [("Model", f.get("model")), ("Architecture", f.get("architecture")), ("Trained", how),
            ("Training data", Path(str(f["dataset"])).name if f.get("dataset") else None),
            ("Input size", f"{size[0]} x {size[1]} pixels" if size else None),
            ("Decision threshold", f"{f['threshold']:.3f} ({f['threshold_source']})"),
            ("Heat map", f.get("heatmap_method")),
            ("Out-of-distribution check", f"distance limit {f['ood_threshold']:.1f}" if f["ood_threshold"] is not None
             else "colour check only (no fitted distance for this model)")]
    metrics = figures["validation"]["metrics"]
    rows.append(("Validation (held-out patients)", _fmt_metrics(metrics) if metrics else "not recorded"))
    cv = figures["cross_validated"]["metrics"]
    rows.append(("Cross-validated", _fmt_metrics(cv) if cv else "not measured for this model"))
    ext = figures["external"]["metrics"]
    rows.append(("External data", _fmt_metrics(ext) if ext else "not measured for this model"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
    return "| fact | value |\n|---|---|\n" + table
