"""The web app of ``lverse serve``: one page and the HTTP API under it (docs/serve.md).

    GET    /                          the page (HTML, JS and CSS ship in lverse/serve/static)
    GET    /api/info                  the bundle, its sampling defaults, this server's limits, the queue
    POST   /api/text-to-image         JSON {"prompt", settings...}            -> a job
    POST   /api/image-to-text         multipart: image file + settings fields -> a job
    POST   /api/round-trip/text       JSON {"prompt", "candidates", "rerank", "seed"}
    POST   /api/round-trip/image      multipart: image file + the same fields
    GET    /api/jobs/{id}             state, place in the queue, progress, result (JSON)
    DELETE /api/jobs/{id}             cancel
    GET    /api/jobs/{id}/preview.png the candidates being drawn, rows so far
    GET    /api/jobs/{id}/files/NAME  the job's PNGs (image-R.png, candidate-R-J.png, input.png)

A POST answers at once (202) with the job's status; with ``?wait=1`` it answers when the job is
finished (200 done, 422 failed, 409 cancelled), which suits scripts. Bad input is a 4xx with
``{"error": "one line"}``. FastAPI's own documentation pages are off: they load their scripts
from a CDN, and this server works offline.
"""
from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile

from lverse.serve.jobs import CANCELLED, DONE, ERROR, Job, JobQueue, QueueFull
from lverse.serve.work import FIELDS, ROUND_TRIP_FIELDS, Model, check_fields

STATIC = Path(__file__).resolve().parent / "static"
FORM_SLACK = 64 * 1024  # a multipart body's bytes beyond the image (boundaries, the settings fields)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def create_app(model: Model, queue: JobQueue | None = None) -> FastAPI:
    """The app for ``model``; its queue's worker starts and stops with the app (a queue that is
    never started only collects jobs, which the tests use to look at the queue)."""
    queue = queue or JobQueue(max_waiting=model.limits.max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        yield
        queue.stop()

    app = FastAPI(title="lverse serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.model, app.state.queue = model, queue
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    def status(job: Job) -> dict[str, Any]:
        seconds = {"waited": round((job.started or job.ended or job.created) - job.created, 3),
                   "ran": round(job.ended - job.started, 3) if job.started and job.ended else None,
                   "first_preview": round(job.first_preview_s, 3) if job.first_preview_s is not None else None}
        return {"id": job.id, "kind": job.kind, "state": job.state, "stage": job.stage,
                "position": queue.position(job), "tokens": job.tokens, "total": job.total,
                "preview": f"/api/jobs/{job.id}/preview.png?v={job.preview_version}" if job.preview else None,
                "result": job.result, "error": job.error, "seconds": seconds}

    async def enqueue(request: Request, kind: str, run: Any) -> JSONResponse:
        try:
            job = queue.submit(Job(kind, run))
        except QueueFull as e:
            raise ApiError(503, str(e)) from None
        if request.query_params.get("wait", "0").lower() not in ("1", "true", "yes"):
            return JSONResponse(status(job), status_code=202)
        while not job.finished.is_set():
            await asyncio.sleep(0.05)
        code = {DONE: 200, ERROR: 422, CANCELLED: 409}[job.state]
        return JSONResponse(status(job), status_code=code)

    def checked(f: Any, *args: Any) -> Any:
        """Run a check; its ValueError/OSError (the library's one-line messages) becomes a 400."""
        try:
            return f(*args)
        except (ValueError, OSError) as e:
            raise ApiError(400, " ".join(str(e).split())) from None

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body must be a JSON object ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    async def form_body(request: Request) -> tuple[str, bytes, dict[str, Any]]:
        """A multipart form: the ``image`` file (name, bytes) and the other fields."""
        limit = model.limits.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + FORM_SLACK:
            raise ApiError(413, f"the upload is {int(length) / 2**20:.1f} MB; this server takes images of at most "
                                f"{model.limits.max_upload_mb:g} MB")
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # not multipart, or malformed
            raise ApiError(400, f"expected a multipart form with an image file ({e})") from None
        file = form.get("image")
        if not isinstance(file, UploadFile):
            raise ApiError(400, "no image: send the file in the form field 'image'")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, f"{file.filename} is over {model.limits.max_upload_mb:g} MB, this server's limit")
        fields = {k: v for k, v in form.items() if k != "image"}
        return file.filename or "upload", data, fields

    # --- the page --------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {**model.info(), "queue": queue.counts()}

    # --- requests --------------------------------------------------------------------------
    @app.post("/api/text-to-image")
    async def text_to_image(request: Request) -> JSONResponse:
        body = await json_body(request)
        values = checked(check_fields, body, FIELDS["text_to_image"], ("prompt",))
        prompt = checked(model.prompt, body.get("prompt"))
        req = checked(model.request, "text_to_image", values)
        return await enqueue(request, "text-to-image", lambda job: model.text_to_image(job, prompt, req))

    @app.post("/api/image-to-text")
    async def image_to_text(request: Request) -> JSONResponse:
        name, data, fields = await form_body(request)
        values = checked(check_fields, fields, FIELDS["image_to_text"])
        req = checked(model.request, "image_to_text", values)
        image = checked(model.image, name, data)
        return await enqueue(request, "image-to-text", lambda job: model.image_to_text(job, image, req))

    @app.post("/api/round-trip/text")
    async def round_trip_text(request: Request) -> JSONResponse:
        body = await json_body(request)
        values = checked(check_fields, body, ROUND_TRIP_FIELDS, ("prompt",))
        prompt = checked(model.prompt, body.get("prompt"))
        t2i, i2t = (checked(model.request, d, values) for d in ("text_to_image", "image_to_text"))
        return await enqueue(request, "round-trip-text", lambda job: model.round_trip_text(job, prompt, t2i, i2t))

    @app.post("/api/round-trip/image")
    async def round_trip_image(request: Request) -> JSONResponse:
        name, data, fields = await form_body(request)
        values = checked(check_fields, fields, ROUND_TRIP_FIELDS)
        i2t, t2i = (checked(model.request, d, values) for d in ("image_to_text", "text_to_image"))
        image = checked(model.image, name, data)
        return await enqueue(request, "round-trip-image", lambda job: model.round_trip_image(job, image, i2t, t2i))

    # --- jobs ------------------------------------------------------------------------------
    def find(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (unknown, or finished long ago and forgotten)")
        return job

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str) -> dict[str, Any]:
        return status(find(job_id))

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        queue.cancel(job)
        return status(job)

    @app.get("/api/jobs/{job_id}/preview.png")
    async def preview(job_id: str) -> Response:
        job = find(job_id)
        if job.preview is None:
            raise ApiError(404, f"job {job_id} has no preview yet")
        return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/jobs/{job_id}/files/{name}")
    async def file(job_id: str, name: str) -> Response:
        job = find(job_id)
        data = job.files.get(name)
        if data is None and name.startswith("candidate-"):
            # decoded when asked for, beside the queue (the AugVAE decoder alone, one image), and
            # not kept: a job may have hundreds of candidates (the browser caches them)
            data = await asyncio.to_thread(model.candidate_png, job, name)
        if data is None:
            raise ApiError(404, f"job {job_id} has no file {name!r}")
        return Response(data, media_type="image/png")

    return app
