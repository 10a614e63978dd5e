"""Load: the sources merged by precedence into one :class:`ProxySettings` (or a :class:`CliExit`).

Part of :mod:`proxy.config`; see its docstring for the rules every part follows.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from iotunnel import __version__
from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from proxy.config.converters import (
    _access_token,
    _ca_path,
    _client_token,
    _endpoint_url,
    _existing_path,
    _fail,
    _mode,
    _peer_version,
    _region_url,
    _switch,
    _verbosity,
)
from proxy.config.files import _mapping_dir_entries, _Sourced
from proxy.config.model import (
    _DEFAULT_VERBOSITY,
    DEFAULT_CONFIG_DIR,
    ENV_ACCESS_TOKEN,
    ENV_ENDPOINT,
    ENV_REGION,
    PROG,
    CliExit,
    ProxySettings,
    ServiceMapping,
    Tuning,
)
from proxy.config.options import (
    _ENVIRONMENT,
    _OPTIONS,
    _build_parser,
    _Given,
    _parse_argv,
    _read_option_file,
    _Sources,
)
from proxy.config.settings_json import _FileSettings, _read_settings_json, default_settings_json
from proxy.config.values import _bind_address, _Invalid, parse_mapping_list


def _resolve_mode(sources: _Sources) -> tuple[Mode, _Given | None]:
    """The mode, and the -s/-d value (if any) of the layer that decided it."""
    group = sources.group("mode", "source-listen-port", "destination-app")
    source, destination = group.get("source-listen-port"), group.get("destination-app")
    if source is not None and destination is not None:
        raise ConfigError(f"{source.origin} and {destination.origin} cannot be used together")
    apps = source or destination
    implied = Mode.SOURCE if source is not None else Mode.DESTINATION
    given_mode = group.get("mode")
    if given_mode is not None:
        mode = _mode(given_mode)
        if apps is not None and implied is not mode:
            raise ConfigError(f"{apps.origin} cannot be used with {given_mode.origin} {mode.value}")
        return mode, apps
    if apps is None:
        raise ConfigError("cannot tell the mode: give -s (source), -d (destination) or -m src|dst")
    return implied, apps


def _resolve_mappings(
    sources: _Sources, mode: Mode, apps: _Given | None, cwd: Path
) -> tuple[tuple[ServiceMapping, ...], str | None]:
    """The mappings, and a warning when the default ``./config`` was not usable."""
    from_cli: list[_Sourced] = []
    if apps is not None:
        from_cli = [
            _Sourced(mapping, apps.origin)
            for mapping in parse_mapping_list(apps.value, flag=apps.origin, mode=mode)
        ]
    config_dir = sources.get("config-dir")
    from_files: list[_Sourced] = []
    read_dir: str | None = None
    skipped: str | None = None
    if config_dir is not None:
        read_dir = config_dir.value.strip()
        if not read_dir or not (cwd / read_dir).is_dir():
            _fail(config_dir, "not a directory")
        from_files = _mapping_dir_entries(cwd / read_dir, read_dir, mode)
    elif apps is None and (cwd / DEFAULT_CONFIG_DIR).is_dir():
        # The implicit ./config may be some other program's settings (a checkout's or
        # /etc/iotunnel's config/). Explicit --config-dir is strict; the default is used only
        # when all of it reads as mappings, as the reference skips files it cannot parse.
        try:
            from_files = _mapping_dir_entries(cwd / DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_DIR, mode)
        except ConfigError as exc:
            if mode is Mode.DESTINATION:
                raise ConfigError(
                    "destination mode needs a service mapping: give -d (e.g. -d SSH1=22) or "
                    f"--config-dir; the default ./{DEFAULT_CONFIG_DIR} is not a mapping "
                    f"directory: {exc}"
                ) from None
            skipped = (
                f"not using ./{DEFAULT_CONFIG_DIR} for mappings ({exc}); every service gets a "
                "free port (choose with -s or --config-dir)"
            )
        else:
            read_dir = DEFAULT_CONFIG_DIR

    overridden = {entry.mapping.service_id for entry in from_cli}
    merged = from_cli + [e for e in from_files if e.mapping.service_id not in overridden]
    unnamed = [entry for entry in merged if not entry.mapping.service_id]
    named = [entry for entry in merged if entry.mapping.service_id]
    if unnamed and named:
        raise ConfigError(
            f"{unnamed[0].origin}: an unnamed mapping cannot be combined with named ones "
            f"({named[0].mapping.service_id!r} from {named[0].origin})"
        )
    if not merged and mode is Mode.DESTINATION:
        where = f" (none found in {read_dir})" if read_dir is not None else ""
        raise ConfigError(
            "destination mode needs a service mapping: give -d (e.g. -d SSH1=22) or "
            f"SERVICE_ID = endpoint lines in --config-dir{where}"
        )
    return tuple(entry.mapping for entry in merged), skipped


def _resolve_url(sources: _Sources, mode: Mode, settings: _FileSettings) -> str:
    group = sources.group("region", "proxy-endpoint")
    region, endpoint = group.get("region"), group.get("proxy-endpoint")
    if region is not None and endpoint is not None:
        raise ConfigError(f"{region.origin} and {endpoint.origin} cannot be used together")
    if region is not None:
        return _region_url(region, mode, settings)
    if endpoint is not None:
        return _endpoint_url(endpoint, mode)
    raise ConfigError(f"give -r REGION or -e ENDPOINT (or set {ENV_REGION} or {ENV_ENDPOINT})")


def _settings(sources: _Sources, cwd: Path, *, token_from_argv: bool) -> ProxySettings:
    mode, apps = _resolve_mode(sources)

    settings_json = sources.get("settings-json")
    file_settings = (
        _read_settings_json(_existing_path(settings_json, cwd), settings_json.value.strip())
        if settings_json is not None
        else _FileSettings(Tuning())
    )
    url = _resolve_url(sources, mode, file_settings)

    token = sources.get("access-token")
    if token is None:
        raise ConfigError(
            f"no access token: set {ENV_ACCESS_TOKEN} (or access-token in --config, or -t)"
        )
    client = sources.get("client-token")

    peer_version = 3
    client_type = sources.get("destination-client-type")
    if client_type is not None:
        # Validated in either mode, used only by a source: a destination detects each peer's
        # version itself. The Greengrass tunneling component passes it to destinations.
        checked = _peer_version(client_type)
        if mode is Mode.SOURCE:
            peer_version = checked

    bind = sources.get("local-bind-address")
    if bind is None:
        # The settings file's default is a listen address: a destination takes only an
        # explicit -b as the host of its port-only mappings (as the reference does).
        bind_address = file_settings.default_bind_address if mode is Mode.SOURCE else None
    else:
        try:
            bind_address = _bind_address(bind.value.strip())
        except _Invalid as exc:
            _fail(bind, str(exc))
    capath = sources.get("capath")
    no_verify = sources.get("no-ssl-host-verify")
    verbose = sources.get("verbose")
    mappings, skipped_config_dir = _resolve_mappings(sources, mode, apps, cwd)
    return ProxySettings(
        mode=mode,
        url=url,
        access_token=_access_token(token),
        client_token=None if client is None else _client_token(client),
        mappings=mappings,
        bind_address=bind_address,
        ca_path=None if capath is None else _ca_path(capath, cwd),
        verify_host=no_verify is None or not _switch(no_verify),
        verbosity=_DEFAULT_VERBOSITY if verbose is None else _verbosity(verbose),
        peer_version=peer_version,
        tuning=file_settings.tuning,
        access_token_from_argv=token_from_argv,
        skipped_config_dir=skipped_config_dir,
    )


def _cli_layer(namespace: argparse.Namespace) -> dict[str, _Given]:
    return {
        option.name: _Given(getattr(namespace, option.dest), option.label)
        for option in _OPTIONS
        if getattr(namespace, option.dest) is not None
    }


def _environment_layer(environ: Mapping[str, str]) -> dict[str, _Given]:
    """The reference's variables; an empty variable counts as unset."""
    return {
        name: _Given(environ[variable], variable)
        for variable, name in _ENVIRONMENT.items()
        if environ.get(variable, "").strip()
    }


