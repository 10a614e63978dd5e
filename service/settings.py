"""The service's settings: flags over the ``--config`` file over defaults, checked once.

Every long option is also a key of the settings file's ``[service]`` section (the option without
its dashes); the file's values are converted and checked by the same converters as the flags,
and a bad one names the file, the section and the key. Options that only make sense together
are checked here too, so that a :class:`ServiceSettings` is consistent; what needs the file
system or optional packages (certificates, credentials, ``h11``) is checked where it is used.

Errors are one line: :class:`~iotunnel.cli.UsageError` for the command line and the option
combinations, :class:`~iotunnel.errors.ConfigError` for the settings file (exit 2 either way).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from iotunnel import __version__
from iotunnel.cli import Parser, UsageError
from iotunnel.errors import ConfigError
from iotunnel.rules import AWS_REGION_RE
from proxy.protocol.framing import MAX_WS_MESSAGE
from proxy.protocol.messages import MAX_MESSAGE
from service.config import read_settings
from service.control import Limits
from service.registry import ServiceIdRule
from service.throttle import DEFAULT_THROTTLE

__all__ = ["PROG", "ServiceSettings", "build_parser", "load", "parse"]

PROG = "iotunnel-service"
#: Default port: the unprivileged sibling of 443 (AWS's port), so that no root is needed.
DEFAULT_PORT = 8443
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "123456789012"

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?")
_SIZE_UNITS = {
    None: 1,
    "k": 1000,
    "K": 1000,
    "m": 1000**2,
    "M": 1000**2,
    "g": 1000**3,
    "G": 1000**3,
    "ki": 1024,
    "Ki": 1024,
    "mi": 1024**2,
    "Mi": 1024**2,
    "gi": 1024**3,
    "Gi": 1024**3,
}


# ---------------------------------------------------------------------------- converters


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _int_range(low: int, high: int) -> Any:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}: {value}")
        return value

    return convert


def _number(of: str, unit: str, *, zero: bool) -> Callable[[str], float]:
    """A converter to a finite number of ``unit``: above 0, or 0 and above when ``zero``
    (``of``: how an error names it, "of seconds" or "per second")."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number {of}: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            least = f"0 or more {unit}" if zero else f"a positive number {of}"
            raise argparse.ArgumentTypeError(f"must be {least}: {text!r}")
        return value

    return convert


_seconds = _number("of seconds", "seconds", zero=False)
_retention = _number("of seconds", "seconds", zero=True)
_rate = _number("per second", "per second", zero=True)


