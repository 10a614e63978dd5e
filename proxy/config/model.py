"""The proxy's settings model: names, constants and the frozen dataclasses :func:`load` returns.

Part of :mod:`proxy.config`; see its docstring for the rules every part follows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from iotunnel.handshake import ENV_ACCESS_TOKEN as ENV_ACCESS_TOKEN
from iotunnel.handshake import ENV_CLIENT_TOKEN as ENV_CLIENT_TOKEN
from iotunnel.mode import Mode
from iotunnel.secret import Secret
from proxy.protocol.limits import MAX_PAYLOAD

#: The program name shown in help and error messages.
PROG = "iotunnel-proxy"

# Variable names, not secrets:
ENV_ENDPOINT = "AWSIOT_TUNNEL_ENDPOINT"
ENV_REGION = "AWSIOT_TUNNEL_REGION"

#: Where mappings are read from when neither ``--config-dir`` nor ``-s``/``-d`` is given; only
#: when every file in it is a mapping file (otherwise a source warns, a destination stops).
DEFAULT_CONFIG_DIR = "config"

_PORT_RE = re.compile(r"[0-9]{1,5}")
_LEVEL_RE = re.compile(r"[0-9]{1,3}")

# What an option-file key must look like to be quoted in an error: shorter than any client token,
# so that a token pasted on a line of its own is never echoed.
_OPTION_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_MAX_VERBOSITY = 6
_DEFAULT_VERBOSITY = 4


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A local endpoint: a TCP ``host:port`` or a Unix socket ``path``.

    Attributes:
        host: ``None`` for Unix sockets. For a source listener ``None`` means "the bind address"
            (``-b``); for a destination it means localhost. IPv6 addresses are stored without
            brackets.
        port: ``None`` for Unix sockets. A source listener may use 0: pick a free port.
        path: The Unix socket path, or ``None`` for TCP.
    """

    host: str | None
    port: int | None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        if self.host is None:
            return str(self.port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceMapping:
    """One service ID and its local endpoint; ``service_id == ""`` is the unnamed mapping."""

    service_id: str
    endpoint: Endpoint


def _brief(value: object) -> str:
    """``repr(value)``, cut short: a message quotes at most this much of a file's content."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key(key: str) -> str:
    """A settings key as a message shows it: as is when short and printable, else quoted."""
    return key if key.isprintable() and 0 < len(key) <= 100 else _brief(key)


class _Range(NamedTuple):
    """The accepted values of one :class:`Tuning` field."""

    kind: type[int] | type[float]
    low: float
    high: float = math.inf
    low_open: bool = False  # True: the value must be strictly above ``low``

    def problem(self, value: object) -> str | None:
        """Say what is wrong with ``value``, or return ``None`` when it is acceptable."""
        if self.kind is int:
            wanted = "an integer"
            ok_type = isinstance(value, int) and not isinstance(value, bool)
        else:
            wanted = "a number"
            ok_type = isinstance(value, int | float) and not isinstance(value, bool)
        if self.low_open:
            bounds = f"> {self.low:g}"
        elif self.high == math.inf:
            bounds = f">= {self.low:g}"
        else:
            bounds = f"{self.low:g}..{self.high:g}"
        if not ok_type:
            return f"must be {wanted} {bounds}, not {type(value).__name__}"
        assert isinstance(value, int | float)
        too_low = value <= self.low if self.low_open else value < self.low
        if not math.isfinite(value) or too_low or value > self.high:
            return f"must be {wanted} {bounds}, not {_brief(value)}"
        return None


_TUNING_RANGES: dict[str, _Range] = {
    "ping_interval": _Range(float, 0, low_open=True),
    "connect_timeout": _Range(float, 0, low_open=True),
    "reconnect_base": _Range(float, 0, low_open=True),
    "reconnect_max": _Range(float, 0, low_open=True),
    "reconnect_attempts": _Range(int, -1),
    "reconnect_reset_after": _Range(float, 0),
    "read_chunk": _Range(int, 1, MAX_PAYLOAD),
    "local_write_buffer": _Range(int, 1),
    "max_connections": _Range(int, 1),
    "happy_eyeballs_delay": _Range(float, 0, low_open=True),
}


@dataclass(frozen=True, slots=True)
class Tuning:
    """Fine-grained knobs, set with ``--settings-json``; the defaults suit almost everyone.

    Our own keys are ``iotunnel.<field>`` (JSON numbers, seconds for times). These keys of the
    reference proxy are accepted too, as JSON numbers or as the strings its export writes:

    - ``tunneling.proxy.websocket.ping_period_ms`` -> ``ping_interval`` (ms -> s)
    - ``tunneling.proxy.websocket.retry_delay_ms`` -> ``reconnect_base`` (ms -> s): the
      reference's fixed reconnect delay becomes the first step of our backoff
    - ``tunneling.proxy.websocket.connect_retry_count`` -> ``reconnect_attempts`` (-1 = forever)
    - ``tunneling.proxy.tcp.max_active_connections`` -> ``max_connections``
    - ``tunneling.proxy.message.max_payload_size`` -> ``read_chunk``
    - ``tunneling.proxy.tcp.write_buffer_size`` -> ``local_write_buffer``
    - ``tunneling.proxy.default_bind_address`` -> the bind address when ``-b`` is absent
    - ``tunneling.proxy.endpoint_format`` (``%s`` = the region) and
      ``tunneling.proxy.region_endpoint_overrides.<region>`` -> the service host for ``-r``
    - ``tunneling.proxy.websocket.subprotocol`` must stay ``aws.iot.securetunneling-3.0``
      (use ``-y`` for older peers)

    The other keys of the reference's export (message and frame sizes, socket buffer sizes,
    ``tcp.connection_retry_*``, ``websocket.reconnect_on_data_error``) are accepted and have no
    effect: the framing is fixed by the protocol, a failed local connect is not retried (just
    that connection is reset) and the proxy always reconnects. Any other key is an error.

    Attributes:
        ping_interval: Seconds between WebSocket pings to the service.
        connect_timeout: Seconds allowed for the TCP/TLS/WebSocket handshake with the service,
            and for each connect to a destination endpoint.
        reconnect_base: First delay (seconds) of the jittered exponential reconnect backoff.
        reconnect_max: Cap (seconds) on one backoff delay; at least ``reconnect_base``.
        reconnect_attempts: Consecutive failed reconnects before giving up; -1 = never give up.
            A connection that the service drops within ``reconnect_reset_after`` counts as a
            failed attempt.
        reconnect_reset_after: Seconds a connection must stay up before the reconnect backoff
            starts over from ``reconnect_base``; every drop waits the backoff's next delay.
        read_chunk: Bytes read from a local socket per DATA message (1..64512).
        local_write_buffer: Bytes buffered for one local connection before the tunnel stops
            reading from the service (the high-water mark of that connection).
        max_connections: Simultaneous local connections per tunnel.
        happy_eyeballs_delay: Seconds before a destination connect also tries the next address.
    """

    ping_interval: float = 20.0
    connect_timeout: float = 10.0
    reconnect_base: float = 1.0
    reconnect_max: float = 60.0
    reconnect_attempts: int = -1
    reconnect_reset_after: float = 10.0
    read_chunk: int = MAX_PAYLOAD
    local_write_buffer: int = 262144
    max_connections: int = 4096
    happy_eyeballs_delay: float = 0.25

    def __post_init__(self) -> None:
        for name, limits in _TUNING_RANGES.items():
            problem = limits.problem(getattr(self, name))
            if problem is not None:
                raise ValueError(f"{name} {problem}")
        if self.reconnect_max < self.reconnect_base:
            raise ValueError(
                f"reconnect_max ({self.reconnect_max:g}) is below reconnect_base "
                f"({self.reconnect_base:g})"
            )


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Everything the proxy needs to run, validated.

    Attributes:
        mode: Source or destination.
        url: The full WebSocket URL of the tunnel service, with the ``local-proxy-mode`` query.
        access_token: The tunnel access token.
        client_token: The client token sent on every (re)connect, if any.
        mappings: Service ID -> local endpoint. Empty only in source mode (the runner then picks
            free ports for the services the tunnel announces).
        bind_address: ``-b``: the listen address (source; ``None`` = localhost) or the local
            host of port-only mappings (destination, as the reference proxy; ``None`` =
            localhost).
        ca_path: ``-c``: a CA bundle file or a directory of CA certificates, as an absolute
            path, checked loadable; added to the system's CAs.
        verify_host: False with ``-k``: the service's certificate is not verified at all
            (neither its chain nor its host name), as the reference proxy's ``-k``.
        verbosity: 0 off, 1 fatal, 2 error, 3 warning, 4 info (default), 5 debug, 6 trace.
        peer_version: The protocol version assumed for the peer: 3, or 1/2 from ``-y`` (source).
        tuning: Fine-grained knobs.
        access_token_from_argv: The token came from ``-t`` and is visible to other local users.
        skipped_config_dir: Why the default ``./config`` was not read as mappings (source mode,
            where mappings are optional), to be logged as a warning; ``None`` when it was read
            or absent.
    """

    mode: Mode
    url: str
    access_token: Secret
    client_token: Secret | None
    mappings: tuple[ServiceMapping, ...]
    bind_address: str | None
    ca_path: str | None
    verify_host: bool
    verbosity: int
    peer_version: int
    tuning: Tuning
    access_token_from_argv: bool
    skipped_config_dir: str | None = None


@dataclass(frozen=True, slots=True)
class CliExit:
    """Not a run: print ``output`` (when not empty) and exit with ``code``."""

    code: int
    output: str
