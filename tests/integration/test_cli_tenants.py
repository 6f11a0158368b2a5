"""`rpq jobs` filtered by tenant and by indexed metadata: an operator's view of one web app's (or one user's)
jobs. In-process (click's runner) on SQLite: the filters are list_jobs's and select_jobs's, tested on both
databases elsewhere; this is the command line's wiring."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

import jobs
from jobs.cli import main
from jobs.runtime import Runtime, set_runtime
from jobs.states import JobStatus

pytestmark = pytest.mark.integration


@pytest.fixture
def database_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/rpq.db"


@pytest.fixture
def rpq(runtime: Runtime) -> Iterator[tuple[Runtime, CliRunner]]:
    runtime.settings = runtime.settings.model_copy(update={"metadata_index": ("user",)})
    previous = set_runtime(runtime)
    try:
        yield runtime, CliRunner()
    finally:
        set_runtime(previous)


def ids(result: Result) -> set[str]:
    assert result.exit_code == 0, result.output
    return {job["id"] for job in json.loads(result.output)}


def test_jobs_list_filters_by_tenant_and_by_indexed_metadata(rpq: tuple[Runtime, CliRunner]) -> None:
    rt, cli = rpq
    shop_42 = jobs.submit("tts", {}, tenant="shop", metadata={"user": 42}, runtime=rt).id
    shop_7 = jobs.submit("tts", {}, tenant="shop", metadata={"user": 7}, runtime=rt).id
    other = jobs.submit("tts", {}, tenant="other", metadata={"user": 42}, runtime=rt).id

    assert ids(cli.invoke(main, ["jobs", "list", "--tenant", "shop", "--json"])) == {shop_42, shop_7}
    assert ids(cli.invoke(main, ["jobs", "list", "--meta", "user=42", "--json"])) == {shop_42, other}
    assert ids(cli.invoke(main, ["jobs", "list", "--tenant", "shop", "--meta", "user=42", "--json"])) == {shop_42}
    bad = cli.invoke(main, ["jobs", "list", "--meta", "user", "--meta", "org=1"])
    assert bad.exit_code == 2 and "expected KEY=VALUE" in bad.output and "indexed metadata keys" in bad.output


def test_a_bulk_cancel_by_tenant_touches_that_tenants_jobs_alone(rpq: tuple[Runtime, CliRunner]) -> None:
    rt, cli = rpq
    mine = [jobs.submit("tts", {}, tenant="shop", runtime=rt).id for _ in range(2)]
    theirs = jobs.submit("tts", {}, tenant="other", runtime=rt).id

    dry = cli.invoke(main, ["jobs", "cancel", "--tenant", "shop", "--dry-run", "--json"])
    done = cli.invoke(main, ["jobs", "cancel", "--tenant", "shop", "--json"])

    assert {job["id"] for job in json.loads(dry.output)["would_cancel"]} == set(mine)
    assert ids(done) == set(mine)
    assert jobs.get(theirs, runtime=rt).status is JobStatus.PENDING
