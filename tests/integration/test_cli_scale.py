"""`rpq endpoints scale` and `rpq endpoints audit`, run as an operator runs them: a child process with its
environment, against the simulator's management API over HTTP. On SQLite alone: tests/integration/test_scaling.py
holds the same scaling to both databases, and these check the command around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from jobs.storage.db import upgrade
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, ROOT, SimulatorProcess

pytestmark = pytest.mark.integration

Rpq = Callable[..., tuple[int, str, str]]


@pytest.fixture
def rpq(tmp_path: Path, simulator: SimulatorProcess) -> Rpq:
    """Run `rpq ARGS` with stdin not a terminal; returns (exit code, stdout, stderr)."""
    database_url = f"sqlite:///{tmp_path / 'scale.db'}"
    upgrade(database_url)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "RUNPOD_API_KEY": simulator.api_key,
        "RUNPOD_REST_URL": f"{simulator.root_url}/mgmt/v2",
        "RUNPOD_ENDPOINTS": f"{ENDPOINT_NAME}={ENDPOINT_ID}",
        "LOGNAME": "alice",  # getpass reads LOGNAME first: the actor is operator:alice
    }

    def run(*args: str) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              stdin=subprocess.DEVNULL, text=True, timeout=60)
        return done.returncode, done.stdout, done.stderr

    return run


def live_max(simulator: SimulatorProcess) -> int:
    body = httpx.get(f"{simulator.root_url}/mgmt/v2/serverless/{ENDPOINT_ID}", timeout=10,
                     headers={"Authorization": f"Bearer {simulator.api_key}"}).json()
    return int(body["workers"]["max"])


def test_scale_with_yes_changes_the_simulator_and_the_audit_lists_who_and_what(
        rpq: Rpq, simulator: SimulatorProcess) -> None:
    before = live_max(simulator)

    code, out, err = rpq("endpoints", "scale", ENDPOINT_NAME, "--max", str(before + 2), "--yes",
                         "--reason", "launch day")
    _, table, _ = rpq("endpoints", "audit", ENDPOINT_NAME)
    _, listed, _ = rpq("endpoints", "audit", "--json")

    assert code == 0, err
    assert f"max {before}," in out and f"max {before + 2}," in out and "note: RunPod caps" in out
    assert live_max(simulator) == before + 2
    [row] = json.loads(listed)
    assert (row["actor"], row["reason"], row["ok"]) == ("operator:alice", "launch day", True)
    assert (row["before_max"], row["asked_max"], row["after_max"]) == (before, before + 2, before + 2)
    assert table.splitlines()[0].split()[:3] == ["AT", "ENDPOINT", "ACTOR"] and "operator:alice" in table


def test_without_yes_and_without_a_terminal_it_refuses_and_changes_nothing(
        rpq: Rpq, simulator: SimulatorProcess) -> None:
    before = live_max(simulator)

    code, _, err = rpq("endpoints", "scale", ENDPOINT_NAME, "--max", str(before + 1))
    _, listed, _ = rpq("endpoints", "audit", "--json")

    assert code == 2 and "--yes" in err and "Traceback" not in err
    assert live_max(simulator) == before
    assert json.loads(listed) == []


def test_refused_values_exit_2_naming_every_problem_and_change_nothing(
        rpq: Rpq, simulator: SimulatorProcess) -> None:
    before = live_max(simulator)

    code, _, err = rpq("endpoints", "scale", ENDPOINT_NAME, "--max", "1", "--min", "2", "--idle-timeout", "0", "--yes")
    unreadable, _, unread = rpq("endpoints", "scale", ENDPOINT_NAME, "--max", "lots", "--yes")

    assert code == 2 and "min 2 must not be more than max 1" in err and "idle_timeout: must be whole seconds" in err
    assert unreadable == 2 and "max: must be a whole number" in unread
    assert live_max(simulator) == before


def test_a_raise_past_the_tier_cap_exits_1_with_runpods_words_and_is_audited(
        rpq: Rpq, simulator: SimulatorProcess) -> None:
    before = live_max(simulator)

    code, _, err = rpq("endpoints", "scale", ENDPOINT_NAME, "--max", "500", "--yes")
    _, table, _ = rpq("endpoints", "audit")

    assert code == 1 and "RunPod refused" in err and "cap of 40" in err
    assert simulator.api_key not in err
    assert live_max(simulator) == before
    assert table.splitlines()[1].split()[7] == "NO"  # the OK column of the one change (AT takes two words)


def test_a_dry_run_shows_the_change_and_sends_and_records_nothing(rpq: Rpq, simulator: SimulatorProcess) -> None:
    before = live_max(simulator)

    code, out, err = rpq("endpoints", "scale", ENDPOINT_NAME, "--max", str(before + 1), "--dry-run", "--json")
    _, table, _ = rpq("endpoints", "audit")

    shown = json.loads(out)
    assert code == 0, err
    assert (shown["outcome"], shown["before"]["max"], shown["asked"]["max"]) == ("dry_run", before, before + 1)
    assert live_max(simulator) == before
    assert table.strip() == "no scale changes"
