"""Model card rendering (huggingface_hub ModelCard + the Jinja template model_card.md) and
pushes to the Hub. The card's facts are built from a run's report by
:func:`cxr_train.report.card_facts`; config.json's serving contract (``cxr_training``) is written
by the run's folder stage (:func:`cxr_train.report.serving_facts`), not here."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from cxr.operating_point import OperatingPoint

if TYPE_CHECKING:
    from .report import CVScores

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "model_card.md"   # a link to the top-level model_card.md (packaged as a file)
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


def build_metric_table(title: str, metrics: dict) -> dict:
    ci = metrics.get("ci") or {}
    rows = []
    for key, name in METRIC_ROWS:
        if key not in metrics:
            continue
        c = ci.get(key)
        rows.append({"name": name, "value": _fmt(metrics[key]),
                     "ci": f"{c[0]:.4f} – {c[1]:.4f}" if c else ""})
    table = {"title": title, "n": metrics.get("n_samples"), "threshold": _fmt(metrics.get("threshold")),
             "rows": rows, "ci": bool(ci), "confusion": metrics.get("confusion_matrix")}
    if metrics.get("per_class"):
        table.update(build_per_class(metrics))
    return table


def _fmt_ci(value, ci) -> str:
    """"0.9123 [0.8811 – 0.9402]", or the value alone without an interval."""
    if value is None or value != value:
        return "n/a"
    return f"{value:.4f}" + (f" [{ci[0]:.4f} – {ci[1]:.4f}]" if ci and None not in ci and ci[0] == ci[0] else "")


def build_per_class(metrics: dict) -> dict:
    """The per-class rows (AUROC, sensitivity, specificity with their bootstrap CIs; multi-label: the
    threshold), the macro / micro summaries, the screening question and the pairwise figures of a
    multi-class or multi-label split (cxr_train.training.score_split_labels)."""
    rows = []
    for name, m in metrics["per_class"].items():
        ci = m.get("ci") or {}
        rows.append({"name": name, "n": m["n"] if "n_positive" not in m else f"{m['n']} ({m['n_positive']} positive)",
                     "roc_auc": _fmt_ci(m.get("roc_auc"), ci.get("roc_auc")),
                     "sensitivity": _fmt_ci(m.get("sensitivity"), ci.get("sensitivity")),
                     "specificity": _fmt_ci(m.get("specificity"), ci.get("specificity")),
                     "threshold": _fmt(m.get("threshold"))})
    n_unc = sum(int(m.get("n_uncertain") or 0) for m in metrics["per_class"].values())
    out = {"per_class": rows, "macro_roc_auc": _fmt(metrics.get("roc_auc")),
           "micro_roc_auc": _fmt(metrics.get("micro_roc_auc")),
           "macro_sensitivity": _fmt(metrics.get("macro_sensitivity")),
           "macro_specificity": _fmt(metrics.get("macro_specificity")),
           "uncertain_text": f"{n_unc} uncertain label(s) left out" if n_unc else "no uncertain labels",
           "screening": None, "pairwise": []}
    sc = metrics.get("screening")
    if sc:
        ci = sc.get("ci") or {}
        out["screening"] = {"threshold": _fmt(sc.get("threshold")), "roc_auc": _fmt_ci(sc.get("roc_auc"), ci.get("roc_auc")),
                            "sensitivity": _fmt_ci(sc.get("sensitivity"), ci.get("sensitivity")),
                            "specificity": _fmt_ci(sc.get("specificity"), ci.get("specificity")),
                            "confusion": sc.get("confusion_matrix")}
    for name, p in (metrics.get("pairwise") or {}).items():
        out["pairwise"].append({"name": name, "n": p["n"], "positive": p["positive"], "roc_auc": _fmt(p.get("roc_auc")),
                                "accuracy": _fmt(p.get("accuracy"))})
    return out


KERMANY3 = ["NORMAL", "BACTERIAL", "VIRAL"]


def build_paper_rows(facts) -> list[dict]:
    """This model's bacterial-vs-viral figures (and 3-class accuracy, macro AUROC) on each scored
    split, for the card's table beside Kermany et al. 2018 (a Kermany three-class model only)."""
    if not facts.is_kermany or list(facts.labels) != KERMANY3:
        return []
    rows = []
    for split, title in (("external", "patient-grouped hold-out"), ("test", "test split"),
                         ("validation", "validation split")):
        m = facts.metrics.get(split) or {}
        p = (m.get("pairwise") or {}).get("BACTERIAL vs VIRAL")
        if p:
            rows.append({"title": title, "n": m.get("n_samples"), "accuracy": _pct(p.get("accuracy")),
                         "roc_auc": _fmt3(p.get("roc_auc")), "accuracy3": _pct(m.get("accuracy")),
                         "macro_auc": _fmt3(m.get("roc_auc"))})
    return rows


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}%"