def _size(text: str) -> int:
    """Bytes, with an optional suffix: k/M/G (powers of 1000) or Ki/Mi/Gi (of 1024)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (a number of bytes, optionally with k, M, G, Ki, Mi or Gi)"
        )
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def _pattern(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r}: {exc}") from None


def _word(what: str, regex: str) -> Any:
    compiled = re.compile(regex)

    def convert(text: str) -> str:
        if not compiled.fullmatch(text):
            raise argparse.ArgumentTypeError(f"not a valid {what}: {text!r}")
        return text

    return convert


_region = _word("region", AWS_REGION_RE.pattern)
_account = _word("account id", r"\d{12}")
_client_id = _word("MQTT client id", r"[A-Za-z0-9_.:-]{1,128}")


# ---------------------------------------------------------------------------- parser


class _Key(NamedTuple):
    """How a settings-file key becomes a value: the field it sets and its converter."""

    dest: str
    convert: Callable[[str], Any] | None
    switch: bool


class _Group:
    """An argument group whose long options are recorded as settings-file keys."""

    def __init__(self, add: Callable[..., argparse.Action], keys: dict[str, _Key]) -> None:
        self._add = add
        self._keys = keys

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        action = self._add(*flags, **kwargs)
        if action.dest in _NOT_SETTINGS:
            return
        switch = kwargs.get("action") == "store_true"
        for flag in flags:
            if flag.startswith("--"):
                self._keys[flag[2:]] = _Key(action.dest, kwargs.get("type"), switch)


class _KeyedParser(Parser):
    """A :class:`~iotunnel.cli.Parser` that records its long options as settings-file keys."""

    def __init__(self, keys: dict[str, _Key], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keys = keys

    def group(self, title: str) -> _Group:
        return _Group(self.add_argument_group(title).add_argument, self.keys)

    def option(self, *flags: str, **kwargs: Any) -> None:
        _Group(self.add_argument, self.keys).add_argument(*flags, **kwargs)


_NOT_SETTINGS = frozenset({"help", "version", "config"})


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    return _build()[0]


def _build() -> tuple[Parser, dict[str, _Key]]:
    """The parser, and the settings-file key of each long option."""
    keys: dict[str, _Key] = {}
    parser = _KeyedParser(
        keys,
        prog=PROG,
        description=(
            "Self-hosted AWS IoT Secure Tunneling service: the /tunnel WebSocket endpoint that "
            "local proxies (source and destination) connect to and, with --api-port, the "
            "management API that the AWS CLI and boto3 drive (--endpoint-url), with MQTT "
            "notifications to devices."
        ),
        epilog=(
            "Access tokens are never read from the command line: they come from the API "
            "(OpenTunnel) or from the tunnels file (keep it private: chmod 600). Every option "
            "can also be set in the --config file; see config/service.ini."
        ),
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings file (INI, section [service], keys are these long options without "
        "the dashes); command-line flags win",
    )

    net = parser.group("listeners")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    net.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="port of the /tunnel WebSocket endpoint, 0 for any free port (default %(default)s)",
    )
    net.add_argument(
        "--api-port",
        type=_port,
        metavar="PORT",
        help="serve the management API (AWS JSON 1.1: OpenTunnel, CloseTunnel, ...) on this "
        "port, 0 for any free port; without it there is no API",
    )
    net.add_argument("--api-host", metavar="HOST", help="address the API binds (default: --host)")
    net.add_argument("--cert", type=Path, help="server certificate chain (PEM), for both")
    net.add_argument("--key", type=Path, help="private key of --cert (PEM)")
    net.add_argument(
        "--plain",
        action="store_true",
        help="serve unencrypted ws:// and http:// instead of wss:// and https:// (testing only)",
    )

    state = parser.group("tunnels and state")
    state.add_argument(
        "--tunnels",
        type=Path,
        metavar="FILE",
        help='JSON file declaring tunnels: {"tunnels": [{"tunnelId", "services", '
        '"sourceAccessToken", "destinationAccessToken"}]}; they never expire',
    )
    state.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="SQLite database that keeps the tunnels (ids, token digests, lifetimes, tags) "
        "across restarts; created if missing (mode 0600). Default: memory only, lost on exit",
    )
    state.add_argument(
        "--closed-retention",
        type=_retention,
        default=3 * 3600.0,
        metavar="SECONDS",
        help="how long a closed tunnel stays describable (default %(default).0f: AWS keeps "
        "them at least three hours)",
    )

    aws = parser.group("AWS identity and authentication")
    aws.add_argument(
        "--region",
        type=_region,
        default=DEFAULT_REGION,
        help="region in ARNs, notifications and SigV4 scopes (default %(default)s)",
    )
    aws.add_argument(
        "--account-id",
        type=_account,
        default=DEFAULT_ACCOUNT,
        help="12-digit account id in tunnel ARNs (default %(default)s)",
    )
    aws.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="AWS shared-credentials file (profiles with aws_access_key_id and "
        "aws_secret_access_key): API requests must be SigV4-signed with one of them. "
        "Without it, signatures are not checked and unsigned requests are accepted",
    )

    mqtt = parser.group("MQTT notifications (OpenTunnel/RotateTunnelAccessToken)")
    mqtt.add_argument(
        "--mqtt-host",
        metavar="HOST",
        help="MQTT broker to publish $aws/things/<thing>/tunnels/notify on (QoS 1, TLS); "
        "without it notifications are only logged",
    )
    mqtt.add_argument(
        "--mqtt-port", type=_port, default=8883, help="broker port (default %(default)s)"
    )
    mqtt.add_argument(
        "--mqtt-cert", type=Path, metavar="FILE", help="client certificate (PEM) for mutual TLS"
    )
    mqtt.add_argument("--mqtt-key", type=Path, metavar="FILE", help="private key of --mqtt-cert")
    mqtt.add_argument(
        "--mqtt-ca",
        type=Path,
        metavar="FILE",
        help="CA bundle (PEM) the broker's certificate is checked with (default: system's)",
    )
    mqtt.add_argument(
        "--mqtt-client-id",
        type=_client_id,
        metavar="ID",
        help="MQTT client id (default: iotunnel-service-<random>)",
    )

    limits = parser.group("limits (AWS's by default)")
    limits.add_argument(
        "--max-services",
        type=_int_range(1, 1000),
        default=3,
        metavar="N",
        help="services per tunnel in OpenTunnel (default %(default)s)",
    )
    limits.add_argument(
        "--service-id-pattern",
        type=_pattern,
        default=ServiceIdRule().pattern,
        metavar="REGEX",
        help="what a service id must match in full (default [a-zA-Z0-9:_-]+)",
    )
    limits.add_argument(
        "--max-service-id-length",
        type=_int_range(1, 4096),
        default=128,
        metavar="N",
        help="longest service id (default %(default)s)",
    )
    limits.add_argument(
        "--max-tunnels",
        type=_int_range(1, 1_000_000),
        default=Limits().max_tunnels,
        metavar="N",
        help="open tunnels at once (the tunnels file's included) beyond which OpenTunnel "
        "fails (default %(default)s)",
    )
    limits.add_argument(
        "--max-frame",
        type=_int_range(16, MAX_MESSAGE),
        default=MAX_MESSAGE,
        metavar="BYTES",
        help="largest tunnel frame a peer may send (default %(default)s, the 2-byte prefix's "
        "maximum)",
    )
    limits.add_argument(
        "--max-message",
        type=_int_range(1024, 16 * 1024 * 1024),
        default=MAX_WS_MESSAGE,
        metavar="BYTES",
        help="largest WebSocket message either way (default %(default)s)",
    )
    limits.add_argument(
        "--bandwidth-limit",
        type=_size,
        default=0,
        metavar="BYTES_PER_S",
        help="cap each tunnel at this many bytes per second in each direction (token bucket; "
        "k/M/G or Ki/Mi/Gi suffixes), emulating the AWS per-tunnel limit; 0: no cap (default)",
    )
    limits.add_argument(
        "--bandwidth-burst",
        type=_size,
        metavar="BYTES",
        help="token bucket size of --bandwidth-limit (default: --max-message)",
    )

    limits.add_argument(
        "--handshake-failure-rate",
        type=_rate,
        default=DEFAULT_THROTTLE.rate,
        metavar="PER_S",
        help="failed /tunnel handshakes (401, 403, 404) an address earns back per second once "
        "it has used its --handshake-failure-burst; while it has none, its handshakes get 429 "
        "with Retry-After. 0: no throttling (default %(default)s)",
    )
    limits.add_argument(
        "--handshake-failure-burst",
        type=_int_range(1, 1_000_000),
        default=DEFAULT_THROTTLE.burst,
        metavar="N",
        help="failed handshakes an address may have in a row before it is throttled "
        "(default %(default)s)",
    )
    limits.add_argument(
        "--handshake-throttle-addresses",
        type=_int_range(1, 10_000_000),
        default=DEFAULT_THROTTLE.max_addresses,
        metavar="N",
        help="addresses the throttle remembers at most, least recently seen forgotten first "
        "(default %(default)s)",
    )

    testing = parser.group("testing")
    testing.add_argument(
        "--minute-seconds",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="TESTING ONLY: length of a minute of tunnel lifetime (maxLifetimeTimeoutMinutes), "
        "so that tests need not wait minutes (default %(default).0f)",
    )

    parser.option("-v", "--verbose", action="store_true", help="log per-frame and handshake detail")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser, keys


_BOOLEANS = {
    **dict.fromkeys(("1", "yes", "true", "on"), True),
    **dict.fromkeys(("0", "no", "false", "off"), False),
}


def _file_defaults(keys: dict[str, _Key], path: Path) -> dict[str, Any]:
    """The values of a settings file, converted and checked, by field."""
    defaults: dict[str, Any] = {}
    for name, raw in read_settings(path).items():
        key = keys.get(name)
        if key is None:
            raise ConfigError(f"{path}: [service] {name}: unknown setting")
        value = raw.strip()
        try:
            if key.switch:
                lowered = value.lower()
                if lowered not in _BOOLEANS:
                    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")
                converted: Any = _BOOLEANS[lowered]
            elif key.convert is not None:
                converted = key.convert(value)
            else:
                converted = value
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: [service] {name}: {exc}") from None
        defaults[key.dest] = converted
    return defaults


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Every option of ``iotunnel-service``, converted and checked (see ``--help``)."""

    config: Path | None
    # listeners
    host: str
    port: int
    api_port: int | None
    api_host: str | None
    cert: Path | None
    key: Path | None
    plain: bool
    # tunnels and state
    tunnels: Path | None
    state: Path | None
    closed_retention: float
    # AWS identity and authentication
    region: str
    account_id: str
    credentials: Path | None
    # MQTT notifications
    mqtt_host: str | None
    mqtt_port: int
    mqtt_cert: Path | None
    mqtt_key: Path | None
    mqtt_ca: Path | None
    mqtt_client_id: str | None
    # limits
    max_services: int
    service_id_pattern: re.Pattern[str]
    max_service_id_length: int
    max_tunnels: int
    max_frame: int
    max_message: int
    bandwidth_limit: int
    bandwidth_burst: int | None
    handshake_failure_rate: float
    handshake_failure_burst: int
    handshake_throttle_addresses: int
    # testing
    minute_seconds: float
    verbose: bool


