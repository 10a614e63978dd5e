"""Logging for the agent: one line per record on stderr, journald priority prefixes, tags.

Under systemd, stderr goes to journald, which reads a leading ``<N>`` as the record's syslog
priority (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug) and stamps the time
itself, so a record is ``<6>[t1] proxy: connected to the tunnel service``. On a terminal the
prefix gives way to a timestamp and the level name. Records of one tunnel, the agent's and its
proxy's, carry the tunnel's tag (``t1``, ``t2``: a counter, never derived from a token).

Newlines are escaped so that a record is always one line, and every registered secret is
replaced by ``[secure]`` as a last line of defence: no code path logs a token on purpose.
"""

from __future__ import annotations

import logging
import re
from typing import Any, TextIO

from iotunnel.logs import install, one_line, redact

__all__ = [
    "JournalFormatter",
    "Redactor",
    "TextFormatter",
    "configure",
    "parse_proxy_line",
    "priority",
]

#: The attribute of a :class:`logging.LogRecord` that holds the tunnel tag.
TAG = "tunnel"

_PROXY_LINE_RE = re.compile(
    r"\S+ \S+ (?P<level>TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<text>.*)"
)


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


class JournalFormatter(logging.Formatter):
    """``<priority>[tag] message``, on one line."""

    def body(self, record: logging.LogRecord) -> str:
        """The tag and the message, with any exception appended, on one line."""
        text = record.getMessage()
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text} | {record.exc_text}"
        tag = getattr(record, TAG, None)
        return one_line(f"[{tag}] {text}" if tag else text)

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{self.body(record)}"


class TextFormatter(JournalFormatter):
    """``time LEVEL [tag] message``, on one line: for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.formatTime(record)} {record.levelname} {self.body(record)}"


class Redactor(logging.Filter):
    """Replaces registered secrets with ``[secure]`` in a record's message and exception."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: dict[str, int] = {}

    def add(self, secret: str) -> None:
        """Redact ``secret`` until as many :meth:`discard` calls as :meth:`add` calls."""
        if secret:
            self._secrets[secret] = self._secrets.get(secret, 0) + 1

    def discard(self, secret: str) -> None:
        """Undo one :meth:`add`."""
        count = self._secrets.get(secret, 0)
        if count <= 1:
            self._secrets.pop(secret, None)
        else:
            self._secrets[secret] = count - 1

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            redact(record, list(self._secrets))
        return True


def parse_proxy_line(line: str) -> tuple[int | None, str]:
    """Split a line a proxy child wrote: ``(level, text)``, or ``(None, line)`` for others.

    A proxy's records look like ``2025-01-01 10:00:00,000 INFO proxy: connected ...``; the
    time is dropped (journald has its own) and the level kept. Other lines (a traceback's
    continuation) come back whole with no level.
    """
    match = _PROXY_LINE_RE.fullmatch(line)
    if match is None:
        return None, line
    name = match["level"]
    level = logging.DEBUG if name == "TRACE" else logging.getLevelName(name)
    return int(level), match["text"]


def configure(level: int, stream: TextIO, *, journal: bool) -> Redactor:
    """Send every record to ``stream``, one line each; returns the redaction filter.

    Args:
        level: The lowest level logged.
        stream: Where records go (stderr).
        journal: Write journald priority prefixes (else timestamps and level names).
    """
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else TextFormatter())
    redactor = Redactor()
    handler.addFilter(redactor)
    install(handler, level)
    return redactor


def tagged(tag: str | None) -> dict[str, Any]:
    """The ``extra`` that tags a record with a tunnel."""
    return {TAG: tag} if tag else {}
