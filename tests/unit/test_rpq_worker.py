"""rpq_worker, the GPU worker's side of the files protocol, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rpq_worker
from tests.conftest import ROOT, free_port
from tests.object_server import Misbehave, ObjectServer, serving

SECRET = "s3cr3t-signature"


@pytest.fixture
def server() -> Iterator[ObjectServer]:
    with serving() as running:
        yield running


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpq_worker, "BACKOFF_SECONDS", 0.0)


def block(files: dict[str, Any] | None = None, outputs: dict[str, Any] | None = None,
          **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"version": 1, **extra}
    if files is not None:
        raw["files"] = files
    if outputs is not None:
        raw["outputs"] = outputs
    return raw


def with_input(server: ObjectServer, name: str, data: bytes, content_type: str = "audio/wav",
               **event_input: Any) -> dict[str, Any]:
    server.objects[f"/in/{name}"] = data
    server.content_types[f"/in/{name}"] = content_type
    files = {name: {"url": server.url(f"in/{name}"), "content_type": content_type, "size": len(data)}}
    return {**event_input, "rpq": block(files=files)}


def with_output(server: ObjectServer, name: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    slot = {"url": server.url(f"out/{name}"), "method": "PUT",
            "headers": {"Content-Type": "video/mp4"} if headers is None else headers}
    return {"rpq": block(outputs={name: slot})}


def assert_no_secret(text: str) -> None:
    assert SECRET not in text and "X-Amz" not in text and "AKIA" not in text and "?" not in text, text


# -- the block and the input -------------------------------------------------------------------------------


def test_the_job_input_is_what_was_submitted_without_the_rpq_block() -> None:
    sent = {"text": "hello", "rpq": block(files={})}

    assert rpq_worker.job_input(sent) == {"text": "hello"}
    assert rpq_worker.job_input({"text": "no files"}) == {"text": "no files"}
    assert rpq_worker.job_input("a string") == "a string"
    assert sent["rpq"] == block(files={})  # the event's input is left as it came


def test_an_offloaded_input_is_fetched_from_its_url_and_the_block_still_serves_the_files(
        server: ObjectServer) -> None:
    document = {"text": "long " * 1000, "voice": "ana", "nested": [1, {"a": None}]}
    server.objects["/in/input.json"] = json.dumps(document).encode()
    event_input = with_input(server, "audio.wav", b"RIFF....")
    event_input["rpq"]["input_url"] = server.url("in/input.json")

    assert rpq_worker.job_input(event_input) == document
    assert rpq_worker.read_bytes(event_input, "audio.wav") == b"RIFF...."
    (fetch,) = server.requests("GET", "in/input.json")
    assert fetch.query.endswith("X-Amz-Credential=AKIA%2Fsecret")  # the URL was used exactly as given


def test_an_offloaded_input_that_is_not_json_fails_naming_its_url_without_the_query(server: ObjectServer) -> None:
    server.objects["/in/input.json"] = b"\xff not json"

    with pytest.raises(rpq_worker.ProtocolError) as raised:
        rpq_worker.job_input({"rpq": block(input_url=server.url("in/input.json"))})

    assert f"http://127.0.0.1:{server.port}/in/input.json is not JSON" in str(raised.value)
    assert_no_secret(str(raised.value))


def test_an_offloaded_input_must_be_the_only_key_of_the_input() -> None:
    with pytest.raises(rpq_worker.ProtocolError, match="must be its only key; 2 other keys found"):
        rpq_worker.job_input({"text": "x", "voice": "y", "rpq": block(input_url="https://s3.example/in.json")})


def test_a_block_of_another_version_is_refused_naming_both_versions() -> None:
    with pytest.raises(rpq_worker.ProtocolError) as newer:
        rpq_worker.job_input({"rpq": {"version": 2, "files": "anything"}})
    with pytest.raises(rpq_worker.ProtocolError) as missing:
        rpq_worker.input_names({"rpq": {}})

    assert newer.value.problems == ["input.rpq.version: 2 is not the version this rpq_worker speaks (1); "
                                    "use the rpq_worker.py of the rpq that sent the job"]
    assert missing.value.problems == ["input.rpq.version: must be a whole number (this module speaks 1)"]


def test_every_problem_with_a_block_is_listed_and_none_quotes_a_url() -> None:
    url = f"https://s3.example/b/k?X-Amz-Signature={SECRET}"
    bad = {"rpq": block(
        files={"a.wav": {"url": f"ftp://s3.example/a?X-Amz-Signature={SECRET}"}, "b.wav": "x",
               "c.wav": {"url": url, "size": -1, "content_type": 7}},
        outputs={"v.mp4": {"url": url, "method": "POST", "headers": {"Content-Type": "video/mp4\r\nX-Evil: 1"}},
                 "w.mp4": {"url": url, "headers": {"content-type": "a/b", "Content-Type": "a/b"}}},
        input_url="not a url")}

    with pytest.raises(rpq_worker.ProtocolError) as raised:
        rpq_worker.read_block(bad)

    assert raised.value.problems == [
        "input.rpq.files['a.wav'].url: must be an http(s) URL",
        "input.rpq.files['b.wav']: must be an object with a url",
        "input.rpq.files['c.wav'].content_type: must be a string",
        "input.rpq.files['c.wav'].size: must be a whole number of bytes from 0",
        "input.rpq.outputs['v.mp4'].method: only PUT is supported",
        "input.rpq.outputs['v.mp4'].headers: must be an object of header: value strings, without line breaks",
        "input.rpq.outputs['w.mp4'].headers: a header is named twice",
        "input.rpq.input_url: must be an http(s) URL",
    ]
    assert isinstance(raised.value, ValueError)
    assert_no_secret(str(raised.value))


def test_files_are_listed_in_the_order_sent_and_no_repr_shows_a_url() -> None:
    url = f"https://s3.example/b/k?X-Amz-Signature={SECRET}"
    event_input = {"rpq": block(
        files={"frames/0002.png": {"url": url}, "frames/0001.png": {"url": url, "content_type": "image/png",
                                                                    "size": 3}},
        outputs={"video.mp4": {"url": url, "headers": {"Content-Type": "video/mp4"}}, "log.txt": {"url": url}},
        input_url=url, future_key="ignored")}

    parsed = rpq_worker.read_block(event_input)

    assert rpq_worker.input_names(event_input) == ["frames/0002.png", "frames/0001.png"]
    assert rpq_worker.output_names(event_input) == ["video.mp4", "log.txt"]
    assert rpq_worker.input_files(event_input)["frames/0001.png"].size == 3
    assert rpq_worker.output_files(event_input)["log.txt"].headers == {}
    assert parsed is not None and parsed.input_url == url
    assert_no_secret(repr(parsed))
    assert (rpq_worker.input_names({"no": "block"}), rpq_worker.output_names([1, 2])) == ([], [])


def test_a_name_that_was_not_declared_is_an_error_naming_it_and_the_declared_ones(server: ObjectServer) -> None:
    event_input = {"rpq": block(files={"a.wav": {"url": server.url("in/a.wav")}},
                                outputs={"video.mp4": {"url": server.url("out/v")}, "log.txt": {"url": "http://h/l"}})}

    with pytest.raises(rpq_worker.UndeclaredFile) as output:
        rpq_worker.upload(event_input, "x.mp4", b"data")
    with pytest.raises(rpq_worker.UndeclaredFile) as input_:
        rpq_worker.open_input(event_input, "b.wav")
    with pytest.raises(rpq_worker.UndeclaredFile) as no_block:
        rpq_worker.download({"text": "hi"}, "a.wav", "/nonexistent/a.wav")
    with pytest.raises(LookupError) as whole_event:
        rpq_worker.read_bytes({"id": "job-1", "input": event_input}, "a.wav")

    assert str(output.value) == "output 'x.mp4' was not declared at submit; declared: 'video.mp4', 'log.txt'"
    assert str(input_.value) == "input 'b.wav' was not sent with the job; declared: 'a.wav'"
    assert str(no_block.value) == ("input 'a.wav' was not sent with the job; declared: none (the input has no "
                                   "'rpq' block: the job was submitted without files)")
    assert str(whole_event.value).endswith("(this looks like the whole event: pass event['input'])")
    assert server.seen == []


# -- downloads ---------------------------------------------------------------------------------------------


def test_an_input_streams_and_downloads_to_a_file_or_into_a_folder(server: ObjectServer, tmp_path: Path) -> None:
    data = os.urandom(3 * rpq_worker.CHUNK_BYTES + 17)
    event_input = with_input(server, "frames/0001.png", data, "image/png")

    with rpq_worker.open_input(event_input, "frames/0001.png") as stream:
        first = stream.read(10)
        rest = stream.read()
        size, content_type = stream.size, stream.content_type
    as_file = rpq_worker.download(event_input, "frames/0001.png", tmp_path / "one.png")
    into_folder = rpq_worker.download(event_input, "frames/0001.png", tmp_path)
    everything = rpq_worker.download_all(event_input, tmp_path / "all")

    assert first + rest == data and (size, content_type) == (len(data), "image/png")
    assert as_file == tmp_path / "one.png" and as_file.read_bytes() == data
    assert into_folder == tmp_path / "frames" / "0001.png" and into_folder.read_bytes() == data
    assert everything == {"frames/0001.png": tmp_path / "all" / "frames" / "0001.png"}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["0001.png", "0001.png", "one.png"]


def test_a_download_that_breaks_off_resumes_where_it_stopped_with_a_range_request(
        server: ObjectServer, tmp_path: Path) -> None:
    data = os.urandom(2_000_000)
    event_input = with_input(server, "audio.wav", data)
    server.then("in/audio.wav", Misbehave(cut_after=700_000), Misbehave(cut_after=500_000))

    path = rpq_worker.download(event_input, "audio.wav", tmp_path / "audio.wav")

    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [seen.header("Range") for seen in server.requests("GET", "in/audio.wav")] == [
        None, "bytes=700000-", "bytes=1200000-"]


def test_a_server_that_ignores_range_has_the_bytes_already_read_skipped(server: ObjectServer) -> None:
    data = os.urandom(1_000_000)
    event_input = with_input(server, "audio.wav", data)
    server.then("in/audio.wav", Misbehave(cut_after=400_000), Misbehave(ignore_range=True))

    assert rpq_worker.read_bytes(event_input, "audio.wav") == data
    assert len(server.requests("GET", "in/audio.wav")) == 2


def test_a_download_that_keeps_breaking_off_fails_naming_the_file_and_leaves_no_file(
        server: ObjectServer, tmp_path: Path) -> None:
    event_input = with_input(server, "audio.wav", os.urandom(100_000))
    server.then("in/audio.wav", *[Misbehave(cut_after=1000)] * 3)

    with pytest.raises(rpq_worker.FileTransferError) as raised:
        rpq_worker.download(event_input, "audio.wav", tmp_path / "audio.wav")

    assert str(raised.value) == (f"input 'audio.wav': GET http://127.0.0.1:{server.port}/in/audio.wav broke off "
                                 "after 3000 of 100000 bytes (after 2 resumes)")
    assert raised.value.name == "audio.wav" and len(server.requests("GET", "in/audio.wav")) == 3
    assert list(tmp_path.iterdir()) == []


def test_a_5xx_is_tried_again_and_a_403_is_not(server: ObjectServer, caplog: pytest.LogCaptureFixture) -> None:
    event_input = with_input(server, "audio.wav", b"abc")
    event_input["rpq"]["files"]["b.wav"] = {"url": server.url("in/b.wav")}
    server.then("in/audio.wav", Misbehave(status=503, body=b"<Error><Code>SlowDown</Code></Error>"))
    # S3's answer to a bad signature repeats the request it expected, query included: none of it may show.
    server.then("in/b.wav", Misbehave(status=403, body=(
        f"<Error><Code>SignatureDoesNotMatch</Code><CanonicalRequest>GET /in/b.wav X-Amz-Signature={SECRET}"
        "</CanonicalRequest></Error>").encode()))

    with caplog.at_level(logging.WARNING, logger="rpq_worker"):
        healed = rpq_worker.read_bytes(event_input, "audio.wav")
        with pytest.raises(rpq_worker.FileTransferError) as refused:
            rpq_worker.read_bytes(event_input, "b.wav")

    assert healed == b"abc" and len(server.requests("GET", "in/audio.wav")) == 2
    assert str(refused.value) == (f"input 'b.wav': GET http://127.0.0.1:{server.port}/in/b.wav answered HTTP 403 "
                                  "SignatureDoesNotMatch (the URL expired, or the request is not the one it was "
                                  "signed for)")
    assert (refused.value.status, refused.value.code, refused.value.attempts) == (403, "SignatureDoesNotMatch", 1)
    assert len(server.requests("GET", "in/b.wav")) == 1
    assert caplog.messages == [f"input 'audio.wav': GET http://127.0.0.1:{server.port}/in/audio.wav answered "
                               "HTTP 503 SlowDown; trying again in 0.0 s (2 of 3)"]
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_an_unreachable_server_fails_after_every_try_without_the_query(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/in/a.wav?X-Amz-Signature={SECRET}"  # nothing listens there now

    with caplog.at_level(logging.WARNING, logger="rpq_worker"), \
            pytest.raises(rpq_worker.FileTransferError) as raised:
        rpq_worker.read_bytes({"rpq": block(files={"a.wav": {"url": url}})}, "a.wav")

    assert str(raised.value).startswith("input 'a.wav': GET http://127.0.0.1:")
    assert "ConnectionRefusedError" in str(raised.value) and str(raised.value).endswith("(after 3 tries)")
    assert raised.value.attempts == 3 and len(caplog.messages) == 2
    for text in [str(raised.value), *caplog.messages]:
        assert_no_secret(text)


def test_a_file_shorter_or_longer_than_rpq_declared_is_an_error(server: ObjectServer) -> None:
    event_input = with_input(server, "audio.wav", b"12345")
    event_input["rpq"]["files"]["audio.wav"]["size"] = 6

    with pytest.raises(rpq_worker.FileTransferError, match=r"'audio\.wav'.* gave 5 bytes; rpq declared 6"):
        rpq_worker.read_bytes(event_input, "audio.wav")


def test_a_name_that_would_leave_the_folder_is_not_written_into_it(server: ObjectServer, tmp_path: Path) -> None:
    event_input = {"rpq": block(files={"../escape.txt": {"url": server.url("in/x")}})}

    with pytest.raises(rpq_worker.ProtocolError, match=r"'\.\./escape\.txt': not a file name that can be written"):
        rpq_worker.download_all(event_input, tmp_path / "in")

    assert server.seen == []


# -- uploads -----------------------------------------------------------------------------------------------


class Unseekable(io.RawIOBase):
    """A pipe-like source: it can be read once, from the start, and tells no length."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._data.readinto(buffer)


