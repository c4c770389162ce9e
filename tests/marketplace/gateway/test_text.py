"""Streaming detokenization and stop strings, over a byte-level vocabulary where characters span tokens."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from marketplace.gateway.text import TextStream


def decode(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stops: Sequence[str] = ()) -> tuple[list[str], TextStream]:
    out = TextStream(decode, stops)
    pieces = [out.push(byte) for byte in text.encode()]
    pieces.append(out.flush())
    return pieces, out


@pytest.mark.parametrize("text", ["plain ascii", "naïve café", "漢字とかな", "emoji 🙂 and more 🚀!", ""])
def test_streamed_pieces_join_to_the_whole_decode(text: str) -> None:
    pieces, out = stream(text)
    assert "".join(pieces) == out.text == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_stop_string_ends_the_text_where_it_first_appears() -> None:
    pieces, out = stream("one two STOP three STOP", stops=["STOP"])
    assert "".join(pieces) == out.text == "one two "
    assert out.stopped
    assert out.push(ord("x")) == ""


def test_text_that_might_begin_a_stop_string_is_held_until_decided() -> None:
    out = TextStream(decode, ["<end>"])
    emitted = "".join(out.push(b) for b in b"ab<en")
    assert emitted == "ab"  # "<en" could still become "<end>"
    assert out.push(ord("x")) == "<enx"
    assert "".join(out.push(b) for b in "é<end>".encode()) == "é"
    assert out.stopped and out.text == "ab<enxé"


def test_the_earliest_of_several_stops_wins_and_the_tail_is_flushed() -> None:
    pieces, out = stream("xyz--abc##", stops=["##", "--"])
    assert out.text == "xyz"
    pieces, out = stream("held at the end <", stops=["<stop>"])
    assert "".join(pieces) == out.text == "held at the end <" and not out.stopped


@pytest.mark.parametrize("tail", [b"\xc3", b"\xe6\xbc", b"\xf0\x9f\x99"])
def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement(tail: bytes) -> None:
    """As the tokenizer's own decode gives it: the bytes were generated (and paid for), so the client sees them."""
    out = TextStream(decode)
    emitted = "".join(out.push(b) for b in b"ok " + tail)
    assert emitted == "ok "
    assert out.flush() == "\ufffd" * len(tail.decode("utf-8", errors="replace"))
    assert out.text == ("ok " + tail.decode("utf-8", errors="replace"))


def test_an_unfinished_character_can_still_complete_a_stop_string() -> None:
    out = TextStream(decode, ["x\ufffd"])
    assert "".join(out.push(b) for b in b"ax\xc3") == "a"
    assert out.flush() == "" and out.stopped and out.text == "a"
