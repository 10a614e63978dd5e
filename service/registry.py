"""The tunnels the service knows: ids, services, access tokens, lifetimes and connection states.

No I/O of its own. :class:`TunnelRegistry` keeps every tunnel in memory, indexed by id and by
access token; with a :class:`TunnelStore` (``service.store.SqliteStore``) under it, every
mutation is written through, so that a restarted service finds its tunnels again. Every
mutation goes through a registry method for that reason.

Access and client tokens are kept only as SHA-256 digests: a token is a 384-bit random string,
so its digest identifies it without a salt, and neither memory dumps nor the state file hold a
usable token.

Field names in :class:`InvalidTunnel` errors are the AWS API's (``tunnelId``, ``services``,
``sourceAccessToken``, ``destinationAccessToken``), so callers can report them as they are.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from iotunnel.mode import Mode
from iotunnel.rules import NAME_MAX, NAME_RE
from service.clock import Clock, SystemClock

#: Tunnel ids: the AWS API's pattern (AWS issues UUIDs; a tunnels file may use names).
TUNNEL_ID_RE = re.compile(r"[a-zA-Z0-9_\-+=:]{1,128}")
#: Access tokens travel in an HTTP header or a cookie: printable ASCII without separators.
#: At least 16 characters, so that a hand-written tunnels file cannot hold a guessable token.
ACCESS_TOKEN_RE = re.compile(r"[!#-+\--:<-~]{16,4096}")


def digest(secret: str) -> str:
    """The SHA-256 digest (hex) under which a token is kept."""
    return hashlib.sha256(secret.encode()).hexdigest()


class TunnelStatus(enum.StrEnum):
    """A tunnel's status, with the AWS API's names."""

    OPEN = "OPEN"
    CLOSED = "CLOSED"


class Claim(enum.Enum):
    """Outcome of presenting an access token (and maybe a client token) in a handshake."""

    ACCEPTED = enum.auto()  #: first use, or a reconnect with the bound client token
    TOKEN_USED = enum.auto()  #: used before without a client token: single-use
    CLIENT_TOKEN_MISMATCH = enum.auto()  #: bound to a client token that was not presented


class InvalidTunnel(ValueError):
    """A tunnel definition was refused; ``field`` names the offending API field."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class UnknownTunnel(KeyError):
    """No tunnel has this id."""


@dataclass(frozen=True, slots=True)
class ServiceIdRule:
    """What a service id may look like (AWS: ``[a-zA-Z0-9:_-]+``, at most 128 characters)."""

    pattern: re.Pattern[str] = NAME_RE
    max_length: int = NAME_MAX

    def problem(self, service_id: str) -> str | None:
        """Why ``service_id`` is not acceptable, or None."""
        if not 1 <= len(service_id) <= self.max_length:
            return f"must be 1 to {self.max_length} characters long"
        if not self.pattern.fullmatch(service_id):
            return f"must match {self.pattern.pattern}"
        return None


@dataclass(slots=True)
class Grant:
    """One client access token (by digest) and the connections it has admitted.

    Without a client token an access token is single-use. The first connection that presents a
    client token binds it: later connections are admitted only with that same client token.
    """

    token_digest: str = field(repr=False)
    client_digest: str | None = field(default=None, repr=False)
    used: bool = False

    @classmethod
    def for_token(cls, access_token: str) -> Grant:
        """A fresh grant for ``access_token``."""
        return cls(digest(access_token))

    def matches(self, access_token: str) -> bool:
        """Whether ``access_token`` is this grant's token."""
        return hmac.compare_digest(self.token_digest, digest(access_token))

    def claim(self, client_token: str | None) -> Claim:
        """Decide whether a connection with ``client_token`` may use this grant; record it."""
        if self.used:
            if self.client_digest is None:
                return Claim.TOKEN_USED
            if client_token is not None and hmac.compare_digest(
                self.client_digest, digest(client_token)
            ):
                return Claim.ACCEPTED
            return Claim.CLIENT_TOKEN_MISMATCH
        self.used = True
        self.client_digest = None if client_token is None else digest(client_token)
        return Claim.ACCEPTED


