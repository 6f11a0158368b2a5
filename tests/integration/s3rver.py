"""s3rver (npm, pinned in tests/js) as a second real S3 server over HTTP: the one that refuses expired URLs.

What s3rver 3.7.1 checks, read from its source and tried on it: an expired SigV4 presigned URL is refused
(403 AccessDenied, "Request has expired", compared to the millisecond on the machine's clock) and so is an
access key id it does not know (its one account is S3RVER). It computes no SigV4 signature, so a URL used for
another key, method, Content-Type or Content-Length is accepted, whatever the secret; and it ignores POST
policies altogether (size range, conditions, expiry, signature). moto checks none of these either.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, stop_process, wait_until

#: The one access key id s3rver knows. It never checks a SigV4 signature, so any secret signs for it.
S3RVER_ACCESS_KEY = "S3RVER"
S3RVER_SCRIPT = ROOT / "tests" / "js" / "node_modules" / "s3rver" / "bin" / "s3rver.js"
S3RVER_BUCKET = "rpq-s3rver"
# Printed once the server is bound; with "-p 0" it is also how the port the kernel chose is learned.
LISTENING_RE = re.compile(r"S3rver listening on 127\.0\.0\.1:(\d+)")


@dataclass
class S3rverProcess:
    """A running s3rver on a loopback port, with one bucket made at startup."""

    process: subprocess.Popen[bytes]
    log_path: Path
    bucket: str
    url: str = ""

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


def start_s3rver(directory: Path, log_path: Path, bucket: str = S3RVER_BUCKET) -> S3rverProcess:
    """s3rver storing into `directory` on a port the kernel picks (no race with another process for it), once it
    answers for `bucket`. Fails the test run, never skips it: scripts/setup installs s3rver with the JS SDK."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("s3rver needs Node.js: install node and npm, then run scripts/setup", pytrace=False)
    if not S3RVER_SCRIPT.is_file():
        pytest.fail("s3rver is not installed in tests/js/node_modules: run scripts/setup "
                    "(or npm ci --prefix tests/js)", pytrace=False)
    # --silent: its request log would hold every presigned URL's query; the "listening" line is printed anyway.
    command = [node, str(S3RVER_SCRIPT), "--directory", str(directory), "--address", "127.0.0.1", "--port", "0",
               "--silent", "--configure-bucket", bucket]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = S3rverProcess(process=process, log_path=log_path, bucket=bucket)
    try:
        wait_until(lambda: process.poll() is not None or LISTENING_RE.search(server.logs()), timeout=30,
                   what="s3rver to print the port it listens on")
        if process.poll() is not None:
            pytest.fail(f"s3rver exited with status {process.returncode}: {server.logs()}", pytrace=False)
        match = LISTENING_RE.search(server.logs())
        assert match is not None
        server.url = f"http://127.0.0.1:{match.group(1)}"
        # An anonymous ListObjects: s3rver serves requests that carry no signature at all.
        wait_until(lambda: httpx.get(f"{server.url}/{bucket}", timeout=2).status_code == 200, timeout=30,
                   what=f"s3rver to list its bucket {bucket}")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3rverProcess]:
    """One s3rver for the session (each xdist worker has its own), stopped at the end."""
    directory = tmp_path_factory.mktemp("s3rver")
    server = start_s3rver(directory / "data", directory / "s3rver.log")
    yield server
    server.stop()
