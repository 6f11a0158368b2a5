"""The dashboard and the alert rules name only series rpq's exporter really serves.

The exporter's families come from collecting `RpqCollector` itself, on a migrated SQLite database and a
real Redis, with one of each counter and the latency histogram recorded the way workers record them.
Prometheus's own series (`up`, `ALERTS`) are the only others allowed, and the dashboard reads no
Flower series.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.promql import (
    dashboard_queries,
    dashboard_variable_queries,
    exposed_names,
    metric_names,
    rule_queries,
    variable_query_names,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "rpq-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

#: Series Prometheus makes itself (prometheus.io/docs/concepts/jobs_instances/ for `up`;
#: prometheus.io/docs/prometheus/latest/configuration/alerting_rules/ for `ALERTS`).
PROMETHEUS_OWN = frozenset({"up", "ALERTS"})


@pytest.fixture(scope="module")
def families(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    from jobs.errors import RunPodRateLimited
    from jobs.observability.metrics import RpqCollector
    from jobs.observability.metrics_recorder import COUNTERS_KEY, RedisRecorder
    from jobs.runtime import QUEUES, Runtime
    from jobs.settings import Endpoint, Secret, Settings
    from jobs.storage.db import make_engine, upgrade
    from jobs.storage.models import utcnow
    from tests.conftest import Published

    url = f"sqlite:///{tmp_path_factory.mktemp('series') / 'rpq.db'}"
    upgrade(url)
    settings = Settings(runpod_api_key=Secret("unused"), database_url=url, celery_broker_url=redis_url,
                        endpoints={"tts": Endpoint("tts", "tts-endpoint")}, max_in_flight={"tts": 2})

    def no_runpod() -> Any:
        raise AssertionError("collecting metrics must not call RunPod")

    rt = Runtime(settings=settings, engine=make_engine(url), publish=Published(), make_client=no_runpod)
    broker = redis.Redis.from_url(redis_url)
    broker.delete(COUNTERS_KEY)
    recorder = RedisRecorder(redis_url)
    recorder.submitted("tts", "accepted")
    recorder.polled("tts")
    recorder.runpod_error("status", RunPodRateLimited("429"))
    recorder.finished("tts", "COMPLETED", utcnow() - timedelta(seconds=3))
    for record in (recorder.output_missing, recorder.files_missing, recorder.stream_gap):
        record("tts")
    recorder.cost("tts", 0.01)
    recorder.retention_blocked("store_error")
    try:
        yield list(RpqCollector(rt, broker, QUEUES).collect())
    finally:
        broker.delete(COUNTERS_KEY)
        broker.close()
        rt.close()


@pytest.fixture(scope="module")
def exported(families: list[Any]) -> frozenset[str]:
    return frozenset(exposed_names(families))


def names_in(queries: Iterator[tuple[str, str]], *, variables: bool = False) -> dict[str, set[str]]:
    read = variable_query_names if variables else metric_names
    return {where: read(expr) for where, expr in queries}


def unknown(named: dict[str, set[str]], exported: frozenset[str]) -> dict[str, set[str]]:
    return {where: bad for where, names in named.items() if (bad := names - exported - PROMETHEUS_OWN)}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_every_series_the_dashboard_reads_is_one_rpq_exports(exported: frozenset[str]) -> None:
    named = {**names_in(dashboard_queries(dashboard())),
             **names_in(dashboard_variable_queries(dashboard()), variables=True)}

    assert len(named) > 20  # every panel's targets were read, not none
    assert unknown(named, exported) == {}
    assert not {n for names in named.values() for n in names if n.startswith(("flower_", "celery_"))}


def test_every_series_the_alert_rules_read_is_one_rpq_exports(exported: frozenset[str]) -> None:
    named = names_in(rule_queries(yaml.safe_load(ALERTS.read_text())))

    assert len(named) == 10
    assert unknown(named, exported) == {}


def test_a_series_rpq_does_not_export_is_caught(exported: frozenset[str]) -> None:
    board = dashboard()
    lag = next(p for p in board["panels"] if p["title"] == "Poll lag")
    lag["targets"][0]["expr"] = "max(rpq_poll_lag_second)"  # a typo
    latency = next(p for p in board["panels"] if p["title"] == "Latency, submit to COMPLETED")
    latency["targets"][0]["expr"] = "histogram_quantile(0.5, sum by (le) (rate(rpq_job_latency_seconds[5m])))"
    throughput = next(p for p in board["panels"] if p["title"].startswith("Throughput"))
    throughput["targets"][1]["expr"] = "sum(rate(rpq_submits[5m])) + sum(rate(rpq_submits_created[5m]))"

    assert unknown(names_in(dashboard_queries(board)), exported) == {
        "panel 'Poll lag' A": {"rpq_poll_lag_second"},
        "panel 'Latency, submit to COMPLETED' A": {"rpq_job_latency_seconds"},  # a histogram has no bare series
        "panel 'Throughput (jobs a minute)' B": {"rpq_submits", "rpq_submits_created"},  # a counter's is x_total
    }


def test_the_names_derived_from_each_family_cover_every_sample_it_carries(families: list[Any]) -> None:
    samples = {sample.name for family in families for sample in family.samples}

    assert samples <= exposed_names(families)
    # What was recorded above shows in the scrape, so the families are rpq's live ones, not empty shells.
    assert {"rpq_submits_total", "rpq_runpod_errors_total", "rpq_job_latency_seconds_bucket",
            "rpq_queue_messages", "rpq_jobs_held", "rpq_runpod_budget_limit"} <= samples
