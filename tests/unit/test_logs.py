"""Log lines in text and JSON: the same fields in both, the tags of the job or request they are about, and a
formatter that never raises, whatever a library hands it."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.errors import ConfigError
from jobs.observability import logcontext, logs

ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
REQUIRED = {"time", "level", "logger", "message", "job_id", "correlation_id", "tenant"}


@pytest.fixture(autouse=True)
def no_tags_bound() -> Iterator[None]:
    """Each test starts with no job bound: an in-process test run before it in this process (calling the
    lifecycle directly, outside a task's scope) may have left its job's tags bound."""
    with logcontext.scope():
        logcontext.bind()
        yield


def record(msg: object = "polled %s", args: Any = ("once",), *, level: int = logging.INFO,
           exc_info: Any = None) -> logging.LogRecord:
    return logging.LogRecord("rpq.poller", level, __file__, 1, msg, args, exc_info)


def tagged(make: Any) -> logging.LogRecord:
    """A record logged while a task works on job j-1 of request req-7 for tenant acme, through the filter."""
    with logcontext.scope():
        logcontext.bind(job_id="j-1", correlation_id="req-7")
        logcontext.bind_tenant("acme")
        made: logging.LogRecord = make()
        logcontext.ContextFilter().filter(made)
    return made


def test_a_json_line_has_every_field_and_the_tags_of_the_job_it_is_about() -> None:
    line = logs.JsonFormatter().format(tagged(record))

    fields = json.loads(line)
    assert "\n" not in line
    assert set(fields) >= REQUIRED
    assert ISO_UTC_MS.match(fields["time"])
    assert (fields["level"], fields["logger"], fields["message"]) == ("INFO", "rpq.poller", "polled once")
    assert (fields["job_id"], fields["correlation_id"], fields["tenant"]) == ("j-1", "req-7", "acme")
    assert "exc_info" not in fields


def test_a_text_line_shows_the_same_fields() -> None:
    line = logs.TextFormatter().format(tagged(record))

    time, rest = line.split(" ", 1)
    assert ISO_UTC_MS.match(time)
    assert rest == "INFO [job=j-1 cid=req-7 tenant=acme] rpq.poller: polled once"


def test_a_line_about_no_job_has_null_tags_in_json_and_none_in_text() -> None:
    made = record()
    logcontext.ContextFilter().filter(made)

    assert {k: v for k, v in json.loads(logs.JsonFormatter().format(made)).items()
            if k in ("job_id", "correlation_id", "tenant")} == dict.fromkeys(("job_id", "correlation_id", "tenant"))
    assert logs.TextFormatter().format(made).endswith(" INFO rpq.poller: polled once")


def test_a_record_that_missed_the_filter_takes_the_tags_current_where_it_is_formatted() -> None:
    with logcontext.scope():
        logcontext.bind(job_id="j-2", correlation_id=None)
        fields = json.loads(logs.JsonFormatter().format(record()))

    assert (fields["job_id"], fields["correlation_id"]) == ("j-2", None)


def test_a_logged_exception_is_one_string_field_in_json_and_the_lines_below_in_text() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed", (), level=logging.ERROR, exc_info=sys.exc_info())

    fields = json.loads(logs.JsonFormatter().format(made))
    text = logs.TextFormatter().format(made)

    assert fields["exc_info"].startswith("Traceback") and fields["exc_info"].endswith("ValueError: boom")
    assert text.splitlines()[0].endswith("ERROR rpq.poller: failed") and text.endswith("ValueError: boom")


def test_scope_undoes_what_a_task_bound() -> None:
    with logcontext.scope():
        logcontext.bind(job_id="j-3", correlation_id="c", tenant="t")
        assert logcontext.current() == ("j-3", "c", "t")
    assert logcontext.current() == (None, None, None)


def test_a_bad_log_format_or_level_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPQ_LOG_FORMAT", "logfmt")
    monkeypatch.setenv("RPQ_LOG_LEVEL", "loud")

    with pytest.raises(ConfigError) as caught:
        logs.formatter()

    assert [p.split(":")[0] for p in caught.value.problems] == ["RPQ_LOG_FORMAT", "RPQ_LOG_LEVEL"]


def test_the_format_and_level_take_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPQ_LOG_FORMAT", "JSON")
    monkeypatch.setenv("RPQ_LOG_LEVEL", "warning")

    assert logs.log_settings() == ("json", "WARNING")
    assert isinstance(logs.formatter(), logs.JsonFormatter)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class Boom(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str either")


odd_values = st.one_of(st.none(), st.integers(), st.floats(), st.text(), st.binary(), st.just(Unprintable()),
                       st.lists(st.text(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
odd_messages = st.one_of(odd_values, st.sampled_from(["%s", "%s %s", "%d", "%(name)s", "%", "%z", "100%"]))
odd_args = st.one_of(st.tuples(), st.tuples(odd_values), st.tuples(odd_values, odd_values),
                     st.tuples(st.dictionaries(st.sampled_from(["name", "x"]), odd_values, min_size=1, max_size=2)))


@given(msg=odd_messages, args=odd_args, rewritten=st.one_of(st.just(False), st.none(), odd_values),
       tag=st.one_of(st.none(), st.text(), st.just(Unprintable())),
       level=st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, 5, 55]),
       exc=st.sampled_from([None, ValueError("x"), Boom(), KeyError(Unprintable())]))
def test_a_formatter_never_raises_and_a_json_line_is_always_one_object(
        msg: object, args: Any, rewritten: object, tag: object, level: int, exc: BaseException | None) -> None:
    made = record(msg, args, level=level, exc_info=(type(exc), exc, None) if exc else None)
    if rewritten is not False:  # as a filter of some library's might leave it
        made.args = rewritten  # type: ignore[assignment]
    made.job_id = tag
    made.correlation_id = "c"
    made.tenant = None

    line = logs.JsonFormatter().format(made)
    text = logs.TextFormatter(process=True).format(made)

    fields = json.loads(line)
    assert "\n" not in line and line.isascii()
    assert set(fields) >= REQUIRED and isinstance(fields["message"], str)
    assert isinstance(text, str) and text


def test_a_message_whose_arguments_do_not_fit_keeps_what_was_given() -> None:
    fields = json.loads(logs.JsonFormatter().format(record("polled %s and %s", ("once",))))

    assert fields["message"] == "polled %s and %s [unformattable arguments: ('once',)]"


def test_what_the_workers_signal_handlers_print_is_a_json_line(tmp_path: Path) -> None:
    from tasks.app import _say_in_json

    with open(tmp_path / "out", "w") as out:
        _say_in_json("worker: Warm shutdown (MainProcess)", out)

    [line] = (tmp_path / "out").read_text().splitlines()
    fields = json.loads(line)
    assert (fields["logger"], fields["message"]) == ("celery.apps.worker", "worker: Warm shutdown (MainProcess)")
    assert set(fields) >= REQUIRED
