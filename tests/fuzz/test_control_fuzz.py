"""Fuzzing the control socket's request parser: whatever the bytes, a request object or a
ControlRequestError (whose text goes back to the client), and the server's answer to whatever
parses is one JSON line."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from warp.status import (
    MAX_REQUEST_DEPTH,
    ControlRequestError,
    ControlServer,
    parse_request,
)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=40,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def check(line: bytes) -> dict[str, Any] | None:
    try:
        request = parse_request(line)
    except ControlRequestError as exc:
        assert str(exc) and exc.reason in ("invalid", "too_deep", "too_long")
        return None
    assert isinstance(request, dict)
    return request


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_raise_a_request_error(data: bytes) -> None:
    check(data)
    check(b"[" * 5000 + data)


@settings(max_examples=1000, deadline=None)
@given(json_values, st.integers(0, 40), st.sampled_from(["[", '{"a":']))
def test_nesting_is_refused_beyond_the_limit_and_json_otherwise_parses(
    value: Any, extra: int, opener: str
) -> None:
    closer = "]" if opener == "[" else "}"
    wrapped = opener * extra + json.dumps(value) + closer * extra
    request = check(wrapped.encode())
    total = depth(value) + extra
    if total > MAX_REQUEST_DEPTH:
        assert request is None
    elif opener == '{"a":' and extra:
        assert request is not None
    elif isinstance(value, dict) and not extra:
        assert request == value


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='[]{}"\\ab', max_size=60))
def test_brackets_inside_strings_do_not_count_as_nesting(text: str) -> None:
    request = check(json.dumps({"cmd": "status", "note": text}).encode())
    assert request == {"cmd": "status", "note": text}


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.text(max_size=10))
def test_the_answer_to_any_request_is_one_json_line(request: dict[str, Any], cmd: str) -> None:
    server = ControlServer("/nonexistent/warp.sock", lambda: {"version": "x"})
    for candidate in (request, {**request, "cmd": cmd}, {**request, "cmd": "status"}):
        answer = server.respond(candidate)
        assert answer.endswith(b"\n") and answer.count(b"\n") == 1
        assert isinstance(json.loads(answer), dict)
