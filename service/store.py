"""The service's state on disk: one SQLite database (standard library ``sqlite3``).

One row per tunnel, its fields as a JSON document next to a few indexed columns. Every change
is committed before the registry method that made it returns (``synchronous=FULL``), so a tunnel
that OpenTunnel reported exists after a crash or a restart, with its token digests (never the
tokens), lifetime, tags and single-use state.

The file is created with mode 0600. ``:memory:`` keeps the database in memory (tests).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from iotunnel import boundedjson
from service.registry import ConnectionState, Grant, Tunnel, TunnelStatus

#: Bumped when the row format changes; an unknown version is refused, not guessed at.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tunnels (
    tunnel_id  TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    created_at REAL NOT NULL,
    data       TEXT NOT NULL
)
"""


class StoreError(Exception):
    """The state file cannot be used; the message is one line and names the file."""


def to_record(tunnel: Tunnel) -> dict[str, Any]:
    """A tunnel as a JSON-able document."""
    return {
        "tunnelId": tunnel.tunnel_id,
        "services": list(tunnel.services),
        "grants": {
            "source": _grant(tunnel.source),
            "destination": _grant(tunnel.destination),
        },
        "status": tunnel.status.value,
        "description": tunnel.description,
        "thingName": tunnel.thing_name,
        "lifetimeMinutes": tunnel.lifetime_minutes,
        "expiresAt": tunnel.expires_at,
        "createdAt": tunnel.created_at,
        "updatedAt": tunnel.updated_at,
        "closedAt": tunnel.closed_at,
        "tags": [[k, v] for k, v in tunnel.tags.items()],
        "sourceState": [tunnel.source_state.connected, tunnel.source_state.updated_at],
        "destinationState": [
            tunnel.destination_state.connected,
            tunnel.destination_state.updated_at,
        ],
        "static": tunnel.static,
    }


def from_record(record: dict[str, Any]) -> Tunnel:
    """The tunnel a :func:`to_record` document describes.

    Raises:
        KeyError, TypeError, ValueError: a malformed document.
    """
    grants = record["grants"]
    return Tunnel(
        tunnel_id=str(record["tunnelId"]),
        services=tuple(str(s) for s in record["services"]),
        source=_from_grant(grants["source"]),
        destination=_from_grant(grants["destination"]),
        status=TunnelStatus(record["status"]),
        description=record["description"],
        thing_name=record["thingName"],
        lifetime_minutes=record["lifetimeMinutes"],
        expires_at=record["expiresAt"],
        created_at=float(record["createdAt"]),
        updated_at=float(record["updatedAt"]),
        closed_at=record["closedAt"],
        tags={str(k): str(v) for k, v in record["tags"]},
        source_state=ConnectionState(bool(record["sourceState"][0]), record["sourceState"][1]),
        destination_state=ConnectionState(
            bool(record["destinationState"][0]), record["destinationState"][1]
        ),
        static=bool(record.get("static", False)),
    )


def _grant(grant: Grant) -> dict[str, Any]:
    return {"token": grant.token_digest, "client": grant.client_digest, "used": grant.used}


def _from_grant(data: dict[str, Any]) -> Grant:
    return Grant(str(data["token"]), data["client"], bool(data["used"]))


class SqliteStore:
    """Tunnels in an SQLite database file (see the module docstring).

    Raises:
        StoreError: the file cannot be created or opened, is not a database of this service,
            or was written by a newer version.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                # Create it private before SQLite does, with the umask's mode.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open state file: {exc.strerror}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open state file: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: state file has schema version {version}; "
                    f"this service knows {SCHEMA_VERSION}"
                )
            self._db.execute(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"{self.path}: not a usable state file: {exc}") from None
        except StoreError:
            self._db.close()
            raise

    def load(self) -> list[Tunnel]:
        """Every stored tunnel, oldest first."""
        tunnels = []
        rows = self._db.execute(
            "SELECT tunnel_id, data FROM tunnels ORDER BY created_at, tunnel_id"
        )
        for tunnel_id, data in rows:
            try:
                tunnels.append(from_record(boundedjson.loads(data)))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise StoreError(
                    f"{self.path}: tunnel {tunnel_id!r}: malformed row ({exc!r})"
                ) from None
        return tunnels

    def save(self, tunnel: Tunnel) -> None:
        """Insert or replace one tunnel (committed when this returns)."""
        self._db.execute(
            "INSERT OR REPLACE INTO tunnels (tunnel_id, status, created_at, data) "
            "VALUES (?, ?, ?, ?)",
            (
                tunnel.tunnel_id,
                tunnel.status.value,
                tunnel.created_at,
                json.dumps(to_record(tunnel), separators=(",", ":")),
            ),
        )

    def delete(self, tunnel_id: str) -> None:
        """Remove one tunnel."""
        self._db.execute("DELETE FROM tunnels WHERE tunnel_id = ?", (tunnel_id,))

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()
