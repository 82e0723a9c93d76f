"""StopMatcher: stop strings across token boundaries, held-back prefixes, trimming."""

from __future__ import annotations

import pytest

from ollama_distributed.model.stop import StopMatcher


def _run(stops, pieces):
    m = StopMatcher(stops)
    out = []
    stopped = False
    for p in pieces:
        text, stopped = m.push(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return out, stopped


def test_stop_spanning_tokens_is_trimmed():
    out, stopped = _run(["<|end|>"], ["Hello", " wor", "ld<|", "en", "d|>", "more"])
    assert stopped and "".join(out) == "Hello world"
    # "<|" and "<|en" were held back, never emitted
    assert out == ["Hello", " wor", "ld", "", ""]


def test_false_prefix_is_released():
    out, stopped = _run(["STOP"], ["a S", "T", "x", "y"])
    assert not stopped and "".join(out) == "a STxy"
    assert out[:2] == ["a ", ""]  # "S", then "ST" held while it could still become STOP


def test_earliest_of_several_stops_wins_and_text_before_is_kept():
    m = StopMatcher(["\n\n", "User:"])
    text, stopped = m.push("answer User: q\n\nrest")
    assert stopped and text == "answer " and m.matched == "User:"
    assert m.push("more") == ("", True)


def test_unfinished_prefix_flushed_at_end():
    m = StopMatcher(["###"])
    assert m.push("abc#") == ("abc", False)
    assert m.push("#") == ("", False)
    assert m.flush() == "##"


@pytest.mark.parametrize("stops", [[], [""]])
def test_no_stops_passes_everything(stops):
    m = StopMatcher(stops)
    assert m.push("a<|x") == ("a<|x", False)
    assert m.flush() == ""


def test_stop_inside_one_piece_and_at_start():
    assert StopMatcher(["x"]).push("x tail") == ("", True)
    assert StopMatcher(["lo w"]).push("hello world") == ("hel", True)
