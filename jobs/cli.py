"""The `rpq` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import click
import httpx

from jobs import api
from jobs.api import BULK_LIMIT, MAX_LIST_LIMIT, MAX_LIST_OFFSET, Job
from jobs.bucket import access
from jobs.errors import ConfigError, ObjectStoreError, Problem
from jobs.flow.spend_guard import recent_holds
from jobs.flow.waiting import WaitReason
from jobs.jsonsafe import text_problems
from jobs.observability import logs
from jobs.runpod import cost
from jobs.runtime import get_runtime
from jobs.settings import PRESIGN_MAX_SECONDS, Settings, redact_url
from jobs.simulator import SimulatorConfig
from jobs.storage.db import session_scope
from jobs.storage.models import FileRole, FileState, utcnow
from jobs.storage.store import Source


class _Refused(click.ClickException):
    """Ends a command with `rpq: <message>` on stderr and exit status 2: the input was refused."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"rpq: {self.format_message()}", err=True)


class _NotFound(_Refused):
    """Exit status 1: the input was fine, but no such job (or file)."""

    exit_code = 1


class _Failed(_Refused):
    """Exit status 1: the input was fine, but what was asked could not be done (a download broke off)."""

    exit_code = 1


class _Rpq(click.Group):
    """Bad input and configuration exit 2 listing every problem; an unknown job exits 1. Done here rather
    than around `main()`, so that every way of running a command (click's test runner too) behaves alike."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, api.InvalidJob) as exc:
            raise _Refused(str(exc)) from None
        except (api.JobNotFound, access.FileNotFound) as exc:
            raise _NotFound(str(exc)) from None
        except ObjectStoreError as exc:  # names the operation, key and S3's error code: never a URL or credential
            raise _Failed(str(exc)) from None


#: The commands that serve, and log as services do (from RPQ_LOG_LEVEL); every other one is for a person.
SERVICES = frozenset({"api", "metrics", "simulator"})


@click.group(cls=_Rpq)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level, libraries' lines too.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """rpq: a Celery job queue in front of RunPod serverless GPUs."""
    logs.configure(for_people=ctx.invoked_subcommand not in SERVICES, verbose=verbose)


def _simulator_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per SimulatorConfig field, so the two can never drift apart."""
    hints = typing.get_type_hints(SimulatorConfig)
    for spec in reversed(dataclasses.fields(SimulatorConfig)):
        if spec.name == "api_key":
            continue  # declared by hand below: it falls back to RUNPOD_API_KEY
        kind = hints[spec.name]
        flag = "--" + spec.metadata.get("flag", spec.name).replace("_", "-")
        help_text = spec.metadata.get("help", "")
        if typing.get_origin(kind) is tuple:
            # A repeatable flag (`--endpoint A --endpoint B`) filling a tuple field.
            option = click.option(flag, spec.name, multiple=True, type=typing.get_args(kind)[0], help=help_text)
        elif kind is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", default=spec.default, show_default=True, help=help_text)
        else:
            base = _optional_base(kind)
            option = click.option(
                flag, type=base, default=spec.default, show_default=spec.default is not None, help=help_text
            )
        command = option(command)
    return command


