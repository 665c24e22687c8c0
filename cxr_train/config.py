"""Arguments: dataclasses split by concern, YAML defaults, command-line overrides.

``parse_args(argv)`` reads ``--config FILE.yaml`` (optional), checks that every YAML key is a
field of one of the dataclasses (an unknown key is an error naming it), then lets
``HfArgumentParser`` parse ``[YAML values as flags] + argv``: the command line wins, and the
dataclass types convert YAML values (``3e-5`` written in YAML becomes a float).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from cxr.cli import suggest as _suggest   # the one "did you mean" rule (cxr-predict uses it too)
from cxr.precision import PRECISIONS, resolve_bf16
from cxr.operating_point import POLICIES, UNCERTAIN_POLICIES

STRATEGIES = ("frozen", "partial", "full", "lora")
STREAMING_FIELDS = ("streaming", "streaming_shuffle_buffer")
LABEL_SET_FIELDS = ("image_column", "label_column", "label_columns", "uncertain_labels", "label_from_filename")
USAGE = "train_hf.py [--config FILE.yaml] [--field value ...]   (or: cxr-train ...)"


def option(default, help: str):
    """A settings field: its default and the help text ``--help`` prints (HfArgumentParser reads it)."""
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A bad configuration, found before anything is downloaded or trained."""


class _Parser(HfArgumentParser):
    """argparse errors become one ConfigError (argparse would print usage, then exit)."""

    def error(self, message):
        raise ConfigError(message)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="cxr-resnet-small-scratch",
        metadata={"help": "Hub id, local folder, or a from-scratch preset "
                          "(cxr-resnet-small-scratch, cxr-vit-small-scratch)."},
    )
    strategy: str = option("full", f"One of {', '.join(STRATEGIES)}.")
    partial_stages: int = option(1, "partial: how many of the last backbone stages/blocks to train.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(16, "LoRA alpha.")
    lora_dropout: float = option(0.1, "LoRA dropout.")
    lora_target_modules: list[str] | None = option(None, "LoRA target module names; default chosen per architecture.")
    image_size: int | None = option(None, "Input size in pixels (square); default: the checkpoint's.")
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) to pin the checkpoint to.")
    reinit_head: bool = option(
        False, "Re-initialise the classification head even when the checkpoint's "
               "head already has the right shape (clean transfer experiments).")
    channels_last: bool = option(True, "Use channels_last memory format for CNNs (faster on CPU).")


