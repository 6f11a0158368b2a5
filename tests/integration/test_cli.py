"""The rpq command line, run as a user runs it: a child process with its environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def rpq(tmp_path: Path, redis_url: str):  # type: ignore[no-untyped-def]
    """Run `rpq ARGS` against a fresh SQLite file; returns (exit code, stdout, stderr)."""
    yield from _rpq(tmp_path, redis_url, {})


@pytest.fixture
def capped_rpq(tmp_path: Path, redis_url: str):  # type: ignore[no-untyped-def]
    """`rpq` with a max_in_flight of 1 on the endpoint."""
    yield from _rpq(tmp_path, redis_url, {"RPQ_MAX_IN_FLIGHT": f"{ENDPOINT_NAME}=1"})


def _rpq(tmp_path: Path, redis_url: str, extra: dict[str, str]):  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        # A broker database no worker reads: submitted jobs stay PENDING, which is what these tests look at.
        "CELERY_BROKER_URL": redis_url.rsplit("/", 1)[0] + "/0",
        "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}",
        **extra,
    }

    def run(*args: str | bytes) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        return done.returncode, done.stdout, done.stderr

    code, _, err = run("db", "upgrade")
    assert code == 0, err
    yield run
    import redis

    redis.Redis.from_url(env["CELERY_BROKER_URL"]).delete("rpq.submit")


def test_db_upgrade_is_safe_to_run_again(rpq) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = rpq("db", "upgrade")

    assert code == 0 and "up to date" in out


def test_submit_prints_the_new_job_as_json(rpq) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = rpq("submit", "tts", "--input", '{"text": "hello"}', "--correlation-id", "req-7",
                       "--metadata", '{"user": 1}', "--json")

    job = json.loads(out)
    assert code == 0
    assert (job["status"], job["endpoint"], job["endpoint_id"]) == ("PENDING", "tts", ENDPOINT_ID)
    assert (job["input"], job["correlation_id"], job["metadata"]) == ({"text": "hello"}, "req-7", {"user": 1})


def test_bad_submit_lists_every_problem_exits_2_and_writes_nothing(rpq) -> None:  # type: ignore[no-untyped-def]
    code, _, err = rpq("submit", "not an endpoint", "--input", '{"x": 1}', "--policy", '{"ttl": 5, "speed": 1}')
    _, listed, _ = rpq("jobs", "list", "--json")

    assert code == 2
    assert "unknown endpoint" in err and "policy.ttl" in err and "policy: unknown field" in err
    assert "speed" not in err  # the unknown field is reported, never its name
    assert json.loads(listed) == []


def test_every_problem_of_a_submit_is_listed_even_with_input_too_deep_to_read(rpq) -> None:  # type: ignore[no-untyped-def]
    too_deep = "[" * 5000 + "]" * 5000
    # Bytes that are not UTF-8 reach Python as lone surrogates, which no database column can keep.
    code, out, err = rpq("submit", "tts", "--input", too_deep, "--policy", '{"ttl": 1}', "--metadata", "[1]",
                         "--correlation-id", b"req-\xff")
    _, listed, _ = rpq("jobs", "list", "--json")

    assert code == 2 and out == "" and "Traceback" not in err
    assert [line.split(":")[0] for line in err.splitlines()[1:]] == [
        "  - input", "  - policy.ttl", "  - correlation_id", "  - metadata"]
    assert json.loads(listed) == []


def test_every_problem_of_a_listing_is_listed_and_none_crashes_it(rpq) -> None:  # type: ignore[no-untyped-def]
    code, out, err = rpq("jobs", "list", "--since", "999999999999d", "--limit", "0", "--offset", "1" + "0" * 30,
                         "--status", "DONE")

    assert code == 2 and out == "" and "Traceback" not in err
    assert sorted(line.split(":")[0].strip() for line in err.splitlines()[1:]) == [
        "- limit", "- offset", "- since", "- status"]


def test_input_that_is_not_json_is_a_usage_error(rpq) -> None:  # type: ignore[no-untyped-def]
    code, _, err = rpq("submit", "tts", "--input", "{oops")

    assert code == 2 and "not valid JSON" in err


def test_jobs_list_filters_and_prints_a_table(rpq) -> None:  # type: ignore[no-untyped-def]
    first = json.loads(rpq("submit", "tts", "--input", "1", "--json")[1])
    second = json.loads(rpq("submit", "tts", "--input", "2", "--json")[1])
    rpq("jobs", "cancel", second["id"])

    _, table, _ = rpq("jobs", "list")
    _, pending, _ = rpq("jobs", "list", "--status", "pending", "--since", "1h", "--json")
    code, _, err = rpq("jobs", "list", "--since", "yesterday")

    assert table.splitlines()[0].split()[:3] == ["ID", "STATUS", "ENDPOINT"]
    assert first["id"] in table and second["id"] in table and "CANCELLED" in table
    assert [job["id"] for job in json.loads(pending)] == [first["id"]]
    assert code == 2 and "since: use an age" in err


def test_show_prints_the_job_and_its_history(rpq) -> None:  # type: ignore[no-untyped-def]
    job = json.loads(rpq("submit", "tts", "--input", '{"a": 1}', "--json")[1])
    rpq("jobs", "cancel", job["id"])

    _, text, _ = rpq("jobs", "show", job["id"])
    _, data, _ = rpq("jobs", "show", job["id"], "--json")

    assert "PENDING -> CANCELLED" in text.replace("  ", " ").replace("  ", " ")
    events = json.loads(data)["events"]
    assert [(e["from"], e["to"], e["source"]) for e in events] == [
        (None, "PENDING", "api"), ("PENDING", "CANCELLED", "operator")
    ]


def test_show_and_list_say_why_a_pending_job_waits(capped_rpq) -> None:  # type: ignore[no-untyped-def]
    first = json.loads(capped_rpq("submit", "tts", "--input", "1", "--json")[1])["id"]
    second = json.loads(capped_rpq("submit", "tts", "--input", "2", "--json")[1])["id"]
    capped_rpq("jobs", "cancel", first)
    third = json.loads(capped_rpq("submit", "tts", "--input", "3", "--json")[1])["id"]

    _, shown, _ = capped_rpq("jobs", "show", third)
    _, table, _ = capped_rpq("jobs", "list")
    _, listed, _ = capped_rpq("jobs", "list", "--json")

    assert "waiting: endpoint tts has 0 of 1 jobs in flight (max_in_flight); 1 job ahead of this one" in shown
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert rows["ID"].split()[-1] == "WAITING"
    assert rows[third].endswith("max_in_flight 0/1, 1 ahead") and rows[second].endswith("  next")
    assert rows[first].endswith("  -")  # cancelled: waits for nothing
    assert {job["id"]: (job["waiting"] or {}).get("reason") for job in json.loads(listed)} == {
        first: None, second: "next", third: "max_in_flight"}


def test_cancel_and_retry_take_many_ids_and_report_each(rpq) -> None:  # type: ignore[no-untyped-def]
    a = json.loads(rpq("submit", "tts", "--input", "1", "--json")[1])["id"]
    b = json.loads(rpq("submit", "tts", "--input", "2", "--json")[1])["id"]

    code, out, _ = rpq("jobs", "cancel", a, b, "--json")
    assert code == 0 and [j["status"] for j in json.loads(out)] == ["CANCELLED", "CANCELLED"]

    code, out, err = rpq("jobs", "retry", a, "no-such-job")
    assert code == 1
    assert f"{a} retry: now PENDING" in out and "no job with id 'no-such-job'" in err


def test_show_of_an_unknown_job_exits_1(rpq) -> None:  # type: ignore[no-untyped-def]
    code, _, err = rpq("jobs", "show", "missing")

    assert code == 1 and "no job with id 'missing'" in err


def test_the_demo_runs_the_whole_pipeline_and_starts_its_own_redis_when_none_answers(
    tmp_path: Path,
) -> None:
    from tests.conftest import free_port

    env = {**os.environ, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there

    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--jobs", "6", "--seed", "3",
         "--database-url", f"sqlite:///{tmp_path / 'demo.db'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "starting a private one" in done.stdout
    assert "summary" in done.stdout and "p50" in done.stdout and "status calls per job" in done.stdout
    assert "UNEXPECTED" not in done.stdout
    assert " INFO " not in done.stdout + done.stderr  # no library's notices (alembic's, a line per migration)
