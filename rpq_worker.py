"""Files for a RunPod handler that rpq sent a job: read its inputs, write its outputs, over presigned URLs.

Standard library only, Python 3.10 or later: copy this one file into a worker image, or ``pip install
--no-deps rpq`` (the rest of rpq is not needed, nor importable without its dependencies).

    import rpq_worker

    def handler(event):
        inp = event["input"]
        params = rpq_worker.job_input(inp)            # the input as submitted, without rpq's block
        audio = rpq_worker.download(inp, "audio.wav", "/tmp/audio.wav")
        ...                                           # the work, writing /tmp/video.mp4
        video = rpq_worker.upload(inp, "video.mp4", "/tmp/video.mp4")
        return {"video_sha256": video.sha256}

The protocol (version 1)
------------------------
The ``input`` a handler receives (RunPod's ``event["input"]``) is the user's JSON object plus one key
rpq reserves, ``"rpq"``, present only when the job has files::

    "rpq": {
      "version": 1,
      "files":   {"<name>": {"url": "<presigned GET>", "content_type": "audio/wav", "size": 12345}},
      "outputs": {"<name>": {"url": "<presigned PUT>", "method": "PUT",
                             "headers": {"Content-Type": "video/mp4"}}},
      "input_url": "<presigned GET>"
    }

- ``files``: the job's inputs, each with a URL to GET it (and, when rpq knows them, its content type and
  size in bytes). May be absent.
- ``outputs``: the outputs declared at submit, each with a URL to PUT it, the method (``PUT``) and the
  headers to send: exactly these (Content-Type is in the signature), plus a Content-Length, since S3 and
  R2 refuse chunked uploads. May be absent. An output not declared at submit has nowhere to go.
- ``input_url``: present only when the input was too large to send inline (RunPod takes 10 MB): the
  user's whole input is then a JSON document at this URL, and the ``"rpq"`` block is the only key of
  ``input``. :func:`job_input` fetches it.

Names may contain ``/`` (``frames/0001.png``). A block with a version this module does not speak is
refused, naming both versions, rather than half understood; unknown keys inside version 1 are ignored.

Presigned URLs are bearer credentials until they expire: nothing here prints, logs or raises a URL's
query. Messages show ``scheme://host/path`` only (:func:`redact_url`), and no exception is chained to
one (``urllib``'s and ``http.client``'s may quote the URL whole).

Failures and retries
--------------------
Each request is tried up to ``1 + RETRIES`` times, waiting ``BACKOFF_SECONDS`` and then twice as long,
on a connection error, a timeout, a 5xx, 408 or 429; never on another 4xx (an expired or forbidden URL
does not heal). A download that breaks off part-way resumes where it stopped (an HTTP Range request)
instead of starting over; a body shorter than its Content-Length counts as broken off, since
``http.client`` itself would end such a stream quietly. What is still failing after that raises
:class:`FileTransferError`; a malformed block or a name that was not declared raises
:class:`ProtocolError` (:class:`UndeclaredFile`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "PROTOCOL_VERSION",
    "RESERVED_KEY",
    "Block",
    "FileTransferError",
    "InputFile",
    "InputStream",
    "OutputFile",
    "ProtocolError",
    "UndeclaredFile",
    "Uploaded",
    "download",
    "download_all",
    "input_files",
    "input_names",
    "job_input",
    "open_input",
    "output_files",
    "output_names",
    "read_block",
    "read_bytes",
    "redact_url",
    "upload",
]

#: The version of the block this module speaks.
PROTOCOL_VERSION = 1
#: The key of ``input`` that rpq reserves for its block.
RESERVED_KEY = "rpq"

#: Seconds a connect or a single read or write may take (not the whole transfer).
TIMEOUT_SECONDS = 60.0
#: Further tries of a request that failed in a way that may heal.
RETRIES = 2
#: The wait before the first retry; each next one waits twice as long.
BACKOFF_SECONDS = 1.0
#: How much of a file is held in memory at once.
CHUNK_BYTES = 1024 * 1024

# 408 and 429 are 4xx that do heal: the server timed the request out, or asks for fewer of them.
_RETRYABLE_STATUS = frozenset({408, 429})
# S3's XML error body names its error code; only the code is shown, since other elements of some answers
# (SignatureDoesNotMatch's canonical request) repeat the query.
_S3_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_HEADER_TEXT = re.compile(r"^[\t -~]*\Z")  # printable ASCII and tabs: no line breaks to smuggle a header in

log = logging.getLogger("rpq_worker")

_T = TypeVar("_T")
Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


# -- errors --------------------------------------------------------------------------------------------------


class ProtocolError(ValueError):
    """The input's ``"rpq"`` block cannot be read, or asks for something it does not offer.

    ``problems`` lists every problem found; the message joins them. None quotes a URL."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class UndeclaredFile(ProtocolError, LookupError):
    """A name that the job's block does not list (an output not declared at submit, an input not sent)."""

    def __init__(self, kind: str, name: str, declared: list[str], hint: str = "") -> None:
        self.kind = kind
        self.name = name
        self.declared = declared
        sent = "sent with the job" if kind == "input" else "declared at submit"
        listed = ", ".join(repr(n) for n in declared) if declared else "none"
        super().__init__(f"{kind} {name!r} was not {sent}; declared: {listed}{hint}")


