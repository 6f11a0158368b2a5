"""Settings for the local RunPod serverless simulator.

Every field maps one-to-one onto a flag of ``rpq simulator`` (``workers_max`` → ``--workers-max``); the
CLI builds its options from ``dataclasses.fields(SimulatorConfig)`` and each field's ``metadata["help"]``.
Field types are limited to ``int``, ``float``, ``str``, ``bool``, ``str | None`` and ``tuple[str, ...]`` (a
repeatable flag, named by ``metadata["flag"]``) so that mapping stays mechanical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jobs.simulator.catalog import POOLS

#: RunPod's documented statuses for a job that ran past ``policy.executionTimeout``. The docs only say the
#: job is "marked as failed"; whether the API shows FAILED or TIMED_OUT is UNCONFIRMED.
EXECUTION_TIMEOUT_STATUSES = frozenset({"FAILED", "TIMED_OUT"})

#: How ``/status-sync`` holds a request; RunPod documents the route but not its semantics (UNCONFIRMED).
#: ``final``: answer once the job is final or ``wait`` runs out. ``change``: answer as soon as the status
#: differs from the one the request arrived with (or ``wait`` runs out).
STATUS_SYNC_MODES = frozenset({"final", "change"})

#: The smallest stream chunk limit that can always make progress: one UTF-8 character is up to 4 bytes.
MIN_STREAM_CHUNK_BYTES = 4


def _opt(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulator behaves. Flags (``rpq simulator --flag``):

    --api-key                      key clients must send (Bearer or bare); unset accepts any non-empty key
    --endpoint ID (repeatable)     an endpoint that exists from startup; any other id answers 404 until created
    --seed                         seed for every random choice (fault rates)
    --workers-max / --workers-min  default worker pool of a new endpoint
    --cold-start-seconds           time a worker spends initializing
    --idle-timeout-seconds         time a flex worker stays warm after its last job
    --execution-timeout-status     FAILED or TIMED_OUT for a job over policy.executionTimeout
    --retention-seconds / --sync-retention-seconds   result retention of /run and /runsync jobs
    --stream-hold-seconds          how long an empty /stream poll is held open
    --status-sync-mode             final or change: when a held /status-sync answers (UNCONFIRMED)
    --return-aggregate-stream      default handler: /status shows a streaming job's chunks (off, as RunPod)
    --max-result-bytes             a bigger result is dropped: COMPLETED with no output (RunPod: ~20 MB)
    --max-stream-chunk-bytes       a bigger streamed chunk is split into several (RunPod: 1 MB)
    --webhook-attempts / --webhook-interval-seconds / --webhook-timeout-seconds
    --rate-limits / --dynamic-rate-limits / --rate-limit-scale / --queue-full-limit
    --max-run-payload-bytes / --max-runsync-payload-bytes / --enforce-policy-max
    --fault-5xx-rate / --fault-429-rate / --fault-slow-rate / --fault-slow-seconds / --fault-drop-rate
    --gpu-pool / --gpu-count       GPU pool and GPUs per worker of a new endpoint (what execution bills at)
    --account-balance / --spend-limit   the simulated account behind the management API
    --pod ID (repeatable)          a pod the management API lists (inventory only)
    --handler                      module:function, a real RunPod handler to run instead of the default one
    --access-log                   log every request (off by default: pollers are chatty)
    """

    api_key: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "API key clients must send; unset accepts any non-empty key. Never logged."},
    )
    endpoints: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "endpoint",
            "help": "An endpoint id that exists from startup and survives /_sim/reset (repeatable). Any other "
            "id answers 404, as on RunPod, until POST /_sim/endpoints/{id} creates it. "
            "Default: the ids in $RUNPOD_ENDPOINTS.",
        },
    )
    seed: int = _opt(0, "Seed for the simulator's random choices (fault injection rates).")
    workers_max: int = _opt(3, "Default max workers of a new endpoint.")
    workers_min: int = _opt(0, "Default active (always warm) workers of a new endpoint.")
    cold_start_seconds: float = _opt(1.0, "Seconds a worker spends initializing before it takes jobs.")
    idle_timeout_seconds: float = _opt(5.0, "Seconds a flex worker stays warm after its last job (RunPod: 5).")
    execution_timeout_status: str = _opt(
        "FAILED", "Status of a job that exceeds policy.executionTimeout: FAILED or TIMED_OUT (UNCONFIRMED)."
    )
    retention_seconds: float = _opt(1800.0, "Seconds a finished /run job stays readable (RunPod: 30 min).")
    sync_retention_seconds: float = _opt(60.0, "Seconds a finished /runsync job stays readable (RunPod: 1 min).")
    stream_hold_seconds: float = _opt(
        9.0, "Seconds an empty /stream poll is held open (RunPod ~10; the SDK reads for 10, so stay under)."
    )
    status_sync_mode: str = _opt(
        "final",
        "When a held /status-sync answers: 'final' (job final or wait over) or 'change' (status changed "
        "since the call arrived); RunPod's semantics are UNCONFIRMED.",
    )
    return_aggregate_stream: bool = _opt(
        False,
        "Default of a new endpoint's return_aggregate_stream for the default handler: /status shows a "
        "streaming job's chunks as its output. RunPod's default is off (output [], chunks only via /stream); "
        "a --handler worker file's runpod.serverless.start() config decides for its own handler.",
    )
    max_result_bytes: int = _opt(
        20_000_000,
        "Largest job result (JSON-encoded) a worker can deliver. A bigger one is dropped and the job shows "
        "COMPLETED with no output, as on RunPod (~20 MB, runpod-python#309).",
    )
    max_stream_chunk_bytes: int = _opt(
        1_000_000,
        "Largest streamed chunk (JSON-encoded); a bigger one reaches /stream split into several string "
        "pieces (RunPod: 1 MB; its split format is UNCONFIRMED).",
    )
    webhook_attempts: int = _opt(3, "Webhook delivery attempts in total (RunPod: 3).")
    webhook_interval_seconds: float = _opt(10.0, "Seconds between webhook attempts (RunPod: 10).")
    webhook_timeout_seconds: float = _opt(10.0, "Seconds to wait for a webhook receiver to answer.")
    rate_limits: bool = _opt(True, "Enforce RunPod's per-endpoint rate limits (429 when over).")
    dynamic_rate_limits: bool = _opt(
        True,
        "Raise each per-10-s limit to running workers x 50 when that is more (RunPod's documented dynamic "
        "limit). Off, the base limits hold however many workers run (what a benchmark of rpq's own pacing needs).",
    )
    rate_limit_scale: float = _opt(
        1.0, "Multiply every rate and concurrency limit by this (e.g. 0.01 so tests hit them quickly)."
    )
    queue_full_limit: bool = _opt(
        True, "429 on /run when the queue holds more than 50 jobs and more than workers_max x 500."
    )
    max_run_payload_bytes: int = _opt(10 * 1024 * 1024, "Largest /run request body (RunPod: 10 MB).")
    max_runsync_payload_bytes: int = _opt(20 * 1024 * 1024, "Largest /runsync request body (RunPod: 20 MB).")
    enforce_policy_max: bool = _opt(
        True, "Refuse policy ttl/executionTimeout over 7 days (documented; code may only enforce minimums)."
    )
    fault_5xx_rate: float = _opt(0.0, "Probability that any API request fails with 503 before doing anything.")
    fault_429_rate: float = _opt(0.0, "Probability that any API request gets a 429 before doing anything.")
    fault_slow_rate: float = _opt(0.0, "Probability that any API request is delayed by --fault-slow-seconds.")
    fault_slow_seconds: float = _opt(15.0, "Delay of a slow fault, in seconds.")
    fault_drop_rate: float = _opt(0.0, "Probability that any API request's connection is dropped mid-response.")
    gpu_pool: str = _opt(
        "ADA_24", "Serverless GPU pool of a new endpoint (a pool id of GET /mgmt/v2/catalog/gpus): its price bills."
    )
    gpu_count: int = _opt(1, "GPUs per worker of a new endpoint; execution is billed per GPU.")
    account_balance: float = _opt(
        500.0,
        "Starting account balance in USD (GraphQL clientBalance). Billed execution lowers it, and it sets the "
        "account's max-worker cap (RunPod's balance tiers: 5; 10 at $100 ... 60 at $900).",
    )
    pods: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "pod",
            "help": "A pod id GET /mgmt/v2/pods lists as RUNNING on one --gpu-pool GPU (repeatable). Pods are "
            "inventory only: not billed.",
        },
    )
    spend_limit: float = _opt(80.0, "GraphQL spendLimit in USD per hour (shown only; RunPod's default UNCONFIRMED).")
    handler: str | None = _opt(None, "module:function of a RunPod handler to run instead of the default one.")
    access_log: bool = _opt(False, "Log every HTTP request.")

    def __post_init__(self) -> None:
        # Any iterable of ids is accepted (a list from Python callers); kept as a tuple, first mention first.
        object.__setattr__(self, "endpoints", tuple(dict.fromkeys(self.endpoints)))
        if self.execution_timeout_status not in EXECUTION_TIMEOUT_STATUSES:
            raise ValueError("execution_timeout_status must be FAILED or TIMED_OUT")
        if self.workers_min < 0 or self.workers_max < 0:
            raise ValueError("workers_min and workers_max must be >= 0")
        if self.status_sync_mode not in STATUS_SYNC_MODES:
            raise ValueError("status_sync_mode must be final or change")
        if self.max_result_bytes < 1:
            raise ValueError("max_result_bytes must be >= 1")
        if self.max_stream_chunk_bytes < MIN_STREAM_CHUNK_BYTES:
            raise ValueError(f"max_stream_chunk_bytes must be >= {MIN_STREAM_CHUNK_BYTES} (one UTF-8 character)")
        object.__setattr__(self, "pods", tuple(dict.fromkeys(self.pods)))
        for endpoint_id in self.endpoints:
            if not endpoint_id or "/" in endpoint_id or endpoint_id != endpoint_id.strip():
                raise ValueError(f"endpoint id {endpoint_id!r} must be non-empty, without '/' or spaces around")
        if self.gpu_pool not in POOLS:
            raise ValueError(f"gpu_pool must be one of {', '.join(POOLS)}")
        if self.gpu_count < 1:
            raise ValueError("gpu_count must be >= 1")
        if self.webhook_attempts < 1:
            raise ValueError("webhook_attempts must be >= 1")
        if self.rate_limit_scale <= 0:
            raise ValueError("rate_limit_scale must be > 0")
        for name in ("fault_5xx_rate", "fault_429_rate", "fault_slow_rate", "fault_drop_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
