"""The tunnel registry and the access/client token rules, without sockets."""

from __future__ import annotations

import pytest

from service.registry import (
    Claim,
    Grant,
    InvalidTunnel,
    Mode,
    TunnelRegistry,
    TunnelStatus,
    UnknownTunnel,
)

SOURCE = "source-token-0123456789"
DESTINATION = "destination-token-0123456789"
CLIENT_A = "a" * 32
CLIENT_B = "b" * 32


def make() -> TunnelRegistry:
    registry = TunnelRegistry()
    registry.open_tunnel("t1", ["HTTP1", "SSH1"], SOURCE, DESTINATION)
    return registry


def test_lookup_by_token_and_id() -> None:
    registry = make()
    tunnel = registry.get("t1")
    assert tunnel.services == ("HTTP1", "SSH1")
    assert tunnel.status is TunnelStatus.OPEN
    assert registry.lookup(SOURCE) == (tunnel, Mode.SOURCE)
    assert registry.lookup(DESTINATION) == (tunnel, Mode.DESTINATION)
    assert registry.lookup("unknown-token-0123456789") is None
    assert list(registry) == [tunnel]
    assert len(registry) == 1


def test_close_keeps_tokens_known() -> None:
    registry = make()
    registry.close_tunnel("t1")
    registry.close_tunnel("t1")
    found = registry.lookup(SOURCE)
    assert found is not None
    assert not found[0].is_open
    with pytest.raises(UnknownTunnel):
        registry.close_tunnel("t2")
    with pytest.raises(UnknownTunnel):
        registry.get("t2")


def test_tokens_not_in_repr() -> None:
    registry = make()
    registry.claim("t1", Mode.SOURCE, CLIENT_A)
    text = repr(registry.get("t1"))
    assert SOURCE not in text
    assert DESTINATION not in text
    assert CLIENT_A not in text


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("bad id!", ["S"], "s" * 16, "d" * 16), "tunnelId"),
        (("t1", ["S"], "s" * 16, "d" * 16), "tunnelId"),
        (("t2", ["S", "bad id"], "s" * 16, "d" * 16), "services[1]"),
        (("t2", ["S", "S"], "s" * 16, "d" * 16), "services"),
        (("t2", ["S"], "short", "d" * 16), "sourceAccessToken"),
        (("t2", ["S"], "s" * 16, "has space in it!"), "destinationAccessToken"),
        (("t2", ["S"], "s" * 16, "semi;colon;token;"), "destinationAccessToken"),
        (("t2", ["S"], SOURCE, "d" * 16), "sourceAccessToken"),
        (("t2", ["S"], "s" * 16, "s" * 16), "destinationAccessToken"),
    ],
)
def test_invalid_tunnels(args: tuple[str, list[str], str, str], field: str) -> None:
    registry = make()
    with pytest.raises(InvalidTunnel) as info:
        registry.open_tunnel(*args)
    assert info.value.field == field
    assert len(registry) == 1


def test_tunnel_without_services() -> None:
    registry = TunnelRegistry()
    assert registry.open_tunnel("v1", [], "s" * 16, "d" * 16).services == ()


def test_single_use_without_client_token() -> None:
    grant = Grant(SOURCE)
    assert grant.claim(None) is Claim.ACCEPTED
    assert grant.claim(None) is Claim.TOKEN_USED
    assert grant.claim(CLIENT_A) is Claim.TOKEN_USED


def test_client_token_binds() -> None:
    grant = Grant(SOURCE)
    assert grant.claim(CLIENT_A) is Claim.ACCEPTED
    assert grant.claim(CLIENT_A) is Claim.ACCEPTED
    assert grant.claim(CLIENT_B) is Claim.CLIENT_TOKEN_MISMATCH
    assert grant.claim(None) is Claim.CLIENT_TOKEN_MISMATCH


def test_claims_are_per_mode() -> None:
    registry = make()
    assert registry.claim("t1", Mode.SOURCE, None) is Claim.ACCEPTED
    assert registry.claim("t1", Mode.DESTINATION, None) is Claim.ACCEPTED
    assert registry.claim("t1", Mode.SOURCE, None) is Claim.TOKEN_USED


def test_mode_other() -> None:
    assert Mode.SOURCE.other is Mode.DESTINATION
    assert Mode.DESTINATION.other is Mode.SOURCE
