"""Configuration of the local proxy, parsed once at the edge into frozen dataclasses.

:func:`load` turns the command line, the ``--config`` option file, the environment, the
service-mapping files of ``--config-dir`` and the ``--settings-json`` file into one validated
:class:`ProxySettings`, or a :class:`CliExit` for ``--help``, ``--version`` and
``--export-default-settings``. Flags, option-file keys, variables and mapping files are those of
the reference ``localproxy`` (aws-samples/aws-iot-securetunneling-localproxy).

Precedence, highest first: command line, ``--config`` file, environment, defaults. Options that
only make sense together are resolved as a group: the highest source that sets any of
``-r``/``-e`` decides the service endpoint, and the highest source that sets any of
``-m``/``-s``/``-d`` decides the mode; inside that one source the members must agree.

Every problem raises :class:`~proxy.errors.ConfigError` with one line that names the flag
(``-d``), variable (``AWSIOT_TUNNEL_REGION``), ``file:line`` or settings key. No message ever
contains a token: token values are never echoed, and the option file's bad lines are not quoted.
Nothing here reads ``os.environ``: the environment is an argument, and so is the directory that
relative paths and the default ``./config`` resolve against.
"""

from __future__ import annotations

import argparse
import configparser
import enum
import hmac
import ipaddress
import json
import math
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy import __version__, boundedjson
from proxy.errors import ConfigError
from proxy.protocol.messages import MAX_PAYLOAD, SERVICE_ID_RE
from proxy.tls import CAError, load_ca

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "ENV_ACCESS_TOKEN",
    "ENV_CLIENT_TOKEN",
    "ENV_ENDPOINT",
    "ENV_REGION",
    "PROG",
    "CliExit",
    "Endpoint",
    "Mode",
    "ProxySettings",
    "Secret",
    "ServiceMapping",
    "Tuning",
    "default_settings_json",
    "load",
    "parse_endpoint",
    "parse_mapping_list",
    "read_mapping_dir",
    "read_mapping_file",
]

#: The program name shown in help and error messages.
PROG = "iotunnel-proxy"

# Variable names, not secrets:
ENV_ACCESS_TOKEN = "AWSIOT_TUNNEL_ACCESS_TOKEN"  # noqa: S105
ENV_CLIENT_TOKEN = "AWSIOT_TUNNEL_CLIENT_TOKEN"  # noqa: S105
ENV_ENDPOINT = "AWSIOT_TUNNEL_ENDPOINT"
ENV_REGION = "AWSIOT_TUNNEL_REGION"

#: Where mappings are read from when neither ``--config-dir`` nor ``-s``/``-d`` is given; only
#: when every file in it is a mapping file (otherwise a source warns, a destination stops).
DEFAULT_CONFIG_DIR = "config"

_CLIENT_TOKEN_RE = re.compile(r"[a-zA-Z0-9-]{32,128}")
_HEADER_SAFE_RE = re.compile(r"[\x21-\x7e]+")
_REGION_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_LEVEL_RE = re.compile(r"[0-9]{1,3}")
# What an option-file key must look like to be quoted in an error: shorter than any client token,
# so that a token pasted on a line of its own is never echoed.
_OPTION_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,30}")
_MODE_QUERY = "local-proxy-mode"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_MAX_VERBOSITY = 6
_DEFAULT_VERBOSITY = 4


class Mode(enum.Enum):
    """Which end of the tunnel this proxy is."""

    SOURCE = "source"  #: listens on local ports; the operator's end
    DESTINATION = "destination"  #: connects to local services; the device's end


class Secret:
    """A token that must not be shown: ``repr()``, ``str()`` and formatting give ``[secure]``.

    Only :meth:`reveal` returns the value; call it where the WebSocket header is built.
    Equality compares the values in constant time; secrets are immutable and hashable.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """Return the secret value."""
        return self._value

    def __repr__(self) -> str:
        return "[secure]"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        # copy, deepcopy (and so dataclasses.asdict) and pickle rebuild through __init__.
        return Secret, (self._value,)


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


# --------------------------------------------------------------------------- values


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
    if not _HOST_RE.fullmatch(host):
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


# --------------------------------------------------------------------------- files


class _IniEntry(NamedTuple):
    key: str
    value: str
    line: int


class _CaseSensitiveParser(configparser.ConfigParser):
    """Keys are service IDs and option names: keep their case."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


_INI_SECTION = "entries"


