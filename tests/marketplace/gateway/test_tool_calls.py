"""Reading tool calls out of a model's text: Hermes ``<tool_call>`` blocks when the model chose to call, the
whole text when a grammar forced the call."""

from __future__ import annotations

import json

from marketplace.gateway.api.responses import parse_tool_calls

NAMES = ["get_weather", "get_time"]


def test_blocks_become_calls_with_their_arguments_as_json_text() -> None:
    text = (
        'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    calls = parse_tool_calls(text, NAMES, forced=False)
    assert [call["function"]["name"] for call in calls] == NAMES
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert all(call["type"] == "function" and call["id"].startswith("call_") for call in calls)
    assert len({call["id"] for call in calls}) == 2


def test_a_block_that_is_not_a_call_to_a_known_tool_stays_text() -> None:
    for block in (
        "not json",
        '{"name": "rm_rf", "arguments": {}}',  # not among the tools
        '{"name": "get_time", "arguments": "now"}',  # arguments not an object
        '["get_time"]',
    ):
        assert parse_tool_calls(f"<tool_call>{block}</tool_call>", NAMES, forced=False) == []


def test_a_forced_call_is_the_whole_text() -> None:
    [call] = parse_tool_calls('{"name":"get_time","arguments":{"zone":"utc"}}', NAMES, forced=True)
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "utc"}'}
    # Cut off by max_tokens: no call, the text is returned as it is.
    assert parse_tool_calls('{"name":"get_time","argu', NAMES, forced=True) == []