def _fmt3(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def build_cv_table(cv: "CVScores") -> dict:
    """Per-fold rows and the mean ± sd row, for the card (``cv``: ``CVResult.score()``'s
    :class:`cxr_train.report.CVScores`)."""
    keys = [(k, n) for k, n in METRIC_ROWS if k in cv.summary]
    folds = [{"name": f"fold {i + 1}", "n": f["n_samples"], "cells": [_fmt(f[k]) for k, _ in keys]}
             for i, f in enumerate(cv.per_fold)]
    mean = [f"{cv.summary[k]['mean']:.4f} ± {cv.summary[k]['sd']:.4f}" for k, _ in keys]
    return {"k": cv.k, "columns": [n for _, n in keys], "folds": folds, "mean": mean,
            "pooled": build_metric_table(f"Pooled out-of-fold scores ({cv.pooled['n_samples']} images)", cv.pooled)}


MAX_CARD_FILMS = 50   # a per-film external table for a handful of films only


@dataclass
class CardFacts:
    """What a run's model card says about it (typed; rendered by model_card.md; built from a run by
    :func:`cxr_train.report.card_facts`)."""
    model_name: str
    repo_id: str
    dataset_id: str                 # Hub id, or the local folder's name
    dataset_is_hub: bool
    dataset_name: str
    dataset_note: str
    base_model: str | None
    base_model_text: str
    labels: list[str]
    positive_label: str
    strategy: str
    strategy_text: str
    trainable_text: str
    n_train: int
    n_validation: int
    validation_text: str
    image_size: int
    epochs: float
    steps: int
    batch_size: int
    learning_rate: float
    class_weights: list[float]
    precision: str
    augmentation: str
    train_time: str
    hardware: str
    command: str
    operating_point: OperatingPoint
    metrics: dict                    # split -> plain-named metrics (validation, test, external)
    cv: CVScores | None = None
    task: str = "binary"            # "binary" | "multiclass" | "multilabel"
    uncertain_labels: str | None = None
    label_rule: str | None = None   # --label_from_filename, when the labels came from the file names
    is_kermany: bool = False
    license: str = "cc-by-4.0"
    figures: dict[str, str] = field(default_factory=dict)   # figure -> file in the folder

    def warnings(self) -> list[str]:
        """Reasons this run is not a usable model, said loudly at the top of the card."""
        out = []
        if self.epochs < 1:
            out.append(f"trained for {self.epochs} epoch(s) only (a smoke run)")
        auroc = (self.metrics.get("validation") or {}).get("roc_auc")
        if auroc is not None and not (auroc == auroc and auroc >= 0.6):
            out.append(f"validation AUROC {auroc:.3f} is near chance")
        t = self.operating_point.temperature
        if t <= 0.051 or t >= 19.9:
            out.append(f"the calibration temperature ({t:.3f}) hit its fitting bound")
        if self.operating_point.fallback:   # set by fit_operating_point, not guessed from the source text
            out.append(f"no informative operating point could be fitted ({self.operating_point.source})")
        return out

    def template_kwargs(self) -> dict:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        op = self.operating_point
        kw.update(operating_point=op.to_config(), operating_point_text=op.describe(), warnings=self.warnings())
        tables = []
        for split, title in (("validation", "Validation (a patient-grouped split of the training data)"),
                             ("test", "Test"), ("external", "External / hold-out check (patients never trained or tuned on)")):
            if self.metrics.get(split):
                tables.append(build_metric_table(title, self.metrics[split]))
        kw["metric_tables"] = tables
        kw["paper_rows"] = build_paper_rows(self)
        kw["cv_table"] = build_cv_table(self.cv) if self.cv else None
        per_image = (self.metrics.get("external") or {}).get("per_image") or []
        # a per-film table for a handful of films; a large folder (a hold-out) stays in external_results.json
        kw["external_images"] = per_image if len(per_image) <= MAX_CARD_FILMS and self.task == "binary" else None
        return kw


SITE_SECTION = "## Site calibration"


def render_site_calibration(record: dict) -> str:
    """The card's "Site calibration" section, from ``site_calibration.json`` (cxr_train.calibrate)."""
    def fig(f: dict, key: str, k: str, n: str) -> str:
        lo, hi = f[f"{key}_ci"]
        return f"{f[key]:.3f} [{lo:.3f} – {hi:.3f}] ({f[k]}/{f[n]})"

    before, after = record["before"], record["after"]
    counts = ", ".join(f"{v} {k}" for k, v in record["n_per_class"].items())
    excluded = sum((record.get("excluded_out_of_distribution") or {}).values())
    prev = record.get("previous_operating_point") or {}
    lines = [
        SITE_SECTION, "",
        f"This folder is a copy of `{record['model']}` (weights unchanged) whose temperature and decision threshold "
        f"were refitted on a labelled sample of a new site with `cxr-calibrate` on {record['date']}. "
        "It replaces the operating point described elsewhere in this card (kept for the record).", "",
        f"- Sample: `{record['sample']}`, {sum(record['n_per_class'].values())} films ({counts})"
        + (f"; {excluded} film(s) flagged out of distribution left out" if excluded else "") + ".",
        f"- Policy: {record['policy']}"
        + (f": up to {record['misses_allowed']} missed {record['positive_label']} film(s) allowed on the sample."
           if record["floor_shown"] else
           f". **The sample is too small to show the floor**: the threshold is the lowest {record['positive_label']} "
           "score of the sample."),
        f"- Previous operating point: threshold {prev.get('threshold', 0.5):.4f}, temperature "
        f"{prev.get('temperature', 1.0):.4f} ({prev.get('source', 'not recorded')}).",
        f"- Scored at {record['precision']} precision through `cxr.inference.Predictor`. Command: `{record['command']}`",
        "",
        f"| on the calibration sample | threshold | temperature | sensitivity [{record['interval']}] "
        f"| specificity [{record['interval']}] |",
        "|---|---|---|---|---|",
        f"| before (the model's) | {before['threshold']:.4f} | {before['temperature']:.4f} "
        f"| {fig(before, 'sensitivity', 'tp', 'n_positive')} | {fig(before, 'specificity', 'tn', 'n_negative')} |",
        f"| after (this site) | {after['threshold']:.4f} | {after['temperature']:.4f} "
        f"| {fig(after, 'sensitivity', 'tp', 'n_positive')} | {fig(after, 'specificity', 'tn', 'n_negative')} |",
        "",
        "These figures are on the calibration sample itself, where the threshold was chosen: they are "
        "**optimistic**. Only other films of the site (other patients) show how the model does there.",
    ]
    if record.get("warnings"):
        lines += ["", "**Warnings:**", ""] + [f"- {w}" for w in record["warnings"]]
    return "\n".join(lines) + "\n"


def with_card_section(card: str, section: str, before: str | None = None) -> str:
    """``card`` with ``section`` (a markdown ``## `` section) in place of the card's section of the
    same heading, or before the ``before`` heading (e.g. "## Limitations") when the card has it,
    else before its first ``## `` heading (after the title and the disclaimers), or at the end."""
    lines = card.splitlines()
    if before is not None and section.splitlines()[0] not in lines and before in lines:
        at = lines.index(before)
        return "\n".join(lines[:at] + section.rstrip("\n").splitlines() + [""] + lines[at:]).rstrip("\n") + "\n"
    heading = section.splitlines()[0]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[end:]).rstrip("\n") + "\n"
    body = 0
    if lines and lines[0].strip() == "---":   # YAML front matter
        body = next((i + 1 for i in range(1, len(lines)) if lines[i].strip() == "---"), 0)
    at = next((i for i in range(body, len(lines)) if lines[i].startswith("## ")), None)
    if at is None:
        return card.rstrip("\n") + "\n\n" + section
    return "\n".join(lines[:at] + section.rstrip("\n").splitlines() + [""] + lines[at:]).rstrip("\n") + "\n"


