"""Where a model or dataset lives, and whether a model folder's weights are safe to load.

One rule for every caller (Predictor, training, the Space builder, the data loader): a name
that exists on disk is a local folder; a name that looks like a path but is not on disk is
reported as a missing folder, not as a Hub connection error; anything else must be a Hub id.
Weights are loaded only from safetensors files whose header parses (never a pickle).

The default model is declared once here (``DEFAULT_MODEL``) and found by
:func:`resolve_model`, the one rule every command follows (cxr-predict, cxr-app,
``python app/app.py``, ``Predictor.from_pretrained(None)``, the Space builder).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[\w.-]{1,96}$")    # name or namespace/name
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")             # every image reader's list
DICOM_SUFFIXES = (".dcm", ".dicom")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


# The shipped default model: a folder in the repository's models/, installed with the package
# as the data package ``cxr_models`` (pyproject.toml maps models/ there), and published on the
# Hub as DEFAULT_MODEL_HUB_ID, which a Space downloads (cxr-space sets its MODEL_ID to it).
DEFAULT_MODEL = "efficientnet-lite0-imagenet-full"
DEFAULT_MODEL_HUB_ID = f"cxr-transfer/cxr-{DEFAULT_MODEL}"
MODELS_PACKAGE = "cxr_models"
MODEL_ENV = ("CXR_MODEL", "MODEL_ID")    # the environment's choice of model, first set wins


class MissingFolderError(FileNotFoundError):
    """A local model or dataset folder that does not exist."""


class NoDefaultModelError(FileNotFoundError):
    """No model was named and the shipped default is in none of the places it is looked for."""


def default_model_folders() -> list[Path]:
    """Where the shipped default can be, in the order it is looked for: the repository
    checkout this code runs from (``models/`` beside ``cxr/``), then the installed package data
    (``pip install .`` of any kind copies it into ``cxr_models``)."""
    places = [Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL]
    import importlib.util

    try:
        spec = importlib.util.find_spec(MODELS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        place = Path(location) / DEFAULT_MODEL
        if place not in places:
            places.append(place)
    return places


def default_model_folder() -> Path:
    """The shipped default model's folder (see :func:`default_model_folders`).
    Raises NoDefaultModelError naming the places it looked in."""
    places = default_model_folders()
    for place in places:
        if (place / "config.json").is_file():
            return place
    raise NoDefaultModelError(
        f"no model given and the shipped default ({DEFAULT_MODEL}) is not installed (looked in "
        + ", ".join(str(p) for p in places) + "): pass a model folder or Hub id (--model, or the "
        f"environment variable {MODEL_ENV[0]}), or reinstall the package (pip install .)")


def resolve_model(model: str | os.PathLike | None = None) -> str:
    """The model a command serves: ``model`` when given, else the environment's
    (``CXR_MODEL``, then ``MODEL_ID``), else the shipped default (:func:`default_model_folder`);
    on a Hugging Face Space (``SPACE_ID`` set), which has neither models/ nor the package data,
    the default's Hub copy. Returns a folder path or a Hub id, unchecked (the loader checks it)."""
    if model is not None and str(model).strip():
        return str(model)
    for var in MODEL_ENV:
        value = os.environ.get(var, "").strip()
        if value:
            if "," in value:
                raise ValueError(f"{var}={value} names several models; this command serves one: pass --model")
            return value
    try:
        return str(default_model_folder())
    except NoDefaultModelError:
        if os.environ.get("SPACE_ID"):
            return DEFAULT_MODEL_HUB_ID
        raise


def is_hub_id(name: str, *, namespaced: bool = False) -> bool:
    """``name`` is a valid Hub repository id (``namespace/name`` when ``namespaced``)."""
    return bool(HUB_ID.match(name)) and ".." not in name and (not namespaced or name.count("/") == 1)


def looks_like_path(name: str) -> bool:
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name or os.path.isabs(name):
        return True
    if not is_hub_id(name):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()    # e.g. models/typo beside an existing models/


def local_folder(name: str | os.PathLike, kind: str = "model") -> Path | None:
    """The local folder ``name`` names, or None when it is a Hub id.
    Raises MissingFolderError when it looks like a path that does not exist."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_path(text):
        raise MissingFolderError(f"{kind} folder not found: {text} (no such folder)")
    return None


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (by suffix, sorted)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# ------------------------------------------------------------------ weights

def safetensors_ok(path: str | os.PathLike) -> bool:
    """Header parses and the file is as long as the header says (no tensor is read)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 << 20:
                return False
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            return False
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + n + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def index_problem(folder: str | os.PathLike) -> str | None:
    """``None`` if every shard named by ``model.safetensors.index.json`` is a ``.safetensors``
    file inside ``folder`` with a valid header; else what is wrong (no path in the text)."""
    folder = Path(folder)
    try:
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return "model.safetensors.index.json is unreadable"
    if not shards:
        return "model.safetensors.index.json names no shard"
    root = folder.resolve()
    for shard in sorted(shards):
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            return "the index names a shard that is not a .safetensors file"
        path = (folder / shard).resolve()
        if path.parent != root:
            return "the index names a shard outside the model folder"
        if not path.is_file() or not safetensors_ok(path):
            return f"shard {Path(shard).name[:80]} is missing or not a valid safetensors file"
    return None


def weights_problem(folder: str | os.PathLike, *, require_weights: bool = True) -> str | None:
    """What makes a local model folder unloadable (no config.json, a bad shard index, only
    pickle weights, no weights), or None. The text names the folder, not its full path."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"model folder not found: {folder}"
    if not (folder / "config.json").is_file():
        return f"{folder.name}: not a model folder (no config.json)"
    if (folder / "model.safetensors.index.json").is_file():
        problem = index_problem(folder)
        if problem:  # the index could name a torch.save (pickle) file, or one outside the folder
            return f"{folder.name}: {problem}; only safetensors weights are loaded"
        return None
    if not require_weights or (folder / "model.safetensors").is_file():
        return None
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        return f"{folder.name} has only pickle weights ({', '.join(pickles)}); only safetensors weights are loaded"
    return f"{folder.name} has no model.safetensors"
