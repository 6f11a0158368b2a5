"""A job's files: what `submit` accepts, what `/run` carries to the handler, what is found when it ends.

The handler's side of this is `rpq_worker` (standard library only). The input sent to RunPod is the job's
input (a JSON object) plus one block under "rpq", built afresh for every /run and never stored::

    "rpq": {
      "version": 1,
      "files":   {"audio": {"url": <presigned GET>, "content_type": "audio/wav", "size": 12345}},
      "outputs": {"video.mp4": {"url": <presigned PUT>, "method": "PUT", "headers": {"Content-Type": "video/mp4"}}},
      "input_url": <presigned GET>   # only with offload=True: the whole input is a JSON document there
    }

Each URL is scoped to one object and one method and lives as long as the job may (its ttl, at most the 7 days
SigV4 allows). An output's URL is under its attempt's folder, `{prefix}/jobs/{id}/{attempt}/out/{name}`, so a
retry writes beside, never over, what an earlier attempt left.

Every URL is as good as a credential until it expires: none is stored, logged, put in a task argument or
quoted in an error. What is stored is the key (in `job_files`), and a URL is presigned from it when needed.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jobs.bucket.store import CONTENT_TYPE_RE, Data, ObjectInfo, ObjectStore, check_key, check_name
from jobs.errors import Problem, RpqError
from jobs.settings import PRESIGN_MAX_SECONDS
from jobs.storage.models import FileRole, FileState, JobFile, JobRow, Upload, utcnow

RPQ_KEY = "rpq"
PROTOCOL_VERSION = 1
#: Inputs and outputs of one job, each: every URL is about 1 KB of the /run body, whose limit is 10 MB.
MAX_FILES = 256
#: An input sent with offload=True is encoded in memory once, to be put in the bucket.
MAX_OFFLOAD_BYTES = 256 * 1024**2
DEFAULT_CONTENT_TYPE = "application/octet-stream"
#: A URL outlives the job's ttl by this much: the handler may still be writing as the ttl runs out.
URL_GRACE_SECONDS = 300


class InputFilesRejected(RpqError):
    """The job's input files are not what its submit promised (missing, too large, another type): the job
    fails before /run with every problem named, and is not sent."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("input files not usable: " + "; ".join(problems))


@dataclass(frozen=True)
class InputFile:
    """One input as `submit` was given it: bytes, a path or a file object to upload, or a key in the bucket."""

    name: str
    content_type: str
    data: Data | None = None
    key: str | None = None
    index: int = 0  # its place in `files`: problems name it files[i], never by the caller's text


@dataclass(frozen=True)
class OutputFile:
    name: str
    content_type: str


@dataclass(frozen=True)
class FileRequest:
    """What `submit` was asked to do with files, once checked: nothing here has touched the bucket."""

    inputs: list[InputFile] = field(default_factory=list)
    outputs: list[OutputFile] = field(default_factory=list)
    offload: bool = False
    worker_s3: bool = False  # s3_config=True: RunPod's s3Config goes with each /run

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs or self.offload or self.worker_s3)


def content_type_for(name: str) -> str:
    """The MIME type a file's name suggests ("video.mp4": video/mp4), else application/octet-stream."""
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or DEFAULT_CONTENT_TYPE


