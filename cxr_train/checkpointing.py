"""Crash-safe resume: pick the newest COMPLETE ``checkpoint-N`` folder, ignore and remove
partial ones.

The Trainer writes a checkpoint in place (weights, then optimizer / scheduler / RNG state,
then ``trainer_state.json`` last), so a run killed during a save leaves a ``checkpoint-N``
folder that ``get_last_checkpoint`` still picks, and every resume then crashes
(``FileNotFoundError: .../trainer_state.json`` or ``Can't find a valid checkpoint``). Here a
checkpoint counts as complete only if every file a resume reads is present and intact:

* ``trainer_state.json`` parses and its ``global_step`` is the folder's N;
* the weights (``model.safetensors``, every shard of ``model.safetensors.index.json`` or
  ``adapter_model.safetensors``) have a valid safetensors header and the declared size;
* unless the run saves the model only: ``optimizer.pt``, ``scheduler.pt`` and
  ``rng_state*.pth`` are present and pass their zip CRC check (``torch.save`` writes zip
  archives; nothing is unpickled to check them).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

from cxr.locate import WEIGHT_FILES, index_problem, safetensors_ok

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _weights_ok(folder: Path) -> bool:
    if (folder / "model.safetensors.index.json").is_file():
        return index_problem(folder) is None
    present = [folder / w for w in WEIGHT_FILES if (folder / w).is_file()]
    return bool(present) and all(safetensors_ok(p) for p in present)


def _zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def checkpoint_step(folder: Path) -> int | None:
    m = _CHECKPOINT.match(Path(folder).name)
    return int(m.group(1)) if m else None


def incomplete_reason(folder: str | Path, *, model_only: bool = False) -> str | None:
    """``None`` if ``folder`` is a complete checkpoint, else what is missing or broken."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "trainer_state.json is truncated or unreadable"
    step = checkpoint_step(folder)
    if not isinstance(state, dict) or (step is not None and state.get("global_step") != step):
        return "trainer_state.json does not match the folder name"
    if not _weights_ok(folder):
        return "weights missing or truncated"
    if not model_only:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (folder / name).is_file() or not _zip_ok(folder / name):
                return f"{name} missing or truncated"
        rng = list(folder.glob("rng_state*.pth"))
        if not rng or not all(_zip_ok(p) for p in rng):
            return "rng_state missing or truncated"
    return None


def find_resume_checkpoint(output_dir: str | Path, *, model_only: bool = False,
                           clean: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (``None`` if there is none).

    Newer incomplete ones (a run killed while saving) are logged and, with ``clean``,
    removed, so the resumed run can write that step again from scratch.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    folders = sorted((p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                     key=checkpoint_step, reverse=True)
    for folder in folders:
        reason = incomplete_reason(folder, model_only=model_only)
        if reason is None:
            return str(folder)
        logger.warning("ignoring incomplete checkpoint %s (%s)%s", folder.name, reason,
                       "; removing it" if clean else "")
        if clean:
            shutil.rmtree(folder, ignore_errors=True)
    return None


def resolve_resume(value, output_dir: str | Path, *, model_only: bool = False):
    """``--resume_from_checkpoint`` -> what ``Trainer.train(resume_from_checkpoint=...)`` gets.

    ``true`` / ``latest`` / ``last``: the newest complete checkpoint, or ``None`` (train from
    the start, with a warning) when there is none. ``false`` / ``none`` / empty: ``None``. A
    given folder must be complete, else ``ValueError`` naming what is wrong; ``None`` and
    ``False`` pass through.
    """
    if value is True or (isinstance(value, str) and value.lower() in ("true", "latest", "last")):
        found = find_resume_checkpoint(output_dir, model_only=model_only)
        if found is None:
            logger.warning("no complete checkpoint in %s: training from the start", output_dir)
        else:
            logger.info("resuming from %s", Path(found).name)
        return found
    if isinstance(value, str) and value.lower() in ("false", "none", ""):
        return None
    if isinstance(value, (str, Path)):
        reason = incomplete_reason(value, model_only=model_only)
        if reason is not None:
            raise ValueError(f"cannot resume from {Path(value).name}: incomplete checkpoint ({reason})")
    return value