class FileTransferError(Exception):
    """A file (or the offloaded input) could not be moved.

    The message names the file and the URL without its query. ``url`` is that redacted URL; ``status``
    the HTTP status when the server answered, and ``code`` S3's error code when it gave one."""

    def __init__(self, message: str, *, name: str | None, method: str, url: str,
                 status: int | None = None, code: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.name = name
        self.method = method
        self.url = url
        self.status = status
        self.code = code
        self.attempts = attempts


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no query or fragment (a presigned URL's signature is in its
    query), and no user info."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<a malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    if port is not None:
        host += f":{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _scrub(text: str, url: str) -> str:
    """``text`` with ``url``, and its query on its own, cut out, should the text quote them."""
    text = text.replace(url, redact_url(url))
    query = urlsplit(url).query
    return text.replace(query, "***") if query else text


# -- the block ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """An input sent with the job. ``url`` is a credential: it is kept out of the repr."""

    name: str
    url: str = field(repr=False)
    content_type: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class OutputFile:
    """An output declared at submit: where to PUT it, and the headers its URL was signed for."""

    name: str
    url: str = field(repr=False)
    method: str = "PUT"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Block:
    """The ``"rpq"`` block of a job's input, read and checked."""

    version: int
    files: dict[str, InputFile]
    outputs: dict[str, OutputFile]
    input_url: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Uploaded:
    """What :func:`upload` sent: the bytes and their sha256 (hex), computed as they went out."""

    name: str
    size: int
    sha256: str


def read_block(event_input: Any) -> Block | None:
    """The job's ``"rpq"`` block, or None when it has none (an input that is not an object has none).

    Raises :class:`ProtocolError` listing every problem with a block that is there."""
    if not isinstance(event_input, dict) or RESERVED_KEY not in event_input:
        return None
    raw = event_input[RESERVED_KEY]
    if not isinstance(raw, dict):
        raise ProtocolError(f"input.{RESERVED_KEY}: must be an object (rpq reserves this key for its block)")
    problems: list[str] = []
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        problems.append(f"input.{RESERVED_KEY}.version: must be a whole number (this module speaks "
                        f"{PROTOCOL_VERSION})")
    elif version != PROTOCOL_VERSION:
        problems.append(f"input.{RESERVED_KEY}.version: {version} is not the version this rpq_worker speaks "
                        f"({PROTOCOL_VERSION}); use the rpq_worker.py of the rpq that sent the job")
    if problems:
        raise ProtocolError(problems)  # the rest may mean something else in another version
    files = _read_files(raw.get("files"), problems)
    outputs = _read_outputs(raw.get("outputs"), problems)
    input_url = raw.get("input_url")
    if input_url is not None:
        if not _is_http_url(input_url):
            problems.append(f"input.{RESERVED_KEY}.input_url: must be an http(s) URL")
        others = len(event_input) - 1
        if others:
            problems.append(f"input: with {RESERVED_KEY}.input_url the block must be its only key; "
                            f"{others} other key{'s' if others > 1 else ''} found")
    if problems:
        raise ProtocolError(problems)
    return Block(version=PROTOCOL_VERSION, files=files, outputs=outputs, input_url=input_url)


def _is_http_url(url: Any) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _entries(raw: Any, where: str, problems: list[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(name, where, entry)`` for each well-formed entry of a names-to-objects map."""
    if raw is None:
        return
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object of name: {{...}}")
        return
    for name, entry in raw.items():
        at = f"{where}[{name!r}]"
        if not name:
            problems.append(f"{where}: a name must not be empty")
        elif not isinstance(entry, dict):
            problems.append(f"{at}: must be an object with a url")
        else:
            yield name, at, entry


def _read_files(raw: Any, problems: list[str]) -> dict[str, InputFile]:
    files: dict[str, InputFile] = {}
    for name, at, entry in _entries(raw, f"input.{RESERVED_KEY}.files", problems):
        found = len(problems)
        url, content_type, size = entry.get("url"), entry.get("content_type"), entry.get("size")
        if not _is_http_url(url):
            problems.append(f"{at}.url: must be an http(s) URL")
        if content_type is not None and not isinstance(content_type, str):
            problems.append(f"{at}.content_type: must be a string")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            problems.append(f"{at}.size: must be a whole number of bytes from 0")
        if len(problems) == found:
            files[name] = InputFile(name=name, url=str(url), content_type=content_type, size=size)
    return files


def _read_outputs(raw: Any, problems: list[str]) -> dict[str, OutputFile]:
    outputs: dict[str, OutputFile] = {}
    for name, at, entry in _entries(raw, f"input.{RESERVED_KEY}.outputs", problems):
        found = len(problems)
        url, method, headers = entry.get("url"), entry.get("method", "PUT"), entry.get("headers", {})
        if not _is_http_url(url):
            problems.append(f"{at}.url: must be an http(s) URL")
        if method != "PUT":
            problems.append(f"{at}.method: only PUT is supported")
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and _HEADER_TEXT.match(k + v)
                for k, v in headers.items()):
            problems.append(f"{at}.headers: must be an object of header: value strings, without line breaks")
        elif len({k.lower() for k in headers}) < len(headers):
            problems.append(f"{at}.headers: a header is named twice")
        if len(problems) == found:
            outputs[name] = OutputFile(name=name, url=str(url), method=method, headers=dict(headers))
    return outputs


def _required_block(event_input: Any) -> tuple[Block | None, str]:
    """The block, and a hint for a lookup in an input that has none."""
    block = read_block(event_input)
    if block is not None:
        return block, ""
    if isinstance(event_input, dict) and isinstance(event_input.get("input"), dict):
        return None, " (this looks like the whole event: pass event['input'])"
    return None, f" (the input has no {RESERVED_KEY!r} block: the job was submitted without files)"


def input_files(event_input: Any) -> dict[str, InputFile]:
    """The job's inputs by name, in the order rpq sent them (empty when it sent none)."""
    block = read_block(event_input)
    return dict(block.files) if block else {}


def input_names(event_input: Any) -> list[str]:
    """The names of the job's inputs."""
    return list(input_files(event_input))


def output_files(event_input: Any) -> dict[str, OutputFile]:
    """The outputs declared at submit, by name."""
    block = read_block(event_input)
    return dict(block.outputs) if block else {}


def output_names(event_input: Any) -> list[str]:
    """The names of the outputs declared at submit."""
    return list(output_files(event_input))


def _input(event_input: Any, name: str) -> InputFile:
    block, hint = _required_block(event_input)
    files = block.files if block else {}
    if name not in files:
        raise UndeclaredFile("input", name, list(files), hint)
    return files[name]


def _output(event_input: Any, name: str) -> OutputFile:
    block, hint = _required_block(event_input)
    outputs = block.outputs if block else {}
    if name not in outputs:
        raise UndeclaredFile("output", name, list(outputs), hint)
    return outputs[name]


# -- HTTP ---------------------------------------------------------------------------------------------------


class _Failure(Exception):
    """One failed try of a request; ``detail`` completes "<METHOD> <url> ...", with no query in it."""

    def __init__(self, detail: str, *, retryable: bool, status: int | None = None, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.status = status
        self.code = code


class _SourceChanged(Exception):
    """An upload's source gave other bytes than it had when the upload started (not an OSError, so that
    urllib lets it through unwrapped)."""


def _describe(exc: BaseException, url: str) -> str:
    message = _scrub(str(exc), url)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _send(method: str, url: str, headers: Mapping[str, str], body: Any = None) -> http.client.HTTPResponse:
    """One request; a 2xx response to read, else a :class:`_Failure` saying whether trying again may help."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method=method)
    try:
        # A fresh opener each time: it reads the *_proxy variables, as urlopen would.
        response = urllib.request.build_opener().open(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        status = exc.code
        code = _s3_code(exc)
        hint = " (the URL expired, or the request is not the one it was signed for)" if status == 403 else ""
        raise _Failure(f"answered HTTP {status}{' ' + code if code else ''}{hint}", status=status, code=code,
                       retryable=status >= 500 or status in _RETRYABLE_STATUS) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        # A certificate that does not verify will not verify next time either.
        retryable = isinstance(reason, OSError) and not isinstance(reason, ssl.SSLCertVerificationError)
        detail = _describe(reason, url) if isinstance(reason, BaseException) else _scrub(str(reason), url)
        raise _Failure(f"failed: {detail}", retryable=retryable) from None
    except (OSError, http.client.HTTPException) as exc:  # a connection dropped while the answer was read
        raise _Failure(f"failed: {_describe(exc, url)}", retryable=True) from None
    except ValueError as exc:  # a URL or header http.client refuses
        raise _Failure(f"failed: {_describe(exc, url)}", retryable=False) from None
    return response  # type: ignore[no-any-return]  # urllib types it as a file-like; for http(s) it is this


def _s3_code(exc: urllib.error.HTTPError) -> str | None:
    try:
        head = exc.read(4096)
    except Exception:
        return None
    finally:
        exc.close()
    found = _S3_CODE.search(head or b"")
    return found.group(1).decode() if found else None


def _retrying(what: str, name: str | None, method: str, url: str, attempt: Callable[[], _T]) -> _T:
    """``attempt()``, tried again after a backoff while it fails in a way that may heal."""
    tries = 1 + max(RETRIES, 0)
    for n in range(1, tries + 1):
        try:
            return attempt()
        except _Failure as failure:
            if not failure.retryable or n == tries:
                after = f" (after {n} tries)" if n > 1 else ""
                raise FileTransferError(f"{what}: {method} {redact_url(url)} {failure.detail}{after}",
                                        name=name, method=method, url=redact_url(url),
                                        status=failure.status, code=failure.code, attempts=n) from None
            _back_off(n, f"{what}: {method} {redact_url(url)} {failure.detail}")
    raise AssertionError("unreachable")  # pragma: no cover


def _back_off(tried: int, problem: str) -> None:
    tries = 1 + max(RETRIES, 0)
    delay = BACKOFF_SECONDS * 2 ** (tried - 1)
    log.warning("%s; trying again in %.1f s (%d of %d)", problem, delay, tried + 1, tries)
    time.sleep(delay)


# -- inputs -------------------------------------------------------------------------------------------------


def job_input(event_input: Any) -> Any:
    """The input as the user submitted it: without the ``"rpq"`` block, and fetched from ``input_url`` when
    rpq offloaded it (each call fetches it again: keep the result)."""
    block = read_block(event_input)
    if block is None:
        return event_input
    if block.input_url is None:
        return {key: value for key, value in event_input.items() if key != RESERVED_KEY}
    url = block.input_url

    def fetch() -> bytes:
        response = _send("GET", url, {"Accept": "application/json"})
        with response:
            try:
                return response.read()  # a body shorter than its Content-Length raises IncompleteRead here
            except (OSError, http.client.HTTPException) as exc:
                raise _Failure(f"broke off: {_describe(exc, url)}", retryable=True) from None

    document = _retrying("job input", None, "GET", url, fetch)
    try:
        return json.loads(document)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: positions and bytes, never the URL
        raise ProtocolError(f"job input: the document at {redact_url(url)} is not JSON ({exc})") from None


class InputStream(io.RawIOBase):
    """An input as it downloads: a binary file object to ``read()`` (or hand to ``shutil.copyfileobj``).

    ``size`` is its length when known (the Content-Length, else the size rpq declared) and ``content_type``
    its type. A connection that breaks part-way is resumed from where it stopped, up to ``RETRIES`` times;
    the end of the stream is checked against ``size`` and the declared size, so a short file is an error,
    never a quiet end. Close it (or use ``with``) to free the connection."""

    def __init__(self, item: InputFile) -> None:
        super().__init__()
        self.name = item.name
        self._item = item
        self._what = f"input {item.name!r}"
        self._position = 0
        self._resumes = 0
        self._ended = False
        self._response: http.client.HTTPResponse = self._open()
        length = self._response.length
        self.size: int | None = length if length is not None else item.size
        self.content_type: str | None = item.content_type or self._response.headers.get("Content-Type")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on a closed InputStream")
        if self._ended or not len(buffer):
            return 0
        while True:
            cause: BaseException | None = None
            try:
                n = self._response.readinto(buffer)
            except (OSError, http.client.HTTPException) as exc:
                n, cause = 0, exc
            if n:
                self._position += n
                return n
            if cause is None and (self.size is None or self._position >= self.size):
                self._end()
                return 0
            self._resume(cause)

    def readall(self) -> bytes:
        parts = []
        buffer = bytearray(CHUNK_BYTES)
        while n := self.readinto(buffer):
            parts.append(bytes(buffer[:n]))
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            response = getattr(self, "_response", None)
            if response is not None:
                response.close()
        super().close()

    def _open(self) -> http.client.HTTPResponse:
        url, position = self._item.url, self._position

        def attempt() -> http.client.HTTPResponse:
            response = _send("GET", url, {"Range": f"bytes={position}-"} if position else {})
            if position and response.status == 206:
                start = _range_start(response.headers.get("Content-Range"))
                if start != position:
                    response.close()
                    raise _Failure(f"answered a range from byte {start} when asked from {position}",
                                   retryable=False)
            elif position:  # the whole file again (a server that ignores Range): skip what we have
                _skip(response, position, url)
            return response

        return _retrying(self._what, self.name, "GET", url, attempt)

    def _resume(self, cause: BaseException | None) -> None:
        url = self._item.url
        of = f" of {self.size}" if self.size is not None else ""
        problem = (f"{self._what}: GET {redact_url(url)} broke off after {self._position}{of} bytes"
                   + (f": {_describe(cause, url)}" if cause is not None else ""))
        self._response.close()
        if self._resumes >= max(RETRIES, 0):
            tries = f" (after {self._resumes} resumes)" if self._resumes else ""
            raise FileTransferError(problem + tries, name=self.name, method="GET", url=redact_url(url),
                                    attempts=self._resumes + 1)
        self._resumes += 1
        _back_off(self._resumes, problem)
        self._response = self._open()

    def _end(self) -> None:
        self._ended = True
        self._response.close()
        declared = self._item.size
        if declared is not None and self._position != declared:
            raise FileTransferError(
                f"{self._what}: GET {redact_url(self._item.url)} gave {self._position} bytes; "
                f"rpq declared {declared}", name=self.name, method="GET", url=redact_url(self._item.url))


def _range_start(content_range: str | None) -> int | None:
    found = re.match(r"bytes (\d+)-", content_range or "")
    return int(found.group(1)) if found else None


def _skip(response: http.client.HTTPResponse, count: int, url: str) -> None:
    left = count
    try:
        while left:
            piece = response.read(min(CHUNK_BYTES, left))
            if not piece:
                break
            left -= len(piece)
    except (OSError, http.client.HTTPException) as exc:
        response.close()
        raise _Failure(f"broke off: {_describe(exc, url)}", retryable=True) from None
    if left:
        response.close()
        raise _Failure(f"broke off after {count - left} of the {count} bytes to skip", retryable=True)


def open_input(event_input: Any, name: str) -> InputStream:
    """Start downloading input ``name``: a binary file object that streams it (see :class:`InputStream`)."""
    return InputStream(_input(event_input, name))


def read_bytes(event_input: Any, name: str) -> bytes:
    """Input ``name``, whole, in memory (for small files; :func:`download` writes large ones to disk)."""
    with open_input(event_input, name) as stream:
        return stream.readall()


def download(event_input: Any, name: str, path: str | os.PathLike[str]) -> Path:
    """Write input ``name`` to ``path`` (or, when ``path`` is a folder, to ``path/name``) and return where.

    The file appears whole or not at all: it is written beside its place and moved there at the end."""
    item = _input(event_input, name)
    target = Path(path)
    if target.is_dir():
        target = target / _relative(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part",
                                     delete=False) as part:
        try:
            with InputStream(item) as stream:
                shutil.copyfileobj(stream, part, CHUNK_BYTES)
        except BaseException:
            part.close()
            os.unlink(part.name)
            raise
    os.replace(part.name, target)
    return target


def download_all(event_input: Any, folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Every input, each to ``folder/name`` (names with ``/`` make subfolders): ``{name: path}``."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    return {name: download(event_input, name, root / _relative(name)) for name in input_files(event_input)}


def _relative(name: str) -> Path:
    """``name`` as a path inside a folder, refusing any that would step out of it."""
    parts = PurePosixPath(name).parts
    if (not parts or name.startswith("/") or "\\" in name or "\x00" in name
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise ProtocolError(f"{name!r}: not a file name that can be written inside a folder")
    return Path(*parts)


# -- outputs ------------------------------------------------------------------------------------------------


def upload(event_input: Any, name: str, source: Source) -> Uploaded:
    """PUT output ``name`` from a file's path, bytes, or a binary file object (read from where it stands).

    The body streams from the source (never held whole), with exactly the headers the output was declared
    with and a Content-Length; a file object that cannot seek is first spooled to a temporary file, since
    the length must be known before the first byte. A retry sends the same bytes again from the start."""
    slot = _output(event_input, name)
    what = f"output {name!r}"
    with _Body.of(source) as body:
        headers = _put_headers(slot, body.size, what)

        def attempt() -> str:
            digest = hashlib.sha256()
            response = _send(slot.method, slot.url, headers, body.chunks(digest))
            with response, contextlib.suppress(OSError, http.client.HTTPException):
                response.read()  # the upload is in; an answer body cut short changes nothing
            return digest.hexdigest()

        try:
            sha256 = _retrying(what, name, slot.method, slot.url, attempt)
        except _SourceChanged as exc:
            raise FileTransferError(f"{what}: {exc}", name=name, method=slot.method,
                                    url=redact_url(slot.url)) from None
    return Uploaded(name=name, size=body.size, sha256=sha256)


def _put_headers(slot: OutputFile, size: int, what: str) -> dict[str, str]:
    headers = dict(slot.headers)
    declared = next((value for key, value in headers.items() if key.lower() == "content-length"), None)
    if declared is None:
        headers["Content-Length"] = str(size)
    elif declared.strip() != str(size):
        raise FileTransferError(f"{what}: declared at submit as {declared.strip()} bytes; the source has {size}",
                                name=slot.name, method=slot.method, url=redact_url(slot.url))
    if not any(key.lower() == "content-type" for key in headers):
        # urllib would send application/x-www-form-urlencoded; what S3 itself assumes is the honest default.
        headers["Content-Type"] = "application/octet-stream"
    return headers


class _Body:
    """An upload's bytes: their size, and a fresh pass over them for each try."""

    def __init__(self, stream: IO[bytes], size: int, *, owned: bool) -> None:
        self.stream = stream
        self.size = size
        self.start = stream.tell()
        self.owned = owned

    @classmethod
    def of(cls, source: Source) -> _Body:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = io.BytesIO(source)
            return cls(data, len(data.getbuffer()), owned=True)
        if isinstance(source, (str, os.PathLike)):
            opened = open(source, "rb")  # noqa: SIM115 - closed by __exit__
            return cls(opened, os.fstat(opened.fileno()).st_size, owned=True)
        stream: Any = source  # typed IO[bytes], but a caller may hand over a text file all the same
        if isinstance(stream, io.TextIOBase) or not callable(getattr(stream, "read", None)):
            raise TypeError("source: a file's path, bytes, or a file object opened in binary mode")
        try:
            seekable = bool(source.seekable())
        except (AttributeError, OSError):
            seekable = False
        if seekable:
            start = source.tell()
            end = source.seek(0, io.SEEK_END)
            source.seek(start)
            return cls(source, end - start, owned=False)
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by __exit__
        try:
            shutil.copyfileobj(source, spool, CHUNK_BYTES)
            size = spool.tell()
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return cls(spool, size, owned=True)

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.stream.close()

    def chunks(self, digest: Any) -> Iterator[bytes]:
        """The bytes from the start, hashed as they go; the source must still hold exactly ``size`` of them."""
        self.stream.seek(self.start)
        left = self.size
        while left:
            piece = self.stream.read(min(CHUNK_BYTES, left))
            if not piece:
                raise _SourceChanged(f"the source ended after {self.size - left} of its {self.size} bytes "
                                     "(was it changed while uploading?)")
            left -= len(piece)
            if not left and self.stream.read(1):  # checked before the last piece goes, so no upload completes
                raise _SourceChanged(f"the source grew past its {self.size} bytes (was it changed while "
                                     "uploading?)")
            digest.update(piece)
            yield piece
