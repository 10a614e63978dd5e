"""``iotunnel-service``: bad input in process, serving as a subprocess (``python -m service``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from service_harness import CLIENT_LOGGER, TOKENS, V3, Harness
from websockets.asyncio.client import connect

from iotunnel import __version__
from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from proxy.protocol.framing import Decoder
from proxy.protocol.messages import Message
from proxy.protocol.messages import MessageType as T
from service.cli import main
from service.config import load_tunnels, tls_context
from service.registry import TunnelRegistry
from testbed.pki import PKI

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "service.example.json"


def tunnels_file(directory: Path, document: Any, *, raw: str | None = None) -> Path:
    path = directory / "tunnels.json"
    path.write_text(raw if raw is not None else json.dumps(document))
    path.chmod(0o600)
    return path


def valid_document() -> dict[str, Any]:
    return {
        "tunnels": [
            {
                "tunnelId": "t1",
                "services": ["HTTP1", "SSH1"],
                "sourceAccessToken": TOKENS[Mode.SOURCE],
                "destinationAccessToken": TOKENS[Mode.DESTINATION],
            }
        ]
    }


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("iotunnel-service: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    for token in TOKENS.values():
        assert token not in err


# Tunnels file and TLS context


def test_example_file_loads() -> None:
    registry = TunnelRegistry()
    load_tunnels(EXAMPLE, registry)
    assert [t.tunnel_id for t in registry] == ["demo"]
    assert registry.get("demo").services == ("HTTP1", "SSH1")


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ([], "single field"),
        ({"tunnels": {}}, "tunnels: must be a list"),
        ({"tunnels": [1]}, "tunnels[0]: must be an object"),
        ({"tunnels": [{"tunnelId": "t"}]}, "tunnels[0].services: missing"),
        ({"tunnels": [{**valid_document()["tunnels"][0], "extra": 1}]}, "unknown field 'extra'"),
        ({"tunnels": [{**valid_document()["tunnels"][0], "tunnelId": 5}]}, "tunnelId: must be"),
        ({"tunnels": [{**valid_document()["tunnels"][0], "services": "SSH1"}]}, "services: must"),
        (
            {"tunnels": [{**valid_document()["tunnels"][0], "services": ["SSH1", 2]}]},
            "services[1]: must be a string",
        ),
        (
            {"tunnels": [{**valid_document()["tunnels"][0], "services": ["SSH 1"]}]},
            "tunnels[0].services[0]: must match",
        ),
        (
            {"tunnels": [{**valid_document()["tunnels"][0], "sourceAccessToken": "short"}]},
            "tunnels[0].sourceAccessToken: must be",
        ),
        (
            {"tunnels": valid_document()["tunnels"] * 2},
            "tunnels[1].tunnelId: tunnel 't1' already exists",
        ),
    ],
)
def test_bad_tunnels_file(tmp_path: Path, document: Any, field: str) -> None:
    path = tunnels_file(tmp_path, document)
    with pytest.raises(ConfigError) as info:
        load_tunnels(path, TunnelRegistry())
    message = str(info.value)
    assert message.startswith(f"--tunnels {path}: ")
    assert field in message
    assert "\n" not in message
    for token in TOKENS.values():
        assert token not in message


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tunnels_file(tmp_path, None, raw='{"tunnels": [\n  {"tunnelId": }]}')
    with pytest.raises(
        ConfigError, match=r"tunnels\.json: not valid JSON: .*\(line 2, column 16\)"
    ):
        load_tunnels(path, TunnelRegistry())


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("[" * 100_000, "nested more than 8 levels deep"),
        ('{"tunnels": [' + "[" * 5_000 + "]" * 5_000 + "]}", "nested more than 8 levels deep"),
        ('{"tunnels": []}' + " " * 2000, "too large: 2015 bytes, at most 1000"),
        ('{"tunnels": [{"tunnelId": "\xff"}]}', None),
    ],
    ids=["deep", "deep-entry", "huge", "latin-1"],
)
def test_deep_or_huge_tunnels_file_is_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    raw: str,
    fragment: str | None,
) -> None:
    """Issue 11 #7: a tunnels file that would exhaust the parser is refused in one line."""
    import service.config

    if len(raw) < 10_000:  # a small limit for the huge case, not for the deep ones
        monkeypatch.setattr(service.config, "MAX_TUNNELS_FILE", 1000)
    path = tmp_path / "tunnels.json"
    path.write_bytes(raw.encode("latin-1"))
    path.chmod(0o600)
    code, _, err = run_main(["--plain", "--tunnels", str(path)], capsys)
    assert code == 2
    assert_one_line_error(err, f"--tunnels {path}: ", fragment or "not UTF-8")


def test_unreadable_tunnels_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read"):
        load_tunnels(tmp_path / "missing.json", TunnelRegistry())


def test_world_readable_tunnels_file_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tunnels_file(tmp_path, valid_document())
    path.chmod(0o644)
    load_tunnels(path, TunnelRegistry())
    assert "readable by others" in caplog.text


def test_tls_context(pki: PKI, tmp_path: Path) -> None:
    context = tls_context(pki.server.cert, pki.server.key)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match=r"nope\.pem: certificate file not found"):
        tls_context(tmp_path / "nope.pem", pki.server.key)
    with pytest.raises(ConfigError, match="cannot load certificate and key"):
        tls_context(pki.server.cert, pki.client.key)


