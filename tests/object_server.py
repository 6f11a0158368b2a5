"""A small object server over real HTTP (http.server in a thread), for the worker side of the files protocol.

It serves GETs (with Range), takes PUTs, records every request as it arrived, and can be told to misbehave
for the next requests to a path: answer a status, cut a body off part-way, or ignore Range.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Seen:
    """One request as the server received it. ``headers`` keeps the names as sent."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body_size: int = 0
    body_sha256: str = ""

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)


@dataclass
class Misbehave:
    """What to do instead of answering properly, once."""

    status: int | None = None  # answer this status
    body: bytes = b""  # with this body
    cut_after: int | None = None  # send the full Content-Length but only this many bytes, then close
    ignore_range: bool = False  # answer a ranged GET with the whole object


@dataclass
class ObjectServer:
    objects: dict[str, bytes] = field(default_factory=dict)
    content_types: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    plans: dict[str, list[Misbehave]] = field(default_factory=dict)
    #: PUT bodies are hashed and dropped instead of kept (for large uploads).
    sink: bool = False
    port: int = 0

    def url(self, path: str, query: str = "X-Amz-Signature=s3cr3t-signature&X-Amz-Credential=AKIA%2Fsecret") -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}" + (f"?{query}" if query else "")

    def then(self, path: str, *steps: Misbehave) -> None:
        self.plans.setdefault("/" + path.lstrip("/"), []).extend(steps)

    def requests(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == "/" + path.lstrip("/")]


def _handler(server: ObjectServer) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _plan(self, path: str) -> Misbehave | None:
            with lock:
                steps = server.plans.get(path)
                return steps.pop(0) if steps else None

        def _record(self, path: str, query: str) -> Seen:
            seen = Seen(self.command, path, query, list(self.headers.items()))
            with lock:
                server.seen.append(seen)
            return seen

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            self._record(parts.path, parts.query)
            plan = self._plan(parts.path)
            if plan is not None and plan.status is not None:
                return self._answer(plan.status, plan.body)
            data = server.objects.get(parts.path)
            if data is None:
                return self._answer(404, b"<Error><Code>NoSuchKey</Code></Error>")
            start = 0
            ranged = self.headers.get("Range")
            if ranged and not (plan and plan.ignore_range):
                start = int(ranged.removeprefix("bytes=").rstrip("-"))
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", server.content_types.get(parts.path, "application/octet-stream"))
            self.end_headers()
            if plan is not None and plan.cut_after is not None:
                self.wfile.write(body[:plan.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return None
            self.wfile.write(body)
            return None

        def do_PUT(self) -> None:
            parts = urlsplit(self.path)
            seen = self._record(parts.path, parts.query)
            length = int(self.headers.get("Content-Length") or 0)
            digest = hashlib.sha256()
            kept = bytearray()
            left = length
            while left:
                piece = self.rfile.read(min(left, 1 << 20))
                if not piece:
                    break
                digest.update(piece)
                if not server.sink:
                    kept += piece
                left -= len(piece)
            seen.body_size, seen.body_sha256 = length - left, digest.hexdigest()
            if left:  # the client hung up part-way: like S3, keep nothing and answer nothing
                self.close_connection = True
                return None
            plan = self._plan(parts.path)
            if plan is not None and plan.status is not None:
                return self._answer(plan.status, plan.body)
            if not server.sink:
                server.objects[parts.path] = bytes(kept)
            server.content_types[parts.path] = self.headers.get("Content-Type", "")
            return self._answer(200, b"")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def serving() -> Iterator[ObjectServer]:
    """An ObjectServer on a free loopback port for the duration of the block."""
    state = ObjectServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), name="object-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
