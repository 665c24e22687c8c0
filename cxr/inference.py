"""Predictor: the one way to run a trained model (used by the app, the CLI, the benchmarks
and the tests). Loads a Hub id or a local folder (safetensors only, no remote code), applies
the saved image processor, temperature and decision threshold, and explains predictions.

Any label set (docs/label_sets.md): binary models decide by the threshold on the positive
class, multi-class models by the arg-max (plus a screening point when they have a normal
class), multi-label models by each finding's own threshold on its sigmoid. Every answer lists
every class / finding (``Prediction.findings``); heat maps are drawn for the answer's class by
default, or for any class asked for (``predict(..., heatmap_classes=...)``).

    cxr-predict film.jpeg                                        # the shipped default model
    python -m cxr.inference --model outputs/cxr-resnet-small-scratch image1.png image2.dcm
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .architecture import CNN, VIT, family
from .explain import (EXPLAINER_NAMES, explainer_kind, gap_linear_head, gradcam_from_features,
                      last_feature_map_and_logits, no_map_reason, rollout_map)
from .imaging import ImageLoadError, check_is_radiograph, load_image
from .facts import HEADLINE, FactsError, numeric_metrics, read_training_facts
from .locate import (DEFAULT_MODEL, MODEL_ENV, MissingFolderError, NoDefaultModelError, local_folder,
                     resolve_model, weights_problem)
from .operating_point import OperatingPoint, label_list, positive_class_id
from .precision import PRECISIONS, autocast_dtype, check_precision
from .preprocessing import pixel_values

if TYPE_CHECKING:
    from .api import ModelAnswer

logger = logging.getLogger(__name__)

DISCLAIMER = ("Research and education only: not a medical device. Not for diagnosis, treatment "
              "or triage of patients.")



def __getattr__(name: str):
    """``DEFAULT_MODEL_DIR``: the shipped default's folder wherever it is installed
    (:func:`cxr.locate.default_model_folder`), looked up when asked for."""
    if name == "DEFAULT_MODEL_DIR":
        from .locate import default_model_folder

        return default_model_folder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded (missing, unsafe or corrupt weights, not a classifier)."""


class UnknownClassError(ValueError):
    """A class asked for (a heat map's) is not one of the model's labels."""


NO_FINDING = "no finding above its threshold"    # a multi-label answer without a present finding


def finding_weight(findings: list[dict], label: str, task: str) -> tuple[float, float | None]:
    """(probability, threshold) that set how strongly ``label``'s heat map is drawn
    (``cxr.explain.map_strength``): the class's own threshold where it has one (binary positive
    class, multi-label findings); the binary negative class: 1 - the positive class's threshold;
    a multi-class class: the arg-max probability (the answer's class at full strength). Works on
    a Prediction's findings and on an answer's (``to_api``) alike."""
    entry = next((f for f in findings if f["label"] == label), None)
    if entry is None:
        raise UnknownClassError(f"unknown class {label!r}: the answer's labels are {[f['label'] for f in findings]}")
    if entry["threshold"] is not None:
        return float(entry["probability"]), float(entry["threshold"])
    if task == "binary":
        other = next(f["threshold"] for f in findings if f["threshold"] is not None)
        return float(entry["probability"]), 1.0 - float(other)
    return float(entry["probability"]), max(float(f["probability"]) for f in findings)


