"""What the rpq command line writes to a person's terminal, and the log lines of its services in JSON: real `rpq`
processes on a fresh SQLite file. (The whole stack's lines, in both formats, are checked by
test_files_pipeline.py, together with the secrets none of them may hold.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

REQUIRED = {"time", "level", "logger", "message", "job_id", "correlation_id", "tenant"}


def rpq(database: Path, *args: str, log_format: str = "text") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{database}", "RPQ_LOG_FORMAT": log_format}
    env.pop("RPQ_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=True)


def test_a_command_for_people_prints_no_library_info_lines_and_verbose_brings_them_back(tmp_path: Path) -> None:
    quiet = rpq(tmp_path / "quiet.db", "db", "upgrade")
    verbose = rpq(tmp_path / "verbose.db", "-v", "db", "upgrade")

    assert quiet.stderr == ""
    assert quiet.stdout.splitlines() == [f"database at sqlite:///{tmp_path / 'quiet.db'} is up to date"]
    assert " INFO alembic.runtime.migration: Running upgrade  -> 0001" in verbose.stderr


def test_in_json_every_line_a_command_logs_is_one_object_with_every_field(tmp_path: Path) -> None:
    done = rpq(tmp_path / "rpq.db", "-v", "db", "upgrade", log_format="json")

    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert any(line["logger"] == "alembic.runtime.migration" for line in lines)
    assert all(set(line) >= REQUIRED for line in lines)


def test_the_api_workers_log_in_json_naming_their_process() -> None:
    # `rpq api --workers N` hands this configuration to uvicorn, which applies it in each worker process.
    script = ("import logging, logging.config; from jobs.web.app import worker_log_config; "
              "logging.config.dictConfig(worker_log_config()); logging.getLogger('rpq.web').warning('from a worker')")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "RPQ_LOG_FORMAT": "json"},
                          capture_output=True, text=True, timeout=60, check=True)

    [line] = [json.loads(line) for line in done.stderr.splitlines()]
    assert (line["logger"], line["message"], line["level"]) == ("rpq.web", "from a worker", "WARNING")
    assert isinstance(line["process"], int) and set(line) >= REQUIRED
