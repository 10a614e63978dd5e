"""Fixtures of the agent's unit tests: settings files on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_files import DeviceFiles


@pytest.fixture
def device(tmp_path: Path) -> DeviceFiles:
    root = tmp_path / "etc"
    (root / "certs").mkdir(parents=True)
    cert, key, ca = root / "certs/device.pem", root / "certs/device.key", root / "certs/ca.pem"
    for path in (cert, key, ca):
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
    mappings = root / "destination.d"
    mappings.mkdir()
    (mappings / "SSHDestination.ini").write_text("HTTP1 = 80\nSSH1 = 22\n")
    files = DeviceFiles(root, cert, key, ca, mappings, root / "agent.ini")
    files.write_ini(
        "[agent]\n"
        "endpoint = broker.example.net\n"
        "client_id = thing-1\n"
        "cert = certs/device.pem\n"
        "key = certs/device.key\n"
        "root_ca = certs/ca.pem\n"
        "mapping_dir = destination.d\n"
    )
    return files
