"""``iotunnel-service``: run the tunnel service from the command line.

Exit codes: 0 after SIGTERM or SIGINT (connections closed with 1001), 1 when the address cannot
be bound, 2 for bad input (flags, tunnels file, certificate), each with one line on stderr.
Once listening it prints exactly one line to stdout, ``iotunnel-service: listening on
wss://HOST:PORT`` (``ws://`` with ``--plain``), so that a parent process can read the port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from proxy import __version__
from service.config import ConfigError, load_tunnels, tls_context
from service.registry import TunnelRegistry
from service.server import TunnelService

PROG = "iotunnel-service"
#: Default port: the unprivileged sibling of 443 (AWS's port), so that no root is needed.
DEFAULT_PORT = 8443

log = logging.getLogger("service")


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


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = _Parser(
        prog=PROG,
        description=(
            "Self-hosted AWS IoT Secure Tunneling service: serves the /tunnel WebSocket "
            "endpoint that local proxies (source and destination) connect to."
        ),
        epilog=(
            "Access tokens are read from the tunnels file only, never from the command line; "
            "keep that file private (chmod 600)."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="port to bind, 0 for any free port (default %(default)s)",
    )
    parser.add_argument("--cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--key", type=Path, help="private key of --cert (PEM)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="serve unencrypted ws:// instead of wss:// (testing only)",
    )
    parser.add_argument(
        "--tunnels",
        type=Path,
        metavar="FILE",
        help='JSON file declaring the tunnels: {"tunnels": [{"tunnelId", "services", '
        '"sourceAccessToken", "destinationAccessToken"}]}',
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log per-frame and handshake detail"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context the flags ask for, or None with ``--plain``."""
    if args.plain:
        if args.cert or args.key:
            raise _UsageError("--plain cannot be combined with --cert or --key")
        return None
    if not (args.cert and args.key):
        raise _UsageError("--cert and --key are required (or --plain for ws://)")
    return tls_context(args.cert, args.key)


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


async def _serve(
    registry: TunnelRegistry, ssl_context: ssl.SSLContext | None, host: str, port: int
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with TunnelService(registry, ssl_context=ssl_context) as service:
        try:
            await service.start(host, port)
        except OSError as exc:
            print(f"{PROG}: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
            return 1
        print(f"{PROG}: listening on {service.url}", flush=True)
        await stop.wait()
        log.info("stopping")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        ssl_context = _tls(args)
        registry = TunnelRegistry()
        if args.tunnels is not None:
            load_tunnels(args.tunnels, registry)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except (_UsageError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    _configure_logging(args.verbose)
    if not len(registry):
        log.warning("no tunnels declared (--tunnels): every connection will be refused")
    else:
        log.info("%d tunnel(s): %s", len(registry), ", ".join(t.tunnel_id for t in registry))
    return asyncio.run(_serve(registry, ssl_context, args.host, args.port))
