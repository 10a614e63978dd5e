"""Logging for the agent: one record per line on stderr, or native journal records; tags.

Under systemd, stderr goes to journald, which reads a leading ``<N>`` as the record's syslog
priority (``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug) and stamps the time
itself, so a record is ``<6>[t1] new tunnel for SSH1 (region us-east-1)``. When stderr *is* the
journal (``JOURNAL_STREAM``), records go to journald natively instead, with fields:
``TUNNEL=t1`` on a tunnel's records, and the audit line's ``SERVICE_ID=``, ``BYTES_IN=``...
(:mod:`iotunnel.logs`, :mod:`iotunnel.journal`). On a terminal the prefix gives way to a
timestamp and the level name. Records of one tunnel, the agent's and its proxy's, carry the
tunnel's tag (``t1``, ``t2``: a counter, never derived from a token). The proxies write their
own records to the agent's stderr, which they inherit, in the same form (:func:`child_log_env`):
the agent reads none of their lines.

Newlines are escaped so that a record is always one line, and every registered secret is
replaced by ``[secure]`` as a last line of defence: no code path logs a token on purpose.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TextIO

from iotunnel.journal import ENV_SOCKET, stream_is_journal
from iotunnel.logs import (
    ENV_LOG_FORMAT,
    ENV_LOG_TAG,
    TAG,
    JournalFormatter,
    Output,
    TextFormatter,
    install,
    output_handler,
    priority,
    redact,
    tagged,
)

__all__ = [
    "AUDIT",
    "ENV_LOG_FORMAT",
    "ENV_LOG_TAG",
    "TAG",
    "JournalFormatter",
    "Output",
    "Redactor",
    "TextFormatter",
    "child_log_env",
    "choose_output",
    "configure",
    "priority",
    "tagged",
]

#: The logger of the audit lines: at INFO whatever ``log_level`` says.
AUDIT = "agent.audit"


def choose_output(environ: Mapping[str, str], stream: TextIO) -> Output:
    """Native journal records when ``stream`` is the journal, plain lines on a terminal,
    ``<N>`` lines otherwise (journald reading a stream, or a file)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return Output.JOURNAL
    if stream_is_journal(environ, fd):
        return Output.NATIVE
    return Output.TEXT if stream.isatty() else Output.JOURNAL


def child_log_env(output: Output, tag: str, environ: Mapping[str, str]) -> dict[str, str]:
    """What tells a proxy child to log as the agent does, tagged ``tag``."""
    env = {ENV_LOG_FORMAT: output.value, ENV_LOG_TAG: tag}
    if output is Output.NATIVE and environ.get(ENV_SOCKET):
        env[ENV_SOCKET] = environ[ENV_SOCKET]
    return env


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


def configure(
    level: int,
    stream: TextIO,
    output: Output = Output.JOURNAL,
    *,
    socket_path: str | None = None,
) -> Redactor:
    """Send every record to ``stream`` (or the journal), one line each; returns the redaction
    filter.

    Args:
        level: The lowest level logged (the audit lines are logged whatever it is).
        stream: Where records go (stderr), and native records journald refused.
        output: The form of the records.
        socket_path: journald's native socket, when not the default one.
    """
    handler = output_handler(output, stream, identifier="iotunnel-agent", socket_path=socket_path)
    redactor = Redactor()
    handler.addFilter(redactor)
    install(handler, level)
    logging.getLogger(AUDIT).setLevel(logging.INFO)
    return redactor
