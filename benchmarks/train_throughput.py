#!/usr/bin/env python
"""Training throughput (images/s): the real Trainer path vs a plain PyTorch loop.

What is measured, all with the same model, batch size, image size, precision and data:

1. **data loader only**: the training split with ``cxr.data.ImageTransform(processor,
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

The plain loop is built from the very same parsed arguments (``cxr.config.parse_args``),
data (``prepare_data``, the same train subset), model (``build_model``), loss
(``WeightedCrossEntropy``), precision, channels_last choice, optimizer (fused AdamW when the
Trainer's ``optim`` is ``adamw_torch_fused``) and gradient clipping (``max_grad_norm``) as the
Trainer run. The ratio Trainer-steady / plain-loop shows the Trainer's overhead (goal >= 0.9).

Each plain figure is the median over ``--repeats`` timed rounds of ``--plain-steps`` steps,
after one untimed round. Run on a quiet machine: other processes make every figure lower.

    python benchmarks/train_throughput.py [--quick] [--data DIR] [--model PRESET_OR_DIR] [--out JSON]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

NAME = "train_throughput"


def parse(argv=None):
    ap = common.base_parser(__doc__, NAME)
    ap.add_argument("--model", default=common.DEFAULT_PRESET,
                    help="preset name or model folder (train_hf --model_name_or_path); default %(default)s")
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=None,
                    help="N: the Trainer runs N and 2N steps (default 20; --quick 2)")
    ap.add_argument("--plain-steps", type=int, default=None, help="steps per timed plain round (default 10; quick 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds / Trainer run pairs (default 3; quick 1)")
    ap.add_argument("--train-samples", type=int, default=None,
                    help="training images used (train_hf --max_train_samples; default 2048; quick 128)")
    args = ap.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (2 if q else 20)
    args.plain_steps = args.plain_steps or (2 if q else 10)
    args.repeats = args.repeats or (1 if q else 3)
    args.train_samples = args.train_samples or (128 if q else 2048)
    return args


def trainer_argv(args, data_dir: Path, out_dir: Path, steps: int) -> list[str]:
    """The train_hf.py command line: evaluation, checkpoints and best-model reload off."""
    return ["--model_name_or_path", str(args.model), "--image_size", str(args.image_size),
            "--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "False", "--do_eval", "False",
            "--per_device_train_batch_size", str(args.batch_size), "--dataset_name", str(data_dir),
            "--output_dir", str(out_dir), "--disable_tqdm", "True", "--precision", args.precision,
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


def trainer_figures(args, data_dir: Path) -> dict:
    n, b = args.steps, args.batch_size
    warm = 1 if args.quick else n
    print(f"Trainer: warm-up run ({warm} steps), then {args.repeats} x ({n}, {2 * n}) steps ...", flush=True)
    run_trainer(args, data_dir, warm)
    runs, steady, steady_wall, reported = [], [], [], []
    for _ in range(args.repeats):
        r1 = run_trainer(args, data_dir, n)
        r2 = run_trainer(args, data_dir, 2 * n)
        runs += [r1, r2]
        reported += [r1["train_samples_per_second"], r2["train_samples_per_second"]]
        steady.append(common.rate(n * b, r2["train_runtime_s"] - r1["train_runtime_s"]))
        steady_wall.append(common.rate(n * b, r2["wall_s"] - r1["wall_s"]))

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    if any(x is None for x in steady + steady_wall):
        print("WARNING: a 2N run was not slower than its N run (too few steps or a noisy machine): "
              "raise --steps", file=sys.stderr)
    return {"trainer_reported_img_s": med(reported), "trainer_steady_img_s": med(steady),
            "trainer_steady_wall_img_s": med(steady_wall), "runs": runs}


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


def plain_figures(args, data_dir: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from cxr.config import parse_args
    from cxr.data import ImageTransform, prepare_data
    from cxr.modeling import apply_strategy, build_model, is_cnn
    from cxr.training import WeightedCrossEntropy

    # The same parsed arguments, data, model and loss as the Trainer run.
    model_args, data_args, targs = parse_args(trainer_argv(args, data_dir, common.temp_dir("plain"), args.steps))
    data = prepare_data(data_args, seed=targs.seed)
    train = data.splits["train"]
    torch.manual_seed(targs.seed)
    model, processor = build_model(model_args.model_name_or_path, data.id2label, model_args.image_size,
                                   model_args.model_revision)
    model = apply_strategy(model, model_args.strategy, partial_stages=model_args.partial_stages)
    channels_last = model_args.channels_last and is_cnn(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    bf16 = bool(targs.bf16)
    loss_fn = WeightedCrossEntropy(data.class_weights)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = "fused" in str(getattr(targs.optim, "value", targs.optim))
    opt = torch.optim.AdamW(params, lr=targs.learning_rate, betas=(targs.adam_beta1, targs.adam_beta2),
                            eps=targs.adam_epsilon, weight_decay=targs.weight_decay, fused=fused or None)

    train.set_transform(ImageTransform(processor, augment=data_args.augment))
    b = args.batch_size
    loader = DataLoader(train, batch_size=b, shuffle=True, num_workers=targs.dataloader_num_workers,
                        collate_fn=default_data_collator, drop_last=len(train) >= b)
    batches = Cycle(loader)
    h = w = args.image_size

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(pixel_values=x, labels=y)   # the Trainer passes labels too
            loss = loss_fn(out, y)
        loss.backward()
        if targs.max_grad_norm and targs.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, targs.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    k = args.plain_steps
    counted = {"images": 0}

    def data_only():
        for _ in range(k):
            counted["images"] += len(next(batches)["labels"])

    def loop_with_data():
        for _ in range(k):
            batch = next(batches)
            step(batch["pixel_values"], batch["labels"])

    x_fixed = torch.randn(b, 3, h, w)
    y_fixed = torch.randint(0, len(data.id2label), (b,))

    def model_only():
        for _ in range(k):
            step(x_fixed, y_fixed)

    print(f"plain loop: {len(train)} training images, batch {b}, {h} px, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, channels_last={channels_last}, fused AdamW={fused}; "
          f"{args.repeats} x {k} steps after 1 warm-up round ...", flush=True)
    t_data = common.measure(data_only, warmup=1, repeats=args.repeats)
    imgs_per_round = counted["images"] / (1 + args.repeats)
    t_model = common.measure(model_only, warmup=1, repeats=args.repeats)
    t_loop = common.measure(loop_with_data, warmup=1, repeats=args.repeats)
    return {
        "dataloader_img_s": common.rate(imgs_per_round, t_data["median_s"]),
        "plain_model_only_img_s": common.rate(k * b, t_model["median_s"]),
        "plain_loop_img_s": common.rate(k * b, t_loop["median_s"]),
        "timings": {"dataloader": t_data, "model_only": t_model, "loop_with_data": t_loop},
        "precision": "bf16 autocast" if bf16 else "fp32", "channels_last": channels_last,
        "fused_adamw": fused, "n_train_images": len(train),
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

    plain = plain_figures(args, data_dir)
    trainer = trainer_figures(args, data_dir)
    ratio = (trainer["trainer_steady_img_s"] / plain["plain_loop_img_s"]
             if trainer["trainer_steady_img_s"] and plain["plain_loop_img_s"] else None)
    ratio_wall = (trainer["trainer_steady_wall_img_s"] / plain["plain_loop_img_s"]
                  if trainer["trainer_steady_wall_img_s"] and plain["plain_loop_img_s"] else None)

    print()
    common.print_table(["path", "img/s"], [
        ["data loader only (decode + augment + processor)", plain["dataloader_img_s"]],
        ["plain loop, model only (fixed batch)", plain["plain_model_only_img_s"]],
        ["plain loop, data + model", plain["plain_loop_img_s"]],
        ["Trainer, reported (incl. warm-up)", trainer["trainer_reported_img_s"]],
        ["Trainer, steady state (train_runtime, 2N-N)", trainer["trainer_steady_img_s"]],
        ["Trainer, steady state (wall time, 2N-N)", trainer["trainer_steady_wall_img_s"]],
    ])
    verdict = "" if ratio is None else ("  OK" if ratio >= 0.9 else "  BELOW GOAL")
    print(f"ratio Trainer steady / plain loop: {common.fmt(ratio, 3)} (goal >= 0.9){verdict}; "
          f"wall-time estimate {common.fmt(ratio_wall, 3)}")

    results = {k: plain[k] for k in ("dataloader_img_s", "plain_model_only_img_s", "plain_loop_img_s")}
    results.update({k: trainer[k] for k in ("trainer_reported_img_s", "trainer_steady_img_s",
                                            "trainer_steady_wall_img_s")})
    results.update(ratio_trainer_over_plain=ratio, ratio_trainer_wall_over_plain=ratio_wall)
    common.write_json(args.out, {
        "benchmark": NAME, "machine": info,
        "config": {"model": str(args.model), "image_size": args.image_size, "batch_size": args.batch_size,
                   "precision": plain["precision"], "channels_last": plain["channels_last"],
                   "fused_adamw": plain["fused_adamw"], "steps_n": args.steps, "plain_steps": args.plain_steps,
                   "repeats": args.repeats, "train_samples": args.train_samples,
                   "n_train_images": plain["n_train_images"], "data": str(data_dir), "synthetic_data": synthetic,
                   "quick": args.quick},
        "results": results,
        "goals": {"ratio_trainer_over_plain": 0.9},
        "method": {"trainer_steady_img_s": "N*batch / (train_runtime(2N) - train_runtime(N)), median over repeats",
                   "trainer_steady_wall_img_s": "N*batch / (wall(main, 2N) - wall(main, N)), median over repeats",
                   "plain": "median over repeats of plain_steps*batch / round time, after one warm-up round"},
        "trainer_runs": trainer["runs"], "plain_timings": plain["timings"],
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
