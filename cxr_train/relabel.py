"""A prepared image folder with labels taken from the file names (issue #29).

    python -m cxr_train.relabel --data outputs/holdout_data/holdout --out outputs/holdout_data_3class/holdout \\
        --rule kermany3

Every image under ``--data`` (``<split>/<LABEL>/<file>`` or ``<LABEL>/<file>``) is linked (a symbolic
link; ``--copy`` copies) to ``--out`` with the same leading folders and its label folder replaced by
the label its file name gives (``--rule``: a preset such as ``kermany3``, or ``LABEL=REGEX`` pairs;
:class:`cxr_train.labels.FilenameLabeler`, the rules ``train_hf.py --label_from_filename`` applies).
The result is an ordinary ``<LABEL>/<image>`` folder: ``train_hf.py`` (without the flag),
``--external_dataset``, ``cxr-predict`` and other scorers read it as it is. Patient ids stay in the
file names, so patient-grouped splits are unchanged.

Nothing is written unless every file matches a rule and ``--out`` is new or empty.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from cxr.locate import image_files

from .labels import FILENAME_PRESETS, FilenameLabeler, LabelError


class RelabelError(ValueError):
    """Bad input; nothing was written."""


def plan(data: str | os.PathLike, rule) -> list[tuple[Path, Path]]:
    """(source file, destination relative to --out) for every image of ``data``."""
    data = Path(data)
    if not data.is_dir():
        raise RelabelError(f"--data {data}: no such folder")
    files = image_files(data)
    if not files:
        raise RelabelError(f"--data {data}: no images")
    try:
        labeler = rule if isinstance(rule, FilenameLabeler) else FilenameLabeler.parse(rule)
        labels = labeler.label_all([f.name for f in files], where=str(data))
    except LabelError as e:
        raise RelabelError(str(e)) from None
    out = []
    for f, label in zip(files, labels):
        rel = f.relative_to(data)
        lead = rel.parent.parent if len(rel.parts) >= 2 else Path()   # <split>/ kept, <LABEL>/ replaced
        out.append((f, lead / label / f.name))
    dests = Counter(d for _, d in out)
    clash = [str(d) for d, n in dests.items() if n > 1]
    if clash:
        raise RelabelError(f"{len(clash)} file name(s) would land twice in the same label folder ({', '.join(clash[:3])})")
    return out


def relabel(data, out, rule, *, copy: bool = False) -> dict:
    """Write the relabelled folder; returns {split-or-".": {label: films}}."""
    moves = plan(data, rule)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RelabelError(f"--out {out}: exists and is not an empty folder (nothing is overwritten)")
    counts: dict = {}
    for src, rel in moves:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copyfile(src, dst)
        else:
            dst.symlink_to(src.resolve())
        key = str(rel.parent.parent) if rel.parent.parent != Path() else "."
        counts.setdefault(key, Counter())[rel.parent.name] += 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}


def main(argv: list[str] | None = None) -> int:
    from cxr.cli import ArgumentParser, fail

    ap = ArgumentParser(prog="python -m cxr_train.relabel",
                        description="Copy an image folder with labels from the file names (research and "
                                    "education only: not a medical device).")
    ap.add_argument("--data", required=True, help="image folder <split>/<LABEL>/<file> or <LABEL>/<file>")
    ap.add_argument("--out", required=True, help="the relabelled folder to write (new or empty)")
    ap.add_argument("--rule", required=True, nargs="+",
                    help=f"a preset ({', '.join(FILENAME_PRESETS)}) or LABEL=REGEX pairs (first match wins)")
    ap.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    a = ap.parse_args(argv)
    try:
        counts = relabel(a.data, a.out, a.rule if len(a.rule) > 1 else a.rule[0], copy=a.copy)
    except RelabelError as e:
        return fail(f"{e} (nothing was written)")
    print(json.dumps({"out": str(a.out), "films": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