def _check(settings: ServiceSettings) -> None:
    """Options that only make sense together."""
    s = settings
    if s.plain and (s.cert or s.key):
        raise UsageError("--plain cannot be combined with --cert or --key")
    if not s.plain and not (s.cert and s.key):
        raise UsageError("--cert and --key are required (or --plain for ws:// and http://)")
    if s.credentials is not None and s.api_port is None:
        raise UsageError("--credentials needs --api-port")
    if s.mqtt_host is None:
        given = [
            name
            for name in ("mqtt_cert", "mqtt_key", "mqtt_ca", "mqtt_client_id")
            if getattr(s, name) is not None
        ]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} needs --mqtt-host")
    elif (s.mqtt_cert is None) != (s.mqtt_key is None):
        raise UsageError("--mqtt-cert and --mqtt-key go together")
    if s.max_message < s.max_frame + 2:
        raise UsageError(
            f"--max-message ({s.max_message}) must hold a whole frame: at least "
            f"--max-frame + 2 ({s.max_frame + 2})"
        )
    if s.bandwidth_limit <= 0 and s.bandwidth_burst is not None:
        raise UsageError("--bandwidth-burst needs --bandwidth-limit")


def load(argv: Sequence[str] | None) -> ServiceSettings:
    """:func:`parse`, then the options that only make sense together.

    Raises:
        ConfigError: bad flags (:class:`~iotunnel.cli.UsageError`) or settings.
        SystemExit: --help, --version (argparse has written the text).
    """
    settings = parse(argv)
    _check(settings)
    return settings


def parse(argv: Sequence[str] | None) -> ServiceSettings:
    """Flags over the settings file over the defaults, each value converted and checked.

    Raises:
        ConfigError: bad flags (:class:`~iotunnel.cli.UsageError`) or settings.
        SystemExit: --help, --version (argparse has written the text).
    """
    parser, keys = _build()
    pre = Parser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**_file_defaults(keys, known.config))
    namespace = parser.parse_args(argv)
    settings = ServiceSettings(
        **{f.name: getattr(namespace, f.name) for f in fields(ServiceSettings)}
    )
    return settings
