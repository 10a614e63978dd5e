"""The service's inputs, read once and checked: the settings file, the tunnels file, the
credentials file and the TLS certificate.

The settings file (``config/service.ini``) has one section, ``[service]``, whose keys are the
long command-line options without the leading dashes (``api-port = 8444``); flags given on the
command line win. The credentials file has the AWS shared-credentials format (``[profile]``
sections with ``aws_access_key_id`` and ``aws_secret_access_key``); every profile in it may
sign management API requests.

The tunnels file (see ``config/service.example.json``)::

    {"tunnels": [{"tunnelId": "demo",
                  "services": ["HTTP1", "SSH1"],
                  "sourceAccessToken": "...",
                  "destinationAccessToken": "..."}]}

Every error is a :class:`ConfigError` whose one-line message names the file and the field, and
never contains a token; the tunnels file's name the flag too (``--tunnels FILE: ...``). The
tunnels file is read through :mod:`iotunnel.boundedjson`: over ``MAX_TUNNELS_FILE`` bytes (checked
before reading) or nested deeper than ``MAX_TUNNELS_DEPTH`` levels, it is refused in one line.
"""

from __future__ import annotations

import configparser
import logging
import ssl
import stat
from pathlib import Path
from typing import Any

from iotunnel import boundedjson
from iotunnel.errors import ConfigError
from service.registry import InvalidTunnel, TunnelRegistry

log = logging.getLogger(__name__)

_TUNNEL_FIELDS = ("tunnelId", "services", "sourceAccessToken", "destinationAccessToken")
#: Largest tunnels file (about 50,000 tunnels) and its deepest nesting (a valid one has 4
#: levels: the document, the list, an entry, its services).
MAX_TUNNELS_FILE = 16 * 1024 * 1024
MAX_TUNNELS_DEPTH = 8


def load_tunnels(path: Path | None, registry: TunnelRegistry) -> None:
    """Make the registry's static tunnels those declared in the JSON file ``path`` (none for
    None).

    A tunnel that the registry already has from its state file, unchanged (same services and
    tokens), keeps its state (used tokens, closed status). A changed one is replaced, and static
    tunnels no longer declared are removed.

    Raises:
        ConfigError: unreadable file, invalid JSON, or a bad or duplicate field.
    """
    if path is None:
        _prune_static(registry, set(), None)
        return
    name = f"--tunnels {path}"
    try:
        info = path.stat()
        if info.st_size > MAX_TUNNELS_FILE:  # refused before it is read into memory
            size = info.st_size
            raise ConfigError(f"{name}: too large: {size} bytes, at most {MAX_TUNNELS_FILE}")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}") from None
    try:
        document = boundedjson.loads(data, max_bytes=MAX_TUNNELS_FILE, max_depth=MAX_TUNNELS_DEPTH)
    except boundedjson.JSONInputError as exc:  # its text never quotes the file (tokens)
        raise ConfigError(f"{name}: {exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s holds access tokens and is readable by others; chmod 600 it", path)
    if not isinstance(document, dict) or set(document) != {"tunnels"}:
        raise ConfigError(f'{name}: must be an object with the single field "tunnels"')
    tunnels = document["tunnels"]
    if not isinstance(tunnels, list):
        raise ConfigError(f"{name}: tunnels: must be a list")
    declared = {
        entry["tunnelId"]
        for entry in tunnels
        if isinstance(entry, dict) and isinstance(entry.get("tunnelId"), str)
    }
    _prune_static(registry, declared, path)
    seen: set[str] = set()
    for index, entry in enumerate(tunnels):
        where = f"{name}: tunnels[{index}]"
        _check_entry(entry, where)
        tunnel_id = entry["tunnelId"]
        if tunnel_id in seen:
            raise ConfigError(f"{where}.tunnelId: tunnel {tunnel_id!r} already exists")
        seen.add(tunnel_id)
        existing = registry.find(tunnel_id)
        if existing is not None:
            if (
                existing.services == tuple(entry["services"])
                and existing.source.matches(entry["sourceAccessToken"])
                and existing.destination.matches(entry["destinationAccessToken"])
            ):
                continue  # in the state file since an earlier run: keep its state
            log.warning(
                "tunnel %s: %s declares it differently from the state file; replacing it",
                tunnel_id,
                path,
            )
            registry.delete_tunnel(tunnel_id)
        try:
            registry.open_tunnel(
                entry["tunnelId"],
                entry["services"],
                entry["sourceAccessToken"],
                entry["destinationAccessToken"],
                static=True,
            )
        except InvalidTunnel as exc:
            raise ConfigError(f"{where}.{exc.field}: {exc.detail}") from None


def _prune_static(registry: TunnelRegistry, keep: set[str], path: Path | None) -> None:
    """Remove the static tunnels (from an earlier tunnels file) not in ``keep``."""
    for tunnel in registry:
        if tunnel.static and tunnel.tunnel_id not in keep:
            where = f"{path}" if path is not None else "no tunnels file"
            log.info("tunnel %s: not declared (%s): removed", tunnel.tunnel_id, where)
            registry.delete_tunnel(tunnel.tunnel_id)


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


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read {what}: {reason}") from None


def _parse_ini(path: Path, text: str, *, secret: bool = False) -> configparser.ConfigParser:
    """Parse INI text; errors name the file and line (and, unless ``secret``, the text)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        if secret:
            errors = getattr(exc, "errors", None)
            line = getattr(exc, "lineno", None) or (errors[0][0] if errors else "?")
            raise ConfigError(f"{path}: line {line}: not in INI format") from None
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: {message}") from None
    return parser


def read_settings(path: Path) -> dict[str, str]:
    """The ``[service]`` section of a settings file: option name (dashes) -> raw value.

    Raises:
        ConfigError: unreadable file, bad syntax, or a section other than ``[service]``.
    """
    parser = _parse_ini(path, _read_text(path, "settings"))
    sections = parser.sections()
    extra = [name for name in sections if name != "service"]
    if extra:
        raise ConfigError(f"{path}: unknown section [{extra[0]}] (only [service])")
    if "service" not in sections:
        return {}
    return {key.replace("_", "-"): value for key, value in parser.items("service")}


def load_credentials(path: Path) -> dict[str, str]:
    """Access key id -> secret access key, from an AWS shared-credentials file.

    Raises:
        ConfigError: unreadable file, bad syntax, no profile, or a profile without both keys.
    """
    text = _read_text(path, "credentials")
    try:
        mode = path.stat().st_mode
    except OSError:  # pragma: no cover - just read
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s holds secret keys and is readable by others; chmod 600 it", path)
    parser = _parse_ini(path, text, secret=True)
    keys: dict[str, str] = {}
    for profile in parser.sections():
        key_id = parser.get(profile, "aws_access_key_id", fallback="").strip()
        secret = parser.get(profile, "aws_secret_access_key", fallback="").strip()
        if not key_id or not secret:
            raise ConfigError(
                f"{path}: [{profile}]: aws_access_key_id and aws_secret_access_key are required"
            )
        keys[key_id] = secret
    if not keys:
        raise ConfigError(f"{path}: no credentials (a [profile] section with aws_access_key_id)")
    return keys