@dataclass
class DataArguments:
    dataset_name: str | None = option(
        None, "Hub dataset id, or a local folder <split>/<LABEL>/<image> or <LABEL>/<image>.")
    dataset_config_name: str | None = option(None, "Hub dataset configuration.")
    dataset_revision: str | None = option(None, "Hub dataset revision.")
    train_split: str = option("train", "Split to train on.")
    validation_split: str | None = option(
        None, "Validation split name; default: 'validation'/'val' if present, "
              "else carved out of train grouped by patient.")
    test_split: str = option("test", "Test split name (only --do_predict reads it).")
    validation_fraction: float = option(0.1, "Fraction of training patients held out for validation.")
    image_column: str | None = option(
        None, "The dataset's image column (an Image feature, or file paths in a CSV); "
              "default: auto-detected (image, img, ... or the one Image column).")
    label_column: str | None = option(
        None, "The dataset's label column: one label per film (a ClassLabel, strings or "
              "ints: binary or N-class) or a list of findings per film "
              "(Sequence(ClassLabel): multi-label); default: auto-detected (label, labels, "
              "the one ClassLabel column, or CheXpert-style finding columns).")
    label_columns: list[str] | None = option(
        None, "Multi-label, CheXpert style: one column per finding holding 1 (present), "
              "0 (absent), -1 (uncertain) or blank (not mentioned: read as 0); default: "
              "every column holding only those values when no label column exists.")
    uncertain_labels: str | None = option(
        None, "Multi-label: what uncertain (-1) labels train as: ones (U-Ones), zeros "
              "(U-Zeros) or ignore (masked out of the loss), Irvin et al. 2019. Required "
              "when the data has -1 labels; uncertain labels are never scored.")
    label_from_filename: list[str] | None = option(
        None, "Labels from the file names instead of the folders or the label column: "
              "LABEL=REGEX pairs (re.search on the file name, first match wins, their "
              "order is the class order) or a preset: kermany3 (NORMAL / BACTERIAL / "
              "VIRAL from the Kermany names). Applies to external_dataset too.")
    class_names: list[str] | None = option(None, "Expected class names; an error if the data's differ.")
    positive_label: str | None = option(
        None, "Positive class for clinical metrics; default: the class that is "
              "not NORMAL (or index 1).")
    max_train_samples: int | None = option(None, "Cap on training images (stratified).")
    max_eval_samples: int | None = option(None, "Cap on validation images (stratified).")
    max_samples_per_class: int | None = option(None, "Low-data studies: at most this many training images per class.")
    class_weights: list[float] | None = option(
        None, "Cross-entropy class weights; default: inverse class frequency of train.")
    augment: bool = option(True, "Training augmentation (affine, crop, contrast).")
    augment_strength: str = option(
        "standard", "standard (crop 0.75-1, rotation 10 deg, shift 0.05, brightness/contrast "
                    "0.2) or strong (crop 0.55-1, rotation 12 deg, shift 0.08, "
                    "brightness/contrast 0.3, gamma 0.7-1.4, slight blur); never flips.")
    acquisition_augment: float = option(
        0.0, "Probability that a training film gets one acquisition change of the shift "
             "stress test (noise, blur, down-sampling, JPEG, sharpening, grid lines, "
             "equalisation, borders, zoom; cxr_train.acquisition) at a severity in [0, 2]; "
             "0 = off. Needs --data_cache memmap.")
    external_dataset: str | None = option(
        None, "A local image folder <LABEL>/<image> of other patients, scored once with "
              "the final model at its saved operating point (reported, never tuned on).")
    data_cache: str = option(
        "memmap", "memmap: decode each film once into an on-disk uint8 store (resized by the "
                  "model's processor; reused by folds, epochs and later runs) and convert, "
                  "augment and normalise whole batches on the training device; none: "
                  "decode and transform every film every epoch (the old path).")
    cache_dir: str | None = option(
        None, "Folder of the film store (default: $CXR_CACHE_DIR, else cxr-films in the "
              "datasets cache, $HF_DATASETS_CACHE or ~/.cache/huggingface/datasets).")
    streaming: bool = option(
        False, "Stream the dataset (a Hub id or a local folder of parquet files, loaded with "
               "streaming=True) instead of loading it: for datasets larger than the disk. "
               "A first pass reads only the label and patient columns (class counts, a "
               "patient-grouped validation split, film counts); films are decoded as they "
               "stream, every epoch, through the same uint8 batch path. One label per film "
               "(binary or N-class). max_steps defaults to num_train_epochs over the "
               "counted films; max_train_samples takes the first N films of the shuffled "
               "stream. Not with cv_folds, max_samples_per_class, acquisition_augment, "
               "data_cache none or label_from_filename (docs/streaming.md).")
    streaming_shuffle_buffer: int = option(
        1000, "--streaming: films held in the shuffle buffer of the training stream "
              "(its shards are shuffled too, again every epoch).")


def _choices(names) -> str:
    """"a, b or c": the one way a list of choices is written in help and errors."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass
class EvaluationArguments:
    """How the trained model is judged and its operating point chosen (not what it is trained on)."""
    cv_folds: int = option(
        0, "K >= 2: patient-grouped, stratified K-fold cross-validation first (K models, "
           "per-fold and mean ± sd metrics, out-of-fold scores of every training image); "
           "the operating point is then fitted on the out-of-fold scores and the shipped "
           "model is trained as without CV (its validation split for early stopping). "
           "0 = off.")
    threshold_policy: str = option(
        "equal_error", "How the decision threshold is chosen on the fitting scores "
                       "(out-of-fold with --cv_folds, else validation): "
                       + "; ".join(f"{k}: {v}" for k, v in POLICIES.items())
                       .replace("min_sensitivity", "--min_sensitivity") + ".")
    min_sensitivity: float = option(
        0.95, "Sensitivity the high-sensitivity threshold (and the sensitivity_floor "
              "and shift_floor policies) keeps on the fitting scores.")


@dataclass
class ExportArguments:
    """What goes into the model folder beside the weights, and where it is published."""
    ood_fit: bool = option(
        True, "Fit the out-of-distribution score on the model's own training films "
              "(threshold on its validation films and reference non-X-ray images) and "
              "save it as ood.safetensors in the model folder, which the Predictor and "
              "the Space use to flag films unlike the training data (cxr/ood.py). "
              "False: skip it (the folder then serves without the OOD check).")
    ood_max_train: int = option(3000, "The OOD fit reads at most this many training films (a random sample, seeded).")
    hub_private: bool = option(False, "Create the Hub repo as private.")


@dataclass
class ExtraTrainingArguments:
    """The project's training settings beside transformers.TrainingArguments."""
    precision: str = option(
        "auto", f"{_choices(PRECISIONS)}: auto is bf16 where the CPU/GPU supports it "
                "(sets TrainingArguments.bf16).")
    early_stopping_patience: int = option(5, "Evaluations without AUROC improvement before stopping (0 = off).")


