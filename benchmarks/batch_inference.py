#!/usr/bin/env python
"""Batch inference throughput (images/s): Predictor and pipeline end to end vs the model alone.

End to end (a list of image files in, predictions out; decode + preprocessing included):

- **Predictor bf16 / fp32**: ``cxr.inference.Predictor.from_pretrained(model, precision=...)``
  then ``predict_batch(paths, batch_size)``: load_image, radiograph check, the saved image
  processor, bf16 autocast (where the CPU has native bf16) and channels_last for CNNs,
  calibrated softmax.
- **pipeline fp32**: ``transformers.pipeline("image-classification", model=DIR)`` called on
  the same paths with the same batch size.

Model-only ceiling (a random pre-made batch of the model's input size, ``torch.inference_mode``,
the Predictor's own model object, so the same weights, attention implementation and layout):

- **ceiling bf16 + channels_last** (channels_last for CNNs) and **ceiling fp32** (the fp32
  Predictor's model, same layout): one batch at a time on all torch threads, the usual way
  and the issue's definition. The goal is Predictor-bf16 / ceiling-bf16 >= 0.8.
- **model only in the Predictor's scheme**: the same batches, ``torch.get_num_threads()``
  batches at a time with one thread each (how ``predict_batch`` runs). Predictor-bf16 over
  this one is what decoding and preprocessing cost on top of the model.

Scaling table: model-only inference and training (forward + backward + AdamW, bf16 autocast +
channels_last) img/s at 128/192/224/320 px, batch 32 (ViTs interpolate their position
embeddings).

Every figure is the median of ``--repeats`` timed rounds after one untimed round; each
Predictor is timed in rounds alternating with its ceiling, so drift in machine speed (shared
cores) affects both sides of the ratio alike.

    python -m benchmarks.batch_inference [--quick] [--data DIR] [--model DIR|PRESET|vit-b16-random] [--out JSON]
"""

from __future__ import annotations

import copy
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
import time

from benchmarks import common  # run from the repository root: python -m benchmarks.<name>

NAME = "batch_inference"


