"""The checkpoint registry: checkpoints a trainer registers, and which retired model names follow which.

Rows live in the balancer's SQLite database (lb/datastore.py, under --data-dir), so they outlive restarts.
A checkpoint is an id (the model name workers serve it under), a local path as the workers see it, where it
came from, tags, and the loading options a worker needs for it (GGUF file, DCP base model, custom code).
A redirect says that a model name retired from every worker by a rolling switch is now answered by its
replacement, so clients that keep sending the old name are not refused.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lb.errors import BadRequest, BalancerError, NotFound

SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_checkpoints (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    source TEXT,
    tags TEXT NOT NULL,           -- JSON list of strings
    options TEXT NOT NULL,        -- JSON object: loading options sent to the worker's /admin/load
    registered_at REAL NOT NULL   -- unix seconds
);
CREATE TABLE IF NOT EXISTS registry_redirects (
    name TEXT PRIMARY KEY,        -- a model name no worker serves any more
    target TEXT NOT NULL,         -- the checkpoint id that replaced it
    created_at REAL NOT NULL
);
"""
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
# what a worker's POST /admin/load accepts besides model_path and served_model_name
OPTION_KEYS = ("gguf_file", "trust_remote_code", "attn_implementation", "quantization", "dcp_path",
               "base_model", "max_model_len")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


class CheckpointExists(BalancerError):
    status = 409
    type = "invalid_request_error"
    code = "checkpoint_exists"


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"
    param = "id"


class NoModelAtPath(BalancerError):
    status = 422
    type = "invalid_request_error"
    code = "no_model_at_path"
    param = "path"


@dataclass(frozen=True)
class Checkpoint:
    id: str
    path: str
    source: str | None = None
    tags: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    registered_at: float = field(default_factory=time.time)

    def load_request(self) -> dict[str, Any]:
        """The body of the worker's POST /admin/load for this checkpoint."""
        body: dict[str, Any] = {"served_model_name": self.id, **self.options}
        if not self.options.get("dcp_path"):
            body["model_path"] = self.path
        return body

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tags": list(self.tags)}


def parse_checkpoint(payload: Any) -> Checkpoint:
    """A checkpoint from POST /models/register's body; BadRequest naming the field otherwise."""
    if not isinstance(payload, dict):
        raise BadRequest('The body must be JSON like {"id": "step-1000", "path": "/ckpt/step-1000"}.')
    unknown = sorted(set(payload) - {"id", "path", "source", "tags", *OPTION_KEYS})
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(unknown)}.", param=unknown[0])
    ident, path, source, tags = (payload.get(k) for k in ("id", "path", "source", "tags"))
    if not isinstance(ident, str) or not ID_PATTERN.match(ident):
        raise BadRequest("'id' must be a model name: 1-128 letters, digits and ._:/@+- (no spaces).",
                         param="id")
    if not isinstance(path, str) or not path:
        raise BadRequest("'path' must be the checkpoint's directory (as the workers see it).", param="path")
    if source is not None and not isinstance(source, str):
        raise BadRequest("'source' must be a string.", param="source")
    tags = tags if tags is not None else []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise BadRequest("'tags' must be a list of strings.", param="tags")
    options = {k: payload[k] for k in OPTION_KEYS if payload.get(k) is not None}
    if path and "dcp_path" not in options and (Path(path) / ".metadata").is_file():
        options["dcp_path"] = path  # a torch.distributed.checkpoint directory: needs base_model too
    return Checkpoint(ident, path, source, tuple(tags), options)


def check_loadable(checkpoint: Checkpoint) -> None:
    """NoModelAtPath unless the path holds a model a worker can load (checked on this machine's filesystem,
    which on a cluster is the shared one the workers see)."""
    options = checkpoint.options
    if options.get("dcp_path"):
        dcp = Path(options["dcp_path"]).expanduser()
        if not (dcp / ".metadata").is_file():
            raise NoModelAtPath(f"{dcp} is not a torch.distributed.checkpoint directory (no .metadata).")
        base = options.get("base_model")
        if not isinstance(base, str) or not (Path(base).expanduser() / "config.json").is_file():
            raise NoModelAtPath("A DCP checkpoint needs 'base_model': a directory with config.json.",
                                param="base_model")
        return
    path = Path(checkpoint.path).expanduser()
    if not path.is_dir():
        raise NoModelAtPath(f"{checkpoint.path} is not a directory on the balancer's machine.")
    if options.get("gguf_file"):
        if not (path / str(options["gguf_file"])).is_file():
            raise NoModelAtPath(f"{checkpoint.path} holds no {options['gguf_file']}.", param="gguf_file")
        return
    if not (path / "config.json").is_file():
        raise NoModelAtPath(f"{checkpoint.path} holds no model (no config.json).")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise NoModelAtPath(f"{checkpoint.path} holds no weights (*.safetensors or pytorch_model*.bin).")


class Registry:
    """Checkpoints and redirects on one SQLite connection; every call is a small local read or write."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(SCHEMA)
        self._db.commit()

    def add(self, checkpoint: Checkpoint) -> None:
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO registry_checkpoints (id, path, source, tags, options, registered_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (checkpoint.id, checkpoint.path, checkpoint.source, json.dumps(list(checkpoint.tags)),
                     json.dumps(checkpoint.options), checkpoint.registered_at),
                )
        except sqlite3.IntegrityError:
            raise CheckpointExists(f"A checkpoint with id '{checkpoint.id}' is already registered.",
                                   param="id") from None

    def get(self, ident: str) -> Checkpoint:
        row = self._db.execute("SELECT * FROM registry_checkpoints WHERE id = ?", (ident,)).fetchone()
        if row is None:
            raise CheckpointNotFound(f"No checkpoint with id '{ident}' is registered (see GET /models).")
        return _checkpoint(row)

    def all(self) -> list[Checkpoint]:
        rows = self._db.execute("SELECT * FROM registry_checkpoints ORDER BY registered_at, id").fetchall()
        return [_checkpoint(r) for r in rows]

    def redirects(self) -> dict[str, str]:
        rows = self._db.execute("SELECT name, target FROM registry_redirects")
        return {r["name"]: r["target"] for r in rows}

    def set_redirect(self, name: str, target: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM registry_redirects WHERE name = ?", (target,))  # served again
            self._db.execute("INSERT OR REPLACE INTO registry_redirects (name, target, created_at) "
                             "VALUES (?, ?, ?)", (name, target, time.time()))

    def drop_redirect(self, name: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM registry_redirects WHERE name = ?", (name,))


def _checkpoint(row: sqlite3.Row) -> Checkpoint:
    return Checkpoint(row["id"], row["path"], row["source"], tuple(json.loads(row["tags"])),
                      json.loads(row["options"]), row["registered_at"])
