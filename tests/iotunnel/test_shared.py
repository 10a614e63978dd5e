"""iotunnel's shared contracts: exit codes, mode, errors, rules, the parser base, logging."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from iotunnel.cli import Parser, UsageError, fail
from iotunnel.errors import ConfigError, IotunnelError
from iotunnel.exits import ExitCode
from iotunnel.logs import OneLineFormatter, install, redact
from iotunnel.mode import Mode
from iotunnel.rules import SERVICE_ID_RE, THING_NAME_RE, is_aws_host, tunnel_host
from proxy.errors import ConnectFailed
from proxy.protocol.errors import RemoteProtocolError


def test_exit_codes_are_the_documented_numbers() -> None:
    assert [int(code) for code in ExitCode] == [0, 1, 2, 3, 4, 130, 143]


def test_a_proxy_exit_code_is_an_exit_code() -> None:
    # What the agent's restart policy reads: the real process's status.
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--no-such-flag"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == ExitCode.CONFIG
    assert done.stderr == "iotunnel-proxy: error: unrecognized option '--no-such-flag'\n"


def test_the_protocol_core_imports_only_pure_shared_modules() -> None:
    code = (
        "import sys, proxy.protocol.session, proxy.protocol.framing;"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'iotunnel', 'asyncio', 'socket', 'ssl', 'websockets', 'logging'})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["iotunnel", "iotunnel.errors", "iotunnel.mode", "iotunnel.rules"]


def test_mode_is_one_type_for_every_part() -> None:
    assert Mode("source").other is Mode.DESTINATION
    assert Mode.DESTINATION.other is Mode.SOURCE
    assert f"{Mode.DESTINATION}" == "destination"


def test_one_exception_root() -> None:
    for error in (ConfigError, UsageError, ConnectFailed, RemoteProtocolError):
        assert issubclass(error, IotunnelError)


def test_parser_errors_are_one_line_usage_errors_that_echo_no_value() -> None:
    parser = Parser(prog="x")
    parser.add_argument("--switch", action="store_true")
    with pytest.raises(UsageError, match=r"^argument --switch: takes no value$"):
        parser.parse_args(["--switch=secret-value"])


def test_fail_writes_one_line_and_returns_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail("prog", ConfigError("bad: thing")) == 2
    assert capsys.readouterr().err == "prog: error: bad: thing\n"


def test_names_and_hosts() -> None:
    assert SERVICE_ID_RE.fullmatch("SSH1")
    assert THING_NAME_RE.fullmatch("a:b_c-d")
    assert not THING_NAME_RE.fullmatch("a/b")
    assert not SERVICE_ID_RE.fullmatch("x" * 129)
    assert tunnel_host("us-east-1") == "data.tunneling.iot.us-east-1.amazonaws.com"
    assert tunnel_host("cn-north-1") == "data.tunneling.iot.cn-north-1.amazonaws.com.cn"
    assert is_aws_host("abc-ats.iot.eu-west-1.AmazonAWS.com")
    assert not is_aws_host("localhost")


def test_logging_is_one_line_and_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(message)s"))

    class Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            redact(record, ["tok3n"])
            return True

    handler.addFilter(Redact())
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        install(handler, logging.INFO)
        logging.getLogger("x").info("a\nb %s", "tok3n")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert stream.getvalue() == "a\\nb [secure]\n"
