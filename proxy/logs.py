"""Logging for the proxy: stdlib logging, one line per record, secrets redacted.

Verbosity follows the reference localproxy's ``-v``: 0 off, 1 fatal, 2 error, 3 warning,
4 info (default), 5 debug, 6 trace (debug plus per-message detail).

A proxy started by the device agent writes to the agent's stderr, which it inherits, in the
form the agent names in its environment: ``IOTUNNEL_LOG_FORMAT`` (``journal``: ``<6>[t3]
proxy.link: ...`` lines; ``text``: with a timestamp, for a terminal; ``native``: journald's
native protocol, with ``TUNNEL=t3``) and ``IOTUNNEL_LOG_TAG`` (``t3``). Without them, the
proxy's own format.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from iotunnel.journal import ENV_SOCKET
from iotunnel.logs import ENV_LOG_FORMAT, ENV_LOG_TAG, Output, install, output_handler, redact

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


_TAG_RE = re.compile(r"t[0-9]{1,9}")


def configure(
    verbosity: int,
    *,
    stream: Any = None,
    fmt: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Send log records to stderr (journald when run under systemd), one line each.

    Returns:
        A problem with ``IOTUNNEL_LOG_FORMAT`` or ``IOTUNNEL_LOG_TAG`` in ``environ`` to log
        (the proxy's own format is used then), or ``None``.
    """
    stream = stream or sys.stderr
    environ = environ or {}
    problem = None
    handler: logging.Handler | None = None
    if ENV_LOG_FORMAT in environ:
        try:
            output = Output(environ[ENV_LOG_FORMAT])
        except ValueError:
            output = None
        tag = environ.get(ENV_LOG_TAG, "")
        if output is None or not _TAG_RE.fullmatch(tag):
            problem = f"{ENV_LOG_FORMAT} or {ENV_LOG_TAG} is not valid; using the proxy's format"
        else:
            handler = output_handler(
                output,
                stream,
                identifier="iotunnel-proxy",
                tag=tag,
                names=True,
                socket_path=environ.get(ENV_SOCKET) or None,
            )
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(
            logging.Formatter(fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    handler.addFilter(RedactingFilter())
    install(handler, _LEVELS.get(verbosity, logging.INFO))
    return problem
