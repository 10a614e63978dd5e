"""The tunnels the service knows: ids, services, access tokens and what each token was used for.

Pure state, no I/O. :class:`TunnelRegistry` keeps everything in memory; the management plane can
back the same interface with a database. Every mutation goes through a registry method, so a
persistent implementation only has to override those.

Field names in :class:`InvalidTunnel` errors are the AWS API's (``tunnelId``, ``services``,
``sourceAccessToken``, ``destinationAccessToken``), so callers can report them as they are.
"""

from __future__ import annotations

import enum
import hmac
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from proxy.protocol.messages import SERVICE_ID_RE

#: Tunnel ids: what AWS issues (a UUID) and what a hand-written tunnels file is likely to use.
TUNNEL_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")
#: Access tokens travel in an HTTP header or a cookie: printable ASCII without separators.
#: At least 16 characters, so that a hand-written tunnels file cannot hold a guessable token.
ACCESS_TOKEN_RE = re.compile(r"[!#-+\--:<-~]{16,4096}")


class Mode(enum.StrEnum):
    """Which end of a tunnel a client connects as (``local-proxy-mode``)."""

    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def other(self) -> Mode:
        """The opposite end."""
        return Mode.DESTINATION if self is Mode.SOURCE else Mode.SOURCE


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


@dataclass(slots=True)
class Grant:
    """One client access token and the connections it has admitted.

    Without a client token an access token is single-use. The first connection that presents a
    client token binds it: later connections are admitted only with that same client token.
    """

    access_token: str = field(repr=False)
    client_token: str | None = field(default=None, repr=False)
    used: bool = False

    def claim(self, client_token: str | None) -> Claim:
        """Decide whether a connection with ``client_token`` may use this grant; record it."""
        if self.used:
            if self.client_token is None:
                return Claim.TOKEN_USED
            if client_token is not None and hmac.compare_digest(
                self.client_token.encode(), client_token.encode()
            ):
                return Claim.ACCEPTED
            return Claim.CLIENT_TOKEN_MISMATCH
        self.used = True
        self.client_token = client_token
        return Claim.ACCEPTED


@dataclass(slots=True)
class Tunnel:
    """One tunnel: its services, its two grants and its status."""

    tunnel_id: str
    services: tuple[str, ...]
    source: Grant
    destination: Grant
    status: TunnelStatus = TunnelStatus.OPEN

    def grant(self, mode: Mode) -> Grant:
        """The grant of the ``mode`` end."""
        return self.source if mode is Mode.SOURCE else self.destination

    @property
    def is_open(self) -> bool:
        """Whether clients may still connect."""
        return self.status is TunnelStatus.OPEN


class TunnelRegistry:
    """In-memory registry of tunnels, indexed by id and by access token.

    Closed tunnels stay registered (with their tokens), so that a late connection learns that
    its tunnel is closed rather than that its token is unknown.
    """

    def __init__(self) -> None:
        self._tunnels: dict[str, Tunnel] = {}
        self._by_token: dict[str, tuple[Tunnel, Mode]] = {}

    def open_tunnel(
        self,
        tunnel_id: str,
        services: Iterable[str],
        source_token: str,
        destination_token: str,
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
            if not SERVICE_ID_RE.fullmatch(service_id):
                raise InvalidTunnel(f"services[{index}]", f"must match {SERVICE_ID_RE.pattern}")
        if len(set(service_ids)) != len(service_ids):
            raise InvalidTunnel("services", "service ids must be unique")
        for name, token in (
            ("sourceAccessToken", source_token),
            ("destinationAccessToken", destination_token),
        ):
            if not ACCESS_TOKEN_RE.fullmatch(token):
                raise InvalidTunnel(
                    name,
                    "must be 16 to 4096 printable ASCII characters, "
                    "without quotes, commas or semicolons",
                )
            if token in self._by_token:
                raise InvalidTunnel(name, "already used by another tunnel")
        if source_token == destination_token:
            raise InvalidTunnel("destinationAccessToken", "must differ from sourceAccessToken")
        tunnel = Tunnel(tunnel_id, service_ids, Grant(source_token), Grant(destination_token))
        self._tunnels[tunnel_id] = tunnel
        self._by_token[source_token] = (tunnel, Mode.SOURCE)
        self._by_token[destination_token] = (tunnel, Mode.DESTINATION)
        return tunnel

    def close_tunnel(self, tunnel_id: str) -> Tunnel:
        """Mark a tunnel closed (closing a closed tunnel is not an error).

        Raises:
            UnknownTunnel: no such tunnel.
        """
        tunnel = self.get(tunnel_id)
        tunnel.status = TunnelStatus.CLOSED
        return tunnel

    def get(self, tunnel_id: str) -> Tunnel:
        """The tunnel with this id.

        Raises:
            UnknownTunnel: no such tunnel.
        """
        try:
            return self._tunnels[tunnel_id]
        except KeyError:
            raise UnknownTunnel(tunnel_id) from None

    def lookup(self, access_token: str) -> tuple[Tunnel, Mode] | None:
        """The tunnel and end an access token belongs to, if any."""
        return self._by_token.get(access_token)

    def claim(self, tunnel_id: str, mode: Mode, client_token: str | None) -> Claim:
        """Let a handshake use the ``mode`` grant of a tunnel (see :meth:`Grant.claim`)."""
        return self.get(tunnel_id).grant(mode).claim(client_token)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._tunnels.values()))

    def __len__(self) -> int:
        return len(self._tunnels)
