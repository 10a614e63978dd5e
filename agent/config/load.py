"""Loading: flags, ``IOTUNNEL_*`` variables and the settings file -> :class:`AgentSettings`
(:func:`load`), or the state directory of ``iotunnel-agent status`` (:func:`load_status`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from agent.config.converters import (
    _ca,
    _client_id,
    _host,
    _launcher,
    _log_level,
    _mapping_dir,
    _max_tunnels,
    _path,
    _port,
    _readable_file,
    _thing_name,
    _tunnel_endpoint,
)
from agent.config.httpproxy import _environment_proxy, _https_proxy
from agent.config.keys import _KEYS_BY_NAME, PROG, SECTION, _Given
from agent.config.model import AgentSettings, CheckOnly, CliExit, StatusRequest
from agent.config.pkcs11 import _PKCS11_KEYS, Pkcs11Key, _pkcs11_key
from agent.config.sources import (
    _build_parser,
    _command_line,
    _environment,
    _lookup,
    _settings_file,
)
from iotunnel import __version__
from iotunnel.errors import ConfigError

_T = TypeVar("_T")


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
