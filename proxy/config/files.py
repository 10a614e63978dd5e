"""Files: the INI reader, ``--config`` option files, the mapping files of ``--config-dir``.

Part of :mod:`proxy.config`; see its docstring for the rules every part follows.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import NamedTuple, NoReturn

from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from proxy.config.model import _OPTION_NAME_RE, ServiceMapping
from proxy.config.values import _endpoint, _Invalid, _service_id


class _IniEntry(NamedTuple):
    key: str
    value: str
    line: int


class _CaseSensitiveParser(configparser.ConfigParser):
    """Keys are service IDs and option names: keep their case."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


_INI_SECTION = "entries"


def read_config_text(path: Path, display: str) -> str:
    """A configuration file's text; a missing, unreadable or non-UTF-8 file is a ConfigError
    naming ``display``."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{display}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{display}: {exc.strerror or exc}") from None


#: Mapping lines longer than this are not quoted in errors: an endpoint line is short, and a
#: long one may be a token pasted into the wrong file (tokens are 64 characters or more).
_QUOTABLE_LINE = 48


def _quotable(line: str) -> bool:
    return len(line) <= _QUOTABLE_LINE


def _read_ini(path: Path, display: str, *, expected: str, quote: bool) -> list[_IniEntry]:
    """Read ``KEY = value`` lines without a section header, as the reference proxy does.

    ``#`` and ``;`` start full-line comments; blank lines are fine; a value runs to the end of its
    line (no inline comments, no continuation lines). ``quote`` says whether a bad line may be
    quoted in the error (not in the option file, which may hold a token).
    """
    lines = [raw.strip() for raw in read_config_text(path, display).splitlines()]

    def bad(number: int, problem: str) -> ConfigError:
        shown = f"{lines[number - 1]!r}: " if quote and _quotable(lines[number - 1]) else ""
        return ConfigError(f"{display}:{number}: {shown}{problem}")

    def key_name(key: str) -> str:
        return repr(key) if quote or _OPTION_NAME_RE.fullmatch(key) else "an option"

    for number, line in enumerate(lines, 1):
        if line.startswith("["):
            raise bad(number, "section headers are not allowed")
    parser = _CaseSensitiveParser(
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        strict=True,
        empty_lines_in_values=False,
        interpolation=None,
    )
    # Lines are fed stripped, so an indented line is never a continuation of the one before;
    # the supplied header shifts configparser's line numbers by one.
    try:
        parser.read_string(f"[{_INI_SECTION}]\n" + "\n".join(lines), source=display)
    except configparser.DuplicateOptionError as exc:
        raise bad((exc.lineno or 1) - 1, f"{key_name(exc.option)} is set twice") from None
    except configparser.ParsingError as exc:
        raise bad(exc.errors[0][0] - 1, f"expected {expected!r}") from None
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if line and line[0] not in "#;":
            first_line.setdefault(line.partition("=")[0].rstrip(), number)
    return [_IniEntry(key, value, first_line[key]) for key, value in parser[_INI_SECTION].items()]


class _Sourced(NamedTuple):
    mapping: ServiceMapping
    origin: str


def _mapping_file_entries(path: Path, display: str, mode: Mode) -> list[_Sourced]:
    entries: list[_Sourced] = []
    for key, value, line in _read_ini(path, display, expected="SERVICE_ID = endpoint", quote=True):
        where = f"{display}:{line}"
        try:
            mapping = ServiceMapping(_service_id(key), _endpoint(value, mode))
        except _Invalid as exc:
            shown = f"{key} = {value}"
            raise ConfigError(
                f"{where}: {shown!r}: {exc}" if _quotable(shown) else f"{where}: {exc}"
            ) from None
        entries.append(_Sourced(mapping, where))
    return entries


def read_mapping_file(
    path: Path, *, mode: Mode, display: str | None = None
) -> list[ServiceMapping]:
    """Read one mapping file of ``SERVICE_ID = endpoint`` lines (no section header).

    Args:
        path: The file.
        mode: The proxy's mode (it decides which endpoints are valid).
        display: The name used in error messages; ``str(path)`` by default.

    Raises:
        ConfigError: The file cannot be read or a line is wrong (named as ``file:line``).
    """
    shown = str(path) if display is None else display
    return [entry.mapping for entry in _mapping_file_entries(path, shown, mode)]


#: Leftovers of package managers and editors, never read as mapping files.
_IGNORED_SUFFIXES = (
    "~",
    ".dpkg-old",
    ".dpkg-new",
    ".dpkg-dist",
    ".dpkg-tmp",
    ".dpkg-bak",
    ".ucf-old",
    ".ucf-new",
    ".ucf-dist",
    ".rpmnew",
    ".rpmsave",
    ".rpmorig",
)


def _mapping_files(directory: Path, display: str) -> list[Path]:
    """Regular, non-hidden files under ``directory`` (recursively, as the reference), sorted."""

    def unreadable(exc: OSError) -> NoReturn:
        raise ConfigError(f"{display}: cannot read {exc.filename}: {exc.strerror or exc}")

    found: list[Path] = []
    for root, dirs, files in os.walk(directory, onerror=unreadable):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found.extend(
            Path(root, name)
            for name in files
            if not name.startswith(".")
            and not name.endswith(_IGNORED_SUFFIXES)
            and Path(root, name).is_file()
        )
    return sorted(found, key=lambda path: path.relative_to(directory).parts)


def _mapping_dir_entries(directory: Path, display: str, mode: Mode) -> list[_Sourced]:
    entries: dict[str, _Sourced] = {}
    for path in _mapping_files(directory, display):
        shown = os.path.join(display, *path.relative_to(directory).parts)
        for entry in _mapping_file_entries(path, shown, mode):
            earlier = entries.get(entry.mapping.service_id)
            if earlier is not None:
                raise ConfigError(
                    f"{entry.origin}: service ID {entry.mapping.service_id!r} is already mapped "
                    f"at {earlier.origin}"
                )
            entries[entry.mapping.service_id] = entry
    return list(entries.values())


def read_mapping_dir(
    directory: Path, *, mode: Mode, display: str | None = None
) -> list[ServiceMapping]:
    """Read every mapping file under ``directory`` (see ``--config-dir``).

    Hidden files and directories and package-manager leftovers (``*.dpkg-old``, ``*~`` ...) are
    skipped. A service ID may appear once across all files.

    Args:
        directory: The directory.
        mode: The proxy's mode (it decides which endpoints are valid).
        display: The directory's name in error messages; ``str(directory)`` by default.

    Raises:
        ConfigError: A file cannot be read, a line is wrong, or a service ID repeats.
    """
    shown = str(directory) if display is None else display
    return [entry.mapping for entry in _mapping_dir_entries(directory, shown, mode)]
