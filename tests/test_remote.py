"""Remote-forward requests and answers: golden bytes (docs/protocol.rst,
"Remote forwards") and the checks on every field, since the peer writes them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtproxy.config import ListenAllowance, RemoteForwardSpec
from virtproxy.remote import (
    LISTEN_FAILED,
    MAX_REQUEST,
    NOT_ALLOWED,
    OK,
    MalformedError,
    RemoteForwardClient,
    RemoteListenPolicy,
    Request,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    request_length,
)

# The examples in docs/protocol.rst, byte for byte.
GOLDEN_REQUEST = bytes.fromhex("56505246 01 09 3132372e302e302e31 1f90 03 776562")
GOLDEN_ANSWER_OK = bytes.fromhex("56505241 00 09 6c697374656e696e67")
GOLDEN_ANSWER_REFUSED = bytes.fromhex("56505241 01 00")


def test_golden_request() -> None:
    assert encode_request("127.0.0.1", 8080, "web") == GOLDEN_REQUEST
    assert decode_request(GOLDEN_REQUEST) == Request("127.0.0.1", 8080, "web")
    assert request_length(GOLDEN_REQUEST) == len(GOLDEN_REQUEST)
    assert request_length(GOLDEN_REQUEST[:5]) is None


def test_golden_answers() -> None:
    assert encode_answer(OK, "listening") == GOLDEN_ANSWER_OK
    assert decode_answer(GOLDEN_ANSWER_OK) == (OK, "listening")
    assert encode_answer(NOT_ALLOWED) == GOLDEN_ANSWER_REFUSED
    assert decode_answer(GOLDEN_ANSWER_REFUSED) == (NOT_ALLOWED, "")
    long = encode_answer(LISTEN_FAILED, "x" * 500)
    assert len(long) == 6 + 200 and decode_answer(long) == (LISTEN_FAILED, "x" * 200)


def test_ipv6_request_round_trips() -> None:
    data = encode_request("::1", 2222, "ssh.v2")
    assert decode_request(data) == Request("::1", 2222, "ssh.v2")


BAD = {
    "magic": b"XPRF" + GOLDEN_REQUEST[4:],
    "version": GOLDEN_REQUEST[:4] + b"\x02" + GOLDEN_REQUEST[5:],
    "address length 0": GOLDEN_REQUEST[:5] + b"\x00" + GOLDEN_REQUEST[6:],
    "hostname": encode_request("127.0.0.1", 1, "a").replace(b"127.0.0.1", b"localhost"),
    "port 0": GOLDEN_REQUEST[:15] + b"\x00\x00" + GOLDEN_REQUEST[17:],
    "name length 0": GOLDEN_REQUEST[:17] + b"\x00",
    "trailing byte": GOLDEN_REQUEST + b"x",
    "short name": GOLDEN_REQUEST[:-1],
    "bad name char": GOLDEN_REQUEST[:-1] + b"@",
    "reserved name": GOLDEN_REQUEST[:17] + b"\x0a..rforward",
    "non-ascii address": GOLDEN_REQUEST[:6] + b"\xff" * 9 + GOLDEN_REQUEST[15:],
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedError):
        decode_request(data)


@given(st.binary(max_size=MAX_REQUEST + 8))
def test_decode_request_only_ever_raises_malformed(data: bytes) -> None:
    try:
        request = decode_request(data)
    except MalformedError:
        return
    assert encode_request(request.host, request.port, request.name) == data


@given(st.binary(max_size=220))
def test_decode_answer_only_ever_raises_malformed(data: bytes) -> None:
    try:
        status, message = decode_answer(data)
    except MalformedError:
        return
    assert 0 <= status <= 255 and len(message.encode("utf-8", "replace")) <= 3 * 200


def test_allowance_matches_address_and_port_exactly() -> None:
    any_port = ListenAllowance("127.0.0.1", None, "127.0.0.1")
    one_port = ListenAllowance("::1", 8080, "[::1]:8080")
    assert any_port.allows("127.0.0.1", 1) and any_port.allows("127.0.0.1", 65535)
    assert not any_port.allows("127.0.0.2", 80)
    assert one_port.allows("::1", 8080) and not one_port.allows("::1", 8081)


# --------------------------------------------------------------------------- over a channel pair


def _world_with_policy(*allow: ListenAllowance) -> tuple[Any, RemoteListenPolicy]:
    from tests.test_protocol import make_world

    world = make_world()
    policy = RemoteListenPolicy(world.clock, allow)
    world.b.remote_handler = policy.handler
    return world, policy


SPEC = RemoteForwardSpec("echo", "127.0.0.1", 8080, "echo:127.0.0.1:8080")


def test_granted_request_listens_until_withdrawn() -> None:
    world, policy = _world_with_policy(ListenAllowance("127.0.0.1", None, "127.0.0.1"))
    client = RemoteForwardClient(world.a, SPEC)
    client.start()
    world.pipe.pump()
    assert client.state == "listening"
    port, factory, _backlog, interface = world.clock.tcpServers[-1]
    assert (port, interface) == (8080, "127.0.0.1")
    assert factory.channel is world.b and factory.service == "echo"
    (listener,) = policy.listeners.values()
    assert listener.port is not None

    client.stop()
    world.pipe.pump()
    assert policy.listeners == {} and listener.port is None
    assert world.a.session.streams == {} and world.b.session.streams == {}


def test_address_not_on_the_list_is_refused() -> None:
    world, policy = _world_with_policy(ListenAllowance("127.0.0.1", 9000, "127.0.0.1:9000"))
    client = RemoteForwardClient(world.a, SPEC)
    client.start()
    world.pipe.pump()
    assert client.state.startswith("refused: not allowed: 127.0.0.1:8080 is not in")
    assert world.clock.tcpServers == [] and policy.listeners == {}
    assert world.b.session.streams == {}  # answered, then EOF both ways


def test_no_allowance_refuses_the_open_and_the_requester_retries() -> None:
    world, _ = _world_with_policy()
    client = RemoteForwardClient(world.a, SPEC)
    client.start()
    world.pipe.pump()
    assert client.state == "rejected: no service: remote forwards not allowed"
    assert world.clock.tcpServers == []
    world.pipe.advance(1.5)  # the first retry comes after 1 s
    assert client.state.startswith("rejected") and client._delay == 4.0
