"""Tool-call parsing (Ollama-style) and vector helpers."""

from __future__ import annotations

import math

import pytest

from ollama_distributed.service.generation import l2_normalize, looks_like_tool_call, parse_tool_calls


@pytest.mark.parametrize("text, expected", [
    ('{"name": "f", "arguments": {"x": 1}}', [("f", {"x": 1})]),
    ('{"name": "f", "parameters": {"x": 1}}', [("f", {"x": 1})]),
    ('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"y": "z"}}]', [("f", {}), ("g", {"y": "z"})]),
    ('<tool_call>\n{"name": "f", "arguments": {"a": [1]}}\n</tool_call>', [("f", {"a": [1]})]),
    ('[TOOL_CALLS] [{"name": "f", "arguments": "{\\"q\\": 2}"}]', [("f", {"q": 2})]),
    ('{"function": {"name": "f", "arguments": {}}}', [("f", {})]),
])
def test_parse(text: str, expected: list) -> None:
    calls = parse_tool_calls(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == expected
    assert [c["function"]["index"] for c in calls] == list(range(len(expected)))
    assert all(c["id"].startswith("call_") and len(c["id"]) == 13 for c in calls)


@pytest.mark.parametrize("text", ["hello", '{"x": 1}', '{"name": 3, "arguments": {}}', "{broken", '["a"]', ""])
def test_not_tool_calls(text: str) -> None:
    assert parse_tool_calls(text) is None


def test_looks_like() -> None:
    assert looks_like_tool_call(" {") and looks_like_tool_call("<tool") and looks_like_tool_call("")
    assert not looks_like_tool_call("Hello")


def test_l2() -> None:
    v = l2_normalize([3.0, 4.0])
    assert v == [0.6, 0.8] and math.isclose(sum(x * x for x in v), 1.0)
    assert l2_normalize([0.0, 0.0]) == [0.0, 0.0]
