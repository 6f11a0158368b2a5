"""What rpq accepts as JSON at the edge, and how RunPod's answers are made storable."""

from __future__ import annotations

import json

import pytest

from jobs.jsonsafe import (
    MAX_DEPTH,
    REPLACEMENT,
    TOO_DEEP_MARKER,
    json_problems,
    storable_json,
    storable_text,
    text_problems,
)


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return value


def test_ordinary_json_has_no_problems() -> None:
    # The object is one level, so its nested member may use the rest.
    value = {"text": "héllo \x00 wörld 😀", "n": [1, 2.5, True, None], "deep": nested(MAX_DEPTH - 1)}
    assert json_problems(value, "input") == []


@pytest.mark.parametrize(("value", "constraint"), [
    ({"a": "\udc80"}, "text"),
    ({"\ud800": 1}, "text"),
    ([float("nan")], "type"),
    (float("inf"), "type"),
    ({1: "a"}, "type"),
    ({"a": {1, 2}}, "type"),
    (nested(MAX_DEPTH + 1), "depth"),
])
def test_values_that_cannot_be_stored_and_served_are_named(value: object, constraint: str) -> None:
    problems = json_problems(value, "metadata")
    assert [(p.field, p.constraint) for p in problems] == [("metadata", constraint)]


def test_each_kind_of_problem_is_reported_once_however_often_it_occurs() -> None:
    problems = json_problems(["\udc80"] * 1000 + [float("nan")] * 1000, "input")
    assert sorted(p.constraint for p in problems) == ["text", "type"]


def test_a_hostile_depth_is_checked_without_exhausting_the_stack() -> None:
    assert [p.constraint for p in json_problems(nested(100_000), "input")] == ["depth"]


def test_problem_messages_never_quote_the_value() -> None:
    marker = "secret-marker"
    for problem in json_problems({marker: float("nan"), "k": marker + "\udc80"}, "metadata"):
        assert marker not in problem.message


def test_text_with_nul_or_a_surrogate_is_refused_for_text_columns() -> None:
    assert [p.constraint for p in text_problems("a\x00b", "correlation_id")] == ["text"]
    assert [p.constraint for p in text_problems("a\udc80", "correlation_id")] == ["text"]
    assert text_problems("réq-7f3a 😀", "correlation_id") == []


def test_text_from_runpod_is_made_storable_by_replacement_not_by_loss() -> None:
    assert storable_text("ok\x00bad\udc80end") == f"ok{REPLACEMENT}bad{REPLACEMENT}end"
    clean = "nothing to fix"
    assert storable_text(clean) is clean


def test_json_from_runpod_is_made_storable_and_encodable() -> None:
    stored = storable_json({"a\udc80": ["\ud800x", float("nan"), float("-inf"), "nul\x00kept"]})
    assert stored == {f"a{REPLACEMENT}": [f"{REPLACEMENT}x", None, None, "nul\x00kept"]}
    json.dumps(stored, ensure_ascii=False, allow_nan=False).encode("utf-8")


def test_clean_json_from_runpod_is_returned_as_it_is() -> None:
    value = {"tokens": ["a", "b"], "score": 0.5}
    assert storable_json(value) is value


def test_json_nested_beyond_the_stored_bound_keeps_its_top_and_marks_the_cut() -> None:
    stored = storable_json(nested(300), max_depth=10)
    inner = stored
    for _ in range(9):
        assert isinstance(inner, list)
        inner = inner[0]
    assert inner == [TOO_DEEP_MARKER]
