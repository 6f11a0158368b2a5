"""Hypothesis strategies for what callers send rpq: bad values of every argument, and valid odd ones.

Every bad string carries CANARY, so a test can prove that no answer quotes what was sent.
"""

from __future__ import annotations

import secrets
from typing import Any

from hypothesis import strategies as st

from jobs.api import MAX_CORRELATION_ID_LENGTH, MAX_KEY_LENGTH, MAX_LIST_LIMIT, MAX_LIST_OFFSET, MAX_WEBHOOK_LENGTH
from jobs.jsonsafe import MAX_DEPTH, json_problems
from jobs.runpod.client import POLICY_BOUNDS_MS
from tests.conftest import ENDPOINT_ID

# Upper case and "_": no bad string with it can pass for a RunPod endpoint id (lower case, digits, "-").
CANARY = "Canary_" + secrets.token_hex(6)
POLICY_FIELDS = {"executionTimeout", "ttl", "lowPriority"}

# -- building blocks -------------------------------------------------------------------------------

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
#: Text with NUL, control characters and the astral plane; never a lone surrogate.
odd_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
#: Integers JSON keeps exactly, on both databases (PostgreSQL's json column keeps the text).
big_integers = st.integers(min_value=-(10**40), max_value=10**40)
json_leaves = (st.none() | st.booleans() | big_integers | st.floats(allow_nan=False, allow_infinity=False)
               | odd_text)


def nested(depth: int, leaf: Any) -> Any:
    """`leaf` inside `depth - 1` alternating lists and objects: `depth` levels in all."""
    value = leaf
    for level in range(depth - 1):
        value = [value] if level % 2 else {"k": value}
    return value


def json_within(depth: int) -> st.SearchStrategy[Any]:
    """Any JSON value rpq keeps, nested at most `depth` levels: small trees, and chains up to the bound."""
    return st.one_of(
        st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner,
                                                                                              max_size=4),
                     max_leaves=12).filter(lambda value: not json_problems(value, "", max_depth=depth)),
        st.builds(nested, st.integers(1, depth), json_leaves),
    )


json_values = json_within(MAX_DEPTH)
json_objects = st.dictionaries(odd_text, json_within(MAX_DEPTH - 1), max_size=4)