@dataclass(slots=True)
class ConnectionState:
    """Whether a peer of one mode is connected, and since when (``lastUpdatedAt``)."""

    connected: bool = False
    updated_at: float = 0.0


@dataclass(slots=True)
class Tunnel:
    """One tunnel: its services, its two grants, its status and what the API reports of it."""

    tunnel_id: str
    services: tuple[str, ...]
    source: Grant
    destination: Grant
    status: TunnelStatus = TunnelStatus.OPEN
    description: str | None = None
    #: ``destinationConfig.thingName``: where notifications go
    thing_name: str | None = None
    #: ``timeoutConfig.maxLifetimeTimeoutMinutes``; None for tunnels that never expire
    lifetime_minutes: int | None = None
    #: when the lifetime ends (epoch seconds), or None
    expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    closed_at: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    source_state: ConnectionState = field(default_factory=ConnectionState)
    destination_state: ConnectionState = field(default_factory=ConnectionState)
    #: declared in the tunnels file (not opened through the API)
    static: bool = False

    def grant(self, mode: Mode) -> Grant:
        """The grant of the ``mode`` end."""
        return self.source if mode is Mode.SOURCE else self.destination

    def state(self, mode: Mode) -> ConnectionState:
        """The connection state of the ``mode`` end."""
        return self.source_state if mode is Mode.SOURCE else self.destination_state

    @property
    def is_open(self) -> bool:
        """Whether clients may still connect."""
        return self.status is TunnelStatus.OPEN


class TunnelStore(Protocol):
    """Where a registry keeps its tunnels across restarts."""

    def load(self) -> list[Tunnel]:
        """Every stored tunnel."""
        ...

    def save(self, tunnel: Tunnel) -> None:
        """Insert or replace ``tunnel``; durable when this returns."""
        ...

    def delete(self, tunnel_id: str) -> None:
        """Forget a tunnel (no error if unknown)."""
        ...


