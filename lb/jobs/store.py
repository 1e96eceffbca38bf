"""The jobs part's SQLite tables (files and batches) in the balancer's one database, and their rows.

Called from the event loop: every statement is a small indexed read or write on a local WAL database.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs_files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT,                 -- hash of the API key that created it; NULL without --api-key
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    path TEXT NOT NULL          -- relative to the data directory
);
CREATE TABLE IF NOT EXISTS jobs_batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    out_id TEXT NOT NULL,       -- the output / error file ids, fixed at creation, published when finished
    err_id TEXT NOT NULL,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,                -- JSON list of validation errors
    metadata TEXT               -- JSON object of strings
);
CREATE INDEX IF NOT EXISTS jobs_batches_status ON jobs_batches(status);
"""
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}" if prefix == "file" else f"{prefix}_{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class JobStore:
    """Rows of jobs_files and jobs_batches; `owner` None sees only ownerless rows (no --api-key)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)
        db.commit()

    # files
    def add_file(self, row: dict[str, Any]) -> None:
        self._insert("jobs_files", row)

    def file(self, file_id: str, owner: str | None) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM jobs_files WHERE id = ? AND owner IS ?", (file_id, owner))
        found = cur.fetchone()
        return dict(found) if found else None

    def files(
        self, owner: str | None, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM jobs_files WHERE owner IS ?", [owner]
        if purpose:
            sql, args = sql + " AND purpose = ?", [*args, purpose]
        sql, args = self._page(sql, args, "jobs_files", after, limit, newest_first)
        return [dict(r) for r in self.db.execute(sql, args)]

    def delete_file(self, file_id: str) -> None:
        self.db.execute("DELETE FROM jobs_files WHERE id = ?", (file_id,))
        self.db.commit()

    # batches
    def add_batch(self, row: dict[str, Any]) -> None:
        row = {**row, "metadata": json.dumps(row.get("metadata") or {})}
        self._insert("jobs_batches", row)

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        found = self.db.execute("SELECT * FROM jobs_batches WHERE id = ?", (batch_id,)).fetchone()
        return _batch_row(found) if found else None

    def batches(self, owner: str | None, after: str | None, limit: int) -> list[dict[str, Any]]:
        sql, args = self._page(
            "SELECT * FROM jobs_batches WHERE owner IS ?",
            [owner],
            "jobs_batches",
            after,
            limit,
            newest_first=True,
        )
        return [_batch_row(r) for r in self.db.execute(sql, args)]

    def unfinished(self) -> Iterator[dict[str, Any]]:
        marks = ",".join("?" * len(UNFINISHED))
        sql = f"SELECT * FROM jobs_batches WHERE status IN ({marks}) ORDER BY seq"
        for found in self.db.execute(sql, UNFINISHED).fetchall():
            yield _batch_row(found)

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        if "errors" in fields and fields["errors"] is not None:
            fields["errors"] = json.dumps(fields["errors"])
        sets = ", ".join(f"{name} = ?" for name in fields)
        self.db.execute(f"UPDATE jobs_batches SET {sets} WHERE id = ?", (*fields.values(), batch_id))
        self.db.commit()

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        names = ", ".join(row)
        marks = ", ".join("?" * len(row))
        self.db.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", tuple(row.values()))
        self.db.commit()

    @staticmethod
    def _page(
        sql: str, args: list[Any], table: str, after: str | None, limit: int, newest_first: bool
    ) -> tuple[str, list[Any]]:
        """Cursor pagination as OpenAI does it: `after` is the id of the last item of the previous page."""
        if after:
            op = "<" if newest_first else ">"
            sql += f" AND seq {op} COALESCE((SELECT seq FROM {table} WHERE id = ?), -1)"
            args.append(after)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        args.append(limit)
        return sql, args


def _batch_row(found: sqlite3.Row) -> dict[str, Any]:
    row = dict(found)
    row["metadata"] = json.loads(row["metadata"] or "{}")
    row["errors"] = json.loads(row["errors"]) if row["errors"] else None
    return row
