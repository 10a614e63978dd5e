"""The HTTP proxy setting (``https_proxy``, else the environment's) and ``NO_PROXY``."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.config.keys import _Given
from iotunnel.errors import ConfigError
from iotunnel.rules import HOST_RE
from iotunnel.secret import Secret


@dataclass(frozen=True, slots=True)
class HttpProxy:
    """An HTTP proxy that tunnels with CONNECT, and the Basic credentials from its URL.

    ``str()`` is ``http://host:port``, without the credentials: fit for logs. The URL with them
    is :attr:`url`, a :class:`~iotunnel.secret.Secret` (it goes to the proxies' environment only).

    Attributes:
        host: The proxy's host name or address (without brackets).
        port: Its port.
        username: The Basic user name, or ``None`` for no authentication.
        password: The Basic password (``Secret("")`` with a user name and no password).
        url: The URL as given.
        origin: Where it was set (``agent.ini:12: https_proxy``, ``HTTPS_PROXY``).
    """

    host: str
    port: int
    username: str | None
    password: Secret | None
    url: Secret
    origin: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def bypassed(self, no_proxy: str, host: str, port: int) -> bool:
        """Whether ``NO_PROXY`` (``no_proxy``) exempts ``host:port``, by the rules of Python's
        :mod:`urllib` (which the destination proxies' WebSocket client follows as well)."""
        import urllib.request  # here: 2 MiB of the agent's memory, for an HTTP proxy only

        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        return bool(bypass(f"{host}:{port}", {"no": no_proxy}))


def _https_proxy(given: _Given) -> HttpProxy:
    """``http://[user[:password]@]host[:port]``; messages never quote it: it may hold a
    password."""
    usage = "expected http://[user:password@]host:port"
    text = given.value.strip()
    try:
        url = urllib.parse.urlsplit(text)
    except ValueError:
        raise ConfigError(f"{given.origin}: not a valid URL ({usage})") from None
    try:
        port = url.port
    except ValueError:
        port = 0
    if url.scheme.lower() != "http":
        raise ConfigError(f"{given.origin}: not an http:// URL ({usage})")
    if not url.hostname:
        raise ConfigError(f"{given.origin}: no host in the URL ({usage})")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError(f"{given.origin}: a proxy URL has no path, query or fragment ({usage})")
    if port == 0:
        raise ConfigError(f"{given.origin}: a port is 1..65535")
    host = url.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_RE.fullmatch(host):
            raise ConfigError(f"{given.origin}: not a host name or IP address ({usage})") from None
    username = password = None
    if url.username is not None:
        # As the proxies' WebSocket client reads it: Basic auth needs both, percent-decoded.
        if url.password is None:
            raise ConfigError(f"{given.origin}: a user name without a password ({usage})")
        try:
            username = urllib.parse.unquote(url.username, errors="strict")
            password = Secret(urllib.parse.unquote(url.password, errors="strict"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"{given.origin}: the user name or password is not UTF-8 once percent-decoded"
            ) from None
    return HttpProxy(host, port or 80, username, password, Secret(text), given.origin)


def _environment_proxy(environ: Mapping[str, str], name: str, base: Path) -> _Given | None:
    """``name`` (``https_proxy``) from the environment as Python's :mod:`urllib` reads it: the
    lower-case variable wins over the upper-case one, and an empty one counts as unset."""
    for variable in (name, name.upper()):
        if variable in environ:
            value = environ[variable]
            return _Given(value, variable, base) if value.strip() else None
    return None