class TunnelRegistry:
    """Registry of tunnels, indexed by id and by access token digest.

    Closed tunnels stay registered (with their token digests) until deleted, so that a late
    connection learns that its tunnel is closed rather than that its token is unknown.

    Args:
        store: where to write every change (and load from, now); None keeps memory only.
        clock: the time source of ``createdAt``/``lastUpdatedAt`` and the like.
        service_ids: the rule every service id must follow.
    """

    def __init__(
        self,
        store: TunnelStore | None = None,
        *,
        clock: Clock | None = None,
        service_ids: ServiceIdRule | None = None,
    ) -> None:
        self._store = store
        self.clock: Clock = clock or SystemClock()
        self.service_ids = service_ids or ServiceIdRule()
        self._tunnels: dict[str, Tunnel] = {}
        self._by_token: dict[str, tuple[Tunnel, Mode]] = {}
        if store is not None:
            now = self.clock.now()
            for tunnel in store.load():
                for mode in Mode:
                    state = tunnel.state(mode)
                    if state.connected:  # the service stopped without recording it
                        state.connected = False
                        state.updated_at = now
                self._index(tunnel)

    # ------------------------------------------------------------------ queries

    def get(self, tunnel_id: str) -> Tunnel:
        """The tunnel with this id.

        Raises:
            UnknownTunnel: no such tunnel.
        """
        try:
            return self._tunnels[tunnel_id]
        except KeyError:
            raise UnknownTunnel(tunnel_id) from None

    def find(self, tunnel_id: str) -> Tunnel | None:
        """The tunnel with this id, if any."""
        return self._tunnels.get(tunnel_id)

    def lookup(self, access_token: str) -> tuple[Tunnel, Mode] | None:
        """The tunnel and end an access token belongs to, if any."""
        return self._by_token.get(digest(access_token))

    def lookup_digest(self, token_digest: str) -> tuple[Tunnel, Mode] | None:
        """The tunnel and end of the access token with this digest, if any."""
        return self._by_token.get(token_digest)

    def open_count(self) -> int:
        """How many tunnels are open."""
        return sum(1 for t in self._tunnels.values() if t.is_open)

    def expired(self, now: float) -> list[Tunnel]:
        """Open tunnels whose lifetime ended at or before ``now``."""
        return [
            t
            for t in self._tunnels.values()
            if t.is_open and t.expires_at is not None and t.expires_at <= now
        ]

    def closed_before(self, when: float) -> list[Tunnel]:
        """Closed tunnels that were closed at or before ``when``."""
        return [
            t
            for t in self._tunnels.values()
            if not t.is_open and t.closed_at is not None and t.closed_at <= when
        ]

    def next_deadline(self, retention: float) -> float | None:
        """The earliest time at which a tunnel expires or a closed one is due for removal."""
        times: list[float] = []
        for tunnel in self._tunnels.values():
            if tunnel.is_open and tunnel.expires_at is not None:
                times.append(tunnel.expires_at)
            elif not tunnel.is_open and tunnel.closed_at is not None:
                times.append(tunnel.closed_at + retention)
        return min(times, default=None)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._tunnels.values()))

    def __len__(self) -> int:
        return len(self._tunnels)

    # ------------------------------------------------------------------ mutations

    def open_tunnel(
        self,
        tunnel_id: str,
        services: Iterable[str],
        source_token: str,
        destination_token: str,
        *,
        description: str | None = None,
        thing_name: str | None = None,
        lifetime_minutes: int | None = None,
        expires_at: float | None = None,
        tags: Mapping[str, str] | None = None,
        static: bool = False,
    ) -> Tunnel:
        """Register a new open tunnel.

        Raises:
            InvalidTunnel: a malformed or duplicate id, service or token.
        """
        if not TUNNEL_ID_RE.fullmatch(tunnel_id):
            raise InvalidTunnel("tunnelId", f"must match {TUNNEL_ID_RE.pattern}")
        if tunnel_id in self._tunnels:
            raise InvalidTunnel("tunnelId", f"tunnel {tunnel_id!r} already exists")
        service_ids = tuple(services)
        for index, service_id in enumerate(service_ids):
            problem = self.service_ids.problem(service_id)
            if problem is not None:
                raise InvalidTunnel(f"services[{index}]", problem)
        if len(set(service_ids)) != len(service_ids):
            raise InvalidTunnel("services", "service ids must be unique")
        for name, token in (
            ("sourceAccessToken", source_token),
            ("destinationAccessToken", destination_token),
        ):
            self._check_token(name, token)
        if source_token == destination_token:
            raise InvalidTunnel("destinationAccessToken", "must differ from sourceAccessToken")
        now = self.clock.now()
        tunnel = Tunnel(
            tunnel_id,
            service_ids,
            Grant.for_token(source_token),
            Grant.for_token(destination_token),
            description=description,
            thing_name=thing_name,
            lifetime_minutes=lifetime_minutes,
            expires_at=expires_at,
            created_at=now,
            updated_at=now,
            tags=dict(tags or {}),
            source_state=ConnectionState(False, now),
            destination_state=ConnectionState(False, now),
            static=static,
        )
        self._index(tunnel)
        self._save(tunnel)
        return tunnel

    def close_tunnel(self, tunnel_id: str) -> Tunnel:
        """Mark a tunnel closed (closing a closed tunnel is not an error).

        Raises:
            UnknownTunnel: no such tunnel.
        """
        tunnel = self.get(tunnel_id)
        if tunnel.is_open:
            now = self.clock.now()
            tunnel.status = TunnelStatus.CLOSED
            tunnel.closed_at = now
            tunnel.updated_at = now
            self._save(tunnel)
        return tunnel

    def delete_tunnel(self, tunnel_id: str) -> None:
        """Forget a tunnel and its tokens.

        Raises:
            UnknownTunnel: no such tunnel.
        """
        tunnel = self._tunnels.pop(tunnel_id, None)
        if tunnel is None:
            raise UnknownTunnel(tunnel_id)
        for mode in Mode:
            self._by_token.pop(tunnel.grant(mode).token_digest, None)
        if self._store is not None:
            self._store.delete(tunnel_id)

    def rotate(self, tunnel_id: str, mode: Mode, access_token: str) -> None:
        """Replace the access token of the ``mode`` end; the old one is unknown from now on.

        Raises:
            UnknownTunnel: no such tunnel.
            InvalidTunnel: a malformed or duplicate token.
        """
        tunnel = self.get(tunnel_id)
        field_name = "sourceAccessToken" if mode is Mode.SOURCE else "destinationAccessToken"
        self._check_token(field_name, access_token)
        old = tunnel.grant(mode)
        self._by_token.pop(old.token_digest, None)
        grant = Grant.for_token(access_token)
        if mode is Mode.SOURCE:
            tunnel.source = grant
        else:
            tunnel.destination = grant
        self._by_token[grant.token_digest] = (tunnel, mode)
        tunnel.updated_at = self.clock.now()
        self._save(tunnel)

    def claim(self, tunnel_id: str, mode: Mode, client_token: str | None) -> Claim:
        """Let a handshake use the ``mode`` grant of a tunnel (see :meth:`Grant.claim`)."""
        tunnel = self.get(tunnel_id)
        grant = tunnel.grant(mode)
        before = (grant.used, grant.client_digest)
        outcome = grant.claim(client_token)
        if (grant.used, grant.client_digest) != before:
            self._save(tunnel)
        return outcome

    def set_connected(self, tunnel_id: str, mode: Mode, connected: bool) -> None:
        """Record whether a ``mode`` peer is connected (no-op for an unknown tunnel)."""
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            return
        state = tunnel.state(mode)
        if state.connected is not connected:
            state.connected = connected
            state.updated_at = self.clock.now()
            self._save(tunnel)

    def set_thing_name(self, tunnel_id: str, thing_name: str) -> None:
        """Change where the tunnel's notifications go."""
        tunnel = self.get(tunnel_id)
        if tunnel.thing_name != thing_name:
            tunnel.thing_name = thing_name
            tunnel.updated_at = self.clock.now()
            self._save(tunnel)

    def tag(self, tunnel_id: str, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags."""
        tunnel = self.get(tunnel_id)
        tunnel.tags.update(tags)
        tunnel.updated_at = self.clock.now()
        self._save(tunnel)

    def untag(self, tunnel_id: str, keys: Iterable[str]) -> None:
        """Remove tags (unknown keys are ignored)."""
        tunnel = self.get(tunnel_id)
        for key in keys:
            tunnel.tags.pop(key, None)
        tunnel.updated_at = self.clock.now()
        self._save(tunnel)

    # ------------------------------------------------------------------ internals

    def _check_token(self, name: str, token: str) -> None:
        if not ACCESS_TOKEN_RE.fullmatch(token):
            raise InvalidTunnel(
                name,
                "must be 16 to 4096 printable ASCII characters, "
                "without quotes, commas or semicolons",
            )
        if digest(token) in self._by_token:
            raise InvalidTunnel(name, "already used by another tunnel")

    def _index(self, tunnel: Tunnel) -> None:
        self._tunnels[tunnel.tunnel_id] = tunnel
        self._by_token[tunnel.source.token_digest] = (tunnel, Mode.SOURCE)
        self._by_token[tunnel.destination.token_digest] = (tunnel, Mode.DESTINATION)

    def _save(self, tunnel: Tunnel) -> None:
        if self._store is not None:
            self._store.save(tunnel)
