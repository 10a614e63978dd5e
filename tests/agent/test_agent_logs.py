"""agent.logs: journald priority prefixes, native journal records with fields, tunnel tags,
one line per record, redaction; the proxy child logging in the agent's form by itself."""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import (
    AUDIT,
    JournalFormatter,
    Output,
    Redactor,
    TextFormatter,
    child_log_env,
    choose_output,
    configure,
    priority,
    tagged,
)
from iotunnel.journal import JournalSocket, encode, stream_is_journal
from proxy import logs as proxy_logs
from testbed.journal import FakeJournal, parse_record


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


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler not in handlers:
            handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.NOTSET)
    logging.getLogger(AUDIT).setLevel(logging.NOTSET)


@pytest.mark.usefixtures("root_logging")
def test_configure_writes_redacted_journal_lines() -> None:
    stream = io.StringIO()
    redactor = configure(logging.INFO, stream, Output.JOURNAL)
    redactor.add("tok-123")
    log = logging.getLogger("agent.test")
    log.info("starting with tok-123", extra=tagged("t1"))
    log.debug("not shown")
    log.warning("plain", extra=tagged(None))
    assert stream.getvalue() == "<6>[t1] starting with [secure]\n<4>plain\n"


# --------------------------------------------------------------------------- the native journal


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(tmp_path / "journal.sock")
    yield fake
    fake.close()


def one(journal: FakeJournal, count: int = 1) -> list[dict[str, str]]:
    """The first ``count`` records (waited for)."""
    return journal.wait_for(lambda r: len(r) >= count, f"{count} record(s)")[:count]


def test_encode_uses_the_binary_form_for_values_with_newlines() -> None:
    data = encode([("MESSAGE", "one line"), ("TRACE", "a\nb")])
    assert data == b"MESSAGE=one line\nTRACE\n" + struct.pack("<Q", 3) + b"a\nb\n"
    assert parse_record(data) == {"MESSAGE": "one line", "TRACE": "a\nb"}
    for bad in ("_PID", "lower", "WITH-DASH", ""):
        with pytest.raises(ValueError, match="not a journal field name"):
            encode([(bad, "x")])


def test_a_record_too_large_for_a_datagram_goes_in_a_memfd(journal: FakeJournal) -> None:
    client = JournalSocket(journal.path)
    try:
        client.send([("MESSAGE", "small")])
        huge = "x" * (8 << 20)  # above any datagram size limit
        client.send([("MESSAGE", huge), ("TUNNEL", "t1")])
        assert one(journal, 2) == [{"MESSAGE": "small"}, {"MESSAGE": huge, "TUNNEL": "t1"}]
    finally:
        client.close()


def test_stream_is_journal_checks_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w") as stream, (tmp_path / "other").open("w") as other:
        info = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert stream_is_journal(environ, stream.fileno())
        assert not stream_is_journal(environ, other.fileno())  # stderr was redirected
        assert not stream_is_journal({}, stream.fileno())
        assert not stream_is_journal({"JOURNAL_STREAM": "x:y"}, stream.fileno())
        assert choose_output(environ, stream) is Output.NATIVE
        assert choose_output({}, stream) is Output.JOURNAL
    assert choose_output({}, io.StringIO()) is Output.JOURNAL


@pytest.mark.usefixtures("root_logging")
def test_native_records_carry_the_tunnel_and_audit_fields(journal: FakeJournal) -> None:
    stream = io.StringIO()
    redactor = configure(logging.WARNING, stream, Output.NATIVE, socket_path=journal.path)
    redactor.add("tok-123")
    logging.getLogger("agent").warning("bad tok-123", extra=tagged("t3"))
    logging.getLogger("agent").info("below the level: not sent")
    logging.getLogger(AUDIT).info(
        "SSH1 connection 2/1 closed", extra=tagged("t3", {"SERVICE_ID": "SSH1", "BYTES_IN": "5"})
    )
    logging.getLogger("agent").warning("last")
    records = one(journal, 3)
    assert records[0] == {
        "MESSAGE": "[t3] bad [secure]",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "iotunnel-agent",
        "TUNNEL": "t3",
    }
    # The audit line is logged whatever log_level says.
    assert records[1] == {
        "MESSAGE": "[t3] SSH1 connection 2/1 closed",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "iotunnel-agent",
        "TUNNEL": "t3",
        "SERVICE_ID": "SSH1",
        "BYTES_IN": "5",
    }
    assert records[2]["MESSAGE"] == "last"
    assert "TUNNEL" not in records[2]
    assert stream.getvalue() == ""


