"""What the page shows, as text: the CSS, the teaching notes, one answer card per model (the
decision, P(positive) on a bar with the threshold on it), the heat map's caption, and the
model-facts table. Pure functions of the answers in the one schema (:mod:`cxr.api`,
``Prediction.to_api``) and of a model's facts (``cxr.api.model_info``, also served as
``/api/v1/model-info``): no Gradio, no files. Research and education only: not a medical device.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.api import model_info
from cxr.explain import OVERLAY_FLOOR, colormap_lut, map_strength
from cxr.inference import DISCLAIMER, Predictor, finding_weight

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
**attention rollout** (vision transformers) shows where the model attended. Within one film
the colour runs from its weakest region (left uncoloured) to its strongest (dark red). The
whole map is then drawn at a *strength* of probability / threshold, at most 100 %: every
PNEUMONIA answer shows its map at full strength, and a NORMAL answer fades as the probability
falls, so a confident NORMAL shows little colour. The caption under each map gives the
strength used. A map is *not* a segmentation of disease, and a plausible map does not make a
prediction right: models can rely on shortcuts such as text markers, borders or patient
position.

### Models with more than two answers
A **multi-class** model (for example NORMAL / BACTERIAL / VIRAL) gives one label per film: the
class with the highest probability, every class's probability shown beside it. When one of its
classes is normal it also has a *screening* threshold on the probability of an abnormal film.
A **multi-label** model answers each finding on its own (a film can show several, or none):
each finding's probability is compared with that finding's own threshold, and the findings at
or above theirs are listed. Their heat maps can be drawn for any class or finding (the choice
under the map); attention rollout is the same map for every class, as it follows attention,
not a class's score.

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
.cxr-card {flex: 1 1 200px; border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px;}
.cxr-model {font-size: 0.85em; opacity: 0.8; margin-bottom: 2px;}
.cxr-headline {font-size: 1.6em; font-weight: 700; line-height: 1.2; margin: 2px 0 6px 0;}
.cxr-headline.cxr-flagged {font-size: 1.15em;}
.cxr-tag {display: inline-block; font-size: 0.55em; vertical-align: middle; padding: 1px 6px; border-radius: 4px;
          background: #f6c343; color: #222; margin-left: 6px;}
.cxr-bar {position: relative; height: 16px; border-radius: 8px; background: var(--border-color-primary);
          margin: 22px 0 4px 0; border: 1px solid var(--body-text-color-subdued);}
.cxr-fill {position: absolute; left: 0; top: 0; bottom: 0; border-radius: 8px; background: #4a6fa5;}
.cxr-thr {position: absolute; top: -6px; bottom: -6px; width: 4px; margin-left: -2px; border-radius: 2px;
          background: var(--body-text-color); box-shadow: 0 0 0 1px var(--background-fill-primary);}
.cxr-thr-label {position: absolute; top: -22px; transform: translateX(-50%); font-size: 0.75em; white-space: nowrap;}
.cxr-scale {display: flex; justify-content: space-between; font-size: 0.75em; opacity: 0.8;}
.cxr-text {font-size: 0.9em; margin-top: 4px;}
.cxr-rows {margin-top: 6px;}
.cxr-row {display: grid; grid-template-columns: minmax(70px, 35%) 1fr 3.2em; gap: 6px; align-items: center;
          font-size: 0.85em; margin: 3px 0;}
.cxr-row[data-present="true"] {font-weight: 700;}
.cxr-minibar {position: relative; height: 10px; border-radius: 5px; background: var(--border-color-primary);
              border: 1px solid var(--body-text-color-subdued);}
.cxr-minibar .cxr-thr {top: -4px; bottom: -4px; width: 3px; margin-left: -1.5px;}
.cxr-colorbar {position: relative; height: 12px; border-radius: 6px; margin: 4px 0 2px 0;
               border: 1px solid var(--border-color-primary);
               background-image: linear-gradient(45deg, #8884 25%, transparent 25%, transparent 75%, #8884 75%);
               background-size: 8px 8px;}
.cxr-colorbar-fill {position: absolute; inset: 0; border-radius: 6px;}
.cxr-colorbar-unused {position: absolute; top: -3px; bottom: -3px; right: 0; background: var(--background-fill-primary);
                      opacity: 0.85; border-left: 2px solid var(--body-text-color);}
.cxr-map-caption {font-size: 0.85em;}
.cxr-notice {border-left: 4px solid #f6c343; padding: 6px 10px; font-size: 0.95em;}
.cxr-reveal {border-left: 4px solid #4a6fa5; padding: 6px 10px; margin-top: 8px; font-size: 0.95em;}
.cxr-placeholder {border: 1px dashed var(--border-color-primary); border-radius: 8px; padding: 14px; opacity: 0.85;}
#cxr-header p {font-size: 0.9em; margin-top: 2px;}
.cxr-panel .cxr-card {min-height: 175px;}
.cxr-panel img {max-height: 420px; object-fit: contain;}
#cxr-examples .grid-wrap {overflow: visible !important; height: auto !important; min-height: 0 !important;
                          max-height: none !important;}
/* the gallery's label takes its own room: on a phone it wraps to three lines and, floating, covered the
   first row of films */
#cxr-examples [data-testid=block-label] {position: static;}
/* result files keep their whole names (Gradio cuts them to "cxr-overl....png" on a phone: the models'
   overlays could not be told apart) */
#cxr-download .filename {flex-wrap: wrap;}
#cxr-download .filename .stem {min-width: 0; white-space: normal; overflow: visible; text-overflow: clip;
                               overflow-wrap: anywhere;}
@media (max-width: 700px) {
  #cxr-film img, .cxr-panel img {max-height: 260px; object-fit: contain;}
  .cxr-panel .cxr-card {min-height: 0;}
  #cxr-header h1 {font-size: 1.2em !important; margin: 0 !important;}
  #cxr-header p {font-size: 0.78em; margin: 0;}
  .cxr-headline {font-size: 1.3em;}
  .cxr-bar {margin-top: 18px;}
  .cxr-text {font-size: 0.82em;}
  /* after an answer the panels show the film with its map: the plain copy would push them down */
  div:has(.cxr-card:not([data-decision="none"])) #cxr-film {display: none !important;}
  #cxr-examples .grid-container {--grid-cols: 3 !important;}
}
"""


