"""The WebSocket link to the tunnel service: handshake, TLS, socket options, error mapping.

This is the only module of the proxy that opens a WebSocket (:mod:`proxy.io.tunnel` only uses
the open connection); it maps the library's and the operating system's exceptions onto
:mod:`proxy.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import Event
from websockets.typing import Subprotocol

from iotunnel import __version__
from iotunnel.errors import ConfigError
from iotunnel.handshake import ACCESS_HEADER, CLIENT_HEADER, SUBPROTOCOLS, V1_SUBPROTOCOL
from proxy.errors import ConnectFailed, HandshakeRefused
from proxy.io.sockets import tune_transport
from proxy.protocol.framing import MAX_WS_MESSAGE
from proxy.tls import CAError, ssl_context

__all__ = [
    "Link",
    "LinkOptions",
    "close_cause",
    "map_exceptions",
    "open_link",
    "prepare",
    "ssl_context",
]

log = logging.getLogger("proxy.link")

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
    #: False with ``-k``: the service's certificate is not verified at all.
    verify_host: bool
    open_timeout: float
    ping_interval: float
    #: The TLS context, made once by :func:`prepare`.
    tls: ssl.SSLContext | None = None


def prepare(options: LinkOptions) -> LinkOptions:
    """``options`` with its TLS context made, once for every connect of this process.

    Raises:
        ConfigError: The ``-c`` CA file or directory cannot be loaded (it was checked when the
            configuration was read, so it changed since).
    """
    if not options.url.startswith("wss://") or options.tls is not None:
        return options
    try:
        context = ssl_context(options.ca_path, options.verify_host)
    except CAError as exc:
        raise ConfigError(f"-c: {options.ca_path}: {exc}") from None
    return replace(options, tls=context)


#: Takes the payload of a binary WebSocket frame as it is received; returns False when it can
#: take no more until :meth:`Link.resume` is called.
Handler = Callable[[bytes], bool]


class Link(ClientConnection):
    """websockets' client connection, with binary data handed over as it is received.

    The frames that websockets' Sans-I/O protocol parses in ``data_received`` reach
    :meth:`process_event`. A binary frame's payload (a whole message, or a fragment of one: the
    tunnel's frame decoder buffers across messages) goes straight to the handler given to
    :meth:`take`, in that event-loop turn, not through websockets' queue and a task woken by
    ``recv()`` (a future and a task switch per message, at each proxy). Control frames go
    through websockets as before; a text message (a protocol violation here) is dropped and
    reported in :attr:`text_received`.

    Backpressure: when the handler says it can take no more, reading from the socket pauses
    and what was already parsed is held, in order (at most one socket read's worth), until
    :meth:`resume`. :attr:`attention` is set then, when a text message arrives, and when the
    connection is lost: the owner's task waits for it and does what a handler cannot do
    without awaiting.
    """

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        self._handler: Handler | None = None
        #: Binary payloads received while the handler could take no more, oldest first.
        self._held: deque[bytes] = deque()
        self._paused = False
        self._dropping = False
        #: Inside a fragmented binary message (its continuation frames are binary data too).
        self._in_binary = False
        #: A text message arrived.
        self.text_received = False
        self.attention = asyncio.Event()

    def take(self, handler: Handler) -> None:
        """Hand every binary payload, the held ones first, to ``handler`` from now on."""
        self._handler = handler
        self.resume()

    def release(self) -> None:
        """Drop the binary payloads held and those received from now on (they are for no one),
        and read on: the closing handshake and the end of the connection still come in."""
        self._handler = None
        self._dropping = True
        self._held.clear()
        if self._paused:
            self._paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def resume(self) -> None:
        """Hand the held payloads to the handler until it can take no more; then read on."""
        handler = self._handler
        if handler is None:
            return
        held = self._held
        while held:
            if not handler(held.popleft()):
                self._pause()
                return
        if self._paused:
            self._paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def held(self) -> int:
        """Binary payloads received and not yet handed over."""
        return len(self._held)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            if not self.transport.is_closing():
                self.transport.pause_reading()
        self.attention.set()

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and self.response is not None:
            opcode = event.opcode
            if opcode is Opcode.BINARY or (opcode is Opcode.CONT and self._in_binary):
                self._in_binary = not event.fin
                if self._dropping:
                    return
                data = event.data if isinstance(event.data, bytes) else bytes(event.data)
                if self._paused or self._handler is None or self._held:
                    self._held.append(data)
                    self._pause()
                elif not self._handler(data):
                    self._pause()
                return
            if opcode is Opcode.TEXT or opcode is Opcode.CONT:
                self.text_received = True
                self.attention.set()
                return
        super().process_event(event)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.attention.set()


class _Connect(connect):
    """websockets' connect without its redirects: a 3xx answer is a refusal.

    A redirect would send the access token to wherever the answer points.
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


#: Longest reason from the service that the proxy repeats.
_MAX_REASON = 200
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def _clean(text: str, secrets: tuple[str, ...]) -> str:
    """Printable ASCII, one line, bounded, with no token in it."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[secure]")
    text = " ".join(_UNPRINTABLE.sub(" ", text).split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3].rstrip() + "..."
    return text


def _refusal_hint(status: int, reason: str) -> str:
    """What to do about a refused handshake, from the service's reason or else its status."""
    lowered = reason.lower()
    if "mode" in lowered and "token" in lowered:
        return (
            "the access token is for the other end of the tunnel: use the other token "
            "(source or destination) or the other -m"
        )
    if "client token" in lowered or "client-token" in lowered:
        return (
            "the access token is bound to another client token (another proxy uses it, or it "
            "was first used with another -i): rotate the access token "
            "(aws iotsecuretunneling rotate-tunnel-access-token)"
        )
    if status == 410 or "closed" in lowered or "expired" in lowered:
        return "the tunnel is closed or has expired: open a new tunnel"
    if status in (401, 403) or "token" in lowered:
        return (
            "the access token is wrong, used or revoked: rotate it "
            "(aws iotsecuretunneling rotate-tunnel-access-token) and pass the new one"
        )
    if status == 404:
        return "no tunnel endpoint at this address: check -e or -r"
    return "check the endpoint (-e/-r), the mode (-m) and the access token"


def _refused(exc: InvalidStatus, secrets: tuple[str, ...]) -> HandshakeRefused:
    response = exc.response
    status = response.status_code
    if 300 <= status < 400:
        try:
            host = urlsplit(response.headers.get("Location", "")).hostname
        except ValueError:  # not a URL
            host = None
        where = f" to {_clean(host, secrets)}" if host else ""
        return HandshakeRefused(
            status,
            f"the tunnel service answered with a redirect{where} (HTTP {status}); "
            "not following it: check -e or -r",
        )
    body = response.body.decode("utf-8", "replace") if response.body else ""
    reason = _clean(body, secrets) or _clean(response.reason_phrase, secrets)
    head = f"the tunnel service refused the connection: HTTP {status}"
    text = f"{head} ({reason})" if reason else head
    return HandshakeRefused(status, f"{text}: {_refusal_hint(status, reason)}")


def close_cause(ws: ClientConnection, secrets: tuple[str, ...] = ()) -> str:
    """How a WebSocket ended, for a log line: who closed it with which code, or ``""``."""
    protocol = ws.protocol
    received, sent = protocol.close_rcvd, protocol.close_sent
    if sent is not None and (received is None or not protocol.close_rcvd_then_sent):
        frame, by = sent, "closed by this proxy"
    elif received is not None:
        frame, by = received, "closed by the service"
    elif ws.close_code is None:
        return ""
    else:
        return " (dropped without a close frame)"
    reason = _clean(frame.reason, secrets)
    return f" ({by}: {frame.code}{' ' + reason if reason else ''})"


#: OpenSSL's verification results that mean the certificate's dates and the clock disagree.
_CLOCK_ERRORS = {9: "is not yet valid", 10: "has expired"}
_HOSTNAME_MISMATCH = 62
_UNTRUSTED = {18, 19, 20, 21}


def _verification_failed(exc: ssl.SSLCertVerificationError) -> ConnectFailed:
    code = exc.verify_code
    head = "TLS verification of the service failed"
    if code in _CLOCK_ERRORS:
        return ConnectFailed(
            f"{head}: its certificate {_CLOCK_ERRORS[code]} by this device's clock: "
            "check the system clock (NTP)"
        )
    if code == _HOSTNAME_MISMATCH:
        return ConnectFailed(
            f"{head}: {exc.verify_message}: check -e or -r "
            "(-k turns verification off, for development and testing only)"
        )
    if code in _UNTRUSTED:
        return ConnectFailed(
            f"{head}: {exc.verify_message}: the certificate's CA is not trusted; "
            "give it with -c (-k turns verification off, for development and testing only)"
        )
    return ConnectFailed(f"{head}: {exc.verify_message or exc.reason or exc}")


@contextlib.contextmanager
def map_exceptions(secrets: tuple[str, ...] = ()) -> Iterator[None]:
    """Translate handshake failures into HandshakeRefused (3xx, 4xx) or ConnectFailed.

    ``secrets`` are removed from anything the service sent that goes into a message.
    """
    try:
        yield
    except InvalidStatus as exc:
        status = exc.response.status_code
        if 300 <= status < 500 and status != 429:
            raise _refused(exc, secrets) from None
        reason = _clean(exc.response.reason_phrase, secrets)
        raise ConnectFailed(
            f"the tunnel service answered HTTP {status} {reason}".rstrip()
        ) from None
    except InvalidURI as exc:
        raise ConnectFailed(f"invalid service URL: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        raise _verification_failed(exc) from None
    except ssl.SSLError as exc:
        raise ConnectFailed(f"TLS handshake with the service failed: {exc.reason or exc}") from None
    except (OSError, TimeoutError, InvalidHandshake, EOFError) as exc:
        text = _clean(str(exc), secrets) or type(exc).__name__
        raise ConnectFailed(f"cannot reach the tunnel service: {text}") from None


async def open_link(options: LinkOptions) -> tuple[Link, int]:
    """Connect and upgrade; returns the connection and the negotiated protocol version.

    Raises:
        HandshakeRefused: a 4xx answer other than 429, or a redirect (do not retry).
        ConnectFailed: anything else (retry).
        ConfigError: the ``-c`` CA cannot be loaded.
    """
    headers = {ACCESS_HEADER: options.access_token}
    if options.client_token:
        headers[CLIENT_HEADER] = options.client_token
    secure = options.url.startswith("wss://")
    secrets = tuple(value for value in (options.access_token, options.client_token) if value)
    if secure and options.tls is None:
        options = prepare(options)
    with map_exceptions(secrets):
        ws = await _Connect(
            options.url,
            additional_headers=headers,
            subprotocols=[Subprotocol(s) for s in SUBPROTOCOLS],
            ssl=options.tls if secure else None,
            open_timeout=options.open_timeout,
            ping_interval=options.ping_interval,
            # The service may not answer pings while the peer is away: a missing pong alone is
            # no reason to drop the tunnel (proxy/protocol/PROTOCOL.md, section 'Keepalive').
            ping_timeout=None,
            close_timeout=5,
            max_size=MAX_WS_MESSAGE,
            max_queue=MAX_QUEUE,
            write_limit=WRITE_LIMIT,
            compression=None,
            user_agent_header=f"iotunnel/{__version__}",
            proxy=True,
            create_connection=Link,
        )
    assert isinstance(ws, Link)
    tune_transport(ws.transport)
    version = SUBPROTOCOLS.get(ws.subprotocol or "", 1)
    channel = ws.response.headers.get("channel-id") if ws.response else None
    log.info(
        "connected to the tunnel service (protocol %s%s)",
        ws.subprotocol or V1_SUBPROTOCOL,
        f", channel-id {channel}" if channel else "",
    )
    return ws, version