DEFAULT_TRAINING = {
    "output_dir": "outputs/run",
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "steps",
    "logging_steps": 10,
    "load_best_model_at_end": True,
    "metric_for_best_model": "roc_auc",
    "greater_is_better": True,
    "save_total_limit": 2,
    "remove_unused_columns": False,
    "report_to": "none",
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": False,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.05,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-3,
    "num_train_epochs": 10,
    "do_train": True,
    "do_eval": True,
}

PROJECT_ARGS = (ModelArguments, DataArguments, EvaluationArguments, ExportArguments, ExtraTrainingArguments)
ALL_ARGS = (*PROJECT_ARGS, TrainingArguments)


@dataclass
class RunArguments:
    """Every argument of one ``cxr-train`` run, by concern; ``argv`` is the command line as given."""
    model: ModelArguments
    data: DataArguments
    evaluation: EvaluationArguments
    export: ExportArguments
    extra: ExtraTrainingArguments
    training: TrainingArguments
    argv: list[str]

    def resolved(self) -> dict:
        """``run_config.yaml``: :func:`resolved_config` of every group."""
        return resolved_config(self.model, self.data, self.evaluation, self.export, self.extra, self.training)


def _field_names() -> dict[str, type]:
    return {f.name: cls for cls in ALL_ARGS for f in dataclasses.fields(cls) if f.init}


def _to_flags(values: dict) -> list[str]:
    flags: list[str] = []
    for key, val in values.items():
        if val is None:
            continue
        if isinstance(val, (list, tuple)):
            flags += [f"--{key}", *[str(v) for v in val]]
        elif isinstance(val, dict):
            flags += [f"--{key}", json.dumps(val)]
        else:
            flags += [f"--{key}", str(val)]
    return flags


def load_yaml_config(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p.name} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p.name} must be a mapping of field: value")
    known = _field_names()
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        hints = [f"{k}{_suggest(k, known).replace(' --', ' ')}" for k in unknown]
        raise ConfigError(f"unknown config key(s) in {p.name}: {', '.join(hints)}")
    return data


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    cfg, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            cfg, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            cfg = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return cfg, rest