def read_config_text(path: Path, display: str) -> str:
    """A configuration file's text; a missing, unreadable or non-UTF-8 file is a ConfigError
    naming ``display``."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{display}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{display}: {exc.strerror or exc}") from None


#: Mapping lines longer than this are not quoted in errors: an endpoint line is short, and a
#: long one may be a token pasted into the wrong file (tokens are 64 characters or more).
_QUOTABLE_LINE = 48


def _quotable(line: str) -> bool:
    return len(line) <= _QUOTABLE_LINE


def _read_ini(path: Path, display: str, *, expected: str, quote: bool) -> list[_IniEntry]:
    """Read ``KEY = value`` lines without a section header, as the reference proxy does.

    ``#`` and ``;`` start full-line comments; blank lines are fine; a value runs to the end of its
    line (no inline comments, no continuation lines). ``quote`` says whether a bad line may be
    quoted in the error (not in the option file, which may hold a token).
    """
    lines = [raw.strip() for raw in read_config_text(path, display).splitlines()]

    def bad(number: int, problem: str) -> ConfigError:
        shown = f"{lines[number - 1]!r}: " if quote and _quotable(lines[number - 1]) else ""
        return ConfigError(f"{display}:{number}: {shown}{problem}")

    def key_name(key: str) -> str:
        return repr(key) if quote or _OPTION_NAME_RE.fullmatch(key) else "an option"

    for number, line in enumerate(lines, 1):
        if line.startswith("["):
            raise bad(number, "section headers are not allowed")
    parser = _CaseSensitiveParser(
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        interpolation=None,
    )
    # Lines are fed stripped, so an indented line is never a continuation of the one before;
    # the supplied header shifts configparser's line numbers by one.
    try:
        parser.read_string(f"[{_INI_SECTION}]\n" + "\n".join(lines), source=display)
    except configparser.DuplicateOptionError as exc:
        raise bad((exc.lineno or 1) - 1, f"{key_name(exc.option)} is set twice") from None
    except configparser.ParsingError as exc:
        raise bad(exc.errors[0][0] - 1, f"expected {expected!r}") from None
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if line and line[0] not in "#;":
            first_line.setdefault(line.partition("=")[0].rstrip(), number)
    return [_IniEntry(key, value, first_line[key]) for key, value in parser[_INI_SECTION].items()]


class _Sourced(NamedTuple):
    mapping: ServiceMapping
    origin: str


def _mapping_file_entries(path: Path, display: str, mode: Mode) -> list[_Sourced]:
    entries: list[_Sourced] = []
    for key, value, line in _read_ini(path, display, expected="SERVICE_ID = endpoint", quote=True):
        where = f"{display}:{line}"
        try:
            mapping = ServiceMapping(_service_id(key), _endpoint(value, mode))
        except _Invalid as exc:
            shown = f"{key} = {value}"
            raise ConfigError(
                f"{where}: {shown!r}: {exc}" if _quotable(shown) else f"{where}: {exc}"
            ) from None
        entries.append(_Sourced(mapping, where))
    return entries


def read_mapping_file(
    path: Path, *, mode: Mode, display: str | None = None
) -> list[ServiceMapping]:
    """Read one mapping file of ``SERVICE_ID = endpoint`` lines (no section header).

    Args:
        path: The file.
        mode: The proxy's mode (it decides which endpoints are valid).
        display: The name used in error messages; ``str(path)`` by default.

    Raises:
        ConfigError: The file cannot be read or a line is wrong (named as ``file:line``).
    """
    shown = str(path) if display is None else display
    return [entry.mapping for entry in _mapping_file_entries(path, shown, mode)]


#: Leftovers of package managers and editors, never read as mapping files.
_IGNORED_SUFFIXES = (
    "~",
    ".dpkg-old",
    ".dpkg-new",
    ".dpkg-dist",
    ".dpkg-tmp",
    ".dpkg-bak",
    ".ucf-old",
    ".ucf-new",
    ".ucf-dist",
    ".rpmnew",
    ".rpmsave",
    ".rpmorig",
)


def _mapping_files(directory: Path, display: str) -> list[Path]:
    """Regular, non-hidden files under ``directory`` (recursively, as the reference), sorted."""

    def unreadable(exc: OSError) -> NoReturn:
        raise ConfigError(f"{display}: cannot read {exc.filename}: {exc.strerror or exc}")

    found: list[Path] = []
    for root, dirs, files in os.walk(directory, onerror=unreadable):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found.extend(
            Path(root, name)
            for name in files
            if not name.startswith(".")
            and not name.endswith(_IGNORED_SUFFIXES)
            and Path(root, name).is_file()
        )
    return sorted(found, key=lambda path: path.relative_to(directory).parts)


def _mapping_dir_entries(directory: Path, display: str, mode: Mode) -> list[_Sourced]:
    entries: dict[str, _Sourced] = {}
    for path in _mapping_files(directory, display):
        shown = os.path.join(display, *path.relative_to(directory).parts)
        for entry in _mapping_file_entries(path, shown, mode):
            earlier = entries.get(entry.mapping.service_id)
            if earlier is not None:
                raise ConfigError(
                    f"{entry.origin}: service ID {entry.mapping.service_id!r} is already mapped "
                    f"at {earlier.origin}"
                )
            entries[entry.mapping.service_id] = entry
    return list(entries.values())


def read_mapping_dir(
    directory: Path, *, mode: Mode, display: str | None = None
) -> list[ServiceMapping]:
    """Read every mapping file under ``directory`` (see ``--config-dir``).

    Hidden files and directories and package-manager leftovers (``*.dpkg-old``, ``*~`` ...) are
    skipped. A service ID may appear once across all files.

    Args:
        directory: The directory.
        mode: The proxy's mode (it decides which endpoints are valid).
        display: The directory's name in error messages; ``str(directory)`` by default.

    Raises:
        ConfigError: A file cannot be read, a line is wrong, or a service ID repeats.
    """
    shown = str(directory) if display is None else display
    return [entry.mapping for entry in _mapping_dir_entries(directory, shown, mode)]


# --------------------------------------------------------------------------- settings json

_OUR_PREFIX = "iotunnel."


class _ReferenceKey(NamedTuple):
    field: str
    scale: float | None = None  # ms -> s for time fields; None keeps the integer


_REFERENCE_KEYS: dict[str, _ReferenceKey] = {
    "tunneling.proxy.websocket.ping_period_ms": _ReferenceKey("ping_interval", 0.001),
    "tunneling.proxy.websocket.retry_delay_ms": _ReferenceKey("reconnect_base", 0.001),
    "tunneling.proxy.websocket.connect_retry_count": _ReferenceKey("reconnect_attempts"),
    "tunneling.proxy.tcp.max_active_connections": _ReferenceKey("max_connections"),
    "tunneling.proxy.message.max_payload_size": _ReferenceKey("read_chunk"),
    "tunneling.proxy.tcp.write_buffer_size": _ReferenceKey("local_write_buffer"),
}

_REFERENCE_IGNORED = frozenset(
    {
        "tunneling.proxy.message.data_length_size",
        "tunneling.proxy.message.max_size",
        "tunneling.proxy.message.data_frame_max_size",
        "tunneling.proxy.tcp.connection_retry_count",
        "tunneling.proxy.tcp.connection_retry_delay_ms",
        "tunneling.proxy.tcp.read_buffer_size",
        "tunneling.proxy.websocket.max_frame_size",
        "tunneling.proxy.websocket.write_buffer_size",
        "tunneling.proxy.websocket.read_buffer_size",
        "tunneling.proxy.websocket.reconnect_on_data_error",
    }
)
_KEY_BIND_ADDRESS = "tunneling.proxy.default_bind_address"
_KEY_ENDPOINT_FORMAT = "tunneling.proxy.endpoint_format"
_KEY_REGION_OVERRIDE = "tunneling.proxy.region_endpoint_overrides."
_KEY_SUBPROTOCOL = "tunneling.proxy.websocket.subprotocol"
_SUBPROTOCOL = "aws.iot.securetunneling-3.0"


@dataclass(frozen=True, slots=True)
class _FileSettings:
    """What a ``--settings-json`` file says."""

    tuning: Tuning
    default_bind_address: str | None = None
    endpoint_format: str | None = None
    region_hosts: tuple[tuple[str, str], ...] = ()


def default_settings_json() -> str:
    """The default :class:`Tuning` as a ``--settings-json`` document (our own keys)."""
    defaults = Tuning()
    document = {"iotunnel": {f.name: getattr(defaults, f.name) for f in fields(Tuning)}}
    return json.dumps(document, indent=4) + "\n"


def _flatten(
    document: Mapping[str, object], prefix: str, out: dict[str, object], display: str
) -> None:
    for key, value in document.items():
        dotted = prefix + key
        if isinstance(value, dict):
            _flatten(value, dotted + ".", out, display)
        elif dotted in out:
            raise ConfigError(f"{display}: {_key(dotted)}: set twice")
        else:
            out[dotted] = value


def _reference_int(value: object) -> int:
    """A reference value: a JSON integer or the decimal string its export writes."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(f"expected an integer, not {_brief(value)}")