# Command line, in process


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0
    assert out == f"iotunnel-service {__version__}\n"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    assert "--tunnels FILE" in out
    assert "default 8443" in out


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--bogus"], ["unrecognized arguments: --bogus"]),
        (["--port", "70000", "--plain"], ["port out of range"]),
        (["--port", "http", "--plain"], ["not a port number"]),
        ([], ["--cert and --key are required"]),
        (["--plain", "--cert", "x.pem"], ["--plain cannot be combined"]),
    ],
)
def test_bad_flags(
    argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(argv, capsys)
    assert (code, out) == (2, "")
    assert_one_line_error(err, *fragments)


def test_missing_certificate(tmp_path: Path, pki: PKI, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pem"
    code, _, err = run_main(["--cert", str(missing), "--key", str(pki.server.key)], capsys)
    assert code == 2
    assert_one_line_error(err, str(missing))


def test_bad_tunnels_file_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = valid_document()
    document["tunnels"][0]["services"] = ["HTTP1", "no spaces"]
    path = tunnels_file(tmp_path, document)
    code, _, err = run_main(["--plain", "--tunnels", str(path)], capsys)
    assert code == 2
    assert_one_line_error(err, str(path), "tunnels[0].services[1]")


# Command line, as a subprocess


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=service_env(),
    )


@pytest.mark.parametrize("tls", [True, False], ids=["wss", "ws"])
def test_subprocess_serves_until_sigterm(harness: Harness, tmp_path: Path, tls: bool) -> None:
    path = tunnels_file(tmp_path, valid_document())
    flags = (
        ["--cert", str(harness.pki.server.cert), "--key", str(harness.pki.server.key)]
        if tls
        else ["--plain"]
    )

    async def scenario() -> None:
        process = await spawn("--port", "0", "--tunnels", str(path), *flags)
        assert process.stdout is not None
        assert process.stderr is not None
        signalled = False
        try:
            line = (await process.stdout.readline()).decode()
            prefix = f"iotunnel-service: listening on {'wss' if tls else 'ws'}://127.0.0.1:"
            assert line.startswith(prefix), line
            url = line.split()[-1]
            async with connect(
                f"{url}/tunnel?local-proxy-mode=source",
                ssl=harness.pki.client_context() if tls else None,
                subprotocols=[V3],  # type: ignore[list-item]
                additional_headers=[("access-token", TOKENS[Mode.SOURCE])],
                logger=logging.getLogger(CLIENT_LOGGER),
            ) as ws:
                data = await ws.recv()
                assert isinstance(data, bytes)
                assert Decoder().feed(data) == [
                    Message(T.SERVICE_IDS, available_service_ids=("HTTP1", "SSH1"))
                ]
                process.send_signal(signal.SIGTERM)
                signalled = True
                await ws.wait_closed()
                assert ws.close_code == 1001
        finally:
            if not signalled:
                process.send_signal(signal.SIGTERM)
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert out == b""  # nothing after the listening line
        log = err.decode()
        assert "peer connected: tunnel t1 source" in log
        assert all(line.count(" ") > 2 for line in log.splitlines())
        for token in TOKENS.values():
            assert token not in log

    harness.run(scenario())


def test_subprocess_bad_tunnels_file(harness: Harness, tmp_path: Path) -> None:
    path = tunnels_file(tmp_path, None, raw="{not json")

    async def scenario() -> None:
        process = await spawn("--plain", "--tunnels", str(path))
        out, err = await process.communicate()
        assert process.returncode == 2
        assert out == b""
        assert_one_line_error(err.decode(), f"--tunnels {path}", "(line 1, column 2)")

    harness.run(scenario())


def test_tunnels_file_over_a_state(tmp_path: Path) -> None:
    """Reloading the same file keeps a tunnel's state; a changed entry replaces it."""
    path = tunnels_file(tmp_path, valid_document())
    registry = TunnelRegistry()
    load_tunnels(path, registry)
    registry.claim("t1", Mode.SOURCE, None)
    registry.close_tunnel("t1")
    load_tunnels(path, registry)  # unchanged: the stored state wins
    assert not registry.get("t1").is_open
    assert registry.get("t1").source.used
    document = valid_document()
    document["tunnels"][0]["services"] = ["SSH1"]
    load_tunnels(tunnels_file(tmp_path, document), registry)
    assert registry.get("t1").is_open
    assert registry.get("t1").services == ("SSH1",)
    assert not registry.get("t1").source.used


def test_static_tunnels_follow_the_file(tmp_path: Path) -> None:
    registry = TunnelRegistry()
    api_tunnel = registry.open_tunnel("api", ["S"], "api-source-token-0123", "api-destination-0123")
    load_tunnels(tunnels_file(tmp_path, valid_document()), registry)
    assert registry.get("t1").static
    assert not api_tunnel.static
    load_tunnels(tunnels_file(tmp_path, {"tunnels": []}), registry)
    assert registry.find("t1") is None
    assert registry.find("api") is api_tunnel  # the file speaks for its own tunnels only
    load_tunnels(tunnels_file(tmp_path, valid_document()), registry)
    load_tunnels(None, registry)
    assert registry.find("t1") is None
    assert registry.find("api") is api_tunnel
