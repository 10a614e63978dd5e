"""The agent's settings: ``agent.ini``, ``IOTUNNEL_*`` variables, flags -> :class:`AgentSettings`.

Every key lives in the ``[agent]`` section of the settings file (``/etc/iotunnel/agent.ini`` by
default; ``--config FILE`` or ``IOTUNNEL_CONFIG`` name another). Each key can be overridden by
an environment variable (``IOTUNNEL_`` + the key in capitals) and by a flag (``--`` + the key
with dashes): ``port`` is ``IOTUNNEL_PORT`` and ``--port``. Precedence, highest first: flag,
environment, file, default. An empty value means "not set".

Values are checked once, here: a bad one raises :class:`ConfigError` with one line that names
where it came from (``agent.ini:7: port``, ``IOTUNNEL_PORT``, ``--port``). The file holds paths,
never secrets, so values may be quoted in messages (the PKCS#11 PIN is read from the file that
``pkcs11_pin_file`` names and kept as a :class:`~proxy.config.Secret`). Relative paths in the
file are relative to the file's directory; on the command line and in the environment, to the
working directory. Nothing here reads ``os.environ``: the environment is an argument.

The device key is either a PEM file (``key``) or an object in a PKCS#11 token (``pkcs11_lib``,
``pkcs11_token_label`` or ``pkcs11_slot``, ``pkcs11_key_label``, and the user PIN in the file
``pkcs11_pin_file``, by default the systemd credential ``$CREDENTIALS_DIRECTORY/pkcs11-pin``).
"""

from __future__ import annotations

import argparse
import configparser
import ipaddress
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn, TypeVar

from iotunnel import __version__
from iotunnel.cli import Parser
from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from iotunnel.notify import notify_topic
from iotunnel.rules import HOST_RE, THING_NAME_RE
from iotunnel.secret import Secret
from proxy import config as proxy_config
from proxy.config import read_config_text, read_mapping_dir

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_MAPPING_DIR",
    "DEFAULT_STATE_DIR",
    "ENV_CONFIG",
    "KEYS",
    "PIN_CREDENTIAL",
    "PROG",
    "AgentSettings",
    "CheckOnly",
    "CliExit",
    "HttpProxy",
    "Pkcs11Key",
    "StatusRequest",
    "check_tls_files",
    "load",
    "load_status",
    "state_dir_problem",
    "summary",
]

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
#: A PIN file larger than this is not a PIN file.
_MAX_PIN_FILE = 1024

_CLIENT_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_SLOT_RE = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+")
_T = TypeVar("_T")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


@dataclass(frozen=True, slots=True)
class Pkcs11Key:
    """The device key as an object in a PKCS#11 token (a TPM, an HSM, SoftHSM).

    Attributes:
        lib: The token's PKCS#11 library (module), loaded into the agent.
        token_label: The token's label, or ``None`` when :attr:`slot` picks the token.
        slot: The id of the token's slot, or ``None`` when :attr:`token_label` picks it.
        key_label: The label of the private key object.
        pin_file: Where the user PIN was read from.
        pin: The user PIN; only the MQTT client and ``--check`` reveal it, to awscrt.
    """

    lib: Path
    token_label: str | None
    slot: int | None
    key_label: str
    pin_file: Path
    pin: Secret

    def describe(self) -> str:
        """The token and key, for messages: never the PIN."""
        token = f"token {self.token_label!r}" if self.slot is None else f"slot {self.slot}"
        return f"key {self.key_label!r} in PKCS#11 {token} ({self.lib})"


@dataclass(frozen=True, slots=True)
class HttpProxy:
    """An HTTP proxy that tunnels with CONNECT, and the Basic credentials from its URL.

    ``str()`` is ``http://host:port``, without the credentials: fit for logs. The URL with them
    is :attr:`url`, a :class:`~proxy.config.Secret` (it goes to the proxies' environment only).

    Attributes:
        host: The proxy's host name or address (without brackets).
        port: Its port.
        username: The Basic user name, or ``None`` for no authentication.
        password: The Basic password (``Secret("")`` with a user name and no password).
        url: The URL as given.
        origin: Where it was set (``agent.ini:12: https_proxy``, ``HTTPS_PROXY``).
    """

    host: str
    port: int
    username: str | None
    password: Secret | None
    url: Secret
    origin: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def bypassed(self, no_proxy: str, host: str, port: int) -> bool:
        """Whether ``NO_PROXY`` (``no_proxy``) exempts ``host:port``, by the rules of Python's
        :mod:`urllib` (which the destination proxies' WebSocket client follows as well)."""
        import urllib.request  # here: 2 MiB of the agent's memory, for an HTTP proxy only

        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        return bool(bypass(f"{host}:{port}", {"no": no_proxy}))


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


