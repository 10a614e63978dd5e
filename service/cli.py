"""``iotunnel-service``: run the tunnel service from the command line.

Exit codes: 0 after SIGTERM or SIGINT (connections closed with 1001), 1 when an address cannot
be bound, 2 for bad input (flags, settings, tunnels, credentials or state file, certificate),
each with one line on stderr.

Once listening it prints one line per listener to stdout, so that a parent process can read
the ports: ``iotunnel-service: listening on wss://HOST:PORT`` (``ws://`` with ``--plain``) and,
with ``--api-port``, ``iotunnel-service: API listening on https://HOST:PORT`` (``http://``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import re
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from proxy import __version__
from proxy.io.memory import tune_allocator
from proxy.protocol.framing import MAX_WS_MESSAGE
from proxy.protocol.messages import MAX_MESSAGE
from service.clock import SystemClock
from service.config import (
    ConfigError,
    load_credentials,
    load_tunnels,
    read_settings,
    tls_context,
)
from service.control import ControlPlane, ControlSettings, Limits
from service.notify import LogNotifier, MqttNotifier, MqttSettings, Notifier
from service.registry import ServiceIdRule, TunnelRegistry
from service.server import Bandwidth, TunnelService
from service.store import SqliteStore, StoreError
from service.throttle import DEFAULT_THROTTLE, ThrottleSettings

PROG = "iotunnel-service"
#: Default port: the unprivileged sibling of 443 (AWS's port), so that no root is needed.
DEFAULT_PORT = 8443
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "123456789012"

log = logging.getLogger("service")

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


class _UsageError(Exception):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports errors in one line, through :func:`main`."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


class _OneLineFormatter(logging.Formatter):
    """One line per record: newlines (in tracebacks, or in a peer's close reason) escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _retention(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number per second: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more per second: {text!r}")
    return value


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


_region = _word("region", r"[a-z]{2}(-[a-z]+)+-\d+")
_account = _word("account id", r"\d{12}")
_client_id = _word("MQTT client id", r"[A-Za-z0-9_.:-]{1,128}")


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = _Parser(
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

    net = parser.add_argument_group("listeners")
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
    net.add_argument(
        "--api-host", metavar="HOST", help="address the API binds (default: --host)"
    )
    net.add_argument("--cert", type=Path, help="server certificate chain (PEM), for both")
    net.add_argument("--key", type=Path, help="private key of --cert (PEM)")
    net.add_argument(
        "--plain",
        action="store_true",
        help="serve unencrypted ws:// and http:// instead of wss:// and https:// (testing only)",
    )

    state = parser.add_argument_group("tunnels and state")
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

    aws = parser.add_argument_group("AWS identity and authentication")
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

    mqtt = parser.add_argument_group("MQTT notifications (OpenTunnel/RotateTunnelAccessToken)")
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

    limits = parser.add_argument_group("limits (AWS's by default)")
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

    testing = parser.add_argument_group("testing")
    testing.add_argument(
        "--minute-seconds",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="TESTING ONLY: length of a minute of tunnel lifetime (maxLifetimeTimeoutMinutes), "
        "so that tests need not wait minutes (default %(default).0f)",
    )

    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log per-frame and handshake detail"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


_NOT_SETTINGS = frozenset({"help", "version", "config"})


def _apply_settings(parser: argparse.ArgumentParser, path: Path) -> None:
    """Make the values of a settings file the parser's defaults (converted and checked)."""
    actions = {
        option[2:]: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and action.dest not in _NOT_SETTINGS
    }
    defaults: dict[str, Any] = {}
    for key, raw in read_settings(path).items():
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"{path}: [service] {key}: unknown setting")
        value = raw.strip()
        try:
            if isinstance(action, argparse._StoreTrueAction):
                lowered = value.lower()
                if lowered not in _BOOLEANS:
                    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")
                converted: Any = _BOOLEANS[lowered]
            elif callable(action.type):
                converted = action.type(value)
            else:
                converted = value
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: [service] {key}: {exc}") from None
        defaults[action.dest] = converted
    parser.set_defaults(**defaults)


_BOOLEANS = {
    **dict.fromkeys(("1", "yes", "true", "on"), True),
    **dict.fromkeys(("0", "no", "false", "off"), False),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags over the settings file over the defaults.

    Raises:
        _UsageError, ConfigError: bad flags or settings.
        SystemExit: --help, --version.
    """
    parser = build_parser()
    pre = _Parser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        _apply_settings(parser, known.config)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- settings


@dataclass
class _Setup:
    """Everything built from the arguments before the event loop starts."""

    args: argparse.Namespace
    ssl_context: ssl.SSLContext | None
    registry: TunnelRegistry
    store: SqliteStore | None
    control_settings: ControlSettings
    credentials: dict[str, str] | None
    mqtt: MqttSettings | None
    bandwidth: Bandwidth | None
    throttle: ThrottleSettings


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context the flags ask for, or None with ``--plain``."""
    if args.plain:
        if args.cert or args.key:
            raise _UsageError("--plain cannot be combined with --cert or --key")
        return None
    if not (args.cert and args.key):
        raise _UsageError("--cert and --key are required (or --plain for ws:// and http://)")
    return tls_context(args.cert, args.key)


def _need(module: str, option: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise _UsageError(
            f"{option} needs the Python package {module!r}: pip install 'iotunnel[service]'"
        )


def _mqtt(args: argparse.Namespace) -> MqttSettings | None:
    given = [
        name
        for name in ("mqtt_cert", "mqtt_key", "mqtt_ca", "mqtt_client_id")
        if getattr(args, name) is not None
    ]
    if args.mqtt_host is None:
        if given:
            raise _UsageError(f"--{given[0].replace('_', '-')} needs --mqtt-host")
        return None
    if (args.mqtt_cert is None) != (args.mqtt_key is None):
        raise _UsageError("--mqtt-cert and --mqtt-key go together")
    for path in (args.mqtt_cert, args.mqtt_key, args.mqtt_ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: file not found")
    _need("awscrt", "--mqtt-host")
    _need("awsiot", "--mqtt-host")
    extra = {"client_id": args.mqtt_client_id} if args.mqtt_client_id else {}
    return MqttSettings(
        args.mqtt_host, args.mqtt_port, args.mqtt_cert, args.mqtt_key, args.mqtt_ca, **extra
    )


def _setup(args: argparse.Namespace) -> _Setup:
    """Check the arguments and build what they describe.

    Raises:
        _UsageError, ConfigError, StoreError: bad input.
    """
    ssl_context = _tls(args)
    if args.api_port is not None:
        _need("h11", "--api-port")
    credentials = None
    if args.credentials is not None:
        if args.api_port is None:
            raise _UsageError("--credentials needs --api-port")
        _need("botocore", "--credentials")
        credentials = load_credentials(args.credentials)
    mqtt = _mqtt(args)
    if args.max_message < args.max_frame + 2:
        raise _UsageError(
            f"--max-message ({args.max_message}) must hold a whole frame: at least "
            f"--max-frame + 2 ({args.max_frame + 2})"
        )
    bandwidth = None
    if args.bandwidth_limit > 0:
        burst = args.bandwidth_burst or args.max_message
        bandwidth = Bandwidth(float(args.bandwidth_limit), float(burst))
    elif args.bandwidth_burst is not None:
        raise _UsageError("--bandwidth-burst needs --bandwidth-limit")
    limits = Limits(max_services=args.max_services, max_tunnels=args.max_tunnels)
    control_settings = ControlSettings(
        region=args.region,
        account_id=args.account_id,
        limits=limits,
        minute_seconds=args.minute_seconds,
        closed_retention=args.closed_retention,
    )
    store = SqliteStore(args.state) if args.state is not None else None
    try:
        registry = TunnelRegistry(
            store,
            clock=SystemClock(),
            service_ids=ServiceIdRule(args.service_id_pattern, args.max_service_id_length),
        )
        load_tunnels(args.tunnels, registry)
    except BaseException:
        if store is not None:
            store.close()
        raise
    throttle = ThrottleSettings(
        args.handshake_failure_rate, args.handshake_failure_burst, args.handshake_throttle_addresses
    )
    return _Setup(
        args, ssl_context, registry, store, control_settings, credentials, mqtt, bandwidth, throttle
    )


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if verbose:
        logging.getLogger("service").setLevel(logging.DEBUG)
    else:
        # websockets' own lifecycle lines repeat ours; keep its warnings and errors.
        logging.getLogger("service.websockets").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------- serving


async def _serve(setup: _Setup) -> int:
    from service.api import MAX_BODY, ManagementApi  # h11 is needed only with the API
    from service.http import HttpServer
    from service.sigv4 import SigV4Verifier

    args = setup.args
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier: Notifier = MqttNotifier(setup.mqtt) if setup.mqtt is not None else LogNotifier()
    data_plane = TunnelService(
        setup.registry,
        ssl_context=setup.ssl_context,
        max_message=args.max_message,
        max_frame=args.max_frame,
        bandwidth=setup.bandwidth,
        throttle=setup.throttle,
    )
    control = ControlPlane(
        setup.registry, data_plane=data_plane, notifier=notifier, settings=setup.control_settings
    )
    api_server = None
    if args.api_port is not None:
        verifier = None
        if setup.credentials is not None:
            verifier = SigV4Verifier(setup.credentials, args.region, setup.registry.clock)
        api_server = HttpServer(
            ManagementApi(control, verifier=verifier),
            ssl_context=setup.ssl_context,
            max_body=MAX_BODY,
            on_error=ManagementApi.http_error,
        )
    scheduler: asyncio.Task[None] | None = None
    try:
        async with data_plane:
            try:
                await data_plane.start(args.host, args.port)
                if api_server is not None:
                    api_host = args.api_host or args.host
                    try:
                        await api_server.start(api_host, args.api_port)
                    except OSError as exc:
                        raise OSError(f"{api_host}:{args.api_port}: {exc}") from None
            except OSError as exc:
                print(f"{PROG}: error: cannot listen: {exc}", file=sys.stderr)
                return 1
            await notifier.start()
            scheduler = asyncio.create_task(control.run(), name="control.run")
            print(f"{PROG}: listening on {data_plane.url}", flush=True)
            if api_server is not None:
                log.info("management API on %s", api_server.url)
                if setup.credentials is None:
                    log.warning("no --credentials: API requests are not authenticated")
                print(f"{PROG}: API listening on {api_server.url}", flush=True)
            await stop.wait()
            log.info("stopping")
            if api_server is not None:
                await api_server.close()
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler
    finally:
        if api_server is not None:
            await api_server.close()
        if scheduler is not None and not scheduler.done():
            scheduler.cancel()
        await notifier.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT; return the exit code."""
    try:
        args = parse_args(argv)
        setup = _setup(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except (_UsageError, ConfigError, StoreError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(args.verbose)
    registry = setup.registry
    opened = [t.tunnel_id for t in registry if t.is_open]
    if args.state is not None:
        log.info("state in %s: %d tunnel(s), %d open", args.state, len(registry), len(opened))
    if opened:
        log.info("%d open tunnel(s): %s", len(opened), ", ".join(opened))
    elif args.api_port is None:
        log.warning("no tunnels (--tunnels) and no API (--api-port): every connection is refused")
    tune_allocator()
    try:
        return asyncio.run(_serve(setup))
    finally:
        if setup.store is not None:
            setup.store.close()
