"""JSON from strangers: nesting is measured before the parser recurses through it."""

from __future__ import annotations

import json

import pytest

from worker.jsontext import TooDeep, check_depth, loads


def test_documents_within_the_bound_parse_as_json_does() -> None:
    document = {"a": [1, {"b": '[[[{{{ " ]]] \\'}], "c": None, "d": "é\u2028"}
    text = json.dumps(document)
    assert loads(text) == loads(text.encode()) == document
    assert loads("[[[]]]", max_depth=3) == [[[]]]


@pytest.mark.parametrize(
    "text",
    ["[" * 4, '{"a": [[{"b": []}]]}', '[{"x": [1]}, [[2, [3]]]]'],
)
def test_nesting_past_the_bound_is_refused(text: str) -> None:
    with pytest.raises(TooDeep):
        loads(text, max_depth=3)


def test_brackets_inside_strings_do_not_count() -> None:
    check_depth(json.dumps(["[" * 10_000, "{" * 10_000, '\\"[[['], separators=(",", ":")).encode(), 2)


def test_a_deep_document_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(TooDeep):
        loads(b"[" * 2_000_000)  # malformed too: the depth is what is reported
    with pytest.raises(ValueError):
        loads(b"[]" * 1_000)  # shallow, malformed: the parser's own error
