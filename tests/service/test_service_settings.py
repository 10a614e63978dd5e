"""``iotunnel-service`` options: --help documents every one, config/service.ini documents and
accepts every one, bad values are one-line errors with exit code 2, and a service started with
the API and a state file keeps its tunnels across a restart.
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.request
from pathlib import Path

import pytest

from service.cli import main
from service.settings import build_parser, load, parse
from testbed.harness import Stack
from testbed.pki import PKI

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "service.ini"


def options() -> list[str]:
    return [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--version", "--config")
    ]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, ""), captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("iotunnel-service: error: ")
    return lines[0]


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in [*options(), "--config", "--version"]:
        assert option in text
    assert "TESTING ONLY" in text


def test_shipped_settings_file_documents_every_option() -> None:
    text = SHIPPED.read_text()
    documented = set(re.findall(r"^# ([a-z-]+) = ", text, flags=re.MULTILINE))
    assert documented == {option[2:] for option in options()}


def test_shipped_settings_file_with_every_default_uncommented(tmp_path: Path, pki: PKI) -> None:
    text = SHIPPED.read_text()
    text = re.sub(r"^# ((?:[a-z-]+) = .*)$", r"\1", text, flags=re.MULTILINE)
    # paths to files that exist here; plain and cert/key exclude each other
    files = {
        "cert": pki.server.cert,
        "key": pki.server.key,
        "mqtt-cert": pki.client.cert,
        "mqtt-key": pki.client.key,
        "mqtt-ca": pki.ca.cert,
        "tunnels": ROOT / "config" / "service.example.json",
        "state": tmp_path / "state.db",
        "credentials": tmp_path / "credentials",
    }
    for key, path in files.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {path}", text, flags=re.MULTILINE)
    path = tmp_path / "service.ini"
    path.write_text(text)
    args = parse(["--config", str(path)])
    assert args.api_port == 8444
    assert args.max_message == 131076
    assert args.service_id_pattern.pattern == "[a-zA-Z0-9:_-]+"
    assert args.bandwidth_burst == 131076
    assert args.minute_seconds == 60.0
    assert args.plain is False
    assert args.cert == pki.server.cert
    # flags win over the file
    assert parse(["--config", str(path), "--port", "9000"]).port == 9000


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[service]\nbogus = 1\n", "[service] bogus: unknown setting"),
        ("[service]\nport = http\n", "[service] port: not a port number"),
        ("[service]\nplain = maybe\n", "[service] plain: not a boolean"),
        ("[other]\nport = 1\n", "unknown section [other]"),
        ("port = 1\n", "File contains no section headers"),
        ("[service]\nhelp = 1\n", "[service] help: unknown setting"),
    ],
)
def test_bad_settings_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    path = tmp_path / "service.ini"
    path.write_text(text)
    line = one_line_error(capsys, ["--config", str(path), "--plain"])
    assert str(path) in line
    assert fragment in line


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--api-port", "99999"], "port out of range"),
        (["--max-services", "0"], "must be 1 to 1000"),
        (["--service-id-pattern", "(["], "not a regular expression"),
        (["--max-frame", "70000"], "must be 16 to 65535"),
        (["--max-message", "2000", "--max-frame", "2000"], "must hold a whole frame"),
        (["--bandwidth-limit", "fast"], "not a size"),
        (["--bandwidth-burst", "10k"], "--bandwidth-burst needs --bandwidth-limit"),
        (["--minute-seconds", "0"], "positive number of seconds"),
        (["--closed-retention", "-1"], "0 or more seconds"),
        (["--handshake-failure-rate", "-1"], "0 or more per second"),
        (["--handshake-failure-rate", "often"], "not a number per second"),
        (["--handshake-failure-burst", "0"], "must be 1 to 1000000"),
        (["--handshake-throttle-addresses", "0"], "must be 1 to 10000000"),
        (["--region", "moon"], "not a valid region"),
        (["--account-id", "12"], "not a valid account id"),
        (["--credentials", "/nonexistent"], "--credentials needs --api-port"),
        (["--mqtt-cert", "c.pem"], "--mqtt-cert needs --mqtt-host"),
        (["--mqtt-host", "localhost", "--mqtt-cert", "c.pem"], "go together"),
        (["--mqtt-host", "localhost", "--mqtt-ca", "/nonexistent.pem"], "file not found"),
    ],
)
def test_bad_options(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    assert fragment in one_line_error(capsys, ["--plain", *argv])


def test_bad_credentials_file_hides_its_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "credentials"
    path.write_text("aws_secret_access_key = supersecret\n")
    line = one_line_error(capsys, ["--plain", "--api-port", "0", "--credentials", str(path)])
    assert "line 1" in line
    assert "supersecret" not in line
    path.write_text("[default]\naws_access_key_id = AKID\n")
    line = one_line_error(capsys, ["--plain", "--api-port", "0", "--credentials", str(path)])
    assert "aws_secret_access_key" in line


def test_bad_state_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"garbage" * 1000)
    line = one_line_error(capsys, ["--plain", "--state", str(path)])
    assert f"{path}: not a usable state file" in line


def test_sizes() -> None:
    args = load(["--plain", "--bandwidth-limit", "800k", "--bandwidth-burst", "64Ki"])
    assert (args.bandwidth_limit, args.bandwidth_burst) == (800_000, 65536)
    assert load(["--plain", "--bandwidth-limit", "1.5M"]).bandwidth_limit == 1_500_000
    assert isinstance(build_parser(), argparse.ArgumentParser)


def _api(port: int, target: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/",
        data=json.dumps(body).encode(),
        headers={"X-Amz-Target": f"IoTSecuredTunneling.{target}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def test_restart_keeps_tunnels_and_file_tunnels(tmp_path: Path, pki: PKI) -> None:
    """A plain-HTTP service with --state and --tunnels, stopped and started again."""
    tunnels = tmp_path / "tunnels.json"
    tunnels.write_text(
        json.dumps(
            {
                "tunnels": [
                    {
                        "tunnelId": "static",
                        "services": ["SSH1"],
                        "sourceAccessToken": "static-source-token-0123456789",
                        "destinationAccessToken": "static-destination-token-0123456789",
                    }
                ]
            }
        )
    )
    tunnels.chmod(0o600)
    state = tmp_path / "state.db"
    argv = ["-m", "service", "--plain", "--port", "0", "--api-port", "0"]
    argv += ["--state", str(state), "--tunnels", str(tunnels)]
    with Stack(tmp_path / "run") as stack:
        first = stack.start("first", [stack.python, *argv])
        api = int(first.wait_for(r"API listening on http://127.0.0.1:(\d+)").group(1))
        opened = _api(api, "OpenTunnel", {"destinationConfig": {"services": ["SSH1"]}})
        _api(api, "CloseTunnel", {"tunnelId": "static"})
        assert first.stop() == 0
        second = stack.start("second", [stack.python, *argv])
        api = int(second.wait_for(r"API listening on http://127.0.0.1:(\d+)").group(1))
        described = _api(api, "DescribeTunnel", {"tunnelId": str(opened["tunnelId"])})
        assert described["tunnel"]["status"] == "OPEN"  # type: ignore[index]
        static = _api(api, "DescribeTunnel", {"tunnelId": "static"})
        assert static["tunnel"]["status"] == "CLOSED"  # type: ignore[index]
        assert "2 tunnel(s), 1 open" in second.output()
        assert second.stop() == 0
    for token in (opened["sourceAccessToken"], opened["destinationAccessToken"]):
        assert str(token) not in first.output() + second.output()


def test_a_deeply_nested_state_row_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged (or tampered) state file whose row is nested deep enough to exhaust the JSON
    parser is a one-line error too, not a traceback."""
    import sqlite3

    from service.store import SqliteStore

    path = tmp_path / "state.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO tunnels (tunnel_id, status, created_at, data) VALUES (?, ?, ?, ?)",
            ("t", "OPEN", 0.0, "[" * 100_000),
        )
    db.close()
    line = one_line_error(capsys, ["--plain", "--state", str(path)])
    assert f"{path}: tunnel 't': malformed row" in line
    assert "nested more than" in line
