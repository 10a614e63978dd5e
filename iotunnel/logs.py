"""Logging setup the three commands share: one line per record, secrets redacted.

Each command keeps its own format (the proxy's ``-v`` levels, the agent's journald prefixes,
the service's timestamps); what they share is here: :func:`redact` (every secret becomes
``[secure]``, in the message and in a traceback), :func:`one_line` and
:class:`OneLineFormatter` (newlines escaped, so that a record is always one line), and
:func:`install` (one handler on the root logger, and no library that logs raw handshake
headers below INFO).

The agent and the proxies it starts write the same records (:func:`output_handler`), in one of
three :class:`Output` forms: ``<6>[t3] text`` lines for journald's stream (it reads ``<N>`` as
the priority and stamps the time), ``time LEVEL [t3] text`` lines for a terminal, or native
journal records (:mod:`iotunnel.journal`) with fields: ``TUNNEL=t3`` and whatever a record
carries in its :data:`FIELDS` attribute (the agent's audit lines). A record of a tunnel carries
its tag (``t3``: a counter, never derived from a token) in its :data:`TAG` attribute, or the
handler's fixed tag (a proxy serves one tunnel).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from iotunnel.journal import JournalSocket

__all__ = [
    "ENV_LOG_FORMAT",
    "ENV_LOG_TAG",
    "FIELDS",
    "REDACTED",
    "TAG",
    "JournalFormatter",
    "JournalHandler",
    "OneLineFormatter",
    "Output",
    "TextFormatter",
    "install",
    "one_line",
    "output_handler",
    "priority",
    "redact",
    "tagged",
]

#: The attribute of a :class:`logging.LogRecord` that holds the tunnel tag.
TAG = "tunnel"
#: The attribute of a :class:`logging.LogRecord` that holds extra journal fields (a mapping).
FIELDS = "journal_fields"
#: How a proxy started by the agent logs (an :class:`Output` value), set by the agent.
ENV_LOG_FORMAT = "IOTUNNEL_LOG_FORMAT"
#: The tunnel tag a proxy started by the agent puts on its records.
ENV_LOG_TAG = "IOTUNNEL_LOG_TAG"

#: What a secret is replaced with.
REDACTED = "[secure]"
#: Libraries whose debug records may hold a token (websockets logs raw handshake headers) or
#: only repeat ours: never below INFO.
_QUIET = ("websockets", "asyncio")


def redact(record: logging.LogRecord, secrets: Iterable[str]) -> None:
    """Replace each of ``secrets`` with ``[secure]`` in ``record``'s message and exception."""
    secrets = [secret for secret in secrets if secret]
    text = record.getMessage()
    redacted = text
    for secret in secrets:
        if secret in redacted:
            redacted = redacted.replace(secret, REDACTED)
    if redacted is not text:
        record.msg, record.args = redacted, None
    if record.exc_info and record.exc_info[1] is not None:
        exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in secrets:
            exc_text = exc_text.replace(secret, REDACTED)
        record.exc_info, record.exc_text = None, exc_text


def one_line(text: str) -> str:
    """``text`` with carriage returns and newlines escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class OneLineFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose records (tracebacks included) are one line each."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def install(handler: logging.Handler, level: int, *, replace: bool = True) -> None:
    """Make ``handler`` the root logger's (the only one, unless ``replace`` is false), at
    ``level``; keep :data:`_QUIET` libraries at INFO or above."""
    root = logging.getLogger()
    if replace:
        for old in list(root.handlers):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(level, logging.INFO))


class Output(enum.Enum):
    """Where records go, and in which form."""

    TEXT = "text"  #: ``time LEVEL [tag] text`` lines on stderr: a terminal
    JOURNAL = "journal"  #: ``<priority>[tag] text`` lines on stderr: journald's stream
    NATIVE = "native"  #: journald's native protocol, with fields


def priority(level: int) -> int:
    """The syslog priority of a :mod:`logging` level."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


def tagged(tag: str | None, fields: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``extra`` that tags a record with a tunnel (and journal fields)."""
    extra: dict[str, Any] = {TAG: tag} if tag else {}
    if fields:
        extra[FIELDS] = dict(fields)
    return extra


class JournalFormatter(logging.Formatter):
    """``<priority>[tag] message``, on one line.

    Args:
        tag: The tag of records that carry none (a proxy's: it serves one tunnel).
        names: Put the logger's name before the message (``proxy.link: ...``).
    """

    def __init__(self, *, tag: str | None = None, names: bool = False) -> None:
        super().__init__()
        self.tag = tag
        self.names = names

    def tag_of(self, record: logging.LogRecord) -> str | None:
        """The record's tunnel tag, or the formatter's."""
        return getattr(record, TAG, None) or self.tag

    def body(self, record: logging.LogRecord) -> str:
        """The tag and the message, with any exception appended, on one line."""
        text = record.getMessage()
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text} | {record.exc_text}"
        if self.names:
            text = f"{record.name}: {text}"
        tag = self.tag_of(record)
        return one_line(f"[{tag}] {text}" if tag else text)

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{self.body(record)}"


class TextFormatter(JournalFormatter):
    """``time LEVEL [tag] message``, on one line: for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.formatTime(record)} {record.levelname} {self.body(record)}"


class JournalHandler(logging.Handler):
    """Sends each record to journald natively; a record journald does not take is written by
    ``fallback`` instead (a ``<N>`` line on stderr), so none is lost.

    Fields: ``MESSAGE`` (as :meth:`JournalFormatter.body` makes it), ``PRIORITY``,
    ``SYSLOG_IDENTIFIER``, ``TUNNEL`` (the tag) and the record's :data:`FIELDS`.
    """

    def __init__(
        self,
        journal: JournalSocket,
        fallback: logging.Handler,
        formatter: JournalFormatter,
        identifier: str,
    ) -> None:
        super().__init__()
        self.journal = journal
        self.fallback = fallback
        self.body = formatter
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        fields = [
            ("MESSAGE", self.body.body(record)),
            ("PRIORITY", str(priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
        ]
        tag = self.body.tag_of(record)
        if tag:
            fields.append(("TUNNEL", tag))
        fields += [(name, str(value)) for name, value in getattr(record, FIELDS, {}).items()]
        try:
            self.journal.send(fields)
        except (OSError, ValueError):
            self.fallback.emit(record)

    def close(self) -> None:
        self.journal.close()
        super().close()


def output_handler(
    output: Output,
    stream: TextIO,
    *,
    identifier: str,
    tag: str | None = None,
    names: bool = False,
    socket_path: str | None = None,
) -> logging.Handler:
    """The handler of one :class:`Output`; ``stream`` is stderr (and the native fallback)."""
    if output is Output.TEXT:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(TextFormatter(tag=tag, names=names))
        return handler
    lines = logging.StreamHandler(stream)
    formatter = JournalFormatter(tag=tag, names=names)
    lines.setFormatter(formatter)
    if output is Output.JOURNAL:
        return lines
    return JournalHandler(JournalSocket(socket_path), lines, formatter, identifier)
