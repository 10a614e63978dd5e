"""Configuration of the local proxy, parsed once at the edge into frozen dataclasses.

:func:`load` turns the command line, the ``--config`` option file, the environment, the
service-mapping files of ``--config-dir`` and the ``--settings-json`` file into one validated
:class:`ProxySettings`, or a :class:`CliExit` for ``--help``, ``--version`` and
``--export-default-settings``. Flags, option-file keys, variables and mapping files are those of
the reference ``localproxy`` (aws-samples/aws-iot-securetunneling-localproxy).

Precedence, highest first: command line, ``--config`` file, environment, defaults. Options that
only make sense together are resolved as a group: the highest source that sets any of
``-r``/``-e`` decides the service endpoint, and the highest source that sets any of
``-m``/``-s``/``-d`` decides the mode; inside that one source the members must agree.

Every problem raises :class:`~iotunnel.errors.ConfigError` with one line that names the flag
(``-d``), variable (``AWSIOT_TUNNEL_REGION``), ``file:line`` or settings key. No message ever
contains a token: token values are never echoed, and the option file's bad lines are not quoted.
Nothing here reads ``os.environ``: the environment is an argument, and so is the directory that
relative paths and the default ``./config`` resolve against.
"""

from __future__ import annotations

from proxy.config.files import read_config_text, read_mapping_dir, read_mapping_file
from proxy.config.load import load
from proxy.config.model import (
    DEFAULT_CONFIG_DIR,
    ENV_ACCESS_TOKEN,
    ENV_CLIENT_TOKEN,
    ENV_ENDPOINT,
    ENV_REGION,
    PROG,
    CliExit,
    Endpoint,
    ProxySettings,
    ServiceMapping,
    Tuning,
)
from proxy.config.settings_json import default_settings_json
from proxy.config.values import parse_endpoint, parse_mapping_list

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "ENV_ACCESS_TOKEN",
    "ENV_CLIENT_TOKEN",
    "ENV_ENDPOINT",
    "ENV_REGION",
    "PROG",
    "CliExit",
    "Endpoint",
    "ProxySettings",
    "ServiceMapping",
    "Tuning",
    "default_settings_json",
    "load",
    "parse_endpoint",
    "parse_mapping_list",
    "read_config_text",
    "read_mapping_dir",
    "read_mapping_file",
]
