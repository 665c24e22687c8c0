"""The app's files: where Gradio stores uploads and result files (a private cache folder,
GRADIO_TEMP_DIR), which of them a handler may open (:func:`uploaded_path`, the one server-side
rule for every file argument of every endpoint), when they are deleted (after their prediction,
and by the Janitor's sweep after UPLOAD_TTL_S; the whole folder at shutdown or on SIGTERM /
SIGHUP / SIGINT), and what an upload request may hold (the UploadGuard ASGI middleware: one
file of at most 10 MB, parsed as it streams, nosniff, attachments).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

logger = logging.getLogger("cxr.app")

MAX_FILE_SIZE = "10mb"
MAX_REQUEST_BYTES = 10 * 1024 * 1024 + 64 * 1024   # one 10 MB file plus multipart overhead
MAX_FILES_PER_REQUEST = 1
UPLOAD_TTL_S = 300         # uploads and result files older than this are deleted (env CXR_UPLOAD_TTL_S)
SWEEP_EVERY_S = 30


class Janitor:
    """Owns the app's file lifecycle (Gradio's own delete_cache is off: its sweeper could die
    on a set changed during iteration). A daemon thread deletes files in the app's cache
    folder older than ``ttl`` every ``every`` seconds; an error is logged and the next round
    runs anyway. Files present right after start-up (example thumbnails) are kept until
    shutdown, where the whole folder is removed."""

    def __init__(self, root: Path, ttl: float = UPLOAD_TTL_S, every: float = SWEEP_EVERY_S):
        self.root, self.ttl, self.every = Path(root), ttl, every
        self.protected: set[str] = set()
        self.blocks: list[gr.Blocks] = []
        self.rounds = self.removed = self.errors = 0
        self._pending: dict[str, int] = {}      # upload path -> uploads not yet read (same bytes, same path)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def protect_existing(self) -> None:
        self.protected |= {str(p) for p in self.root.rglob("*") if p.is_file()}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cxr-janitor", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - never die: log and sweep again next round
                self.errors += 1
                logger.exception("upload sweep failed; retrying in %.0f s", self.every)

    def sweep(self, max_age: float | None = None) -> int:
        """Delete unprotected files older than ``max_age`` (default ttl); returns how many."""
        cutoff = time.time() - (self.ttl if max_age is None else max_age)
        removed = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames:
                path = os.path.join(dirpath, name)
                if path in self.protected:
                    continue
                try:
                    if os.lstat(path).st_mtime <= cutoff:
                        os.unlink(path)
                        removed.append(path)
                        with self._lock:
                            self._pending.pop(path, None)
                except FileNotFoundError:
                    pass
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            if dirpath != str(self.root):
                try:
                    os.rmdir(dirpath)       # only empty folders
                except OSError:
                    pass
        for blocks in list(self.blocks):    # Gradio's per-app sets of served paths would grow forever
            for s in [getattr(blocks, "upload_file_set", set()), *getattr(blocks, "temp_file_sets", [])]:
                for path in removed:
                    s.discard(path)
        self.rounds += 1
        self.removed += len(removed)
        return len(removed)

    def register_upload(self, paths) -> None:
        """Gradio stores an upload at <sha256 of its bytes>/<name>: two clients sending the same
        file share one path, so it is deleted only when every such upload has been read."""
        with self._lock:
            for path in paths:
                p = os.path.realpath(str(path))
                self._pending[p] = self._pending.get(p, 0) + 1

    def is_pending(self, path: str) -> bool:
        """True while ``path`` (canonical) is an upload this app stored and has not read yet."""
        with self._lock:
            return self._pending.get(path, 0) > 0

    def discard(self, path: str | None) -> None:
        """Delete one upload now (after its prediction), if it lies in the app's cache folder
        and no other upload of the same bytes is still waiting to be read."""
        if not path:
            return
        p = os.path.realpath(path)
        if p in self.protected or not p.startswith(str(self.root) + os.sep):
            return
        with self._lock:
            left = self._pending.pop(p, 1) - 1
            if left > 0:
                self._pending[p] = left
                return
        try:
            os.unlink(p)
        except OSError:
            pass

    def shutdown(self) -> None:
        self._stop.set()
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------ the one rule for file arguments

NOT_UPLOADED = "Please upload the film with this app first (PNG, JPEG or DICOM, up to 10 MB)."


class NotUploaded(ValueError):
    """A file argument that is not a file this app stored for an upload (one message, whatever
    the reason: it says nothing about the path, whether it exists, or what it is)."""

    def __init__(self):
        super().__init__(NOT_UPLOADED)


def uploaded_path(file) -> str:
    """The path of a file this app stored in its own cache folder for an upload, or
    :class:`NotUploaded`. Every file argument of every endpoint (API functions and page events
    alike) goes through here before anything opens it: Gradio checks paths only for event
    listeners with exact ``FileData`` metadata, an API function receives the client's raw value.

    Accepted: a ``str`` path, a ``{"path": ...}`` dict or a ``gradio.FileData``, whose path is
    absolute and already canonical (no ``..``, ``.``, doubled slashes or symbolic link in any
    segment: ``os.path.realpath`` gives it back unchanged), lies inside this app's cache folder,
    was registered by :class:`UploadGuard` when the upload route stored it and is not read yet,
    and is a regular file. Anything else - relative paths, paths outside the cache, symbolic
    links into it, results the app wrote itself, files already read - is refused alike."""
    path = file.get("path") if isinstance(file, dict) else getattr(file, "path", file)
    if not isinstance(path, str) or not path or "\0" in path or not os.path.isabs(path):
        raise NotUploaded()
    jan = janitor()
    if os.path.realpath(path) != path or not path.startswith(str(jan.root) + os.sep) or not jan.is_pending(path):
        raise NotUploaded()
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise NotUploaded()
    except OSError:
        raise NotUploaded() from None
    return path


_JANITOR: Janitor | None = None
_JANITOR_LOCK = threading.Lock()


def janitor() -> Janitor:
    """The process's Janitor, with its own private Gradio cache folder (GRADIO_TEMP_DIR)."""
    global _JANITOR
    with _JANITOR_LOCK:
        if _JANITOR is None or _JANITOR._stop.is_set():
            root = Path(tempfile.mkdtemp(prefix="cxr-app-")).resolve()
            os.environ["GRADIO_TEMP_DIR"] = str(root)
            _JANITOR = Janitor(root, float(os.environ.get("CXR_UPLOAD_TTL_S", UPLOAD_TTL_S)))
            atexit.register(_JANITOR.shutdown)
        return _JANITOR