@pytest.mark.parametrize("kind", ["path", "str path", "bytes", "memoryview", "file at a position", "unseekable"])
def test_an_upload_sends_the_declared_headers_a_content_length_and_every_byte(
        server: ObjectServer, tmp_path: Path, kind: str) -> None:
    data = os.urandom(2 * rpq_worker.CHUNK_BYTES + 5)
    (tmp_path / "v.mp4").write_bytes(b"skip" + data)
    (tmp_path / "exact.mp4").write_bytes(data)
    event_input = with_output(server, "video.mp4", {"Content-Type": "video/mp4", "x-amz-meta-job": "job-1"})
    opened = open(tmp_path / "v.mp4", "rb")  # noqa: SIM115 - closed below
    opened.seek(4)
    source: Any = {"path": tmp_path / "exact.mp4", "str path": str(tmp_path / "exact.mp4"), "bytes": data,
                   "memoryview": memoryview(data), "file at a position": opened, "unseekable": Unseekable(data)}[kind]

    sent = rpq_worker.upload(event_input, "video.mp4", source)
    opened.close()

    (put,) = server.requests("PUT", "out/video.mp4")
    assert sent == rpq_worker.Uploaded("video.mp4", len(data), hashlib.sha256(data).hexdigest())
    assert (put.body_size, put.body_sha256) == (len(data), sent.sha256)
    assert server.objects["/out/video.mp4"] == data
    assert (put.header("Content-Type"), put.header("Content-Length")) == ("video/mp4", str(len(data)))
    assert put.header("x-amz-meta-job") == "job-1" and put.header("Transfer-Encoding") is None
    assert put.query == "X-Amz-Signature=s3cr3t-signature&X-Amz-Credential=AKIA%2Fsecret"


