"""The PromQL reader that checks the dashboard and the alerts name only series rpq exports (tests/promql.py)."""

from __future__ import annotations

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tests.promql import PromQLError, exposed_names, metric_names, variable_query_names


@pytest.mark.parametrize("expr, names", [
    ("rpq_poll_lag_seconds", {"rpq_poll_lag_seconds"}),
    ('histogram_quantile(0.99, sum by (le) (rate(rpq_job_latency_seconds_bucket{endpoint=~"$endpoint", '
     'status="COMPLETED"}[$__rate_interval])))', {"rpq_job_latency_seconds_bucket"}),
    ("sum(rate(a_total[5m])) by (endpoint) / on (endpoint) group_left (status) b", {"a_total", "b"}),
    ('max by (endpoint) (w{state="unhealthy"}) > 0 unless on (endpoint) max by (endpoint) (w{state=~"ready"}) > 0',
     {"w"}),
    ('label_replace(sum by (endpoint) (rate(p[5m])), "operation", "status", "", "") * 10 / scalar(max(l))',
     {"p", "l"}),
    ("up{job=\"rpq\"} == 0 or absent(up{job=\"rpq\"}) or absent(q)", {"up", "q"}),
    ("x offset 1h30m + y @ start() - z[5m:1m] # a comment naming not_a_metric", {"x", "y", "z"}),
    ("sum without (instance) (x) > bool Inf", {"x"}),
    ("ns:rate5m:sum * 2e3 + 0x1f", {"ns:rate5m:sum"}),
    ("sum(x) or vector(0)", {"x"}),
])
def test_the_metric_names_of_an_expression_are_found_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", [
    "rat(x[5m])",  # a misspelt function would otherwise read as a metric named rat
    '{__name__=~"rpq_.*"}',  # selects by pattern: what it names cannot be checked
    "sum(x",
    "a) + (b",
    "x ~ y",
])
def test_what_cannot_be_checked_is_refused(expr: str) -> None:
    with pytest.raises(PromQLError):
        metric_names(expr)


def test_variable_queries_must_name_their_metric() -> None:
    assert variable_query_names("label_values(rpq_jobs, endpoint)") == {"rpq_jobs"}
    assert variable_query_names('label_values(rpq_jobs{status="PENDING"}, endpoint)') == {"rpq_jobs"}
    with pytest.raises(PromQLError):
        variable_query_names("label_values(endpoint)")


def test_series_names_follow_each_family_type_as_the_text_format_writes_them() -> None:
    counter = CounterMetricFamily("rpq_polls", "", labels=["endpoint"])
    counter.add_metric(["tts"], 3)
    created = CounterMetricFamily("other", "", labels=["endpoint"])
    created.add_metric(["tts"], 3, created=1700000000.0)
    histogram = HistogramMetricFamily("rpq_job_latency_seconds", "", labels=["endpoint"])
    gauge = GaugeMetricFamily("rpq_jobs", "")

    names = exposed_names([counter, created, histogram, gauge])

    assert names == {"rpq_polls_total", "other_total", "other_created", "rpq_job_latency_seconds_bucket",
                     "rpq_job_latency_seconds_sum", "rpq_job_latency_seconds_count", "rpq_jobs"}