def _optional_base(kind: Any) -> Any:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return kind


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to bind.")
@click.option(
    "--api-key",
    default=None,
    help="Key that clients must send as 'Authorization: Bearer KEY'. Default: $RUNPOD_API_KEY.",
)
@_simulator_options
def simulator(host: str, port: int, api_key: str | None, **options: Any) -> None:
    """Serve a local RunPod serverless API at http://HOST:PORT/v2 (no account needed)."""
    from jobs.simulator import serve

    key = api_key or os.environ.get("RUNPOD_API_KEY", "").strip()
    if not key:
        raise click.UsageError("set --api-key or RUNPOD_API_KEY: the simulator refuses requests without a key")
    if not options["endpoints"]:
        options["endpoints"] = _endpoint_ids(os.environ.get("RUNPOD_ENDPOINTS", ""))
    try:
        config = SimulatorConfig(api_key=key, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    serve(config, host=host, port=port)


def _endpoint_ids(raw: str) -> tuple[str, ...]:
    """The endpoint ids of a RUNPOD_ENDPOINTS value (`tts=fh46rj7dq9r3o5,abc123`), so that a simulator
    started next to rpq knows the endpoints rpq will call."""
    ids = []
    for item in (part.strip() for part in raw.split(",")):
        name, sep, endpoint_id = item.partition("=")
        endpoint_id = endpoint_id.strip() if sep else name
        if endpoint_id:
            ids.append(endpoint_id)
    return tuple(ids)


@main.command()
@click.option("--jobs", "job_count", default=12, show_default=True, type=click.IntRange(1, 1000),
              help="How many jobs to submit.")
@click.option("--seed", type=int, default=None, help="Seed for the mix of jobs (default: random).")
@click.option("--database-url", default=None,
              help="Where to keep the demo's jobs (default: a fresh rpq-demo.db in this directory).")
def demo(job_count: int, seed: int | None, database_url: str | None) -> None:
    """Run the whole pipeline locally: simulator, worker, beat, Redis; submit jobs and watch them."""
    from jobs.demo import run_demo

    sys.exit(run_demo(job_count=job_count, echo=click.echo, database_url=database_url, seed=seed))


# -- jobs ------------------------------------------------------------------------------------------------


def _json_value(field: str, raw: str | None, problems: list[Problem]) -> Any:
    """`raw` read as JSON, or None and a problem that does not quote it."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        problems.append(Problem(field, "json", f"not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"))
    except (ValueError, RecursionError):  # a number of thousands of digits, nesting too deep to read
        problems.append(Problem(field, "json", "not valid JSON"))
    return None


def _json_option(name: str) -> Callable[[str | None], Any]:
    def parse(raw: str | None) -> Any:
        problems: list[Problem] = []
        value = _json_value(name, raw, problems)
        if problems:
            raise click.BadParameter(problems[0].message, param_hint=name)
        return value

    return parse


def _since_value(raw: str | None, problems: list[Problem]) -> datetime | timedelta | None:
    if raw is None:
        return None
    try:
        return api.parse_since(raw)
    except api.SinceOutOfRange as exc:
        problems.append(Problem("since", "range", str(exc)))
    except ValueError as exc:
        problems.append(Problem("since", "format", str(exc)))
    return None


def _parse_since(raw: str | None) -> datetime | timedelta | None:
    problems: list[Problem] = []
    since = _since_value(raw, problems)
    if problems:
        raise click.BadParameter(problems[0].message, param_hint="--since")
    return since


def _whole_number(field: str, raw: str, problems: list[Problem]) -> int | None:
    try:
        return int(raw)
    except ValueError:  # not a number, or thousands of digits
        problems.append(Problem(field, "type", "must be a whole number"))
        return None


class _JobId(click.ParamType[str]):
    """A job id: text a database can look up. (Bytes that are not UTF-8 reach Python as lone surrogates.)"""

    name = "job_id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if text_problems(text, "job id"):
            self.fail("not a job id: it holds NUL or bytes that are not UTF-8 text", param, ctx)
        return text


def _print_jobs(found: list[Job], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([job.to_dict() for job in found], indent=2, default=str))
        return
    if not found:
        click.echo("no jobs")
        return
    rows = [("ID", "STATUS", "ENDPOINT", "ATTEMPT", "POLLS", "CREATED", "FINISHED", "RUNPOD ID", "WAITING")]
    for job in found:
        rows.append((job.id, job.status.value, job.endpoint, str(job.attempt), str(job.poll_count),
                     _when(job.created_at), _when(job.finished_at), job.runpod_job_id or "-",
                     _waiting_cell(job)))
    _print_table(rows)


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, the first row a header: plain text, easy to grep and cut."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _waiting_cell(job: Job) -> str:
    """A PENDING job's reason in a few words (`rpq jobs show` has the sentence)."""
    waiting = job.waiting
    if waiting is None:
        return "-"
    if waiting.reason is WaitReason.DEFERRED:
        return f"deferred until {_when(waiting.next_try_at)}"
    if waiting.reason is WaitReason.MAX_IN_FLIGHT:
        return f"max_in_flight {waiting.in_flight}/{waiting.max_in_flight}, {waiting.jobs_ahead} ahead"
    if waiting.reason is WaitReason.QUEUED:
        return f"queued, {waiting.jobs_ahead} ahead"
    if waiting.reason is WaitReason.SPEND:
        return "spend guard"
    return waiting.reason.value


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


@main.command()
@click.argument("endpoint")
@click.option("--input", "input_json", required=True, help="The handler's input, as JSON.")
@click.option("--policy", "policy_json", help='RunPod policy as JSON, e.g. \'{"ttl": 3600000}\'.')
@click.option("--webhook", help="URL RunPod calls when the job ends.")
@click.option("--idempotency-key", help="A second submit with the same key returns the first job.")
@click.option("--correlation-id", help="Your request id, stored on the job.")
@click.option("--metadata", "metadata_json", help="Your own JSON object, stored on the job.")
@click.option("--stream", is_flag=True, help="A generator handler: collect its chunks as they come.")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Among the endpoint's waiting jobs, higher goes to RunPod first.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def submit(endpoint: str, input_json: str, policy_json: str | None, webhook: str | None,
           idempotency_key: str | None, correlation_id: str | None, metadata_json: str | None,
           stream: bool, priority: int, as_json: bool) -> None:
    """Submit a job to ENDPOINT (a name from RUNPOD_ENDPOINTS or a RunPod endpoint id)."""
    unread: list[Problem] = []
    values = {field: _json_value(field, raw, unread)
              for field, raw in (("input", input_json), ("policy", policy_json), ("metadata", metadata_json))}
    if unread:  # the arguments that could be read are checked too: every problem at once
        fields = {p.field for p in unread}
        checked = api.submission_problems(
            endpoint, {} if "input" in fields else values["input"], policy=values["policy"], webhook=webhook,
            idempotency_key=idempotency_key, correlation_id=correlation_id, metadata=values["metadata"],
            stream=stream, priority=priority, settings=get_runtime().settings)
        raise api.InvalidJob(unread + [p for p in checked if p.field.partition(".")[0] not in fields])
    job = api.submit(endpoint, values["input"], policy=values["policy"], webhook=webhook,
                     idempotency_key=idempotency_key, correlation_id=correlation_id, metadata=values["metadata"],
                     stream=stream, priority=priority)
    if as_json:
        click.echo(json.dumps(job.to_dict(), indent=2, default=str))
    else:
        click.echo(f"{job.id} {job.status}")


