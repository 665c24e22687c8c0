"""The REST API, on the Space's own server (routes of Gradio's FastAPI app, wired by app.launch):

    curl -F file=@chest_xray.jpeg http://127.0.0.1:7860/api/v1/predict

    POST /api/v1/predict       multipart ``file`` (PNG, JPEG, DICOM, up to 10 MB); options ``heatmap``
                               (bool, default false), ``heatmap_class`` (a label: that class's map;
                               implies heatmap) and ``model`` (a name; default: every model),
                               as query or form fields -> the answer, the same JSON object as the
                               Gradio API's /predict (:mod:`cxr.api`: ``task``, ``findings``,
                               ``screening`` for every label set), the map as base64 PNG
    GET  /api/v1/model-info    every loaded model's facts (what the page's facts panel shows)
    GET  /health               liveness and readiness: models, decode workers, queue
    GET  /api/v1/openapi.json  the OpenAPI schema of these routes, every field described
    GET  /api/v1/docs          FastAPI's interactive docs (Swagger UI) of these routes

Uploads only: no route opens a path a client names. The file is decoded by the project's one
loader (the page's ``handlers._load``) and every model answers through ``handlers.analyse``,
so a REST prediction takes one of the same ``handlers.SLOTS`` as the page and the Gradio API.
A request that would wait behind more than the queue's size (Gradio's queue and the REST
requests waiting, together; ``CXR_QUEUE_SIZE``, 64) is refused at once with 503. Refusals are
JSON ``{"error": message}`` with their status: 400 bad file or request, 413 too large, 415 not
an image, 429 over the client's decode budget (budget.py), 503 busy; the message never carries
a path, a traceback or patient data.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from typing import Annotated, Any, get_type_hints

import anyio
import gradio as gr
import numpy as np
from PIL import Image
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, create_model

# cxr is the installed package (pip install .), or the cxr/ folder beside app.py in a Space
from cxr.api import (FIELDS, FINDING_FIELDS, MODEL_INFO_FIELDS, SCREENING_FIELDS, Answer, Finding, ModelAnswer,
                     ModelInfo, Screening, answer, model_info)
from cxr.explain import heatmap_image
from cxr.imaging import ImageLoadError, default_pool
from cxr.inference import DISCLAIMER, Predictor

if __package__:     # cxr_app.rest (pip install .) or app.rest (the repository)
    from . import budget, handlers
else:               # a Space (python app.py): the app's modules are top-level modules beside it
    import budget
    import handlers

logger = logging.getLogger("cxr.app")

PREFIX = "/api/v1"
PREDICT_PATH = f"{PREFIX}/predict"
MAX_FILE_BYTES = 10 * 1024 * 1024     # the page's limit (files.MAX_FILE_SIZE, "10mb")
NOT_AN_IMAGE = "not a PNG, JPEG or DICOM image"     # cxr.imaging's words for a file of the wrong type
VERSION = "1"


# ------------------------------------------------------------------ the schema, from cxr.api

def _typed(typed_dict, docs: dict[str, str], name: str, doc: str) -> type[BaseModel]:
    return create_model(name, __doc__=doc, **{k: (t, Field(description=docs[k]))
                                              for k, t in get_type_hints(typed_dict).items()})


FindingModel = _typed(Finding, FINDING_FIELDS, "Finding", "One class or finding of the model's label set.")
ScreeningModel = _typed(Screening, SCREENING_FIELDS, "Screening",
                        "Abnormal vs normal (multi-class / multi-label models with a normal class).")


def schema_models(heatmap_type: Any, heatmap_note: str) -> tuple[type[BaseModel], type[BaseModel]]:
    """(one model's answer, the whole answer) as pydantic models built from :mod:`cxr.api`'s
    TypedDicts and field descriptions; ``heatmap`` typed per transport (base64 text for REST,
    a file for the Gradio API)."""
    hints = get_type_hints(ModelAnswer)
    hints["heatmap"] = heatmap_type
    hints["findings"] = list[FindingModel] | None       # cxr.api's TypedDicts as described pydantic models
    hints["screening"] = ScreeningModel | None
    fields = {k: (t, Field(description=FIELDS[k] + (" " + heatmap_note if k == "heatmap" else "")))
              for k, t in hints.items()}
    one = create_model("ModelAnswer", __doc__="One model's answer.", **fields)
    whole = create_model("Answer", __base__=one, __doc__=answer.__doc__.split(":")[0].strip() + ".",
                         models=(list[one], Field(description=FIELDS["models"])))
    assert set(get_type_hints(Answer)) == set(whole.model_fields)   # noqa: S101 - the schema is cxr.api's, whole
    return one, whole


RestModelAnswer, RestAnswer = schema_models(str | None, "Here: the PNG, base64-encoded, when heatmap=true.")


def _described(typed_dict, docs: dict[str, str], name: str, doc: str) -> type[BaseModel]:
    return create_model(name, __doc__=doc, **{k: (t, Field(description=docs[k]))
                                              for k, t in get_type_hints(typed_dict).items()})


RestModelInfo = _described(ModelInfo, MODEL_INFO_FIELDS, "ModelInfo", "One loaded model's facts.")


class ModelInfoList(BaseModel):
    """Every loaded model's facts, in the order of their answers."""
    models: list[RestModelInfo] = Field(description="Every loaded model, the first one answers at the top level.")
    disclaimer: str = Field(description="Research and education only: not a medical device.")


class DecodeWorkers(BaseModel):
    alive: int = Field(description="Decode worker processes running now.")
    total: int = Field(description="Decode worker processes in the pool (a dead one is replaced on the next upload).")


class QueueState(BaseModel):
    running: int = Field(description="Predictions running now (page, Gradio API and REST together).")
    waiting: int = Field(description="Requests waiting for a prediction slot (Gradio's queue and REST).")
    limit: int = Field(description="Predictions that run at once.")
    max_waiting: int = Field(description="Waiting requests beyond which a new one is refused (503).")


class Health(BaseModel):
    status: str = Field(description="'ok' when ready to predict, else 'unavailable'.")
    ready: bool = Field(description="Every model loaded and at least one decode worker alive.")
    models: list[str] = Field(description="The loaded models' names.")
    decode_workers: DecodeWorkers = Field(description="The decode sandbox's worker processes.")
    queue: QueueState = Field(description="The shared prediction queue.")


class ErrorBody(BaseModel):
    error: str = Field(description="What was wrong with the request, in plain words.")


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class _RestRoute(APIRoute):
    """A request FastAPI cannot validate (no ``file`` field, a bad option) gets 400 and one plain
    sentence, not FastAPI's 422 with its validator's internals."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return error(400, _validation_message(e))
        return route


def _validation_message(e: RequestValidationError) -> str:
    problems = []
    for err in e.errors():
        field = str(err.get("loc", ("", "?"))[-1])
        problems.append("send the film as the multipart field 'file'" if field == "file"
                        else f"option '{field}': {str(err.get('msg', 'invalid'))[:80]}")
    return "invalid request: " + "; ".join(dict.fromkeys(problems))


ERRORS = {400: {"model": ErrorBody, "description": "Bad file (corrupt, truncated, not a radiograph's DICOM) "
                                                     "or bad request (no file field, unknown model, bad option)."},
          413: {"model": ErrorBody, "description": "The file is over 10 MB, or more than one file was sent."},
          415: {"model": ErrorBody, "description": "The file is not a PNG, JPEG or DICOM image."},
          429: {"model": ErrorBody, "description": "This client has used its share of image decoding for now "
                                                     "(files slow to decode): retry after Retry-After seconds."},
          503: {"model": ErrorBody, "description": "The prediction queue is full: retry after a few seconds."}}


# ------------------------------------------------------------------ the routes

class RestState:
    """What the routes share: the models, the queue's size, and the REST requests admitted and
    still decoding (those waiting for a slot are counted in ``handlers.SLOTS``)."""

    def __init__(self, demo: gr.Blocks, predictors: list[Predictor], max_waiting: int):
        self.demo, self.predictors, self.max_waiting = demo, list(predictors), int(max_waiting)
        self.decoding = 0
        self._lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        self._info = None

    def info(self) -> list[ModelInfo]:
        if self._info is None:
            self._info = [model_info(p) for p in self.predictors]
        return self._info

    def limiter(self) -> anyio.CapacityLimiter:
        """Threads for REST work (their own: waiting REST requests never hold the threads that
        serve Gradio's routes)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_waiting + handlers.SLOTS.limit + 2)
        return self._limiter

    def waiting(self) -> int:
        """Requests waiting for a prediction: Gradio's queue, slots' waiters, REST decoding."""
        queue = getattr(self.demo, "_queue", None)
        try:
            in_gradio = len(queue) if queue is not None else 0
        except TypeError:
            in_gradio = 0
        return in_gradio + handlers.SLOTS.waiting + self.decoding

    def admit(self) -> bool:
        with self._lock:
            if self.waiting() >= self.max_waiting:
                return False
            self.decoding += 1
            return True

    def decoded(self) -> None:
        with self._lock:
            self.decoding -= 1


class Refusal(Exception):
    """A request the REST route answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_upload(data: bytes, client: str = "local") -> Image.Image:
    """The upload's film through the page's decoder (``handlers._load``: the one loader, within
    the client's decode budget), or :class:`Refusal`: 415 for a file of the wrong type, 429 for a
    client over its decode budget, 400 for a file that cannot be used. The page's message is
    kept; the status comes from the loader's own exception (the context ``_load`` raised from)."""
    try:
        return handlers._load(data, client)
    except gr.Error as e:
        message, cause = str(getattr(e, "message", e)), e.__context__
        if isinstance(cause, budget.OverBudget):
            raise Refusal(429, message, {"Retry-After": str(max(1, round(cause.retry_after)))}) from None
        if isinstance(cause, ImageLoadError) and NOT_AN_IMAGE in str(cause):
            raise Refusal(415, message) from None
        raise Refusal(400, message) from None


def _base64_png(heat: np.ndarray) -> str:
    buf = io.BytesIO()
    heatmap_image(heat).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_workers() -> DecodeWorkers:
    alive, total = default_pool().alive()
    return DecodeWorkers(alive=alive, total=total)


def build_router(demo: gr.Blocks, predictors: list[Predictor], *, max_waiting: int) -> APIRouter:
    state = RestState(demo, predictors, max_waiting)
    names = [p.name for p in state.predictors]
    router = APIRouter(route_class=_RestRoute)
    router.state = state

    @router.post(PREDICT_PATH, response_model=RestAnswer, responses=ERRORS, tags=["predict"],
                 summary="Predict for one chest X-ray (binary, multi-class or multi-label models)")
    async def predict(
        request: Request,
        file: Annotated[UploadFile, File(description="The chest X-ray: PNG, JPEG or DICOM, up to 10 MB.")],
        heatmap: Annotated[bool | None, Query(description="Also return each model's heat map, a greyscale "
                                                           "PNG, base64-encoded (default false).")] = None,
        model: Annotated[str | None, Query(description="Answer with this model only (a name from "
                                                       "/api/v1/model-info); default: every loaded model.")] = None,
        heatmap_class: Annotated[str | None, Query(description="Draw the map for this class or finding (a "
                                                               "label of every model answering, see "
                                                               "/api/v1/model-info) instead of the answer's "
                                                               "own; implies heatmap=true.")] = None,
        heatmap_form: Annotated[bool | None, Form(alias="heatmap", description="As the query option.")] = None,
        model_form: Annotated[str | None, Form(alias="model", description="As the query option.")] = None,
        heatmap_class_form: Annotated[str | None, Form(alias="heatmap_class",
                                                       description="As the query option.")] = None,
    ):
        """The same JSON object as the Gradio API's /predict: the first (or chosen) model's answer
        at the top level, every model's under `models`; every class or finding of each model under
        `findings` (binary, multi-class and multi-label models alike). Research and education
        only: not a medical device."""
        map_class = heatmap_class if heatmap_class is not None else heatmap_class_form
        map_class = (map_class or "").strip() or None
        want_map = bool(heatmap if heatmap is not None else heatmap_form) or map_class is not None
        chosen = model if model is not None else model_form
        use = state.predictors
        if chosen is not None:
            use = [p for p in state.predictors if p.name == chosen]
            if not use:
                return error(400, f"unknown model {chosen[:100]!r}: loaded models are {', '.join(names)}")
        for p in use if map_class is not None else []:
            if map_class not in p.labels:
                return error(400, f"unknown heatmap_class {map_class[:100]!r} for model {p.name!r}: its labels "
                                  f"are {', '.join(p.labels)}")
        data = await file.read(MAX_FILE_BYTES + 1)
        await file.close()
        if len(data) > MAX_FILE_BYTES:
            return error(413, "file too large: at most 10 MB")
        if not data:
            return error(400, "the file is empty")
        if not state.admit():
            return error(503, "the prediction queue is full: retry in a few seconds", **{"Retry-After": "5"})

        def work():
            try:
                image = decode_upload(data, budget.client_key(request))
            finally:
                state.decoded()
            try:
                results = handlers.analyse(image, use, explain=want_map, encode_map=_base64_png,
                                           heatmap_class=map_class)
            except gr.Error as e:
                message = str(getattr(e, "message", e))
                raise Refusal(500 if message == handlers.GENERIC_ERROR else 400, message) from None
            return answer([r for r, _ in results])

        try:
            return await anyio.to_thread.run_sync(work, limiter=state.limiter())
        except Refusal as e:
            return error(e.status, e.message, **e.headers)

    @router.get(f"{PREFIX}/model-info", response_model=ModelInfoList, tags=["models"],
                summary="The loaded models' facts")
    async def model_info_route():
        """Every loaded model's name, labels, operating point and its provenance, figures and
        where they were measured, OOD limit, input size and map method (the page's facts panel)."""
        info = await anyio.to_thread.run_sync(state.info)
        return {"models": info, "disclaimer": DISCLAIMER}

    @router.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Not ready."}},
                tags=["health"], summary="Liveness and readiness")
    async def health():
        """200 while the app can predict: every model loaded and a decode worker alive; 503 otherwise.
        With the shared queue's state."""
        workers = await anyio.to_thread.run_sync(decode_workers)
        ready = bool(state.predictors) and workers.alive > 0
        body = Health(status="ok" if ready else "unavailable", ready=ready, models=names, decode_workers=workers,
                      queue=QueueState(running=handlers.SLOTS.running, waiting=state.waiting(),
                                       limit=handlers.SLOTS.limit, max_waiting=state.max_waiting))
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    api_routes = list(router.routes)

    @router.get(f"{PREFIX}/openapi.json", include_in_schema=False)
    async def openapi():
        return get_openapi(title="Chest X-ray API (research only)", version=VERSION, routes=api_routes,
                           description="Chest X-ray classifiers (NORMAL vs PNEUMONIA, and multi-class or "
                                       "multi-label models): the same answer as the page, one schema for every "
                                       "label set (`task`, `findings`, `screening`). " + DISCLAIMER)

    @router.get(f"{PREFIX}/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=f"{PREFIX}/openapi.json", title="Chest X-ray API: docs")

    return router
