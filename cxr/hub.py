"""Model card rendering (huggingface_hub ModelCard + the Jinja template model_card.md)
and pushes to the Hub."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"
KERMANY_NOTE = ("Kermany et al. 2018 paediatric chest X-rays (Guangzhou Women and Children's Medical "
                "Center), CC BY 4.0, doi:10.17632/rscbjbr9sj.2")
METRIC_ROWS = (("accuracy", "Accuracy"), ("roc_auc", "AUROC"), ("pr_auc", "PR-AUC"),
               ("sensitivity", "Sensitivity (recall)"), ("specificity", "Specificity"),
               ("precision", "Precision (PPV)"), ("npv", "NPV"), ("f1", "F1"),
               ("brier", "Brier score"), ("ece", "ECE"))


class PushError(RuntimeError):
    """Pushing to the Hub failed; the local folder is complete and the push can be re-run."""


def _fmt(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}" if isinstance(v, float) else str(v)  # None/NaN: undefined


def build_metric_table(title: str, metrics: dict, prefix: str) -> dict:
    get = lambda k: metrics.get(f"{prefix}_{k}")  # noqa: E731
    ci = metrics.get(f"{prefix}_ci") or {}
    rows = []
    for key, name in METRIC_ROWS:
        if f"{prefix}_{key}" not in metrics:
            continue
        c = ci.get(key)
        rows.append({"name": name, "value": _fmt(get(key)),
                     "ci": f"{c[0]:.4f} – {c[1]:.4f}" if c else ""})
    return {"title": title, "n": get("n_samples"), "threshold": _fmt(get("threshold")),
            "rows": rows, "ci": bool(ci), "confusion": get("confusion_matrix")}


def render_model_card(info: dict, template_path: str | Path = TEMPLATE) -> ModelCard:
    """info: the facts of a run (see train_hf.py). Returns a ModelCard with model-index."""
    eval_results = []
    dataset_id = info["dataset_id"]
    for split, prefix in (("validation", "eval"), ("test", "test")):
        m = info.get("metrics", {}).get(prefix)
        if not m:
            continue
        for key, name in (("accuracy", "Accuracy"), ("roc_auc", "AUROC"),
                          ("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("f1", "F1")):
            if m.get(f"{prefix}_{key}") is not None and m[f"{prefix}_{key}"] == m[f"{prefix}_{key}"]:  # not NaN
                eval_results.append(EvalResult(
                    task_type="image-classification", dataset_type=dataset_id, dataset_name=info["dataset_name"],
                    dataset_split=split, metric_type=key, metric_name=name, metric_value=round(float(m[f"{prefix}_{key}"]), 4)))
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-classification", license=info.get("license", "cc-by-4.0"),
        base_model=info.get("base_model"), datasets=[dataset_id] if "/" in dataset_id and not Path(dataset_id).exists() else None,
        tags=["medical", "chest-x-ray", "radiology", "pneumonia", "transfer-learning", "research-only",
              f"strategy-{info['strategy']}"],
        metrics=["accuracy", "roc_auc", "sensitivity", "specificity"],
        model_name=info["model_name"], eval_results=eval_results or None,
    )
    tables = []
    for title, prefix in (("Validation (patient-grouped split of the training data)", "eval"), ("Test", "test")):
        m = info.get("metrics", {}).get(prefix)
        if m:
            tables.append(build_metric_table(title, m, prefix))
    kwargs = dict(info)
    kwargs["metric_tables"] = tables
    return ModelCard.from_template(card_data, template_path=str(template_path), **kwargs)


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload model trained with train_hf.py", repo_type: str = "model",
                api: HfApi | None = None) -> str:
    """Upload a finished folder. Any failure -> PushError; the folder is left untouched."""
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                                 commit_message=commit_message,
                                 ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.pt", "*.bin", "*.pth"])
    except Exception as e:  # network, auth, permissions: all end the same way
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PushError(f"push to {repo_id} failed ({type(e).__name__}: {msg}); the local folder {folder} is "
                        "complete: fix the cause (network, `hf auth login`) and re-run with --push_to_hub") from None
    return getattr(info, "commit_url", str(info))
