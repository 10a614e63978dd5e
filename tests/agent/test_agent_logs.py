"""agent.logs: journald priority prefixes, tunnel tags, one line per record, redaction."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest

from agent.logs import (
    JournalFormatter,
    Redactor,
    TextFormatter,
    configure,
    parse_proxy_line,
    priority,
    tagged,
)


def record(
    message: str, level: int = logging.INFO, tag: str | None = None, exc: bool = False
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("agent", level, __file__, 1, message, None, exc_info)
    if tag:
        made.tunnel = tag
    return made


@pytest.mark.parametrize(
    ("level", "number"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (5, 7),
    ],
)
def test_priorities(level: int, number: int) -> None:
    assert priority(level) == number
    assert JournalFormatter().format(record("x", level)) == f"<{number}>x"


def test_tag_and_one_line() -> None:
    formatter = JournalFormatter()
    assert formatter.format(record("hello", tag="t3")) == "<6>[t3] hello"
    assert formatter.format(record("two\nlines\r")) == "<6>two\\nlines\\r"
    text = formatter.format(record("failed", logging.ERROR, exc=True))
    assert text.startswith("<3>failed | Traceback")
    assert "\n" not in text
    assert "ValueError: boom\\nsecond line" in text


def test_text_formatter_for_terminals() -> None:
    text = TextFormatter().format(record("hello", logging.WARNING, tag="t1"))
    assert text.endswith(" WARNING [t1] hello")
    assert not text.startswith("<")


def test_redactor_counts_registrations() -> None:
    redactor = Redactor()
    redactor.add("s3cret")
    redactor.add("s3cret")
    made = logging.LogRecord("a", logging.INFO, "f", 1, "token=%s", ("s3cret",), None)
    assert redactor.filter(made)
    assert made.getMessage() == "token=[secure]"
    redactor.discard("s3cret")
    again = logging.LogRecord("a", logging.INFO, "f", 1, "s3cret", None, None)
    redactor.filter(again)
    assert again.getMessage() == "[secure]"
    redactor.discard("s3cret")
    last = logging.LogRecord("a", logging.INFO, "f", 1, "s3cret", None, None)
    redactor.filter(last)
    assert last.getMessage() == "s3cret"


def test_redactor_covers_exceptions() -> None:
    redactor = Redactor()
    redactor.add("boom")
    made = record("failed", logging.ERROR, exc=True)
    redactor.filter(made)
    assert made.exc_info is None
    assert made.exc_text is not None
    assert "boom" not in made.exc_text
    assert "[secure]" in JournalFormatter().format(made)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "2025-01-01 10:00:00,000 INFO proxy: connected to the tunnel service",
            (logging.INFO, "proxy: connected to the tunnel service"),
        ),
        ("2025-01-01 10:00:00,000 WARNING proxy: x", (logging.WARNING, "proxy: x")),
        ("2025-01-01 10:00:00,000 TRACE proxy: y", (logging.DEBUG, "proxy: y")),
        ('  File "x.py", line 1', (None, '  File "x.py", line 1')),
    ],
)
def test_parse_proxy_line(line: str, expected: tuple[int | None, str]) -> None:
    assert parse_proxy_line(line) == expected


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.NOTSET)


@pytest.mark.usefixtures("root_logging")
def test_configure_writes_redacted_journal_lines() -> None:
    stream = io.StringIO()
    redactor = configure(logging.INFO, stream, journal=True)
    redactor.add("tok-123")
    log = logging.getLogger("agent.test")
    log.info("starting with tok-123", extra=tagged("t1"))
    log.debug("not shown")
    log.warning("plain", extra=tagged(None))
    assert stream.getvalue() == "<6>[t1] starting with [secure]\n<4>plain\n"