def parse_run_args(argv: list[str] | None = None) -> RunArguments:
    """argv (default: ``sys.argv[1:]``) -> :class:`RunArguments`: YAML defaults (``--config``), then
    the command line; every value checked (:func:`validate_args`) before any work."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg_path, rest = _split_config_flag(argv)
    values = dict(DEFAULT_TRAINING)
    if cfg_path:
        values.update(load_yaml_config(cfg_path))
    if "-h" in rest or "--help" in rest:  # the project's fields first, then TrainingArguments; exits
        help_parser().print_help()
        raise SystemExit(0)
    known = _field_names()
    for a in rest:  # unknown command-line flags: name them and suggest the nearest one
        if a.startswith("--"):
            key = a[2:].split("=", 1)[0]
            if key.replace("-", "_") not in known:
                raise ConfigError(f"unknown argument: --{key}{_suggest(key, [*known, 'config'])}")
    flags = _to_flags(values) + rest
    # Precision and device must be settled before the one TrainingArguments is built: its
    # __post_init__ fixes mixed precision and the (process-wide) accelerate state.
    pre = _Parser(PROJECT_ARGS).parse_known_args(flags)[0]
    check_precision(pre.precision)
    import torch

    extra = []
    if not torch.cuda.is_available():
        # CPU-only machine: say so, or Trainer refuses bf16 and skips CPU data parallelism
        extra += ["--use_cpu", "True"]
    if pre.precision != "auto" or resolve_bf16("auto"):
        extra += ["--bf16", str(resolve_bf16(pre.precision))]
    model, data, evaluation, export, more, training = _parse(_Parser(ALL_ARGS), extra + flags)
    args = RunArguments(model, data, evaluation, export, more, training, argv)
    validate_args(args)
    return args


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """argv -> (ModelArguments, DataArguments, TrainingArguments), checked as :func:`parse_run_args`
    checks them: the three groups that preparing data and building a model need (the evaluation,
    export and extra training groups: :func:`parse_run_args`)."""
    args = parse_run_args(argv)
    return args.model, args.data, args.training


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}': choose {_choices(PRECISIONS)}")


def _parse(parser, flags):
    try:
        return parser.parse_args_into_dataclasses(args=flags, look_for_args_file=False)
    except ConfigError:  # argparse's own messages (bad values), raised by _Parser.error
        raise
    except ValueError as e:  # TrainingArguments.__post_init__ checks
        raise ConfigError(str(e).splitlines()[0]) from None


def help_parser() -> HfArgumentParser:
    """The parser ``--help`` prints: --config, then the project's own fields (model, data,
    evaluation, export, precision), then the ~150 fields of transformers.TrainingArguments."""

    @dataclass
    class _Config:
        _argument_group_name = "configuration"
        config: str | None = field(default=None, metadata={
            "help": "YAML file of defaults (any field below); the command line overrides it. "
                    "A run's run_config.yaml can be passed back here."})

    def group(cls, title):
        return type(f"_{cls.__name__}", (cls,), {"_argument_group_name": title})

    groups = [group(ModelArguments, "model (this project)"), group(DataArguments, "data (this project)"),
              group(EvaluationArguments, "evaluation and operating point (this project)"),
              group(ExportArguments, "model folder and Hub (this project)"),
              group(ExtraTrainingArguments, "training: precision and early stopping (this project)"),
              group(TrainingArguments, "training (transformers.TrainingArguments, usual names)")]
    return HfArgumentParser((_Config, *groups), usage=USAGE,
                            description="Train a chest X-ray classifier and write a Hub-ready model folder. "
                                        "Research and education only: not a medical device.")


def validate_args(args: RunArguments) -> None:
    """Every value checked before any work: a bad one is one ConfigError naming it."""
    model_args, data_args, evaluation, export = args.model, args.data, args.evaluation, args.export
    training_args = args.training
    if model_args.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{model_args.strategy}': choose one of {', '.join(STRATEGIES)}")
    if not data_args.dataset_name:
        raise ConfigError("dataset_name is required (a Hub dataset id or a local folder)")
    if not 0.0 < data_args.validation_fraction < 1.0:
        raise ConfigError("validation_fraction must be between 0 and 1")
    if evaluation.cv_folds == 1 or evaluation.cv_folds < 0:
        raise ConfigError("cv_folds must be 0 (off) or at least 2")
    if evaluation.threshold_policy not in POLICIES:
        raise ConfigError(f"unknown threshold_policy '{evaluation.threshold_policy}': choose "
                          f"{', '.join(POLICIES)}")
    if not 0.5 <= evaluation.min_sensitivity < 1.0:
        raise ConfigError("min_sensitivity must be in [0.5, 1)")
    if data_args.data_cache not in ("memmap", "none"):
        raise ConfigError(f"unknown data_cache '{data_args.data_cache}': choose memmap or none")
    from .data import AUGMENTATIONS

    if data_args.augment_strength not in AUGMENTATIONS:
        raise ConfigError(f"unknown augment_strength '{data_args.augment_strength}': choose "
                          f"{' or '.join(AUGMENTATIONS)}")
    if not 0.0 <= data_args.acquisition_augment <= 1.0:
        raise ConfigError("acquisition_augment is a probability: 0 (off) to 1")
    if data_args.acquisition_augment and data_args.data_cache == "none":
        raise ConfigError("acquisition_augment needs the film store: --data_cache memmap")
    from .tracking import check_report_to

    check_report_to(training_args.report_to)    # a missing tracker named with its extra, before any work
    if not 0.0 <= training_args.label_smoothing_factor < 1.0:
        raise ConfigError("label_smoothing_factor must be in [0, 1)")
    if model_args.partial_stages < 1:
        raise ConfigError("partial_stages must be >= 1")
    if model_args.image_size is not None and model_args.image_size < 32:
        raise ConfigError("image_size must be at least 32")
    if export.ood_max_train < 2:
        raise ConfigError("ood_max_train must be at least 2")
    if data_args.uncertain_labels is not None and data_args.uncertain_labels not in UNCERTAIN_POLICIES:
        raise ConfigError(f"unknown uncertain_labels '{data_args.uncertain_labels}': choose "
                          f"{', '.join(UNCERTAIN_POLICIES)}")
    if data_args.label_column and data_args.label_columns:
        raise ConfigError("give either --label_column (one column of labels) or --label_columns (one column per "
                          "finding), not both")
    if data_args.label_from_filename:
        if data_args.label_column or data_args.label_columns:
            raise ConfigError("--label_from_filename replaces the label column: drop --label_column/--label_columns")
        from .labels import FilenameLabeler, LabelError

        try:
            FilenameLabeler.parse(data_args.label_from_filename)
        except LabelError as e:
            raise ConfigError(str(e)) from None
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ConfigError("push_to_hub needs hub_model_id (user/name)")
    if data_args.streaming:
        check_streaming(args)
    elif data_args.streaming_shuffle_buffer < 1:
        raise ConfigError("streaming_shuffle_buffer must be at least 1")


# (field, value that conflicts, why) for --streaming true: each a clear error before any work
STREAMING_CONFLICTS = (
    ("cv_folds", lambda v: bool(v), "K-fold cross-validation indexes the whole pool of films by fold; a stream "
                                    "has no random access: train without --streaming (a local copy) for CV"),
    ("max_samples_per_class", lambda v: v is not None,
     "a per-class cap needs random access to the films; --max_train_samples takes the first N films of the "
     "shuffled stream"),
    ("acquisition_augment", lambda v: bool(v), "acquisition changes are applied to the film store's records; a "
                                               "stream does not go through the film store"),
    ("data_cache", lambda v: v == "none", "a stream always takes the uint8 batch path (nothing is cached: films "
                                          "are decoded as they stream); --data_cache none is the per-epoch decode "
                                          "of a loaded dataset"),
    ("label_from_filename", lambda v: bool(v), "labels from file names are read from a loaded dataset; a stream "
                                               "needs a label column"),
    ("label_columns", lambda v: bool(v), "multi-label (one column per finding) streaming is not supported yet"),
    ("uncertain_labels", lambda v: v is not None, "uncertain labels are multi-label, and multi-label streaming "
                                                  "is not supported yet"),
)


def check_streaming(args: RunArguments) -> None:
    """--streaming true: the options it cannot be combined with, each a ConfigError naming why."""
    data_args, training_args = args.data, args.training
    for name, conflicts, why in STREAMING_CONFLICTS:
        value = next(getattr(g, name) for g in (args.data, args.evaluation) if hasattr(g, name))
        if conflicts(value):
            shown = " ".join(value) if isinstance(value, list) else value
            raise ConfigError(f"--streaming true cannot be combined with --{name} {shown}: {why}")
    if data_args.streaming_shuffle_buffer < 1:
        raise ConfigError("streaming_shuffle_buffer must be at least 1")
    if getattr(training_args, "max_steps", -1) <= 0 and not training_args.num_train_epochs > 0:
        raise ConfigError("--streaming true needs --max_steps or a positive --num_train_epochs")


def resolved_config(*groups) -> dict:
    """The settings of the given argument groups (the project's dataclasses, and
    TrainingArguments where it is one of them; :meth:`RunArguments.resolved`: all of them),
    JSON-serialisable: ``run_config.yaml`` in the output folder, which can be passed back as
    ``--config``."""
    out = {}
    training = [g for g in groups if isinstance(g, TrainingArguments)]
    for g in groups:
        if not isinstance(g, TrainingArguments):
            out.update(dataclasses.asdict(g))
    ta = training[0].to_dict() if training else {}
    for k in ("push_to_hub_token", "hub_token"):
        ta.pop(k, None)
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(TrainingArguments)}
    out.update({k: v for k, v in ta.items() if k in DEFAULT_TRAINING or defaults.get(k, v) != v})
    if out.get("report_to") == []:
        out["report_to"] = "none"
    # post-init expansions and empty lists carry no choice of the user's; the label-set fields
    # (issue #29) only when set, so a binary run's run_config.yaml is what it was before them
    out = {k: v for k, v in out.items() if not isinstance(v, dict) and v != []
           and not (k in LABEL_SET_FIELDS and v is None)}
    if not out.get("streaming"):    # a loaded run's run_config.yaml is what it was before --streaming
        for k in STREAMING_FIELDS:
            out.pop(k, None)
    return json.loads(json.dumps(out, default=str))
