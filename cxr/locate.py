"""Is a model name a local folder or a Hub id? A name that looks like a path but is not on
disk is reported as a missing folder, not as a Hub connection error."""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[\w.-]{1,96}$")


class MissingFolderError(FileNotFoundError):
    """A local model folder that does not exist."""


def looks_like_path(name: str) -> bool:
    if name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or "\\" in name or os.path.isabs(name):
        return True
    if not HUB_ID.match(name) or ".." in name:
        return True
    first = name.split("/", 1)[0]
    return "/" in name and Path(first).is_dir()    # e.g. models/typo beside an existing models/


def local_folder(name: str | os.PathLike) -> Path | None:
    """The local folder ``name`` names, or None when it is a Hub id.
    Raises MissingFolderError when it looks like a path that does not exist."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_path(text):
        raise MissingFolderError(f"model folder not found: {text} (no such folder)")
    return None