def test_an_output_declared_without_a_content_type_is_sent_as_octet_stream_not_as_a_form(
        server: ObjectServer) -> None:
    rpq_worker.upload(with_output(server, "blob", headers={}), "blob", b"\x00\x01")

    (put,) = server.requests("PUT", "out/blob")
    assert put.header("Content-Type") == "application/octet-stream"


def test_an_upload_is_sent_again_whole_after_a_5xx_and_not_after_a_4xx(server: ObjectServer) -> None:
    data = os.urandom(300_000)
    event_input = with_output(server, "video.mp4")
    event_input["rpq"]["outputs"]["gone.mp4"] = {"url": server.url("out/gone.mp4"), "headers": {}}
    server.then("out/video.mp4", Misbehave(status=500), Misbehave(status=502))
    server.then("out/gone.mp4", Misbehave(status=403, body=b"<Error><Code>AccessDenied</Code></Error>"))

    sent = rpq_worker.upload(event_input, "video.mp4", data)
    with pytest.raises(rpq_worker.FileTransferError) as refused:
        rpq_worker.upload(event_input, "gone.mp4", data)

    puts = server.requests("PUT", "out/video.mp4")
    assert [p.body_sha256 for p in puts] == [hashlib.sha256(data).hexdigest()] * 3 == [sent.sha256] * 3
    assert server.objects["/out/video.mp4"] == data
    assert "output 'gone.mp4': PUT" in str(refused.value) and "answered HTTP 403 AccessDenied" in str(refused.value)
    assert len(server.requests("PUT", "out/gone.mp4")) == 1
    assert_no_secret(str(refused.value))


