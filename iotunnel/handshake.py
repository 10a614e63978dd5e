"""The names of the tunnel's WebSocket handshake, which the proxy sends and the service checks.

A client opens ``wss://HOST/tunnel?local-proxy-mode=source|destination``, offering the
subprotocols of :data:`SUBPROTOCOLS` (best first), with its access token in the
``access-token`` header and, optionally, a client token (:data:`iotunnel.rules.CLIENT_TOKEN_RE`)
in ``client-token``. The chosen subprotocol fixes the protocol version. Pure.
"""

from __future__ import annotations

__all__ = [
    "ACCESS_HEADER",
    "CLIENT_HEADER",
    "ENV_ACCESS_TOKEN",
    "ENV_CLIENT_TOKEN",
    "MODE_QUERY",
    "SUBPROTOCOLS",
    "V1_SUBPROTOCOL",
    "V2_SUBPROTOCOL",
    "V3_SUBPROTOCOL",
]

V3_SUBPROTOCOL = "aws.iot.securetunneling-3.0"
V2_SUBPROTOCOL = "aws.iot.securetunneling-2.0"
#: Also what a connection without a negotiated subprotocol speaks.
V1_SUBPROTOCOL = "aws.iot.securetunneling-1.0"
#: The subprotocols, best first, and the protocol version each means.
SUBPROTOCOLS: dict[str, int] = {V3_SUBPROTOCOL: 3, V2_SUBPROTOCOL: 2, V1_SUBPROTOCOL: 1}
#: The query parameter that says which end a client is (:class:`iotunnel.mode.Mode`).
MODE_QUERY = "local-proxy-mode"
#: The header that carries the access token.
ACCESS_HEADER = "access-token"
#: The header that carries the optional client token.
CLIENT_HEADER = "client-token"
#: The environment variables that hand a proxy its tokens (the reference proxy's names); the
#: agent sets them for each destination proxy it starts, never a command-line flag.
ENV_ACCESS_TOKEN = "AWSIOT_TUNNEL_ACCESS_TOKEN"  # noqa: S105 - a variable's name
ENV_CLIENT_TOKEN = "AWSIOT_TUNNEL_CLIENT_TOKEN"  # noqa: S105 - a variable's name
