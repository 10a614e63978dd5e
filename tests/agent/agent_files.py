"""Helpers of the agent's unit tests: a device's settings files on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DeviceFiles:
    """A device's files: certificate, key, CA, a mapping directory and a settings file."""

    root: Path
    cert: Path
    key: Path
    ca: Path
    mappings: Path
    ini: Path

    def write_ini(self, body: str) -> Path:
        self.ini.write_text(body)
        return self.ini