def _export_default_settings(target: str, cwd: Path) -> None:
    try:
        (cwd / target).write_text(default_settings_json(), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--export-default-settings: {target!r}: {exc.strerror or exc}") from None


def load(
    argv: Sequence[str], environ: Mapping[str, str], cwd: Path | None = None
) -> ProxySettings | CliExit:
    """Parse the proxy's configuration.

    Args:
        argv: The command-line arguments, without the program name.
        environ: The environment (only the ``AWSIOT_TUNNEL_*`` variables are read).
        cwd: The directory that relative paths and the default ``./config`` are relative to;
            the process's working directory when ``None``.

    Returns:
        The settings to run with, or a :class:`CliExit` for ``--help``, ``--version`` and
        ``--export-default-settings`` (which writes its file before returning).

    Raises:
        ConfigError: Anything is wrong; the one-line message names the flag, variable,
            ``file:line`` or key.
    """
    base = Path.cwd() if cwd is None else cwd
    parser = _build_parser()
    namespace = _parse_argv(parser, argv)
    if namespace.help:
        return CliExit(0, parser.format_help())
    if namespace.version:
        return CliExit(0, f"{PROG} {__version__}\n")
    if namespace.export_default_settings is not None:
        _export_default_settings(namespace.export_default_settings, base)
        return CliExit(0, "")
    cli = _cli_layer(namespace)
    layers: list[Mapping[str, _Given]] = [cli]
    if namespace.config is not None:
        layers.append(_read_option_file(base / namespace.config, namespace.config))
    layers.append(_environment_layer(environ))
    return _settings(_Sources(layers), base, token_from_argv="access-token" in cli)
