"""Reading a request's body with a bound, for every route that reads one by hand (JSON submits, webhooks, the
console's forms): a client cannot make the server hold more than the route allows."""

from __future__ import annotations

from fastapi import Request


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, lower-cased."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def read_bounded(request: Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is over `limit` bytes (declared so, or found so while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
