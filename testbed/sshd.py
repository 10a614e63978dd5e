"""A throw-away OpenSSH server on an unprivileged loopback port, and the real ``ssh`` client.

Works as root (CI) and as an ordinary user: sshd then logs in only that user. Keys are made
with ``ssh-keygen`` in the work directory; no system file is touched except, as root, the
privilege separation directory ``/run/sshd`` that sshd insists on.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The line sshd logs (with -e) once it listens.
SSHD_LISTENING = r"Server listening on 127\.0\.0\.1 port (\d+)"


def sshd_binary() -> str | None:
    """The sshd executable (it must be called by absolute path), or ``None``."""
    path = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", os.environ.get("PATH", "")])
    found = shutil.which("sshd", path=path)
    return None if found is None or shutil.which("ssh") is None else found


@dataclass(frozen=True)
class SshSetup:
    """What sshd is started with, and what the client needs to log in."""

    config: Path
    client_key: Path
    user: str

    def argv(self, binary: str, port: int) -> list[str]:
        """sshd in the foreground, logging to stderr."""
        return [binary, "-D", "-e", "-f", str(self.config), "-p", str(port)]


def prepare_sshd(workdir: Path) -> SshSetup:
    """Make a host key, a client key, authorized_keys and an sshd config in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "ssh_host_ed25519_key", workdir / "client_ed25519_key"
    for key in (host_key, client_key):
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "iotunnel-test", "-f", key],
                check=True,
                stdin=subprocess.DEVNULL,
            )
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    config = workdir / "sshd_config"
    config.write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                "PidFile none",
                "UsePAM no",
                "StrictModes no",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "PrintMotd no",
                "LogLevel INFO",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    return SshSetup(config, client_key, getpass.getuser())


def ssh_command(setup: SshSetup, port: int, command: str) -> list[str]:
    """The real ``ssh`` client, non-interactive, to 127.0.0.1:``port``, running ``command``."""
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-p",
        str(port),
        "-i",
        str(setup.client_key),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=20",
        "-o",
        "LogLevel=ERROR",
        f"{setup.user}@127.0.0.1",
        command,
    ]