def _settings_string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, not {_brief(value)}")
    return value.strip()


def _service_host(text: str) -> str:
    """Check a service ``host[:port]`` from the settings file; return it unchanged."""
    _, port = _split_host_port(text)
    if port is not None:
        _port(port, allow_zero=False)
    return text


def _tuning_value(key: str, value: object) -> tuple[str, int | float]:
    """Convert one ``iotunnel.*`` or mapped reference key to (Tuning field, value)."""
    if key in _REFERENCE_KEYS:
        name, scale = _REFERENCE_KEYS[key]
        number = _reference_int(value)
        value = number if scale is None else number * scale
        context = f"as {name}: "
    else:
        name, context = key[len(_OUR_PREFIX) :], ""
        if name not in _TUNING_RANGES:
            raise _Invalid("unknown setting")
    limits = _TUNING_RANGES[name]
    problem = limits.problem(value)
    if problem is not None:
        raise _Invalid(context + problem)
    assert isinstance(value, int | float)
    return name, float(value) if limits.kind is float else value


def _settings_entry(
    key: str, value: object, tuning: dict[str, tuple[int | float, str]], extra: dict[str, str]
) -> None:
    """Apply one flattened key: to ``tuning`` (field -> (value, key)) or to ``extra``."""
    if key.startswith(_OUR_PREFIX) or key in _REFERENCE_KEYS:
        name, number = _tuning_value(key, value)
        if name in tuning:
            raise _Invalid(f"sets {name} again (already set by {tuning[name][1]})")
        tuning[name] = number, key
    elif key in _REFERENCE_IGNORED:
        if not isinstance(value, str | int | bool):
            raise _Invalid(f"expected a string, number or boolean, not {_brief(value)}")
    elif key == _KEY_SUBPROTOCOL:
        if value != _SUBPROTOCOL:
            raise _Invalid(f"only {_SUBPROTOCOL!r} is supported; use -y V1|V2 for older peers")
    elif key == _KEY_BIND_ADDRESS:
        extra[key] = _bind_address(_settings_string(value))
    elif key == _KEY_ENDPOINT_FORMAT:
        text = _settings_string(value)
        if text.count("%s") != 1:
            raise _Invalid("must contain '%s' (the region) once")
        _service_host(text.replace("%s", "us-east-1"))
        extra[key] = text
    elif key.startswith(_KEY_REGION_OVERRIDE) and len(key) > len(_KEY_REGION_OVERRIDE):
        extra[key] = _service_host(_settings_string(value).lower())
    else:
        raise _Invalid("unknown setting")


