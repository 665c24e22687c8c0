"""What training recorded about a model, as config.json's ``cxr_training`` carries it: the one
reader serving uses (the Predictor's ``describe()``, the app's facts panel).

Written by ``cxr_train.report.serving_facts`` with ``schema`` = :data:`SCHEMA`. A folder
written before the field was versioned has no ``schema`` and the same keys (read as 1); a newer
schema than this reader knows is refused with a message rather than shown half-understood.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CONFIG_KEY = "cxr_training"
SCHEMA = 1
HEADLINE = ("roc_auc", "accuracy", "sensitivity", "specificity")


class FactsError(ValueError):
    """config.json's cxr_training cannot be read by this version."""


def numeric_metrics(d) -> dict:
    """Defined numeric metrics only (a one-class split writes null)."""
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


@dataclass
class TrainingFacts:
    strategy: str | None = None
    base_model: str | None = None
    dataset: str | None = None
    image_size: int | None = None
    validation_metrics: dict = field(default_factory=dict)     # metric -> value
    cv_metrics: dict = field(default_factory=dict)             # {"k": K, metric: {"mean", "sd"}}
    external_metrics: dict = field(default_factory=dict)       # {"n": N, metric: value}
    # Optional, in visitor words (older folders lack them; older readers ignore them):
    dataset_description: str | None = None     # what the training data is
    external_measured_on: str | None = None    # what "external" films were (e.g. a same-hospital hold-out)
    cv_measured_on: str | None = None          # what was cross-validated (e.g. the recipe, not these weights)
    # A figure measured by someone else on films from another source, with its provenance:
    # {"metrics": {metric: value[, "n": N]}, "measured_on": "...", "source": "..."}
    independent: dict = field(default_factory=dict)
    schema: int = SCHEMA

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {}, [])}


def read_training_facts(config) -> TrainingFacts:
    """``config.cxr_training`` (a transformers config or a dict) -> TrainingFacts; empty when absent."""
    raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if not raw:
        return TrainingFacts()
    if not isinstance(raw, dict):
        raise FactsError(f"config.json {CONFIG_KEY} is not a mapping")
    schema = raw.get("schema", 1)
    if not isinstance(schema, int) or schema > SCHEMA:
        raise FactsError(f"config.json {CONFIG_KEY} has schema {schema!r}; this version reads up to {SCHEMA}: "
                         "upgrade cxr-transfer")
    cv = raw.get("cv_metrics") or {}
    cv = {"k": cv["k"], **{k: v for k, v in cv.items() if isinstance(v, dict)}} if "k" in cv else {}
    ext = raw.get("external_metrics") or {}
    ext = {**({"n": ext["n"]} if "n" in ext else {}), **numeric_metrics({k: v for k, v in ext.items() if k != "n"})}
    size = raw.get("image_size")
    independent = raw.get("independent") or {}
    if not isinstance(independent, dict):
        raise FactsError(f"config.json {CONFIG_KEY}.independent is not a mapping")
    ind_metrics = independent.get("metrics") or {}
    independent = ({"metrics": {**({"n": ind_metrics["n"]} if "n" in ind_metrics else {}),
                                **numeric_metrics({k: v for k, v in ind_metrics.items() if k != "n"})},
                    **{k: str(independent[k]) for k in ("measured_on", "source") if independent.get(k)}}
                   if ind_metrics else {})
    text = {k: raw[k] for k in ("dataset_description", "external_measured_on", "cv_measured_on")
            if isinstance(raw.get(k), str) and raw[k].strip()}
    return TrainingFacts(**text, independent=independent,
                         strategy=raw.get("strategy"), base_model=raw.get("base_model"), dataset=raw.get("dataset"),
                         image_size=int(size) if isinstance(size, (int, float)) else None,
                         validation_metrics=numeric_metrics(raw.get("validation_metrics")), cv_metrics=cv,
                         external_metrics=ext, schema=schema)