def read_request(files: object, outputs: object, offload: object, input: object,
                 s3_config: object = False) -> tuple[FileRequest, list[Problem]]:
    """`submit`'s files, outputs and offload arguments, checked: every problem at once, each naming the
    argument (a name that is itself wrong is named by its position, never quoted)."""
    problems: list[Problem] = []
    inputs: list[InputFile] = []
    if files is not None:
        if not isinstance(files, Mapping):
            problems.append(Problem("files", "type", "must be an object of name: file"))
        elif len(files) > MAX_FILES:
            problems.append(Problem("files", "size", f"at most {MAX_FILES} files"))
        else:
            for i, (name, source) in enumerate(files.items()):
                found = _input_file(i, name, source)
                if isinstance(found, InputFile):
                    inputs.append(found)
                else:
                    problems += found
    declared: list[OutputFile] = []
    if outputs is not None:
        if isinstance(outputs, Mapping):
            items = list(outputs.items())
        elif isinstance(outputs, list | tuple):
            items = [(name, None) for name in outputs]
        else:
            items = []
            problems.append(Problem("outputs", "type",
                                    "must be a list of file names (or an object of name: content type)"))
        if len(items) > MAX_FILES:
            problems.append(Problem("outputs", "size", f"at most {MAX_FILES} outputs"))
            items = []
        seen: set[str] = set()
        for i, (name, content_type) in enumerate(items):
            where = f"outputs[{i}]"
            if not isinstance(name, str) or check_name(name):
                problems.append(Problem(where, "format", _NAME_RULE))
                continue
            if name in seen:
                problems.append(Problem(where, "unique", "names an output already declared"))
                continue
            seen.add(name)
            if content_type is None:
                content_type = content_type_for(name)
            if not _content_type_ok(content_type):
                problems.append(Problem(where, "format", _CONTENT_TYPE_RULE))
                continue
            declared.append(OutputFile(name, content_type))
    if not isinstance(offload, bool):
        problems.append(Problem("offload", "type", "must be true or false"))
        offload = False
    if not isinstance(s3_config, bool):
        problems.append(Problem("s3_config", "type", "must be true or false"))
        s3_config = False
    request = FileRequest(inputs, declared, offload, s3_config)
    asking = next((name for name, asked in (("files", inputs), ("outputs", declared), ("s3_config", s3_config))
                   if asked), None)
    if asking is not None and not offload and not (isinstance(input, Mapping) and RPQ_KEY not in input):
        # Reported on the argument that needs it: the input alone is fine for a job without files.
        problems.append(Problem(asking, "type", INPUT_FOR_FILES_RULE))
    return request, problems


def asked_for(request: FileRequest) -> str:
    """The first argument of submit that asked for files: the one a problem with files as a whole is named by."""
    return next(name for name, asked in (("files", request.inputs), ("outputs", request.outputs),
                                         ("offload", request.offload), ("s3_config", request.worker_s3)) if asked)


INPUT_FOR_FILES_RULE = (f"needs the input to be a JSON object without a {RPQ_KEY!r} key (rpq adds the files' URLs "
                        "there), or offload=true")
_NAME_RULE = ("a file name: printable, at most 255 characters, parts joined by '/', none empty, '.' or '..', "
              "no leading '/'")
_CONTENT_TYPE_RULE = "content_type: a MIME type such as image/png, in printable ASCII, at most 255 characters"


def _input_file(i: int, name: object, source: object) -> InputFile | list[Problem]:
    where = f"files[{i}]"
    if not isinstance(name, str) or check_name(name):
        return [Problem(where, "format", _NAME_RULE)]
    if isinstance(source, bytes | bytearray | memoryview):
        return InputFile(name, content_type_for(name), data=bytes(source), index=i)
    if isinstance(source, os.PathLike):
        if not os.path.isfile(source):
            return [Problem(where, "known", "no such file (a path must name a readable file)")]
        return InputFile(name, content_type_for(os.fspath(source)), data=source, index=i)
    if hasattr(source, "read"):
        return InputFile(name, content_type_for(name), data=source, index=i)  # type: ignore[arg-type]
    if isinstance(source, Mapping):
        key, content_type = source.get("key"), source.get("content_type")
        problems: list[Problem] = []
        if set(source) - {"key", "content_type"}:
            problems.append(Problem(where, "unknown", "takes only key and content_type"))
        if not isinstance(key, str) or check_key(key):
            problems.append(Problem(f"{where}.key", "format", "an object key in the bucket, as prepare_upload "
                                    "returned it: printable, at most 1024 bytes, no '.' or '..' part"))
        if content_type is not None and not _content_type_ok(content_type):
            problems.append(Problem(f"{where}.content_type", "format", _CONTENT_TYPE_RULE))
        if problems:
            return problems
        return InputFile(name, content_type or content_type_for(name), key=key, index=i)
    if isinstance(source, str):
        return [Problem(where, "type", "a string is ambiguous: pass pathlib.Path(...) for a local file, or "
                        "{'key': ...} for an object in the bucket")]
    return [Problem(where, "type", "must be bytes, a path, a binary file object, or {'key': ...}")]


