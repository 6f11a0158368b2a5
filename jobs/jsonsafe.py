"""What rpq accepts as JSON, and how what RunPod sends is made storable.

Two directions, one set of rules:

* at the edge (`jobs.submit`, the HTTP API, the CLI) a value rpq accepts must be one it can store on
  SQLite and PostgreSQL, send to RunPod as UTF-8 JSON and serve back unchanged. `json_problems` and
  `text_problems` say what is wrong, without quoting the value;
* from RunPod (output, error, progress, stream chunks) whatever arrives must be stored, or every poll
  of the job would crash on it until the job expired. `storable_json` and `storable_text` replace what
  cannot be stored, and say so by the replacement character, never by dropping the whole value.

What cannot be stored or served: an unpaired surrogate (Python can hold one in a `str`, UTF-8 cannot
encode it, so the row or the answer fails), NUL in a text column (PostgreSQL refuses it; inside a JSON
value it is escaped as \\u0000 and is fine), NaN and infinities (not JSON), keys that are not strings,
and nesting so deep that encoding, decoding or the database's parser runs out of stack.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from jobs.errors import Problem

#: The deepest nesting accepted at the edge: far beyond any real handler input, far below the
#: recursion limits of Python's json module and of PostgreSQL's JSON parser.
MAX_DEPTH = 64
#: The deepest nesting kept from RunPod; a deeper subtree is replaced by a marker string.
MAX_STORED_DEPTH = 256
TOO_DEEP_MARKER = f"[rpq: nested deeper than {MAX_STORED_DEPTH} levels; not stored]"
REPLACEMENT = "\ufffd"

_SURROGATE = re.compile("[\ud800-\udfff]")
_NUL_OR_SURROGATE = re.compile("[\x00\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    """True when `text` holds an unpaired surrogate (Python joins real pairs into one character)."""
    return _SURROGATE.search(text) is not None


def json_problems(value: object, field: str, *, max_depth: int = MAX_DEPTH) -> list[Problem]:
    """Every kind of problem that keeps `value` from being stored and served back, at most once each.

    Walks iteratively, so a hostile depth cannot exhaust Python's stack while being checked."""
    found: dict[str, Problem] = {}
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            found.setdefault("depth", Problem(field, "depth", f"nested deeper than {max_depth} levels"))
            continue
        if isinstance(item, str):
            if has_surrogate(item):
                found.setdefault("text", Problem(field, "text", "holds text that is not valid Unicode "
                                                                "(an unpaired surrogate)"))
        elif isinstance(item, bool) or item is None or isinstance(item, int):
            pass
        elif isinstance(item, float):
            if not math.isfinite(item):
                found.setdefault("number", Problem(field, "type", "holds NaN or an infinity, which JSON cannot carry"))
        elif isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str):
                    found.setdefault("key", Problem(field, "type", "has an object key that is not a string"))
                elif has_surrogate(key):
                    found.setdefault("text", Problem(field, "text", "holds text that is not valid Unicode "
                                                                    "(an unpaired surrogate)"))
                stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        else:
            found.setdefault("type", Problem(field, "type", "holds a value that is not JSON "
                                                            "(only objects, arrays, strings, numbers, booleans "
                                                            "and null)"))
    return list(found.values())


def text_problems(value: str, field: str) -> list[Problem]:
    """What keeps a string from being stored in a text column and served back."""
    if "\x00" in value:
        return [Problem(field, "text", "must not contain NUL characters")]
    if has_surrogate(value):
        return [Problem(field, "text", "is not valid Unicode text (an unpaired surrogate)")]
    return []


def storable_text(text: str) -> str:
    """`text` with NUL and unpaired surrogates replaced by U+FFFD, so any database and any answer takes it."""
    return _NUL_OR_SURROGATE.sub(REPLACEMENT, text) if _NUL_OR_SURROGATE.search(text) else text


def storable_json(value: Any, *, max_depth: int = MAX_STORED_DEPTH) -> Any:
    """A copy of `value` that can be stored and served: surrogates replaced, NaN and infinities as null,
    non-string keys as strings, subtrees deeper than `max_depth` replaced by a marker string.

    NUL stays: inside a JSON value it is stored escaped. Returns `value` itself when nothing needed
    changing (the common case), so a clean output costs one walk and no copy."""
    return value if not json_problems(value, "", max_depth=max_depth) else _clean(value, 1, max_depth)


def _clean(value: Any, depth: int, max_depth: int) -> Any:
    # Recursion is bounded by max_depth, itself far below Python's recursion limit.
    if depth > max_depth:
        return TOO_DEEP_MARKER
    if isinstance(value, str):
        return _SURROGATE.sub(REPLACEMENT, value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, Mapping):
        return {_SURROGATE.sub(REPLACEMENT, str(key)): _clean(child, depth + 1, max_depth)
                for key, child in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(child, depth + 1, max_depth) for child in value]
    return _SURROGATE.sub(REPLACEMENT, repr(value))
