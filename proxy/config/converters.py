"""Converters: one option's text (and where it came from) -> a checked value.

Part of :mod:`proxy.config`; see its docstring for the rules every part follows.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from iotunnel.errors import ConfigError
from iotunnel.handshake import MODE_QUERY
from iotunnel.mode import Mode
from iotunnel.rules import (
    CLIENT_TOKEN_RE,
    HEADER_SAFE_RE,
    REGION_RE,
    tunnel_host,
)
from iotunnel.secret import Secret
from proxy.config.model import _LEVEL_RE, _MAX_VERBOSITY
from proxy.config.options import _FALSE, _TRUE, _Given
from proxy.config.settings_json import _FileSettings
from proxy.config.values import _check_host, _Invalid, _port, _split_host_port
from proxy.tls import CAError, load_ca


def _fail(given: _Given, problem: str, *, quote: bool = True) -> NoReturn:
    shown = f"{given.value.strip()!r}: " if quote else ""
    raise ConfigError(f"{given.origin}: {shown}{problem}")


def _switch(given: _Given) -> bool:
    text = given.value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    _fail(given, "expected true or false")


def _mode(given: _Given) -> Mode:
    text = given.value.strip().lower()
    if text in ("src", "source"):
        return Mode.SOURCE
    if text in ("dst", "destination"):
        return Mode.DESTINATION
    _fail(given, "expected src, source, dst or destination")


def _verbosity(given: _Given) -> int:
    text = given.value.strip()
    if not _LEVEL_RE.fullmatch(text) or int(text) > 255:
        _fail(given, "expected a level 0..255 (0 off ... 4 info, 5 debug, 6 or more trace)")
    return min(int(text), _MAX_VERBOSITY)


def _peer_version(given: _Given) -> int:
    versions = {"V1": 1, "V2": 2, "V3": 3}
    text = given.value.strip().upper()
    if text not in versions:
        _fail(given, "expected V1 or V2 (or V3, the default)")
    return versions[text]


def _access_token(given: _Given) -> Secret:
    token = given.value.strip()
    if not token:
        _fail(given, "the access token is empty", quote=False)
    if not HEADER_SAFE_RE.fullmatch(token):
        _fail(given, "the access token has characters an HTTP header cannot carry", quote=False)
    return Secret(token)


def _client_token(given: _Given) -> Secret:
    token = given.value.strip()
    if not CLIENT_TOKEN_RE.fullmatch(token):
        _fail(given, "a client token is 32..128 characters of a-z, A-Z, 0-9 and '-'", quote=False)
    return Secret(token)


def _region_url(given: _Given, mode: Mode, settings: _FileSettings) -> str:
    region = given.value.strip().lower()
    if not REGION_RE.fullmatch(region):
        _fail(given, "not an AWS region name (e.g. us-east-1)")
    overrides = dict(settings.region_hosts)
    if region in overrides:
        host = overrides[region]
    elif settings.endpoint_format is not None:
        host = settings.endpoint_format.replace("%s", region)
    else:
        host = tunnel_host(region)
    return _service_url(host, mode)  # the settings file's hosts were checked when read


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _service_url(text: str, mode: Mode) -> str:
    """``HOST[:PORT]`` or a ``wss://``/``ws://`` URL -> the tunnel URL for ``mode``."""
    if "://" not in text:
        host, port = _split_host_port(text.lower())
        number = 443 if port is None else _port(port, allow_zero=False)
        query = urlencode({MODE_QUERY: mode.value})
        return f"wss://{_netloc(host, number)}/tunnel?{query}"
    try:
        parts = urlsplit(text)
        explicit_port = parts.port
    except ValueError as exc:
        raise _Invalid(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("wss", "ws"):
        raise _Invalid("the URL scheme must be wss:// or ws://")
    if parts.fragment:
        raise _Invalid("a URL fragment ('#...') is not allowed")
    if not parts.hostname:
        raise _Invalid("the URL has no host")
    host = parts.hostname if ":" in parts.hostname else _check_host(parts.hostname)
    if explicit_port == 0:
        raise _Invalid("port must be 1..65535")
    number = explicit_port or (443 if scheme == "wss" else 80)
    path = parts.path if parts.path not in ("", "/") else "/tunnel"
    params = parse_qsl(parts.query, keep_blank_values=True)
    for key, value in params:
        if key == MODE_QUERY and value != mode.value:
            raise _Invalid(f"the URL asks for {MODE_QUERY}={value}, but the mode is {mode.value}")
    params = [(key, value) for key, value in params if key != MODE_QUERY]
    params.append((MODE_QUERY, mode.value))
    return urlunsplit((scheme, _netloc(host, number), path, urlencode(params), ""))


def _endpoint_url(given: _Given, mode: Mode) -> str:
    text = given.value.strip()
    authority = text.partition("://")[2] if "://" in text else text
    if "@" in authority.partition("/")[0]:
        # Do not echo: the user part of a URL may hold a credential.
        _fail(given, "credentials in the endpoint URL are not allowed", quote=False)
    try:
        return _service_url(text, mode)
    except _Invalid as exc:
        _fail(given, str(exc))


def _existing_path(given: _Given, cwd: Path) -> Path:
    path = cwd / given.value.strip()
    if not given.value.strip() or not path.exists():
        _fail(given, "no such file or directory")
    return path


def _ca_path(given: _Given, cwd: Path) -> str:
    """``-c``: an absolute path whose CA certificates load (checked before any connect)."""
    path = str(_existing_path(given, cwd).absolute())
    try:
        load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), path)
    except CAError as exc:
        _fail(given, str(exc))
    return path
