"""Decode once: every training film decoded by :func:`cxr.imaging.load_image` and resized by the
model's own image processor into an on-disk uint8 store, so an epoch reads bytes, not JPEGs.

- :class:`PixelSpec` splits the saved image processor at its uint8 boundary: ``resize`` (what the
  processor does to a decoded film before it becomes float: the torchvision backend's ``resize``,
  or a timm processor's PIL transforms before ``ToTensor``) runs once, when a film enters the
  store; ``normalise`` (the float conversion, rescale and normalisation, the same operations in
  the same order) runs on every batch, on the training device. ``normalise(resize(film))``
  equals :func:`cxr.preprocessing.pixel_values` (the serving definition) exactly.
- :class:`FilmStore` is one folder per (processor resize, output size, loader version):
  ``pixels.u8`` (fixed-size H x W x 3 uint8 records, appended) and ``index.json`` (film key ->
  record). A film's key is its path, size and modification time (or a hash of its bytes for
  datasets that embed them), so the store is reused by CV folds, epochs and later runs, a
  changed file is decoded again, and a changed size/resample/loader is another folder. Records of
  films that changed stay behind unused: delete the folder to reclaim the space.
- :class:`CachedImages` is a torch ``Dataset`` over a split's records: batches are read with
  ``os.preadv`` into one buffer (pages stay in the OS page cache, not in this process: RSS
  stays flat whatever the dataset size) and handed on as uint8 (N, 3, H, W) channels_last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import DataError

logger = logging.getLogger(__name__)

# Bump when load_image's output or the store layout changes: older stores are then ignored.
LOADER_VERSION = "1"


def default_cache_dir() -> Path:
    """$CXR_CACHE_DIR, else ``cxr-films`` inside the datasets cache ($HF_DATASETS_CACHE, else
    ~/.cache/huggingface/datasets): the store is a derived dataset cache, and lives beside it."""
    if os.environ.get("CXR_CACHE_DIR"):
        return Path(os.environ["CXR_CACHE_DIR"])
    hf = os.environ.get("HF_DATASETS_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "datasets"
    return Path(hf) / "cxr-films"
_FLUSH_SECONDS = 30.0       # index checkpoint interval while building (an interrupted build resumes)


class CacheError(DataError):
    """The film store cannot be built (unreadable films, a corrupt store, a full disk): a
    ``DataError``, so the command line reports it as one clear line."""


# ---------------------------------------------------------------- the processor, split at uint8

@dataclass
class PixelSpec:
    """One image processor as two halves: ``resize`` (decoded RGB film -> H x W x 3 uint8, once)
    and ``normalise`` (uint8 or 0..255 float batch (N, 3, H, W) -> float32 model input)."""

    kind: str                                  # "torchvision" | "timm"
    size: tuple[int, int]                      # (height, width)
    resize: Callable = field(repr=False)
    normalise: Callable = field(repr=False)
    fingerprint: dict = field(default_factory=dict)

    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, "size": self.size, "loader": LOADER_VERSION, **self.fingerprint},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        return f"{self.kind}-{self.size[0]}x{self.size[1]}-v{LOADER_VERSION}-{self.key()}"


def build_pixel_spec(processor) -> PixelSpec | None:
    """The split of ``processor`` at the uint8 boundary, or None for a processor this module does
    not know how to split (training then decodes per epoch, as before)."""
    from cxr.preprocessing import has_fast_path

    if has_fast_path(processor):
        return _torchvision_spec(processor)
    if type(processor).__name__ == "TimmWrapperImageProcessor":
        return _timm_spec(processor)
    return None


def _torchvision_spec(processor) -> PixelSpec:
    from cxr.preprocessing import _rescale_and_normalize, to_uint8_batch

    size = (int(processor.size.height), int(processor.size.width))

    def resize(image) -> np.ndarray:
        x = processor.resize(to_uint8_batch([image]), size=processor.size, resample=processor.resample)
        return x[0].permute(1, 2, 0).numpy()

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return _rescale_and_normalize(processor, x)

    fp = {"resample": int(processor.resample) if processor.resample is not None else None,
          "class": type(processor).__name__}
    return PixelSpec("torchvision", size, resize, normalise, fp)


def _timm_spec(processor) -> PixelSpec | None:
    steps = list(processor.val_transforms.transforms)
    names = [type(s).__name__ for s in steps]
    cut = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor")), None)
    if cut is None or any(n != "Normalize" for n in names[cut + 1:]):
        return None
    from torchvision import transforms as T

    before, after = T.Compose(steps[:cut]), steps[cut + 1:]
    h, w = (int(v) for v in processor.data_config["input_size"][-2:])

    def resize(image) -> np.ndarray:
        out = np.asarray(before(image), dtype=np.uint8)
        if out.shape != (h, w, 3):
            raise CacheError(f"the processor made a {out.shape} film, expected {(h, w, 3)}")
        return out

    def normalise(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).div(255)       # ToTensor's conversion, batched
        for step in after:                     # Normalize: sub_/div_ per channel, batched
            x = step(x)
        return x

    fp = {"transforms": repr(before), "normalise": [repr(s) for s in after]}
    return PixelSpec("timm", (h, w), resize, normalise, fp)


# ---------------------------------------------------------------- film keys

def film_key(item: dict) -> str:
    """Identity of one undecoded film (a datasets Image dict): path + size + mtime, or the
    hash of its bytes when the dataset embeds them."""
    data = item.get("bytes")
    if data:
        return "b" + hashlib.blake2b(data, digest_size=16).hexdigest()
    path = item.get("path")
    if not path:
        raise CacheError("a film has neither bytes nor a path")
    try:
        st = os.stat(path)
    except OSError as e:
        raise CacheError(f"cannot read {Path(path).name}: {e.strerror or type(e).__name__}") from None
    blob = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return "p" + hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------- the store

class FilmStore:
    """Decoded, resized films of one :class:`PixelSpec`, on disk (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None, spec: PixelSpec):
        self.spec = spec
        self.folder = Path(root or default_cache_dir()) / spec.folder_name()
        self.pixels_path = self.folder / "pixels.u8"
        self.index_path = self.folder / "index.json"
        h, w = spec.size
        self.shape = (h, w, 3)
        self.record = h * w * 3

    # -- index
    def _read_index(self) -> dict[str, int]:
        if not self.index_path.exists():
            return {}
        try:
            meta = json.loads(self.index_path.read_text())
            if meta.get("shape") != list(self.shape) or meta.get("loader") != LOADER_VERSION:
                raise ValueError("shape or loader version differ")
            index = meta["films"]
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("film store %s: unreadable index (%s); rebuilding it", self.folder, e)
            return {}
        n = len(index)
        if self.pixels_path.exists() and self.pixels_path.stat().st_size >= n * self.record:
            return index
        logger.warning("film store %s: index and pixels disagree; rebuilding it", self.folder)
        return {}

    def _write_index(self, index: dict[str, int]) -> None:
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"shape": list(self.shape), "loader": LOADER_VERSION,
                                   "spec": self.spec.fingerprint, "films": index}, default=str))
        os.replace(tmp, self.index_path)

    def __len__(self) -> int:
        return len(self._read_index())

    @contextlib.contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "w") as fh:
            try:
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX: one process at a time, unchecked
                pass
            yield

    # -- building
    def rows(self, images, names=None, *, num_workers: int = 0, desc: str = "films") -> np.ndarray:
        """Record numbers of ``images`` (undecoded datasets Image dicts, in order), decoding and
        appending the films not stored yet. Unreadable films: one :class:`CacheError` naming them
        (nothing of theirs is stored)."""
        keys = [film_key(it) for it in images]
        with self._locked():
            index = self._read_index()
            missing = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in index}.values())
            if missing:
                self._append(index, [images[i] for i in missing], [keys[i] for i in missing],
                             names=[names[i] for i in missing] if names is not None else None,
                             num_workers=num_workers, desc=desc)
        logger.info("film store %s: %d films, %d decoded now", self.folder.name, len(keys), len(missing))
        return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))

    def _append(self, index, images, keys, names, num_workers, desc) -> None:
        n0 = len(index)
        loader = torch.utils.data.DataLoader(_DecodeFilms(images, self.spec), batch_size=None,
                                             num_workers=num_workers, collate_fn=_identity)
        bad, new, flushed = [], {}, time.monotonic()
        try:
            with open(self.pixels_path, "ab") as fh:
                fh.truncate(n0 * self.record)        # drop a record half-written by an interrupted build
                for i, (pixels, err) in enumerate(loader):
                    if err is not None:
                        name = names[i] if names is not None else (images[i].get("path") or f"film {i}")
                        bad.append(f"{Path(str(name)).name}: {err}")
                        continue
                    if pixels.shape != self.shape or pixels.dtype != np.uint8:
                        raise CacheError(f"the processor's resize made a {pixels.dtype} {pixels.shape} film, "
                                         f"expected uint8 {self.shape}")
                    fh.write(pixels.tobytes())
                    new[keys[i]] = n0 + len(new)
                    if time.monotonic() - flushed > _FLUSH_SECONDS:
                        fh.flush()
                        self._write_index({**index, **new})
                        flushed = time.monotonic()
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise CacheError(f"cannot write the film store {self.folder}: {e.strerror or e}") from None
        index.update(new)
        self._write_index(index)
        logger.info("film store: %d %s decoded into %s", len(new), desc, self.folder)
        if bad:
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            raise CacheError(f"{len(bad)} unreadable image(s): " + "; ".join(bad[:10]) + more)

    # -- reading
    def read(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Records ``rows`` -> (N, H, W, 3) uint8 (into ``out`` when given)."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        _pread_records(_fd(self.pixels_path), rows, self.record, out)
        return out


def _identity(x):
    return x


class _DecodeFilms(torch.utils.data.Dataset):
    """load_image + spec.resize for each film; an unreadable film yields its error, not an exception."""

    def __init__(self, images, spec: PixelSpec):
        self.images, self.spec = images, spec

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from cxr.imaging import ImageLoadError, load_image

        item = self.images[i]
        try:  # training data: chosen by the user, decoded in-process (same checks as serving)
            image = load_image(item.get("bytes") or item.get("path"), isolate=False)
        except ImageLoadError as e:
            return None, str(e)
        return np.ascontiguousarray(self.spec.resize(image)), None


_FDS: dict[tuple[int, str], int] = {}


def _fd(path: Path) -> int:
    """One read-only descriptor per (process, file): DataLoader workers open their own."""
    key = (os.getpid(), str(path))
    fd = _FDS.get(key)
    if fd is None:
        fd = _FDS[key] = os.open(path, os.O_RDONLY)
    return fd


def _pread_records(fd: int, rows: np.ndarray, record: int, out: np.ndarray) -> None:
    flat = out.reshape(len(rows), record)
    for k, r in enumerate(rows.tolist()):
        view = memoryview(flat[k])
        got = os.preadv(fd, [view], r * record)
        if got != record:
            raise CacheError(f"film store truncated: record {r} has {got} of {record} bytes")


# ---------------------------------------------------------------- the dataset

class CachedImages(torch.utils.data.Dataset):
    """One split as film-store records: items ``{"pixel_values": uint8 (3, H, W), "labels": int}``;
    ``__getitems__`` (what torch's DataLoader calls for a batch) returns the collated batch
    ``{"pixel_values": uint8 (N, 3, H, W) channels_last, "labels": int64 (N,)}`` straight from
    one read buffer."""

    def __init__(self, store: FilmStore, rows: np.ndarray, labels, transform=None):
        self.pixels_path, self.shape, self.record = store.pixels_path, store.shape, store.record
        self.transform = transform      # uint8 (N, 3, H, W) -> the same (the training split's acquisition changes)
        self.rows = np.asarray(rows, dtype=np.int64)
        labels = np.asarray(labels)
        # class ids (one label per film), or multi-label codes (N, K) as float32 (cxr_train.labels)
        self.labels = labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64)
        if len(self.rows) != len(self.labels):
            raise ValueError("rows and labels differ in length")

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, idx) -> np.ndarray:
        out = np.empty((len(idx), *self.shape), dtype=np.uint8)
        _pread_records(_fd(self.pixels_path), self.rows[idx], self.record, out)
        return out

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self._read([int(i)])).permute(0, 3, 1, 2)
        if self.transform is not None:
            x = self.transform(x)
        y = self.labels[int(i)]
        return {"pixel_values": x[0], "labels": torch.from_numpy(y.copy()) if y.ndim else int(y)}

    def __getitems__(self, idx) -> dict:
        idx = np.asarray(idx, dtype=np.int64)
        x = torch.from_numpy(self._read(idx)).permute(0, 3, 1, 2)   # NHWC bytes = NCHW channels_last
        if self.transform is not None:
            x = self.transform(x)
        return {"pixel_values": x, "labels": torch.from_numpy(self.labels[idx])}
