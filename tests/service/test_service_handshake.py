"""The /tunnel handshake rules, without sockets."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from iotunnel.mode import Mode
from service.handshake import (
    MAX_REQUEST,
    Admission,
    Candidate,
    HandshakeRequest,
    Refusal,
    check,
    choose_subprotocol,
    claim,
    cookie_values,
)
from service.registry import TunnelRegistry

SOURCE = "source-token-0123456789"
DESTINATION = "destination-token-0123456789"
CLIENT = "0b3c5a4e-1111-4222-8333-444455556666"
V1 = "aws.iot.securetunneling-1.0"
V2 = "aws.iot.securetunneling-2.0"
V3 = "aws.iot.securetunneling-3.0"


def registry() -> TunnelRegistry:
    reg = TunnelRegistry()
    reg.open_tunnel("t1", ["HTTP1", "SSH1"], SOURCE, DESTINATION)
    return reg


def request(
    target: str = "/tunnel?local-proxy-mode=source",
    *headers: tuple[str, str],
    token: str | None = SOURCE,
    protocols: str | None = V3,
) -> HandshakeRequest:
    base = [("Host", "localhost"), ("Upgrade", "websocket")]
    if protocols is not None:
        base.append(("Sec-WebSocket-Protocol", protocols))
    if token is not None:
        base.append(("access-token", token))
    return HandshakeRequest(target, [*base, *headers])


def admit(req: HandshakeRequest, reg: TunnelRegistry | None = None) -> Admission | Refusal:
    reg = reg or registry()
    outcome = check(req, reg)
    return outcome if isinstance(outcome, Refusal) else claim(outcome, reg)


@pytest.mark.parametrize(
    ("req", "status"),
    [
        (request("/"), HTTPStatus.NOT_FOUND),
        (request("/tunnels?local-proxy-mode=source"), HTTPStatus.NOT_FOUND),
        (request("/tunnel"), HTTPStatus.BAD_REQUEST),
        (request("/tunnel?local-proxy-mode=both"), HTTPStatus.BAD_REQUEST),
        (
            request("/tunnel?local-proxy-mode=source&local-proxy-mode=source"),
            HTTPStatus.BAD_REQUEST,
        ),
        (request(protocols=None), HTTPStatus.BAD_REQUEST),
        (request(protocols="aws.iot.securetunneling-4.0, chat"), HTTPStatus.BAD_REQUEST),
        (request(token=None), HTTPStatus.UNAUTHORIZED),
        (request(token=""), HTTPStatus.UNAUTHORIZED),
        (request("/tunnel?local-proxy-mode=source", ("access-token", SOURCE)), 400),
        (
            request("/tunnel?local-proxy-mode=source", ("Cookie", f"awsiot-tunnel-token={SOURCE}")),
            HTTPStatus.BAD_REQUEST,
        ),
        (request("/tunnel?local-proxy-mode=source", ("client-token", "short")), 400),
        (
            request(
                "/tunnel?local-proxy-mode=source",
                ("client-token", CLIENT),
                ("client-token", CLIENT),
            ),
            HTTPStatus.BAD_REQUEST,
        ),
        (request(token="unknown-token-0123456789"), HTTPStatus.FORBIDDEN),
        (request("/tunnel?local-proxy-mode=destination"), HTTPStatus.BAD_REQUEST),
        (
            request("/tunnel?local-proxy-mode=source", ("x-padding", "a" * MAX_REQUEST)),
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        ),
    ],
)
def test_refusals(req: HandshakeRequest, status: int) -> None:
    reg = registry()
    outcome = admit(req, reg)
    assert isinstance(outcome, Refusal)
    assert outcome.status == status
    assert SOURCE not in outcome.reason
    assert not reg.get("t1").source.used


def test_admission() -> None:
    outcome = admit(request(protocols=f"{V1}, {V3}"))
    assert outcome == Admission("t1", Mode.SOURCE, V3, 3, client_token=False)


def test_destination_with_cookie_and_client_token() -> None:
    req = HandshakeRequest(
        "/tunnel?local-proxy-mode=destination",
        [
            ("sec-websocket-protocol", V1),
            ("sec-websocket-protocol", V2),
            ("Cookie", f"theme=dark; awsiot-tunnel-token={DESTINATION}"),
            ("Client-Token", CLIENT),
        ],
    )
    assert admit(req) == Admission("t1", Mode.DESTINATION, V2, 2, client_token=True)


def test_closed_tunnel_is_gone() -> None:
    reg = registry()
    reg.close_tunnel("t1")
    outcome = admit(request(), reg)
    assert isinstance(outcome, Refusal)
    assert outcome.status == HTTPStatus.GONE
    assert outcome.tunnel_id == "t1"


def test_tunnel_closed_between_check_and_claim() -> None:
    reg = registry()
    candidate = check(request(), reg)
    assert isinstance(candidate, Candidate)
    reg.close_tunnel("t1")
    outcome = claim(candidate, reg)
    assert isinstance(outcome, Refusal)
    assert outcome.status == HTTPStatus.GONE


def test_check_does_not_spend_the_token() -> None:
    reg = registry()
    assert isinstance(check(request(), reg), Candidate)
    assert isinstance(check(request(), reg), Candidate)
    assert isinstance(admit(request(), reg), Admission)
    again = admit(request(), reg)
    assert isinstance(again, Refusal)
    assert again.status == HTTPStatus.FORBIDDEN


def test_client_token_reconnects() -> None:
    reg = registry()
    with_client = request("/tunnel?local-proxy-mode=source", ("client-token", CLIENT))
    assert isinstance(admit(with_client, reg), Admission)
    assert isinstance(admit(with_client, reg), Admission)
    other = request("/tunnel?local-proxy-mode=source", ("client-token", "f" * 32))
    for refused in (other, request()):
        outcome = admit(refused, reg)
        assert isinstance(outcome, Refusal)
        assert outcome.status == HTTPStatus.FORBIDDEN


def test_candidate_repr_hides_client_token() -> None:
    candidate = check(
        request("/tunnel?local-proxy-mode=source", ("client-token", CLIENT)), registry()
    )
    assert CLIENT not in repr(candidate)


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ([V1, V2, V3], V3),
        ([V3, V1], V3),
        ([V1, V2], V2),
        ([V1], V1),
        (["chat", V2], V2),
        (["chat"], None),
        ([], None),
    ],
)
def test_choose_subprotocol(offered: list[str], chosen: str | None) -> None:
    assert choose_subprotocol(offered) == chosen


def test_cookie_values() -> None:
    headers = ['a=1; awsiot-tunnel-token="x"', "awsiot-tunnel-token=y;b", "junk"]
    assert cookie_values(headers, "awsiot-tunnel-token") == ["x", "y"]


def test_request_size_counts_the_wire_bytes() -> None:
    req = HandshakeRequest("/tunnel", [("a", "bc")])
    assert req.size == len(b"GET /tunnel HTTP/1.1\r\na: bc\r\n\r\n")
