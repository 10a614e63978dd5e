"""The tunnel notification: its MQTT topic and payload, built (service) and parsed (agent).

AWS IoT (or the self-hosted service) publishes on ``$aws/things/<thing>/tunnels/notify``, QoS 1::

    {"clientAccessToken": "...", "clientMode": "destination", "region": "us-east-1",
     "services": ["HTTP1", "SSH1"]}

:meth:`Notification.payload` writes exactly these four fields. :func:`parse` accepts a payload
only for ``clientMode == "destination"``, with a non-empty token and region, and with only
services that the local mapping directory maps. The payload is read with
:func:`iotunnel.boundedjson.loads` (at most :data:`MAX_PAYLOAD` bytes, :data:`MAX_DEPTH` levels),
so no payload raises: every problem is a :class:`Rejection`. Its reason is one line, safe to log:
it never contains the token (not even when the token is repeated in another field), and quotes
other fields only shortened. The token is a :class:`~iotunnel.secret.Secret` both ways.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass

from iotunnel.boundedjson import JSONInputError, loads
from iotunnel.mode import Mode
from iotunnel.rules import HEADER_SAFE_RE, REGION_RE, SERVICE_ID_RE, THING_NAME_RE
from iotunnel.secret import Secret

__all__ = ["MAX_DEPTH", "MAX_PAYLOAD", "Notification", "Rejection", "notify_topic", "parse"]

#: Larger payloads are rejected unread; a real one is about a kilobyte.
MAX_PAYLOAD = 16 * 1024
#: Deeper payloads are rejected unparsed; a real one is an object holding a list (2 levels).
MAX_DEPTH = 4
_MAX_TOKEN = 8192
_MAX_SERVICES = 16
_SHOWN = 40


def notify_topic(thing_name: str) -> str:
    """The topic AWS IoT publishes a thing's tunnel notifications on.

    Raises:
        ValueError: ``thing_name`` is not a valid thing name.
    """
    if not THING_NAME_RE.fullmatch(thing_name):
        raise ValueError(f"not a thing name: {thing_name!r}")
    return f"$aws/things/{thing_name}/tunnels/notify"


@dataclass(frozen=True, slots=True)
class Notification:
    """A destination notification: what :func:`parse` accepts and :meth:`payload` builds.

    Attributes:
        token: The destination access token.
        region: The AWS region of the tunnel.
        services: The tunnel's service IDs, in the order given, without repeats.
    """

    token: Secret
    region: str
    services: tuple[str, ...]

    def fingerprint(self) -> bytes:
        """A digest of all four fields: equal for an exact duplicate, never shown in logs."""
        text = "\0".join([Mode.DESTINATION, self.token.reveal(), self.region, *self.services])
        return hashlib.sha256(text.encode()).digest()

    def payload(self) -> bytes:
        """The JSON payload, exactly the four fields AWS sends."""
        return json.dumps(
            {
                "clientAccessToken": self.token.reveal(),
                "clientMode": Mode.DESTINATION.value,
                "region": self.region,
                "services": list(self.services),
            }
        ).encode()

    def describe(self) -> str:
        """Services and region, for logs (no token)."""
        return f"{', '.join(self.services)} (region {self.region})"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A notification that was dropped, and why (safe to log)."""

    reason: str


_HIDDEN = "<token>"


def _hide(text: str, token: object) -> str:
    """``text`` without the token (or the strings of a token sent as a list), as written or as
    ``repr`` escapes it."""
    secrets = [token] if isinstance(token, str) else token if isinstance(token, list) else []
    for secret in secrets:
        if isinstance(secret, str) and secret:
            text = text.replace(secret, _HIDDEN)
            escaped = repr(secret)[1:-1]
            if escaped:
                text = text.replace(escaped, _HIDDEN)
    return text


def _shown(value: object, token: object) -> str:
    text = _hide(repr(value), token)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def parse(
    payload: bytes, mapped: Collection[str], *, mapping_dir: str = ""
) -> Notification | Rejection:
    """Validate a notification payload.

    Args:
        payload: The MQTT message payload.
        mapped: The service IDs the local mapping directory maps.
        mapping_dir: The directory's name, for the rejection message.

    Returns:
        The notification, or a rejection whose reason names the problem.
    """
    if len(payload) > MAX_PAYLOAD:
        return Rejection(f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    try:
        document = loads(payload, max_bytes=MAX_PAYLOAD, max_depth=MAX_DEPTH)
    except JSONInputError as exc:  # its text never quotes the payload
        return Rejection(f"malformed JSON: {exc}")
    except ValueError:  # json.loads: an integer of more than 4300 digits
        return Rejection("malformed JSON: a number too long")
    if not isinstance(document, dict):
        return Rejection("the payload is not a JSON object")
    return _check(document, mapped, mapping_dir)


def _check(
    document: dict[str, object], mapped: Collection[str], mapping_dir: str
) -> Notification | Rejection:
    token = document.get("clientAccessToken")

    def shown(value: object) -> str:
        return _shown(value, token)

    mode = document.get("clientMode")
    if mode is None:
        return Rejection("no clientMode")
    if mode != Mode.DESTINATION:
        return Rejection(f"clientMode is {shown(mode)}, not 'destination'")

    if not isinstance(token, str) or not token.strip():
        return Rejection("no clientAccessToken")
    if len(token) > _MAX_TOKEN or not HEADER_SAFE_RE.fullmatch(token):
        return Rejection("clientAccessToken has characters an HTTP header cannot carry")

    region = document.get("region")
    if not isinstance(region, str) or not region.strip():
        return Rejection("no region")
    if not REGION_RE.fullmatch(region):
        return Rejection(f"region {shown(region)} is not an AWS region name")

    services = document.get("services")
    if services is None or services == []:
        return Rejection("no services")
    if not isinstance(services, list) or len(services) > _MAX_SERVICES:
        return Rejection(f"services must be a list of at most {_MAX_SERVICES} service IDs")
    for service in services:
        if not isinstance(service, str) or not SERVICE_ID_RE.fullmatch(service):
            return Rejection(f"services holds {shown(service)}, which is not a service ID")
    if len(set(services)) != len(services):
        return Rejection("services names a service twice")
    if any(token in value for value in (region, *services)):
        # Region and services are logged; the token must never be.
        return Rejection("the clientAccessToken is repeated in region or services")
    unmapped = [service for service in services if service not in mapped]
    if unmapped:
        where = f" in {mapping_dir}" if mapping_dir else ""
        plural = "s" if len(unmapped) > 1 else ""
        names = _hide(", ".join(unmapped), token)
        return Rejection(f"service{plural} {names} not mapped{where}")
    return Notification(Secret(token), region, tuple(services))