def render_model_card(facts: CardFacts, template_path: str | Path = TEMPLATE) -> ModelCard:
    """The card: huggingface_hub ModelCard from the Jinja template, with model-index results."""
    eval_results = []
    binary = facts.task == "binary"
    for split, m in facts.metrics.items():
        if split == "external" or not m:
            continue
        keys = (("accuracy", "Accuracy"), ("roc_auc", "AUROC"), ("sensitivity", "Sensitivity"),
                ("specificity", "Specificity"), ("f1", "F1")) if binary else (
            ("accuracy", "Accuracy" if facts.task == "multiclass" else "Per-label accuracy"),
            ("roc_auc", "Macro AUROC (one-vs-rest)"), ("micro_roc_auc", "Micro AUROC"),
            ("macro_sensitivity", "Macro sensitivity"), ("macro_specificity", "Macro specificity"))
        m = dict(m)
        for name, pc in ({} if binary else (m.get("per_class") or {})).items():
            m[f"roc_auc_{name}"] = pc.get("roc_auc")
            keys += ((f"roc_auc_{name}", f"AUROC {name} vs rest"),)
        for key, name in keys:
            if m.get(key) is not None and m[key] == m[key]:  # not None/NaN
                eval_results.append(EvalResult(
                    task_type="image-classification", dataset_type=facts.dataset_id, dataset_name=facts.dataset_name,
                    dataset_split=split, metric_type=key, metric_name=name, metric_value=round(float(m[key]), 4)))
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-classification", license=facts.license,
        base_model=facts.base_model, datasets=[facts.dataset_id] if facts.dataset_is_hub else None,
        tags=["medical", "chest-x-ray", "radiology", "pneumonia", "transfer-learning", "research-only",
              f"strategy-{facts.strategy}"] + ([] if facts.task == "binary" else
                                               ["multi-class" if facts.task == "multiclass" else "multi-label"]),
        metrics=["accuracy", "roc_auc", "sensitivity", "specificity"],
        model_name=facts.model_name, eval_results=eval_results or None,
    )
    return ModelCard.from_template(card_data, template_path=str(template_path), **facts.template_kwargs())


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


