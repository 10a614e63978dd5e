"""proxy.cli and ``python -m proxy``: exit codes and what reaches stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from iotunnel import __version__
from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from iotunnel.secret import Secret
from proxy.cli import main
from proxy.config import ProxySettings

REPO = Path(__file__).resolve().parents[2]
TOKEN = "AQGAAXiNsecretTOKENvalue0123456789"


class FakeRunner:
    """Stands in for ``proxy.runner`` so that main() can be tested without any I/O."""

    def __init__(self, result: int | BaseException) -> None:
        self.result = result
        self.calls: list[ProxySettings] = []

    def run(self, settings: ProxySettings) -> int:
        self.calls.append(settings)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working directory and no AWSIOT_* variables."""
    for name in list(os.environ):
        if name.startswith("AWSIOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def install_runner(monkeypatch: pytest.MonkeyPatch, result: int | BaseException) -> FakeRunner:
    fake = FakeRunner(result)
    module = types.ModuleType("proxy.runner")
    module.run = fake.run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "proxy.runner", module)
    return fake


def test_version(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"iotunnel-proxy {__version__}\n"
    assert captured.err == ""


def test_help(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-h"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: iotunnel-proxy ")
    assert captured.err == ""


def test_export_default_settings_prints_nothing(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--export-default-settings", "defaults.json"]) == 0
    assert (clean_env / "defaults.json").is_file()
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized option '--bogus'"),
        (["-d"], "argument -d/--destination-app: expected one argument"),
        (["-r", "us-east-1", "-e", "h", "-d", "22"], "-r and -e cannot be used together"),
        (["-r", "us-east-1", "-t", TOKEN, "-d", "HTTP1=99999"], "-d: 'HTTP1=99999': port"),
    ],
)
def test_config_error_is_one_line_and_exit_2(
    clean_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"iotunnel-proxy: error: {message}")
    assert captured.err.count("\n") == 1
    assert TOKEN not in captured.err


def test_runs_with_environment_and_cwd(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWSIOT_TUNNEL_ACCESS_TOKEN", TOKEN)
    monkeypatch.setenv("AWSIOT_TUNNEL_REGION", "eu-west-1")
    (clean_env / "config").mkdir()
    (clean_env / "config" / "SSHDestination.ini").write_text("SSH1 = 22\n")
    fake = install_runner(monkeypatch, 0)
    assert main(["-m", "dst"]) == 0
    (settings,) = fake.calls
    assert settings.mode is Mode.DESTINATION
    assert settings.access_token == Secret(TOKEN)
    assert "eu-west-1" in settings.url
    assert [m.service_id for m in settings.mappings] == ["SSH1"]
    assert capsys.readouterr() == ("", "")


def test_returns_the_runner_exit_code(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_runner(monkeypatch, 3)
    assert main(["-r", "us-east-1", "-t", TOKEN, "-d", "22"]) == 3


def test_reads_sys_argv_by_default(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install_runner(monkeypatch, 0)
    monkeypatch.setattr(sys, "argv", ["iotunnel-proxy", "-r", "us-east-1", "-t", TOKEN, "-s", "0"])
    assert main() == 0
    assert fake.calls[0].mode is Mode.SOURCE


def test_ctrl_c_is_quiet(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_runner(monkeypatch, KeyboardInterrupt())
    assert main(["-r", "us-east-1", "-t", TOKEN, "-d", "22"]) == 130
    assert capsys.readouterr() == ("", "")


def test_config_error_from_the_runner(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_runner(monkeypatch, ConfigError("no destination mapping for service RDP"))
    assert main(["-r", "us-east-1", "-t", TOKEN, "-d", "SSH1=22"]) == 2
    assert capsys.readouterr().err == (
        "iotunnel-proxy: error: no destination mapping for service RDP\n"
    )


# --------------------------------------------------------------------------- real processes


def run_proxy(ms: float, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWSIOT_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60_000 * ms,
        check=False,
    )


def test_python_m_proxy_help(ms: float) -> None:
    done = run_proxy(ms, "--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: iotunnel-proxy ")
    assert "AWSIOT_TUNNEL_ACCESS_TOKEN" in done.stdout
    assert done.stderr == ""


def test_python_m_proxy_version(ms: float) -> None:
    done = run_proxy(ms, "-V")
    assert done.returncode == 0
    assert done.stdout == f"iotunnel-proxy {__version__}\n"
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "unrecognized option '--no-such-flag'"),
        (["-r"], "argument -r/--region: expected one argument"),
        ([TOKEN], "unexpected argument: every value needs a flag (see --help)"),
    ],
)
def test_python_m_proxy_bad_flag(ms: float, argv: list[str], message: str) -> None:
    done = run_proxy(ms, *argv)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"iotunnel-proxy: error: {message}\n"
    assert "Traceback" not in done.stderr


def test_console_script_version(ms: float) -> None:
    script = Path(sys.executable).with_name("iotunnel-proxy")
    if not script.exists():
        pytest.skip("the package is not installed in this environment")
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60_000 * ms, check=False
    )
    assert done.returncode == 0
    assert done.stdout == f"iotunnel-proxy {__version__}\n"