# --------------------------------------------------------------------------- converters


def _host(given: _Given) -> str:
    text = given.value.strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not HOST_RE.fullmatch(text):
            _fail(given, "not a host name or IP address")
    return text


def _port(given: _Given) -> int:
    text = given.value.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        _fail(given, "a port is 1..65535")
    return int(text)


def _client_id(given: _Given) -> str:
    text = given.value.strip()
    if not _CLIENT_ID_RE.fullmatch(text):
        _fail(given, "a client id is 1..128 printable ASCII characters without spaces")
    return text


def _thing_name(given: _Given) -> str:
    text = given.value.strip()
    if not THING_NAME_RE.fullmatch(text):
        _fail(given, "a thing name is 1..128 characters of a-z, A-Z, 0-9, ':', '_' and '-'")
    return text


def _path(given: _Given) -> Path:
    return Path(os.path.abspath(given.base / given.value.strip()))


def _readable_file(given: _Given) -> Path:
    path = _path(given)
    if not path.is_file():
        _fail(given, "no such file" if not path.exists() else "not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        _fail(given, f"cannot read: {exc.strerror or exc}")
    return path


def _ca(given: _Given) -> Path:
    """A CA bundle file, or a directory of CA certificates."""
    path = _path(given)
    if path.is_dir():
        return path
    return _readable_file(given)


def _mapping_dir(given: _Given) -> Path:
    path = _path(given)
    if not path.is_dir():
        _fail(given, "not a directory")
    try:
        mappings = read_mapping_dir(path, mode=Mode.DESTINATION)
    except ConfigError as exc:
        raise ConfigError(f"{given.origin}: {exc}") from None
    if not mappings:
        _fail(given, "no 'SERVICE_ID = endpoint' line in any file")
    return path


def _tunnel_endpoint(given: _Given) -> str:
    """Checked by the proxy's own parser, so that every proxy the agent starts accepts it."""
    text = given.value.strip()
    argv = ["-m", "dst", "-e", text, "-d", "1"]
    try:
        proxy_config.load(argv, {proxy_config.ENV_ACCESS_TOKEN: "check"}, Path("/"))
    except ConfigError as exc:
        problem = str(exc).removeprefix("-e: ").removeprefix(f"{text!r}: ")
        _fail(given, problem)
    return text


def _https_proxy(given: _Given) -> HttpProxy:
    """``http://[user[:password]@]host[:port]``; messages never quote it: it may hold a
    password."""
    usage = "expected http://[user:password@]host:port"
    text = given.value.strip()
    try:
        url = urllib.parse.urlsplit(text)
    except ValueError:
        raise ConfigError(f"{given.origin}: not a valid URL ({usage})") from None
    try:
        port = url.port
    except ValueError:
        port = 0
    if url.scheme.lower() != "http":
        raise ConfigError(f"{given.origin}: not an http:// URL ({usage})")
    if not url.hostname:
        raise ConfigError(f"{given.origin}: no host in the URL ({usage})")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError(f"{given.origin}: a proxy URL has no path, query or fragment ({usage})")
    if port == 0:
        raise ConfigError(f"{given.origin}: a port is 1..65535")
    host = url.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOST_RE.fullmatch(host):
            raise ConfigError(f"{given.origin}: not a host name or IP address ({usage})") from None
    username = password = None
    if url.username is not None:
        # As the proxies' WebSocket client reads it: Basic auth needs both, percent-decoded.
        if url.password is None:
            raise ConfigError(f"{given.origin}: a user name without a password ({usage})")
        try:
            username = urllib.parse.unquote(url.username, errors="strict")
            password = Secret(urllib.parse.unquote(url.password, errors="strict"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"{given.origin}: the user name or password is not UTF-8 once percent-decoded"
            ) from None
    return HttpProxy(host, port or 80, username, password, Secret(text), given.origin)


def _environment_proxy(environ: Mapping[str, str], name: str, base: Path) -> _Given | None:
    """``name`` (``https_proxy``) from the environment as Python's :mod:`urllib` reads it: the
    lower-case variable wins over the upper-case one, and an empty one counts as unset."""
    for variable in (name, name.upper()):
        if variable in environ:
            value = environ[variable]
            return _Given(value, variable, base) if value.strip() else None
    return None


def _max_tunnels(given: _Given) -> int:
    text = given.value.strip()
    if not text.isdigit() or not 1 <= int(text) <= 64:
        _fail(given, "expected a number 1..64")
    return int(text)


#: How the proxies start (:mod:`agent.launcher`).
LAUNCHERS = ("fork", "spawn")


def _launcher(given: _Given) -> str:
    text = given.value.strip().lower()
    if text not in LAUNCHERS:
        _fail(given, f"expected one of {', '.join(LAUNCHERS)}")
    return text


def _label(limit: int) -> Callable[[_Given], str]:
    """A PKCS#11 label: printable text of at most ``limit`` bytes in UTF-8."""

    def convert(given: _Given) -> str:
        text = given.value.strip()
        if not text.isprintable() or len(text.encode()) > limit:
            _fail(given, f"a label is 1..{limit} bytes of printable text")
        return text

    return convert


def _slot(given: _Given) -> int:
    text = given.value.strip()
    if not _SLOT_RE.fullmatch(text) or int(text, 0 if text[:2].lower() == "0x" else 10) >> 64:
        _fail(given, "a slot id is a number 0..2^64-1 (decimal, or hexadecimal with 0x)")
    return int(text, 0 if text[:2].lower() == "0x" else 10)


def _pin_file(given: _Given) -> tuple[Path, Secret]:
    """The PIN file's path and the PIN in it (one line; the line end is not part of it).

    Messages name the file, never what it holds.
    """
    path = _readable_file(given)
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_PIN_FILE + 1)
    except OSError as exc:
        _fail(given, f"cannot read: {exc.strerror or exc}")
    if len(data) > _MAX_PIN_FILE:
        _fail(given, f"larger than {_MAX_PIN_FILE} bytes: not a PIN file")
    text = data.decode(errors="replace")
    if "\ufffd" in text:  # raised inside an except block, the message would chain the bytes
        _fail(given, "not UTF-8 text: not a PIN file")
    pin = text.removesuffix("\n").removesuffix("\r")
    if not pin:
        _fail(given, "empty: the token's user PIN belongs in it")
    if "\n" in pin or "\r" in pin:
        _fail(given, "more than one line: only the token's user PIN belongs in it")
    return path, Secret(pin)


def _log_level(given: _Given) -> int:
    text = given.value.strip().lower()
    if text not in _LEVELS:
        _fail(given, f"expected one of {', '.join(_LEVELS)}")
    return _LEVELS[text]


# --------------------------------------------------------------------------- sources


def _build_parser(*, status: bool = False) -> Parser:
    """The agent's parser; with ``status``, that of ``iotunnel-agent status`` (the same
    settings, to find the state directory, and ``--json``)."""
    parser = Parser(
        prog=f"{PROG} status" if status else PROG,
        add_help=False,
        description=(
            "Shows the running agent's tunnels (from the status file in its state_dir)."
            if status
            else "Device agent of AWS IoT Secure Tunneling: receives tunnel notifications over "
            "MQTT and runs one destination-mode proxy per tunnel. "
            f"'{PROG} status' shows the running agent's tunnels."
        ),
        epilog=(
            f"Every setting can also be given in the [agent] section of the settings file and "
            f"as an {ENV_PREFIX}<KEY> environment variable (e.g. {ENV_PREFIX}PORT). "
            "Precedence: flag, environment, file, default."
        ),
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("-V", "--version", action="store_true", help="show the version and exit")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"settings file (default: ${ENV_CONFIG}, else {DEFAULT_CONFIG})",
    )
    if status:
        parser.add_argument("--json", action="store_true", help="print JSON, for programs")
    else:
        parser.add_argument(
            "--check", action="store_true", help="check the settings, print a summary and exit"
        )
    for key in KEYS:
        suffix = f" (default: {key.default})" if key.default else ""
        parser.add_argument(key.flag, dest=key.name, metavar=key.metavar, help=key.help + suffix)
    return parser


def _section_lines(lines: Sequence[str]) -> dict[tuple[str, str], int]:
    """``(section, key) -> line number`` of the first line that sets each key."""
    found: dict[tuple[str, str], int] = {}
    section = ""
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            found.setdefault((section, ""), number)
        elif "=" in line:
            found.setdefault((section, line.partition("=")[0].strip().lower()), number)
    return found


def _read_file(path: Path, display: str) -> dict[str, _Given]:
    """Read the ``[agent]`` section of a settings file; unknown sections and keys are errors."""
    text = read_config_text(path, display)
    lines = text.splitlines()
    parser = configparser.ConfigParser(
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        interpolation=None,
        default_section="\0",  # no magic [DEFAULT]: it is an unknown section like any other
    )
    try:
        parser.read_string(text, source=display)
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            f"{display}:{exc.lineno}: expected [{SECTION}] before the first key"
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(
            f"{display}:{exc.lineno}: section [{exc.section}] appears twice"
        ) from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(f"{display}:{exc.lineno}: {exc.option} is set twice") from None
    except configparser.ParsingError as exc:
        number = exc.errors[0][0]
        raise ConfigError(f"{display}:{number}: expected 'key = value'") from None
    where = _section_lines(lines)
    for section in parser.sections():
        if section != SECTION:
            line = where.get((section, ""), 1)
            raise ConfigError(f"{display}:{line}: unknown section [{section}] (expected [agent])")
    given: dict[str, _Given] = {}
    if not parser.has_section(SECTION):
        return given
    for name, value in parser.items(SECTION):
        line = where.get((SECTION, name), 1)
        if name not in _KEYS_BY_NAME:
            raise ConfigError(f"{display}:{line}: unknown key {name!r}")
        if value.strip():
            given[name] = _Given(value, f"{display}:{line}: {name}", path.parent)
    return given


def _environment(environ: Mapping[str, str], cwd: Path) -> dict[str, _Given]:
    return {
        key.name: _Given(environ[key.variable], key.variable, cwd)
        for key in KEYS
        if environ.get(key.variable, "").strip()
    }


def _command_line(namespace: argparse.Namespace, cwd: Path) -> dict[str, _Given]:
    given: dict[str, _Given] = {}
    for key in KEYS:
        value = getattr(namespace, key.name)
        if value is not None and value.strip():
            given[key.name] = _Given(value, key.flag, cwd)
    return given


def _settings_file(
    namespace: argparse.Namespace, environ: Mapping[str, str], cwd: Path
) -> tuple[Path | None, dict[str, _Given]]:
    if namespace.config is not None:
        path, display = cwd / namespace.config, namespace.config
    elif environ.get(ENV_CONFIG, "").strip():
        path, display = cwd / environ[ENV_CONFIG].strip(), environ[ENV_CONFIG].strip()
    else:
        path, display = Path(DEFAULT_CONFIG), DEFAULT_CONFIG
        if not path.exists():
            return None, {}  # flags and variables alone are fine
    return Path(os.path.abspath(path)), _read_file(path, display)


# --------------------------------------------------------------------------- PKCS#11

#: The keys that only mean something with ``pkcs11_lib``.
_PKCS11_KEYS = ("pkcs11_token_label", "pkcs11_slot", "pkcs11_key_label", "pkcs11_pin_file")


def _pkcs11_key(
    lib: _Given,
    given: Callable[[str], _Given | None],
    environ: Mapping[str, str],
    base: Path,
) -> Pkcs11Key:
    """The PKCS#11 settings, ``pkcs11_lib`` given; the PIN read from its file."""
    key = given("key")
    if key is not None:
        raise ConfigError(
            f"key and pkcs11_lib are both set ({key.origin}; {lib.origin}): the device key is "
            "either a PEM file or in a PKCS#11 token: unset one"
        )
    library = _readable_file(lib)
    label, slot = given("pkcs11_token_label"), given("pkcs11_slot")
    if label is not None and slot is not None:
        raise ConfigError(
            f"pkcs11_token_label and pkcs11_slot are both set ({label.origin}; {slot.origin}): "
            "set one of them"
        )
    if label is None and slot is None:
        raise ConfigError(
            "pkcs11_lib is set but neither pkcs11_token_label nor pkcs11_slot: set one of them"
        )
    key_label = given("pkcs11_key_label")
    if key_label is None:
        raise ConfigError(
            "pkcs11_lib is set but pkcs11_key_label is not: set the label of the private key"
        )
    pin = given("pkcs11_pin_file")
    credentials = environ.get(ENV_CREDENTIALS, "").strip()
    if pin is None and credentials:
        pin = _Given(
            os.path.join(credentials, PIN_CREDENTIAL),
            f"pkcs11_pin_file (default: ${ENV_CREDENTIALS}/{PIN_CREDENTIAL})",
            base,
        )
    if pin is None:
        raise ConfigError(
            "pkcs11_lib is set but pkcs11_pin_file is not: name the file that holds the token's "
            f"user PIN, or hand it over as the systemd credential {PIN_CREDENTIAL} "
            f"(LoadCredential={PIN_CREDENTIAL}:FILE)"
        )
    pin_file, secret = _pin_file(pin)
    return Pkcs11Key(
        lib=library,
        token_label=None if label is None else _label(32)(label),
        slot=None if slot is None else _slot(slot),
        key_label=_label(255)(key_label),
        pin_file=pin_file,
        pin=secret,
    )


# --------------------------------------------------------------------------- load


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


def state_dir_problem(path: Path) -> str | None:
    """Why the agent could not keep its tunnels in ``path``, or ``None``: it must be a
    writable directory, or one the agent can create (its nearest existing parent is one)."""
    if path.exists():
        if not path.is_dir():
            return f"state_dir: {path}: not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"state_dir: {path}: not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"state_dir: {path}: cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"state_dir: {path}: cannot be created: {parent} is not writable"
    return None


# --------------------------------------------------------------------------- TLS files

#: More than this is not a certificate, key or CA bundle file (a system bundle is ~200 KiB).
_MAX_PEM = 16 * 1024 * 1024


class _Encrypted(Exception):
    """The key asked for a passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def _read_all(name: str, path: Path) -> bytes:
    """The file's bytes (up to :data:`_MAX_PEM` and one more); a directory is listed instead."""
    try:
        if path.is_dir():
            os.listdir(path)
            return b""
        with path.open("rb") as file:
            return file.read(_MAX_PEM + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: {path}: cannot read: {exc.strerror or exc}") from None


def _certificates(name: str, path: Path) -> None:
    """``path`` holds at least one PEM certificate (or is a readable directory of them)."""
    data = _read_all(name, path)
    if path.is_dir():
        return
    if len(data) > _MAX_PEM:
        raise ConfigError(f"{name}: {path}: larger than {_MAX_PEM >> 20} MiB: not a PEM file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError):
        raise ConfigError(f"{name}: {path}: no PEM certificate in it") from None


def check_tls_files(settings: AgentSettings) -> None:
    """Read and parse the certificate, key and CA files, as ``--check`` and every start do.

    Each must be readable and hold PEM of its kind: certificates for ``cert``, ``root_ca`` and
    ``tunnel_ca`` (or a readable directory for the CAs), an unencrypted private key that belongs
    to the certificate for ``key``. The message names the setting and the file, never what the
    file holds.

    Raises:
        ConfigError: One line, e.g. ``root_ca: /etc/iotunnel/ca.pem: cannot read: Permission
            denied``.
    """
    _certificates("cert", settings.cert)
    if settings.key is not None:
        _key_file(settings.cert, settings.key)
    if settings.root_ca is not None:
        _certificates("root_ca", settings.root_ca)
    if settings.tunnel_ca is not None:
        _certificates("tunnel_ca", settings.tunnel_ca)


def _key_file(cert: Path, key: Path) -> None:
    """``key`` is an unencrypted PEM private key, ``cert``'s."""
    data = _read_all("key", key)
    if b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"key: {key}: no PEM private key in it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            f"key: {key}: encrypted with a passphrase, which the agent cannot ask for"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"cert, key: {cert} is not the certificate of {key}") from None
        raise ConfigError(f"key: {key}: not a usable PEM private key") from None
    except OSError as exc:
        raise ConfigError(f"cert, key: cannot read: {exc.strerror or exc}") from None


def _lookup(layers: Sequence[Mapping[str, _Given]], name: str, base: Path) -> _Given | None:
    """The value of ``name`` in the first layer that has one, else its default."""
    for layer in layers:
        if name in layer:
            return layer[name]
    key = _KEYS_BY_NAME[name]
    if key.default is not None:
        return _Given(key.default, f"{name} (default)", base)
    return None


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """``iotunnel-agent status``: where the running agent's state is, and the output form."""

    state_dir: Path
    json: bool


def load_status(
    argv: Sequence[str], environ: Mapping[str, str], cwd: Path | None = None
) -> StatusRequest | CliExit:
    """Parse ``iotunnel-agent status [--config FILE] [--json] [--KEY VALUE...]``: the same
    settings as the agent's, of which only ``state_dir`` is used (the settings file must
    still be valid).

    Raises:
        ConfigError: A bad flag, settings file or ``state_dir``.
    """
    base = Path.cwd() if cwd is None else cwd
    parser = _build_parser(status=True)
    namespace = parser.parse_args(list(argv))
    if namespace.help:
        return CliExit(0, parser.format_help())
    if namespace.version:
        return CliExit(0, f"{PROG} {__version__}\n")
    _, from_file = _settings_file(namespace, environ, base)
    layers = [_command_line(namespace, base), _environment(environ, base), from_file]
    found = _lookup(layers, "state_dir", base)
    assert found is not None  # it has a default
    return StatusRequest(_path(found), bool(namespace.json))


def load(
    argv: Sequence[str], environ: Mapping[str, str], cwd: Path | None = None
) -> AgentSettings | CheckOnly | CliExit:
    """Parse the agent's settings.

    Args:
        argv: The command-line arguments, without the program name.
        environ: The environment (``IOTUNNEL_*`` variables are read).
        cwd: What relative paths on the command line and in the environment are relative to.

    Returns:
        The settings; :class:`CheckOnly` with them for ``--check``; a :class:`CliExit` for
        ``--help`` and ``--version``.

    Raises:
        ConfigError: A setting is missing or wrong.
    """
    base = Path.cwd() if cwd is None else cwd
    parser = _build_parser()
    namespace = parser.parse_args(list(argv))  # a bad one raises UsageError, a ConfigError
    if namespace.help:
        return CliExit(0, parser.format_help())
    if namespace.version:
        return CliExit(0, f"{PROG} {__version__}\n")
    config_file, from_file = _settings_file(namespace, environ, base)
    layers = [_command_line(namespace, base), _environment(environ, base), from_file]

    def given(name: str) -> _Given | None:
        return _lookup(layers, name, base)

    def required(name: str, convert: Callable[[_Given], _T]) -> _T:
        found = given(name)
        if found is None:
            key = _KEYS_BY_NAME[name]
            raise ConfigError(
                f"{name} is not set: add '{name} = ...' to [{SECTION}] of the settings file, "
                f"or set {key.variable} or {key.flag}"
            )
        return convert(found)

    def optional(name: str, convert: Callable[[_Given], _T]) -> _T | None:
        found = given(name)
        return None if found is None else convert(found)

    client_id = required("client_id", _client_id)
    thing = given("thing_name")
    if thing is None:
        thing = _Given(client_id, "thing_name (default: client_id)", base)
    tunnel_endpoint = optional("tunnel_endpoint", _tunnel_endpoint)
    tunnel_ca = optional("tunnel_ca", _ca)
    if tunnel_ca is not None and tunnel_endpoint is None:
        raise ConfigError("tunnel_ca is set but tunnel_endpoint is not: it would not be used")
    endpoint, port = required("endpoint", _host), required("port", _port)
    thing_name, cert = _thing_name(thing), required("cert", _readable_file)
    key: Path | None = None
    pkcs11: Pkcs11Key | None = None
    lib = given("pkcs11_lib")
    if lib is None:
        for name in _PKCS11_KEYS:
            if given(name) is not None:
                raise ConfigError(f"{name} is set but pkcs11_lib is not: it would not be used")
        key = required("key", _readable_file)
    else:
        pkcs11 = _pkcs11_key(lib, given, environ, base)
    proxy_given = given("https_proxy") or _environment_proxy(environ, "https_proxy", base)
    no_proxy = _environment_proxy(environ, "no_proxy", base)
    settings = AgentSettings(
        endpoint=endpoint,
        port=port,
        client_id=client_id,
        thing_name=thing_name,
        cert=cert,
        key=key,
        root_ca=optional("root_ca", _ca),
        mapping_dir=required("mapping_dir", _mapping_dir),
        tunnel_endpoint=tunnel_endpoint,
        tunnel_ca=tunnel_ca,
        max_tunnels=required("max_tunnels", _max_tunnels),
        log_level=required("log_level", _log_level),
        config_file=config_file,
        state_dir=required("state_dir", _path),
        pkcs11=pkcs11,
        https_proxy=None if proxy_given is None else _https_proxy(proxy_given),
        no_proxy="" if no_proxy is None else no_proxy.value.strip(),
        launcher=required("launcher", _launcher),
    )
    if namespace.check:
        return CheckOnly(settings)
    return settings
