"""One typed settings object, read from the environment and validated at start-up.

`Settings.from_env()` reads every variable, collects every problem and raises one `ConfigError`
naming each bad variable, so an operator fixes them all in one go. `.env.example` lists every
variable with a comment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from urllib.parse import urlsplit, urlunsplit

from jobs.budget import Limits, parse_limits
from jobs.errors import ConfigError

# RunPod endpoint ids are lowercase letters and digits ("fh46rj7dq9r3o5"); public endpoints add
# hyphens ("black-forest-labs-flux-1-schnell"). \Z, not $: $ also matches before a final newline.
ENDPOINT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{4,62}[a-z0-9]\Z")
MAX_POLL_GAP_SECONDS = 300.0
SUBMIT_STUCK_MARGIN_SECONDS = 30.0  # past a /run's worst case, for a busy worker to write its answer
ENDPOINT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}\Z")


class Secret:
    """A string that never shows itself: not in repr, str, f-strings, logs or tracebacks.

    Call `reveal()` at the one place the value is really needed (the Authorization header).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling a secret would put it in a Celery message or a cache; refuse loudly.
        raise TypeError("a Secret cannot be pickled")


_PASSWORD_PARAMETER = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redact_url(url: str) -> str:
    """`url` with its password masked, wherever a URL can carry one: in the user info
    (`postgresql://rpq:secret@db`, `redis://:secret@redis`) or as libpq's `?password=`."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")  # the last @: a password may hold one too
    netloc = f"{userinfo.partition(':')[0]}:***@{host}" if at and ":" in userinfo else parts.netloc
    query = _PASSWORD_PARAMETER.sub(r"\1\2***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # unchanged, rather than as urlunsplit would spell it
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(frozen=True)
class Endpoint:
    """A RunPod serverless endpoint as rpq knows it: the operator's name and RunPod's id."""

    name: str
    id: str


@dataclass(frozen=True)
class Settings:
    runpod_api_key: Secret | None = None
    runpod_serverless_url: str = "https://api.runpod.ai/v2"
    runpod_graphql_url: str = "https://api.runpod.io/graphql"
    # REST v1 (rest.runpod.io/v1) was retired on 2026-11-15; v2 is the management API now.
    runpod_rest_url: str = "https://api.runpod.io/v2"
    # Where RunPod can reach rpq's HTTP API: each job then carries a webhook that triggers an
    # immediate poll, and polls slow down to a safety net. None: polling only.
    runpod_webhook_base_url: str | None = None
    runpod_timeout_seconds: float = 30.0  # per request; a /run past this has an unknown outcome
    runpod_collection_interval_seconds: int = 300
    runpod_health_poll_seconds: int = 120
    runpod_job_retention_days: int = 90
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)
    database_url: str = "sqlite:///rpq.db"
    celery_broker_url: str = "redis://localhost:6379/0"
    # Polling: how soon after submission, and the longest gap once a job's status stops changing.
    # A lower cap notices long jobs finish sooner and costs more /status calls. Once an endpoint has
    # history, polls follow jobs.pollplan: the cap then bounds the gaps across a job's likely end, and a
    # wait far from it may be longer (pollplan.LONG_WAIT_CAP_SECONDS, or this cap if higher).
    poll_first_seconds: float = 1.0
    poll_max_seconds: float = 15.0
    # The reconciler: how often it runs, and when it decides a message was lost.
    reconcile_interval_seconds: int = 30
    poll_grace_seconds: int = 30  # a poll this overdue (or a PENDING row this old) lost its message
    # A SUBMITTING row older than this lost its worker mid-/run. None: derived from the client's own
    # bound on a /run (`submit_stuck_after_seconds`); a value at or below that bound is refused.
    submit_stuck_seconds: int | None = None
    # Per endpoint name: at most this many of its jobs at RunPod at once; the rest wait PENDING, in
    # order of priority then age, and go out as jobs finish. Unlisted endpoints have no cap.
    max_in_flight: Mapping[str, int] = field(default_factory=dict)
    # rpq's own budget of RunPod requests per 10 s, per endpoint and operation, shared by every process
    # (jobs.budget). Below RunPod's documented limits, so rpq never draws a 429.
    runpod_limits: Limits = field(default_factory=Limits)

    @property
    def runpod_connect_timeout_seconds(self) -> float:
        return min(5.0, self.runpod_timeout_seconds)

    @property
    def submit_budget_seconds(self) -> float:
        """How long a submit keeps trying /run: room for one retry after a refused connection or a 429
        (the only failures it retries). No attempt starts once it is spent."""
        return 2 * self.runpod_timeout_seconds + 10

    @property
    def submit_bound_seconds(self) -> float:
        """The longest one /run call can take: the budget, plus the last attempt's pool, connect, write
        and read timeouts, each cut to the budget by the client."""
        timeout = self.runpod_timeout_seconds
        return self.submit_budget_seconds + 3 * timeout + self.runpod_connect_timeout_seconds

    @property
    def submit_stuck_after_seconds(self) -> float:
        """When the reconciler calls a SUBMITTING row's worker lost: past anything a live /run can take,
        so a slow /run is never marked SUBMIT_UNKNOWN while its answer can still come."""
        if self.submit_stuck_seconds is not None:
            return float(self.submit_stuck_seconds)
        return self.submit_bound_seconds + SUBMIT_STUCK_MARGIN_SECONDS

    def __repr__(self) -> str:
        # Settings get logged and land in tracebacks; the API key is a Secret, and the URLs may hold passwords.
        shown = {spec.name: getattr(self, spec.name) for spec in fields(self)}
        for name in ("database_url", "celery_broker_url", "runpod_serverless_url", "runpod_graphql_url",
                     "runpod_rest_url", "runpod_webhook_base_url"):
            if shown[name] is not None:
                shown[name] = redact_url(shown[name])
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        problems: list[str] = []
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        def url(name: str, default: str, schemes: tuple[str, ...]) -> str:
            value = text(name, default)
            parts = urlsplit(value)
            if parts.scheme not in schemes or not (parts.netloc or parts.path):
                problems.append(f"{name}: expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
            return value.rstrip("/") if parts.scheme in ("http", "https") else value

        def positive_float(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                problems.append(f"{name}: expected a number of seconds, got {raw!r}")
                return default
            if not 0 < value < float("inf"):
                problems.append(f"{name}: must be greater than 0, got {raw}")
            return value

        def positive_int(name: str, default: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                problems.append(f"{name}: expected a whole number of {_unit(name)}, got {raw!r}")
                return default
            if value <= 0:
                problems.append(f"{name}: must be greater than 0, got {value}")
            return value

        key = env.get("RUNPOD_API_KEY", "").strip()
        settings = cls(
            runpod_api_key=Secret(key) if key else None,
            runpod_serverless_url=url("RUNPOD_SERVERLESS_URL", defaults.runpod_serverless_url, ("http", "https")),
            runpod_graphql_url=url("RUNPOD_GRAPHQL_URL", defaults.runpod_graphql_url, ("http", "https")),
            runpod_rest_url=url("RUNPOD_REST_URL", defaults.runpod_rest_url, ("http", "https")),
            runpod_webhook_base_url=(url("RUNPOD_WEBHOOK_BASE_URL", "", ("http", "https"))
                                     if env.get("RUNPOD_WEBHOOK_BASE_URL", "").strip() else None),
            runpod_timeout_seconds=positive_float("RUNPOD_TIMEOUT_SECONDS", defaults.runpod_timeout_seconds),
            runpod_collection_interval_seconds=positive_int(
                "RUNPOD_COLLECTION_INTERVAL_SECONDS", defaults.runpod_collection_interval_seconds
            ),
            runpod_health_poll_seconds=positive_int(
                "RUNPOD_HEALTH_POLL_SECONDS", defaults.runpod_health_poll_seconds
            ),
            runpod_job_retention_days=positive_int(
                "RUNPOD_JOB_RETENTION_DAYS", defaults.runpod_job_retention_days
            ),
            endpoints=_parse_endpoints(env.get("RUNPOD_ENDPOINTS", ""), problems),
            database_url=url("DATABASE_URL", defaults.database_url, ("sqlite", "postgresql", "postgresql+psycopg")),
            celery_broker_url=url("CELERY_BROKER_URL", defaults.celery_broker_url, ("redis", "rediss")),
            poll_first_seconds=positive_float("RPQ_POLL_FIRST_SECONDS", defaults.poll_first_seconds),
            poll_max_seconds=positive_float("RPQ_POLL_MAX_SECONDS", defaults.poll_max_seconds),
            reconcile_interval_seconds=positive_int("RPQ_RECONCILE_SECONDS", defaults.reconcile_interval_seconds),
            poll_grace_seconds=positive_int("RPQ_POLL_GRACE_SECONDS", defaults.poll_grace_seconds),
            submit_stuck_seconds=(positive_int("RPQ_SUBMIT_STUCK_SECONDS", 1)
                                  if env.get("RPQ_SUBMIT_STUCK_SECONDS", "").strip() else None),
            runpod_limits=parse_limits(env.get("RPQ_RUNPOD_LIMITS", ""), problems),
        )
        caps = _parse_caps(env.get("RPQ_MAX_IN_FLIGHT", ""), settings.endpoints, problems)
        if caps:
            settings = replace(settings, max_in_flight=caps)
        if not problems and not 1.0 <= settings.poll_max_seconds <= MAX_POLL_GAP_SECONDS:
            # Far below the broker's visibility timeout and RunPod's 30-minute result retention.
            problems.append(f"RPQ_POLL_MAX_SECONDS: must be between 1 and {MAX_POLL_GAP_SECONDS:.0f}")
        if not problems and settings.submit_stuck_seconds is not None \
                and settings.submit_stuck_seconds <= settings.submit_bound_seconds:
            problems.append(f"RPQ_SUBMIT_STUCK_SECONDS: must be more than {settings.submit_bound_seconds:.0f} "
                            "(the longest a /run can take with RUNPOD_TIMEOUT_SECONDS); a slower /run would "
                            "be called lost while its answer can still come")
        if problems:
            raise ConfigError(problems)
        return settings

    def require_api_key(self) -> Secret:
        """The API key, or a ConfigError saying which variable to set."""
        if self.runpod_api_key is None:
            raise ConfigError(["RUNPOD_API_KEY: not set; RunPod (and the simulator) need it"])
        return self.runpod_api_key

    def max_in_flight_for(self, endpoint_id: str) -> int | None:
        """The cap on the endpoint's jobs at RunPod at once, if it has one."""
        for name, endpoint in self.endpoints.items():
            if endpoint.id == endpoint_id and name in self.max_in_flight:
                return self.max_in_flight[name]
        return None

    def resolve_endpoint(self, name_or_id: str) -> Endpoint:
        """The configured endpoint of that name, or a bare RunPod endpoint id taken as itself."""
        if name_or_id in self.endpoints:
            return self.endpoints[name_or_id]
        if ENDPOINT_ID_RE.match(name_or_id):
            return Endpoint(name=name_or_id, id=name_or_id)
        known = ", ".join(sorted(self.endpoints)) or "none configured"
        raise ConfigError(
            [f"unknown endpoint {name_or_id!r}: not in RUNPOD_ENDPOINTS ({known}) and not a RunPod endpoint id"]
        )


