#!/usr/bin/env python
"""Training throughput (images/s): the real Trainer path vs a plain PyTorch loop.

What is measured, all with the same model, batch size, image size, precision and data:

1. **data loader only**: the training split with ``cxr_train.data.ImageTransform(processor,
   augment=True)`` (decode + augmentation + image processor) through a ``torch`` DataLoader
   (``num_workers=0``, the project's default), no model.
2. **plain loop, model only**: forward + weighted cross-entropy + backward + grad clipping +
   AdamW on one fixed pre-made batch (random tensor, channels_last for CNNs), under
   ``torch.autocast("cpu", bfloat16)`` when bf16 is in use: the compute ceiling.
3. **plain loop, data + model**: the same step fed by the DataLoader of (1).
4. **Trainer**: ``train_hf.main([...])``, the real command-line path, with evaluation and
   checkpointing off. Its own ``train_samples_per_second`` (train_results.json) includes the
   first, slow steps, so a *steady-state* rate is also computed by running it twice, with N and
   2N steps, and dividing the N extra steps by the extra time:
   ``N * batch / (t(2N) - t(N))``. ``t`` is the Trainer's ``train_runtime`` (the time inside
   ``trainer.train()``, the primary figure) and, as a cross-check, the wall time around
   ``main()`` (which also contains data preparation, model build, validation prediction and
   export: the same in both runs, so it cancels out, but adds noise). One untimed warm-up run
   comes first (imports, dataset cache).

``--recipe hub_configs/<name>.yaml`` times a shipped recipe instead (model, image size, strategy, data
path, augmentation, optimiser settings from the YAML; only the run length, evaluation, output and
data folder are the benchmark's). With the recipe's film store (``data_cache: memmap``) both paths take
the same data path: ``cxr_train.batches.build_inputs`` (uint8 batches from the store, the acquisition
corruptions on the CPU per film, augmentation + normalisation as the model's forward pre-hook), and
"data loader only" is then store read + acquisition corruptions + collation.

The plain loop is built from the very same parsed arguments (``cxr_train.config.parse_args``),
data (``prepare_data``, the same train subset), model (``build_model``), loss
(``WeightedCrossEntropy``), precision, channels_last choice, optimizer (fused AdamW when the
Trainer's ``optim`` is ``adamw_torch_fused``) and gradient clipping (``max_grad_norm``) as the
Trainer run. The ratio Trainer-steady / plain-loop shows the Trainer's overhead (goal >= 0.9).

Timing: one untimed warm-up round of each plain kind and one untimed Trainer run, then
``--repeats`` rounds, interleaved so that every path sees the same drift in machine load: data
loader (``--plain-steps`` batches), model only and data + model (``--plain-steps`` steps
each), Trainer N, Trainer 2N. Each figure is the median over the rounds. Run on a quiet
machine: other processes make every figure lower and noisier.

    python -m benchmarks.train_throughput [--quick] [--data DIR] [--model PRESET_OR_DIR | --recipe YAML] [--out JSON]
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common  # run from the repository root: python -m benchmarks.<name>
from cxr.precision import PRECISIONS

NAME = "train_throughput"


def parse(argv=None):
    ap = common.base_parser(__doc__, NAME)
    ap.add_argument("--model", default=common.DEFAULT_PRESET,
                    help="preset name or model folder (train_hf --model_name_or_path); default %(default)s")
    ap.add_argument("--recipe", default=None,
                    help="a hub_configs/*.yaml recipe to time (its model, size, data path, augmentation, optimiser); "
                         "overrides --model / --image-size")
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--steps", type=int, default=None,
                    help="N: the Trainer runs N and 2N steps (default 20; --quick 2)")
    ap.add_argument("--plain-steps", type=int, default=None, help="steps per timed plain round (default 10; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds / Trainer run pairs (default 5; quick 1)")
    ap.add_argument("--train-samples", type=int, default=None,
                    help="training images used (train_hf --max_train_samples; default 2048; quick 128)")
    args = ap.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (2 if q else 20)
    args.plain_steps = args.plain_steps or (2 if q else 10)
    args.repeats = args.repeats or (1 if q else 5)
    args.train_samples = args.train_samples or (128 if q else 2048)
    args.recipe_file = None
    if args.recipe:
        args.recipe_file = recipe_yaml(Path(args.recipe))
        import yaml

        rec = yaml.safe_load(args.recipe_file.read_text())
        args.model, args.image_size = rec["model_name_or_path"], int(rec.get("image_size") or args.image_size)
    return args


# Keys of a recipe that are not about the training step itself: the benchmark sets its own.
RECIPE_DROP = ("dataset_name", "output_dir", "external_dataset", "num_train_epochs", "cv_folds", "hub_model_id",
               "push_to_hub", "threshold_policy", "min_sensitivity", "per_device_train_batch_size")


def recipe_yaml(path: Path) -> Path:
    """The recipe without its run-control keys, in a temporary YAML for ``--config``."""
    import yaml

    if not path.is_file():
        raise SystemExit(f"error: --recipe file not found: {path}")
    rec = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k not in RECIPE_DROP}
    out = common.temp_dir("recipe") / path.name
    out.write_text(yaml.safe_dump(rec))
    return out


def trainer_argv(args, data_dir: Path, out_dir: Path, steps: int) -> list[str]:
    """The train_hf.py command line: evaluation, checkpoints and best-model reload off."""
    head = (["--config", str(args.recipe_file), "--ood_fit", "false"] if args.recipe_file else
            ["--model_name_or_path", str(args.model), "--image_size", str(args.image_size), "--precision", args.precision])
    return head + [
            "--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "False", "--do_eval", "False",
            "--per_device_train_batch_size", str(args.batch_size), "--dataset_name", str(data_dir),
            "--output_dir", str(out_dir), "--disable_tqdm", "True",
            "--max_train_samples", str(args.train_samples), "--max_eval_samples", "32"]


# ---------------------------------------------------------------- Trainer path

def run_trainer(args, data_dir: Path, steps: int) -> dict:
    """One ``train_hf.main`` run; returns its wall time and the Trainer's own figures."""
    import train_hf

    out = common.temp_dir("trainer")
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):   # the Trainer's per-step log dicts
        rc = train_hf.main(trainer_argv(args, data_dir, out, steps))
    wall = time.perf_counter() - t0
    if rc != 0:
        print(log.getvalue())
        raise SystemExit(f"error: train_hf.main exited with {rc}")
    res = json.loads((out / "train_results.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": steps, "wall_s": round(wall, 4), "train_runtime_s": res["train_runtime"],
            "train_samples_per_second": res["train_samples_per_second"]}


# ---------------------------------------------------------------- plain loop

class Cycle:
    """Endless iteration over a DataLoader (a new shuffled epoch when one ends)."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(loader)

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


class PlainLoop:
    """The Trainer's training step written out by hand, plus its data pipeline.

    Each ``*_round()`` runs ``steps`` steps (or batches) and returns (images, seconds)."""

    def __init__(self, args, data_dir: Path):
        import torch
        from torch.utils.data import DataLoader
        from transformers import default_data_collator

        from cxr_train.config import parse_args
        from cxr_train.data import ImageTransform, prepare_data
        from cxr.architecture import CNN, family
        from cxr_train.modeling import apply_strategy, build_model
        from cxr_train.training import WeightedCrossEntropy

        self.torch, self.steps, b = torch, args.plain_steps, args.batch_size
        # The same parsed arguments, data, model and loss as the Trainer run.
        model_args, data_args, targs = parse_args(trainer_argv(args, data_dir, common.temp_dir("plain"), args.steps))
        data = prepare_data(data_args, seed=targs.seed)
        train = data.splits["train"]
        torch.manual_seed(targs.seed)
        model, processor = build_model(model_args.model_name_or_path, data.id2label, model_args.image_size,
                                       model_args.model_revision)
        model = apply_strategy(model, model_args.strategy, partial_stages=model_args.partial_stages)
        self.channels_last = bool(model_args.channels_last and family(model) == CNN)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.train()
        self.bf16 = bool(targs.bf16)
        self.max_grad_norm = targs.max_grad_norm
        self.loss_fn = WeightedCrossEntropy(data.class_weights)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fused = "fused" in str(getattr(targs.optim, "value", targs.optim))
        self.opt = torch.optim.AdamW(self.params, lr=targs.learning_rate, betas=(targs.adam_beta1, targs.adam_beta2),
                                     eps=targs.adam_epsilon, weight_decay=targs.weight_decay,
                                     fused=self.fused or None)
        self.data_path = getattr(data_args, "data_cache", "none") or "none"
        if self.data_path == "none":
            train.set_transform(ImageTransform(processor, augment=data_args.augment))
            collate = default_data_collator
        else:   # the Trainer's own data path: film store, CPU corruptions, on-device augment hook
            from cxr_train.batches import build_inputs

            data, collate = build_inputs(model, processor, data, data_args, targs.dataloader_num_workers)
            train = data.splits["train"]
        loader = DataLoader(train, batch_size=b, shuffle=True, num_workers=targs.dataloader_num_workers,
                            collate_fn=collate, drop_last=len(train) >= b)
        self.batches = Cycle(loader)
        self.n_train = len(train)
        self.x_fixed = torch.randn(b, 3, args.image_size, args.image_size)
        self.y_fixed = torch.randint(0, len(data.id2label), (b,))

    def step(self, x, y) -> None:
        torch = self.torch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(pixel_values=x, labels=y)   # the Trainer passes labels too
            loss = self.loss_fn(out, y)
        loss.backward()
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _timed(self, one_step) -> tuple[int, float]:
        images, t0 = 0, time.perf_counter()
        for _ in range(self.steps):
            images += one_step()
        return images, time.perf_counter() - t0

    def data_round(self):
        return self._timed(lambda: len(next(self.batches)["labels"]))

    def model_round(self):
        def one():
            self.step(self.x_fixed, self.y_fixed)
            return len(self.y_fixed)
        return self._timed(one)

    def loop_round(self):
        def one():
            batch = next(self.batches)
            self.step(batch["pixel_values"], batch["labels"])
            return len(batch["labels"])
        return self._timed(one)


# ---------------------------------------------------------------- measurement

def median_rate(samples: list[tuple[int, float]]):
    """Median over rounds of images / seconds (None if no round could be timed)."""
    rates = [r for r in (common.rate(n, t) for n, t in samples) if r is not None]
    return statistics.median(rates) if rates else None


def measure_all(args, data_dir: Path) -> dict:
    """Warm-up (one round of each plain kind, one Trainer run), then ``repeats`` interleaved
    rounds: data loader, plain model only, plain loop, Trainer N steps, Trainer 2N steps. The
    interleaving exposes every path to the same drift in machine load."""
    plain = PlainLoop(args, data_dir)
    n, b = args.steps, args.batch_size
    warm = 1 if args.quick else n
    print(f"plain loop: {plain.n_train} training images, batch {b}, {args.image_size} px, "
          f"{'bf16 autocast' if plain.bf16 else 'fp32'}, channels_last={plain.channels_last}, "
          f"fused AdamW={plain.fused}\nwarm-up: one round of each + a {warm}-step Trainer run; then {args.repeats} "
          f"x (data {plain.steps} batches, model {plain.steps} steps, loop {plain.steps} steps, "
          f"Trainer {n} + {2 * n} steps) ...", flush=True)
    plain.data_round(), plain.model_round(), plain.loop_round()
    run_trainer(args, data_dir, warm)
    rounds = {"dataloader": [], "model_only": [], "loop_with_data": []}
    runs, steady, steady_wall, reported = [], [], [], []
    for _ in range(args.repeats):
        rounds["dataloader"].append(plain.data_round())
        rounds["model_only"].append(plain.model_round())
        rounds["loop_with_data"].append(plain.loop_round())
        r1 = run_trainer(args, data_dir, n)
        r2 = run_trainer(args, data_dir, 2 * n)
        runs += [r1, r2]
        reported += [r1["train_samples_per_second"], r2["train_samples_per_second"]]
        steady.append((n * b, r2["train_runtime_s"] - r1["train_runtime_s"]))
        steady_wall.append((n * b, r2["wall_s"] - r1["wall_s"]))
    if any(t <= 0 for _, t in steady + steady_wall):
        print("WARNING: a 2N run was not slower than its N run (too few steps or a noisy machine): "
              "raise --steps", file=sys.stderr)
    return {
        "dataloader_img_s": median_rate(rounds["dataloader"]),
        "plain_model_only_img_s": median_rate(rounds["model_only"]),
        "plain_loop_img_s": median_rate(rounds["loop_with_data"]),
        "trainer_reported_img_s": statistics.median(reported),
        "trainer_steady_img_s": median_rate(steady),
        "trainer_steady_wall_img_s": median_rate(steady_wall),
        "plain_rounds": {k: [{"images": i, "seconds": round(t, 5)} for i, t in v] for k, v in rounds.items()},
        "trainer_runs": runs,
        "precision": "bf16 autocast" if plain.bf16 else "fp32", "channels_last": plain.channels_last,
        "data_path": plain.data_path,
        "fused_adamw": plain.fused, "n_train_images": plain.n_train,
    }


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    data_dir, synthetic = common.resolve_data(args.data, subset_per_class=64 if args.quick else None)
    common.quiet_libraries()   # also makes train_hf's logging.basicConfig a no-op
    info = common.machine_info()
    common.print_machine_info(info)
    print(f"model {args.model} | {args.image_size} px | batch {args.batch_size} | data {data_dir}"
          f"{' (synthetic)' if synthetic else ''}\n")

    res = measure_all(args, data_dir)
    plain_rate = res["plain_loop_img_s"]
    ratio = res["trainer_steady_img_s"] / plain_rate if res["trainer_steady_img_s"] and plain_rate else None
    ratio_wall = (res["trainer_steady_wall_img_s"] / plain_rate
                  if res["trainer_steady_wall_img_s"] and plain_rate else None)

    print()
    common.print_table(["path", "img/s"], [
        ["data loader only" + (" (decode + augment + processor)" if res["data_path"] == "none" else
                               " (film store + CPU corruptions + collation)"), res["dataloader_img_s"]],
        ["plain loop, model only (fixed batch)", res["plain_model_only_img_s"]],
        ["plain loop, data + model", plain_rate],
        ["Trainer, reported (incl. warm-up)", res["trainer_reported_img_s"]],
        ["Trainer, steady state (train_runtime, 2N-N)", res["trainer_steady_img_s"]],
        ["Trainer, steady state (wall time, 2N-N)", res["trainer_steady_wall_img_s"]],
    ])
    verdict = "" if ratio is None else ("  OK" if ratio >= 0.9 else "  BELOW GOAL")
    print(f"ratio Trainer steady / plain loop: {common.fmt(ratio, 3)} (goal >= 0.9){verdict}; "
          f"wall-time estimate {common.fmt(ratio_wall, 3)}")

    results = {k: res[k] for k in ("dataloader_img_s", "plain_model_only_img_s", "plain_loop_img_s",
                                   "trainer_reported_img_s", "trainer_steady_img_s", "trainer_steady_wall_img_s")}
    results.update(ratio_trainer_over_plain=ratio, ratio_trainer_wall_over_plain=ratio_wall)
    common.write_json(args.out, {
        "benchmark": NAME, "machine": info,
        "config": {"model": str(args.model), "recipe": args.recipe, "data_path": res["data_path"],
                   "image_size": args.image_size, "batch_size": args.batch_size,
                   "precision": res["precision"], "channels_last": res["channels_last"],
                   "fused_adamw": res["fused_adamw"], "steps_n": args.steps, "plain_steps": args.plain_steps,
                   "repeats": args.repeats, "train_samples": args.train_samples,
                   "n_train_images": res["n_train_images"], "data": str(data_dir), "synthetic_data": synthetic,
                   "quick": args.quick},
        "results": results,
        "goals": {"ratio_trainer_over_plain": 0.9},
        "method": {"trainer_steady_img_s": "N*batch / (train_runtime(2N) - train_runtime(N)), median over repeats",
                   "trainer_steady_wall_img_s": "N*batch / (wall(main, 2N) - wall(main, N)), median over repeats",
                   "plain": "median over repeats of images / round time (plain_steps steps), after one warm-up "
                            "round; all paths interleaved round by round"},
        "trainer_runs": res["trainer_runs"], "plain_rounds": res["plain_rounds"],
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