def _read_settings_json(path: Path, display: str) -> _FileSettings:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in pairs:
            if key in result:
                raise ConfigError(f"{display}: key {_brief(key)} appears twice in one object")
            result[key] = value
        return result

    def no_constant(name: str) -> NoReturn:
        raise ConfigError(f"{display}: {name} is not a valid setting value")

    text = read_config_text(path, display)
    try:
        document = boundedjson.loads(
            text, object_pairs_hook=no_duplicates, parse_constant=no_constant
        )
    except boundedjson.JSONInputError as exc:
        raise ConfigError(f"{display}: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{display}: expected a JSON object at the top level")
    flat: dict[str, object] = {}
    _flatten(document, "", flat, display)
    tuning: dict[str, tuple[int | float, str]] = {}
    extra: dict[str, str] = {}
    for key, value in flat.items():
        try:
            _settings_entry(key, value, tuning, extra)
        except _Invalid as exc:
            raise ConfigError(f"{display}: {_key(key)}: {exc}") from None
    values: dict[str, Any] = {name: value for name, (value, _) in tuning.items()}
    try:
        knobs = Tuning(**values)
    except ValueError as exc:
        raise ConfigError(f"{display}: {exc}") from None
    return _FileSettings(
        tuning=knobs,
        default_bind_address=extra.get(_KEY_BIND_ADDRESS),
        endpoint_format=extra.get(_KEY_ENDPOINT_FORMAT),
        region_hosts=tuple(
            (key[len(_KEY_REGION_OVERRIDE) :], value)
            for key, value in extra.items()
            if key.startswith(_KEY_REGION_OVERRIDE)
        ),
    )


