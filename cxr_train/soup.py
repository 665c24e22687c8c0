"""Uniform weight soup (Wortsman et al. 2022, "Model soups"): average the weights of fine-tuned runs
that share their start (the same ImageNet weights, the same head initialisation, the same patient-
grouped validation split: the same ``--seed``) and differ only in the order the films are drawn
(``--data_seed``). The average is one model at one model's cost; it moves less under acquisition
changes than its members (docs/levers/shift_levers.md).

The soup is then finished by ``train_hf.py`` itself with ``--do_train false``: the same data
preparation and validation split, the operating point fitted with the recipe's policy on the
soup's own validation scores, the hold-out scored through the serving ``Predictor``, the OOD
statistics fitted, the card written. Nothing of the finishing step is soup-specific code.

    cxr-soup --members RUN_A RUN_B RUN_C -- --config hub_configs/efficientnet-lite0-imagenet-full.yaml \\
        --output_dir outputs/efficientnet-lite0-imagenet-full

writes ``<output_dir>-average`` (the averaged weights, the first member's config and processor)
and the finished folder ``<output_dir>``, whose ``config.json`` records the members
(``cxr_soup``) and whose card has a "Weight soup" section.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

RULE = "uniform average of model.safetensors (batch-norm running statistics averaged; integer counters from the first member)"
SAME_START = ("model_name_or_path", "seed", "dataset_name", "validation_fraction", "image_size", "strategy",
              "label_from_filename")


class SoupError(ValueError):
    """Members that cannot be averaged (a clear message; nothing is written)."""


def average_state_dicts(files: list[Path]) -> dict:
    """Uniform average of ``model.safetensors`` files with the same keys and shapes. Floating
    tensors (weights, biases, batch-norm running mean / var) are averaged in float64 and cast back;
    integer tensors (``num_batches_tracked``) are taken from the first file (they only count)."""
    import torch
    from safetensors.torch import load_file

    if len(files) < 2:
        raise SoupError(f"a soup needs at least two models, got {len(files)}")
    sds = [load_file(str(f)) for f in files]
    keys = sorted(sds[0])
    for f, sd in zip(files[1:], sds[1:]):
        if sorted(sd) != keys or any(sd[k].shape != sds[0][k].shape for k in keys):
            raise SoupError(f"{f}: not the same architecture as {files[0]} (keys or shapes differ)")
    out = {}
    for k in keys:
        t = sds[0][k]
        if t.is_floating_point():
            out[k] = (sum(sd[k].to(torch.float64) for sd in sds) / len(sds)).to(t.dtype).contiguous()
        else:
            out[k] = t.clone()
    return out


def _default_seed() -> int:
    """transformers' default ``--seed`` (run_config.yaml leaves settings at their default out)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    return next(f.default for f in fields(TrainingArguments) if f.name == "seed")


def _with_defaults(run: dict) -> dict:
    seed = run.get("seed", _default_seed())
    return {**run, "seed": seed, "data_seed": run.get("data_seed") if run.get("data_seed") is not None else seed}


def check_members(members: list[Path]) -> list[dict]:
    """Each member is a finished ``train_hf.py`` folder (weights, config, processor, run_config.yaml),
    all with the same labels and the same start (``SAME_START`` settings); returns their run configs."""

    if len(members) < 2:
        raise SoupError(f"a soup needs at least two members, got {len(members)}")
    if len({m.resolve() for m in members}) != len(members):
        raise SoupError("a member is named twice: " + ", ".join(str(m) for m in members))
    runs, labels = [], []
    for m in members:
        missing = [f for f in ("model.safetensors", "config.json", "run_config.yaml")
                   if not (m / f).is_file()]
        if missing:
            raise SoupError(f"{m}: not a finished cxr-train folder (missing {', '.join(missing)})")
        runs.append(_with_defaults(yaml.safe_load((m / "run_config.yaml").read_text()) or {}))
        labels.append(json.loads((m / "config.json").read_text()).get("id2label"))
    if any(lab != labels[0] for lab in labels[1:]):
        raise SoupError("the members have different labels: " + "; ".join(f"{m}: {lab}" for m, lab in zip(members, labels)))
    for key in SAME_START:
        values = [r.get(key) for r in runs]
        if any(v != values[0] for v in values[1:]):
            raise SoupError(f"the members do not share their start: {key} differs ("
                            + ", ".join(f"{m.name}={v}" for m, v in zip(members, values)) + ")")
    return runs


def write_average(members: list[Path], out: Path) -> Path:
    """``out``: the averaged weights with the first member's config (and image processor file, if any)."""
    from safetensors.torch import save_file

    runs = check_members(members)
    weights = average_state_dicts([m / "model.safetensors" for m in members])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json"):   # timm folders keep the processor in config.json
        if (members[0] / name).is_file():
            shutil.copy(members[0] / name, out / name)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["cxr_soup"] = soup_record(members, runs)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def soup_record(members: list[Path], runs: list[dict]) -> dict:
    return {"members": [m.name for m in members], "rule": RULE,
            "data_seeds": [r["data_seed"] for r in runs],
            "member_epochs": [r.get("num_train_epochs") for r in runs]}