# ------------------------------------------------------------------ answers and heat-map captions

def answer_card(r: dict, show_model: bool) -> str:
    """One model's answer: headline = decision; one bar for P(positive) with the threshold on it
    (binary), or every class / finding on its own bar (multi-class, multi-label: :func:`label_set_card`)."""
    e = html.escape
    model = f'<div class="cxr-model">{e(r["model"])}</div>' if show_model else ""
    if r["out_of_distribution"]:
        return (f'<div class="cxr-card" data-testid="cxr-card" data-decision="none">{model}'
                f'<div class="cxr-headline cxr-flagged">Not analysed</div>'
                f'<div class="cxr-text">{e(r["message"] or "")}</div></div>')
    if r.get("task", "binary") != "binary":
        return label_set_card(r, model)
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


def _finding_row(f: dict) -> str:
    e = html.escape
    p, t = f["probability"], f["threshold"]
    thr = (f'<div class="cxr-thr" style="left:{100 * t:.1f}%" title="threshold {t:.2f}"></div>' if t is not None else "")
    aria = f"{e(f['label'])} {p:.2f}" + (f", threshold {t:.2f}" if t is not None else "")
    return (f'<div class="cxr-row" data-testid="cxr-finding" data-label="{e(f["label"])}" '
            f'data-present="{"true" if f["present"] else "false"}"><span>{e(f["label"])}</span>'
            f'<div class="cxr-minibar" role="img" aria-label="{aria}">'
            f'<div class="cxr-fill" style="width:{100 * p:.1f}%"></div>{thr}</div><span>{p:.2f}</span></div>')