@dataclass
class Prediction:
    """One film's answer. binary: ``label`` the decision at the threshold on ``positive_label``.
    multiclass: ``label`` the arg-max class, ``positive_label`` / ``positive_probability`` that
    class, ``threshold`` None. multilabel: ``label`` the present findings joined with ", " (or the
    normal finding, or :data:`NO_FINDING`), ``positive_label`` the headline finding (the one
    furthest above - or nearest below - its threshold, normal finding aside) with its
    probability and threshold. ``findings``: every class / finding in label order
    (label, probability, threshold, present); ``screening``: abnormal vs normal (multiclass /
    multilabel with a normal class; None otherwise)."""
    label: str | None                    # None when the input looks out of distribution
    probabilities: dict[str, float]      # calibrated (temperature-scaled) softmax; multilabel: sigmoids
    positive_label: str
    positive_probability: float
    threshold: float | None
    threshold_source: str
    out_of_distribution: bool = False
    warning: str | None = None
    disclaimer: str = DISCLAIMER
    heatmap: np.ndarray | None = field(default=None, repr=False)
    explainer: str | None = None
    ood_score: float | None = None       # distance from the training films (cxr.ood); None: no scorer
    ood_threshold: float | None = None
    borderline: bool = False             # within the operating point's borderline_margin of the threshold
    model: str = "model"                 # the Predictor's name
    borderline_margin: float = 0.05      # the operating point's
    heatmap_method: str | None = None    # how this model's maps are made (Grad-CAM, attention rollout), asked or not
    task: str = "binary"                 # "binary" | "multiclass" | "multilabel"
    findings: list[dict] = field(default_factory=list)   # every class: label, probability, threshold, present
    screening: dict | None = None        # abnormal_probability, threshold, abnormal; None: no screening point
    heatmap_class: str | None = None     # the label ``heatmap`` explains (None: positive_label)
    heatmaps: dict = field(default_factory=dict, repr=False)   # label -> map, every class asked for

    def to_dict(self) -> dict:
        heatmap, heatmaps = self.heatmap, self.heatmaps
        self.heatmap, self.heatmaps = None, {}
        try:
            d = asdict(self)
        finally:
            self.heatmap, self.heatmaps = heatmap, heatmaps
        d.pop("heatmap")
        d.pop("heatmaps")
        return d

    def map_weight(self, label: str | None = None) -> tuple[float, float | None]:
        """(probability, threshold) for drawing ``label``'s map (default: the map's class);
        see :func:`finding_weight`. Binary, positive class: (positive_probability, threshold)."""
        label = label or self.heatmap_class or self.positive_label
        if not self.findings:
            return self.positive_probability, self.threshold
        return finding_weight(self.findings, label, self.task)

    def to_api(self, heatmap=None) -> "ModelAnswer":
        """The one answer schema (:mod:`cxr.api`) every caller returns: the page, the Gradio and
        REST APIs, cxr-predict. ``heatmap``: the caller's encoding of the map (file, base64)."""
        from .api import model_answer

        size = None if self.heatmap is None else [int(n) for n in np.shape(self.heatmap)[:2]]
        return model_answer(self, heatmap=heatmap, heatmap_size=size)


def _check_weights(folder: Path) -> None:
    problem = weights_problem(folder)
    if problem:
        raise ModelLoadError(problem)


def resolve_precision(precision: str, op: OperatingPoint | None = None) -> torch.dtype | None:
    """bf16 autocast where the hardware has native bf16 (AMX / AVX512-BF16, a bf16 GPU); else fp32.
    ``auto`` keeps fp32 for a model whose operating point was fitted on fp32 scores: bf16 moves
    some models' probabilities by up to ~0.1 (EfficientNet-Lite0 on borderline films), enough
    to change decisions near the threshold. An explicit ``bf16`` is honoured."""
    if check_precision(precision) == "auto" and op is not None and op.scored_in == "fp32":
        return None
    return autocast_dtype(precision)


