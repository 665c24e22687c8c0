"""Package the Gradio app as a Hugging Face Space and push it.

    python -m cxr_train.space --repo_id user/cxr-demo --model_id user/cxr-model [--private]
    python -m cxr_train.space --model_id user/cxr-model --dry_run /tmp/space      # build the folder only

The Space folder holds app.py and its sibling modules (handlers.py, render.py, files.py,
rest.py, budget.py, as top-level files), README.md (Space card), requirements.txt, examples/ and the serving package
``cxr`` whole (training, data loading, metrics and test helpers live in ``cxr_train``); never
model weights: the Space downloads MODEL_ID from the Hub.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, SpaceCard

import cxr
from cxr.cli import ArgumentParser, answer
from cxr.locate import DEFAULT_MODEL_HUB_ID, MissingFolderError, is_hub_id, local_folder

from .hub import PushError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# The serving package, copied whole into the Space (tests/test_space.py checks that it imports
# nothing from cxr_train or the training-only dependencies).
SERVING_DIR = Path(cxr.__file__).resolve().parent


def _app_dir() -> Path:
    """app/ of a repository checkout, else the installed cxr_app package (pip install .)."""
    if (ROOT / "app" / "app.py").is_file():
        return ROOT / "app"
    import cxr_app

    return Path(cxr_app.__file__).resolve().parent


APP_DIR = _app_dir()
# The Hub copy of the one declared default (cxr.locate.DEFAULT_MODEL): a Space has no models/ folder
# and no package data, so cxr-space sets the Space variable MODEL_ID to it unless told otherwise.
DEFAULT_MODEL_ID = DEFAULT_MODEL_HUB_ID
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.onnx", "*.h5", "*.msgpack")


def app_modules() -> list[Path]:
    """The app's Python modules (app.py, handlers.py, render.py, files.py, ...): every *.py in
    APP_DIR but the package's __init__.py; never stubs (*.pyi) or __pycache__."""
    return sorted(p for p in APP_DIR.glob("*.py") if p.is_file() and p.name != "__init__.py")


def resolve_model_id(model_id: str | None) -> str | None:
    """The Hub id the Space should serve, or None for a local folder (which is never uploaded)."""
    if model_id is None:
        return DEFAULT_MODEL_ID
    model_id = str(model_id)
    try:
        local = local_folder(model_id) is not None
    except MissingFolderError:
        local = None    # looks like a path, is not on disk: neither a folder nor a Hub id
    if local:
        logger.warning("model %s is a local folder: its weights are not copied into the Space; push the model "
                       "to the Hub (train_hf.py --push_to_hub) and pass its Hub id as --model_id", model_id)
        return None
    if local is None or not is_hub_id(model_id, namespaced=True):
        raise ValueError(f"'{model_id}' is neither a local folder nor a Hub model id (user/name)")
    return model_id


def _ignore(directory, names):
    return [n for n in names if n in ("__pycache__", ".ipynb_checkpoints") or n.endswith((".pyc", ".pyo"))
            or any(Path(n).match(p) for p in WEIGHT_PATTERNS)]


def build_space_folder(dest: str | Path, model_id: str | None = None) -> Path:
    """Assemble a Space repository in ``dest`` (which must be empty or absent) and return it."""
    return _assemble(dest, resolve_model_id(model_id))


def _assemble(dest: str | Path, hub_id: str | None) -> Path:
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not an empty folder: choose a new destination")
    dest.mkdir(parents=True, exist_ok=True)

    for module in app_modules():     # app.py and its sibling modules, top-level files in the Space
        shutil.copy2(module, dest / module.name)
    shutil.copy2(APP_DIR / "requirements.txt", dest / "requirements.txt")
    if (APP_DIR / "examples").is_dir():
        shutil.copytree(APP_DIR / "examples", dest / "examples", ignore=_ignore)

    shutil.copytree(SERVING_DIR, dest / "cxr", ignore=_ignore)

    card = SpaceCard.load(APP_DIR / "README.md")
    if hub_id is not None:
        card.data.models = [hub_id]
    card.save(dest / "README.md")

    leaked = [p for pat in WEIGHT_PATTERNS for p in dest.rglob(pat)]
    if leaked:  # defence in depth: a Space repo must never carry model weights
        raise RuntimeError(f"weights found in the Space folder: {', '.join(str(p) for p in leaked)}")
    return dest


def push_space(repo_id: str, *, private: bool = False, token: str | None = None, model_id: str | None = None,
               api: HfApi | None = None) -> str:
    """Build the Space in a temporary folder and upload it; sets the Space variable MODEL_ID.
    Any failure -> PushError with a one-line reason (nothing is left behind locally)."""
    try:
        hub_id = resolve_model_id(model_id)
    except ValueError as e:
        raise PushError(f"push of the Space {repo_id} failed: {e}") from None
    if hub_id is None:
        logger.warning("the Space variable MODEL_ID is left unchanged: set it to a Hub model id in the Space settings")
    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cxr-space-") as tmp:
        try:
            folder = _assemble(Path(tmp) / "space", hub_id)
            api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True, private=private)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="space",
                                     commit_message="Upload the chest X-ray demo (cxr_train.space)",
                                     delete_patterns=["cxr/**", "examples/**"])
            if hub_id is not None:
                api.add_space_variable(repo_id, "MODEL_ID", hub_id, description="Hub id of the model to serve")
        except Exception as e:  # network, auth, permissions, offline mode: all end the same way
            msg = (str(e).splitlines() or [""])[0] or type(e).__name__
            raise PushError(f"push of the Space {repo_id} failed ({type(e).__name__}: {msg[:300]}); fix the cause "
                            "(network access, HF_HUB_OFFLINE unset, `hf auth login` with a write token, the "
                            "repo id) and re-run python -m cxr_train.space") from None
    return getattr(info, "commit_url", str(info))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = ArgumentParser(description="Build the Gradio demo as a Hugging Face Space and push it.")
    ap.add_argument("--repo_id", help="Space id, user/space (required unless --dry_run)")
    ap.add_argument("--model_id", default=None, help=f"Hub model id the Space serves (default {DEFAULT_MODEL_ID})")
    ap.add_argument("--private", action="store_true", help="create the Space as private")
    ap.add_argument("--dry_run", metavar="DEST", default=None, help="only build the Space folder in DEST")
    args = ap.parse_args(argv)
    if args.dry_run:
        return answer(lambda: build_space_folder(args.dry_run, args.model_id), PushError, ValueError, FileExistsError)
    if not args.repo_id:
        ap.error("--repo_id is required (or use --dry_run DEST)")
    return answer(lambda: push_space(args.repo_id, private=args.private, model_id=args.model_id),
                  PushError, ValueError, FileExistsError)


if __name__ == "__main__":
    sys.exit(main())