def label_set_card(r: dict, model: str = "") -> str:
    """A multi-class or multi-label answer: the decision, what decided it, every class / finding
    on its own bar (its threshold marked where it has one), and the screening call if any."""
    e = html.escape
    findings = r.get("findings") or []
    tag = '<span class="cxr-tag">borderline</span>' if r["borderline"] else ""
    if r["task"] == "multiclass":
        why = (f'The class with the highest probability decides: <b>{e(r["decision"])}</b> '
               f'({r["probability"]:.2f}).')
    else:
        listed = [f for f in findings if f["present"] and f["label"] in str(r["decision"]).split(", ")]
        if listed and any(f["threshold"] is not None for f in listed):
            why = "At or above their own threshold: " + ", ".join(
                f'<b>{e(f["label"])}</b> {f["probability"]:.2f} (threshold {f["threshold"]:.2f})' for f in listed) + "."
        else:
            why = "No finding is at or above its own threshold."
    screening = ""
    sc = r.get("screening")
    if sc:
        screening = (f'<div class="cxr-text" data-testid="cxr-screening">Screening: probability of an abnormal film '
                     f'{sc["abnormal_probability"]:.2f}, threshold {sc["threshold"]:.2f}: '
                     f'<b>{"abnormal" if sc["abnormal"] else "normal"}</b>.</div>')
    caution = (f'<div class="cxr-text">Within {r.get("borderline_margin", 0.05):.2f} of a threshold: treat it as '
               'uncertain.</div>' if r["borderline"] else "")
    return (f'<div class="cxr-card" data-testid="cxr-card" data-decision="{e(r["decision"])}" '
            f'data-task="{e(r["task"])}">{model}'
            f'<div class="cxr-headline" data-testid="cxr-headline">{e(r["decision"])}{tag}</div>'
            f'<div class="cxr-text">{why}</div>'
            f'<div class="cxr-rows">{"".join(_finding_row(f) for f in findings)}</div>{screening}{caution}</div>')


def map_view(r: dict, label: str) -> dict:
    """The answer as the map of ``label`` sees it: ``heatmap_class``, ``probability`` and
    ``threshold`` of that class (:func:`cxr.inference.finding_weight`), for its caption and alt text."""
    p, t = finding_weight(r.get("findings") or [], label, r.get("task", "binary"))
    return {**r, "heatmap_class": label, "positive_label": label, "probability": p, "threshold": t,
            "_map_reference": "the top class's probability" if r.get("task") == "multiclass" else None}


def answer_html(results: list[dict], show_model: bool | None = None) -> str:
    show = len(results) > 1 if show_model is None else show_model
    return '<div class="cxr-cards">' + "".join(answer_card(r, show) for r in results) + "</div>"


PLACEHOLDER = ('<div class="cxr-placeholder">The answer and its heat map appear here. Upload a chest X-ray, '
               'or pick one of the example films below.</div>')
PLACEHOLDER_READY = '<div class="cxr-placeholder">Film loaded: press <b>Predict</b>.</div>'
AFTER_ANSWER = ('<div class="cxr-next" data-testid="cxr-next">To try another film, drop or choose it in the '
                'upload box, or pick an example below.</div>')


def colorbar_css(floor: float = OVERLAY_FLOOR, stops: int = 7) -> str:
    """The legend's gradient over drawn map values 0-1: each value's colour at the opacity the
    overlay gives it (uncoloured up to ``floor``, the full colour at 1), as at slider opacity 1."""
    lut = colormap_lut()
    c0 = lut[int(round(floor * 255))]
    parts = [f"rgba({c0[0]}, {c0[1]}, {c0[2]}, 0) 0%"]
    for x in np.linspace(floor, 1, stops):
        c = lut[int(round(x * 255))]
        parts.append(f"rgba({c[0]}, {c[1]}, {c[2]}, {(x - floor) / (1 - floor):.2f}) {100 * x:.0f}%")
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


def strength_text(r: dict) -> tuple[float, str]:
    """The map's strength for this answer (``cxr.explain.map_strength``) and why, in words."""
    p, t, pos = r.get("probability"), r.get("threshold"), r.get("positive_label", "PNEUMONIA")
    if p is None or t is None:
        return 1.0, ""
    s = map_strength(p, t)
    if r.get("_map_reference"):          # a multi-class map: relative to the answer's class
        return s, (f"full strength: {pos} is the answer ({p:.2f})" if p >= t else
                   f"{100 * s:.0f} % strength: the probability of {pos} ({p:.2f}) is {100 * s:.0f} % of "
                   f"{r['_map_reference']} ({t:.2f}), so the map fades")
    if p >= t:
        why = (f"full strength: the probability of {pos} ({p:.2f}) is at or above the threshold ({t:.2f}), "
               f"so the answer is {pos}")
    else:
        why = (f"{100 * s:.0f} % strength: the probability of {pos} ({p:.2f}) is {100 * s:.0f} % of the "
               f"threshold ({t:.2f}), so the map fades")
    return s, why


