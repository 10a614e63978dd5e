"""The agent's settings keys: names, defaults and where each can be given (file, variable, flag)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, NoReturn

from iotunnel.errors import ConfigError

PROG = "iotunnel-agent"
#: The settings file read when neither ``--config`` nor ``IOTUNNEL_CONFIG`` names one.
DEFAULT_CONFIG = "/etc/iotunnel/agent.ini"
#: The service-ID mapping directory handed to every destination proxy.
DEFAULT_MAPPING_DIR = "/etc/iotunnel/destination.d"
#: Where running tunnels are kept, so that a restarted agent resumes them (the unit's
#: ``StateDirectory=iotunnel``).
DEFAULT_STATE_DIR = "/var/lib/iotunnel"
ENV_CONFIG = "IOTUNNEL_CONFIG"
#: The MQTT port on which the client offers :data:`ALPN_PROTOCOL` in its TLS handshake, as AWS IoT
#: Core requires for MQTT with client certificates on 443 (the SDK's builder does this).
ALPN_PORT = 443
ALPN_PROTOCOL = "x-amzn-mqtt-ca"
ENV_PREFIX = "IOTUNNEL_"
SECTION = "agent"
#: The systemd credential that holds the PKCS#11 user PIN (``LoadCredential=pkcs11-pin:FILE``).
PIN_CREDENTIAL = "pkcs11-pin"
ENV_CREDENTIALS = "CREDENTIALS_DIRECTORY"


class _Key(NamedTuple):
    """One setting: its name in the file, its default (as text) and its help."""

    name: str
    metavar: str
    help: str
    default: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.name.upper()


#: Every key of the ``[agent]`` section, in the order of ``config/agent.ini``.
KEYS: tuple[_Key, ...] = (
    _Key("endpoint", "HOST", "MQTT broker: the AWS IoT Core data endpoint (required)"),
    _Key("port", "PORT", "MQTT over TLS port of the broker", "8883"),
    _Key("client_id", "ID", "MQTT client id (required)"),
    _Key("thing_name", "NAME", "thing whose tunnel notifications to receive (default: client_id)"),
    _Key("cert", "FILE", "device certificate, PEM (required)"),
    _Key("key", "FILE", "private key of the device certificate, PEM (required without pkcs11_lib)"),
    _Key("root_ca", "FILE", "CA certificates of the broker, PEM (default: the system's)"),
    _Key("pkcs11_lib", "FILE", "PKCS#11 library of the token that holds the key (instead of key)"),
    _Key("pkcs11_token_label", "LABEL", "label of the PKCS#11 token (or pkcs11_slot)"),
    _Key("pkcs11_slot", "ID", "slot id of the PKCS#11 token (or pkcs11_token_label)"),
    _Key("pkcs11_key_label", "LABEL", "label of the private key in the PKCS#11 token"),
    _Key(
        "pkcs11_pin_file",
        "FILE",
        f"file holding the token's user PIN "
        f"(default: ${ENV_CREDENTIALS}/{PIN_CREDENTIAL}, the systemd credential)",
    ),
    _Key(
        "https_proxy",
        "URL",
        "HTTP proxy for MQTT and the tunnels, http://[user:password@]host:port "
        "(default: $https_proxy/$HTTPS_PROXY; keep a password off the command line)",
    ),
    _Key("mapping_dir", "DIR", "service-ID mapping directory", DEFAULT_MAPPING_DIR),
    _Key("tunnel_endpoint", "URL", "tunnel service instead of the notified region (self-hosted)"),
    _Key("tunnel_ca", "FILE", "CA certificates of the tunnel service (with tunnel_endpoint)"),
    _Key("max_tunnels", "N", "tunnels (destination proxies) at once, 1..64", "4"),
    _Key(
        "launcher",
        "HOW",
        "fork (each proxy forked from one preloaded launcher: less memory, faster start) "
        "or spawn (each proxy a new interpreter)",
        "fork",
    ),
    _Key("state_dir", "DIR", "running tunnels, resumed after a restart", DEFAULT_STATE_DIR),
    _Key("log_level", "LEVEL", "debug, info, warning or error", "info"),
)
_KEYS_BY_NAME = {key.name: key for key in KEYS}


class _Given(NamedTuple):
    """A value as written, where it came from, and what relative paths are relative to."""

    value: str
    origin: str
    base: Path


def _fail(given: _Given, problem: str) -> NoReturn:
    raise ConfigError(f"{given.origin}: {given.value.strip()!r}: {problem}")
