"""The service's inputs, read once and checked: the tunnels file and the TLS certificate.

The tunnels file (see ``config/service.example.json``)::

    {"tunnels": [{"tunnelId": "demo",
                  "services": ["HTTP1", "SSH1"],
                  "sourceAccessToken": "...",
                  "destinationAccessToken": "..."}]}

Every error is a :class:`ConfigError` whose one-line message names the file and the field, and
never contains a token.
"""

from __future__ import annotations

import json
import logging
import ssl
import stat
from pathlib import Path
from typing import Any

from service.registry import InvalidTunnel, TunnelRegistry

log = logging.getLogger(__name__)

_TUNNEL_FIELDS = ("tunnelId", "services", "sourceAccessToken", "destinationAccessToken")


class ConfigError(Exception):
    """Bad input; the message is one line, fit for ``iotunnel-service: error: ...``."""


def load_tunnels(path: Path, registry: TunnelRegistry) -> None:
    """Open every tunnel declared in the JSON file ``path`` in ``registry``.

    Raises:
        ConfigError: unreadable file, invalid JSON, or a bad or duplicate field.
    """
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read: {reason}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s holds access tokens and is readable by others; chmod 600 it", path)
    if not isinstance(document, dict) or set(document) != {"tunnels"}:
        raise ConfigError(f'{path}: must be an object with the single field "tunnels"')
    tunnels = document["tunnels"]
    if not isinstance(tunnels, list):
        raise ConfigError(f"{path}: tunnels: must be a list")
    for index, entry in enumerate(tunnels):
        where = f"{path}: tunnels[{index}]"
        _check_entry(entry, where)
        try:
            registry.open_tunnel(
                entry["tunnelId"],
                entry["services"],
                entry["sourceAccessToken"],
                entry["destinationAccessToken"],
            )
        except InvalidTunnel as exc:
            raise ConfigError(f"{where}.{exc.field}: {exc.detail}") from None


def _check_entry(entry: Any, where: str) -> None:
    """Check the JSON types of one tunnel entry."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be an object")
    for name in entry:
        if name not in _TUNNEL_FIELDS:
            raise ConfigError(f"{where}: unknown field {name!r}")
    for name in _TUNNEL_FIELDS:
        if name not in entry:
            raise ConfigError(f"{where}.{name}: missing")
    for name in ("tunnelId", "sourceAccessToken", "destinationAccessToken"):
        if not isinstance(entry[name], str):
            raise ConfigError(f"{where}.{name}: must be a string")
    services = entry["services"]
    if not isinstance(services, list):
        raise ConfigError(f"{where}.services: must be a list of strings")
    for index, service_id in enumerate(services):
        if not isinstance(service_id, str):
            raise ConfigError(f"{where}.services[{index}]: must be a string")


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context with the certificate chain ``cert`` and its private key ``key``.

    Raises:
        ConfigError: a missing or unreadable file, or a certificate and key that do not load.
    """
    for name, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            raise ConfigError(f"{path}: {name} file not found")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert}, {key}: cannot load certificate and key: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{exc.filename or cert}: cannot read: {exc.strerror}") from None
    return context
