"""The WebSocket link to the tunnel service: handshake, TLS, socket options, error mapping.

This is the only module that imports websockets for the proxy; it maps the library's and the
operating system's exceptions onto :mod:`proxy.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from proxy import __version__
from proxy.errors import ConnectFailed, HandshakeRefused
from proxy.io.sockets import tune_transport
from proxy.protocol.framing import MAX_WS_MESSAGE

log = logging.getLogger("proxy.link")

#: Subprotocols we offer, best first, and the protocol version each means.
SUBPROTOCOLS: dict[str, int] = {
    "aws.iot.securetunneling-3.0": 3,
    "aws.iot.securetunneling-2.0": 2,
    "aws.iot.securetunneling-1.0": 1,
}
#: How OpenSSL names the entries of a CA directory: subject hash, dot, sequence number.
_HASHED = re.compile(r"[0-9a-f]{8}\.[0-9]+")
# Queues below the fair scheduler are kept small (proxy/io/sockets.py), so that it, not a FIFO
# buffer, decides what goes next. Measured with bench scenario 4 (bench/RESULTS.md).
#: websockets' own write buffer high-water mark.
WRITE_LIMIT = 8 * 1024
#: WebSocket messages websockets may hold received but not yet read by the tunnel.
MAX_QUEUE = 2


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """How to reach the service."""

    url: str
    access_token: str
    client_token: str | None
    ca_path: str | None
    verify_host: bool
    open_timeout: float
    ping_interval: float


def ssl_context(ca_path: str | None, verify_host: bool) -> ssl.SSLContext:
    """TLS 1.2+ with certificate verification; ``ca_path`` is a CA file or a directory.

    Without ``ca_path`` the system's CAs are trusted. Where the system has a hashed CA
    directory (Debian's /etc/ssl/certs), OpenSSL looks CAs up there as it needs them, rather
    than parsing the whole bundle file into memory (about 140 certificates, 1.3 MiB of every
    proxy's resident memory); the two hold the same CAs. ``SSL_CERT_FILE`` keeps its meaning.
    """
    if ca_path is None:
        directory = _hashed_ca_directory()
        ctx = ssl.create_default_context(capath=directory)  # None: the system's defaults
    elif os.path.isdir(ca_path):
        ctx = ssl.create_default_context(capath=ca_path)
    else:
        ctx = ssl.create_default_context(cafile=ca_path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify_host:
        ctx.check_hostname = False
    return ctx


def _hashed_ca_directory() -> str | None:
    """OpenSSL's CA directory if it holds hashed entries and no CA file is forced, else None."""
    if os.environ.get("SSL_CERT_FILE"):
        return None
    directory = ssl.get_default_verify_paths().capath
    if not directory:
        return None
    try:
        with os.scandir(directory) as entries:
            if any(_HASHED.fullmatch(entry.name) for entry in entries):
                return directory
    except OSError:
        pass
    return None


@contextlib.contextmanager
def map_exceptions() -> Iterator[None]:
    """Translate handshake failures into HandshakeRefused (4xx) or ConnectFailed."""
    try:
        yield
    except InvalidStatus as exc:
        status = exc.response.status_code
        reason = exc.response.reason_phrase
        if 400 <= status < 500:
            raise HandshakeRefused(status, reason) from None
        raise ConnectFailed(f"the tunnel service answered HTTP {status} {reason}") from None
    except InvalidURI as exc:
        raise ConnectFailed(f"invalid service URL: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        raise ConnectFailed(
            f"TLS verification of the service failed: {exc.verify_message}"
        ) from None
    except (OSError, TimeoutError, InvalidHandshake, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        raise ConnectFailed(f"cannot reach the tunnel service: {text}") from None


async def open_link(options: LinkOptions) -> tuple[ClientConnection, int]:
    """Connect and upgrade; returns the connection and the negotiated protocol version.

    Raises:
        HandshakeRefused: a 4xx answer (do not retry).
        ConnectFailed: anything else (retry).
    """
    headers = {"access-token": options.access_token}
    if options.client_token:
        headers["client-token"] = options.client_token
    secure = options.url.startswith("wss://")
    with map_exceptions():
        ws = await connect(
            options.url,
            additional_headers=headers,
            subprotocols=[Subprotocol(s) for s in SUBPROTOCOLS],
            ssl=ssl_context(options.ca_path, options.verify_host) if secure else None,
            open_timeout=options.open_timeout,
            ping_interval=options.ping_interval,
            # The service may not answer pings while the peer is away: a missing pong alone is
            # no reason to drop the tunnel (PROTOCOL.md "Keepalive").
            ping_timeout=None,
            close_timeout=5,
            max_size=MAX_WS_MESSAGE,
            max_queue=MAX_QUEUE,
            write_limit=WRITE_LIMIT,
            compression=None,
            user_agent_header=f"iotunnel/{__version__}",
            proxy=True,
        )
    tune_transport(ws.transport)
    version = SUBPROTOCOLS.get(ws.subprotocol or "", 1)
    channel = ws.response.headers.get("channel-id") if ws.response else None
    log.info(
        "connected to the tunnel service (protocol %s%s)",
        ws.subprotocol or "aws.iot.securetunneling-1.0",
        f", channel-id {channel}" if channel else "",
    )
    return ws, version
