"""The decode sandbox: :class:`DecodePool`, its worker processes and their wire protocol.

Each worker is a fresh Python (``python -c "from cxr.imaging.sandbox import _worker_main; ..."``,
never a fork of the caller) that decodes one file at a time (:func:`cxr.imaging.load._decode`)
under the decode budget: ``DECODE_TIMEOUT_S`` seconds wall clock per file (enforced by the parent)
and ``DECODE_MEMORY_MB`` MB of address space above the worker's idle size (``RLIMIT_AS``, set by
the worker). A worker over either limit is killed and replaced; the caller gets an
:class:`~cxr.imaging.ImageLoadError`.

Wire protocol (stdin / stdout pipes, never a pickle): the worker writes ``b"R"`` once it is ready.
Request: ``struct ">IQ"`` (length of the JSON header, length of the file), the JSON header
``{"suffix", "max_pixels", "max_side"}``, then the file's bytes (the worker reduces a film
larger than ``max_side`` before replying, so the caller receives only the reduced pixels).
Reply: ``struct ">I"`` (length of the JSON, at most 4096 bytes), then ``{"ok": true, "mode": "L" | "RGB", "size": [width, height]}`` followed
by the raw pixel bytes, or ``{"ok": false, "error": message}`` (with ``"restart": true`` when the
worker ran out of memory and exits).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time

from PIL import Image

from .dicom import _quiet_pydicom
from .limits import ImageLoadError

DECODE_TIMEOUT_S = 2.0  # wall clock per file, in the worker (40 MP, the largest accepted: <= ~1 s)
DECODE_MEMORY_MB = 512  # address space per worker above its idle size (RLIMIT_AS)
DECODE_WORKERS = max(1, min(2, os.cpu_count() or 1))


class DecodePool:
    """A few long-lived worker processes that decode files under a time and memory limit.

    Each worker is a fresh Python (not a fork of the caller: no model, no threads) that
    imports this module, caps its address space at its idle size + ``memory_mb`` MB
    (``RLIMIT_AS``) and then decodes one file at a time. The caller sends the file's bytes
    and gets back a small JSON header and raw ``L``/``RGB`` pixel bytes (no pickle crosses
    the pipe). A worker that runs past ``timeout_s`` or dies (memory limit, crash) is killed
    and replaced; the caller gets an :class:`ImageLoadError`. Thread-safe: a caller waits for
    a free worker.
    """

    def __init__(self, workers: int = DECODE_WORKERS, *, timeout_s: float = DECODE_TIMEOUT_S,
                 memory_mb: int = DECODE_MEMORY_MB, start_timeout_s: float = 60.0):
        self.timeout_s, self.memory_mb, self.start_timeout_s = timeout_s, memory_mb, start_timeout_s
        self.pid = os.getpid()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all = [_Worker(memory_mb) for _ in range(max(1, workers))]
        for w in self._all:
            self._idle.put(w)

    def start(self) -> "DecodePool":
        """Start every worker now (otherwise each starts on first use)."""
        for w in self._all:
            w.spawn()
        return self

    def close(self) -> None:
        for w in self._all:
            w.kill()

    def alive(self) -> tuple[int, int]:
        """(workers whose process is running, workers): what a health check reports."""
        return sum(1 for w in self._all if w.proc is not None and w.proc.poll() is None), len(self._all)

    def decode(self, data: bytes, suffix: str, max_pixels: int, max_side: int | None = None) -> Image.Image:
        worker = self._idle.get()
        worker.sent_at = None
        try:
            return worker.decode(data, suffix, max_pixels, self.timeout_s, self.start_timeout_s, max_side)
        finally:   # the worker's time on this file: not the wait for a free or a starting worker, nor
            # the kill and restart of one over its limit (at most timeout_s is charged)
            _LAST.seconds = 0.0 if worker.sent_at is None else min(time.monotonic() - worker.sent_at, self.timeout_s)
            self._idle.put(worker)


_LAST = threading.local()


def last_decode_seconds(*, reset: bool = False) -> float:
    """Seconds a worker spent on this thread's latest :meth:`DecodePool.decode` (0 before any,
    and after ``reset``): what a decode cost the pool, without the wait for a free worker."""
    seconds = getattr(_LAST, "seconds", 0.0)
    if reset:
        _LAST.seconds = 0.0
    return seconds


class _WorkerGone(Exception):
    pass


class _Worker:
    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.sent_at: float | None = None   # when the current request was handed to the process

    def spawn(self) -> None:
        if self.proc is not None:
            return
        # the folder that holds the cxr package (this file is cxr/imaging/sandbox.py)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = f"from cxr.imaging.sandbox import _worker_main; _worker_main({int(self.memory_mb)})"
        # the worker imports this same cxr package (installed, or a source checkout)
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=path)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     close_fds=True, bufsize=0)
        self.ready = False
        try:  # 1 MB pipes (Linux): a 1.5-megapixel film crosses in two reads, not 24
            import fcntl

            for f in (self.proc.stdin, self.proc.stdout):
                fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass

    def kill(self) -> None:
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass

    def _read(self, n: int, deadline: float) -> bytearray:
        buf, view, got = bytearray(n), None, 0
        view = memoryview(buf)
        fd = self.proc.stdout.fileno()
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.readv(fd, [view[got:]]) if hasattr(os, "readv") else None
            if chunk is None:
                data = os.read(fd, n - got)
                view[got:got + len(data)] = data
                chunk = len(data)
            if chunk == 0:
                raise _WorkerGone
            got += chunk
        return buf

    def decode(self, data: bytes, suffix: str, max_pixels: int, timeout_s: float,
               start_timeout_s: float, max_side: int | None = None) -> Image.Image:
        for attempt in (1, 2):  # a worker that died while idle is replaced once
            self.spawn()
            try:
                if not self.ready:
                    self._read(1, time.monotonic() + start_timeout_s)
                    self.ready = True
                request = json.dumps({"suffix": suffix[:16], "max_pixels": int(max_pixels),
                                      "max_side": int(max_side) if max_side else None}).encode()
                self.proc.stdin.write(struct.pack(">IQ", len(request), len(data)) + request)
                self.sent_at = time.monotonic()
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (_WorkerGone, OSError, ValueError, TimeoutError):
                self.kill()
                if attempt == 2:
                    raise ImageLoadError("the image decoder is not available") from None
                continue
            break
        deadline = time.monotonic() + timeout_s
        try:
            size = struct.unpack(">I", self._read(4, deadline))[0]
            if size > 4096:
                raise _WorkerGone
            reply = json.loads(bytes(self._read(size, deadline)))
            if not reply.get("ok"):
                if reply.get("restart"):
                    self.kill()
                    self.spawn()
                raise ImageLoadError(_safe_text(reply.get("error")))
            mode, (width, height) = reply["mode"], reply["size"]
            bands = {"L": 1, "RGB": 3}[mode]
            if not (0 < width and 0 < height and width * height <= max_pixels):
                raise _WorkerGone
            pixels = self._read(width * height * bands, deadline)
        except TimeoutError:
            self.kill()
            self.spawn()  # its replacement starts now, in the background
            raise ImageLoadError(f"image takes too long to decode (the limit is {timeout_s:g} s)") from None
        except ImageLoadError:
            raise
        except Exception:  # noqa: BLE001 - died (memory limit, crash) or broke the protocol
            self.kill()
            self.spawn()
            raise ImageLoadError(f"image needs too much memory or time to decode "
                                 f"(the limit is {self.memory_mb} MB)") from None
        return Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)


def _safe_text(text) -> str:
    text = str(text or "could not read the image")[:300]
    return "".join(c if c.isprintable() else "?" for c in text)


_POOL: DecodePool | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> DecodePool:
    """The process's shared :class:`DecodePool` (a new one after a fork)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = DecodePool().start()  # workers import in the background meanwhile
        return _POOL