def card_section(record: dict) -> str:
    members = ", ".join(f"`{m}`" for m in record["members"])
    seeds = ", ".join(str(s) for s in record["data_seeds"])
    return ("## Weight soup\n\n"
            f"These weights are the uniform average of {len(record['members'])} fine-tuned runs of the same recipe "
            f"({members}; data order seeds {seeds}), which share the ImageNet start, the head initialisation and the "
            "patient-grouped validation split (Wortsman et al. 2022, *Model soups*). Rule: "
            f"{record['rule']}. The operating point, the figures above and the OOD statistics are the soup's own, "
            "fitted and measured on the averaged weights by `cxr-train --do_train false` (no training step ran on "
            "the average). A soup costs one model at serving time.\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    from cxr.cli import ArgumentParser, fail     # "did you mean" for a misspelt flag; one error line

    ap = ArgumentParser(prog="cxr-soup", description=__doc__.split("\n\n")[0],
                                 epilog="Everything after -- goes to cxr-train (give it --config and --output_dir).")
    ap.add_argument("--members", nargs="+", required=True, help="finished cxr-train folders of the same recipe")
    a = ap.parse_args(own)
    if "--output_dir" not in rest:      # the recipe's own output_dir
        config = rest[rest.index("--config") + 1] if "--config" in rest[:-1] else None
        out_dir = (yaml.safe_load(Path(config).read_text()) or {}).get("output_dir") if config and Path(config).is_file() else None
        if not out_dir:
            ap.error("give cxr-train's --config (with an output_dir) or --output_dir after --")
        rest = [*rest, "--output_dir", str(out_dir)]
    out = Path(rest[rest.index("--output_dir") + 1])
    members = [Path(m) for m in a.members]
    try:
        average = write_average(members, Path(f"{out}-average"))
    except SoupError as e:
        return fail(e)
    import train_hf

    rc = train_hf.main([*rest, "--model_name_or_path", str(average), "--reinit_head", "false", "--do_train", "false"])
    if rc:
        return rc
    from cxr_train.hub import with_card_section

    runs = check_members(members)
    record = {**json.loads((average / "config.json").read_text())["cxr_soup"],
              "base_model": runs[0].get("model_name_or_path"),
              "member_train_minutes": [_train_minutes(m) for m in members]}
    cfg = json.loads((out / "config.json").read_text())
    cfg["cxr_soup"] = record
    if isinstance(cfg.get("cxr_training"), dict):     # the members' start, not the averaged folder
        cfg["cxr_training"]["base_model"] = record["base_model"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    card = out / "README.md"
    text = soup_card(card.read_text(), record, str(average), [str(m) for m in members], rest)
    card.write_text(with_card_section(text, card_section(record), before="## Evaluation"))
    print(f"soup of {len(members)} runs: {out}")
    return 0


def _train_minutes(member: Path) -> float | None:
    f = member / "train_results.json"
    if not f.is_file():
        return None
    return round(json.loads(f.read_text()).get("train_runtime", 0.0) / 60, 1)


def soup_card(card: str, record: dict, average: str, members: list[str], train_argv: list[str]) -> str:
    """The card ``cxr-train --do_train false`` wrote, told the truth about a soup: the members' base
    model (not the averaged folder), their epochs and training time, the commands that make it, and
    no "0 epochs: a smoke run" warning (the members were trained; the average is not trained further)."""
    import re

    base = str(record.get("base_model"))
    lines = []
    for line in card.splitlines():
        if line.startswith("> **Warning: not a usable model.**") and "0 epoch" in line:
            body = line.split("**", 2)[2].replace("Do not publish or rely on it.", "").strip().rstrip(".")
            kept = [w.strip() for w in body.split(";") if w.strip() and "0 epoch" not in w]
            if not kept:
                continue
            line = f"> **Warning: not a usable model.** {'; '.join(kept)}. Do not publish or rely on it."
        if line.startswith("base_model: "):
            line = f"base_model: {base}"
        line = line.replace(f"| base model | {average} |", f"| base model | {base} |")
        minutes = [m for m in record.get("member_train_minutes", []) if m is not None]
        if line.startswith("| epochs / steps | 0 / 0"):
            line = f"| epochs / steps | {', '.join(str(e) for e in record['member_epochs'])} (each member run) |"
        if line.startswith("| training time | 0.0 min") and minutes:
            line = ("| training time | " + " + ".join(f"{m}" for m in minutes)
                    + f" = {sum(minutes):.1f} min (the members' `train_runtime`); the average is not trained further |")
        lines.append(line)
    text = "\n".join(lines) + "\n"
    config = next((train_argv[i + 1] for i, a in enumerate(train_argv[:-1]) if a == "--config"), "<the recipe>.yaml")
    out_dir = next((train_argv[i + 1] for i, a in enumerate(train_argv[:-1]) if a == "--output_dir"), "OUT")
    reproduce = ("```bash\n# each member: the recipe with another data order (--data_seed), e.g.\n"
                 f"cxr-train --config {config} --output_dir <member> --ood_fit false [--data_seed N]\n"
                 f"cxr-soup --members {' '.join(members)} -- --config {config} --output_dir {out_dir}\n```")
    return re.sub(r"Reproduce with:\n\n```bash\n.*?```", lambda m: "Reproduce with:\n\n" + reproduce, text,
                  count=1, flags=re.S)


if __name__ == "__main__":
    sys.exit(main())