def _parse_endpoints(raw: str, problems: list[str]) -> dict[str, Endpoint]:
    """Parse `tts=fh46rj7dq9r3o5,export=abc123`; a bare id names itself."""
    endpoints: dict[str, Endpoint] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, endpoint_id = (s.strip() for s in item.partition("="))
        if not sep:
            name, endpoint_id = item, item
        if not ENDPOINT_NAME_RE.match(name):
            problems.append(f"RUNPOD_ENDPOINTS: {name!r} is not a valid name (letters, digits, '-', '_')")
        elif not ENDPOINT_ID_RE.match(endpoint_id):
            problems.append(f"RUNPOD_ENDPOINTS: {endpoint_id!r} (for {name!r}) is not a RunPod endpoint id")
        elif name in endpoints:
            problems.append(f"RUNPOD_ENDPOINTS: {name!r} is listed twice")
        else:
            endpoints[name] = Endpoint(name=name, id=endpoint_id)
    return endpoints


def _parse_caps(raw: str, endpoints: Mapping[str, Endpoint], problems: list[str]) -> dict[str, int]:
    """Parse `RPQ_MAX_IN_FLIGHT=tts=50,export=4`: configured endpoint names, positive whole numbers."""
    caps: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not re.fullmatch(r"[0-9]{1,9}", value) or int(value) <= 0:
            problems.append(f"RPQ_MAX_IN_FLIGHT: {item!r} is not NAME=N with N a whole number above 0")
        elif name not in endpoints:
            known = ", ".join(sorted(endpoints)) or "none configured"
            problems.append(f"RPQ_MAX_IN_FLIGHT: {name!r} is not an endpoint in RUNPOD_ENDPOINTS ({known})")
        elif name in caps:
            problems.append(f"RPQ_MAX_IN_FLIGHT: {name!r} is listed twice")
        else:
            caps[name] = int(value)
    return caps


def _unit(name: str) -> str:
    return "days" if name.endswith("_DAYS") else "seconds"
