"""The metric names a PromQL expression reads, and the series names rpq's exporter really serves.

Enough of PromQL to tell a metric name from a function, an aggregation, a keyword, a label name (in
`{...}`, `by (...)`, `on (...)`, ...), a string, a number or a duration. It does not check syntax:
`promtool` does that (tests/unit/test_deploy_tools.py). An unknown function or a `__name__` matcher is
an error rather than a guess, so a query cannot slip past the check by spelling.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTIONS = _words("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv exp
    floor histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters double_exponential_smoothing hour idelta increase irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month predict_linear
    present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
    sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp
    vector year
""")
AGGREGATIONS = _words("sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk "
                         "limit_ratio")
#: Followed by a parenthesised list of label names, which are not metrics.
LABEL_LIST_KEYWORDS = _words("by without on ignoring group_left group_right")
KEYWORDS = _words("and or unless bool offset atan2 inf nan start end") | LABEL_LIST_KEYWORDS

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<number>(?:\d+(?:ms|[smhdwy]))+|0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)


class PromQLError(ValueError):
    pass


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            out.append((kind, match.group()))
        pos = match.end()
    return out


def metric_names(expr: str) -> set[str]:
    """Every metric name `expr` selects, e.g. {"rpq_job_latency_seconds_bucket"} for a histogram_quantile."""
    tokens = _tokens(expr)
    wrapped = [("op", "("), *tokens, ("op", ")")]
    if _closing(wrapped, 0, "(", ")") != len(wrapped) - 1:
        raise PromQLError(f"unbalanced '()' in {expr!r}")
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":  # label matchers: label names and strings, never metrics
            end = _closing(tokens, i, "{", "}")
            if any(t == "__name__" for _, t in tokens[i:end]):
                raise PromQLError(f"a __name__ matcher cannot be checked: {expr!r}")
            i = end
        elif text == "[":  # a range or subquery: durations and variables
            i = _closing(tokens, i, "[", "]")
        elif kind == "name" and text.lower() in KEYWORDS:
            if text in LABEL_LIST_KEYWORDS and following == "(":
                i = _closing(tokens, i + 1, "(", ")")
        elif kind == "name" and following in ("(", "by", "without"):  # sum by (x) (...) as well as sum(...)
            if text not in FUNCTIONS | AGGREGATIONS:
                raise PromQLError(f"unknown function {text!r} in {expr!r}")
        elif kind == "name":
            names.add(text)
        i += 1
    return names


def _closing(tokens: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    depth = 0
    for j in range(start, len(tokens)):
        depth += {opening: 1, closing: -1}.get(tokens[j][1], 0)
        if depth == 0:
            return j
        if depth < 0:
            break
    raise PromQLError(f"unbalanced {opening!r}{closing!r}")


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$", re.DOTALL)


def variable_query_names(query: str) -> set[str]:
    """The metric names a Grafana Prometheus variable query reads: `label_values(metric, label)` or
    `query_result(expr)`; other forms (`label_values(label)`, `metrics(...)`) read every metric and are refused."""
    if match := _LABEL_VALUES.match(query):
        return metric_names(match["selector"])
    if query.strip().startswith("query_result(") and query.strip().endswith(")"):
        return metric_names(query.strip()[len("query_result("):-1])
    raise PromQLError(f"a variable query must name its metric: {query!r}")


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every target of every panel, rows' panels included."""
    def panels(items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]


def dashboard_variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            yield f"variable {variable['name']!r}", query["query"] if isinstance(query, dict) else query


def rule_queries(rules: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')!r}", rule["expr"]


def exposed_names(families: Iterable[Any]) -> set[str]:
    """The series names a scrape can carry for these metric families (prometheus_client `Metric`s), by
    type, as the text format writes them: a counter `x` is `x_total`, a histogram `x` is `x_bucket`, `x_sum`
    and `x_count`. `_created` only where a family really has such samples: rpq's own collector sets no
    creation time, so `x_created` never exists and a query for it must fail the check."""
    names: set[str] = set()
    for family in families:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "summary": ("", "_sum", "_count"),
                    "info": ("_info",)}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
        names |= {sample.name for sample in family.samples if sample.name.endswith("_created")}
    return names