@main.command(name="cost")
@click.option("--since", default="24h", show_default=True,
              help="Jobs finished since: an age (30m, 1h, 2d) or an ISO 8601 time.")
@click.option("--by", type=click.Choice(cost.BY), default="endpoint", show_default=True, help="How to group.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cost_command(since: str, by: str, as_json: bool) -> None:
    """What finished jobs cost, estimated at list price, beside what RunPod billed for the same hours."""
    moment = _parse_since(since)
    start = utcnow() - moment if isinstance(moment, timedelta) else moment
    assert start is not None
    with session_scope(get_runtime().engine, read_only=True) as session:
        lines = cost.cost_report(session, since=start, by=by)
        holds = recent_holds(session, since=start)
    if as_json:
        click.echo(json.dumps([line.to_dict() for line in lines], indent=2))
        return
    rows = [(by.upper(), "JOBS", "ESTIMATED USD", "NO PRICE", "BILLED USD")]
    rows += [(line.group, str(line.jobs), f"{line.estimated_usd:.4f}", str(line.jobs_without_price),
              "-" if line.billed_usd is None else f"{line.billed_usd:.4f}") for line in lines]
    _print_table(rows)
    click.echo("Estimates are list prices (execution time x GPU price x GPUs); RunPod's bill also counts cold "
               "starts and idle workers, and lags by up to an hour.")
    if holds:
        click.echo("\nThe spend guard held new jobs:")
        _print_table([("SCOPE", "FROM", "UNTIL", "WHY")] + [
            (hold.scope, f"{hold.started_at:%Y-%m-%d %H:%M:%S}",
             "holding" if hold.ended_at is None else f"{hold.ended_at:%Y-%m-%d %H:%M:%S}", hold.reason)
            for hold in holds])


@main.group(name="jobs")
def jobs_group() -> None:
    """Look at jobs, cancel them, retry them."""


@jobs_group.command(name="list")
@click.option("--status", multiple=True, help="Only jobs in this status (repeatable).")
@click.option("--endpoint", multiple=True, help="Only jobs of this endpoint (repeatable).")
@click.option("--since", help="Only jobs created since: an age (30m, 1h, 2d) or an ISO 8601 time.")
@click.option("--tenant", help="Only this tenant's jobs.")
@click.option("--meta", multiple=True, metavar="KEY=VALUE",
              help="Only jobs whose indexed metadata KEY is VALUE (RPQ_METADATA_INDEX; repeatable, all must match).")
# --limit and --offset are read here rather than by click, so that a bad one is listed with every other problem.
@click.option("--limit", default="50", show_default=True, help=f"At most this many jobs (1 to {MAX_LIST_LIMIT}).")
@click.option("--offset", default="0", show_default=True, help=f"Skip this many first (0 to {MAX_LIST_OFFSET}).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(status: tuple[str, ...], endpoint: tuple[str, ...], since: str | None, tenant: str | None,
                 meta: tuple[str, ...], limit: str, offset: str, as_json: bool) -> None:
    """List jobs, newest first."""
    unread: list[Problem] = []
    wanted: dict[str, str | int | bool] = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep:
            unread.append(Problem("meta", "format", "expected KEY=VALUE"))
        else:
            wanted[key] = value
    since_value = _since_value(since, unread)
    limit_value, offset_value = _whole_number("limit", limit, unread), _whole_number("offset", offset, unread)
    try:  # with what could not be read left out, so that list_jobs reports every other problem
        found = api.list_jobs(status=list(status) or None, endpoint=list(endpoint) or None, since=since_value,
                              limit=1 if limit_value is None else limit_value,
                              offset=0 if offset_value is None else offset_value, tenant=tenant,
                              meta=wanted or None)
    except api.InvalidJob as exc:
        raise api.InvalidJob(unread + exc.problems) from None
    if unread:
        raise api.InvalidJob(unread)
    _print_jobs(found, as_json)


@jobs_group.command()
@click.argument("job_id", type=_JobId())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(job_id: str, as_json: bool) -> None:
    """Show one job and its history."""
    job = api.get(job_id)
    history = api.events(job_id)
    if as_json:
        click.echo(json.dumps({**job.to_dict(), "events": [e.to_dict() for e in history]}, indent=2, default=str))
        return
    for name, value in job.to_dict().items():
        if value is not None and not (name in ("output_missing", "files_missing", "spend_released") and not value):
            shown = (job.waiting.message if name == "waiting" and job.waiting
                     else value if isinstance(value, str) else json.dumps(value, default=str))
            click.echo(f"{name:>18}: {shown[:500]}")
    if job.output_missing:
        click.echo("                    RunPod said COMPLETED but gave no output: a result over its ~20 MB "
                   "limit is dropped this way")
    if job.files_missing:
        click.echo(f"                    a declared output was not in the bucket: rpq jobs files {job.id}")
    click.echo("\nhistory:")
    for event in history:
        came_from = event.from_status or "-"
        detail = f"  {event.detail}" if event.detail else ""
        again = f"  (x{event.repeats}, last {_when(event.last_at)})" if event.repeats > 1 and event.last_at else ""
        click.echo(f"  {_when(event.at)}  {came_from:>14} -> {event.to_status:<14} [{event.source}]{detail}{again}")


def _each(job_ids: tuple[str, ...], action: Callable[[str], Job], verb: str, as_json: bool) -> None:
    results: list[dict[str, Any]] = []
    failed = False
    for job_id in job_ids:
        try:
            job = action(job_id)
        except (api.JobNotFound, api.InvalidTransition) as exc:
            failed = True
            results.append({"id": job_id, "error": str(exc)})
            if not as_json:
                click.echo(f"{job_id}: {exc}", err=True)
            continue
        results.append(job.to_dict())
        if not as_json:
            click.echo(f"{job.id} {verb}: now {job.status}")
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
    if failed:
        sys.exit(1)


def _bulk_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.argument("job_ids", nargs=-1, type=_JobId()),
        click.option("--status", multiple=True, help="Select jobs in this status (repeatable)."),
        click.option("--endpoint", multiple=True, help="Select jobs of this endpoint (repeatable)."),
        click.option("--since", help="Select jobs created since an age (30m, 1h, 2d) or an ISO 8601 time."),
        click.option("--tenant", help="Select only this tenant's jobs."),
        click.option("--limit", default=BULK_LIMIT, show_default=True, type=click.IntRange(1, MAX_LIST_LIMIT),
                     help="At most this many selected jobs."),
        click.option("--dry-run", is_flag=True, help="List what would be touched; change nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]):
        command = option(command)
    return command


def _select(job_ids: tuple[str, ...], status: tuple[str, ...], endpoint: tuple[str, ...], since: str | None,
            tenant: str | None, limit: int, *, action: str) -> list[str]:
    """The ids named, or the jobs the filters select for `action` (api.select_jobs: what a dry run lists)."""
    filtered = bool(status or endpoint or since or tenant)
    if job_ids and filtered:
        raise click.UsageError("give job ids or filters (--status/--endpoint/--since/--tenant), not both")
    if job_ids:
        return list(job_ids)
    if not filtered:
        raise click.UsageError("give job ids, or select jobs with --status, --endpoint, --since or --tenant")
    found = api.select_jobs(action, status=list(status) or None, endpoint=list(endpoint) or None,
                            since=_parse_since(since), tenant=tenant, limit=limit)
    return [job.id for job in found]


def _bulk(job_ids: list[str], action: Callable[[str], Job], verb: str, dry_run: bool, as_json: bool) -> None:
    if dry_run:
        found = [api.get(job_id) for job_id in job_ids]
        if as_json:
            click.echo(json.dumps({"dry_run": True, "would_" + verb: [j.to_dict() for j in found]}, indent=2,
                                  default=str))
        else:
            click.echo(f"would {verb} {len(found)} job(s):")
            _print_jobs(found, as_json=False)
        return
    _each(tuple(job_ids), action, verb, as_json)


@jobs_group.command()
@_bulk_options
def cancel(job_ids: tuple[str, ...], status: tuple[str, ...], endpoint: tuple[str, ...], since: str | None,
           tenant: str | None, limit: int, dry_run: bool, as_json: bool) -> None:
    """Cancel jobs by id, or every unfinished job the filters select (a finished job is left as it is)."""
    ids = _select(job_ids, status, endpoint, since, tenant, limit, action="cancel")
    _bulk(ids, lambda job_id: api.cancel(job_id, source=Source.OPERATOR), "cancel", dry_run, as_json)


@jobs_group.command()
@_bulk_options
def retry(job_ids: tuple[str, ...], status: tuple[str, ...], endpoint: tuple[str, ...], since: str | None,
          tenant: str | None, limit: int, dry_run: bool, as_json: bool) -> None:
    """Start a new attempt of jobs by id, or of every retryable job the filters select.

    Retryable: FAILED, TIMED_OUT, CANCELLED, EXPIRED and SUBMIT_UNKNOWN (decide first whether RunPod got it).
    """
    ids = _select(job_ids, status, endpoint, since, tenant, limit, action="retry")
    _bulk(ids, lambda job_id: api.retry(job_id, source=Source.OPERATOR), "retry", dry_run, as_json)


@jobs_group.command()
@_bulk_options
def release(job_ids: tuple[str, ...], status: tuple[str, ...], endpoint: tuple[str, ...], since: str | None,
            tenant: str | None, limit: int, dry_run: bool, as_json: bool) -> None:
    """Let PENDING jobs past the spend guard, by id or by filter: they go out while it holds the others."""
    ids = _select(job_ids, status, endpoint, since, tenant, limit, action="release")
    _bulk(ids, lambda job_id: api.release(job_id, source=Source.OPERATOR), "release", dry_run, as_json)


# -- files -----------------------------------------------------------------------------------------------------

#: A download's bytes are written this many at a time.
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
#: Generous for a slow link; a connection that stalls this long is given up.
DOWNLOAD_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@jobs_group.command(name="files")
@click.argument("job_id", type=_JobId())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def files_command(job_id: str, as_json: bool) -> None:
    """List a job's files: its inputs, then its current attempt's outputs."""
    found = access.files(job_id)
    if as_json:
        click.echo(json.dumps([info.to_dict() for info in found], indent=2))
        return
    if not found:
        click.echo("no files")
        return
    rows = [("NAME", "ROLE", "STATE", "SIZE", "CONTENT-TYPE", "ETAG")]
    rows += [(info.name, info.role, info.state, "-" if info.size is None else str(info.size),
              info.content_type or "-", info.etag or "-") for info in found]
    _print_table(rows)


@jobs_group.command()
@click.argument("job_id", type=_JobId())
@click.argument("name")
@click.option("-o", "--output", "path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the file. Default: its base name, in the current directory.")
@click.option("--force", is_flag=True, help="Overwrite the file at the path if there is one.")
@click.option("--url", "print_url", is_flag=True,
              help="Print a presigned URL of the file instead of downloading it. The URL is a credential until it "
              "expires: anyone holding it can read the file, so paste it nowhere others can see it.")
@click.option("--expires", type=click.IntRange(1, PRESIGN_MAX_SECONDS),
              help="Seconds the URL lives. Default: RPQ_PRESIGN_SECONDS.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def download(job_id: str, name: str, path: Path | None, force: bool, print_url: bool, expires: int | None,
             as_json: bool) -> None:
    """Download the file NAME of a job: an output of its current attempt, else an input of that name.

    The bytes go from the bucket to a temporary file beside the target, which is renamed into place once its
    size matches the one recorded for the file: an interrupted download leaves nothing at the path."""
    info = _stored_file(job_id, name)
    if print_url:
        click.echo(access.file_url(job_id, name, expires=expires))
        return
    target = path or Path(PurePosixPath(name).name)
    if target.is_dir() or (target.exists() and not force):
        raise _Refused(f"{target} exists; pass --force to overwrite it" if not target.is_dir()
                       else f"{target} is a directory; name a file with -o")
    url = access.file_url(job_id, name, expires=expires)
    with _partial_file(target) as (partial, out):
        written = _transfer(url, info, out)
        if written != info.size:
            raise _Failed(f"{name!r}: got {written} bytes where the bucket recorded {info.size}; nothing written")
        if target.exists() and not force:  # made while the bytes came
            raise _Refused(f"{target} exists; pass --force to overwrite it")
        partial.chmod(0o666 & ~_umask())  # mkstemp made it private; the file gets what any new file would
        os.replace(partial, target)
    if as_json:
        click.echo(json.dumps({"job_id": job_id, "name": name, "role": info.role, "path": str(target),
                               "bytes": written, "etag": info.etag}))
    else:
        click.echo(f"{target} ({written} bytes)")


def _stored_file(job_id: str, name: str) -> access.JobFileInfo:
    """The file `file_url` signs for `name`: an output of the current attempt before an input. FileNotFound
    when the bucket has none (an output is there once its job has completed)."""
    found = [info for info in access.files(job_id)
             if info.name == name and info.state == FileState.STORED and info.key is not None]
    found.sort(key=lambda info: info.role != FileRole.OUTPUT)
    if not found:
        raise access.FileNotFound(job_id, name)
    return found[0]


@contextlib.contextmanager
def _partial_file(target: Path) -> Iterator[tuple[Path, typing.BinaryIO]]:
    """A new file beside `target` (so the rename into place is atomic), removed unless it was renamed."""
    try:
        descriptor, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise _Failed(f"cannot write in {target.parent}: {exc.strerror}") from None
    partial = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as out:
            yield partial, out
    except OSError as exc:
        raise _Failed(f"cannot write {target}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)


def _transfer(url: str, info: access.JobFileInfo, out: typing.BinaryIO) -> int:
    """GET `url` into `out`, with a progress bar on a terminal; the bytes written. The URL is a credential: no
    message or log line shows it (httpx logs each request's URL, so it is quiet meanwhile)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    written = 0
    with _quiet(logging.getLogger("httpx")), Progress(*columns, console=console,
                                                       disable=not console.is_terminal) as progress:
        task = progress.add_task(info.name, total=info.size)
        try:
            with httpx.Client(timeout=DOWNLOAD_TIMEOUT) as client, client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _Failed(f"{info.name!r}: the bucket answered HTTP {response.status_code}")
                for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
                    written += len(chunk)
                    progress.update(task, completed=written)
                out.flush()
                os.fsync(out.fileno())
        except httpx.HTTPError as exc:  # only its class: httpx's messages can hold the URL
            raise _Failed(f"{info.name!r}: the download failed ({type(exc).__name__})") from None
    return written


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


# -- endpoints, queues, metrics -----------------------------------------------------------------------------


@main.group()
def endpoints() -> None:
    """RunPod endpoints: health and warm-up."""


@endpoints.command(name="health")
@click.argument("name", required=False)
@click.option("--live", is_flag=True, help="Ask RunPod now instead of reading beat's last observation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def endpoints_health(name: str | None, live: bool, as_json: bool) -> None:
    """Workers, jobs, a state label and an estimated wait, per endpoint."""
    from jobs.runpod.panel import endpoint_panel

    rt = get_runtime()
    targets = [rt.settings.resolve_endpoint(name)] if name else list(rt.settings.endpoints.values())
    if not targets:
        raise click.UsageError("no endpoints configured (RUNPOD_ENDPOINTS); name one")
    panels = [endpoint_panel(rt, target, live=live) for target in targets]
    if as_json:
        click.echo(json.dumps(panels, indent=2))
        return
    for panel in panels:
        click.echo(f"{panel['endpoint']} ({panel['endpoint_id']}): {str(panel['state']).upper()}  {panel['reason']}")
        if panel["workers"] is not None:
            workers, counts = panel["workers"], panel["jobs"]
            click.echo("  workers  " + "  ".join(f"{k} {v}" for k, v in workers.items()))
            click.echo("  jobs     " + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
        if panel["worker_states"] is not None:
            states = "  ".join(f"{k} {v}" for k, v in panel["worker_states"].items())
            click.echo(f"  RunPod   max workers {panel['max_workers']}  {states}   "
                       f"(exact, from /workers, {_age(datetime.fromisoformat(panel['worker_states_observed_at']))})")
        queue = "  ".join(f"{k.lower().replace('_', ' ')} {v}" for k, v in panel["queue"].items() if v)
        click.echo("  rpq      " + (queue or "no unfinished jobs"))
        if panel["observed_at"] is not None:
            wait = panel["estimated_wait_seconds"]
            shown = "unknown" if wait is None else f"~{wait:.0f}s"
            click.echo(f"  a new job would wait {shown} to start   (observed {panel['observed_at']})")


def _age(moment: datetime) -> str:
    """How long ago, in the largest two units: "observed 4m 10s ago"."""
    seconds = max(0, int((datetime.now(UTC) - moment).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")) if n]
    return "observed " + (" ".join(parts[:2]) or "0s") + " ago"


#: The configuration `rpq endpoints show` prints, in order: (label, snapshot column).
_CONFIG_FIELDS = (("workers", ""), ("idle timeout", "idle_timeout"), ("scaling", "scaling_type"),
                  ("GPU pools", "gpu_pools"), ("GPUs per worker", "gpu_count"), ("execution timeout", "timeout_ms"),
                  ("flashboot", "flashboot"))


@endpoints.command(name="show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def endpoints_show(name: str, as_json: bool) -> None:
    """NAME's configuration at RunPod as beat's collector last saw it, with its age."""
    from jobs.runpod import collect
    from jobs.storage.db import session_scope

    rt = get_runtime()
    target = rt.settings.resolve_endpoint(name)
    with session_scope(rt.engine, read_only=True) as session:
        latest = collect.latest_endpoint(session, target.name)
        good = latest if latest is None or latest.ok else collect.latest_endpoint(session, target.name, ok=True)
    if latest is None:
        raise _Failed(f"{target.name}: no configuration collected yet (beat collects it every "
                      f"{rt.settings.runpod_collection_interval_seconds}s from RUNPOD_REST_URL)")
    failure = None if latest.ok else {"observed_at": latest.observed_at.isoformat(), "error": latest.error}
    if as_json:
        shown = good if good is not None else latest
        body = {column.name: getattr(shown, column.name) for column in shown.__table__.columns}  # type: ignore[attr-defined]
        body["observed_at"] = shown.observed_at.isoformat()
        body["latest_failure"] = failure
        click.echo(json.dumps(body, indent=2))
        if good is None:
            raise SystemExit(1)
        return
    if failure is not None:
        click.echo(f"{target.name} ({target.id}): the latest collection failed, {_age(latest.observed_at)}: "
                   f"{latest.error}", err=good is None)
    if good is None:
        raise _Failed(f"{target.name}: no configuration collected yet that worked")
    click.echo(f"{target.name} ({target.id}): configuration {_age(good.observed_at)} ({_when(good.observed_at)} UTC)")
    for label, column in _CONFIG_FIELDS:
        click.echo(f"  {label:<18} {_config_value(good, column)}")
    states = "  ".join(f"{s} {getattr(good, f'workers_{s}')}" for s in collect.WORKER_STATES)
    click.echo(f"  {'worker states':<18} {states}")


def _config_value(snapshot: Any, column: str) -> str:
    if column == "":
        return f"min {snapshot.workers_min}  max {snapshot.workers_max}"
    value = getattr(snapshot, column)
    if value is None:
        return "-"
    if column == "idle_timeout":
        return f"{value}s"
    if column == "timeout_ms":
        return f"{value / 1000:g}s"
    if column == "scaling_type":
        return f"{value} {snapshot.scaling_value:g}" if snapshot.scaling_value is not None else str(value)
    if column == "gpu_pools":
        return str(value).replace(",", ", ")
    return str(value).lower() if isinstance(value, bool) else str(value)


@endpoints.command()
@click.argument("name")
@click.option("--input", "input_json", help="Warm-up job input as JSON (default: {\"warmup\": true}).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def warmup(name: str, input_json: str | None, as_json: bool) -> None:
    """Start a worker on NAME with one warm-up job, unless workers are already warm or starting."""
    from jobs import ops
    from jobs.runtime import get_runtime

    result = ops.warmup(get_runtime(), name, input=_json_option("--input")(input_json))
    if as_json:
        click.echo(json.dumps({"action": result.action, "reason": result.reason, "job_id": result.job_id}))
    else:
        did = "sent a warm-up job" if result.action == "submitted" else "nothing to do"
        click.echo(f"{name}: {did}: {result.reason}" + (f" (job {result.job_id})" if result.job_id else ""))


@main.group()
def queue() -> None:
    """RunPod's queue of an endpoint."""


@queue.command()
@click.argument("endpoint")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def purge(endpoint: str, yes: bool, as_json: bool) -> None:
    """Remove every queued job of ENDPOINT at RunPod (running jobs go on)."""
    from jobs import ops
    from jobs.runtime import get_runtime

    if not yes:
        click.confirm(f"Remove every job queued at RunPod for {endpoint}?", abort=True)
    removed = ops.purge_queue(get_runtime(), endpoint)
    click.echo(json.dumps({"endpoint": endpoint, "removed": removed}) if as_json
               else f"{endpoint}: RunPod removed {removed} queued job(s)")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=9464, show_default=True, type=int, help="Port to bind.")
def metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics at http://HOST:PORT/metrics."""
    from jobs.observability import metrics as exporter
    from jobs.runtime import get_runtime

    exporter.serve(get_runtime(), host=host, port=port)


@main.group(name="api", invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to bind.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes serving requests, one core's worth each (a submit costs a process 2-3 ms of CPU).")
@click.pass_context
def api_command(ctx: click.Context, host: str, port: int, workers: int) -> None:
    """Serve the HTTP API (needs RPQ_API_TOKENS; `rpq api token` makes one)."""
    if ctx.invoked_subcommand is None:
        from jobs.web import serve

        serve(host, port, workers=workers)


@api_command.command()
@click.option("--tenant", help="The tenant whose jobs the token submits and sees (needed unless the scope is admin).")
@click.option("--scope", help="submit, read, cancel, retry, admin joined by '+' (default with --tenant: "
              "submit+read+cancel+retry; without: admin).")
@click.option("--endpoints", help="Endpoint names the token may submit to, comma-separated (default: every one).")
def token(tenant: str | None, scope: str | None, endpoints: str | None) -> None:
    """Make a new API token: give the token to the client, put the entry in RPQ_API_TOKENS."""
    from jobs.errors import ConfigError
    from jobs.web.auth import ADMIN, entry_for, new_token

    secret, line = new_token()
    scopes = [s.strip() for s in scope.split("+")] if scope else ([] if tenant else [ADMIN])
    names = [n.strip() for n in endpoints.split(",") if n.strip()] if endpoints else []
    try:
        # A bare sha256: line is an admin token already: said once, not twice.
        entry = line if scopes == [ADMIN] and tenant is None else entry_for(line, tenant=tenant, scopes=scopes,
                                                                            endpoints=names)
    except ConfigError as exc:
        raise click.UsageError("; ".join(p.removeprefix("RPQ_API_TOKENS: entry 1").lstrip(": ")
                                         for p in exc.problems)) from None
    click.echo(f"token (give to the client; shown once): {secret}")
    click.echo(f"for RPQ_API_TOKENS:                    {entry}")


@main.group()
def db() -> None:
    """The job table's schema."""


@db.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def upgrade(as_json: bool) -> None:
    """Create or migrate the tables at DATABASE_URL."""
    from jobs.storage.db import upgrade as upgrade_schema

    url = Settings.from_env().database_url
    upgrade_schema(url)
    if as_json:
        click.echo(json.dumps({"database": redact_url(url), "up_to_date": True}))
    else:
        click.echo(f"database at {redact_url(url)} is up to date")


# -- scaling endpoints: rpq endpoints scale, rpq endpoints audit ------------------------------------------


def _bounds(min_: int | None, max_: int | None, idle: int | None) -> str:
    """Worker bounds in a few characters: "0/3/5s" (min/max/idle timeout); "-" for a value not known or kept."""
    return "/".join("-" if v is None else str(v) for v in (min_, max_)) + ("/-" if idle is None else f"/{idle}s")


def _operator() -> str:
    import getpass

    try:
        return f"operator:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in the environment and none in the password database
        return "operator:unknown"


@endpoints.command(name="scale")
@click.argument("name")
@click.option("--max", "max_", help="Max workers.")
@click.option("--min", "min_", help="Min (always on, always billed) workers.")
@click.option("--idle-timeout", help="Seconds an idle worker stays up (1-3600; not for REQUEST_COUNT scaling).")
@click.option("--reason", help="Why, for the audit.")
@click.option("--dry-run", is_flag=True, help="Read and show the change; send and record nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def endpoints_scale(name: str, max_: str | None, min_: str | None, idle_timeout: str | None, reason: str | None,
                    dry_run: bool, yes: bool, as_json: bool) -> None:
    """Change NAME's worker bounds at RunPod: read live, show, confirm, change, read back, audit."""
    from jobs.runpod.scaling import Outcome, ScalePlan, scale_endpoint

    unread: list[Problem] = []
    wanted = [None if raw is None else _whole_number(field, raw, unread)
              for field, raw in (("max", max_), ("min", min_), ("idle_timeout", idle_timeout))]
    if unread:
        raise _Refused("invalid scale:\n" + "\n".join(f"  - {p}" for p in unread))
    if not (yes or dry_run or sys.stdin.isatty()):
        raise _Refused("not a terminal, so nobody can confirm: pass --yes to scale without asking")
    workers, least, idle = wanted

    def notes(plan: ScalePlan) -> None:
        for note in plan.notes:  # on stderr with --json, so that stdout holds the JSON alone
            click.echo(f"  note: {note}", err=as_json)

    def confirm(plan: ScalePlan) -> bool:
        click.echo(f"{name}: {plan.before}  ->  {plan.after}", err=as_json)
        notes(plan)
        return yes or click.confirm(f"Change {name}'s workers at RunPod?", err=True)

    result = scale_endpoint(get_runtime(), name, max=workers, min=least, idle_timeout=idle, actor=_operator(),
                            reason=reason, dry_run=dry_run, confirm=confirm)
    if as_json:
        after = result.after
        click.echo(json.dumps({
            "endpoint": result.endpoint_name, "endpoint_id": result.endpoint_id, "outcome": result.outcome.value,
            "message": result.message, "notes": list(result.notes), "audit_id": result.audit_id,
            "before": dataclasses.asdict(result.plan.before) if result.plan else None,
            "asked": dataclasses.asdict(result.plan.after) if result.plan else None,
            "after": dataclasses.asdict(after) if after else None,
        }, indent=2))
    if result.outcome is Outcome.REFUSED:
        raise _Refused(f"{result.endpoint_name}: {result.message}")
    if not result.ok:
        raise _Failed(f"{result.endpoint_name}: {result.message}")
    if not as_json:
        click.echo(f"{result.endpoint_name}: {result.message}")
    if result.outcome is Outcome.DRY_RUN and result.plan is not None:
        notes(result.plan)


@endpoints.command(name="audit")
@click.argument("name", required=False)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="How many changes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def endpoints_audit(name: str | None, limit: int, as_json: bool) -> None:
    """Recent changes of endpoints' workers (NAME's only, if given), newest first, whether they took or not."""
    from jobs.runpod.scaling import recent_changes
    from jobs.storage.db import session_scope

    rt = get_runtime()
    endpoint = rt.settings.resolve_endpoint(name).name if name else None
    with session_scope(rt.engine, read_only=True) as session:
        rows = recent_changes(session, endpoint, limit=limit)
    if as_json:
        click.echo(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    if not rows:
        click.echo("no scale changes")
        return
    table = [("AT", "ENDPOINT", "ACTOR", "BEFORE", "ASKED", "AFTER", "OK", "REASON / ERROR")]
    for row in rows:
        said = row.error if not row.ok else row.reason
        table.append((_when(row.at), row.endpoint_name, row.actor,
                      _bounds(row.before_min, row.before_max, row.before_idle_timeout),
                      _bounds(row.asked_min, row.asked_max, row.asked_idle_timeout),
                      _bounds(row.after_min, row.after_max, row.after_idle_timeout),
                      "yes" if row.ok else "NO", (said or "-").replace("\n", " ")[:160]))
    _print_table(table)


def run() -> None:
    """Entry point: bad input and configuration become a clean message and exit code 2 (see `_Rpq`)."""
    main(standalone_mode=True)


if __name__ == "__main__":
    run()
