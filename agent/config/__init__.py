"""The agent's settings: ``agent.ini``, ``IOTUNNEL_*`` variables, flags -> :class:`AgentSettings`.

Every key lives in the ``[agent]`` section of the settings file (``/etc/iotunnel/agent.ini`` by
default; ``--config FILE`` or ``IOTUNNEL_CONFIG`` name another). Each key can be overridden by
an environment variable (``IOTUNNEL_`` + the key in capitals) and by a flag (``--`` + the key
with dashes): ``port`` is ``IOTUNNEL_PORT`` and ``--port``. Precedence, highest first: flag,
environment, file, default. An empty value means "not set".

Values are checked once, here: a bad one raises :class:`ConfigError` with one line that names
where it came from (``agent.ini:7: port``, ``IOTUNNEL_PORT``, ``--port``). The file holds paths,
never secrets, so values may be quoted in messages (the PKCS#11 PIN is read from the file that
``pkcs11_pin_file`` names and kept as a :class:`~iotunnel.secret.Secret`). Relative paths in the
file are relative to the file's directory; on the command line and in the environment, to the
working directory. Nothing here reads ``os.environ``: the environment is an argument.

The device key is either a PEM file (``key``) or an object in a PKCS#11 token (``pkcs11_lib``,
``pkcs11_token_label`` or ``pkcs11_slot``, ``pkcs11_key_label``, and the user PIN in the file
``pkcs11_pin_file``, by default the systemd credential ``$CREDENTIALS_DIRECTORY/pkcs11-pin``).

The package, one module a section: :mod:`~agent.config.keys` (the keys and where they are
given), :mod:`~agent.config.model` (:class:`AgentSettings` and the other results),
:mod:`~agent.config.sources` (file, variables, flags), :mod:`~agent.config.converters` (one
value each), :mod:`~agent.config.pkcs11` and :mod:`~agent.config.httpproxy` (their settings),
:mod:`~agent.config.load` (precedence, :func:`load`, :func:`load_status`),
:mod:`~agent.config.tls` (:func:`check_tls_files`), :mod:`~agent.config.state_dir` and
:mod:`~agent.config.summary`.
"""

from __future__ import annotations

from agent.config.converters import LAUNCHERS
from agent.config.httpproxy import HttpProxy
from agent.config.keys import (
    ALPN_PORT,
    ALPN_PROTOCOL,
    DEFAULT_CONFIG,
    DEFAULT_MAPPING_DIR,
    DEFAULT_STATE_DIR,
    ENV_CONFIG,
    ENV_CREDENTIALS,
    ENV_PREFIX,
    KEYS,
    PIN_CREDENTIAL,
    PROG,
    SECTION,
)
from agent.config.load import load, load_status
from agent.config.model import AgentSettings, CheckOnly, CliExit, StatusRequest
from agent.config.pkcs11 import Pkcs11Key
from agent.config.state_dir import state_dir_problem
from agent.config.summary import summary
from agent.config.tls import check_tls_files
from iotunnel.errors import ConfigError

__all__ = [
    "ALPN_PORT",
    "ALPN_PROTOCOL",
    "DEFAULT_CONFIG",
    "DEFAULT_MAPPING_DIR",
    "DEFAULT_STATE_DIR",
    "ENV_CONFIG",
    "ENV_CREDENTIALS",
    "ENV_PREFIX",
    "KEYS",
    "LAUNCHERS",
    "PIN_CREDENTIAL",
    "PROG",
    "SECTION",
    "AgentSettings",
    "CheckOnly",
    "CliExit",
    "ConfigError",
    "HttpProxy",
    "Pkcs11Key",
    "StatusRequest",
    "check_tls_files",
    "load",
    "load_status",
    "state_dir_problem",
    "summary",
]
