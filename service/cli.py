"""``iotunnel-service``: run the tunnel service from the command line.

Exit codes: 0 after SIGTERM or SIGINT (connections closed with 1001), 1 when an address cannot
be bound, 2 for bad input (flags, settings, tunnels, credentials or state file, certificate),
each with one line on stderr.

Once listening it prints one line per listener to stdout, so that a parent process can read
the ports: ``iotunnel-service: listening on wss://HOST:PORT`` (``ws://`` with ``--plain``) and,
with ``--api-port``, ``iotunnel-service: API listening on https://HOST:PORT`` (``http://``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from iotunnel.cli import UsageError, fail
from iotunnel.errors import ConfigError
from iotunnel.exits import ExitCode
from iotunnel.logs import OneLineFormatter, install
from proxy.io.memory import tune_allocator
from service.clock import SystemClock
from service.config import load_credentials, load_tunnels, tls_context
from service.control import ControlPlane, ControlSettings, Limits
from service.notify import LogNotifier, MqttNotifier, MqttSettings, Notifier
from service.registry import ServiceIdRule, TunnelRegistry
from service.server import Bandwidth, TunnelService
from service.settings import PROG, ServiceSettings, load
from service.store import SqliteStore, StoreError
from service.throttle import ThrottleSettings

log = logging.getLogger("service")


# ---------------------------------------------------------------------------- settings


@dataclass
class _Setup:
    """Everything built from the settings before the event loop starts."""

    settings: ServiceSettings
    ssl_context: ssl.SSLContext | None
    registry: TunnelRegistry
    store: SqliteStore | None
    control_settings: ControlSettings
    credentials: dict[str, str] | None
    mqtt: MqttSettings | None
    bandwidth: Bandwidth | None
    throttle: ThrottleSettings


def _tls(args: ServiceSettings) -> ssl.SSLContext | None:
    """The TLS context the settings ask for, or None with ``--plain``."""
    if args.cert is None or args.key is None:  # --plain (load() checked the combination)
        return None
    return tls_context(args.cert, args.key)


def _need(module: str, option: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UsageError(
            f"{option} needs the Python package {module!r}: pip install 'iotunnel[service]'"
        )


def _mqtt(args: ServiceSettings) -> MqttSettings | None:
    if args.mqtt_host is None:
        return None
    for path in (args.mqtt_cert, args.mqtt_key, args.mqtt_ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: file not found")
    _need("awscrt", "--mqtt-host")
    _need("awsiot", "--mqtt-host")
    extra = {"client_id": args.mqtt_client_id} if args.mqtt_client_id else {}
    return MqttSettings(
        args.mqtt_host, args.mqtt_port, args.mqtt_cert, args.mqtt_key, args.mqtt_ca, **extra
    )


def _setup(args: ServiceSettings) -> _Setup:
    """Build what the settings describe.

    Raises:
        ConfigError, StoreError: bad input (files, optional packages).
    """
    ssl_context = _tls(args)
    if args.api_port is not None:
        _need("h11", "--api-port")
    credentials = None
    if args.credentials is not None:
        _need("botocore", "--credentials")
        credentials = load_credentials(args.credentials)
    mqtt = _mqtt(args)
    bandwidth = None
    if args.bandwidth_limit > 0:
        burst = args.bandwidth_burst or args.max_message
        bandwidth = Bandwidth(float(args.bandwidth_limit), float(burst))
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
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    install(handler, logging.INFO, replace=False)
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

    args = setup.settings
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
                if api_server is not None and args.api_port is not None:
                    api_host = args.api_host or args.host
                    try:
                        await api_server.start(api_host, args.api_port)
                    except OSError as exc:
                        raise OSError(f"{api_host}:{args.api_port}: {exc}") from None
            except OSError as exc:
                print(f"{PROG}: error: cannot listen: {exc}", file=sys.stderr)
                return ExitCode.INTERNAL
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
    return ExitCode.CLOSED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT; return the exit code."""
    try:
        args = load(argv)
        setup = _setup(args)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except (ConfigError, StoreError) as exc:
        return fail(PROG, exc)
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