@atexit.register
def close_default_pool() -> None:
    """Stop the shared pool's workers (at exit, and when a server shuts down)."""
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _worker_main(memory_mb: int) -> None:
    """Decode loop of a :class:`DecodePool` worker (stdin: requests, stdout: replies)."""
    import resource
    import signal

    from .load import _decode  # here, not at the top: load imports this module

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.disable(logging.CRITICAL)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)  # nothing else may write into the protocol stream
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    base = _vm_size()
    if base:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = base + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def read(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = inp.read(min(n - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def reply(obj: dict) -> None:
        text = json.dumps(obj).encode()
        out.write(struct.pack(">I", len(text)) + text)

    out.write(b"R")
    while True:
        try:
            size, length = struct.unpack(">IQ", read(12))
            request = json.loads(read(size))
            data = read(length)
        except EOFError:
            return
        try:
            with _quiet_pydicom():
                image = _decode(data, request.get("suffix", ""), int(request["max_pixels"]), request.get("max_side"))
            del data
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
        except ImageLoadError as e:
            reply({"ok": False, "error": str(e)})
            continue
        except MemoryError:
            reply({"ok": False, "restart": True,
                   "error": f"image needs too much memory to decode (the limit is {memory_mb} MB)"})
            return
        except Exception:  # noqa: BLE001 - never leak the text
            reply({"ok": False, "error": "could not read the image"})
            continue
        text = json.dumps({"ok": True, "mode": image.mode, "size": list(image.size)}).encode()
        width, height = image.size
        if width * height * len(image.mode) <= 1 << 23:  # one write: header and pixels
            out.write(struct.pack(">I", len(text)) + text + image.tobytes())
        else:  # in strips: no full-size copy of the pixels
            out.write(struct.pack(">I", len(text)) + text)
            step = max(1, (1 << 22) // (width * len(image.mode)))
            for y in range(0, height, step):
                out.write(image.crop((0, y, width, min(height, y + step))).tobytes())
        del image
