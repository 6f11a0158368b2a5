"""How rpq's processes write log lines: text for a person at a terminal, or one JSON object a line
(RPQ_LOG_FORMAT=json) for a log pipeline.

Both carry the same fields: time (ISO 8601, UTC, milliseconds), level, logger, message, and what the line is
about (`logcontext`: job id, correlation id, tenant), plus the traceback of a logged exception. A formatter
never raises: a line that cannot be formatted as asked (arguments that do not fit the message, an object whose
str() raises) is still written, with what could be shown.

`configure` sets up the process's logging for the rpq CLI: quiet for a person (libraries' INFO lines are noise
at a terminal), at RPQ_LOG_LEVEL for a long-running service. Celery's worker and beat set up their own and take
the formatter through `logcontext.install`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from jobs.observability import logcontext
from jobs.settings import LogFormat, LogLevel, Settings


def _text(value: object) -> str:
    """str(value), or the best that can be shown when that raises."""
    try:
        return value if isinstance(value, str) else str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # the arguments do not fit the message, or one of them cannot be shown
        return f"{_text(record.msg)} [unformattable arguments: {_text(record.args)}]"


def _time(record: logging.LogRecord) -> str:
    try:
        moment = datetime.fromtimestamp(float(record.created), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        moment = datetime.now(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _tags(record: logging.LogRecord) -> logcontext.Tags:
    """The record's tags as `ContextFilter` set them; the current ones for a record that did not pass it."""
    if not hasattr(record, "job_id"):
        return logcontext.current()
    fields = (getattr(record, "job_id", None), getattr(record, "correlation_id", None), getattr(record, "tenant", None))
    return logcontext.Tags(*(None if value is None else _text(value) for value in fields))


class _Base(logging.Formatter):
    def _fields(self, record: logging.LogRecord) -> dict[str, Any]:
        job_id, correlation_id, tenant = _tags(record)
        fields: dict[str, Any] = {
            "time": _time(record), "level": _text(record.levelname), "logger": _text(record.name),
            "message": _message(record), "job_id": job_id, "correlation_id": correlation_id, "tenant": tenant,
        }
        if record.exc_info:
            try:
                fields["exc_info"] = self.formatException(record.exc_info)
            except Exception:
                fields["exc_info"] = f"<traceback could not be formatted: {_text(record.exc_info[1])}>"
        elif record.exc_text:
            fields["exc_info"] = _text(record.exc_text)
        if record.stack_info:
            fields["stack_info"] = _text(record.stack_info)
        return fields


class JsonFormatter(_Base):
    """One JSON object a line: time, level, logger, message, job_id, correlation_id, tenant (null when not known),
    process (the pid: several processes may share a stream), and exc_info and stack_info when there are any.
    ASCII only (anything else is escaped), so no stream's encoding can fail it, and no newline but the last."""

    def format(self, record: logging.LogRecord) -> str:
        fields = self._fields(record)
        fields["process"] = record.process
        return json.dumps(fields, ensure_ascii=True, default=_text)


class TextFormatter(_Base):
    """`2026-01-31T12:00:00.123Z INFO [job=… cid=… tenant=…] rpq.lifecycle: message`, with the tags that are known
    (none: no brackets), then the traceback of an exception on the lines below. With `process`, the pid after the
    level."""

    def __init__(self, *, process: bool = False) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        fields = self._fields(record)
        tags = " ".join(f"{name}={fields[key]}" for name, key in (("job", "job_id"), ("cid", "correlation_id"),
                                                                   ("tenant", "tenant")) if fields[key] is not None)
        line = " ".join(part for part in (
            fields["time"], fields["level"], f"[{record.process}]" if self.process else "", f"[{tags}]" if tags else "",
            fields["logger"] + ":", fields["message"]) if part)
        return "\n".join([line, *(fields[key] for key in ("exc_info", "stack_info") if key in fields)])


def log_settings() -> tuple[LogFormat, LogLevel]:
    """RPQ_LOG_FORMAT and RPQ_LOG_LEVEL, checked as every setting is (a bad value is a ConfigError naming it). Only
    these two are read: a process sets up its logging before, and whether or not, the rest is valid."""
    names = ("RPQ_LOG_FORMAT", "RPQ_LOG_LEVEL")
    settings = Settings.from_env({name: os.environ[name] for name in names if name in os.environ})
    return settings.log_format, settings.log_level


def formatter(*, process: bool = False) -> logging.Formatter:
    """The formatter RPQ_LOG_FORMAT asks for."""
    log_format, _ = log_settings()
    return JsonFormatter() if log_format == "json" else TextFormatter(process=process)


def install_handler(logger: logging.Logger) -> bool:
    """Give `logger` a handler on stderr in RPQ_LOG_FORMAT, unless it has handlers already; whether it did."""
    if logger.handlers:
        return False
    handler = logging.StreamHandler()
    handler.addFilter(logcontext.ContextFilter())
    handler.setFormatter(formatter())
    logger.addHandler(handler)
    return True


def configure(*, for_people: bool, verbose: bool = False) -> None:
    """Logging for an rpq command: one handler on stderr, in RPQ_LOG_FORMAT.

    `for_people` (every command but the servers): rpq's own lines from INFO, every library's from WARNING (alembic
    logs a line per migration, httpx one per request: noise at a terminal). Otherwise from RPQ_LOG_LEVEL (INFO by
    default), but httpx's line per request from WARNING. `verbose`: all of it from DEBUG. A process whose logging
    was set up already (an application calling the CLI, a test) keeps its handlers and levels."""
    _, level = log_settings()
    root = logging.getLogger()
    if install_handler(root):
        if verbose:
            root.setLevel(logging.DEBUG)
        elif for_people:
            root.setLevel(logging.WARNING)
            logging.getLogger("rpq").setLevel(logging.INFO)
        else:
            root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # botocore at DEBUG logs signatures: never below INFO, even with -v.
    logging.getLogger("botocore").setLevel(logging.INFO if verbose else logging.WARNING)