def map_caption(r: dict) -> str:
    """Beside the map: whose map it is, the colour scale with the part this film reaches, the
    strength used and why (true at every probability), and the caveat."""
    e = html.escape
    s, why = strength_text(r)
    unused = (f'<div class="cxr-colorbar-unused" style="left:{100 * s:.1f}%" '
              f'title="not reached: the map is drawn at {100 * s:.0f} % strength"></div>') if s < 0.995 else ""
    return (f'<div class="cxr-map-caption" data-testid="cxr-map-caption" data-strength="{s:.3f}">'
            f'<b>{e(r["model"])}</b>: {e(r["heatmap_method"] or "")} for {e(r["heatmap_class"] or "")}, '
            f'drawn at {why}.'
            f'<div class="cxr-colorbar" role="img" aria-label="colour scale, {100 * s:.0f} % of it used">'
            f'<div class="cxr-colorbar-fill" style="background:{colorbar_css()}"></div>{unused}</div>'
            f'<div class="cxr-scale"><span>0: uncoloured up to {OVERLAY_FLOOR:.2f}</span>'
            f'<span>1: strongest region at full strength</span></div>'
            f'{MAP_CAVEAT}</div>')


def map_alt(r: dict) -> str:
    """Alt text of an overlay: what the image is, the answer and the map's strength."""
    s, _ = strength_text(r)
    return (f"The chest X-ray with {r['model']}'s {r['heatmap_method']} heat map for {r['heatmap_class']} "
            f"drawn over it at {100 * s:.0f} % strength (answer {r['decision']}, probability "
            f"{r['probability']:.2f}" + (f", threshold {r['threshold']:.2f}" if r.get("threshold") is not None else "")
            + f"). Red marks the regions that raised the {r['heatmap_class']} score most; it is not a map of "
            "disease.")


def film_alt(r: dict | None = None) -> str:
    return "The uploaded chest X-ray" + (f", shown without a map ({r['model']})" if r else "")


# ------------------------------------------------------------------ example films: labels after the answer