def test_an_output_declared_with_another_content_length_is_refused_before_anything_is_sent(
        server: ObjectServer) -> None:
    event_input = with_output(server, "video.mp4", {"Content-Type": "video/mp4", "Content-Length": "10"})

    with pytest.raises(rpq_worker.FileTransferError, match=r"'video.mp4': declared at submit as 10 bytes; "
                                                           r"the source has 11"):
        rpq_worker.upload(event_input, "video.mp4", b"hello world")
    sent = rpq_worker.upload(event_input, "video.mp4", b"0123456789")

    (put,) = server.requests("PUT", "out/video.mp4")
    assert sent.size == 10 and put.header("Content-Length") == "10"


class Shrinking(io.BytesIO):
    """A seekable source whose reads stop short of the length its seek reported (a file truncated mid-upload)."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(min(size if size is not None and size >= 0 else 10**9, max(0, 1000 - self.tell())))


def test_a_source_that_changes_while_uploading_fails_the_upload_naming_the_output(server: ObjectServer) -> None:
    event_input = with_output(server, "video.mp4")

    with pytest.raises(rpq_worker.FileTransferError) as raised:
        rpq_worker.upload(event_input, "video.mp4", Shrinking(b"x" * 5000))

    assert str(raised.value) == ("output 'video.mp4': the source ended after 1000 of its 5000 bytes (was it "
                                 "changed while uploading?)")
    assert "/out/video.mp4" not in server.objects


def test_a_text_file_is_refused_as_a_source(server: ObjectServer, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hi")

    with open(tmp_path / "t.txt") as text, pytest.raises(TypeError, match="opened in binary mode"):
        rpq_worker.upload(with_output(server, "t.txt"), "t.txt", text)


def test_a_large_file_goes_through_in_chunks_never_whole_in_memory(server: ObjectServer, tmp_path: Path) -> None:
    size = 48 * 1024 * 1024
    source = tmp_path / "big.bin"
    with open(source, "wb") as out:
        for _ in range(size // rpq_worker.CHUNK_BYTES):
            out.write(os.urandom(rpq_worker.CHUNK_BYTES))
    server.sink = True
    server.objects["/in/big.bin"] = source.read_bytes()  # held by the server before the measuring starts
    event_input = {"rpq": block(files={"big.bin": {"url": server.url("in/big.bin"), "size": size}},
                                outputs={"big.bin": {"url": server.url("out/big.bin")}})}

    tracemalloc.start()
    try:
        sent = rpq_worker.upload(event_input, "big.bin", source)
        fetched = rpq_worker.download(event_input, "big.bin", tmp_path / "fetched.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    (put,) = server.requests("PUT", "out/big.bin")
    assert sent.size == put.body_size == size and put.body_sha256 == sent.sha256
    assert fetched.stat().st_size == size
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes traced"  # the server's own 1 MB reads count too


# -- standard library only ---------------------------------------------------------------------------------


def test_the_module_imports_and_works_with_nothing_but_the_standard_library(tmp_path: Path) -> None:
    # The module alone in a folder, and an interpreter that sees neither site-packages nor this project.
    shutil.copy(ROOT / "rpq_worker.py", tmp_path / "rpq_worker.py")
    program = (
        "import sys\n"
        "import rpq_worker\n"
        "assert rpq_worker.job_input({'a': 1, 'rpq': {'version': 1}}) == {'a': 1}\n"
        "assert not any(p.endswith('-packages') for p in sys.path), sys.path\n"
        "outside = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)\n"
        "                 - set(sys.builtin_module_names) - {'__main__', 'rpq_worker'})\n"
        "print(rpq_worker.__file__, outside)\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": os.environ.get("PATH", "")}

    done = subprocess.run([sys.executable, "-S", "-s", "-c", program], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "rpq_worker.py"), "[]"]
