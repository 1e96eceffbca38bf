"""OpenAI Files routes: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web

from lb.errors import answers_errors
from lb.jobs.auth import owner_of
from lb.jobs.errors import InvalidJobRequest
from lb.jobs.objects import file_object
from lb.state import STATE

PURPOSES = ("batch",)
CHUNK = 64 * 1024  # bytes read from the upload and written to disk at a time


async def upload(request: web.Request) -> web.Response:
    """multipart/form-data with `purpose` and `file`, in either order; the file goes straight to disk."""
    service = request.app[STATE].batches
    owner = owner_of(request)
    if not request.content_type.startswith("multipart/"):
        raise InvalidJobRequest(
            "Upload a file as multipart/form-data with fields 'file' and 'purpose'.", code="invalid_upload"
        )
    reader = await request.multipart()
    purpose: str | None = None
    uploaded = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            uploaded = await service.upload(owner, "batch", part.filename or "upload.jsonl", _chunks(part))
        else:
            await part.release()
    if uploaded is None:
        raise InvalidJobRequest("The form has no 'file' field.", code="missing_file", param="file")
    if purpose not in PURPOSES:
        service.delete_file(uploaded["id"], owner)
        raise InvalidJobRequest(
            f"purpose {purpose!r} is not supported; use 'batch'.", code="invalid_purpose", param="purpose"
        )
    return web.json_response(uploaded)


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


async def list_files(request: web.Request) -> web.Response:
    service = request.app[STATE].batches
    owner = owner_of(request)
    limit = int_param(request, "limit", 10_000, 10_000)
    order = request.query.get("order", "desc")
    rows = service.store.files(
        owner,
        request.query.get("purpose"),
        request.query.get("after"),
        limit + 1,
        newest_first=order != "asc",
    )
    data = [file_object(r) for r in rows[:limit]]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > limit,
        }
    )


async def get_file(request: web.Request) -> web.Response:
    service = request.app[STATE].batches
    return web.json_response(file_object(service.file_row(request.match_info["file_id"], owner_of(request))))


async def delete_file(request: web.Request) -> web.Response:
    service = request.app[STATE].batches
    return web.json_response(service.delete_file(request.match_info["file_id"], owner_of(request)))


async def file_content(request: web.Request) -> web.StreamResponse:
    service = request.app[STATE].batches
    path = service.file_path(request.match_info["file_id"], owner_of(request))
    return web.FileResponse(path, headers={"Content-Type": "application/jsonl"})


def int_param(request: web.Request, name: str, default: int, most: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidJobRequest(f"{name} must be an integer.", param=name) from None
    if not 1 <= value <= most:
        raise InvalidJobRequest(f"{name} must be between 1 and {most}.", param=name)
    return value


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", answers_errors(upload))
    app.router.add_get("/v1/files", answers_errors(list_files))
    app.router.add_get("/v1/files/{file_id}", answers_errors(get_file))
    app.router.add_delete("/v1/files/{file_id}", answers_errors(delete_file))
    app.router.add_get("/v1/files/{file_id}/content", answers_errors(file_content))
