#!/usr/bin/env python
"""Fine-tune (or train from scratch) a chest X-ray classifier with the Hugging Face Trainer,
evaluate it with clinical metrics, and write a Hub-ready model folder.

    python train_hf.py --config hub_configs/cxr-resnet-small-scratch.yaml [--field value ...]
    python train_hf.py --config ... --cv_folds 5      # K-fold CV first; operating point on out-of-fold scores
    python train_hf.py --config ... --dataset_name USER/PARQUET_DATASET --streaming true   # larger than the disk

A run is a short sequence of stages over typed values (cxr_train.report): arguments -> data ->
(cross-validation) -> train -> operating point -> export -> scores -> facts -> folder -> push.

Research and education only: not a medical device.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from cxr.architecture import CNN, family
from cxr.cli import answer
from cxr.operating_point import CONFIG_KEY, OperatingPoint
from cxr_train.batches import build_inputs
from cxr_train.checkpointing import resolve_resume
from cxr_train.config import ConfigError, ExtraTrainingArguments, RunArguments, parse_run_args
from cxr_train.data import (
    DataError, PreparedData, check_images, check_patient_disjoint, cv_fold, cv_folds, fold_overlaps, prepare_cv_data,
    prepare_data,
)
from cxr_train.hub import PushError, check_push_access, push_folder, render_model_card
from cxr_train.labels import problem_type
from cxr_train.modeling import (
    ModelError, apply_strategy, build_model, count_parameters, merge_for_export, save_model_folder,
)
from cxr_train.report import (  # noqa: F401 (Fitted re-exported: train_hf.Fitted)
    CVResult, CVScores, Fitted, RunData, RunEnvironment, RunReport, card_facts, serving_facts,
)
from cxr_train.training import (
    binary_labels, fit_for_task, loss_for, metrics_for, prefixed, score_for_task, score_split,
)

logger = logging.getLogger("train_hf")
USER_ERRORS = (ConfigError, DataError, ModelError, PushError)


def _predict(trainer, dataset):
    out = trainer.predict(dataset, metric_key_prefix="predict")
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return np.asarray(logits), np.asarray(out.label_ids)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def train_one(model_args, data_args, training_args, data: PreparedData, predict: tuple[str, ...],
              extra: ExtraTrainingArguments | None = None) -> Fitted:
    """Build the model, apply the strategy, train with the Trainer on data.splits['train']
    (early stopping and checkpoint choice on 'validation', ``extra``'s patience), and predict the
    named splits."""
    extra = extra or ExtraTrainingArguments()
    from transformers import EarlyStoppingCallback, Trainer

    model, processor = build_model(model_args.model_name_or_path, data.id2label, model_args.image_size,
                                   model_args.model_revision, reinit_head=model_args.reinit_head)
    # softmax or sigmoid in pipeline("image-classification") (docs/label_sets.md)
    model.config.problem_type = problem_type(data.task)
    model = apply_strategy(model, model_args.strategy, partial_stages=model_args.partial_stages,
                           lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                           lora_dropout=model_args.lora_dropout,
                           lora_target_modules_=model_args.lora_target_modules)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%), strategy %s", f"{trainable:,}", f"{total:,}",
                100 * trainable / total, model_args.strategy)
    if model_args.channels_last and family(model) == CNN:
        model = model.to(memory_format=torch.channels_last)
    # uint8 batches (film store or stream); conversion, augmentation, normalisation on the device
    data, collator = build_inputs(model, processor, data, data_args, training_args.dataloader_num_workers)

    callbacks = []
    if extra.early_stopping_patience and training_args.eval_strategy != "no" and training_args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=extra.early_stopping_patience))
    trainer = Trainer(
        model=model, args=training_args,
        train_dataset=data.splits["train"], eval_dataset=data.splits["validation"],
        processing_class=processor, data_collator=collator,
        compute_loss_func=loss_for(data, training_args.label_smoothing_factor),
        compute_metrics=metrics_for(data),
        callbacks=callbacks,
    )
    seconds = 0.0
    if training_args.do_train:
        try:  # the newest COMPLETE checkpoint; partial ones (killed mid-save) are removed
            resume = resolve_resume(training_args.resume_from_checkpoint, Path(training_args.output_dir),
                                    model_only=training_args.save_only_model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.time() - t0
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    logits = {split: _predict(trainer, data.splits[split]) for split in predict}
    return Fitted(trainer, logits, trainable, total, seconds, epochs=trainer.state.epoch or 0,
                  steps=trainer.state.global_step)


def cross_validate(args: RunArguments, pool: PreparedData, out_dir: Path) -> CVResult:
    """K models, each trained on the other folds' patients and scoring its own fold once:
    out-of-fold (OOF) logits for every training image, and per-fold metrics. Each fold trains with
    its own copy of the training arguments (its output folder ``cv/fold<i>``)."""
    k, seed = args.evaluation.cv_folds, args.training.seed
    train = pool.splits["train"]
    folds = cv_folds(train, k, seed)
    oof = np.full((len(train), len(pool.id2label)), np.nan)
    fold_of = np.full(len(train), -1)
    seconds, t_start = 0.0, time.time()
    logger.info("cross-validation: %d folds of %s films (%s patients), grouped by patient", k, f"{len(train):,}",
                f"{len(set(train['patient_id'])):,}")
    for i, held in enumerate(folds):
        fold = cv_fold(pool, held, args.data, seed)
        check_patient_disjoint(fold.splits)
        logger.info(fold_progress(i, k, {s: len(d) for s, d in fold.splits.items()}))
        fold_dir = out_dir / "cv" / f"fold{i}"
        fold_args = copy.deepcopy(args.training)
        fold_args.output_dir = str(fold_dir)
        fitted = train_one(args.model, args.data, fold_args, fold, predict=("held_out",), extra=args.extra)
        oof[held] = fitted.logits["held_out"][0]
        fold_of[held] = i
        seconds += fitted.train_seconds
        logger.info(fold_progress(i, k, done_seconds=time.time() - t_start))
        if fitted.trainer.is_world_process_zero():  # keep the fold's weights (ensembles), not its checkpoints
            save_model_folder(merge_for_export(fitted.trainer.model).to(memory_format=torch.contiguous_format),
                              fitted.trainer.processing_class, fold_dir / "model")
            for ckpt in fold_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
        del fitted
    overlaps = fold_overlaps(train["patient_id"], fold_of)
    if overlaps:  # cannot happen with StratifiedGroupKFold; checked because every CV figure rests on it
        raise DataError(f"cross-validation folds share patients: {overlaps}")
    names = [Path(item.get("path") or "").name for item in train["image"]]
    return CVResult(k=k, oof_logits=oof, labels=np.asarray(train["label"]), fold=fold_of, names=names,
                    patients=list(train["patient_id"]), train_seconds=seconds)


def fold_progress(i: int, k: int, counts: dict | None = None, done_seconds: float | None = None) -> str:
    """The CV progress line of fold ``i`` (0-based) of ``k``: its film counts when it starts; when it
    is done, the time so far and an estimate of what is left (the mean fold time so far)."""
    if done_seconds is None:
        c = counts or {}
        return (f"CV fold {i + 1}/{k}: training on {c.get('train', 0):,} films, validation {c.get('validation', 0):,}, "
                f"scoring {c.get('held_out', 0):,} held-out films")
    left = done_seconds / (i + 1) * (k - i - 1)

    def t(sec):
        return f"{sec / 60:.1f} min" if sec >= 60 else f"{sec:.0f} s"

    return (f"CV fold {i + 1}/{k} done ({i + 1} of {k} folds, {t(done_seconds)} so far"
            + (f", about {t(left)} left)" if i + 1 < k else "); next: the model to ship, trained on all the data"))


def external_films(folder: str, id2label: dict, label_from_filename=None) -> tuple[list[Path], list[str]]:
    """(files, labels) of an external folder <LABEL>/<image>: the labels are the folder names, or with
    ``label_from_filename`` the file names by the training run's rules; every label must be one of the
    model's (checked before training: a bad folder writes nothing)."""
    from cxr.locate import image_files

    files = [f for f in image_files(folder) if f.parent.parent == Path(folder)]
    if label_from_filename:
        from cxr_train.labels import FilenameLabeler, LabelError

        try:
            names = FilenameLabeler.parse(label_from_filename).label_all([f.name for f in files],
                                                                         where=f"external_dataset {folder}")
        except LabelError as e:
            raise DataError(str(e)) from None
    else:
        names = [f.parent.name for f in files]
    unknown = sorted(set(names) - set(id2label.values()))
    if unknown or not files:
        raise DataError(f"external_dataset {folder}: expected <LABEL>/<image> with labels {list(id2label.values())}"
                        + (f", found {unknown} (labels outside the model's list)" if unknown else ", found no images"))
    return files, names


def score_external(folder: str, predictor, id2label: dict, label_from_filename=None, data=None) -> dict:
    """A folder of other patients' films (<LABEL>/<image>), scored once by the shipped model
    through the serving Predictor (its preprocessing, precision and decision rule). With
    ``label_from_filename`` the films' labels come from their names by the training run's rules."""
    from cxr.imaging import ImageLoadError, load_image

    label2id = {v: k for k, v in id2label.items()}
    files, names = external_films(folder, id2label, label_from_filename)
    logits = []
    for i in range(0, len(files), 32):
        try:
            images = [load_image(f) for f in files[i:i + 32]]
        except ImageLoadError as e:
            raise DataError(f"external_dataset {folder}: {e}") from None
        logits.append(predictor.logits(predictor.preprocess(images)))
    logits, labels = np.concatenate(logits), np.array([label2id[n] for n in names])
    op, positive_id = predictor.operating_point, predictor.positive_id
    if op.task != "binary":
        m = score_for_task(logits, labels, data, op, n_boot=1000)
        d = op.apply(logits, labels=id2label)
        m["per_image"] = [{"file": f.name, "label": n, "decision": id2label[int(k)],
                           "probabilities": {id2label[j]: round(float(p), 4) for j, p in enumerate(row)}}
                          for f, n, k, row in zip(files, names, d.label_ids, d.probabilities)]
        return m
    m = score_split(logits, labels, positive_id, op, n_boot=0)
    d = op.apply(logits, positive_id)     # the serving decision rule (cxr.operating_point)
    m["per_image"] = [{"file": f.name, "label": f.parent.name, "p_positive": round(float(p), 4),
                       "decision": id2label[int(k)]} for f, p, k in zip(files, d.probability, d.label_ids)]
    return m


def run(argv: list[str] | None = None) -> dict:
    """One training run, stage by stage; returns what the end-of-run summary shows."""
    args, env, push_to = parse_stage(argv)
    data = data_stage(args)
    out_dir = start_folder(args)
    cv = cross_validate(args, data.pool, out_dir) if data.pool is not None else None
    fitted = train_stage(args, data.data)
    op = operating_point_stage(args, env, data.data, fitted, cv)
    if not fitted.trainer.is_world_process_zero():  # under accelerate launch, one process scores and writes
        return {"output_dir": str(out_dir), "operating_point": op}
    model = export_stage(args, data.data, fitted, op, out_dir)
    metrics, cv_scores = score_stage(args, data.data, fitted, op, cv, model)
    figures = write_results(args, data.data, fitted, op, cv, metrics, cv_scores, out_dir)
    report = RunReport(args=args, env=env, data=data.data, fitted=fitted,
                       image_size=_image_size(fitted.trainer.processing_class), operating_point=op,
                       metrics=metrics, cv=cv_scores, figures=figures)
    ood = folder_stage(report, model, out_dir)
    push_stage(args, push_to, out_dir)
    return {"output_dir": str(out_dir), "metrics": metrics, "operating_point": op, "cv": cv_scores, "ood": ood,
            "train_seconds": fitted.train_seconds + (cv.train_seconds if cv is not None else 0.0),
            "pushed": push_to, "streamed": dict(data.data.counts) if data.data.streamed else None}


def parse_stage(argv: list[str] | None) -> tuple[RunArguments, RunEnvironment, str | None]:
    """Arguments (YAML defaults, command-line overrides), the Hub access and the output folder,
    all checked before any work; the run's environment captured once. Returns the Hub repo to push
    to at the end (None: no push; the Trainer itself never pushes)."""
    from transformers import set_seed

    args = parse_run_args(argv)
    if args.training.push_to_hub:  # token, network and write access checked before any work
        check_push_access(args.training.hub_model_id, token=args.training.hub_token)
    check_output_dir(Path(args.training.output_dir))
    external = args.data.external_dataset
    if external and not Path(external).is_dir():
        raise ConfigError(f"external_dataset folder not found: {external}")
    push_to = args.training.hub_model_id if args.training.push_to_hub else None
    args.training.push_to_hub = False      # our push, once the folder is complete
    set_seed(args.training.seed)
    env = RunEnvironment.capture(args)
    logger.info("precision: %s", env.precision_text)
    return args, env, push_to


def data_stage(args: RunArguments) -> RunData:
    """Splits grouped by patient, prepared and checked once, before anything is written: a wrong
    dataset, labels or film leaves no output folder. With --cv_folds the pool the folds are cut
    from comes from the same preparation (the shipped model's validation split as without CV)."""
    data_args, training_args, evaluation = args.data, args.training, args.evaluation
    cv_mode = bool(evaluation.cv_folds)
    pool = None
    if data_args.streaming:     # a first pass over labels + patients; films are read as they stream
        from cxr_train.streaming import prepare_streaming

        data = prepare_streaming(data_args, seed=training_args.seed, need_test=training_args.do_predict)
    else:
        if cv_mode:     # one preparation: the pool and the shipped model's splits
            pool, data = prepare_cv_data(data_args, seed=training_args.seed, need_test=training_args.do_predict)
        else:
            data = prepare_data(data_args, seed=training_args.seed, need_test=training_args.do_predict)
    if evaluation.threshold_policy == "shift_floor" and (data.task != "binary" or cv_mode):
        raise ConfigError("threshold_policy shift_floor is fitted on the validation split of a binary model: "
                          f"this run is {data.task}{' with --cv_folds' if cv_mode else ''}")
    if data_args.external_dataset and data.task == "multilabel":
        raise DataError("external_dataset is a <LABEL>/<image> folder, one label per film: a multi-label model is "
                        "scored on its dataset's own splits (--do_predict scores a test split)")
    logger.info("label set: %s, %d labels (%s)%s", data.task, len(data.id2label), ", ".join(data.id2label.values()),
                f"; uncertain labels: {data.uncertain_labels}" if data.uncertain_labels else "")
    if data_args.external_dataset:      # its labels are the model's: checked before anything is written
        external_films(data_args.external_dataset, data.id2label, data_args.label_from_filename)
    if data.streamed:   # disjoint by construction (or checked on the first pass); the first films decoded
        from cxr_train.streaming import check_stream_start

        check_stream_start(data.splits)
        streaming_steps(data, training_args)
    else:   # each prepared set of splits checked once; every film decoded (with --cv_folds the shipped
        # model's splits too: a dataset's own validation split, or films a sample cap kept, are not in the pool)
        for prepared in filter(None, (pool, data)):
            check_patient_disjoint(prepared.splits)
            check_images(prepared.splits)
    shown = pool or data
    logger.info("data%s: %s", " (streamed, counted by the first pass)" if data.streamed else "",
                {k: shown.size(k) for k in shown.splits})
    return RunData(data=data, pool=pool)


def start_folder(args: RunArguments) -> Path:
    """The output folder, with ``run_config.yaml`` (every setting; it can be passed back as --config)."""
    out_dir = Path(args.training.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output_dir '{out_dir.name}': {e.strerror or type(e).__name__}") from None
    (out_dir / "run_config.yaml").write_text(yaml.safe_dump(args.resolved(), sort_keys=True))
    return out_dir


def train_stage(args: RunArguments, data: PreparedData) -> Fitted:
    """The model to ship: trained on the training split, validation for early stopping; its logits
    on validation (and test with --do_predict)."""
    from transformers import set_seed

    logger.info("class weights: %s", [round(w, 3) for w in data.class_weights])
    predict = ("validation",) + (("test",) if args.training.do_predict else ())
    set_seed(args.training.seed)
    return train_one(args.model, args.data, args.training, data, predict, extra=args.extra)


def operating_point_stage(args: RunArguments, env: RunEnvironment, data: PreparedData, fitted: Fitted,
                          cv: CVResult | None) -> OperatingPoint:
    """Temperature and threshold by the run's policy: on the out-of-fold scores with CV, else on
    validation; recorded with the precision its scores were computed in (the Predictor's "auto"
    follows it); shift_floor then lowered to the simulated acquisition changes' floor."""
    evaluation = args.evaluation
    if cv is not None:
        logits, labels = cv.oof_logits, cv.labels
        fitted_on = f"out-of-fold scores ({cv.k} folds, {len(cv.labels):,} images)"
    else:
        (logits, labels), fitted_on = fitted.logits["validation"], "the validation split"
    op = fit_for_task(data, logits, labels, policy=evaluation.threshold_policy,
                      min_sensitivity=evaluation.min_sensitivity, fitted_on=fitted_on)
    op = replace(op, scored_in=env.precision)
    if evaluation.threshold_policy == "shift_floor":   # issue #25: the threshold chosen under simulated shift
        from cxr_train.shift_policy import fit_shift_floor

        op = fit_shift_floor(fitted.trainer.model, fitted.trainer.processing_class, data.splits["validation"], op,
                             data.positive_id, evaluation.min_sensitivity)
    logger.info("operating point: %s", op.describe())
    return op


def export_stage(args: RunArguments, data: PreparedData, fitted: Fitted, op: OperatingPoint, out_dir: Path):
    """The model as it ships: LoRA adapter saved beside it, merged weights, contiguous, with the
    operating point in its config (checked against its labels and problem_type)."""
    model = fitted.trainer.model
    if args.model.strategy == "lora":
        model.save_pretrained(out_dir / "adapter", safe_serialization=True)
    model = merge_for_export(model).to(memory_format=torch.contiguous_format)
    try:   # the operating point fits the labels and problem_type it is saved with (docs/label_sets.md)
        op.validate(data.id2label, model.config.problem_type)
    except ValueError as e:
        raise DataError(f"the fitted operating point does not fit the model: {e}") from None
    setattr(model.config, CONFIG_KEY, op.to_config())
    return model


def score_stage(args: RunArguments, data: PreparedData, fitted: Fitted, op: OperatingPoint, cv: CVResult | None,
                model) -> tuple[dict[str, dict], CVScores | None]:
    """Every scored split at the operating point: validation and test from the shipped model's logits,
    the external folder through the serving Predictor on the exported model, CV's out-of-fold scores."""
    seed, metrics = args.training.seed, {}
    if args.training.do_eval:
        metrics["validation"] = score_for_task(*fitted.logits["validation"], data, op, seed=seed)
    if args.training.do_predict:
        metrics["test"] = score_for_task(*fitted.logits["test"], data, op, seed=seed)
    if args.data.external_dataset:  # the shipped weights, through the serving Predictor
        from cxr.inference import Predictor

        predictor = Predictor(model, fitted.trainer.processing_class, name=Path(args.training.output_dir).name)
        metrics["external"] = score_external(args.data.external_dataset, predictor, data.id2label,
                                             label_from_filename=args.data.label_from_filename, data=data)
        model.to(memory_format=torch.contiguous_format)    # the Predictor runs a CNN channels_last
    cv_scores = cv.score(op, data.positive_id, seed, id2label=data.id2label) if cv is not None else None
    return metrics, cv_scores


def write_results(args: RunArguments, data: PreparedData, fitted: Fitted, op: OperatingPoint, cv: CVResult | None,
                  metrics: dict[str, dict], cv_scores: CVScores | None, out_dir: Path) -> dict[str, str]:
    """The result files (``*_results.json``, per-image scores, CV) and the card's figures; returns
    the figures' files."""
    trainer = fitted.trainer
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split in metrics:
            trainer.save_metrics(prefix, prefixed(metrics[split], prefix), combined=False)
            _write_json(out_dir / f"{prefix}_scores.json", _scores(*fitted.logits[split], data, op))
    if cv_scores is not None:
        _write_json(out_dir / "cv_results.json", cv_scores.to_json())
        _write_json(out_dir / "oof_scores.json", cv.oof_json(op, data.positive_id, id2label=data.id2label))
    if "external" in metrics:
        _write_json(out_dir / "external_results.json", metrics["external"])
    if not args.training.do_eval:
        return {}
    return _figures(out_dir, *fitted.logits["validation"], data, op, cv)


def folder_stage(report: RunReport, model, out_dir: Path) -> dict | None:
    """The model folder: weights and processor, config.json with the serving contract
    (``cxr_operating_point``, ``cxr_training``), the model card, the OOD statistics."""
    facts = card_facts(report)
    model.config.cxr_training = serving_facts(
        strategy=facts.strategy, base_model=facts.base_model or facts.base_model_text, dataset=facts.dataset_id,
        image_size=facts.image_size, metrics=facts.metrics, cv=facts.cv)
    processor = report.fitted.trainer.processing_class
    save_model_folder(model, processor, out_dir)
    render_model_card(facts).save(out_dir / "README.md")
    ood = fit_ood_statistics(model, processor, report.data, report.args, out_dir)
    logger.info("model folder ready: %s", out_dir)
    return ood


def push_stage(args: RunArguments, push_to: str | None, out_dir: Path) -> None:
    """The finished folder to the Hub (the local folder is complete whatever happens here)."""
    if push_to:
        url = push_folder(out_dir, push_to, private=args.export.hub_private, token=args.training.hub_token)
        logger.info("pushed: %s", url)


def _image_size(processor) -> int:
    from cxr_train.data import processor_size

    return processor_size(processor)[0]


def streaming_steps(data: PreparedData, training_args) -> None:
    """A stream has no length: the Trainer needs max_steps. Unless given, num_train_epochs passes
    over the training films the first pass counted."""
    if training_args.max_steps > 0:
        return
    import math

    per_step = (training_args.per_device_train_batch_size * max(1, training_args.world_size)
                * max(1, training_args.gradient_accumulation_steps))
    per_epoch = math.ceil(data.size("train") / per_step)
    training_args.max_steps = max(1, math.ceil(training_args.num_train_epochs * per_epoch))
    logger.info("streaming: max_steps %d (%s epochs of %s training films, %d steps each)", training_args.max_steps,
                f"{training_args.num_train_epochs:g}", f"{data.size('train'):,}", per_epoch)


def check_output_dir(out_dir: Path) -> None:
    """The output folder can be created (or is a folder) - checked without creating it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output_dir '{out_dir.name}' exists and is not a folder")
    parent = next((p for p in [out_dir, *out_dir.absolute().parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create output_dir '{out_dir.name}': {parent or out_dir} is not a writable folder")


def fit_ood_statistics(model, processor, data: PreparedData, args: RunArguments, out_dir: Path) -> dict | None:
    """``ood.safetensors`` (+ ``ood_fit.json``) in the model folder: the out-of-distribution score
    fitted on the model's own training films, its threshold on its validation films and the
    reference non-X-ray images (cxr_train.ood_fit). None when --ood_fit false."""
    export, training_args = args.export, args.training
    if not export.ood_fit:
        logger.info("OOD statistics skipped (--ood_fit false): the folder serves without the OOD check")
        return None
    from cxr_train.ood_fit import fit_for_run, save_fit

    t0 = time.time()
    model = model.to("cpu").eval()    # the exported model; features in fp32, as the Predictor's OOD tap
    if data.streamed:   # a bounded sample: the first films of the shuffled training stream, of the validation stream
        from cxr_train.streaming import sample_stream

        logger.info("streaming: reading at most %d training and %d validation films for the OOD fit ...",
                    export.ood_max_train, export.ood_max_train)
        train_images, groups = sample_stream(data.splits["train"], export.ood_max_train)
        val_images, _ = sample_stream(data.splits["validation"], export.ood_max_train)
        validation = (f"the first {len(val_images):,} films of the run's own validation stream")
    else:
        train = data.splits["train"].with_format(None)          # the undecoded films, without the training transform
        val = data.splits["validation"].with_format(None)
        train_images, groups, val_images = train["image"], data.ood_groups(), val["image"]
        validation = "the run's own validation split"
    logger.info("fitting the OOD statistics on %s training films (at most %d) ...", f"{len(train_images):,}",
                export.ood_max_train)
    try:
        scorer = fit_for_run(model, processor, train_images, groups, val_images,
                             max_train=export.ood_max_train, seed=training_args.seed,
                             progress=not training_args.disable_tqdm, data=Path(str(args.data.dataset_name)).name,
                             validation=validation)
    except ValueError as e:   # e.g. too few films: the folder is complete and serves without the check
        logger.warning("OOD statistics not written: %s", e)
        return {"error": str(e)}
    path = save_fit(scorer, out_dir)
    facts = {"file": path.name, "threshold": float(scorer.threshold), "seconds": round(time.time() - t0, 1),
             **scorer.facts}
    logger.info("OOD statistics: %s (threshold %.2f; %.1f%% of validation films flagged), %.0f s", path.name,
                scorer.threshold, 100 * scorer.facts["val_flagged"], facts["seconds"])
    return facts


def render_summary(result: dict) -> str:
    """The end-of-run summary: where the folder is, what it scored, what to run next."""
    folder = Path(result["output_dir"]).resolve()
    op, metrics, cv, ood = result["operating_point"], result["metrics"], result.get("cv"), result.get("ood")

    def line(title, m):
        def f(key):
            v = m.get(key)
            return "n/a" if v is None else f"{v:.3f}"
        if op.task != "binary":
            per = ", ".join(f"{name} {'n/a' if c.get('roc_auc') is None else format(c['roc_auc'], '.3f')}"
                            for name, c in (m.get("per_class") or {}).items())
            return (f"  {title} ({m.get('n_samples', '?')} films): macro AUROC {f('roc_auc')}, "
                    + ("accuracy" if op.task == "multiclass" else "per-label accuracy") + f" {f('accuracy')}, "
                    f"macro sensitivity {f('macro_sensitivity')}, macro specificity {f('macro_specificity')}"
                    + (f"\n    AUROC per class (one-vs-rest): {per}" if per else "")
                    + "".join(f"\n    {k} among their own films: AUROC "
                              f"{'n/a' if p.get('roc_auc') is None else format(p['roc_auc'], '.3f')}, accuracy "
                              f"{'n/a' if p.get('accuracy') is None else format(p['accuracy'], '.3f')}"
                              for k, p in (m.get("pairwise") or {}).items()))
        return (f"  {title} ({m.get('n_samples', '?')} films): AUROC {f('roc_auc')}, sensitivity {f('sensitivity')}, "
                f"specificity {f('specificity')}, accuracy {f('accuracy')}")

    rows = ["", "=" * 78, f"cxr-train: done. Model folder: {folder}",
            f"  operating point: {op.describe()}"]
    if "validation" in metrics:
        rows.append(line("validation" + ("" if cv is not None else ", where the operating point was fitted"),
                         metrics["validation"]))
    if cv is not None:
        auc = cv.summary.get("roc_auc")
        if auc:
            rows.append(f"  {cv.k}-fold cross-validation (operating point fitted on its out-of-fold scores): "
                        f"AUROC {auc['mean']:.3f} ± {auc['sd']:.3f} (mean ± sd over folds)")
    if "external" in metrics:
        rows.append(line("hold-out / external, scored once", metrics["external"]))
    if "test" in metrics:
        rows.append(line("test split", metrics["test"]))
    if not metrics:
        rows.append("  no split was scored (--do_eval false)")
    if result.get("streamed"):
        c = result["streamed"]
        rows.append(f"  streamed: {c['train']:,} training and {c['validation']:,} validation films (counted by the "
                    "first pass; decoded as they streamed, nothing cached)")
    seconds = result.get("train_seconds", 0.0)
    rows.append(f"  training time: {seconds / 60:.1f} min" if seconds >= 60 else f"  training time: {seconds:.0f} s")
    if ood and "error" not in ood:
        rows.append(f"  OOD statistics: ood.safetensors written (threshold {ood['threshold']:.2f}, "
                    f"{100 * ood['val_flagged']:.1f}% of validation films flagged, "
                    f"{100 * ood['held_out_non_xray_flagged']:.0f}% of held-out non-X-rays)")
    else:
        rows.append(f"  OOD statistics: not written ({ood['error'] if ood else '--ood_fit false'}); the Predictor "
                    "and the Space serve it without the OOD check (python -m cxr_train.ood_fit fit adds it)")
    if result.get("pushed"):
        rows.append(f"  pushed to the Hub: {result['pushed']}")
    rows += ["Next:",
             f"  cxr-predict --model {folder} film.jpeg          # one JSON line per film",
             f"  cxr-app --model {folder}                        # the Gradio demo on this model",
             f"  cxr-push --folder {folder} --repo_id USER/NAME  # publish it on the Hub",
             "=" * 78]
    return "\n".join(rows)


def _scores(logits, labels, data, op) -> dict:
    """Per-image calibrated positive-class scores (for ROC curves and re-analysis); for more than
    two classes every class's calibrated probability, and the labels (class ids, or multi-label
    codes 1 / 0 / -1 uncertain)."""
    if op.task != "binary":
        names = [data.id2label[i] for i in range(len(data.id2label))]
        return {"task": op.task, "labels_names": names, "labels": np.asarray(labels).tolist(),
                "probabilities": np.round(op.probabilities(logits), 6).tolist(),
                "threshold": op.threshold if op.task == "multiclass" else None,
                "thresholds": op.thresholds, "normal_label": op.normal_label}
    positive_id = data.positive_id
    return {"labels": binary_labels(labels, positive_id).tolist(),
            "scores": [round(float(x), 6) for x in op.probabilities(logits)[:, positive_id]],
            "threshold": op.threshold}


def _figures(out_dir: Path, logits, labels, data, op, cv: CVResult | None) -> dict:
    """ROC (validation, and out-of-fold with CV) and the reliability diagram, for the model card;
    for more than two classes: one-vs-rest ROC per class (and the confusion matrix, multi-class)."""
    from cxr_train.plots import render_calibration, render_roc
    from cxr_train.training import positive_scores

    if op.task != "binary":
        from cxr_train.plots import render_label_set_figures

        return render_label_set_figures(out_dir, logits, labels, data.id2label, op)
    positive_id = data.positive_id
    y = binary_labels(labels, positive_id)
    if len(set(y.tolist())) < 2:
        return {}
    cal = op.probabilities(logits)[:, positive_id]
    curves = {"validation": (y, cal)}
    if cv is not None:
        curves[f"out-of-fold ({cv.k} folds)"] = (binary_labels(cv.labels, positive_id),
                                                 op.probabilities(cv.oof_logits)[:, positive_id])
    render_roc(curves, out_dir / "roc_validation.png")
    render_calibration(y, positive_scores(logits, positive_id), cal, out_dir / "calibration_validation.png")
    return {"roc": "roc_validation.png", "calibration": "calibration_validation.png"}


def run_and_summarise(argv: list[str] | None = None) -> str | None:
    """One run and its end-of-run summary; None on a process that did not write the folder."""
    result = run(argv)
    return render_summary(result) if "train_seconds" in result else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return answer(lambda: run_and_summarise(argv), *USER_ERRORS)   # a user error: one line, no traceback


if __name__ == "__main__":
    sys.exit(main())