REST_PREDICT_PATH = "/api/v1/predict"  # the REST route (app.rest) takes its file under the same rules
MAX_FORM_FIELDS = 4                    # small non-file fields a request may add (REST options)
MAX_FIELD_BYTES = 1024
MAX_BODY_BYTES = 1024 * 1024           # any other request body (JSON calls): far above what the page sends
SPOOL_IN_MEMORY = 256 * 1024           # an upload body beyond this waits on disk, in the cache folder
REPLAY_CHUNK = 64 * 1024


class _Refusal(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status, self.text = status, text


class _UploadCheck:
    """Parses a multipart/form-data body as it streams (python-multipart's parser, the one
    Starlette and Gradio use) and refuses, as soon as it can tell: more than
    ``MAX_FILES_PER_REQUEST`` file parts, more than ``MAX_FORM_FIELDS`` other fields or a field
    over ``MAX_FIELD_BYTES``, a part that is not ``form-data`` with a name, an RFC 2231
    ``filename*`` parameter, a malformed or unfinished body. Whatever the spelling of a header,
    every part counts."""

    def __init__(self, content_type: bytes):
        from python_multipart.multipart import MultipartParser, parse_options_header

        self._parse_options = parse_options_header
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind.lower() != b"multipart/form-data" or not boundary:
            raise _Refusal(400, "an upload must be multipart/form-data")
        self.files = self.fields = 0
        self._field = self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._is_file = False
        self._part_bytes = 0
        self.done = False
        callbacks = {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                     "on_header_value": self._header_value, "on_header_end": self._header_end,
                     "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                     "on_end": self._end}
        self.parser = MultipartParser(boundary, callbacks, max_header_count=8, max_header_size=1024)

    def feed(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        if self.done and chunk.strip():
            raise _Refusal(400, "malformed upload: data after the closing boundary")
        try:
            self.parser.write(chunk)
        except _Refusal:
            raise
        except (MultipartParseError, ValueError):
            raise _Refusal(400, "malformed upload") from None

    def finish(self) -> None:
        if not self.done:
            raise _Refusal(400, "malformed upload: the body ends before its closing boundary")
        if self.files == 0:
            raise _Refusal(400, "no file in the upload")

    def _part_begin(self):
        self._headers, self._part_bytes = {}, 0

    def _header_field(self, data, start, end):
        self._field += data[start:end]

    def _header_value(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_finished(self):
        disposition = self._headers.get(b"content-disposition", b"")
        kind, options = self._parse_options(disposition)
        options = {k.lower(): v for k, v in options.items()}
        if b"filename*" in disposition.lower():
            raise _Refusal(400, "malformed upload: use a plain filename parameter")
        if kind.lower() != b"form-data" or not options.get(b"name"):
            raise _Refusal(400, "malformed upload: every part must be form-data with a name")
        self._is_file = b"filename" in options
        if self._is_file:
            self.files += 1
            if self.files > MAX_FILES_PER_REQUEST:
                raise _Refusal(413, f"too many files: at most {MAX_FILES_PER_REQUEST} per upload request")
        else:
            self.fields += 1
            if self.fields > MAX_FORM_FIELDS:
                raise _Refusal(400, "too many form fields")

    def _part_data(self, data, start, end):
        self._part_bytes += end - start
        if not self._is_file and self._part_bytes > MAX_FIELD_BYTES:
            raise _Refusal(400, "form field too large")

    def _end(self):
        self.done = True


class UploadGuard:
    """ASGI middleware, in front of every route.

    Upload requests (Gradio's ``.../upload`` and the REST ``/api/v1/predict``): the body is
    parsed as it streams (:class:`_UploadCheck`) and held in a spooled file - in memory up to
    ``SPOOL_IN_MEMORY`` bytes, beyond that on disk in the app's cache folder - so 40 clients
    sending 10 MB at once cost ~10 MB of memory, not 400. At most MAX_FILES_PER_REQUEST file of
    MAX_REQUEST_BYTES: 413 beyond, 400 for a malformed body, before the app stores anything;
    only a body that passed is replayed to the route. Any other request body is capped at
    MAX_BODY_BYTES (413). Every response carries ``X-Content-Type-Options: nosniff``; files
    served from the cache are attachments (an ``<img>`` still shows them, a browser never
    renders them as a page)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        is_file_route = "/file=" in path
        is_upload = scope.get("method") == "POST" and (path.rstrip("/").endswith("/upload")
                                                       or path.rstrip("/") == REST_PREDICT_PATH)
        response_body: list[bytes] = []
        status = [0]
        spool = None
        try:
            if is_upload:
                spool = await self._read_upload(scope, receive)
                receive = self._replay(spool, receive)
            elif scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
                receive = await self._read_small_body(receive)
        except _Refusal as e:
            return await self._refuse(send, e.status, e.text)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                drop = {b"x-content-type-options"} | ({b"content-disposition"} if is_file_route else set())
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in drop]
                headers.append((b"x-content-type-options", b"nosniff"))
                if is_file_route:
                    headers.append((b"content-disposition", b"attachment"))
                message = dict(message, headers=headers)
                status[0] = message.get("status", 0)
            elif (is_upload and path.rstrip("/").endswith("/upload") and message["type"] == "http.response.body"
                  and status[0] == 200):
                response_body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    try:
                        janitor().register_upload(json.loads(b"".join(response_body)))
                    except (ValueError, TypeError):
                        pass
            await send(message)

        try:
            return await self.app(scope, receive, send_with_headers)
        finally:
            if spool is not None:
                spool.close()

    @staticmethod
    async def _read_upload(scope, receive):
        headers = dict(scope.get("headers", []))
        too_big = _Refusal(413, "upload too large: at most one file of 10 MB per request")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_REQUEST_BYTES:
            raise too_big
        check = _UploadCheck(headers.get(b"content-type", b""))
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=janitor().root)
        try:
            async for chunk in _body_chunks(receive, MAX_REQUEST_BYTES, too_big):
                check.feed(chunk)
                spool.write(chunk)
            check.finish()
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool

    @staticmethod
    def _replay(spool, receive):
        """The checked body, handed on in REPLAY_CHUNK pieces, then the real channel."""
        finished = False

        async def replay():
            nonlocal finished
            if not finished:
                chunk = spool.read(REPLAY_CHUNK)
                more = bool(chunk) and spool.tell() < _spool_size(spool)
                finished = not more
                return {"type": "http.request", "body": chunk, "more_body": more}
            return await receive()
        return replay

    @staticmethod
    async def _read_small_body(receive):
        """Any other body is read whole, at most MAX_BODY_BYTES (413 beyond), then handed on."""
        chunks = [chunk async for chunk in _body_chunks(receive, MAX_BODY_BYTES,
                                                           _Refusal(413, "request body too large"))]
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay

    @staticmethod
    async def _refuse(send, status: int, text: str):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"x-content-type-options", b"nosniff")]})
        await send({"type": "http.response.body", "body": json.dumps({"error": text}).encode()})


async def _body_chunks(receive, limit: int, too_big: _Refusal):
    """The request body's chunks as the server receives them; ``too_big`` past ``limit`` bytes,
    400 when the client goes away."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refusal(400, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        yield chunk
        if not message.get("more_body", False):
            return


def _spool_size(spool) -> int:
    here = spool.tell()
    spool.seek(0, os.SEEK_END)
    end = spool.tell()
    spool.seek(here)
    return end
