"""Where settings come from: the settings file, ``IOTUNNEL_*`` variables and flags, each as
``name -> _Given``, and the lookup through them in order of precedence."""

from __future__ import annotations

import argparse
import configparser
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent.config.keys import (
    _KEYS_BY_NAME,
    DEFAULT_CONFIG,
    ENV_CONFIG,
    ENV_PREFIX,
    KEYS,
    PROG,
    SECTION,
    _Given,
)
from iotunnel.cli import Parser
from iotunnel.errors import ConfigError
from proxy.config import read_config_text


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


def _lookup(layers: Sequence[Mapping[str, _Given]], name: str, base: Path) -> _Given | None:
    """The value of ``name`` in the first layer that has one, else its default."""
    for layer in layers:
        if name in layer:
            return layer[name]
    key = _KEYS_BY_NAME[name]
    if key.default is not None:
        return _Given(key.default, f"{name} (default)", base)
    return None
