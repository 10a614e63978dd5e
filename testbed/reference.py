"""Where the tests and the benchmarks find the reference C++ localproxy, and whether it runs.

The binary is ``$LOCALPROXY`` or ``shared/peers/localproxy/localproxy-x86_64`` beside the
checkout (CI lays ``shared/`` there); an x86-64 build, so other machines skip with the reason.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from testbed.harness import ROOT

__all__ = ["DEFAULT_LOCALPROXY", "find_localproxy"]

#: Where a checkout finds the reference binary: ``shared/`` beside the repository.
DEFAULT_LOCALPROXY = ROOT.parent / "shared" / "peers" / "localproxy" / "localproxy-x86_64"


def find_localproxy() -> tuple[Path | None, str]:
    """The reference binary, or None and why it cannot be used here."""
    configured = os.environ.get("LOCALPROXY")
    path = Path(configured) if configured else DEFAULT_LOCALPROXY
    if not path.is_file():
        where = "$LOCALPROXY" if configured else "no shared/ checkout beside the repository"
        return None, f"reference localproxy not found at {path} ({where})"
    if not configured and platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the reference localproxy is an x86-64 build; this is {platform.machine()}"
    try:
        done = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            cwd=ROOT.parent,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"reference localproxy at {path} does not run: {exc}"
    if done.returncode != 0 or "Local Proxy" not in done.stdout + done.stderr:
        output = (done.stdout + done.stderr).strip()[-300:]
        return None, f"reference localproxy at {path} does not run ({done.returncode}): {output}"
    return path, ""
