"""The one answer schema: what every caller returns for a prediction - the Gradio API, the REST
API (app.rest), the page's answer cards (app.render) and ``cxr-predict`` - and the model facts
the app shows (``/api/v1/model-info``, the facts panel).

:class:`ModelAnswer` is one model's answer, :class:`Answer` the whole reply (the first model's
answer at the top level, every model's under ``models``). :data:`FIELDS` describes each field;
the app turns the two into its OpenAPI schema and the Gradio API page (pydantic there: this
package stays free of it). :func:`model_answer` is the only place where a flagged film (out of
distribution, or not a radiograph) loses its decision, probabilities and map.

One schema for every label set (docs/label_sets.md): ``task`` says which; ``findings`` lists
every class / finding with its probability, threshold and whether it is present (binary
answers fill it too); ``screening`` is the abnormal-vs-normal call of a multi-class or
multi-label model that has a normal class. Binary answers keep every other field as before.

Research and education only: not a medical device.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Finding(TypedDict):
    label: str
    probability: float
    threshold: float | None
    present: bool


class Screening(TypedDict):
    abnormal_probability: float
    threshold: float
    abnormal: bool


FINDING_FIELDS: dict[str, str] = {
    "label": "The class or finding, as the model names it.",
    "probability": "Its calibrated probability, 0-1, 4 decimals: temperature-scaled softmax (binary, "
                   "multi-class: they sum to 1) or sigmoid (multi-label: each finding on its own).",
    "threshold": "The threshold it is called at: the positive class's (binary), each finding's own "
                 "(multi-label); null where the class has none (the binary negative class; every "
                 "multi-class class: the arg-max decides).",
    "present": "Whether the answer calls it: the decided class (binary, multi-class), or probability >= "
               "threshold (multi-label).",
}

SCREENING_FIELDS: dict[str, str] = {
    "abnormal_probability": "1 - the probability of the normal class (NORMAL / No Finding).",
    "threshold": "The screening threshold on `abnormal_probability` (multi-label: 1 - the normal "
                 "finding's threshold).",
    "abnormal": "True when `abnormal_probability` >= `threshold` (multi-label: when the normal finding "
                "is not present).",
}


class ModelAnswer(TypedDict):
    model: str
    decision: str | None
    positive_label: str
    probability: float | None
    threshold: float | None
    threshold_source: str
    borderline: bool
    borderline_margin: float
    probabilities: dict[str, float] | None
    out_of_distribution: bool
    ood_score: float | None
    ood_threshold: float | None
    message: str | None
    heatmap: Any
    heatmap_size: list[int] | None
    heatmap_method: str | None
    heatmap_class: str | None
    disclaimer: str
    task: str
    findings: list[Finding] | None
    screening: Screening | None


class Answer(ModelAnswer):
    models: list[ModelAnswer]


FIELDS: dict[str, str] = {
    "model": "The model's name (its folder name or Hub id).",
    "decision": "The model's answer at its operating point: binary, the positive label (e.g. PNEUMONIA) "
                "when `probability` >= `threshold`, else the other label; multi-class, the class with the "
                "highest probability; multi-label, the present findings joined with ', ' (or the normal "
                "finding, or 'no finding above its threshold'). Null when the film is flagged "
                "(`out_of_distribution`).",
    "positive_label": "The label `probability` and `threshold` are about: binary, the positive class (e.g. "
                      "PNEUMONIA); multi-class, the decided class; multi-label, the headline finding (the one "
                      "furthest above, or nearest below, its threshold).",
    "probability": "Calibrated probability of `positive_label` (temperature-scaled softmax; sigmoid for "
                   "multi-label), 0-1, 4 decimals; null when flagged.",
    "threshold": "The decision threshold on `probability` (the model's operating point); null for a "
                 "multi-class answer (the arg-max decides; see `screening`).",
    "threshold_source": "What chose the threshold, on which films (the operating point's provenance).",
    "borderline": "True when `probability` is within `borderline_margin` of `threshold` (with a "
                  "`screening` point: when `abnormal_probability` is within it of the screening threshold): "
                  "treat the answer as uncertain. False when flagged.",
    "borderline_margin": "The margin around the threshold that makes an answer borderline.",
    "probabilities": "Calibrated probability of every label (binary, multi-class: they sum to 1; "
                     "multi-label: one sigmoid per finding); null when flagged.",
    "out_of_distribution": "True when the film does not look like the training films (distance in "
                           "the model's feature space above `ood_threshold`, or not greyscale): no "
                           "decision, no probabilities, no map.",
    "ood_score": "Distance of the film from the training films in the model's feature space; null "
                 "when the model has no fitted distance.",
    "ood_threshold": "The distance above which a film is flagged; null when the model has none.",
    "message": "Why the film was flagged, in plain words; null otherwise.",
    "heatmap": "The evidence-weighted heat map (the one the page shows), a greyscale PNG at the "
               "model's input size, or null (not asked for, flagged, or no map for this "
               "architecture). Each pixel is the map's value (0 = this film's weakest region, 1 = "
               "its strongest) times min(1, `probability` / `threshold`): full strength for a "
               "`positive_label` answer, fading towards 0 as the probability falls below the "
               "threshold. Gradio API: a file (download it from its `url`). REST API: the PNG, "
               "base64-encoded.",
    "heatmap_size": "[height, width] of `heatmap` in pixels; null without a map.",
    "heatmap_method": "How the map is made (Grad-CAM for CNNs, attention rollout for ViTs); null "
                      "when flagged.",
    "heatmap_class": "The label the map explains (`positive_label` unless another class was asked for; "
                     "attention rollout is the same map for every class); null when flagged.",
    "disclaimer": "Research and education only: not a medical device.",
    "task": "The model's label set: 'binary', 'multiclass' (one label per film) or 'multilabel' "
            "(0 or more findings per film).",
    "findings": "Every class / finding in the model's label order (binary answers too), each with "
                "`label`, `probability`, `threshold` and `present`; null when flagged.",
    "screening": "Abnormal vs normal, for a multi-class or multi-label model with a normal class "
                 "(NORMAL / No Finding): `abnormal_probability`, `threshold`, `abnormal`. Null for binary "
                 "models (`decision` is the screening answer), models without a normal class, and flagged films.",
    "models": "Every loaded model's answer, in the order the models were given (the top-level fields "
              "repeat the first one's).",
}


class ModelInfo(TypedDict):
    model: str
    architecture: str | None
    task: str
    labels: list[str]
    positive_label: str | None
    threshold: float
    threshold_source: str
    temperature: float
    borderline_margin: float
    operating_point: dict[str, Any]
    strategy: str | None
    base_model: str | None
    dataset: str | None
    figures: dict[str, Any]
    ood_threshold: float | None
    ood_check: str
    input_size: list[int]
    heatmap_method: str | None
    disclaimer: str


MODEL_INFO_FIELDS: dict[str, str] = {
    "model": "The model's name (the `model` option of a prediction).",
    "architecture": "The model type in its config.json (e.g. efficientnet, resnet, vit).",
    "task": "'binary', 'multiclass' or 'multilabel' (see a prediction's `task`).",
    "labels": "Every label the model can answer, in its output order.",
    "positive_label": "The label the threshold is about (binary models); null for multi-class and "
                      "multi-label models.",
    "threshold": "Decision threshold on the calibrated probability of `positive_label` (binary); the "
                 "screening threshold for a multi-class model with a normal class; unused otherwise (see "
                 "`operating_point.thresholds` for each finding's).",
    "threshold_source": "What chose the threshold, on which films.",
    "temperature": "Temperature (calibration) applied to the logits before the softmax (sigmoid for "
                   "multi-label) and the threshold.",
    "borderline_margin": "Answers within this distance of the threshold are flagged borderline.",
    "operating_point": "The whole operating point as saved with the model (threshold, temperature, "
                       "policy, fitted_on, n_fit, alternatives, calibration provenance).",
    "strategy": "How the model was fine-tuned (frozen, partial, full, lora, or scratch); null if not recorded.",
    "base_model": "The pretrained weights it started from; null if not recorded.",
    "dataset": "The training data set (as recorded: a name or folder); null if not recorded.",
    "figures": "Performance figures, each with where it was measured (`measured_on`) and its "
               "metrics (empty when not measured): validation, cross_validated, external (films kept out "
               "of training; `measured_on` says whether they come from the same hospital), and, where "
               "recorded, independent (films from another source scored by someone else, with its "
               "`source`).",
    "ood_threshold": "Distance limit of the out-of-distribution check; null when the model has no "
                     "fitted distance (colour check only).",
    "ood_check": "Which out-of-distribution check the model has.",
    "input_size": "[height, width] in pixels the model sees (its saved image processor).",
    "heatmap_method": "How its heat maps are made (Grad-CAM, attention rollout), or why there is none.",
    "disclaimer": "Research and education only: not a medical device.",
}


def model_answer(prediction, *, heatmap: Any = None, heatmap_size: list[int] | None = None) -> ModelAnswer:
    """One model's answer from a :class:`cxr.inference.Prediction` (its ``to_api``). Flagged
    films get no decision, probability, probabilities, borderline flag or map: the rule lives
    here and nowhere else. ``heatmap``: the caller's encoding of the map (a file reference or
    base64 text), given only when the film is not flagged."""
    flagged = bool(prediction.out_of_distribution)
    if flagged:
        heatmap, heatmap_size = None, None
    answer = ModelAnswer(
        model=prediction.model,
        decision=None if flagged else prediction.label,
        positive_label=prediction.positive_label,
        probability=None if flagged else round(float(prediction.positive_probability), 4),
        threshold=None if prediction.threshold is None else round(float(prediction.threshold), 4),
        threshold_source=prediction.threshold_source,
        borderline=(not flagged) and bool(prediction.borderline),
        borderline_margin=float(prediction.borderline_margin),
        probabilities=None if flagged else {k: round(float(v), 4) for k, v in prediction.probabilities.items()},
        out_of_distribution=flagged,
        ood_score=None if prediction.ood_score is None else round(float(prediction.ood_score), 3),
        ood_threshold=None if prediction.ood_threshold is None else round(float(prediction.ood_threshold), 3),
        message=prediction.warning,
        heatmap=heatmap,
        heatmap_size=None if heatmap is None else heatmap_size,
        heatmap_method=None if flagged else prediction.heatmap_method,
        heatmap_class=None if flagged else (getattr(prediction, "heatmap_class", None) or prediction.positive_label),
        disclaimer=prediction.disclaimer,
        task=getattr(prediction, "task", "binary"),
        findings=None if flagged else [
            Finding(label=f["label"], probability=round(float(f["probability"]), 4),
                    threshold=None if f["threshold"] is None else round(float(f["threshold"]), 4),
                    present=bool(f["present"])) for f in getattr(prediction, "findings", [])],
        screening=None if flagged or not getattr(prediction, "screening", None) else Screening(
            abnormal_probability=round(float(prediction.screening["abnormal_probability"]), 4),
            threshold=round(float(prediction.screening["threshold"]), 4),
            abnormal=bool(prediction.screening["abnormal"])),
    )
    return answer


def answer(per_model: list[ModelAnswer]) -> Answer:
    """The reply: the first model's answer at the top level, every model's under ``models``."""
    if not per_model:
        raise ValueError("an answer needs at least one model's")
    return Answer(**per_model[0], models=list(per_model))


def model_info(predictor) -> ModelInfo:
    """What the app says about a loaded model (``/api/v1/model-info``, the facts panel): its
    name, labels, operating point with provenance, training facts and figures with where they
    were measured, OOD limit, input size, map method, disclaimer."""
    from .inference import DISCLAIMER

    facts = predictor.describe()
    op = predictor.operating_point
    ood = getattr(predictor, "ood", None)
    size = input_size(predictor)
    return ModelInfo(**{
        "model": predictor.name,
        "architecture": facts.get("architecture"),
        "task": getattr(predictor, "task", "binary"),
        "labels": list(predictor.id2label.values()),
        "positive_label": predictor.id2label[predictor.positive_id] if getattr(predictor, "task", "binary") == "binary"
        else None,
        "operating_point": {k: v for k, v in op.to_config().items() if v is not None},
        "threshold": float(op.threshold),
        "threshold_source": op.source,
        "temperature": float(op.temperature),
        "borderline_margin": float(op.borderline_margin),
        "strategy": facts.get("strategy"),
        "base_model": facts.get("base_model"),
        "dataset": facts.get("dataset"),
        "figures": {
            "validation": {"measured_on": "patients of the training data kept out of training and used to "
                                          "choose the threshold (patient-grouped split)",
                           "metrics": facts.get("validation_metrics") or {}},
            "cross_validated": {"measured_on": facts.get("cv_measured_on")
                                or "k-fold cross-validation on the training data (mean and sd)",
                                "metrics": facts.get("cv_metrics") or {}},
            "external": {"measured_on": facts.get("external_measured_on")
                         or "films kept out of training and tuning (where from is not recorded)",
                         "metrics": facts.get("external_metrics") or {}},
            **({"independent": {"measured_on": facts["independent"].get("measured_on")
                                or "films from another source, scored independently",
                                "source": facts["independent"].get("source"),
                                "metrics": facts["independent"]["metrics"]}}
               if facts.get("independent") else {}),
        },
        "ood_threshold": None if ood is None else float(ood.threshold),
        "ood_check": "distance in the model's feature space" if ood is not None else "colour check only",
        "input_size": size,
        "heatmap_method": facts.get("explainer"),
        "disclaimer": DISCLAIMER,
    })


def input_size(predictor) -> list[int]:
    """[height, width] the model sees: the saved image processor applied to a blank film."""
    import numpy as np

    pixels = predictor.preprocess([np.zeros((256, 256, 3), np.uint8)])
    return [int(pixels.shape[-2]), int(pixels.shape[-1])]
