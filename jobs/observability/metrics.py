"""The Prometheus exporter that `rpq metrics` serves.

At each scrape it reads the job table, the latest endpoint health rows, the broker's queues, the
counters workers keep in Redis (see `jobs.observability.metrics_recorder`) and the RunPod request
budget's denial counts (see `jobs.runpod.budget`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select

from jobs.flow.spend_guard import ACCOUNT, endpoint_hold, spend_hold
from jobs.flow.waiting import held_by_cap
from jobs.observability.metrics_recorder import COUNTERS_KEY, LATENCY_BUCKETS, SEP
from jobs.runpod import health
from jobs.runpod.budget import OPERATIONS, read_denied
from jobs.runtime import Runtime
from jobs.states import AT_RUNPOD
from jobs.storage.db import session_scope
from jobs.storage.models import JobRow, utcnow

log = logging.getLogger("rpq.metrics")


class RpqCollector(Collector):
    """Builds every rpq series at scrape time."""

    def __init__(self, rt: Runtime, broker: redis.Redis, queues: Iterable[str]) -> None:
        self.rt = rt
        self.broker = broker
        self.queues = list(queues)

    def collect(self) -> Iterator[Any]:
        yield from self._jobs()
        yield from self._queues()
        yield from self._health()
        yield from self._counters()
        yield from self._budget()

    def _jobs(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("rpq_jobs", "Jobs in the table by status and endpoint.",
                                 labels=["status", "endpoint"])
        lag = GaugeMetricFamily("rpq_poll_lag_seconds",
                                "How overdue the most overdue poll of a job at RunPod is (0 when none is).")
        held = GaugeMetricFamily("rpq_jobs_held", "PENDING jobs waiting for a slot under their endpoint's "
                                 "max_in_flight (RPQ_MAX_IN_FLIGHT); only endpoints with a cap.", labels=["endpoint"])
        guard = GaugeMetricFamily("rpq_spend_guard_holding", "1 while the spend guard holds new jobs, else 0: "
                                  "scope=account for the account's limits (spend per hour, balance), and "
                                  "scope=<endpoint> for each endpoint with a limit of its own.", labels=["scope"])
        with session_scope(self.rt.engine, read_only=True) as session:
            for endpoint, count in sorted(held_by_cap(session, self.rt.settings, utcnow()).items()):
                held.add_metric([endpoint], count)
            settings, now = self.rt.settings, utcnow()
            guard.add_metric([ACCOUNT], 0.0 if spend_hold(session, settings, now) is None else 1.0)
            for name in sorted(settings.budget_endpoint_max_spend_per_hour):
                holding = endpoint_hold(session, settings, now, settings.endpoints[name].id) is not None
                guard.add_metric([name], 1.0 if holding else 0.0)
            for status, endpoint, count in session.exec(
                select(JobRow.status, JobRow.endpoint_name, func.count()).group_by(
                    col(JobRow.status), col(JobRow.endpoint_name))
            ).all():
                jobs.add_metric([str(status), endpoint], count)
            oldest = session.exec(
                select(func.min(JobRow.next_poll_at)).where(col(JobRow.status).in_(sorted(AT_RUNPOD)))
            ).one()
        if isinstance(oldest, datetime):
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=utcnow().tzinfo)
        lag.add_metric([], max((utcnow() - oldest).total_seconds(), 0.0) if isinstance(oldest, datetime) else 0.0)
        yield jobs
        yield lag
        yield held
        yield guard

    def _queues(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "rpq_queue_messages",
            "Celery messages per queue: ready = waiting in Redis (what Flower shows), "
            "held = fetched by a worker and not yet acked (countdown polls wait here).",
            labels=["queue", "state"],
        )
        try:
            held: dict[str, int] = defaultdict(int)
            for raw in self.broker.hvals("unacked"):
                try:
                    _message, _exchange, routing_key = json.loads(raw)
                except (ValueError, TypeError):
                    continue
                held[str(routing_key)] += 1
            for queue in self.queues:
                # kombu keeps priorities 3, 6 and 9 in lists of their own beside the plain one.
                ready = sum(int(self.broker.llen(key)) for key in
                            (queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9))))
                depth.add_metric([queue, "ready"], ready)
                depth.add_metric([queue, "held"], held.get(queue, 0))
        except redis.RedisError as exc:
            log.warning("queue depth unavailable: %s", exc)
            return
        yield depth

    def _health(self) -> Iterator[Any]:
        up = GaugeMetricFamily("rpq_endpoint_health_ok", "1 when the last /health call succeeded.",
                               labels=["endpoint"])
        age = GaugeMetricFamily("rpq_endpoint_health_age_seconds", "Age of the last /health observation.",
                                labels=["endpoint"])
        jobs = GaugeMetricFamily("rpq_endpoint_jobs", "RunPod's own job counters from /health.",
                                 labels=["endpoint", "state"])
        workers = GaugeMetricFamily("rpq_endpoint_workers", "RunPod's worker counters from /health.",
                                    labels=["endpoint", "state"])
        with session_scope(self.rt.engine, read_only=True) as session:
            for name in self.rt.settings.endpoints:
                row = health.latest(session, name)
                if row is None:
                    continue
                up.add_metric([name], 1.0 if row.ok else 0.0)
                age.add_metric([name], (utcnow() - row.observed_at).total_seconds())
                if not row.ok:
                    continue
                for state in ("in_queue", "in_progress", "completed", "failed", "retried"):
                    jobs.add_metric([name, state], getattr(row, f"jobs_{state}") or 0)
                for state in ("idle", "initializing", "ready", "running", "throttled", "unhealthy"):
                    workers.add_metric([name, state], getattr(row, f"workers_{state}") or 0)
        yield from (up, age, jobs, workers)

    def _counters(self) -> Iterator[Any]:
        submits = CounterMetricFamily("rpq_submits", "Submit attempts by outcome.", labels=["endpoint", "outcome"])
        polls = CounterMetricFamily("rpq_polls", "RunPod /status calls made by polls.", labels=["endpoint"])
        errors = CounterMetricFamily("rpq_runpod_errors", "RunPod API errors by operation and kind.",
                                     labels=["operation", "kind"])
        missing = CounterMetricFamily("rpq_output_missing", "Jobs RunPod reported COMPLETED with no output "
                                      "(how it shows a result over its ~20 MB limit).", labels=["endpoint"])
        files_missing = CounterMetricFamily("rpq_files_missing", "Completed jobs a declared output file was missing "
                                            "from the bucket for (or could not be checked).", labels=["endpoint"])
        costs = CounterMetricFamily("rpq_cost_usd", "Finished jobs' estimated cost in USD: execution time x the "
                                    "endpoint's GPU list price x GPU count.", labels=["endpoint"])
        gaps = CounterMetricFamily("rpq_stream_gaps", "Streaming jobs whose /stream read was lost: chunks may be "
                                   "missing.", labels=["endpoint"])
        retention = CounterMetricFamily("rpq_retention_blocked", "Retention runs that kept jobs or uploads past "
                                        "retention because their objects could not be deleted (reason: "
                                        "store_error, no_bucket); each next run tries again.", labels=["reason"])
        latency = HistogramMetricFamily("rpq_job_latency_seconds",
                                        "From submit() to the final status stored, by endpoint and status.",
                                        labels=["endpoint", "status"])
        try:
            raw = self.broker.hgetall(COUNTERS_KEY)
        except redis.RedisError as exc:
            log.warning("counters unavailable: %s", exc)
            return
        sums: dict[tuple[str, str], float] = {}
        counts: dict[tuple[str, str], float] = {}
        buckets: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
        for key, value in ((k.decode() if isinstance(k, bytes) else k, float(v)) for k, v in raw.items()):
            kind, *labels = key.split(SEP)
            if kind == "submits" and len(labels) == 2:
                submits.add_metric(labels, value)
            elif kind == "polls" and len(labels) == 1:
                polls.add_metric(labels, value)
            elif kind == "runpod_errors" and len(labels) == 2:
                errors.add_metric(labels, value)
            elif kind == "output_missing" and len(labels) == 1:
                missing.add_metric(labels, value)
            elif kind == "cost_usd" and len(labels) == 1:
                costs.add_metric(labels, value)
            elif kind == "files_missing" and len(labels) == 1:
                files_missing.add_metric(labels, value)
            elif kind == "stream_gaps" and len(labels) == 1:
                gaps.add_metric(labels, value)
            elif kind == "retention_blocked" and len(labels) == 1:
                retention.add_metric(labels, value)
            elif kind == "latency_sum" and len(labels) == 2:
                sums[(labels[0], labels[1])] = value
            elif kind == "latency_count" and len(labels) == 2:
                counts[(labels[0], labels[1])] = value
            elif kind == "latency_bucket" and len(labels) == 3:
                buckets[(labels[0], labels[1])][float(labels[2])] = value
        for series, count in counts.items():
            observed = buckets.get(series, {})
            cumulative = [(str(bound), observed.get(bound, 0.0)) for bound in LATENCY_BUCKETS]
            latency.add_metric(list(series), [*cumulative, ("+Inf", count)], sums.get(series, 0.0))
        yield from (submits, polls, errors, missing, files_missing, costs, gaps, retention, latency)


    def _budget(self) -> Iterator[Any]:
        limit = GaugeMetricFamily("rpq_runpod_budget_limit", "rpq's budget of RunPod requests per 10 s, per "
                                  "endpoint, by operation (RPQ_RUNPOD_LIMITS).", labels=["operation"])
        for op in OPERATIONS:
            limit.add_metric([op], self.rt.settings.runpod_limits.of(op))
        yield limit
        denied = CounterMetricFamily("rpq_runpod_budget_denied", "RunPod requests not sent because rpq's budget "
                                     "had no token in time (the caller tries again later).",
                                     labels=["endpoint", "operation"])
        try:
            counts = read_denied(self.broker)
        except redis.RedisError as exc:
            log.warning("budget denials unavailable: %s", exc)
            return
        # The budget is kept by RunPod endpoint id; show the configured name where there is exactly one.
        names: dict[str, list[str]] = defaultdict(list)
        for endpoint in self.rt.settings.endpoints.values():
            names[endpoint.id].append(endpoint.name)
        series: dict[tuple[str, str], int] = defaultdict(int)
        for (endpoint_id, op), count in counts.items():
            known = names.get(endpoint_id, [])
            series[(known[0] if len(known) == 1 else endpoint_id, op)] += count
        for labels, count in sorted(series.items()):
            denied.add_metric(list(labels), count)
        yield denied


def serve(rt: Runtime, *, host: str, port: int) -> None:
    """Serve /metrics until interrupted."""
    from prometheus_client import CollectorRegistry, start_http_server

    from jobs.runtime import QUEUES

    registry = CollectorRegistry()
    registry.register(RpqCollector(rt, redis.Redis.from_url(rt.settings.celery_broker_url), QUEUES))
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics at http://%s:%d/metrics", host, port)
    try:
        thread.join()
    finally:
        server.shutdown()
