"""The ``state_dir`` check: can the agent keep its running tunnels there."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir_problem(path: Path) -> str | None:
    """Why the agent could not keep its tunnels in ``path``, or ``None``: it must be a
    writable directory, or one the agent can create (its nearest existing parent is one)."""
    if path.exists():
        if not path.is_dir():
            return f"state_dir: {path}: not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"state_dir: {path}: not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"state_dir: {path}: cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"state_dir: {path}: cannot be created: {parent} is not writable"
    return None
