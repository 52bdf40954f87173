"""The engine protocol's framing (proxy.ground.wire): pure functions, so every input is tried
(hypothesis) and none may raise anything but WireError, the error the engine answers."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.ground.wire import (
    MAX_PAYLOAD,
    WireError,
    decode_argv,
    decode_reply,
    encode_argv,
    encode_reply,
    frame,
    unframe,
)

# Arguments as a command line holds them: any bytes but NUL, read with surrogateescape.
args = st.lists(st.binary().filter(lambda b: b"\0" not in b).map(os.fsdecode), max_size=20)


@given(st.binary(max_size=200))
def test_unframe_of_any_bytes_is_a_payload_none_or_wire_error(data: bytes) -> None:
    try:
        result = unframe(data)
    except WireError:
        return
    assert result is None or isinstance(result, bytes)


@given(st.binary(max_size=2000), st.binary(max_size=20))
def test_a_frame_comes_back_whole_and_its_prefixes_ask_for_more(payload: bytes, after: bytes) -> None:
    framed = frame(payload)
    assert unframe(framed + after) == payload
    for cut in range(len(framed)):
        assert unframe(framed[:cut]) is None  # a partial frame is never an error


@pytest.mark.parametrize("data", [
    b"junk\n", b"-3\nabc", b"5_0\n" + b"x" * 50, b" 5\nhello", b"+5\nhello", b"\xff\n",
    b"9" * 5000 + b"\n", b"9" * 5000, b"65537\n", b"0x10\n", b"\n", b"1" * 7,
])
def test_malformed_lengths_are_refused_at_once(data: bytes) -> None:
    with pytest.raises(WireError, match="frame length"):
        unframe(data)


def test_the_length_is_bounded() -> None:
    assert unframe(b"%d\n" % MAX_PAYLOAD) is None  # the largest allowed: wait for it
    with pytest.raises(WireError):
        frame(b"x" * (MAX_PAYLOAD + 1))


@given(args)
def test_argv_round_trips(argv: list[str]) -> None:
    assert decode_argv(encode_argv(argv)) == argv


def test_empty_arguments_survive() -> None:
    assert decode_argv(encode_argv([""])) == [""]
    assert decode_argv(encode_argv([])) == []


@given(st.binary(max_size=200))
def test_decode_argv_of_any_bytes_is_an_argv_or_wire_error(data: bytes) -> None:
    try:
        argv = decode_argv(data)
    except WireError:
        return
    assert encode_argv(argv) == data


@given(st.lists(st.text(max_size=10), max_size=5))
def test_encode_argv_of_any_text_is_bytes_or_wire_error(argv: list[str]) -> None:
    try:
        assert isinstance(encode_argv(argv), bytes)
    except WireError:
        pass


@given(st.sampled_from([0, 1, 2]), st.text(max_size=200))
def test_replies_round_trip(status: int, body: str) -> None:
    payload = unframe(encode_reply(status, body))
    assert payload is not None
    code, text = decode_reply(payload)
    assert code == status
    assert text == body.encode(errors="backslashreplace").decode()


def test_a_reply_quoting_a_non_utf8_argument_is_still_sent() -> None:
    body = "argument -container-port: invalid value " + os.fsdecode(b"\xff")
    assert decode_reply(unframe(encode_reply(2, body)) or b"")[1].endswith("\\udcff")


@given(st.binary(max_size=200))
def test_decode_reply_of_any_bytes_is_a_reply_or_wire_error(data: bytes) -> None:
    try:
        code, body = decode_reply(data)
    except WireError:
        return
    assert code in (0, 1, 2) and isinstance(body, str)


@given(st.integers())
def test_only_three_statuses_exist(status: int) -> None:
    if status in (0, 1, 2):
        assert encode_reply(status, "")
    else:
        with pytest.raises(WireError):
            encode_reply(status, "")