def parse(argv=None):
    ap = common.base_parser(__doc__, NAME)
    ap.add_argument("--model", default=None,
                    help="model folder, preset name or vit-b16-random (default: models/cxr-resnet-small-scratch, or a "
                         f"random-init {common.DEFAULT_PRESET} if it is missing)")
    ap.add_argument("--images", type=int, default=None, help="images per end-to-end round (default 256; quick 32)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; quick 1)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="scaling table image sizes (default 128 192 224 320; quick 128)")
    ap.add_argument("--scaling-iters", type=int, default=None,
                    help="batches per timed scaling round (default 5; quick 2)")
    args = ap.parse_args(argv)
    q = args.quick
    args.images = args.images or (32 if q else 256)
    args.repeats = args.repeats or (1 if q else 7)
    args.sizes = args.sizes or ([128] if q else [128, 192, 224, 320])
    args.scaling_iters = args.scaling_iters or (2 if q else 5)
    return args


def ceiling(model, x, *, bf16: bool, iters: int, repeats: int, **model_kwargs) -> float:
    """Model-only inference img/s on the pre-made batch ``x``."""
    import torch

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(iters):
                model(pixel_values=x, **model_kwargs).logits.float()

    t = common.measure(run, warmup=1, repeats=repeats)
    return common.rate(iters * x.shape[0], t["median_s"])


def train_rate(model, x, y, *, bf16: bool, iters: int, repeats: int, **model_kwargs) -> float:
    """Training img/s (forward + cross-entropy + backward + fused AdamW) on a pre-made batch."""
    import torch

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def run():
        for _ in range(iters):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(pixel_values=x, **model_kwargs).logits
            torch.nn.functional.cross_entropy(logits.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    t = common.measure(run, warmup=1, repeats=repeats)
    return common.rate(iters * x.shape[0], t["median_s"])


def main(argv=None) -> int:
    args = parse(argv)
    t_start = time.perf_counter()
    data_dir, synthetic = common.resolve_data(args.data)
    common.quiet_libraries()
    import torch
    from transformers import pipeline

    from cxr_train.data import processor_size
    from cxr.inference import Predictor
    from cxr.architecture import CNN, family

    info = common.machine_info()
    common.print_machine_info(info)
    model_dir, model_desc = common.resolve_model(args.model)
    paths = common.find_images(data_dir, args.images)
    n, b, reps = len(paths), args.batch_size, args.repeats
    bf16_ok = info["cpu_supports_bf16"]

    p32 = Predictor.from_pretrained(model_dir, precision="fp32")
    p16 = Predictor.from_pretrained(model_dir, precision="bf16") if bf16_ok else None
    cnn = family(p32.model) == CNN
    h, w = processor_size(p32.processor)
    print(f"model: {model_desc} ({p32.config.model_type}, {h}x{w} px, "
          f"{sum(p.numel() for p in p32.model.parameters()) / 1e6:.1f} M parameters) | "
          f"{n} images from {data_dir}{' (synthetic)' if synthetic else ''} | batch {b} | "
          f"{reps} timed round(s) after 1 warm-up\n", flush=True)

    def e2e(fn) -> float:
        return common.rate(n, common.measure(fn, warmup=1, repeats=reps)["median_s"])

    # The model-only ceiling: a pre-made random batch of the model's input size, the
    # Predictor's own model object (same weights, layout and attention implementation).
    iters = max(1, n // b)
    x = torch.randn(b, 3, h, w)
    if cnn:
        x = x.contiguous(memory_format=torch.channels_last)

    def model_only(model, bf16: bool):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for _ in range(iters):
                    model(pixel_values=x).logits.float()
        return run

    # The same pre-made batches through the Predictor's own parallel scheme: one batch per
    # thread, threads = torch.get_num_threads(), one intra-op thread each.
    streams = torch.get_num_threads()
    stream_pool = ThreadPoolExecutor(max_workers=streams, initializer=torch.set_num_threads, initargs=(1,))

    def model_only_streams(model, bf16: bool):
        def one(_):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(pixel_values=x).logits.float()

        def run():
            list(stream_pool.map(one, range(iters)))
        return run

    # End to end vs ceiling, timed in alternating rounds so machine drift hits both alike.
    results: dict = {}
    for prec, pred in (("bf16", p16), ("fp32", p32)):
        if pred is None:
            results[f"predictor_{prec}_img_s"] = results[f"ceiling_{prec}_img_s"] = None
            continue
        print(f"Predictor {prec} vs model-only ceiling (interleaved) ...", flush=True)
        m = common.measure_interleaved({"e2e": lambda pred=pred: pred.predict_batch(paths, batch_size=b),
                                        "ceiling": model_only(pred.model, prec == "bf16"),
                                        "streams": model_only_streams(pred.model, prec == "bf16")},
                                       warmup=1, repeats=reps)
        results[f"predictor_{prec}_img_s"] = common.rate(n, m["e2e"]["median_s"])
        results[f"ceiling_{prec}_img_s"] = common.rate(iters * b, m["ceiling"]["median_s"])
        results[f"model_only_streams_{prec}_img_s"] = common.rate(iters * b, m["streams"]["median_s"])
        results[f"rounds_{prec}_s"] = {k: v["times_s"] for k, v in m.items()}
        # per-round ratio (adjacent rounds see the same machine speed): its median is the verdict
        paired = [(n / e) / (iters * b / c) for e, c in zip(m["e2e"]["times_s"], m["ceiling"]["times_s"]) if e > 0 and c > 0]
        results[f"paired_ratio_predictor_{prec}_over_ceiling"] = statistics.median(paired) if paired else None
    results["ratio_predictor_bf16_over_ceiling"] = (
        results["predictor_bf16_img_s"] / results["ceiling_bf16_img_s"]
        if results["predictor_bf16_img_s"] and results["ceiling_bf16_img_s"] else None)
    results["ratio_predictor_fp32_over_ceiling"] = (
        results["predictor_fp32_img_s"] / results["ceiling_fp32_img_s"]
        if results["predictor_fp32_img_s"] and results["ceiling_fp32_img_s"] else None)
    results["ratio_predictor_bf16_over_model_only_streams"] = (
        results["predictor_bf16_img_s"] / results["model_only_streams_bf16_img_s"]
        if results["predictor_bf16_img_s"] and results.get("model_only_streams_bf16_img_s") else None)
    stream_pool.shutdown()

    if p16:  # precision switch: bf16 must agree with fp32 on these (real, when available) images
        r16, r32 = p16.predict_batch(paths, batch_size=b), p32.predict_batch(paths, batch_size=b)
        pairs = [(x, y) for x, y in zip(r16, r32) if not isinstance(x, Exception)]
        diffs = [abs(x.positive_probability - y.positive_probability) for x, y in pairs]
        results["bf16_vs_fp32"] = {
            "images": len(pairs),
            "label_agreement": sum(x.label == y.label for x, y in pairs) / max(1, len(pairs)),
            "max_abs_prob_diff": max(diffs) if diffs else None,
            "mean_abs_prob_diff": sum(diffs) / len(diffs) if diffs else None,
        }
        print(f"bf16 vs fp32: {results['bf16_vs_fp32']}", flush=True)

    print("pipeline ...", flush=True)
    pipe = pipeline("image-classification", model=str(model_dir), device="cpu", dtype=torch.float32,
                    trust_remote_code=False)
    str_paths = [str(p) for p in paths]
    results["pipeline_fp32_img_s"] = e2e(lambda: pipe(str_paths, batch_size=b))
    del pipe

    # Scaling with input size: model-only inference and training, batch 32, bf16 + channels_last.
    print("scaling ...", flush=True)
    scale_bf16 = bool(bf16_ok)
    kwargs = {} if cnn else {"interpolate_pos_encoding": True}
    infer_model = (p16 or p32).model
    train_model = copy.deepcopy(p32.model)
    if cnn:
        train_model = train_model.to(memory_format=torch.channels_last)
    scaling = []
    for size in args.sizes:
        xs = torch.randn(32, 3, size, size)
        if cnn:
            xs = xs.contiguous(memory_format=torch.channels_last)
        ys = torch.randint(0, p32.config.num_labels, (32,))
        it = args.scaling_iters
        row = {"image_size": size, "batch_size": 32,
               "inference_img_s": ceiling(infer_model, xs, bf16=scale_bf16, iters=it, repeats=reps, **kwargs),
               "train_img_s": train_rate(train_model, xs, ys, bf16=scale_bf16, iters=it, repeats=reps, **kwargs)}
        scaling.append(row)
        print(f"  {size} px: inference {common.fmt(row['inference_img_s'])} img/s, "
              f"training {common.fmt(row['train_img_s'])} img/s", flush=True)
    del train_model

    print()
    common.print_table(["path", "img/s"], [
        ["Predictor.predict_batch bf16 (end to end)", results["predictor_bf16_img_s"]],
        ["Predictor.predict_batch fp32 (end to end)", results["predictor_fp32_img_s"]],
        ["pipeline('image-classification') fp32", results["pipeline_fp32_img_s"]],
        [f"ceiling bf16{' + channels_last' if cnn else ''} (model only)", results["ceiling_bf16_img_s"]],
        [f"ceiling fp32{' + channels_last' if cnn else ''} (model only)", results["ceiling_fp32_img_s"]],
        [f"model only bf16, {streams} batches at a time x 1 thread (Predictor's scheme)",
         results.get("model_only_streams_bf16_img_s")],
    ])
    ratio = results.get("paired_ratio_predictor_bf16_over_ceiling")
    verdict = "" if ratio is None else ("  OK" if ratio >= 0.8 else "  BELOW GOAL")
    print(f"ratio Predictor bf16 / ceiling bf16: {common.fmt(ratio, 3)} (median of per-round ratios; goal >= 0.8)"
          f"{verdict}; ratio of the medians {common.fmt(results['ratio_predictor_bf16_over_ceiling'], 3)}")
    print(f"ratio Predictor fp32 / ceiling fp32: {common.fmt(results['ratio_predictor_fp32_over_ceiling'], 3)}")
    print("ratio Predictor bf16 / model only in the Predictor's scheme: "
          f"{common.fmt(results['ratio_predictor_bf16_over_model_only_streams'], 3)} (what data loading costs)\n")
    prec = "bf16 autocast" if scale_bf16 else "fp32"
    common.print_table(["size (batch 32)", f"inference img/s ({prec})", f"training img/s ({prec})"],
                       [[f"{r['image_size']} px", r["inference_img_s"], r["train_img_s"]] for r in scaling])
    if not bf16_ok:
        print("note: no native bf16 on this CPU: bf16 rows skipped, scaling table in fp32")

    common.write_json(args.out, {
        "benchmark": NAME, "machine": info,
        "config": {"model": str(model_dir), "model_description": model_desc, "model_type": p32.config.model_type,
                   "input_size": [h, w], "channels_last": cnn, "images": n, "batch_size": b, "repeats": reps,
                   "data": str(data_dir), "synthetic_data": synthetic, "scaling_precision": prec,
                   "scaling_iters": args.scaling_iters, "quick": args.quick},
        "results": results, "scaling": scaling,
        "goals": {"ratio_predictor_bf16_over_ceiling": 0.8},
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
