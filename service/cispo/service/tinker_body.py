"""Request bodies of the Tinker front, read under max_message_bytes (zstd ones decompressed under
it too): a declared Content-Length over the limit is refused before a byte is read, and a body
that grows over it as soon as it does."""

import json
from typing import Any

import zstandard
from starlette.requests import ClientDisconnect, Request

from cispo.service.errors import clip
from cispo.service.tinker_errors import HttpError


async def read_body(request: Request, limit: int) -> bytes:
    """The body (decompressed if zstd), at most `limit` bytes; HttpError otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HttpError(
            413 if declared.isdigit() else 400,
            f"Content-Length {clip(declared, 40)} is not a size up to max_message_bytes={limit}",
            headers={"Connection": "close"},
        )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # the rest is not read: the connection closes after the answer
                raise HttpError(413, f"the body is over max_message_bytes={limit}", headers={"Connection": "close"})
            chunks.append(chunk)
    except ClientDisconnect:
        raise HttpError(400, "the connection closed before the whole body arrived") from None
    body = b"".join(chunks)
    del chunks
    if request.headers.get("content-encoding", "").lower() == "zstd":
        try:
            with zstandard.ZstdDecompressor().stream_reader(body) as reader:
                body = reader.read(limit + 1)
        except zstandard.ZstdError as exc:
            raise HttpError(400, f"the body is not valid zstd: {exc}") from None
        if len(body) > limit:
            raise HttpError(413, f"the decompressed body is over max_message_bytes={limit}")
    return body


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object (an empty body is `{}`); HttpError 400 otherwise."""
    body = await read_body(request, limit)
    try:
        value = json.loads(body or b"{}")
    except RecursionError:
        raise HttpError(400, "the body is JSON nested too deeply") from None
    except ValueError as exc:
        raise HttpError(400, f"the body is not JSON: {clip(str(exc), 200)}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object")
    return value
