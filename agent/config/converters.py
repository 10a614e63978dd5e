"""Converters: one setting as given (:class:`~agent.config.keys._Given`) -> its checked value."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path

from agent.config.keys import _fail, _Given
from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from iotunnel.rules import HOST_RE, THING_NAME_RE
from proxy import config as proxy_config
from proxy.config import read_mapping_dir

_CLIENT_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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


def _log_level(given: _Given) -> int:
    text = given.value.strip().lower()
    if text not in _LEVELS:
        _fail(given, f"expected one of {', '.join(_LEVELS)}")
    return _LEVELS[text]
