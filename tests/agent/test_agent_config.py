"""agent.config: the settings file, IOTUNNEL_* variables and flags -> AgentSettings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from agent_files import DeviceFiles

from agent import cli
from agent.config import (
    DEFAULT_CONFIG,
    KEYS,
    AgentSettings,
    CheckOnly,
    CliExit,
    ConfigError,
    load,
)
from bench.pki import PKI

ROOT = Path(__file__).resolve().parents[2]


def settings(
    argv: list[str], environ: dict[str, str] | None = None, cwd: Path = ROOT
) -> AgentSettings:
    loaded = load(argv, environ or {}, cwd)
    assert isinstance(loaded, AgentSettings)
    return loaded


def error(argv: list[str], environ: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, environ or {}, cwd)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_file_values_and_defaults(device: DeviceFiles) -> None:
    s = settings(["--config", str(device.ini)])
    assert s.endpoint == "broker.example.net"
    assert s.port == 8883
    assert s.client_id == s.thing_name == "thing-1"
    assert s.topic == "$aws/things/thing-1/tunnels/notify"
    # Relative paths in the file are relative to the file's directory.
    assert (s.cert, s.key, s.root_ca) == (device.cert, device.key, device.ca)
    assert s.mapping_dir == device.mappings
    assert s.tunnel_endpoint is None
    assert s.tunnel_ca is None
    assert s.max_tunnels == 4
    assert s.log_level == logging.INFO
    assert s.config_file == device.ini


def test_environment_overrides_file_and_flag_overrides_environment(device: DeviceFiles) -> None:
    env = {
        "IOTUNNEL_PORT": "1883",
        "IOTUNNEL_THING_NAME": "other-thing",
        "IOTUNNEL_MAX_TUNNELS": "2",
    }
    s = settings(["--config", str(device.ini), "--max-tunnels", "7"], env)
    assert (s.port, s.thing_name, s.max_tunnels) == (1883, "other-thing", 7)


def test_config_file_from_environment(device: DeviceFiles) -> None:
    s = settings([], {"IOTUNNEL_CONFIG": str(device.ini)})
    assert s.config_file == device.ini


def test_flags_alone_with_paths_relative_to_the_working_directory(device: DeviceFiles) -> None:
    if Path(DEFAULT_CONFIG).exists():
        pytest.skip(f"{DEFAULT_CONFIG} exists on this machine")
    argv = [
        "--endpoint=192.0.2.7",
        "--client-id=dev",
        "--cert=certs/device.pem",
        "--key=certs/device.key",
        "--mapping-dir=destination.d",
        "--tunnel-endpoint=wss://tunnels.example.net:8443",
        "--tunnel-ca=certs/ca.pem",
        "--log-level=DEBUG",
    ]
    s = settings(argv, cwd=device.root)
    assert s.config_file is None
    assert s.endpoint == "192.0.2.7"
    assert s.cert == device.cert
    assert s.root_ca is None
    assert s.tunnel_endpoint == "wss://tunnels.example.net:8443"
    assert s.tunnel_ca == device.ca
    assert s.log_level == logging.DEBUG


def test_shipped_example_documents_every_key_and_loads() -> None:
    example = ROOT / "config" / "agent.ini"
    text = example.read_text()
    for key in KEYS:
        assert f"\n{key.name} =" in text, key.name
    # Its certificate paths are examples: point them at real files, keep the rest.
    argv = [
        "--config", str(example),
        "--cert", str(example), "--key", str(example), "--root-ca", str(example),
        "--mapping-dir", str(ROOT / "config" / "destination.d"),
    ]  # fmt: skip
    s = settings(argv)
    assert s.endpoint.endswith(".amazonaws.com")
    assert s.thing_name == s.client_id
    assert s.tunnel_endpoint is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("port = 0", "agent.ini:8: port: '0': a port is 1..65535"),
        ("port = http", "agent.ini:8: port: 'http': a port is 1..65535"),
        ("max_tunnels = 65", "agent.ini:8: max_tunnels: '65': expected a number 1..64"),
        ("log_level = loud", "agent.ini:8: log_level: 'loud': expected one of debug"),
        ("thing_name = a/b", "agent.ini:8: thing_name: 'a/b': a thing name is"),
        ("thing_name = dev#", "agent.ini:8: thing_name: 'dev#'"),
        ("endpoint2 = x", "agent.ini:8: unknown key 'endpoint2'"),
        ("port = 1\nport = 2", "agent.ini:9: port is set twice"),
        ("[mqtt]", "agent.ini:8: unknown section [mqtt] (expected [agent])"),
        ("[agent]", "agent.ini:8: section [agent] appears twice"),
        ("just words", "agent.ini:8: expected 'key = value'"),
        ("tunnel_endpoint = ftp://x", "agent.ini:8: tunnel_endpoint: 'ftp://x': the URL scheme"),
        ("tunnel_ca = certs/ca.pem", "tunnel_ca is set but tunnel_endpoint is not"),
    ],
)
def test_bad_file_line_names_file_line_and_key(
    device: DeviceFiles, line: str, expected: str
) -> None:
    device.write_ini(device.ini.read_text() + line + "\n")
    message = error(["--config", str(device.ini)], cwd=device.root)
    assert expected in message


def test_key_before_section(device: DeviceFiles) -> None:
    device.write_ini("port = 1\n[agent]\n")
    assert error(["--config", str(device.ini)]).endswith(
        ":1: expected [agent] before the first key"
    )


def test_missing_required_key_names_key_variable_and_flag(device: DeviceFiles) -> None:
    device.write_ini(device.ini.read_text().replace("client_id = thing-1\n", ""))
    message = error(["--config", str(device.ini)])
    assert message.startswith("client_id is not set")
    assert "IOTUNNEL_CLIENT_ID" in message
    assert "--client-id" in message


def test_client_id_that_is_no_thing_name_needs_thing_name(device: DeviceFiles) -> None:
    message = error(["--config", str(device.ini), "--client-id", "dev/1"])
    assert message.startswith("thing_name (default: client_id): 'dev/1'")
    s = settings(["--config", str(device.ini), "--client-id", "dev/1", "--thing-name", "dev1"])
    assert (s.client_id, s.thing_name) == ("dev/1", "dev1")


def test_bad_values_from_environment_and_flags_are_named_so(device: DeviceFiles) -> None:
    argv = ["--config", str(device.ini)]
    assert error(argv, {"IOTUNNEL_PORT": "99999"}).startswith("IOTUNNEL_PORT: '99999'")
    assert error([*argv, "--endpoint", "bad host"]).startswith("--endpoint: 'bad host'")


def test_missing_or_unreadable_files(device: DeviceFiles) -> None:
    argv = ["--config", str(device.ini)]
    device.key.unlink()
    assert "key: 'certs/device.key': no such file" in error(argv)
    assert "cert: " in error([*argv, "--cert", str(device.root)])  # a directory
    assert error(["--config", str(device.root / "nope.ini")]).endswith("No such file or directory")


def test_mapping_dir_problems_come_from_the_proxy_reader(device: DeviceFiles) -> None:
    argv = ["--config", str(device.ini)]
    bad = device.mappings / "more.ini"
    bad.write_text("# comment\nSSH1 = 2222\n")
    message = error(argv)
    assert "mapping_dir" in message
    assert "more.ini:2" in message
    assert "already mapped" in message
    bad.write_text("WEB = not a port\n")
    assert "more.ini:1" in error(argv)
    bad.unlink()
    (device.mappings / "SSHDestination.ini").write_text("# nothing mapped\n")
    assert "no 'SERVICE_ID = endpoint' line" in error(argv)
    assert "not a directory" in error([*argv, "--mapping-dir", str(device.cert)])


def test_help_version_check_and_usage_errors(device: DeviceFiles) -> None:
    for flag in ("-h", "--help"):
        result = load([flag], {}, ROOT)
        assert isinstance(result, CliExit)
        assert result.code == 0
        assert "--tunnel-endpoint" in result.output
        assert "IOTUNNEL_" in result.output
    version = load(["--version"], {}, ROOT)
    assert isinstance(version, CliExit)
    assert version.output.startswith("iotunnel-agent ")
    check = load(["--config", str(device.ini), "--check"], {}, ROOT)
    assert isinstance(check, CheckOnly)
    assert check.settings.client_id == "thing-1"
    assert "unrecognized arguments" in error(["--bogus"])


def test_cli_exits_2_with_one_line(device: DeviceFiles, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(device.ini), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("iotunnel-agent: error: --port: '0'")
    assert "Traceback" not in err


def test_cli_loads_the_tls_files_at_start(
    device: DeviceFiles, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    # Placeholder PEM files: readable, but no certificate.
    assert cli.main(["--config", str(device.ini), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"iotunnel-agent: error: cert, key: cannot use {device.cert} with")
    assert err.count("\n") == 1
    good = ["--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    assert cli.main(["--config", str(device.ini), *good, "--root-ca", str(pki.client.key)]) == 2
    assert capsys.readouterr().err.startswith("iotunnel-agent: error: root_ca: cannot use")
    assert (
        cli.main(["--config", str(device.ini), *good, "--root-ca", str(pki.ca.cert), "--check"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("iotunnel-agent: configuration OK: thing-1 at broker.example.net:8883")