# ---------------------------------------------------------------- push checks and the push-only command

WRITE_ROLES = ("admin", "write", "contributor")


def _first_line(e: Exception) -> str:
    return ((str(e).splitlines() or [""])[0] or type(e).__name__)[:300]


def _token_can_write(auth: dict, namespace: str) -> bool | None:
    """What the token itself allows: False for a read token or a fine-grained token without
    repo.write on ``namespace``; None when the answer does not say."""
    access = (auth or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return False
    if role == "fineGrained":
        fine = access.get("fineGrained") or {}
        for scope in fine.get("scoped") or []:
            if (scope.get("entity") or {}).get("name") == namespace:
                return "repo.write" in (scope.get("permissions") or [])
        return False
    return True if role in ("write", "admin") else None


def check_push_access(repo_id: str | None, *, token: str | None = None, api: HfApi | None = None) -> str:
    """Before any training: a Hub repo id, a token, the Hub reachable, and write access to
    the repo's namespace (the token's user, or an organisation where it may write).
    Returns the full repo id; any failure is a PushError with one clear line."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise PushError("--push_to_hub needs --hub_model_id (user/name or organisation/name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"'{repo_id}' is not a valid Hub repo id: {_first_line(e)}") from None
    if constants.is_offline_mode():
        raise PushError("--push_to_hub needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1): unset it, or "
                        "train without --push_to_hub and push the folder later with cxr-push")
    token = token or get_token()
    if not token:
        raise PushError("--push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set "
                        "HF_TOKEN or pass --hub_token (nothing was trained)")
    api = api or HfApi(token=token)
    try:
        me = api.whoami(token=token)
    except Exception as e:  # noqa: BLE001 - invalid token, network: one line either way
        raise PushError(f"cannot check the Hub token ({type(e).__name__}: {_first_line(e)}); fix the network or "
                        "the token (`hf auth login`) before training with --push_to_hub") from None
    user = me.get("name")
    namespace = repo_id.split("/", 1)[0] if "/" in repo_id else user
    writable = {user} | {o.get("name") for o in me.get("orgs") or [] if o.get("roleInOrg") in WRITE_ROLES}
    if namespace not in writable:
        raise PushError(f"the token of '{user}' cannot write to the namespace '{namespace}' (writable: "
                        f"{', '.join(sorted(n for n in writable if n))}); choose --hub_model_id {user}/<name>")
    if _token_can_write(me.get("auth") or {}, namespace) is False:
        raise PushError(f"the Hugging Face token of '{user}' is read-only for '{namespace}': create a token with "
                        "write access and run `hf auth login` again")
    return repo_id if "/" in repo_id else f"{user}/{repo_id}"


def check_model_folder(folder: str | Path) -> Path:
    """A folder worth pushing: config.json and safetensors weights (never pickles), a model card."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PushError(f"model folder not found: {folder} (no such folder)")
    missing = [n for n in ("config.json", "README.md") if not (folder / n).is_file()]
    if not any(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
        missing.append("model.safetensors")
    if missing:
        raise PushError(f"{folder.name} is not a finished model folder: missing {', '.join(missing)}")
    return folder


def push_main(argv: list[str] | None = None) -> int:
    """``cxr-push``: upload an existing model folder (e.g. a run trained without --push_to_hub)."""
    from cxr.cli import ArgumentParser, answer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = ArgumentParser(prog="cxr-push", description="Push a finished model folder to the Hugging Face "
                                 "Hub (checks the folder, the token and write access first).")
    ap.add_argument("--folder", required=True, help="the model folder train_hf.py wrote (its --output_dir)")
    ap.add_argument("--repo_id", required=True, help="Hub repo id: user/name or organisation/name")
    ap.add_argument("--private", action="store_true", help="create the repo as private")
    ap.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    args = ap.parse_args(argv)

    def push() -> str:
        folder = check_model_folder(args.folder)
        repo_id = check_push_access(args.repo_id, token=args.token)
        return push_folder(folder, repo_id, private=args.private, token=args.token)

    return answer(push, PushError)


if __name__ == "__main__":
    import sys

    sys.exit(push_main())
