"""What ``--check`` prints."""

from __future__ import annotations

from agent.config.keys import ALPN_PORT, ALPN_PROTOCOL, PROG
from agent.config.model import AgentSettings


def summary(settings: AgentSettings) -> str:
    """What ``--check`` prints: the settings that matter, on one line."""
    service = settings.tunnel_endpoint or "the notified AWS region"
    key = "" if settings.pkcs11 is None else f", {settings.pkcs11.describe()}"
    link = ""
    if settings.port == ALPN_PORT:
        link += f" (ALPN {ALPN_PROTOCOL})"
    if settings.mqtt_proxy is not None:
        link += f" via the HTTP proxy {settings.mqtt_proxy}"
    elif settings.https_proxy is not None:
        link += f" directly (NO_PROXY), tunnels via the HTTP proxy {settings.https_proxy}"
    return (
        f"{PROG}: configuration OK: {settings.client_id} at {settings.endpoint}:{settings.port}"
        f"{link}{key}, topic {settings.topic}, mappings in {settings.mapping_dir}, tunnels via "
        f"{service}, at most {settings.max_tunnels} at once, state in {settings.state_dir}\n"
    )
