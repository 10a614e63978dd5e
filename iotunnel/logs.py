"""Logging setup the three commands share: one line per record, secrets redacted.

Each command keeps its own format (the proxy's ``-v`` levels, the agent's journald prefixes,
the service's timestamps); what they share is here: :func:`redact` (every secret becomes
``[secure]``, in the message and in a traceback), :func:`one_line` and
:class:`OneLineFormatter` (newlines escaped, so that a record is always one line), and
:func:`install` (one handler on the root logger, and no library that logs raw handshake
headers below INFO).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

__all__ = ["REDACTED", "OneLineFormatter", "install", "one_line", "redact"]

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