def _content_type_ok(content_type: object) -> bool:
    return isinstance(content_type, str) and bool(CONTENT_TYPE_RE.match(content_type))


# -- submit: into the bucket, then rows for the job's insert ------------------------------------------------


@dataclass
class Prepared:
    """What `submit` writes with the job (in its insert's transaction), and the objects it put already."""

    rows: list[dict[str, Any]]
    uploads_taken: list[str]
    input_key: str | None
    written: list[str]


#: Said alike of a key no upload has and of another tenant's upload: the answer tells the two apart for nobody.
NO_SUCH_UPLOAD = "no unused upload has this key: it was used by another job, purged, or never prepared"


def prepare(store: ObjectStore, job_id: str, request: FileRequest, input: Any,
            uploads: Mapping[str, Upload]) -> tuple[Prepared, list[Problem]]:
    """Check each key named against the bucket's rules and the reserved uploads (`uploads`, read by the
    caller), then put the data given (inputs, an offloaded input). Problems first, and then nothing is put."""
    problems: list[Problem] = []
    for item in request.inputs:
        if item.key is None:
            continue
        if not store.owns(item.key):
            problems.append(Problem(f"files[{item.index}].key", "known", f"must be under the prefix {store.prefix}/"))
        elif store.is_upload_key(item.key) and item.key not in uploads:
            problems.append(Problem(f"files[{item.index}].key", "known", NO_SUCH_UPLOAD))
    document: bytes | None = None
    if request.offload:
        document = json.dumps(input, ensure_ascii=False, separators=(",", ":")).encode()
        if len(document) > MAX_OFFLOAD_BYTES:
            problems.append(Problem("input", "size",
                                    f"too large to offload: at most {MAX_OFFLOAD_BYTES} bytes as JSON"))
    if problems:
        return Prepared([], [], None, []), problems

    now = utcnow()
    prepared = Prepared([], [], None, [])
    try:
        for item in request.inputs:
            if item.key is not None:
                upload = uploads.get(item.key)
                prepared.rows.append(_row(job_id, FileRole.INPUT, item.name, item.key, now, state=FileState.DECLARED,
                                          content_type=upload.content_type if upload else item.content_type,
                                          owned=upload is not None,
                                          max_bytes=upload.max_bytes if upload else None))
                if upload is not None:
                    prepared.uploads_taken.append(item.key)
                continue
            key = store.input_key(job_id, item.name)
            assert item.data is not None
            store.put(key, item.data, item.content_type)
            prepared.written.append(key)
            info = store.head(key)
            prepared.rows.append(_row(job_id, FileRole.INPUT, item.name, key, now, state=FileState.STORED,
                                      content_type=item.content_type, info=info))
        for output in request.outputs:
            prepared.rows.append(_row(job_id, FileRole.OUTPUT, output.name, None, now, state=FileState.DECLARED,
                                      content_type=output.content_type))
        if document is not None:
            key = store.input_document_key(job_id)
            store.put(key, document, "application/json")
            prepared.written.append(key)
            prepared.input_key = key
            prepared.rows.append(_row(job_id, FileRole.INPUT_DOCUMENT, "input.json", key, now, state=FileState.STORED,
                                      content_type="application/json", size=len(document)))
    except BaseException:
        forget(store, prepared.written)
        raise
    return prepared, []


def _row(job_id: str, role: FileRole, name: str, key: str | None, now: datetime, *, state: FileState,
         content_type: str | None, owned: bool = True, max_bytes: int | None = None, attempt: int = 0,
         info: ObjectInfo | None = None, size: int | None = None) -> dict[str, Any]:
    return {"job_id": job_id, "attempt": attempt, "role": role.value, "name": name, "key": key,
            "content_type": info.content_type if info and info.content_type else content_type,
            "size": info.size if info else size, "etag": info.etag if info else None, "state": state.value,
            "owned": owned, "max_bytes": max_bytes, "created_at": now, "checked_at": now if info else None}


