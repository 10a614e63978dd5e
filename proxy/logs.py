"""Logging for the proxy: stdlib logging, one line per record, secrets redacted.

Verbosity follows the reference localproxy's ``-v``: 0 off, 1 fatal, 2 error, 3 warning,
4 info (default), 5 debug, 6 trace (debug plus per-message detail).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, ClassVar

from iotunnel.logs import install, redact

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_LEVELS = {
    0: logging.CRITICAL + 10,
    1: logging.CRITICAL,
    2: logging.ERROR,
    3: logging.WARNING,
    4: logging.INFO,
    5: logging.DEBUG,
    6: TRACE,
}


class RedactingFilter(logging.Filter):
    """Replaces every registered secret in a record's final text with ``[secure]``.

    A second line of defence: no code path logs a token on purpose, but a library logging a
    request header at debug level must not leak one either.
    """

    secrets: ClassVar[set[str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            redact(record, self.secrets)
        return True


def register_secrets(values: Iterable[str]) -> None:
    """Values that must never appear in any log line."""
    RedactingFilter.secrets.update(v for v in values if v)


def configure(verbosity: int, *, stream: Any = None, fmt: str | None = None) -> None:
    """Send log records to stderr (journald when run under systemd), one line each."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter(fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactingFilter())
    install(handler, _LEVELS.get(verbosity, logging.INFO))
