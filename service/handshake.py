"""The ``/tunnel`` WebSocket handshake rules: an HTTP request in, an admission or a refusal out.

Pure: no sockets, no websockets. The checks run in this order, and the first failure decides
the response (each a plain-text reason, never the token):

- 431: request line and headers over 4 KiB
- 404: path other than ``/tunnel``
- 400: ``local-proxy-mode`` missing, repeated or not ``source``/``destination``
- 400: no supported ``Sec-WebSocket-Protocol`` offered
- 401: no access token (header ``access-token`` or cookie ``awsiot-tunnel-token``)
- 400: more than one access token (two headers, or header and cookie)
- 400: ``client-token`` repeated or not matching ``[a-zA-Z0-9-]{32,128}``
- 403: unknown access token
- 400: access token of the other mode
- 410: tunnel closed
- 403: access token used before without a client token
- 403: access token bound to a client token that was not presented
- 403: access token rotated (or its tunnel deleted) between :func:`check` and :func:`claim`

:func:`check` applies them without changing anything. :func:`claim` then spends the grant (see
:meth:`service.registry.Grant.claim`); the server calls it only once the WebSocket upgrade itself
has succeeded, so that a request that fails later (say, a plain HTTP client with a valid token)
does not use up a single-use token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from iotunnel.handshake import ACCESS_HEADER, CLIENT_HEADER, MODE_QUERY, SUBPROTOCOLS
from iotunnel.mode import Mode
from iotunnel.rules import CLIENT_TOKEN_RE
from service.registry import Claim, TunnelRegistry, digest

#: Largest handshake request (request line and headers), as the AWS service enforces it.
MAX_REQUEST = 4096
#: The only path that upgrades.
TUNNEL_PATH = "/tunnel"
#: The cookie that may carry the client access token instead of the header.
ACCESS_COOKIE = "awsiot-tunnel-token"


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """What the handshake rules need from an HTTP upgrade request."""

    #: request target: path and query
    target: str
    #: header (name, value) pairs in order, names in any case
    headers: Sequence[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    @property
    def size(self) -> int:
        """Bytes of the request line and headers as HTTP/1.1 puts them on the wire."""
        size = len(f"GET {self.target} HTTP/1.1\r\n") + 2
        return size + sum(len(key) + len(value) + 4 for key, value in self.headers)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A request that passed :func:`check`, waiting for :func:`claim`."""

    tunnel_id: str
    mode: Mode
    subprotocol: str
    client_token: str | None = field(repr=False)
    #: digest of the access token presented (a rotation may revoke it before the claim)
    token_digest: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Admission:
    """An accepted handshake."""

    tunnel_id: str
    mode: Mode
    subprotocol: str
    #: protocol version of ``subprotocol`` (1, 2 or 3)
    version: int
    #: whether the client presented a client token (its value is never kept here)
    client_token: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused handshake: the HTTP status and a short reason for the response body and logs.

    ``tunnel_id`` is set once the access token identified a tunnel, for logging.
    """

    status: HTTPStatus
    reason: str
    tunnel_id: str | None = None


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The highest-version subprotocol the client offered, if any is supported."""
    known = [SUBPROTOCOLS[name] for name in offered if name in SUBPROTOCOLS]
    if not known:
        return None
    best = max(known)
    return next(name for name, version in SUBPROTOCOLS.items() if version == best)


def offered_subprotocols(request: HandshakeRequest) -> list[str]:
    """Every subprotocol in the request's ``Sec-WebSocket-Protocol`` headers."""
    return [
        name.strip()
        for value in request.values("sec-websocket-protocol")
        for name in value.split(",")
        if name.strip()
    ]


def cookie_values(headers: Iterable[str], name: str) -> list[str]:
    """Every value of cookie ``name`` across ``Cookie`` header values, duplicates kept."""
    values = []
    for header in headers:
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key.strip() == name:
                values.append(value.strip().strip('"'))
    return values


def check(request: HandshakeRequest, registry: TunnelRegistry) -> Candidate | Refusal:
    """Apply the handshake rules, up to (not including) spending the grant."""
    if request.size > MAX_REQUEST:
        return Refusal(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request exceeds {MAX_REQUEST} bytes"
        )
    url = urlsplit(request.target)
    if url.path != TUNNEL_PATH:
        return Refusal(HTTPStatus.NOT_FOUND, "not found")
    modes = parse_qs(url.query).get(MODE_QUERY, [])
    if len(modes) != 1 or modes[0] not in (Mode.SOURCE, Mode.DESTINATION):
        return Refusal(
            HTTPStatus.BAD_REQUEST, "local-proxy-mode must be given once: source or destination"
        )
    mode = Mode(modes[0])
    subprotocol = choose_subprotocol(offered_subprotocols(request))
    if subprotocol is None:
        return Refusal(
            HTTPStatus.BAD_REQUEST, f"no supported subprotocol offered ({', '.join(SUBPROTOCOLS)})"
        )
    tokens = request.values(ACCESS_HEADER) + cookie_values(request.values("cookie"), ACCESS_COOKIE)
    if not tokens or tokens == [""]:
        return Refusal(HTTPStatus.UNAUTHORIZED, "access token missing")
    if len(tokens) > 1:
        return Refusal(HTTPStatus.BAD_REQUEST, "more than one access token")
    client_tokens = request.values(CLIENT_HEADER)
    if len(client_tokens) > 1 or not all(map(CLIENT_TOKEN_RE.fullmatch, client_tokens)):
        return Refusal(
            HTTPStatus.BAD_REQUEST,
            f"client-token must be given at most once and match {CLIENT_TOKEN_RE.pattern}",
        )
    found = registry.lookup(tokens[0])
    if found is None:
        return Refusal(HTTPStatus.FORBIDDEN, "invalid access token")
    tunnel, token_mode = found
    if token_mode is not mode:
        return Refusal(
            HTTPStatus.BAD_REQUEST,
            f"access token is for {token_mode} mode, not {mode}",
            tunnel.tunnel_id,
        )
    if not tunnel.is_open:
        return Refusal(HTTPStatus.GONE, "tunnel is closed", tunnel.tunnel_id)
    return Candidate(
        tunnel.tunnel_id,
        mode,
        subprotocol,
        client_tokens[0] if client_tokens else None,
        digest(tokens[0]),
    )


def claim(candidate: Candidate, registry: TunnelRegistry) -> Admission | Refusal:
    """Spend the grant of a checked request, or refuse it (token used, client token mismatch)."""
    tunnel_id = candidate.tunnel_id
    found = registry.lookup_digest(candidate.token_digest)
    if found is None or found[0].tunnel_id != tunnel_id or found[1] is not candidate.mode:
        return Refusal(HTTPStatus.FORBIDDEN, "invalid access token", tunnel_id)
    if not found[0].is_open:
        return Refusal(HTTPStatus.GONE, "tunnel is closed", tunnel_id)
    outcome = registry.claim(tunnel_id, candidate.mode, candidate.client_token)
    if outcome is Claim.TOKEN_USED:
        return Refusal(
            HTTPStatus.FORBIDDEN, "access token was used before and cannot be used again", tunnel_id
        )
    if outcome is Claim.CLIENT_TOKEN_MISMATCH:
        return Refusal(
            HTTPStatus.FORBIDDEN,
            "client token does not match the one bound to this access token",
            tunnel_id,
        )
    return Admission(
        tunnel_id,
        candidate.mode,
        candidate.subprotocol,
        SUBPROTOCOLS[candidate.subprotocol],
        candidate.client_token is not None,
    )
