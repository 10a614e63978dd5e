"""Options: the flags, their option-file keys and variables, and the argument parser.

Part of :mod:`proxy.config`; see its docstring for the rules every part follows.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from iotunnel.cli import Parser
from iotunnel.errors import ConfigError
from proxy.config.files import _read_ini
from proxy.config.model import (
    _OPTION_NAME_RE,
    DEFAULT_CONFIG_DIR,
    ENV_ACCESS_TOKEN,
    ENV_CLIENT_TOKEN,
    ENV_ENDPOINT,
    ENV_REGION,
    PROG,
)


class _Option(NamedTuple):
    name: str  # the long flag without dashes; also the key in a --config file
    short: str | None
    metavar: str | None  # None: a switch
    help: str

    @property
    def label(self) -> str:
        """How error messages name the flag: the short form when there is one."""
        return f"-{self.short}" if self.short else f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


#: Options that may also be set in a --config file, in help order.
_OPTIONS = (
    _Option("region", "r", "REGION", "AWS region of the tunnel, e.g. us-east-1"),
    _Option(
        "proxy-endpoint",
        "e",
        "ENDPOINT",
        "tunnel service endpoint: HOST[:PORT] (port 443) or a wss:// or ws:// URL",
    ),
    _Option(
        "access-token",
        "t",
        "TOKEN",
        f"tunnel access token; visible to other users here: prefer {ENV_ACCESS_TOKEN}",
    ),
    _Option("client-token", "i", "TOKEN", "client token (32..128 of a-z A-Z 0-9 -)"),
    _Option(
        "source-listen-port",
        "s",
        "MAPPINGS",
        "source mode; listen ports: 5555 or SSH1=5555,HTTP1=5556",
    ),
    _Option(
        "destination-app",
        "d",
        "MAPPINGS",
        "destination mode; endpoints: 22 or SSH1=22,HTTP1=host:80,WEB=/run/app.sock",
    ),
    _Option("mode", "m", "MODE", "src, source, dst or destination (else implied by -s/-d)"),
    _Option(
        "local-bind-address",
        "b",
        "ADDRESS",
        "address to listen on (source) or host of port-only mappings (destination)",
    ),
    _Option(
        "capath", "c", "PATH", "CA file or directory to trust for the service, besides the system's"
    ),
    _Option(
        "no-ssl-host-verify",
        "k",
        None,
        "do not verify the service's certificate at all (development and testing only)",
    ),
    _Option(
        "verbose",
        "v",
        "LEVEL",
        "0 off, 1 fatal, 2 error, 3 warning, 4 info (default), 5 debug, 6..255 trace",
    ),
    _Option(
        "destination-client-type",
        "y",
        "V1|V2",
        "source mode: the destination speaks protocol V1 or V2",
    ),
    _Option(
        "config-dir",
        None,
        "DIR",
        f"directory of SERVICE_ID = endpoint files (default ./{DEFAULT_CONFIG_DIR})",
    ),
    _Option("settings-json", None, "FILE", "fine-grained settings (JSON)"),
)

_OPTIONS_BY_NAME = {option.name: option for option in _OPTIONS}
_CLI_ONLY = frozenset({"config", "export-default-settings", "help", "version"})
_ENVIRONMENT = {
    ENV_REGION: "region",
    ENV_ENDPOINT: "proxy-endpoint",
    ENV_ACCESS_TOKEN: "access-token",
    ENV_CLIENT_TOKEN: "client-token",
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class _Given(NamedTuple):
    """One option's value as text, and where it came from (for messages)."""

    value: str
    origin: str


class _Once(argparse.Action):
    """Store a value, refusing a second occurrence of the flag."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "given more than once")
        setattr(namespace, self.dest, values)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A fixed width, so help does not depend on the terminal (or on ``$COLUMNS``)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


_EPILOG = f"""\
environment:
  {ENV_ACCESS_TOKEN}   access token (the safe way to pass it)
  {ENV_CLIENT_TOKEN}   client token
  {ENV_REGION}         region (like -r)
  {ENV_ENDPOINT}       endpoint (like -e)