def example_labels(attribution: Path) -> dict[str, str]:
    """file name -> the label it has in its data set, from ATTRIBUTION.md's table
    (| `film-1.jpeg` | `original` | NORMAL |)."""
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|\s*`[^`]+`\s*\|\s*([^|]+?)\s*\|", attribution.read_text(), re.M)
    return {name: label for name, label in rows}


def example_reveal(label: str, results: list[dict]) -> str:
    """After the answer: the example film's label in the data set, and which models agreed."""
    e = html.escape
    base = label.split()[0].upper()
    words = set(re.findall(r"[A-Z]+", label.upper()))
    verdicts = []
    for r in results:
        if r["out_of_distribution"]:
            verdicts.append(f"{e(r['model'])}: not analysed")
        elif r.get("task", "binary") == "binary":
            verdicts.append(f"{e(r['model'])}: {'right' if r['decision'] == base else 'wrong'}")
        elif {str(f["label"]).upper() for f in r.get("findings") or []} & words:   # its labels name this film's
            verdicts.append(f"{e(r['model'])}: {'right' if r['decision'].upper() in words else 'wrong'}")
        elif r.get("screening"):                       # another label set: judged on normal vs abnormal
            right = r["screening"]["abnormal"] == (base != "NORMAL")
            verdicts.append(f"{e(r['model'])}: {'abnormal' if r['screening']['abnormal'] else 'normal'} "
                            f"({'right' if right else 'wrong'}; its labels are not this data set's)")
        else:
            verdicts.append(f"{e(r['model'])}: {e(r['decision'])} (its labels are not this data set's)")
    return (f'<div class="cxr-reveal" data-testid="cxr-reveal" data-label="{e(base)}">This example film is '
            f'labelled <b>{e(label)}</b> in its data set (Kermany et al. 2018). ' + "; ".join(verdicts) + ".</div>")


# ------------------------------------------------------------------ the downloadable report

def report_markdown(results: list[dict], film_name: str, overlay_names: dict[str, str],
                    label: str | None = None) -> str:
    """A short report of one prediction: the film, each model's answer, its map, the caveats."""
    lines = ["# Chest X-ray demo: result", "", f"Film: {film_name}", ""]
    if label:
        lines += [f"Label in its data set: {label}", ""]
    for r in results:
        lines.append(f"## {r['model']}")
        if r["out_of_distribution"]:
            lines += ["Not analysed: " + (r.get("message") or "the film does not look like the training films."), ""]
            continue
        s, why = strength_text(r)
        lines.append(f"- Answer: **{r['decision']}**" + (" (borderline: treat as uncertain)" if r["borderline"] else ""))
        if r.get("task", "binary") == "binary":
            lines.append(f"- Probability of {r['positive_label']}: {r['probability']:.2f}; decision threshold "
                         f"{r['threshold']:.2f} ({r['threshold_source']})")
        else:
            rule = ("the class with the highest probability" if r["task"] == "multiclass"
                    else "each finding at or above its own threshold")
            lines.append(f"- Decided by {rule} ({r['threshold_source']}); every "
                         f"{'class' if r['task'] == 'multiclass' else 'finding'}:")
            lines += [f"  - {f['label']}: {f['probability']:.2f}" + (f" (threshold {f['threshold']:.2f})"
                      if f["threshold"] is not None else "") + (" **present**" if f["present"] and r["task"] ==
                      "multilabel" else "") for f in r.get("findings") or []]
            if r.get("screening"):
                sc = r["screening"]
                lines.append(f"- Screening: probability of an abnormal film {sc['abnormal_probability']:.2f}, "
                             f"threshold {sc['threshold']:.2f}: {'abnormal' if sc['abnormal'] else 'normal'}")
        if r["model"] in overlay_names:
            lines.append(f"- Heat map: {overlay_names[r['model']]} ({r['heatmap_method']} for {r['heatmap_class']}, "
                         f"drawn at {why}). {MAP_CAVEAT}")
        lines.append("")
    lines += [f"**{DISCLAIMER}**", ""]
    return "\n".join(lines)


def report_json(results: list[dict], film_name: str, label: str | None = None) -> str:
    """The answers in the one schema (cxr.api; maps left out: they are the PNG files)."""
    return json.dumps({"film": film_name, "label_in_data_set": label,
                       "models": [{**r, "heatmap": None, "heatmap_size": None} for r in results],
                       "disclaimer": DISCLAIMER}, indent=2)


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


METRIC_GLOSSARY = ("*Sensitivity*: the share of pneumonia films the model calls PNEUMONIA. *Specificity*: the "
                   "share of normal films it calls NORMAL. *AUROC*: how well its probability ranks pneumonia "
                   "films above normal ones (1 = perfectly, 0.5 = chance), whatever the threshold.")

_NETWORKS = {"efficientnet": "EfficientNet", "resnet": "ResNet", "vit": "Vision Transformer (ViT)",
             "convnext": "ConvNeXt", "densenet": "DenseNet", "mobilenet": "MobileNet", "swin": "Swin Transformer"}


def _network(predictor: Predictor, facts: dict) -> str | None:
    """The network in words: timm models are named by their timm architecture, not 'timm_wrapper'."""
    arch = facts.get("architecture")
    if arch == "timm_wrapper":
        arch = getattr(predictor.config, "architecture", None) or "a timm network"
    if not arch:
        return None
    low = str(arch).lower().replace("tf_", "")
    for key, name in _NETWORKS.items():
        if low.startswith(key):
            rest = low[len(key):].strip("_-")
            return f"{name} {rest.replace('_', '-').title()} ({arch})" if rest else name
    return str(arch)


def _independent_row(fig: dict) -> str:
    m = fig["metrics"]
    spec, sens, auc = m.get("specificity"), m.get("sensitivity"), m.get("roc_auc")
    parts = [f"specificity about {spec:.2f}" if spec is not None else None,
             f"sensitivity {sens:.2f}" if sens is not None else None, f"AUROC {auc:.3f}" if auc is not None else None]
    text = ", ".join(p for p in parts if p)
    if spec is not None and spec < 1:
        one_in = round(1 / (1 - spec))
        words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
        text += f": about one normal film in {words.get(one_in, one_in)} is called PNEUMONIA"
    source = f" Source: {fig['source']}." if fig.get("source") else ""
    return (f"{text}. Measured independently on {fig['measured_on']}.{source} Expect something like this on "
            "films from another hospital or scanner; a site calibration on your own films (`cxr-calibrate`) "
            "sets a threshold that fits them.")


def model_facts(predictor: Predictor) -> str:
    """The facts panel in visitor words: ``cxr.api.model_info`` (what /api/v1/model-info
    answers) as a table, each figure named for the films it was measured on, and what to expect
    on another hospital's films."""
    f = model_info(predictor)
    facts = predictor.describe()
    strategy, base = f.get("strategy"), f.get("base_model")
    how = None
    if base and strategy:
        how = ("trained from scratch on chest X-rays (no pretrained weights)" if "scratch" in str(base)
               else f"started from {Path(str(base)).name} (pretrained on ImageNet photos)"
               if "in1k" in str(base) or "imagenet" in str(base).lower()
               else f"started from {Path(str(base)).name}")
        how += {"full": ", then every layer fine-tuned on chest X-rays",
                "frozen": ", then only its final classifier trained on chest X-rays",
                "partial": ", then its last stages fine-tuned on chest X-rays",
                "lora": ", then small low-rank adapters (LoRA) trained on chest X-rays"}.get(
            str(strategy), f", {strategy} fine-tuning") if "scratch" not in str(base) else ""
    size = f.get("input_size")
    figures = f["figures"]
    data = facts.get("dataset_description") or (Path(str(f["dataset"])).name if f.get("dataset") else None)
    pos = f["positive_label"] or "an abnormal finding"
    if f.get("task", "binary") == "binary":
        rule = ("Decision threshold", f"{f['threshold']:.3f}: {pos} when the probability is at or above it "
                                      f"(chosen by {f['threshold_source']})")
    else:
        rule = ("Decision rule", predictor.operating_point.describe())
    rows = [("Model", f.get("model")), ("Network", _network(predictor, facts)), ("How it was trained", how),
            ("Training films", data),
            ("Film size it sees", f"{size[0]} x {size[1]} pixels" if size else None),
            *([("Labels", f"{'multi-class' if f['task'] == 'multiclass' else 'multi-label'}: "
                          + ", ".join(f["labels"]))] if f.get("task", "binary") != "binary" else []),
            rule,
            ("Heat map", f.get("heatmap_method")),
            ("Unusual-film check", f"films further than {f['ood_threshold']:.1f} from the training films (in the "
                                   "model's own features) get no answer" if f["ood_threshold"] is not None
             else "colour check only (no fitted distance for this model)")]
    metrics = figures["validation"]["metrics"]
    rows.append(("Validation films", f"{_fmt_metrics(metrics)} ({figures['validation']['measured_on']})"
                 if metrics else "not recorded"))
    cv = figures["cross_validated"]["metrics"]
    rows.append(("Cross-validated", f"{_fmt_metrics(cv)} ({figures['cross_validated']['measured_on']})"
                 if cv else "not measured for this model"))
    ext = figures["external"]
    rows.append(("Set-aside films", f"{_fmt_metrics(ext['metrics'])} ({ext['measured_on']})"
                 if ext["metrics"] else "not measured for this model"))
    ind = figures.get("independent")
    rows.append(("Another hospital's films", _independent_row(ind) if ind else
                 "not measured for this model: expect lower specificity (more normal films called "
                 f"{pos}) than above; a site calibration on your own films (`cxr-calibrate`) is the remedy"))
    table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows if v not in (None, ""))
    return "| fact | value |\n|---|---|\n" + table + "\n\n" + METRIC_GLOSSARY
