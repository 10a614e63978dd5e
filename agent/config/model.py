"""The agent's settings, validated: :class:`AgentSettings`, and what :func:`~agent.config.load`
returns instead of them (:class:`CheckOnly`, :class:`CliExit`, :class:`StatusRequest`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config.httpproxy import HttpProxy
from agent.config.keys import DEFAULT_STATE_DIR
from agent.config.pkcs11 import Pkcs11Key
from iotunnel.notify import notify_topic


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything the agent needs, validated.

    Attributes:
        endpoint: The MQTT broker: the AWS IoT Core data endpoint, or a host name or address.
        port: The broker's MQTT-over-TLS port.
        client_id: The MQTT client id.
        thing_name: The thing whose notifications are received (defaults to ``client_id``).
        cert: The device certificate (PEM).
        key: The device certificate's private key (PEM), or ``None`` with :attr:`pkcs11`.
        root_ca: CA certificates that verify the broker, or ``None`` for the system's.
        mapping_dir: The service-ID mapping directory (``--config-dir`` of every proxy).
        tunnel_endpoint: The tunnel service to use instead of the notification's region
            (``-e`` of every proxy), as given; ``None`` for AWS.
        tunnel_ca: CA certificates that verify the tunnel service (``-c``), or ``None``.
        max_tunnels: How many tunnels may run at once.
        log_level: A :mod:`logging` level.
        config_file: The settings file that was read, if any.
        state_dir: Where running tunnels are kept (:mod:`agent.state`), for a restart.
        pkcs11: The device key in a PKCS#11 token instead of :attr:`key`, or ``None``.
        https_proxy: The HTTP proxy of the MQTT connection and of every destination proxy
            (``https_proxy``, else the ``https_proxy``/``HTTPS_PROXY`` environment), or
            ``None``.
        no_proxy: The ``NO_PROXY`` (``no_proxy``) environment: hosts reached directly.
        launcher: ``fork`` (proxies forked from the launcher, :mod:`agent.launcher`) or
            ``spawn`` (each a new process).
    """

    endpoint: str
    port: int
    client_id: str
    thing_name: str
    cert: Path
    key: Path | None
    root_ca: Path | None
    mapping_dir: Path
    tunnel_endpoint: str | None
    tunnel_ca: Path | None
    max_tunnels: int
    log_level: int
    config_file: Path | None
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    pkcs11: Pkcs11Key | None = None
    https_proxy: HttpProxy | None = None
    no_proxy: str = ""
    launcher: str = "fork"

    @property
    def topic(self) -> str:
        """The notification topic of :attr:`thing_name`."""
        return notify_topic(self.thing_name)

    @property
    def mqtt_proxy(self) -> HttpProxy | None:
        """The proxy of the MQTT connection: :attr:`https_proxy` unless ``NO_PROXY`` exempts
        the broker."""
        proxy = self.https_proxy
        if proxy is None or proxy.bypassed(self.no_proxy, self.endpoint, self.port):
            return None
        return proxy


@dataclass(frozen=True, slots=True)
class CheckOnly:
    """``--check``: the settings are valid so far; the caller checks the TLS files and exits."""

    settings: AgentSettings


@dataclass(frozen=True, slots=True)
class CliExit:
    """Not a run: print ``output`` and exit with ``code`` (``--help``, ``--version``)."""

    code: int
    output: str


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """``iotunnel-agent status``: where the running agent's state is, and the output form."""

    state_dir: Path
    json: bool