Precedence: command line > --config file > environment > defaults.
A --config file holds "long-option = value" lines, e.g. "region = us-east-1".
Mapping files hold "SERVICE_ID = endpoint" lines, e.g. "SSH1 = 22"."""


def _build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="AWS IoT Secure Tunneling local proxy (compatible with localproxy).",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    for option in _OPTIONS:
        flags = [f"-{option.short}"] if option.short else []
        flags.append(f"--{option.name}")
        if option.metavar is None:
            parser.add_argument(
                *flags, dest=option.dest, action="store_const", const="true", help=option.help
            )
        else:
            parser.add_argument(
                *flags, dest=option.dest, action=_Once, metavar=option.metavar, help=option.help
            )
    parser.add_argument("--config", action=_Once, metavar="FILE", help="read options from FILE")
    parser.add_argument(
        "--export-default-settings",
        action=_Once,
        metavar="FILE",
        help="write the default --settings-json to FILE and exit",
    )
    parser.add_argument("-V", "--version", action="store_true", help="show the version and exit")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    return parser


#: The flags that take a value, as typed, and the long name of each.
_VALUED = {
    **{f"-{o.short}": o.name for o in _OPTIONS if o.metavar is not None and o.short},
    **{f"--{o.name}": o.name for o in _OPTIONS if o.metavar is not None},
    "--config": "config",
    "--export-default-settings": "export-default-settings",
}
#: Every flag, as typed.
_FLAGS = frozenset(
    [*_VALUED, "-h", "--help", "-V", "--version"]
    + [f"-{o.short}" for o in _OPTIONS if o.short]
    + [f"--{o.name}" for o in _OPTIONS]
)


def _is_flag(arg: str) -> bool:
    """``arg`` is one of the flags, alone or with its value glued on (-d22, --region=x)."""
    if arg.startswith("--"):
        return arg.partition("=")[0] in _FLAGS
    return arg[:2] in _FLAGS


def _glue_dash_values(argv: Sequence[str]) -> list[str]:
    """Read a value that starts with '-' as the reference does.

    The reference (Boost.Program_options) takes the argument after a flag that needs a value as
    that value even when it starts with '-' (a token may: ``-t -Qx...``), unless it is one of its
    flags (``-t -d 22`` is a ``-t`` without its value). argparse would take any such argument for
    a flag: it is glued on here (``--access-token=-Qx...``), which argparse reads as a value.
    """
    glued: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            glued += argv[index:]
            break
        following = argv[index + 1] if index + 1 < len(argv) else None
        name = _VALUED.get(arg)
        if (
            name is not None
            and following is not None
            and following.startswith("-")
            and following != "-"
            and not _is_flag(following)
        ):
            glued.append(f"--{name}={following}")
            index += 2
            continue
        glued.append(arg)
        index += 1
    return glued


def _parse_argv(parser: Parser, argv: Sequence[str]) -> argparse.Namespace:
    namespace, extras = parser.parse_known_args(_glue_dash_values(argv))
    if extras:
        first = extras[0]
        if first != "--" and first.startswith("-") and len(first) > 1:
            # Name only the option: a glued value (--x=VALUE, -xVALUE) may be a token.
            name = first.partition("=")[0] if first.startswith("--") else first[:2]
            raise ConfigError(f"unrecognized option {name!r}")
        # Never echo a positional value: it is often a token that lost its -t.
        raise ConfigError("unexpected argument: every value needs a flag (see --help)")
    return namespace


def _read_option_file(path: Path, display: str) -> dict[str, _Given]:
    """Read a ``--config`` file: ``long-option = value`` lines, like the reference's."""
    given: dict[str, _Given] = {}
    for key, value, line in _read_ini(path, display, expected="option = value", quote=False):
        where = f"{display}:{line}"
        if key in _CLI_ONLY:
            raise ConfigError(f"{where}: {key!r} is not allowed in a --config file")
        if key not in _OPTIONS_BY_NAME:
            shown = f" {key!r}" if _OPTION_NAME_RE.fullmatch(key) else ""
            raise ConfigError(f"{where}: unknown option{shown}")
        given[key] = _Given(value, f"{where}: {key}")
    return given


class _Sources:
    """The layers of given options, highest precedence first."""

    def __init__(self, layers: Sequence[Mapping[str, _Given]]) -> None:
        self._layers = layers

    def get(self, name: str) -> _Given | None:
        for layer in self._layers:
            if name in layer:
                return layer[name]
        return None

    def group(self, *names: str) -> dict[str, _Given]:
        """The members of ``names`` set by the highest layer that sets any of them."""
        for layer in self._layers:
            found = {name: layer[name] for name in names if name in layer}
            if found:
                return found
        return {}
