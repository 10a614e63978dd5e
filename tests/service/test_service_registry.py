"""The tunnel registry and the access/client token rules, without sockets."""

from __future__ import annotations

import pytest

from iotunnel.mode import Mode
from service.registry import (
    Claim,
    Grant,
    InvalidTunnel,
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
    grant = Grant.for_token(SOURCE)
    assert grant.claim(None) is Claim.ACCEPTED
    assert grant.claim(None) is Claim.TOKEN_USED
    assert grant.claim(CLIENT_A) is Claim.TOKEN_USED


def test_client_token_binds() -> None:
    grant = Grant.for_token(SOURCE)
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


def test_grant_keeps_digests_only() -> None:
    grant = Grant.for_token(SOURCE)
    grant.claim(CLIENT_A)
    assert SOURCE not in (grant.token_digest, grant.client_digest)
    assert CLIENT_A not in (grant.token_digest, grant.client_digest)
    assert grant.matches(SOURCE)
    assert not grant.matches(DESTINATION)


def test_rotate_replaces_one_token() -> None:
    registry = make()
    tunnel = registry.get("t1")
    registry.claim("t1", Mode.SOURCE, None)
    registry.rotate("t1", Mode.SOURCE, "new-source-token-0123456789")
    assert registry.lookup(SOURCE) is None
    assert registry.lookup("new-source-token-0123456789") == (tunnel, Mode.SOURCE)
    assert registry.claim("t1", Mode.SOURCE, None) is Claim.ACCEPTED  # a fresh grant
    assert registry.lookup(DESTINATION) == (tunnel, Mode.DESTINATION)
    with pytest.raises(InvalidTunnel) as info:
        registry.rotate("t1", Mode.DESTINATION, "new-source-token-0123456789")
    assert info.value.field == "destinationAccessToken"
    with pytest.raises(UnknownTunnel):
        registry.rotate("t2", Mode.SOURCE, "another-token-0123456789")


def test_delete_forgets_tunnel_and_tokens() -> None:
    registry = make()
    registry.delete_tunnel("t1")
    assert registry.find("t1") is None
    assert registry.lookup(SOURCE) is None
    with pytest.raises(UnknownTunnel):
        registry.delete_tunnel("t1")
    registry.open_tunnel("t1", ["S"], SOURCE, DESTINATION)  # id and tokens are free again


def test_connection_state_changes_only_on_change() -> None:
    from service.clock import ManualClock

    clock = ManualClock()
    registry = TunnelRegistry(clock=clock)
    tunnel = registry.open_tunnel("t1", ["S"], SOURCE, DESTINATION)
    assert tunnel.source_state.updated_at == clock.now()
    clock.advance(5)
    registry.set_connected("t1", Mode.SOURCE, True)
    assert (tunnel.source_state.connected, tunnel.source_state.updated_at) == (True, clock.now())
    clock.advance(5)
    registry.set_connected("t1", Mode.SOURCE, True)
    assert tunnel.source_state.updated_at == clock.now() - 5
    registry.set_connected("unknown", Mode.SOURCE, True)  # no error


def test_service_id_rule_is_configurable() -> None:
    import re

    from service.registry import ServiceIdRule

    registry = TunnelRegistry(service_ids=ServiceIdRule(re.compile(r"[A-Z]+"), 4))
    registry.open_tunnel("t1", ["SSH", "HTTP"], SOURCE, DESTINATION)
    for bad, detail in (("ssh", "must match [A-Z]+"), ("HTTPS", "must be 1 to 4 characters long")):
        with pytest.raises(InvalidTunnel) as info:
            registry.open_tunnel("t2", [bad], "s" * 16, "d" * 16)
        assert info.value.detail == detail