class Predictor:
    def __init__(self, model, processor, *, precision: str = "auto", name: str = "model"):
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.config = model.config
        self.id2label = {int(k): v for k, v in model.config.id2label.items()}
        try:
            self.labels = label_list(self.id2label)
            self.operating_point = op = OperatingPoint.from_config(model.config)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{name}: {str(e).splitlines()[0]}") from None
        self.task = op.task
        try:
            self.training_facts = read_training_facts(model.config)
        except FactsError as e:
            raise ModelLoadError(f"{name}: {e}") from None
        self.positive_id = positive_class_id(self.id2label, op.positive_label)
        self.temperature = float(op.temperature)
        self.threshold = float(op.threshold)
        self.threshold_source = op.source
        self.autocast_dtype = resolve_precision(precision, op)
        self.channels_last = family(model) == CNN
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._explainer = None
        self._explainer_lock = threading.Lock()
        self.explainer_kind = explainer_kind(model)
        self.heatmap_method = EXPLAINER_NAMES.get(self.explainer_kind) if self.explainer_kind else None
        self._cam_head = gap_linear_head(model)   # closed-form Grad-CAM (see cxr.explain)
        self.ood, self._tap = None, None

    def set_ood(self, scorer) -> None:
        """Use a :class:`cxr.ood.OODScorer`: its score comes from the prediction's own forward pass."""
        from .ood import FeatureTap

        if self._tap is None and scorer is not None:
            self._tap = FeatureTap(self.model)
        self.ood = scorer

    # ------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model_id: str | Path | None = None, *, revision: str | None = None,
                        precision: str = "auto", token: str | None = None) -> "Predictor":
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

        try:   # None: the environment's model (CXR_MODEL, MODEL_ID), else the shipped default
            model_id = resolve_model(model_id)
        except (NoDefaultModelError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
        try:
            local = local_folder(model_id)
        except MissingFolderError as e:
            raise ModelLoadError(str(e)) from None
        is_local = local is not None
        if is_local:
            _check_weights(local)
            model_id = str(local)
        name = local.name if is_local else model_id
        try:
            config = AutoConfig.from_pretrained(model_id, revision=revision, token=token, trust_remote_code=False)
            kwargs = {}
            if family(config) == VIT and config.model_type != "timm_wrapper":
                kwargs["attn_implementation"] = "eager"   # attention maps need eager attention
            model = AutoModelForImageClassification.from_pretrained(
                model_id, revision=revision, token=token, use_safetensors=True, trust_remote_code=False, **kwargs)
            processor = AutoImageProcessor.from_pretrained(model_id, revision=revision, token=token,
                                                           trust_remote_code=False,
                                                           backend=image_processor_backend(config))
        except Exception as e:  # noqa: BLE001 - every failure ends as one clear message
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if "safetensors" in type(e).__module__ or "header" in first.lower() or "deserializ" in first.lower():
                raise ModelLoadError(f"{name}: the weights file is corrupt or truncated") from None
            where = "" if is_local else " (not a local folder; tried the Hub)"
            raise ModelLoadError(f"cannot load model '{name}'{where}: {first[:300]}") from None
        predictor = cls(model, processor, precision=precision, name=name)
        predictor.folder = local if is_local else None
        predictor.set_ood(_load_ood(model_id, is_local, revision, token))
        return predictor

    # ------------------------------------------------------------ inference
    def preprocess(self, images: list[Image.Image | np.ndarray]) -> torch.Tensor:
        """The saved image processor: the same call as training's eval transform."""
        return pixel_values(self.processor, images)

    def _prepare(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.contiguous(memory_format=torch.channels_last) if self.channels_last else pixel_values

    def _autocast(self):
        return torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    @torch.inference_mode()
    def _forward(self, pixel_values: torch.Tensor, **kwargs):
        with self._autocast():
            return self.model(pixel_values=self._prepare(pixel_values), **kwargs)

    @torch.inference_mode()
    def _features_and_logits(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """The last feature map (before global pooling) and the logits, from one forward pass."""
        with self._autocast():
            features, logits = last_feature_map_and_logits(self.model, self._prepare(pixel_values))
        return features, logits.float().cpu().numpy()

    def logits(self, pixel_values: torch.Tensor) -> np.ndarray:
        return self._forward(pixel_values).logits.float().cpu().numpy()

    def class_id(self, which: str | int) -> int:
        """A class's index from its label or index; :class:`UnknownClassError` otherwise."""
        if isinstance(which, (int, np.integer)) and not isinstance(which, bool) and 0 <= int(which) < len(self.labels):
            return int(which)
        if isinstance(which, str) and which in self.labels:
            return self.labels.index(which)
        raise UnknownClassError(f"{self.name}: unknown class {which!r}: this model's labels are "
                                f"{', '.join(self.labels)}")

    def _class_ids(self, heatmap_classes) -> list[int] | None:
        """The requested map classes as indices (None: the answer's own class); "all": every class."""
        if heatmap_classes is None:
            return None
        if isinstance(heatmap_classes, str) and heatmap_classes == "all" and "all" not in self.labels:
            return list(range(len(self.labels)))
        if isinstance(heatmap_classes, (str, int, np.integer)):
            heatmap_classes = [heatmap_classes]
        ids = list(dict.fromkeys(self.class_id(c) for c in heatmap_classes))
        if not ids:
            raise UnknownClassError(f"{self.name}: no class asked for: this model's labels are {', '.join(self.labels)}")
        return ids

    def logits_and_heatmaps(self, pixel_values: torch.Tensor, class_ids: list[int] | None = None
                            ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Logits of one image and its maps {class index: map} for ``class_ids`` (None: the
        answer's own class, :meth:`default_map_class`), from one forward pass where the
        architecture allows: closed-form Grad-CAM reads every class's map off the same feature
        map; attention rollout is one map whatever the class (it follows attention, not a
        class score); other CNNs run Grad-CAM's backward pass once per class."""
        size = tuple(pixel_values.shape[-2:])
        if self.explainer_kind is None:
            return self.logits(pixel_values), {}
        if self.explainer_kind == "attention-rollout":
            if self.config.model_type != "timm_wrapper":
                out = self._forward(pixel_values, output_attentions=True)
                logits, one = out.logits.float().cpu().numpy(), rollout_map(out.attentions, size)
            else:
                logits = self.logits(pixel_values)
                one = self.explain_tensor(pixel_values, 0)
            ids = class_ids if class_ids is not None else [self.default_map_class(logits[0])]
            return logits, {i: one for i in ids}
        if self._cam_head is not None:
            features, logits = self._features_and_logits(pixel_values)
            ids = class_ids if class_ids is not None else [self.default_map_class(logits[0])]
            return logits, {i: gradcam_from_features(features, self._cam_head, i, size) for i in ids}
        logits = self.logits(pixel_values)
        ids = class_ids if class_ids is not None else [self.default_map_class(logits[0])]
        return logits, {i: self.explain_tensor(pixel_values, i) for i in ids}

    def default_map_class(self, logits: np.ndarray) -> int:
        """The class a map explains unless asked otherwise: binary, the positive class;
        multiclass, the arg-max; multilabel, the headline finding (see :class:`Prediction`)."""
        if self.task == "binary":
            return self.positive_id
        d = self.operating_point.apply(np.asarray(logits)[None], labels=self.labels)
        return self._headline(d)

    def _headline(self, d) -> int:
        if self.task == "multiclass":
            return int(d.label_ids[0])
        probs, thresholds = d.probabilities[0], d.thresholds
        normal = self.operating_point.normal_label
        candidates = [i for i, n in enumerate(self.labels) if n != normal] or list(range(len(self.labels)))
        ratio = [probs[i] / thresholds[i] if thresholds[i] > 0 else np.inf for i in candidates]
        return candidates[int(np.argmax(ratio))]

    def logits_and_heatmap(self, pixel_values: torch.Tensor, class_id: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Logits of one image and its map for ``class_id`` (default: the positive class), from
        a single forward pass where the architecture allows (see ``cxr.explain``)."""
        class_id = self.positive_id if class_id is None else class_id
        size = tuple(pixel_values.shape[-2:])
        if self.explainer_kind is None:   # no map for this architecture: heatmap None
            return self.logits(pixel_values), None
        if self.explainer_kind == "attention-rollout" and self.config.model_type != "timm_wrapper":
            out = self._forward(pixel_values, output_attentions=True)
            return out.logits.float().cpu().numpy(), rollout_map(out.attentions, size)
        if self._cam_head is not None:
            features, logits = self._features_and_logits(pixel_values)
            return logits, gradcam_from_features(features, self._cam_head, class_id, size)
        return self.logits(pixel_values), self.explain_tensor(pixel_values, class_id)

    def _ood_scores(self) -> list[float | None]:
        """OOD scores of the rows of this thread's latest forward pass ([None] without a scorer)."""
        feats = self._tap.pop() if self._tap is not None and self.ood is not None else None
        return [None] if feats is None else [float(x) for x in self.ood.score(feats)]

    def _result(self, logits: np.ndarray, warning: str | None, ood_score: float | None = None) -> Prediction:
        if ood_score is not None and warning is None and self.ood.is_ood(ood_score):
            from .ood import OOD_WARNING

            warning = OOD_WARNING
        if self.task != "binary":
            return self._label_set_result(logits, warning, ood_score)
        d = self.operating_point.apply(logits[None], self.positive_id)
        probs, p_pos, label = d.probabilities[0], float(d.probability[0]), self.id2label[int(d.label_ids[0])]
        findings = [{"label": self.labels[i], "probability": float(p),
                     "threshold": self.threshold if i == self.positive_id else None,
                     "present": bool(d.present[0, i])} for i, p in enumerate(probs)]
        return Prediction(
            model=self.name, borderline_margin=float(self.operating_point.borderline_margin),
            heatmap_method=self.heatmap_method,
            label=None if warning else label,
            probabilities={self.id2label[i]: float(p) for i, p in enumerate(probs)},
            positive_label=self.id2label[self.positive_id], positive_probability=p_pos,
            threshold=self.threshold, threshold_source=self.threshold_source,
            borderline=warning is None and bool(d.borderline[0]),
            out_of_distribution=warning is not None, warning=warning, ood_score=ood_score,
            ood_threshold=None if self.ood is None else float(self.ood.threshold),
            task="binary", findings=findings)

    def _label_set_result(self, logits: np.ndarray, warning: str | None, ood_score: float | None) -> Prediction:
        """A multi-class or multi-label answer (docs/label_sets.md)."""
        op = self.operating_point
        d = op.apply(logits[None], labels=self.labels)
        probs, present = d.probabilities[0], d.present[0]
        k = self._headline(d)
        findings = [{"label": n, "probability": float(p),
                     "threshold": None if np.isnan(d.thresholds[i]) else float(d.thresholds[i]),
                     "present": bool(present[i])} for i, (n, p) in enumerate(zip(self.labels, probs))]
        screening = None if not d.screening else {
            "abnormal_probability": float(d.probability[0]), "threshold": float(d.screening_threshold),
            "abnormal": bool(d.positive[0])}
        if self.task == "multiclass":
            label, threshold = self.labels[k], None
            borderline = bool(d.borderline[0]) if d.screening else False
        else:
            shown = [n for n, on in zip(self.labels, present) if on and n != op.normal_label]
            label = ", ".join(shown) if shown else (op.normal_label or NO_FINDING)
            threshold = float(d.thresholds[k])
            borderline = (bool(d.borderline[0]) if d.screening
                          else bool(abs(probs[k] - threshold) < op.borderline_margin))
        return Prediction(
            model=self.name, borderline_margin=float(op.borderline_margin), heatmap_method=self.heatmap_method,
            label=None if warning else label,
            probabilities={n: float(p) for n, p in zip(self.labels, probs)},
            positive_label=self.labels[k], positive_probability=float(probs[k]),
            threshold=threshold, threshold_source=self.threshold_source,
            borderline=warning is None and borderline,
            out_of_distribution=warning is not None, warning=warning, ood_score=ood_score,
            ood_threshold=None if self.ood is None else float(self.ood.threshold),
            task=self.task, findings=findings, screening=screening)

    def predict(self, source, *, explain: bool = False, heatmap_classes=None) -> Prediction:
        """source: path, bytes, file object or PIL image. Raises ImageLoadError for bad input.

        ``explain``: also the heat map of the answer's class (binary: the positive class).
        ``heatmap_classes`` (implies ``explain``): a label or index, a list of them, or "all":
        maps for those classes, in ``Prediction.heatmaps`` ({label: map}); ``heatmap`` and
        ``heatmap_class`` are then the first one's ("all": the answer's own class's). An
        unknown class raises :class:`UnknownClassError` before any work."""
        ids = self._class_ids(heatmap_classes)
        every = isinstance(heatmap_classes, str) and heatmap_classes == "all" and "all" not in self.labels
        image = load_image(source)  # a PIL image too: the same checks and conversions as a file
        warning = check_is_radiograph(image)
        pv = self.preprocess([image])
        if not explain and ids is None:
            logits = self.logits(pv)
            return self._result(logits[0], warning, self._ood_scores()[0])
        if self.task == "binary" and ids is None:
            logits, heatmap = self.logits_and_heatmap(pv)
            maps = {self.positive_id: heatmap}
        else:
            logits, maps = self.logits_and_heatmaps(pv, ids)
        result = self._result(logits[0], warning, self._ood_scores()[0])
        if not result.out_of_distribution and self.explainer_kind is not None:      # flagged inputs get no map
            first = self.default_map_class(logits[0]) if every else next(iter(maps))
            result.heatmap, result.explainer = maps[first], self.explainer_kind
            result.heatmap_class = self.labels[first]
            result.heatmaps = {self.labels[i]: m for i, m in maps.items()}
        return result

    def predict_batch(self, sources, batch_size: int = 32, workers: int | None = None
                      ) -> list[Prediction | ImageLoadError]:
        """Many images; a bad one yields its ImageLoadError in place, the rest still run.

        Batches run in ``workers`` threads (default: ``torch.get_num_threads()``), each taking
        one batch at a time through decode, checks, preprocessing and the model with a single
        intra-op thread (per thread in OpenMP; torch's default for threads started later is
        restored afterwards, the caller's own setting is never changed). On
        CPUs this beats one batch at a time on all threads: small convolutions scale poorly
        across threads (2 threads: ~1.5x one), independent batches scale almost linearly, and
        one batch's decoding overlaps the other's model time. Order is preserved.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        sources = list(sources)
        chunks = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
        threads = torch.get_num_threads()
        workers = max(1, min(workers or threads, len(chunks) or 1))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxr-batch",
                                  initializer=torch.set_num_threads, initargs=(1,))
        try:
            return [r for chunk_results in pool.map(self._predict_chunk, chunks) for r in chunk_results]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)   # an unexpected error stops the queued batches
            torch.set_num_threads(threads)   # set_num_threads in a worker also sets the default for new threads

    def _predict_chunk(self, chunk) -> list[Prediction | ImageLoadError]:
        slots, pv = self._load_chunk(chunk)
        logits = iter(self.logits(pv) if pv is not None else [])
        scores = iter(self._ood_scores() if pv is not None and self.ood is not None else [])
        return [slot if isinstance(slot, ImageLoadError) else self._result(next(logits), slot, next(scores, None))
                for slot in slots]

    def _load_chunk(self, chunk) -> tuple[list, torch.Tensor | None]:
        """Decode, check and preprocess one batch: (per-source ImageLoadError or OOD warning, pixel values)."""
        images, slots = [], []
        for s in chunk:
            try:
                image = load_image(s)
            except ImageLoadError as e:
                slots.append(e)
                continue
            pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # one copy, used twice
            slots.append(check_is_radiograph(pixels))
            images.append(pixels)
        return slots, (self.preprocess(images) if images else None)

    # ------------------------------------------------------------ explanations
    @property
    def single_pass_maps(self) -> bool:
        """Whether ``predict(explain=True)`` reads the map off the prediction's own forward pass
        (closed-form Grad-CAM of a ``Linear(average pool)`` CNN head, attention rollout of a
        transformers ViT: no second pass, no ``pytorch_grad_cam``). False: the map comes from the
        separate explainer (:meth:`explain_tensor`: Grad-CAM's backward pass, a timm ViT's rollout
        forward), or the architecture has no map."""
        if self.explainer_kind == "attention-rollout":
            return self.config.model_type != "timm_wrapper"
        return self.explainer_kind is not None and self._cam_head is not None

    @property
    def explainer(self):
        with self._explainer_lock:
            return self._build_explainer()

    def _build_explainer(self):
        if self._explainer is None:
            import copy

            from .explain import Explainer

            # Its own copy of the model: Grad-CAM's hooks would otherwise record the
            # activations of every concurrent predict() call.
            self._explainer = Explainer(copy.deepcopy(self.model))
        return self._explainer

    def explain_tensor(self, pixel_values: torch.Tensor, class_id: int | None = None) -> np.ndarray:
        """The map from a separate explainer (``pytorch_grad_cam.GradCAM`` or a rollout forward)."""
        return self.explainer(self._prepare(pixel_values), self.positive_id if class_id is None else class_id)

    def describe(self) -> dict:
        """Card facts for the UI: base model, strategy, data, validation metrics."""
        facts = self.training_facts.to_dict()
        folder = getattr(self, "folder", None)
        if "validation_metrics" not in facts and folder is not None and (folder / "eval_results.json").is_file():
            ev = json.loads((folder / "eval_results.json").read_text())
            facts["validation_metrics"] = numeric_metrics({k: ev.get(f"eval_{k}") for k in HEADLINE})
        facts.update(model=self.name, architecture=self.config.model_type, labels=list(self.id2label.values()),
                     task=self.task,
                     threshold=self.threshold, threshold_source=self.threshold_source,
                     temperature=self.temperature, explainer=explainer_kind_name(self.model))
        return facts


def _load_ood(model_id: str, is_local: bool, revision: str | None, token: str | None):
    """The model's OOD scorer (``ood.safetensors``, see cxr.ood), or None when it has none."""
    from .ood import OOD_FILE, OODScorer

    try:
        if is_local:
            return OODScorer.from_folder(model_id)
        from huggingface_hub import hf_hub_download

        return OODScorer.load(hf_hub_download(model_id, OOD_FILE, revision=revision, token=token))
    except Exception as e:  # noqa: BLE001 - a model without (or with a broken) scorer still serves
        logger.warning("no out-of-distribution scorer for %s (%s)", Path(model_id).name, type(e).__name__)
        return None


def image_processor_backend(config) -> str | None:
    """The image-processor backend to ask ``AutoImageProcessor`` for: None (its default,
    torchvision) unless the model type has no torchvision-backend processor - timm models
    (``TimmWrapperImageProcessor``, a PIL-backend class that runs timm's own transforms) -
    where asking for the default only makes transformers warn "Requested torchvision backend
    is not available" and fall back to that same class."""
    try:
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        backends = IMAGE_PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None)) or {}
    except (ImportError, AttributeError):
        return None
    backends = {k: v for k, v in backends.items() if v is not None}
    return None if not backends or "torchvision" in backends else next(iter(backends))


def explainer_kind_name(model) -> str:
    from .explain import EXPLAINER_NAMES

    kind = explainer_kind(model)
    return EXPLAINER_NAMES[kind] if kind is not None else no_map_reason(model)


def decision_note(predictor: Predictor) -> str:
    """What decides the label, and why ``transformers.pipeline()`` can answer otherwise on a
    film near the threshold (it reports the raw softmax and its top class: no temperature, no
    threshold)."""
    op = predictor.operating_point
    if predictor.task == "multiclass":
        return (f"{predictor.name} ({len(predictor.labels)} classes: {', '.join(predictor.labels)}): the class "
                f"with the highest probability (softmax at temperature {op.temperature:.3f}); every class's "
                "probability is in 'findings'" + (
                    f"; screening: abnormal when 1 - P({op.normal_label}) >= {op.threshold:.3f} ({op.source})"
                    if op.normal_label else "") + ". transformers.pipeline() reports the raw softmax (no temperature).")
    if predictor.task == "multilabel":
        ts = ", ".join(f"{n} >= {float(op.thresholds[n]):.3f}" for n in predictor.labels)
        return (f"{predictor.name} (multi-label, {len(predictor.labels)} findings): each finding is present when "
                f"its probability (sigmoid at temperature {op.temperature:.3f}) is at or above its own "
                f"threshold ({ts}; {op.source}); every finding is in 'findings'. transformers.pipeline() "
                "reports the raw sigmoids without these thresholds.")
    return (f"{predictor.name}: {predictor.id2label[predictor.positive_id]} when its probability "
            f"(softmax at temperature {op.temperature:.3f}) is >= {op.threshold:.3f}, the operating point "
            f"({op.source}). transformers.pipeline() reports the raw softmax and its top class (argmax, "
            "i.e. 0.5) without this operating point, so on films near the threshold the two can disagree.")


def main(argv: list[str] | None = None) -> int:
    from .cli import ArgumentParser, fail

    ap = ArgumentParser(description="Predict for chest X-ray files with the model's own labels (NORMAL/PNEUMONIA "
                                    "for the shipped model; multi-class and multi-label models too): one JSON line "
                                    "per file on stdout, every class / finding under 'findings' (a bad file gets "
                                    "an 'error'; the others still run), the decision rule on stderr. " + DISCLAIMER)
    ap.add_argument("images", nargs="+", help="PNG, JPEG or DICOM files")
    ap.add_argument("--model", default=None,
                    help=f"Hub id or local folder (default: the environment's {' or '.join(MODEL_ENV)}, else the "
                         f"shipped model {DEFAULT_MODEL}, installed with the package)")
    ap.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="auto: bf16 where the CPU has it, unless the model's operating point was fitted in fp32")
    args = ap.parse_args(argv)
    try:
        predictor = Predictor.from_pretrained(args.model, revision=args.revision, precision=args.precision)
    except ModelLoadError as e:
        return fail(e)
    print(decision_note(predictor), file=sys.stderr)
    t0 = time.perf_counter()
    results = predictor.predict_batch(args.images)
    for path, r in zip(args.images, results):
        row = {"file": Path(path).name}
        row.update({"error": str(r)} if isinstance(r, ImageLoadError) else r.to_api())   # the one schema
        print(json.dumps(row))
    logger.info("%d images in %.2f s", len(args.images), time.perf_counter() - t0)
    return 1 if any(isinstance(r, ImageLoadError) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
