"""A real PKCS#11 software token (Debian's softhsm2) holding a device key, for the agent's tests.

Each token lives in a directory of its own, named by its own ``softhsm2.conf``; the library
finds it through ``SOFTHSM2_CONF`` in the environment of the process that loads it::

    token = SoftToken.create(tmp_path / "hsm")            # label "iotunnel", PIN 1234
    token.import_key(pki.issue_client("thing-1").key)     # label "device-key", id 01
    env = {**os.environ, **token.env}                     # for the agent's process

The device key is the PKCS#8 PEM that :mod:`testbed.pki` writes, which ``softhsm2-util
--import`` takes as it is. The PIN goes through ``softhsm2-util``'s command line here: it is a
test token's PIN, not a secret.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Where Debian's libsofthsm2 installs the PKCS#11 module (the first is a symlink to the second).
_LIBRARIES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/*/softhsm/libsofthsm2.so")
_SLOT_RE = re.compile(r"reassigned to slot (\d+)")


def softhsm_library() -> Path | None:
    """SoftHSM's PKCS#11 library, or ``None`` when softhsm2 is not installed."""
    for pattern in _LIBRARIES:
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            if path.is_file():
                return path
    return None


def softhsm_missing() -> str | None:
    """Why a SoftHSM test cannot run (for ``pytest.mark.skipif``), or ``None``."""
    if shutil.which("softhsm2-util") is None or softhsm_library() is None:
        return "softhsm2 is not installed (Debian package 'softhsm2')"
    return None


@dataclass(frozen=True)
class SoftToken:
    """One initialized SoftHSM token in ``directory``."""

    directory: Path
    conf: Path
    lib: Path
    label: str
    pin: str
    slot: int

    @property
    def env(self) -> dict[str, str]:
        """What a process that loads :attr:`lib` needs in its environment to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf)}

    @classmethod
    def create(
        cls, directory: Path, *, label: str = "iotunnel", pin: str = "1234", so_pin: str = "5678"
    ) -> SoftToken:
        """Make a token store in ``directory`` (created) and initialize one token in it."""
        lib = softhsm_library()
        if lib is None:
            raise RuntimeError(softhsm_missing())
        tokens = directory / "tokens"
        tokens.mkdir(parents=True, mode=0o700)
        conf = directory / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        out = _util(
            conf, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin
        )
        found = _SLOT_RE.search(out)
        if found is None:
            raise RuntimeError(f"softhsm2-util did not say which slot it used: {out!r}")
        return cls(directory, conf, lib, label, pin, int(found.group(1)))

    def import_key(self, key: Path, *, label: str = "device-key", object_id: str = "01") -> None:
        """Import a PKCS#8 PEM private key into the token as ``label``."""
        _util(
            self.conf,
            "--import", str(key), "--token", self.label,
            "--label", label, "--id", object_id, "--pin", self.pin,
        )  # fmt: skip


def _util(conf: Path, *args: str) -> str:
    done = subprocess.run(
        ["softhsm2-util", *args],
        env={"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"softhsm2-util {args[0]} failed: {done.stdout}{done.stderr}")
    return done.stdout
