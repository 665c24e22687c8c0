#!/usr/bin/env python
"""Fine-tune (or train from scratch) a chest X-ray classifier with the Hugging Face Trainer,
evaluate it with clinical metrics, and write a Hub-ready model folder.

    python train_hf.py --config hub_configs/cxr-resnet-small-scratch.yaml [--field value ...]

Research and education only: not a medical device.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

from cxr.checkpointing import resolve_resume
from cxr.config import ConfigError, parse_args, resolved_config
from cxr.data import DataError, ImageTransform, check_images, check_patient_disjoint, prepare_data, processor_size
from cxr.hub import KERMANY_NOTE, PushError, push_folder, render_model_card
from cxr.modeling import (
    ModelError, apply_strategy, build_model, count_parameters, is_cnn, is_preset, merge_for_export,
    save_model_folder,
)
from cxr.training import (
    WeightedCrossEntropy, build_compute_metrics, fit_operating_point, score_split,
)

logger = logging.getLogger("train_hf")
USER_ERRORS = (ConfigError, DataError, ModelError, PushError)


def _predict(trainer, dataset):
    out = trainer.predict(dataset, metric_key_prefix="predict")
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return logits, out.label_ids


def _scores(logits, labels, positive_id: int, op: dict) -> dict:
    """Per-image calibrated positive-class scores (for ROC curves and re-analysis)."""
    from cxr.training import binary_labels, positive_scores

    return {"labels": binary_labels(labels, positive_id).tolist(),
            "scores": [round(float(x), 6) for x in positive_scores(logits, positive_id, op["temperature"])],
            "threshold": op["threshold"]}


def _figures(out_dir: Path, logits, labels, positive_id: int, op: dict) -> dict:
    """ROC and reliability diagrams of the validation split, for the model card."""
    from cxr.plots import render_calibration, render_roc
    from cxr.training import binary_labels, positive_scores

    y = binary_labels(labels, positive_id)
    if len(set(y.tolist())) < 2:
        return {}
    cal = positive_scores(logits, positive_id, op["temperature"])
    render_roc({"validation": (y, cal)}, out_dir / "roc_validation.png")
    render_calibration(y, positive_scores(logits, positive_id), cal, out_dir / "calibration_validation.png")
    return {"roc": "roc_validation.png", "calibration": "calibration_validation.png"}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def run(argv: list[str] | None = None) -> dict:
    from transformers import EarlyStoppingCallback, Trainer, set_seed

    # 1. Arguments: YAML defaults, command-line overrides, checked before any work.
    model_args, data_args, training_args = parse_args(argv)
    out_dir = Path(training_args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output_dir '{out_dir.name}' exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output_dir '{out_dir.name}': {e.strerror or type(e).__name__}") from None
    config = resolved_config(model_args, data_args, training_args)
    (out_dir / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    set_seed(training_args.seed)
    logger.info("precision: %s", "bf16 autocast" if training_args.bf16 else "fp32")

    # 2. Data: splits grouped by patient, every image decoded once up front.
    data = prepare_data(data_args, seed=training_args.seed, need_test=training_args.do_predict)
    if len(data.id2label) != 2:
        raise DataError(f"clinical metrics need a binary task; the data has {len(data.id2label)} labels "
                        f"({', '.join(data.id2label.values())})")
    check_patient_disjoint(data.splits)
    check_images(data.splits)
    logger.info("data: %s", {k: len(v) for k, v in data.splits.items()})
    logger.info("class weights: %s", [round(w, 3) for w in data.class_weights])

    # 3. Model: checkpoint or preset, fresh head, strategy.
    model, processor = build_model(model_args.model_name_or_path, data.id2label, model_args.image_size,
                                   model_args.model_revision, reinit_head=model_args.reinit_head)
    model = apply_strategy(model, model_args.strategy, partial_stages=model_args.partial_stages,
                           lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                           lora_dropout=model_args.lora_dropout,
                           lora_target_modules_=model_args.lora_target_modules)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%), strategy %s", f"{trainable:,}", f"{total:,}",
                100 * trainable / total, model_args.strategy)
    channels_last = model_args.channels_last and is_cnn(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    data.splits["train"].set_transform(ImageTransform(processor, augment=data_args.augment))
    for split in ("validation", "test"):
        if split in data.splits:
            data.splits[split].set_transform(ImageTransform(processor, augment=False))

    # 4. Trainer. (The Hub push is ours, at the end, once the folder is complete.)
    push, training_args.push_to_hub = training_args.push_to_hub, False
    callbacks = []
    if data_args.early_stopping_patience and training_args.eval_strategy != "no" and training_args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))
    trainer = Trainer(
        model=model, args=training_args,
        train_dataset=data.splits["train"], eval_dataset=data.splits["validation"],
        processing_class=processor,
        compute_loss_func=WeightedCrossEntropy(data.class_weights),
        compute_metrics=build_compute_metrics(data.positive_id),
        callbacks=callbacks,
    )

    # 5. Train (resumable).
    train_seconds = 0.0
    if training_args.do_train:
        try:  # the newest COMPLETE checkpoint; partial ones (killed mid-save) are removed
            resume = resolve_resume(training_args.resume_from_checkpoint, out_dir,
                                    model_only=training_args.save_only_model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        t0 = time.time()
        result = trainer.train(resume_from_checkpoint=resume)
        train_seconds = time.time() - t0
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()

    # 6. Evaluate: operating point + temperature chosen on validation only.
    metrics: dict[str, dict] = {}
    val_logits, val_labels = _predict(trainer, data.splits["validation"])
    op = fit_operating_point(val_logits, val_labels, data.positive_id, data.id2label)
    if training_args.do_eval:
        metrics["eval"] = score_split(val_logits, val_labels, data.positive_id, "eval",
                                      threshold=op["threshold"], temperature=op["temperature"],
                                      seed=training_args.seed)
        trainer.save_metrics("eval", metrics["eval"], combined=False)
        _write_json(out_dir / "eval_scores.json", _scores(val_logits, val_labels, data.positive_id, op))
    if training_args.do_predict:
        test_logits, test_labels = _predict(trainer, data.splits["test"])
        metrics["test"] = score_split(test_logits, test_labels, data.positive_id, "test",
                                      threshold=op["threshold"], temperature=op["temperature"],
                                      seed=training_args.seed)
        trainer.save_metrics("test", metrics["test"], combined=False)
        _write_json(out_dir / "test_scores.json", _scores(test_logits, test_labels, data.positive_id, op))

    # 7. Export: merged weights (safetensors), processor, adapter beside them, card.
    if not trainer.is_world_process_zero():  # under accelerate launch, one process writes
        return {"output_dir": str(out_dir), "metrics": metrics, "operating_point": op}
    model = trainer.model
    if model_args.strategy == "lora":
        model.save_pretrained(out_dir / "adapter", safe_serialization=True)
    model = merge_for_export(model).to(memory_format=torch.contiguous_format)
    model.config.cxr_operating_point = op
    model.config.cxr_training = {"strategy": model_args.strategy, "base_model": model_args.model_name_or_path,
                                 "dataset": data_args.dataset_name, "image_size": processor_size(processor)[0]}
    if "eval" in metrics:
        model.config.cxr_training["validation_metrics"] = {
            k: None if metrics["eval"][f"eval_{k}"] is None else round(float(metrics["eval"][f"eval_{k}"]), 4)
            for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}
    save_model_folder(model, processor, out_dir)
    figures = _figures(out_dir, val_logits, val_labels, data.positive_id, op) if training_args.do_eval else {}
    info = _card_info(argv, model_args, data_args, training_args, data, metrics, op,
                      trainable, total, train_seconds, trainer)
    info["figures"] = figures
    render_model_card(info).save(out_dir / "README.md")
    logger.info("model folder ready: %s", out_dir)

    # 8. Push (the local folder is complete whatever happens here).
    if push:
        url = push_folder(out_dir, training_args.hub_model_id, private=data_args.hub_private,
                          token=training_args.hub_token)
        logger.info("pushed: %s", url)
    return {"output_dir": str(out_dir), "metrics": metrics, "operating_point": op}


def _card_info(argv, model_args, data_args, training_args, data, metrics, op, trainable, total,
               train_seconds, trainer) -> dict:
    import platform

    preset = is_preset(model_args.model_name_or_path)
    dataset_id = data_args.dataset_name
    is_kermany = "chest_xray" in dataset_id.lower() or "kermany" in dataset_id.lower()
    strategy_text = {
        "frozen": "frozen backbone, classification head trained",
        "partial": f"last {model_args.partial_stages} backbone stage(s) and the head fine-tuned",
        "full": "all weights trained" + (" from random initialisation" if preset else ", fine-tuned"),
        "lora": f"LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}) merged into the base weights",
    }[model_args.strategy]
    args_str = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return {
        "model_name": training_args.hub_model_id or Path(training_args.output_dir).name,
        "repo_id": training_args.hub_model_id or training_args.output_dir,
        "dataset_id": Path(dataset_id).name if Path(dataset_id).exists() else dataset_id,
        "dataset_name": "Kermany 2018 paediatric chest X-ray" if is_kermany else Path(dataset_id).name,
        "dataset": dataset_id if not Path(dataset_id).exists() else Path(dataset_id).name,
        "dataset_note": KERMANY_NOTE if is_kermany else "",
        "base_model": None if preset else model_args.model_name_or_path,
        "base_model_text": f"none: {model_args.model_name_or_path} preset, random init" if preset
                           else model_args.model_name_or_path,
        "labels": list(data.id2label.values()), "positive_label": data.id2label[data.positive_id],
        "strategy": model_args.strategy, "strategy_text": strategy_text,
        "trainable_text": f"{trainable:,} of {total:,} ({100 * trainable / total:.1f}%)",
        "n_train": len(data.splits["train"]), "n_validation": len(data.splits["validation"]),
        "validation_text": ("carved out of the training split, stratified and grouped by patient "
                            f"({data_args.validation_fraction:.0%} of patients, seed {training_args.seed})")
                           if not data_args.validation_split else f"the dataset's '{data_args.validation_split}' split",
        "image_size": processor_size(trainer.processing_class)[0],
        "epochs": round(trainer.state.epoch or 0, 2), "steps": trainer.state.global_step,
        "batch_size": training_args.per_device_train_batch_size * max(1, training_args.world_size),
        "learning_rate": training_args.learning_rate,
        "class_weights": [round(w, 3) for w in data.class_weights],
        "precision": "bf16 autocast" if training_args.bf16 else "fp32",
        "augmentation": "random resized crop (75–100%), rotation ±10°, shift 5%, brightness/contrast ±20%; no flips"
                        if data_args.augment else "none",
        "train_time": f"{train_seconds / 60:.1f} min", "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()})"
                      if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "command": f"python train_hf.py {args_str}".strip(),
        "metrics": metrics, "operating_point": op,
        "operating_point_text": (f"threshold {op['threshold']:.4f} ({op['source']}); temperature "
                                 f"{op['temperature']:.3f}; high-sensitivity threshold (sensitivity ≥ "
                                 f"{op.get('min_sensitivity', 0.95):.0%}) "
                                 + (f"{op['high_sensitivity_threshold']:.4f}" if "high_sensitivity_threshold" in op
                                    else "n/a")),
        "extra_sections": "", "is_kermany": is_kermany,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        run(argv)
    except USER_ERRORS as e:
        logger.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
