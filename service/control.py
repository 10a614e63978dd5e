"""The control plane: what the management API's operations do, and tunnel lifetimes.

:class:`ControlPlane` works on typed, shape-checked arguments (:mod:`service.api` checks the
JSON) and enforces the rules and limits of the AWS service:

- OpenTunnel: at most ``max_services`` services that follow the service id rule, at most
  ``max_tunnels`` open tunnels, a lifetime of 1 to 720 minutes (default 720), at most
  ``max_tags`` tags. Tokens are ``secrets.token_urlsafe`` (384 bits), returned once and kept
  only as digests. With ``destinationConfig.thingName``, the destination token is published to
  the thing (:mod:`service.notify`).
- CloseTunnel: the tunnel is CLOSED at once, both WebSockets are closed (code 1000), and its
  tokens are refused from now on (410). ``delete`` forgets it at once; otherwise it stays
  describable for ``closed_retention`` seconds (AWS: "at least three hours").
- RotateTunnelAccessToken: new tokens for SOURCE, DESTINATION or ALL; the old ones are unknown
  from now on and the peers connected with them are disconnected (code 1000); the lifetime is
  not extended. With a ``destinationConfig`` (not allowed with SOURCE) that names a thing, the
  new destination token is published to it.
- Lifetimes: :meth:`ControlPlane.run` closes each tunnel when its lifetime ends, as CloseTunnel
  does, and removes closed tunnels after the retention. The clock is injectable, and
  ``minute_seconds`` (testing only) makes a "minute" of lifetime shorter.

Errors are :class:`ApiError` subclasses that carry the AWS error type.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from iotunnel import boundedjson
from iotunnel.mode import Mode
from iotunnel.notify import Notification
from iotunnel.secret import Secret
from service.notify import Delivery, LogNotifier, Notifier
from service.registry import InvalidTunnel, Tunnel, TunnelRegistry

log = logging.getLogger(__name__)

#: Longest sleep of the lifetime scheduler: it looks again at least this often, so that a
#: wall clock set forward is noticed.
MAX_SLEEP = 30.0
#: AWS's bounds of ``maxLifetimeTimeoutMinutes``.
MIN_LIFETIME = 1
MAX_LIFETIME = 720
#: Largest decoded nextToken (one we issue is a timestamp and a tunnel id: well under this).
MAX_CURSOR = 1024


class ApiError(Exception):
    """An error the API reports as ``{"__type": code, "message": ...}`` with HTTP ``status``."""

    code: ClassVar[str] = "InternalFailure"
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ResourceNotFound(ApiError):
    code = "ResourceNotFoundException"
    status = 400


class LimitExceeded(ApiError):
    code = "LimitExceededException"
    status = 400


class InvalidRequest(ApiError):
    code = "InvalidRequestException"
    status = 400


@dataclass(frozen=True, slots=True)
class Limits:
    """The quotas of the AWS service, each configurable."""

    #: services per tunnel (AWS quota: 3)
    max_services: int = 3
    #: open tunnels at once (AWS's per-account quota is adjustable; this is a stand-in)
    max_tunnels: int = 100
    #: tags per tunnel (the usual AWS limit)
    max_tags: int = 50


@dataclass(frozen=True, slots=True)
class ControlSettings:
    """What the control plane reports and enforces."""

    region: str = "us-east-1"
    account_id: str = "123456789012"
    limits: Limits = field(default_factory=Limits)
    #: seconds in a "minute" of tunnel lifetime: 60, except in tests
    minute_seconds: float = 60.0
    #: seconds a closed tunnel stays describable
    closed_retention: float = 3 * 3600.0


class DataPlane(Protocol):
    """What the control plane needs of the ``/tunnel`` endpoint (``service.server``)."""

    async def end_tunnel(self, tunnel_id: str, reason: str) -> None:
        """Close both connections of a tunnel the registry has closed."""
        ...

    async def disconnect(self, tunnel_id: str, modes: Iterable[Mode], reason: str) -> None:
        """Close the connections of ``modes`` of a tunnel."""
        ...


@dataclass(frozen=True, slots=True)
class OpenedTunnel:
    """The outcome of OpenTunnel: the tunnel and its two tokens (shown once)."""

    tunnel: Tunnel
    source_token: str = field(repr=False)
    destination_token: str = field(repr=False)


def new_token() -> str:
    """A fresh, unguessable client access token."""
    return secrets.token_urlsafe(48)


class ControlPlane:
    """The management operations over a registry, a data plane and a notifier."""

    def __init__(
        self,
        registry: TunnelRegistry,
        *,
        data_plane: DataPlane | None = None,
        notifier: Notifier | None = None,
        settings: ControlSettings | None = None,
    ) -> None:
        self.registry = registry
        self.data_plane = data_plane
        self.notifier: Notifier = notifier or LogNotifier()
        self.settings = settings or ControlSettings()
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ naming

    def arn(self, tunnel_id: str) -> str:
        """The tunnel's ARN: ``arn:aws:iot:<region>:<account>:tunnel/<id>``."""
        s = self.settings
        return f"arn:aws:iot:{s.region}:{s.account_id}:tunnel/{tunnel_id}"

    def _by_arn(self, arn: str) -> Tunnel:
        prefix = self.arn("")
        tunnel = self.registry.find(arn[len(prefix) :]) if arn.startswith(prefix) else None
        if tunnel is None:
            raise ResourceNotFound(f"resource {arn} not found")
        return tunnel

    def _get(self, tunnel_id: str) -> Tunnel:
        tunnel = self.registry.find(tunnel_id)
        if tunnel is None:
            raise ResourceNotFound(f"tunnel {tunnel_id} not found")
        return tunnel

    # ------------------------------------------------------------------ operations

    async def open_tunnel(
        self,
        *,
        services: Sequence[str] = (),
        thing_name: str | None = None,
        description: str | None = None,
        lifetime_minutes: int | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> OpenedTunnel:
        """OpenTunnel."""
        limits = self.settings.limits
        if len(services) > limits.max_services:
            raise LimitExceeded(
                f"a tunnel may have at most {limits.max_services} services, "
                f"{len(services)} were given"
            )
        for index, service_id in enumerate(services):
            problem = self.registry.service_ids.problem(service_id)
            if problem is not None:
                raise InvalidRequest(f"destinationConfig.services[{index}]: {problem}")
        if len(set(services)) != len(services):
            raise InvalidRequest("destinationConfig.services: service ids must be unique")
        minutes = MAX_LIFETIME if lifetime_minutes is None else lifetime_minutes
        if not MIN_LIFETIME <= minutes <= MAX_LIFETIME:
            raise InvalidRequest(
                f"timeoutConfig.maxLifetimeTimeoutMinutes: must be {MIN_LIFETIME} to "
                f"{MAX_LIFETIME}, not {minutes}"
            )
        if tags is not None and len(tags) > limits.max_tags:
            raise LimitExceeded(f"a tunnel may have at most {limits.max_tags} tags")
        if self.registry.open_count() >= limits.max_tunnels:
            raise LimitExceeded(
                f"at most {limits.max_tunnels} tunnels may be open at once; close one first"
            )
        source_token, destination_token = new_token(), new_token()
        now = self.registry.clock.now()
        try:
            tunnel = self.registry.open_tunnel(
                str(uuid.uuid4()),
                services,
                source_token,
                destination_token,
                description=description,
                thing_name=thing_name,
                lifetime_minutes=minutes,
                expires_at=now + minutes * self.settings.minute_seconds,
                tags=tags,
            )
        except InvalidTunnel as exc:  # pragma: no cover - checked above; ids are fresh
            raise InvalidRequest(str(exc)) from None
        log.info(
            "tunnel %s opened: services %s, thing %s, lifetime %d min",
            tunnel.tunnel_id,
            ",".join(tunnel.services) or "(none)",
            thing_name or "(none)",
            minutes,
        )
        self._wake.set()
        if thing_name is not None:
            self._notify(tunnel, thing_name, destination_token)
        return OpenedTunnel(tunnel, source_token, destination_token)

    async def close_tunnel(self, tunnel_id: str, *, delete: bool = False) -> None:
        """CloseTunnel."""
        tunnel = self._get(tunnel_id)
        was_open = tunnel.is_open
        self.registry.close_tunnel(tunnel_id)
        if was_open:
            log.info("tunnel %s closed", tunnel_id)
        await self._end(tunnel_id, "tunnel closed")
        if delete:
            self.registry.delete_tunnel(tunnel_id)
            log.info("tunnel %s deleted", tunnel_id)
        self._wake.set()

    def describe(self, tunnel_id: str) -> Tunnel:
        """DescribeTunnel."""
        return self._get(tunnel_id)

    def list_tunnels(
        self,
        *,
        thing_name: str | None = None,
        max_results: int | None = None,
        next_token: str | None = None,
    ) -> tuple[list[Tunnel], str | None]:
        """ListTunnels: newest first, one page, and the token of the next page if any."""
        tunnels = sorted(self.registry, key=_order)
        if thing_name is not None:
            tunnels = [t for t in tunnels if t.thing_name == thing_name]
        if next_token is not None:
            after = _decode_cursor(next_token)
            tunnels = [t for t in tunnels if _order(t) > after]
        limit = 100 if max_results is None else max_results
        page = tunnels[:limit]
        more = len(tunnels) > limit
        return page, (_encode_cursor(page[-1]) if more and page else None)

    async def rotate(
        self,
        tunnel_id: str,
        modes: Sequence[Mode],
        *,
        destination_services: Sequence[str] | None = None,
        thing_name: str | None = None,
    ) -> dict[Mode, str]:
        """RotateTunnelAccessToken: new tokens for ``modes``, returned by mode.

        ``destination_services`` is given when the request had a ``destinationConfig``.
        """
        tunnel = self._get(tunnel_id)
        if not tunnel.is_open:
            raise InvalidRequest(f"tunnel {tunnel_id} is closed")
        if destination_services is not None:
            if Mode.DESTINATION not in modes:
                raise InvalidRequest("destinationConfig cannot be used with clientMode SOURCE")
            if sorted(destination_services) != sorted(tunnel.services):
                raise InvalidRequest(
                    "destinationConfig.services must be the tunnel's services: "
                    + (", ".join(tunnel.services) or "(none)")
                )
            if thing_name is not None:
                self.registry.set_thing_name(tunnel_id, thing_name)
        tokens = {mode: new_token() for mode in modes}
        for mode, token in tokens.items():
            self.registry.rotate(tunnel_id, mode, token)
        log.info(
            "tunnel %s: %s access token(s) rotated",
            tunnel_id,
            " and ".join(str(m) for m in tokens),
        )
        if self.data_plane is not None:
            await self.data_plane.disconnect(tunnel_id, list(tokens), "access token rotated")
        if destination_services is not None and thing_name is not None:
            self._notify(tunnel, thing_name, tokens[Mode.DESTINATION])
        return tokens

    def tags(self, arn: str) -> dict[str, str]:
        """ListTagsForResource."""
        return dict(self._by_arn(arn).tags)

    def tag(self, arn: str, tags: Mapping[str, str]) -> None:
        """TagResource."""
        tunnel = self._by_arn(arn)
        limit = self.settings.limits.max_tags
        if len(tunnel.tags.keys() | tags.keys()) > limit:
            raise LimitExceeded(f"a tunnel may have at most {limit} tags")
        self.registry.tag(tunnel.tunnel_id, tags)

    def untag(self, arn: str, keys: Sequence[str]) -> None:
        """UntagResource."""
        self.registry.untag(self._by_arn(arn).tunnel_id, keys)

    # ------------------------------------------------------------------ lifetimes

    async def expire_due(self) -> list[str]:
        """Close every open tunnel whose lifetime has ended; returns their ids."""
        expired = self.registry.expired(self.registry.clock.now())
        for tunnel in expired:
            self.registry.close_tunnel(tunnel.tunnel_id)
            log.info(
                "tunnel %s expired after its lifetime of %s min",
                tunnel.tunnel_id,
                tunnel.lifetime_minutes,
            )
        for tunnel in expired:
            await self._end(tunnel.tunnel_id, "tunnel expired")
        return [t.tunnel_id for t in expired]

    def purge_closed(self) -> list[str]:
        """Forget closed tunnels older than the retention; returns their ids."""
        cutoff = self.registry.clock.now() - self.settings.closed_retention
        purged = self.registry.closed_before(cutoff)
        for tunnel in purged:
            self.registry.delete_tunnel(tunnel.tunnel_id)
            log.info("tunnel %s removed (closed longer than the retention)", tunnel.tunnel_id)
        return [t.tunnel_id for t in purged]

    async def run(self) -> None:
        """Expire tunnels and purge closed ones on time, until cancelled."""
        while True:
            self._wake.clear()
            delay = MAX_SLEEP
            try:
                await self.expire_due()
                self.purge_closed()
                deadline = self.registry.next_deadline(self.settings.closed_retention)
                if deadline is not None:
                    delay = min(MAX_SLEEP, max(0.0, deadline - self.registry.clock.now()))
            except Exception:  # a failing state file, say: keep trying, do not die silently
                log.exception("lifetime scheduler failed; trying again in %.0f s", MAX_SLEEP)
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def wake(self) -> None:
        """Make :meth:`run` look at the deadlines again now."""
        self._wake.set()

    # ------------------------------------------------------------------ internals

    async def _end(self, tunnel_id: str, reason: str) -> None:
        if self.data_plane is not None:
            await self.data_plane.end_tunnel(tunnel_id, reason)

    def _notify(self, tunnel: Tunnel, thing_name: str, token: str) -> None:
        notification = Notification(Secret(token), self.settings.region, tunnel.services)
        self.notifier.publish(Delivery(thing_name, notification))


def _order(tunnel: Tunnel) -> tuple[float, str]:
    """Sort key of ListTunnels: newest first, then by id."""
    return (-tunnel.created_at, tunnel.tunnel_id)


def _encode_cursor(tunnel: Tunnel) -> str:
    raw = json.dumps([tunnel.created_at, tunnel.tunnel_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(token: str) -> tuple[float, str]:
    """The sort key a nextToken of :func:`_encode_cursor` holds. The token comes from the
    client: anything but ``[<finite number>, <string>]`` is refused."""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
        cursor = boundedjson.loads(raw, max_bytes=MAX_CURSOR, max_depth=1)
        if not isinstance(cursor, list) or len(cursor) != 2:
            raise ValueError
        created_at, tunnel_id = cursor
        if isinstance(created_at, bool) or not isinstance(created_at, int | float):
            raise ValueError
        if not isinstance(tunnel_id, str) or not math.isfinite(created_at := float(created_at)):
            raise ValueError
    except (binascii.Error, ValueError, OverflowError):  # JSONInputError is a ValueError
        raise InvalidRequest("nextToken: not a token this service issued") from None
    return (-created_at, tunnel_id)
