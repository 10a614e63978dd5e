"""Installing, running, upgrading, removing and purging the package (amd64 here) in throw-away
roots (``dpkg --root``), never on this machine itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from deb_harness import (
    SYSTEM_PYTHON,
    can_install,
    dpkg,
    entry_point,
    has_mount_namespaces,
    host_arch,
    installed_argv,
    new_root,
    project_version,
    repack,
    run,
    status,
)

WANTS = "etc/systemd/system/multi-user.target.wants/iotunnel-agent.service"
MASK = "etc/systemd/system/iotunnel-agent.service"
EDIT = "client_id = my-edited-device"
UNIT = "iotunnel-agent.service"


def needs_python() -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 (the installed entry points' interpreter)")


def test_install_enables_the_unit_and_creates_the_user(installed: Path) -> None:
    root = installed
    assert status(root) == f"ii {project_version()}"
    # Enabled (as deb-systemd-helper does it), not started: nothing is running in a dpkg root,
    # and on a device the unit waits for the key (ConditionPathExists=).
    wants = root / WANTS
    assert wants.is_symlink()
    assert str(wants.readlink()) == "/lib/systemd/system/iotunnel-agent.service"
    assert not (root / MASK).exists()
    if shutil.which("systemd-sysusers"):
        passwd = (root / "etc/passwd").read_text()
        [entry] = [line for line in passwd.splitlines() if line.startswith("iotunnel:")]
        assert entry.endswith(":iotunnel device agent:/var/lib/iotunnel:/usr/sbin/nologin")
        assert "iotunnel:" in (root / "etc/group").read_text()
    # The files are as packaged (md5sums), and the settings are there.
    assert dpkg(root, "--verify", "iotunnel") == ""
    assert (root / "etc/iotunnel/agent.ini").is_file()
    assert (root / "etc/iotunnel/certs").is_dir()


def test_installed_entry_points_run(installed: Path) -> None:
    """iotunnel-agent --version and iotunnel-proxy --help from the installed files alone."""
    needs_python()
    agent = run(installed_argv(installed, [entry_point(installed, "iotunnel-agent"), "--version"]))
    assert agent.returncode == 0, agent.stderr
    assert agent.stdout == f"iotunnel-agent {project_version()}\n"

    proxy = run(installed_argv(installed, [entry_point(installed, "iotunnel-proxy"), "--help"]))
    assert proxy.returncode == 0, proxy.stderr
    assert proxy.stdout.startswith("usage: iotunnel-proxy ")
    assert "--destination-app" in proxy.stdout


def test_installed_modules_come_from_opt(installed: Path) -> None:
    """The installed interpreter setup: iotunnel and every dependency from /opt/iotunnel/lib,
    protobuf with its upb backend, websockets with its C speedups."""
    needs_python()
    if not has_mount_namespaces():
        pytest.skip("needs a mount namespace to see the root's /opt/iotunnel at /opt/iotunnel")
    code = (
        "import sys; sys.path.insert(0, '/opt/iotunnel/lib'); "
        "import agent, proxy, awscrt, awsiot, google.protobuf, websockets.speedups; "
        "from google.protobuf.internal import api_implementation; "
        "print(api_implementation.Type()); "
        "print('\\n'.join(m.__file__ for m in (agent, proxy, awscrt, awsiot, google.protobuf)))"
    )
    done = run(installed_argv(installed, [SYSTEM_PYTHON, "-I", "-c", code]))
    assert done.returncode == 0, done.stderr
    backend, *files = done.stdout.split()
    assert backend == "upb"
    assert all(f.startswith("/opt/iotunnel/lib/") for f in files), files


def test_installed_agent_reads_the_shipped_settings(installed: Path) -> None:
    """The shipped agent.ini parses; --check then stops at the device certificate, which an
    unconfigured device does not have (exit 2, one line, no traceback)."""
    needs_python()
    ini = installed / "etc/iotunnel/agent.ini"
    argv = [entry_point(installed, "iotunnel-agent"), "--config", ini, "--check"]
    done = run(installed_argv(installed, argv))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cert" in done.stderr
    assert "/etc/iotunnel/certs/device.pem.crt" in done.stderr
    assert "Traceback" not in done.stderr


def test_upgrade_keeps_the_edited_settings_then_remove_and_purge(
    debs: dict[str, Path], tmp_path: Path
) -> None:
    reason = can_install()
    if reason:
        pytest.skip(reason)
    version = project_version()
    deb = debs[host_arch()]
    root = new_root(tmp_path / "root", host_arch())
    dpkg(root, "--install", deb)
    ini = root / "etc/iotunnel/agent.ini"
    shipped = ini.read_text()
    assert "\nclient_id = my-device\n" in shipped
    ini.write_text(shipped.replace("\nclient_id = my-device\n", f"\n{EDIT}\n"))
    (root / "etc/iotunnel/certs/private.pem.key").write_text("a key\n")

    # v2, same shipped agent.ini: dpkg keeps the edit without asking.
    v2 = repack(deb, tmp_path / "v2.deb", f"{version}.1")
    dpkg(root, "--install", v2)
    assert status(root) == f"ii {version}.1"
    assert EDIT in ini.read_text()
    assert not list((root / "etc/iotunnel").glob("agent.ini.dpkg-*"))

    # v3 changes the shipped agent.ini: with --force-confold (what unattended upgrades use)
    # the edit stays and the new default is put beside it.
    v3 = repack(deb, tmp_path / "v3.deb", f"{version}.2", edit_config="# v3\n")
    dpkg(root, "--force-confdef", "--force-confold", "--install", v3)
    assert status(root) == f"ii {version}.2"
    assert EDIT in ini.read_text()
    assert (root / "etc/iotunnel/agent.ini.dpkg-dist").read_text().endswith("# v3\n")

    # An administrator's "systemctl disable" survives an upgrade.
    systemctl = shutil.which("systemctl")
    if systemctl:
        assert run([systemctl, f"--root={root}", "disable", UNIT]).returncode == 0
        assert not (root / WANTS).exists()
        dpkg(root, "--install", v3)
        assert not (root / WANTS).exists()
        assert run([systemctl, f"--root={root}", "enable", UNIT]).returncode == 0
        assert (root / WANTS).is_symlink()

    # remove: the program goes, the settings and the key stay, the unit is masked.
    (root / "opt/iotunnel/lib/agent/__pycache__").mkdir(exist_ok=True)  # as if run by root
    (root / "opt/iotunnel/lib/agent/__pycache__/cli.cpython-311.pyc").write_bytes(b"")
    dpkg(root, "--remove", "iotunnel")
    assert status(root) == f"rc {version}.2"
    assert not (root / "opt/iotunnel").exists()
    assert not (root / "usr/bin/iotunnel-agent").is_symlink()
    assert not (root / "lib/systemd/system/iotunnel-agent.service").exists()
    assert EDIT in ini.read_text()
    assert (root / "etc/iotunnel/certs/private.pem.key").exists()
    if shutil.which("deb-systemd-helper"):
        assert str((root / MASK).readlink()) == "/dev/null"

    # purge: /etc/iotunnel (settings, certificates, key), the kept tunnels (their tokens) in
    # /var/lib/iotunnel and the unit's traces go.
    (root / "var/lib/iotunnel").mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "var/lib/iotunnel/tunnel-t1.json").write_text("{}")
    dpkg(root, "--purge", "iotunnel")
    assert status(root) == ""
    assert not (root / "etc/iotunnel").exists()
    assert not (root / "var/lib/iotunnel").exists()
    assert not (root / MASK).exists()
    assert not (root / WANTS).exists()
    assert not (
        root / "var/lib/systemd/deb-systemd-helper-enabled/iotunnel-agent.service.dsh-also"
    ).exists()
    left = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "var/lib/dpkg" not in str(p)
    )
    # What stays: the system user (Debian practice), nothing else.
    assert set(left) <= {"etc/passwd", "etc/group", "etc/shadow", "etc/gshadow", "etc/.pwd.lock"}
