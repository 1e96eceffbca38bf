"""The balancer's durable state: one SQLite database (WAL) under --data-dir for batches, jobs, registry.

Each part creates its own tables (`CREATE TABLE IF NOT EXISTS`) on the connection it gets here. Writes are
small and the database is local, so parts call it from the event loop; a part with large scans runs them in
`asyncio.to_thread` on a connection of its own (`connect` again: SQLite allows one writer, many readers).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

DB_NAME = "balancer.sqlite3"


def data_path(data_dir: str) -> Path:
    """The data directory, `~` expanded, created (0700: it holds clients' files) if it does not exist."""
    path = Path(data_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def connect(data_dir: str) -> sqlite3.Connection:
    """A connection to the balancer's database in WAL mode; autocommit off, rows as sqlite3.Row."""
    db = sqlite3.connect(data_path(data_dir) / DB_NAME, timeout=10.0, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill, fast commits
    db.execute("PRAGMA foreign_keys=ON")
    return db