# --------------------------------------------------------------------------- options


class _Option(NamedTuple):
    name: str  # the long flag without dashes; also the key in a --config file
    short: str | None
    metavar: str | None  # None: a switch
    help: str

    @property
    def label(self) -> str:
        """How error messages name the flag: the short form when there is one."""
        return f"-{self.short}" if self.short else f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


#: Options that may also be set in a --config file, in help order.
_OPTIONS = (
    _Option("region", "r", "REGION", "AWS region of the tunnel, e.g. us-east-1"),
    _Option(
        "proxy-endpoint",
        "e",
        "ENDPOINT",
        "tunnel service endpoint: HOST[:PORT] (port 443) or a wss:// or ws:// URL",
    ),
    _Option(
        "access-token",
        "t",
        "TOKEN",
        f"tunnel access token; visible to other users here: prefer {ENV_ACCESS_TOKEN}",
    ),
    _Option("client-token", "i", "TOKEN", "client token (32..128 of a-z A-Z 0-9 -)"),
    _Option(
        "source-listen-port",
        "s",
        "MAPPINGS",
        "source mode; listen ports: 5555 or SSH1=5555,HTTP1=5556",
    ),
    _Option(
        "destination-app",
        "d",
        "MAPPINGS",
        "destination mode; endpoints: 22 or SSH1=22,HTTP1=host:80,WEB=/run/app.sock",
    ),
    _Option("mode", "m", "MODE", "src, source, dst or destination (else implied by -s/-d)"),
    _Option(
        "local-bind-address",
        "b",
        "ADDRESS",
        "address to listen on (source) or host of port-only mappings (destination)",
    ),
    _Option(
        "capath", "c", "PATH", "CA file or directory to trust for the service, besides the system's"
    ),
    _Option(
        "no-ssl-host-verify",
        "k",
        None,
        "do not verify the service's certificate at all (development and testing only)",
    ),
    _Option(
        "verbose",
        "v",
        "LEVEL",
        "0 off, 1 fatal, 2 error, 3 warning, 4 info (default), 5 debug, 6..255 trace",
    ),
    _Option(
        "destination-client-type",
        "y",
        "V1|V2",
        "source mode: the destination speaks protocol V1 or V2",
    ),
    _Option(
        "config-dir",
        None,
        "DIR",
        f"directory of SERVICE_ID = endpoint files (default ./{DEFAULT_CONFIG_DIR})",
    ),
    _Option("settings-json", None, "FILE", "fine-grained settings (JSON)"),
)
_OPTIONS_BY_NAME = {option.name: option for option in _OPTIONS}
_CLI_ONLY = frozenset({"config", "export-default-settings", "help", "version"})
_ENVIRONMENT = {
    ENV_REGION: "region",
    ENV_ENDPOINT: "proxy-endpoint",
    ENV_ACCESS_TOKEN: "access-token",
    ENV_CLIENT_TOKEN: "client-token",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class _Given(NamedTuple):
    """One option's value as text, and where it came from (for messages)."""

    value: str
    origin: str


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line :class:`ConfigError`\\ s that echo no value."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"ignored explicit argument .*", "takes no value", message)
        raise ConfigError(" ".join(message.split()))


class _Once(argparse.Action):
    """Store a value, refusing a second occurrence of the flag."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "given more than once")
        setattr(namespace, self.dest, values)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A fixed width, so help does not depend on the terminal (or on ``$COLUMNS``)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


_EPILOG = f"""\
environment:
  {ENV_ACCESS_TOKEN}   access token (the safe way to pass it)
  {ENV_CLIENT_TOKEN}   client token
  {ENV_REGION}         region (like -r)
  {ENV_ENDPOINT}       endpoint (like -e)

Precedence: command line > --config file > environment > defaults.
A --config file holds "long-option = value" lines, e.g. "region = us-east-1".
Mapping files hold "SERVICE_ID = endpoint" lines, e.g. "SSH1 = 22"."""


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="AWS IoT Secure Tunneling local proxy (compatible with localproxy).",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    for option in _OPTIONS:
        flags = [f"-{option.short}"] if option.short else []
        flags.append(f"--{option.name}")
        if option.metavar is None:
            parser.add_argument(
                *flags, dest=option.dest, action="store_const", const="true", help=option.help
            )
        else:
            parser.add_argument(
                *flags, dest=option.dest, action=_Once, metavar=option.metavar, help=option.help
            )
    parser.add_argument("--config", action=_Once, metavar="FILE", help="read options from FILE")
    parser.add_argument(
        "--export-default-settings",
        action=_Once,
        metavar="FILE",
        help="write the default --settings-json to FILE and exit",
    )
    parser.add_argument("-V", "--version", action="store_true", help="show the version and exit")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    return parser


def _parse_argv(parser: _Parser, argv: Sequence[str]) -> argparse.Namespace:
    namespace, extras = parser.parse_known_args(list(argv))
    if extras:
        first = extras[0]
        if first != "--" and first.startswith("-") and len(first) > 1:
            # Name only the option: a glued value (--x=VALUE, -xVALUE) may be a token.
            name = first.partition("=")[0] if first.startswith("--") else first[:2]
            raise ConfigError(f"unrecognized option {name!r}")
        # Never echo a positional value: it is often a token that lost its -t.
        raise ConfigError("unexpected argument: every value needs a flag (see --help)")
    return namespace


def _read_option_file(path: Path, display: str) -> dict[str, _Given]:
    """Read a ``--config`` file: ``long-option = value`` lines, like the reference's."""
    given: dict[str, _Given] = {}
    for key, value, line in _read_ini(path, display, expected="option = value", quote=False):
        where = f"{display}:{line}"
        if key in _CLI_ONLY:
            raise ConfigError(f"{where}: {key!r} is not allowed in a --config file")
        if key not in _OPTIONS_BY_NAME:
            shown = f" {key!r}" if _OPTION_NAME_RE.fullmatch(key) else ""
            raise ConfigError(f"{where}: unknown option{shown}")
        given[key] = _Given(value, f"{where}: {key}")
    return given


class _Sources:
    """The layers of given options, highest precedence first."""

    def __init__(self, layers: Sequence[Mapping[str, _Given]]) -> None:
        self._layers = layers

    def get(self, name: str) -> _Given | None:
        for layer in self._layers:
            if name in layer:
                return layer[name]
        return None

    def group(self, *names: str) -> dict[str, _Given]:
        """The members of ``names`` set by the highest layer that sets any of them."""
        for layer in self._layers:
            found = {name: layer[name] for name in names if name in layer}
            if found:
                return found
        return {}


# --------------------------------------------------------------------------- converters


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


def _access_token(given: _Given) -> Secret:
    token = given.value.strip()
    if not token:
        _fail(given, "the access token is empty", quote=False)
    if not _HEADER_SAFE_RE.fullmatch(token):
        _fail(given, "the access token has characters an HTTP header cannot carry", quote=False)
    return Secret(token)


def _client_token(given: _Given) -> Secret:
    token = given.value.strip()
    if not _CLIENT_TOKEN_RE.fullmatch(token):
        _fail(given, "a client token is 32..128 characters of a-z, A-Z, 0-9 and '-'", quote=False)
    return Secret(token)


def _region_url(given: _Given, mode: Mode, settings: _FileSettings) -> str:
    region = given.value.strip().lower()
    if not _REGION_RE.fullmatch(region):
        _fail(given, "not an AWS region name (e.g. us-east-1)")
    overrides = dict(settings.region_hosts)
    if region in overrides:
        host = overrides[region]
    elif settings.endpoint_format is not None:
        host = settings.endpoint_format.replace("%s", region)
    else:
        suffix = ".amazonaws.com.cn" if region.startswith("cn-") else ".amazonaws.com"
        host = f"data.tunneling.iot.{region}{suffix}"
    return _service_url(host, mode)  # the settings file's hosts were checked when read


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _service_url(text: str, mode: Mode) -> str:
    """``HOST[:PORT]`` or a ``wss://``/``ws://`` URL -> the tunnel URL for ``mode``."""
    if "://" not in text:
        host, port = _split_host_port(text.lower())
        number = 443 if port is None else _port(port, allow_zero=False)
        query = urlencode({_MODE_QUERY: mode.value})
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
        if key == _MODE_QUERY and value != mode.value:
            raise _Invalid(f"the URL asks for {_MODE_QUERY}={value}, but the mode is {mode.value}")
    params = [(key, value) for key, value in params if key != _MODE_QUERY]
    params.append((_MODE_QUERY, mode.value))
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


# --------------------------------------------------------------------------- load


def _resolve_mode(sources: _Sources) -> tuple[Mode, _Given | None]:
    """The mode, and the -s/-d value (if any) of the layer that decided it."""
    group = sources.group("mode", "source-listen-port", "destination-app")
    source, destination = group.get("source-listen-port"), group.get("destination-app")
    if source is not None and destination is not None:
        raise ConfigError(f"{source.origin} and {destination.origin} cannot be used together")
    apps = source or destination
    implied = Mode.SOURCE if source is not None else Mode.DESTINATION
    given_mode = group.get("mode")
    if given_mode is not None:
        mode = _mode(given_mode)
        if apps is not None and implied is not mode:
            raise ConfigError(f"{apps.origin} cannot be used with {given_mode.origin} {mode.value}")
        return mode, apps
    if apps is None:
        raise ConfigError("cannot tell the mode: give -s (source), -d (destination) or -m src|dst")
    return implied, apps


def _resolve_mappings(
    sources: _Sources, mode: Mode, apps: _Given | None, cwd: Path
) -> tuple[tuple[ServiceMapping, ...], str | None]:
    """The mappings, and a warning when the default ``./config`` was not usable."""
    from_cli: list[_Sourced] = []
    if apps is not None:
        from_cli = [
            _Sourced(mapping, apps.origin)
            for mapping in parse_mapping_list(apps.value, flag=apps.origin, mode=mode)
        ]
    config_dir = sources.get("config-dir")
    from_files: list[_Sourced] = []
    read_dir: str | None = None
    skipped: str | None = None
    if config_dir is not None:
        read_dir = config_dir.value.strip()
        if not read_dir or not (cwd / read_dir).is_dir():
            _fail(config_dir, "not a directory")
        from_files = _mapping_dir_entries(cwd / read_dir, read_dir, mode)
    elif apps is None and (cwd / DEFAULT_CONFIG_DIR).is_dir():
        # The implicit ./config may be some other program's settings (a checkout's or
        # /etc/iotunnel's config/). Explicit --config-dir is strict; the default is used only
        # when all of it reads as mappings, as the reference skips files it cannot parse.
        try:
            from_files = _mapping_dir_entries(cwd / DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_DIR, mode)
        except ConfigError as exc:
            if mode is Mode.DESTINATION:
                raise ConfigError(
                    "destination mode needs a service mapping: give -d (e.g. -d SSH1=22) or "
                    f"--config-dir; the default ./{DEFAULT_CONFIG_DIR} is not a mapping "
                    f"directory: {exc}"
                ) from None
            skipped = (
                f"not using ./{DEFAULT_CONFIG_DIR} for mappings ({exc}); every service gets a "
                "free port (choose with -s or --config-dir)"
            )
        else:
            read_dir = DEFAULT_CONFIG_DIR

    overridden = {entry.mapping.service_id for entry in from_cli}
    merged = from_cli + [e for e in from_files if e.mapping.service_id not in overridden]
    unnamed = [entry for entry in merged if not entry.mapping.service_id]
    named = [entry for entry in merged if entry.mapping.service_id]
    if unnamed and named:
        raise ConfigError(
            f"{unnamed[0].origin}: an unnamed mapping cannot be combined with named ones "
            f"({named[0].mapping.service_id!r} from {named[0].origin})"
        )
    if not merged and mode is Mode.DESTINATION:
        where = f" (none found in {read_dir})" if read_dir is not None else ""
        raise ConfigError(
            "destination mode needs a service mapping: give -d (e.g. -d SSH1=22) or "
            f"SERVICE_ID = endpoint lines in --config-dir{where}"
        )
    return tuple(entry.mapping for entry in merged), skipped


def _resolve_url(sources: _Sources, mode: Mode, settings: _FileSettings) -> str:
    group = sources.group("region", "proxy-endpoint")
    region, endpoint = group.get("region"), group.get("proxy-endpoint")
    if region is not None and endpoint is not None:
        raise ConfigError(f"{region.origin} and {endpoint.origin} cannot be used together")
    if region is not None:
        return _region_url(region, mode, settings)
    if endpoint is not None:
        return _endpoint_url(endpoint, mode)
    raise ConfigError(f"give -r REGION or -e ENDPOINT (or set {ENV_REGION} or {ENV_ENDPOINT})")


def _settings(sources: _Sources, cwd: Path, *, token_from_argv: bool) -> ProxySettings:
    mode, apps = _resolve_mode(sources)

    settings_json = sources.get("settings-json")
    file_settings = (
        _read_settings_json(_existing_path(settings_json, cwd), settings_json.value.strip())
        if settings_json is not None
        else _FileSettings(Tuning())
    )
    url = _resolve_url(sources, mode, file_settings)

    token = sources.get("access-token")
    if token is None:
        raise ConfigError(
            f"no access token: set {ENV_ACCESS_TOKEN} (or access-token in --config, or -t)"
        )
    client = sources.get("client-token")

    peer_version = 3
    client_type = sources.get("destination-client-type")
    if client_type is not None:
        # Validated in either mode, used only by a source: a destination detects each peer's
        # version itself. The Greengrass tunneling component passes it to destinations.
        checked = _peer_version(client_type)
        if mode is Mode.SOURCE:
            peer_version = checked

    bind = sources.get("local-bind-address")
    if bind is None:
        # The settings file's default is a listen address: a destination takes only an
        # explicit -b as the host of its port-only mappings (as the reference does).
        bind_address = file_settings.default_bind_address if mode is Mode.SOURCE else None
    else:
        try:
            bind_address = _bind_address(bind.value.strip())
        except _Invalid as exc:
            _fail(bind, str(exc))
    capath = sources.get("capath")
    no_verify = sources.get("no-ssl-host-verify")
    verbose = sources.get("verbose")
    mappings, skipped_config_dir = _resolve_mappings(sources, mode, apps, cwd)
    return ProxySettings(
        mode=mode,
        url=url,
        access_token=_access_token(token),
        client_token=None if client is None else _client_token(client),
        mappings=mappings,
        bind_address=bind_address,
        ca_path=None if capath is None else _ca_path(capath, cwd),
        verify_host=no_verify is None or not _switch(no_verify),
        verbosity=_DEFAULT_VERBOSITY if verbose is None else _verbosity(verbose),
        peer_version=peer_version,
        tuning=file_settings.tuning,
        access_token_from_argv=token_from_argv,
        skipped_config_dir=skipped_config_dir,
    )


def _cli_layer(namespace: argparse.Namespace) -> dict[str, _Given]:
    return {
        option.name: _Given(getattr(namespace, option.dest), option.label)
        for option in _OPTIONS
        if getattr(namespace, option.dest) is not None
    }


def _environment_layer(environ: Mapping[str, str]) -> dict[str, _Given]:
    """The reference's variables; an empty variable counts as unset."""
    return {
        name: _Given(environ[variable], variable)
        for variable, name in _ENVIRONMENT.items()
        if environ.get(variable, "").strip()
    }


def _export_default_settings(target: str, cwd: Path) -> None:
    try:
        (cwd / target).write_text(default_settings_json(), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--export-default-settings: {target!r}: {exc.strerror or exc}") from None


def load(
    argv: Sequence[str], environ: Mapping[str, str], cwd: Path | None = None
) -> ProxySettings | CliExit:
    """Parse the proxy's configuration.

    Args:
        argv: The command-line arguments, without the program name.
        environ: The environment (only the ``AWSIOT_TUNNEL_*`` variables are read).
        cwd: The directory that relative paths and the default ``./config`` are relative to;
            the process's working directory when ``None``.

    Returns:
        The settings to run with, or a :class:`CliExit` for ``--help``, ``--version`` and
        ``--export-default-settings`` (which writes its file before returning).

    Raises:
        ConfigError: Anything is wrong; the one-line message names the flag, variable,
            ``file:line`` or key.
    """
    base = Path.cwd() if cwd is None else cwd
    parser = _build_parser()
    namespace = _parse_argv(parser, argv)
    if namespace.help:
        return CliExit(0, parser.format_help())
    if namespace.version:
        return CliExit(0, f"{PROG} {__version__}\n")
    if namespace.export_default_settings is not None:
        _export_default_settings(namespace.export_default_settings, base)
        return CliExit(0, "")
    cli = _cli_layer(namespace)
    layers: list[Mapping[str, _Given]] = [cli]
    if namespace.config is not None:
        layers.append(_read_option_file(base / namespace.config, namespace.config))
    layers.append(_environment_layer(environ))
    return _settings(_Sources(layers), base, token_from_argv="access-token" in cli)