@pytest.mark.usefixtures("root_logging")
def test_without_journald_native_records_fall_back_to_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure(logging.INFO, stream, Output.NATIVE, socket_path=str(tmp_path / "none.sock"))
    logging.getLogger("agent").error("still seen", extra=tagged("t1"))
    assert stream.getvalue() == "<3>[t1] still seen\n"


def test_the_child_is_told_to_log_as_the_agent() -> None:
    assert child_log_env(Output.JOURNAL, "t3", {"IOTUNNEL_JOURNAL_SOCKET": "/x"}) == {
        "IOTUNNEL_LOG_FORMAT": "journal",
        "IOTUNNEL_LOG_TAG": "t3",
    }
    assert child_log_env(Output.NATIVE, "t3", {"IOTUNNEL_JOURNAL_SOCKET": "/x"}) == {
        "IOTUNNEL_LOG_FORMAT": "native",
        "IOTUNNEL_LOG_TAG": "t3",
        "IOTUNNEL_JOURNAL_SOCKET": "/x",
    }


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("journal", "<4>[t3] proxy.link: lost tok-9 [secure]\n"),
        ("text", " WARNING [t3] proxy.link"),
    ],
)
def test_a_proxy_logs_in_the_form_the_agent_names(form: str, expected: str) -> None:
    stream = io.StringIO()
    environ = {"IOTUNNEL_LOG_FORMAT": form, "IOTUNNEL_LOG_TAG": "t3"}
    assert proxy_logs.configure(4, stream=stream, environ=environ) is None
    proxy_logs.RedactingFilter.secrets.add("s3cret-token")
    try:
        logging.getLogger("proxy.link").warning("lost tok-9 s3cret-token")
    finally:
        proxy_logs.RedactingFilter.secrets.discard("s3cret-token")
    text = stream.getvalue()
    assert expected in text
    assert "s3cret-token" not in text
    if form == "text":
        assert text.endswith("proxy.link: lost tok-9 [secure]\n")


@pytest.mark.usefixtures("root_logging")
def test_a_proxy_with_a_bad_log_format_uses_its_own() -> None:
    stream = io.StringIO()
    environ = {"IOTUNNEL_LOG_FORMAT": "xml", "IOTUNNEL_LOG_TAG": "t3"}
    problem = proxy_logs.configure(4, stream=stream, environ=environ)
    assert (
        problem == "IOTUNNEL_LOG_FORMAT or IOTUNNEL_LOG_TAG is not valid; using the proxy's format"
    )
    logging.getLogger("proxy").info("hello")
    assert stream.getvalue().endswith(" INFO proxy: hello\n")


def test_a_proxy_sends_native_records_with_its_tunnel(journal: FakeJournal, tmp_path: Path) -> None:
    """A real proxy process (bad settings: it logs one error and exits) writes to the journal."""
    env = {
        **os.environ,
        "IOTUNNEL_LOG_FORMAT": "native",
        "IOTUNNEL_LOG_TAG": "t5",
        "IOTUNNEL_JOURNAL_SOCKET": journal.path,
        "AWSIOT_TUNNEL_ACCESS_TOKEN": "tok-never-logged",
    }
    script = (
        "import logging, os, sys\n"
        "from proxy.logs import configure, register_secrets\n"
        "register_secrets([os.environ['AWSIOT_TUNNEL_ACCESS_TOKEN']])\n"
        "configure(4, environ=os.environ)\n"
        "logging.getLogger('proxy.link').warning('cannot use %s', 'tok-never-logged')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert one(journal) == [
        {
            "MESSAGE": "[t5] proxy.link: cannot use [secure]",
            "PRIORITY": "4",
            "SYSLOG_IDENTIFIER": "iotunnel-proxy",
            "TUNNEL": "t5",
        }
    ]
