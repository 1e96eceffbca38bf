"""The launch's secrets, in 0600 files of the run directory: never on a command line, never in the banner.

Every launch that starts a balancer gives it an admin token (the configured one, else a fresh random one), so
that on a shared machine being on the loopback never suffices to add a worker and receive clients' requests.
The client API key, when set, is written beside it; the balancer reads both through --admin-token-file and
--api-key-file, and the READY banner tells the user which file to read.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from scripts.cluster_config import ClusterConfig

ADMIN_TOKEN_FILE = "admin-token"
API_KEY_FILE = "api-key"


@dataclass(frozen=True)
class Credentials:
    admin_token_file: Path
    api_key_file: Path | None  # None: the balancer takes any client
    written: tuple[Path, ...]  # the files this launch created (removed on stop)

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    @property
    def api_key(self) -> str | None:
        return read_first_line(self.api_key_file) if self.api_key_file is not None else None

    def balancer_flags(self) -> list[str]:
        flags = ["--admin-token-file", str(self.admin_token_file)]
        if self.api_key_file is not None:
            flags += ["--api-key-file", str(self.api_key_file)]
        return flags

    def remove(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)


def remove_files(run_dir: Path) -> None:
    """`scripts/stop.py` on a cluster whose launcher is gone: its secrets go with its run file."""
    for name in (ADMIN_TOKEN_FILE, API_KEY_FILE):
        (run_dir / name).unlink(missing_ok=True)


def write_private(path: Path, text: str) -> None:
    """Create or replace `path` readable by its owner only (the mode is set before any byte is written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT: force it
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_first_line(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    return None


def prepare(cfg: ClusterConfig, run_dir: Path) -> Credentials:
    """Write the admin token (configured or fresh) and the configured API key into `run_dir`."""
    token_file = run_dir / ADMIN_TOKEN_FILE
    write_private(token_file, (cfg.admin_token or secrets.token_urlsafe(32)) + "\n")
    written = [token_file]
    key_file: Path | None = None
    if cfg.api_key is not None:
        key_file = run_dir / API_KEY_FILE
        write_private(key_file, cfg.api_key + "\n")
        written.append(key_file)
    elif cfg.api_key_file is not None:
        key_file = Path(cfg.api_key_file).expanduser().resolve()  # the user's own file, read in place
    return Credentials(token_file, key_file, tuple(written))
