"""Values: ports, hosts, endpoints, service IDs and ``-s``/``-d`` mapping lists.

Part of :mod:`proxy.config`; see its docstring for the rules every part follows.
"""

from __future__ import annotations

import ipaddress
import os

from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from iotunnel.rules import (
    HOST_RE,
    SERVICE_ID_RE,
)
from proxy.config.model import _PORT_RE, _SUN_PATH_MAX, Endpoint, ServiceMapping


class _Invalid(ValueError):
    """A value is wrong; the caller adds where it came from."""


def _port(text: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not _PORT_RE.fullmatch(text) or not low <= int(text) <= 65535:
        raise _Invalid(f"port must be {low}..65535")
    return int(text)


def _check_host(host: str) -> str:
    if not host:
        raise _Invalid("empty host name")
    if not HOST_RE.fullmatch(host):
        raise _Invalid(f"{host!r} is not a host name or IPv4 address")
    return host


def _split_host_port(text: str) -> tuple[str, str | None]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; the port stays text."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _Invalid("missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{host!r} is not an IPv6 address") from None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise _Invalid("expected ':PORT' after ']'")
        return host, rest[1:]
    if text.count(":") > 1:
        raise _Invalid("put an IPv6 address in brackets, e.g. [::1]:22")
    host, colon, port = text.partition(":")
    return _check_host(host), (port if colon else None)


def _endpoint(text: str, mode: Mode) -> Endpoint:
    if not text:
        raise _Invalid("empty endpoint")
    if "/" in text:
        if mode is Mode.SOURCE:
            raise _Invalid("a Unix socket path is only valid in destination mode")
        if "\0" in text:
            raise _Invalid("the path contains a NUL byte")
        if len(os.fsencode(text)) > _SUN_PATH_MAX:
            raise _Invalid(f"a Unix socket path is at most {_SUN_PATH_MAX} bytes")
        return Endpoint(host=None, port=None, path=text)
    if text.isdigit():
        return Endpoint(host=None, port=_port(text, allow_zero=mode is Mode.SOURCE))
    host, port = _split_host_port(text)
    if port is None:
        raise _Invalid("missing port (HOST:PORT)")
    return Endpoint(host=host, port=_port(port, allow_zero=mode is Mode.SOURCE))


def parse_endpoint(text: str, *, what: str, mode: Mode) -> Endpoint:
    """Parse a local endpoint: ``22``, ``host:22``, ``[::1]:22`` or a Unix socket path.

    A value containing ``/`` (``/run/app.sock``, ``./app.sock``) is a Unix socket path, valid in
    destination mode only. Ports are 1..65535; a source listener may use 0 (any free port).

    Args:
        text: The endpoint as written.
        what: Where it came from (``-d``, ``file:line``), for the error message.
        mode: The proxy's mode.

    Raises:
        ConfigError: The endpoint is not valid.
    """
    try:
        return _endpoint(text.strip(), mode)
    except _Invalid as exc:
        raise ConfigError(f"{what}: {text.strip()!r}: {exc}") from None


def _service_id(text: str) -> str:
    if not SERVICE_ID_RE.fullmatch(text):
        raise _Invalid("a service ID is 1..128 characters of a-z, A-Z, 0-9, ':', '_' and '-'")
    return text


def parse_mapping_list(text: str, *, flag: str, mode: Mode) -> list[ServiceMapping]:
    """Parse the value of ``-s`` or ``-d``: ``5555``, ``SSH1=5555`` or ``HTTP1=80,SSH1=22``.

    A single item without ``ID=`` is the unnamed mapping; it cannot be mixed with named ones.

    Args:
        text: The flag's value.
        flag: The flag or ``file:line: key`` the value came from, for error messages.
        mode: The proxy's mode (it decides which endpoints are valid).

    Raises:
        ConfigError: An item is malformed, or a service ID repeats.
    """
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item]
    if not items:
        raise ConfigError(f"{flag}: {text!r}: no mapping given")
    mappings: list[ServiceMapping] = []
    for item in items:
        name, equals, target = item.partition("=")
        try:
            if equals:
                service_id = _service_id(name.strip())
            elif len(items) > 1:
                raise _Invalid("an unnamed mapping must be the only one; name it (ID=...)")
            else:
                service_id, target = "", item
            if any(m.service_id == service_id for m in mappings):
                raise _Invalid(f"service ID {service_id!r} is mapped twice")
            mappings.append(ServiceMapping(service_id, _endpoint(target.strip(), mode)))
        except _Invalid as exc:
            raise ConfigError(f"{flag}: {item!r}: {exc}") from None
    return mappings


def _bind_address(text: str) -> str:
    bracketed = text.startswith("[") and text.endswith("]")
    address = text[1:-1] if bracketed else text
    if bracketed or ":" in address:
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise _Invalid(f"{address!r} is not an IPv6 address") from None
        return address
    return _check_host(address)
