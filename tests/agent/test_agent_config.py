"""agent.config: the settings file, IOTUNNEL_* variables and flags -> AgentSettings."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from agent_files import DeviceFiles

from agent import cli
from agent.config import DEFAULT_CONFIG, KEYS, AgentSettings, CheckOnly, CliExit, load
from iotunnel.errors import ConfigError
from testbed.pki import PKI

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
    assert s.launcher == "fork"
    assert settings(["--config", str(device.ini), "--launcher", "spawn"]).launcher == "spawn"
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
        ("launcher = exec", "agent.ini:8: launcher: 'exec': expected one of fork, spawn"),
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
    assert err == f"iotunnel-agent: error: cert: {device.cert}: no PEM certificate in it\n"
    good = ["--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    assert cli.main(["--config", str(device.ini), *good, "--root-ca", str(pki.client.key)]) == 2
    assert capsys.readouterr().err.startswith("iotunnel-agent: error: root_ca: ")
    assert (
        cli.main(["--config", str(device.ini), *good, "--root-ca", str(pki.ca.cert), "--check"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("iotunnel-agent: configuration OK: thing-1 at broker.example.net:8883")


# ------------------------------------------------------------------- TLS files (issue 11 #6)


def good_argv(device: DeviceFiles, pki: PKI) -> list[str]:
    return [
        "--config", str(device.ini), "--check",
        "--cert", str(pki.client.cert), "--key", str(pki.client.key),
        "--root-ca", str(pki.ca.cert),
        "--tunnel-endpoint", "wss://127.0.0.1:4443", "--tunnel-ca", str(pki.ca.cert),
    ]  # fmt: skip


def check_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    return captured.err.removeprefix("iotunnel-agent: error: ").rstrip("\n")


@pytest.mark.parametrize("name", ["root_ca", "tunnel_ca", "cert"])
def test_check_parses_each_certificate_file(
    name: str, device: DeviceFiles, pki: PKI, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = good_argv(device, pki)
    assert cli.main(argv) == 0
    capsys.readouterr()
    for content in ("-----BEGIN PLACEHOLDER-----\n", "", pki.client.key.read_text()):
        device.ca.write_text(content)
        message = check_error([*argv, "--" + name.replace("_", "-"), str(device.ca)], capsys)
        assert message == f"{name}: {device.ca}: no PEM certificate in it"


def key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if "-----" not in line]


def test_check_parses_the_key_and_matches_it_with_the_certificate(
    device: DeviceFiles, pki: PKI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    argv = good_argv(device, pki)
    device.key.write_text("-----BEGIN PLACEHOLDER-----\n")
    message = check_error([*argv, "--key", str(device.key)], capsys)
    assert message == f"key: {device.key}: no PEM private key in it"

    device.key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    message = check_error([*argv, "--key", str(device.key)], capsys)
    assert message == f"key: {device.key}: not a usable PEM private key"

    other = pki.issue_client("someone-else")
    message = check_error([*argv, "--key", str(other.key)], capsys)
    assert message == f"cert, key: {pki.client.cert} is not the certificate of {other.key}"
    for line in key_lines(other.key) + key_lines(pki.client.key):
        assert line not in message

    key = serialization.load_pem_private_key(pki.client.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    message = check_error([*argv, "--key", str(encrypted)], capsys)
    assert (
        message == f"key: {encrypted}: encrypted with a passphrase, which the agent cannot ask for"
    )


def test_check_reports_unreadable_tls_files_as_another_user_would_see_them(pki: PKI) -> None:
    """Run as ``nobody`` (root reads any file): a mode-000 CA file and CA directory, exit 2."""
    as_nobody: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux) to drop privileges")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    top = Path(tempfile.mkdtemp(prefix="iotunnel-agent-tls-"))
    locked_file, locked_dir = top / "locked.pem", top / "locked.d"
    try:
        top.chmod(0o755)
        files = {}
        for name, source in (
            ("cert", pki.client.cert),
            ("key", pki.client.key),
            ("ca", pki.ca.cert),
        ):
            files[name] = top / source.name
            shutil.copyfile(source, files[name])
            files[name].chmod(0o644)
        mappings = top / "destination.d"
        mappings.mkdir(mode=0o755)
        state = top / "state"
        state.mkdir()
        state.chmod(0o777)
        (mappings / "SSHDestination.ini").write_text("SSH1 = 22\n")
        (mappings / "SSHDestination.ini").chmod(0o644)
        shutil.copyfile(pki.ca.cert, locked_file)
        locked_file.chmod(0o000)
        locked_dir.mkdir(mode=0o000)
        base = [
            *as_nobody, sys.executable, "-m", "agent", "--check",
            "--endpoint", "127.0.0.1", "--client-id", "thing-1", "--mapping-dir", str(mappings),
            "--cert", str(files["cert"]), "--key", str(files["key"]),
            "--tunnel-endpoint", "wss://127.0.0.1:4443", "--state-dir", str(state),
        ]  # fmt: skip
        env = {"PATH": os.environ.get("PATH", "")}  # no IOTUNNEL_*: flags only

        def run(*extra: str) -> tuple[int, str]:
            done = subprocess.run(
                [*base, *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
            )
            return done.returncode, done.stderr

        assert run("--root-ca", str(files["ca"]), "--tunnel-ca", str(files["ca"]))[0] == 0
        for name, flag, path in (
            ("root_ca", "--root-ca", locked_dir),
            ("tunnel_ca", "--tunnel-ca", locked_dir),
            ("root_ca", "--root-ca", locked_file),
            ("tunnel_ca", "--tunnel-ca", locked_file),
        ):
            code, err = run(flag, str(path))
            assert code == 2, err
            assert err.count("\n") == 1, err
            # The settings loader names the flag (or file:line) as given; the TLS check, the key.
            assert err.rstrip("\n").endswith(
                (
                    f"{name}: {path}: cannot read: Permission denied",
                    f"{flag}: '{path}': cannot read: Permission denied",
                )
            ), err
        files["key"].chmod(0o000)
        code, err = run()
        assert code == 2
        assert err.rstrip("\n").endswith(f"--key: '{files['key']}': cannot read: Permission denied")
    finally:
        if locked_dir.exists():
            locked_dir.chmod(0o755)
        shutil.rmtree(top)