def forget(store: ObjectStore, keys: Sequence[str]) -> None:
    """Delete objects a submit put for a job that was not created after all (best effort: retention's
    lifecycle rule on the bucket takes what this misses)."""
    if not keys:
        return
    with contextlib.suppress(RpqError):
        store.delete_many(keys)


# -- /run: the block the handler reads ------------------------------------------------------------------------


def url_seconds(ttl_ms: int, presign_seconds: int) -> int:
    """How long a job's URLs live: its whole ttl and a margin (never less than RPQ_PRESIGN_SECONDS), within
    the 7 days a SigV4 URL may live."""
    return min(max(presign_seconds, ttl_ms // 1000 + URL_GRACE_SECONDS), PRESIGN_MAX_SECONDS)


@dataclass(frozen=True)
class InputCheck:
    """An input named by key, as HEAD found it before /run: written to its job_files row with the submit's answer."""

    name: str
    info: ObjectInfo


def check_inputs(store: ObjectStore, files: Sequence[JobFile]) -> list[InputCheck]:
    """HEAD each input named by key that was not checked yet: it must exist, fit the size its upload
    allowed, and have the content type its upload signed. InputFilesRejected lists every problem."""
    problems: list[str] = []
    checks: list[InputCheck] = []
    for row in files:
        if row.role != FileRole.INPUT or row.state != FileState.DECLARED or row.key is None:
            continue
        info = store.head(row.key)
        if info is None:
            problems.append(f"input {row.name!r} is not in the bucket: upload it before the job is sent")
            continue
        if row.max_bytes is not None and info.size > row.max_bytes:
            problems.append(f"input {row.name!r} is {info.size} bytes, more than the {row.max_bytes} "
                            "its upload allowed")
        if row.max_bytes is not None and row.content_type and info.content_type != row.content_type:
            problems.append(f"input {row.name!r} was stored as {info.content_type or 'no content type'}, "
                            f"not the {row.content_type} its upload was prepared for")
        checks.append(InputCheck(row.name, info))
    if problems:
        raise InputFilesRejected(problems)
    return checks


def run_input(store: ObjectStore, row: JobRow, files: Sequence[JobFile], checks: Sequence[InputCheck],
              *, expires: int) -> Any:
    """The input to send RunPod for this attempt: the job's own with the "rpq" block of fresh URLs."""
    sizes = {check.name: check.info.size for check in checks}
    block: dict[str, Any] = {"version": PROTOCOL_VERSION}
    inputs = {f.name: {"url": store.presign_get(f.key, expires), "content_type": f.content_type,
                       "size": sizes.get(f.name, f.size)}
              for f in files if f.role == FileRole.INPUT and f.attempt == 0 and f.key is not None}
    outputs = {}
    for f in files:
        if f.role == FileRole.OUTPUT and f.attempt == 0:
            content_type = f.content_type or DEFAULT_CONTENT_TYPE
            outputs[f.name] = {"url": store.presign_put(store.key_for(row.id, row.attempt, f.name), content_type,
                                                        None, expires),
                               "method": "PUT", "headers": {"Content-Type": content_type}}
    if row.worker_s3:
        # Where a handler using s3Config should write: the attempt's output folder (declared outputs are
        # checked there when the job completes, as for presigned PUTs).
        block["s3"] = {"bucket": store.bucket, "prefix": store.key_for(row.id, row.attempt, "x").removesuffix("x")}
    if inputs:
        block["files"] = inputs
    if outputs:
        block["outputs"] = outputs
    if row.input_key is not None:
        block["input_url"] = store.presign_get(row.input_key, expires)
        return {RPQ_KEY: block}
    return {**row.input, RPQ_KEY: block}


# -- the end of an attempt: outputs checked, a large result moved -------------------------------------------------


@dataclass(frozen=True)
class OutputsFound:
    rows: list[dict[str, Any]]
    missing: list[str]

    @property
    def detail(self) -> str:
        found = len(self.rows) - len(self.missing)
        if not self.missing:
            return f"{found} declared output(s) in the bucket"
        names = ", ".join(repr(n) for n in self.missing[:10]) + (", ..." if len(self.missing) > 10 else "")
        return (f"declared output(s) missing from the bucket: {names} ({found} of {len(self.rows)} found): "
                "flagged files_missing")


def check_outputs(store: ObjectStore, row: JobRow, files: Sequence[JobFile]) -> OutputsFound:
    """HEAD each declared output of the attempt that just completed: the rows to record for the attempt."""
    now = utcnow()
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for declared in files:
        if declared.role != FileRole.OUTPUT or declared.attempt != 0:
            continue
        key = store.key_for(row.id, row.attempt, declared.name)
        info = store.head(key)
        if info is None:
            missing.append(declared.name)
        found = _row(row.id, FileRole.OUTPUT, declared.name, key, now, attempt=row.attempt, info=info,
                     state=FileState.STORED if info else FileState.MISSING, content_type=declared.content_type)
        found["checked_at"] = now
        rows.append(found)
    return OutputsFound(rows, missing)


def declares_outputs(files: Sequence[JobFile]) -> bool:
    return any(f.role == FileRole.OUTPUT and f.attempt == 0 for f in files)


def encoded_size(output: Any) -> int:
    """The output's size as compact JSON, as the row (or the bucket) would hold it."""
    return len(json.dumps(output, ensure_ascii=False, separators=(",", ":")).encode())


def move_result(store: ObjectStore, row: JobRow, output: Any) -> dict[str, Any]:
    """Put a completed attempt's output in the bucket: the job_files row to record with the completion."""
    document = json.dumps(output, ensure_ascii=False, separators=(",", ":")).encode()
    key = store.result_key(row.id, row.attempt)
    store.put(key, document, "application/json")
    now = utcnow()
    return _row(row.id, FileRole.RESULT, "output.json", key, now, attempt=row.attempt, state=FileState.STORED,
                content_type="application/json", size=len(document))


_SIGNED = ("X-Amz-Signature=", "X-Amz-Credential=", "Signature=")


def scrub(value: Any) -> Any:
    """`value` with the query of every presigned URL in it replaced: a handler that echoes its input (many
    a first handler does) would otherwise hand rpq its own URLs back to store. Applied to what a job with
    files reports (output, progress, error) before it is stored."""
    if isinstance(value, str):
        if not any(marker in value for marker in _SIGNED):
            return value
        return " ".join(_without_query(word) if any(m in word for m in _SIGNED) else word for word in value.split(" "))
    if isinstance(value, list):
        return [scrub(item) for item in value]
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items()}
    return value


def _without_query(text: str) -> str:
    head, _, _ = text.partition("?")
    return f"{head}?<presigned query removed>"


def load_document(store: ObjectStore, key: str) -> Any:
    """A JSON document rpq put in the bucket (an offloaded input, a moved output)."""
    return json.loads(store.get_bytes(key))


# -- retention ---------------------------------------------------------------------------------------------------


def object_keys(store: ObjectStore, jobs: Sequence[tuple[str, int]], files: Sequence[JobFile]) -> list[str]:
    """Every object rpq made for these jobs (`(id, attempt)` pairs), from the table alone: inputs it put or
    took from an upload, each attempt's declared outputs (found or not: a failed attempt may have left
    some), moved outputs and offloaded inputs. Objects a caller named by key are theirs and are left."""
    attempts = dict(jobs)
    keys: list[str] = []
    for f in files:
        if f.role == FileRole.OUTPUT and f.attempt == 0:
            keys += [store.key_for(f.job_id, attempt, f.name) for attempt in range(1, attempts.get(f.job_id, 0) + 1)]
        elif f.key is not None and f.owned:
            keys.append(f.key)
    return list(dict.fromkeys(keys))