def with_canary(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return text.map(lambda t: t + CANARY)


def _surrogate_text() -> st.SearchStrategy[str]:
    return st.builds(lambda a, s, b: a + s + b + CANARY, odd_text, surrogates, odd_text)


def _nul_text() -> st.SearchStrategy[str]:
    return st.builds(lambda a, b: a + "\x00" + b + CANARY, odd_text, odd_text)


def _too_deep() -> st.SearchStrategy[Any]:
    return st.builds(nested, st.integers(MAX_DEPTH + 1, MAX_DEPTH + 400), st.just(CANARY))


def _json_with(bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A JSON object with a bad value somewhere inside."""
    return st.builds(lambda good, value: {**good, "x": [value]}, json_objects, bad)


# -- bad values, per argument of jobs.submit ---------------------------------------------------------
# Each is the bad values Python callers can pass; `json_only` ones are those a JSON body can also carry.

bad_json_in_json = st.one_of(_surrogate_text(), _too_deep(), _json_with(_surrogate_text()),
                             st.builds(lambda k: {k: 1}, _surrogate_text()))
bad_json_in_python = st.one_of(
    bad_json_in_json,
    _json_with(st.sampled_from([float("nan"), float("inf"), float("-inf")])),
    _json_with(st.builds(object) | st.sets(st.integers(), max_size=2) | st.binary(max_size=3)),
    st.builds(lambda k: {k: CANARY}, st.integers() | st.booleans()),
)

bad_policies_in_json = st.one_of(
    st.just(CANARY), st.lists(st.just(CANARY), max_size=2), st.integers(), st.booleans(),
    st.builds(lambda key: {key: CANARY}, with_canary(odd_text)),  # an unknown field
    st.fixed_dictionaries({"ttl": st.integers(max_value=POLICY_BOUNDS_MS["ttl"][0] - 1)
                           | st.integers(min_value=POLICY_BOUNDS_MS["ttl"][1] + 1)}),
    st.fixed_dictionaries({"executionTimeout": st.integers(max_value=POLICY_BOUNDS_MS["executionTimeout"][0] - 1)
                           | st.integers(min_value=POLICY_BOUNDS_MS["executionTimeout"][1] + 1, max_value=10**30)}),
    st.fixed_dictionaries({"ttl": st.floats(allow_nan=False, allow_infinity=False) | st.just(CANARY)
                           | st.booleans()}),
    st.fixed_dictionaries({"lowPriority": st.integers() | st.just(CANARY)}),
)
bad_webhooks_in_json = st.one_of(
    st.integers(), st.booleans(), st.lists(st.just(CANARY), max_size=1),
    with_canary(odd_text).filter(lambda url: not url.startswith(("http://", "https://"))),
    st.builds(lambda t: "https://" + t, _nul_text()),
    st.builds(lambda t: "https://" + t, _surrogate_text()),
    st.just("https://example.com/" + CANARY + "x" * MAX_WEBHOOK_LENGTH),
)


def bad_keys_in_json(limit: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(), st.booleans(), st.lists(st.just(CANARY), max_size=1),
                     st.sampled_from(["", " ", "\t"]), _nul_text(), _surrogate_text(),
                     st.just(CANARY + "k" * limit))


bad_metadata_in_json = st.one_of(st.lists(st.just(CANARY), max_size=2), st.just(CANARY), st.integers(),
                                 st.builds(lambda v: {"m": v}, bad_json_in_json), _too_deep().map(lambda v: {"m": v}))
bad_endpoints = st.one_of(st.integers(), st.booleans(), st.none(), st.lists(st.just(CANARY), max_size=1),
                          with_canary(odd_text), st.just(ENDPOINT_ID + "\n"), _nul_text(), _surrogate_text())
bad_streams = st.one_of(st.integers(), st.just(CANARY), st.none(), st.lists(st.booleans(), max_size=1))
#: Not whole numbers in -1000..1000 (5.0 is one: JSON has one kind of number).
bad_priorities = st.one_of(st.booleans(), st.floats().filter(lambda f: not f.is_integer()), st.just(CANARY),
                           st.none(), st.lists(st.integers(), max_size=1), st.integers(max_value=-1001),
                           st.integers(min_value=1001))

#: Not a usable set of input files: not an object, a name that is no file name, a source that is no file.
bad_files = st.one_of(
    st.just(CANARY), st.integers(), st.lists(st.just(b"x"), max_size=2),
    st.builds(lambda v: {"a.wav": b"ok", "b.wav": v},
              st.just(CANARY) | st.integers() | st.booleans() | st.none() | st.lists(st.integers(), max_size=1)),
    st.builds(lambda name: {name: b"x"}, st.sampled_from(["", "/abs", "a/../b", "a//b", "."]) | _nul_text()
              | st.just(CANARY + "n" * 300)),
    st.builds(lambda key: {"a": {"key": key}}, st.just("") | st.just("../" + CANARY) | st.integers() | _nul_text()),
    st.just({"a": {"key": "rpq/x", CANARY: 1}}), st.just({"a": {"key": "rpq/x", "content_type": "\n" + CANARY}}),
    st.just({f"f{i}": b"" for i in range(257)}),
)
#: Not a usable declaration of outputs.
bad_outputs = st.one_of(
    st.just(CANARY), st.integers(), st.booleans(),
    st.builds(lambda name: ["ok.mp4", name], st.sampled_from(["", "/abs", "..", "a/./b"]) | _nul_text()
              | st.integers() | st.just(CANARY + "n" * 300)),
    st.just(["same.mp4", "same.mp4"]), st.just({"a.mp4": "not a\ntype" + CANARY}),
    st.just([f"o{i}" for i in range(257)]),
)
bad_flags = st.one_of(st.integers(), st.just(CANARY), st.lists(st.booleans(), max_size=1))

#: For the Python API: argument → its bad values.
BAD_ARGUMENTS: dict[str, st.SearchStrategy[Any]] = {
    "endpoint": bad_endpoints.filter(lambda v: v is not None),
    "input": st.one_of(st.none(), bad_json_in_python),
    "policy": bad_policies_in_json,
    "webhook": bad_webhooks_in_json,
    "idempotency_key": bad_keys_in_json(MAX_KEY_LENGTH),
    "correlation_id": bad_keys_in_json(MAX_CORRELATION_ID_LENGTH),
    "metadata": st.one_of(bad_metadata_in_json, st.builds(lambda v: {"m": v}, bad_json_in_python)),
    "stream": bad_streams.filter(lambda v: v is not None),
    "priority": bad_priorities,
    "files": bad_files,
    "outputs": bad_outputs,
    "offload": bad_flags,
    "s3_config": bad_flags,
    # Not a name of 1 to 64 letters, digits, '.', '_', '-' (a '/' is none of them), or not a string at all.
    "tenant": st.one_of(st.integers(), st.lists(odd_text, max_size=2), with_canary(odd_text).map(lambda t: "/" + t),
                        st.just("x" * 65)),
}


@st.composite
def bad_submissions(draw: st.DrawFn, bad: dict[str, st.SearchStrategy[Any]] = BAD_ARGUMENTS) -> tuple[
        dict[str, Any], set[str]]:
    """Arguments for jobs.submit with at least one bad, and the names of the bad ones."""
    arguments: dict[str, Any] = {"endpoint": "tts", "input": draw(json_values.filter(lambda v: v is not None))}
    names = draw(st.sets(st.sampled_from(sorted(bad)), min_size=1, max_size=4))
    for name in names:
        arguments[name] = draw(bad[name])
    return arguments, names


# -- valid odd values ----------------------------------------------------------------------------

valid_policies = st.fixed_dictionaries({}, optional={
    "ttl": st.integers(*POLICY_BOUNDS_MS["ttl"]),
    "executionTimeout": st.integers(*POLICY_BOUNDS_MS["executionTimeout"]),
    "lowPriority": st.booleans(),
})
#: Text any key column keeps: not blank, no NUL, no lone surrogate.
key_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1,
                   max_size=MAX_CORRELATION_ID_LENGTH).filter(str.strip)
#: What an HTTP correlation id may be: visible ASCII (it travels in a header).
header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                      max_size=MAX_CORRELATION_ID_LENGTH)

# -- bad list filters ----------------------------------------------------------------------------

bad_since_texts = st.one_of(
    with_canary(odd_text),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(36_501, 10**30), st.just("d")),
    st.builds(lambda n: f"{n}s", st.integers(10**13, 10**40)),
    st.just("0001-01-01T00:00:00+01:00"),
    st.builds(lambda y: f"9999-12-31T23:59:59-{y:02d}:00", st.integers(1, 23)),
)
bad_counts = st.one_of(st.integers(max_value=-1).map(str), st.integers(min_value=MAX_LIST_OFFSET + 1).map(str),
                       with_canary(odd_text), st.just("9" * 5000), st.just("1.5"))
bad_limits = st.one_of(bad_counts, st.just("0"), st.integers(MAX_LIST_LIMIT + 1, 10**30).map(str))
