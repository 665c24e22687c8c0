"""Progress bars with counts for long work outside the Trainer (OOD fitting, scoring thousands of
films, the studies' runs): one rule for when a bar shows, one look.

A bar shows on a terminal only: not when stderr is redirected (a log file, CI, a test), and
never with ``CXR_PROGRESS=0``; ``CXR_PROGRESS=1`` shows it even without a terminal. The Trainer's
own bar follows ``--disable_tqdm``; callers pass ``enabled=False`` to hide theirs with it.

    from cxr_train.progress import bar, in_chunks, predict_batch

    for chunk in in_chunks(files, 64, desc="features", unit="film"):    # counts films, not batches
        ...
    results = predict_batch(predictor, files, batch_size=32, desc="scoring")   # same results, a bar
    for run in bar(runs, desc="runs", unit="run"):
        ...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence

ENV = "CXR_PROGRESS"


def shown(enabled: bool = True) -> bool:
    """Whether a bar shows: ``enabled`` and ``CXR_PROGRESS`` is not 0 (1 forces it on), else a terminal on stderr."""
    if not enabled:
        return False
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
        unit: str = "film", enabled: bool = True):
    """A tqdm bar on stderr counting ``unit``s (``n/total``, rate, time left); a silent no-op bar
    when :func:`shown` says no. Use it as an iterator or a context manager with ``.update(n)``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not shown(enabled), dynamic_ncols=True,
                file=sys.stderr)


def in_chunks(items: Sequence, size: int, *, desc: str | None = None, unit: str = "film",
              enabled: bool = True) -> Iterator[Sequence]:
    """``items[i:i + size]`` in order, the bar counting items (a film at a time, not a batch)."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    with bar(total=len(items), desc=desc, unit=unit, enabled=enabled) as b:
        for i in range(0, len(items), size):
            chunk = items[i:i + size]
            yield chunk
            b.update(len(chunk))


def predict_batch(predictor, sources, *, batch_size: int = 32, desc: str | None = None,
                  enabled: bool = True) -> list:
    """``predictor.predict_batch(sources, batch_size)`` with a bar counting films. The films go in
    slices of one batch per worker thread, so the batches, their parallelism and the results
    (order included) are those of a single ``predict_batch`` call."""
    import torch

    sources = list(sources)
    per_slice = batch_size * max(1, torch.get_num_threads())
    out: list = []
    for chunk in in_chunks(sources, per_slice, desc=desc, unit="film", enabled=enabled):
        out += predictor.predict_batch(chunk, batch_size=batch_size)
    return out
