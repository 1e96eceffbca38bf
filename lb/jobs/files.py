"""Uploaded and produced files under data_dir/files: uploads are streamed to disk chunk by chunk (a 500 MB
input never sits in memory), written under a temporary name and renamed when complete."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from lb.datastore import data_path
from lb.jobs.errors import FileTooLarge

FILES_DIR = "files"


class FileStore:
    def __init__(self, data_dir: str) -> None:
        self.root = data_path(data_dir)
        self.dir = self.root / FILES_DIR
        self.dir.mkdir(exist_ok=True, mode=0o700)

    def relative(self, file_id: str) -> str:
        return f"{FILES_DIR}/{file_id}.jsonl"

    def path(self, relative: str) -> Path:
        return self.root / relative

    async def save_stream(self, file_id: str, chunks: AsyncIterator[bytes], limit: int) -> int:
        """Write `chunks` to the file's path; FileTooLarge (and nothing left on disk) beyond `limit` bytes.

        Writes are plain blocking writes of <= 64 KiB pieces to a local disk: cheaper than a thread hop each.
        """
        final = self.path(self.relative(file_id))
        partial = final.with_suffix(".part")
        size = 0
        try:
            with open(partial, "wb") as out:  # noqa: ASYNC230 - local disk, small writes (see above)
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise FileTooLarge(
                            f"The file exceeds the limit of {limit} bytes (--batch-max-file-size)."
                        )
                    out.write(chunk)
            partial.rename(final)
        finally:
            partial.unlink(missing_ok=True)
        return size

    def save_lines(self, file_id: str, lines: Iterable[bytes]) -> int:
        """Write an in-memory list of JSONL lines (each without its newline); returns the size in bytes."""
        final = self.path(self.relative(file_id))
        partial = final.with_suffix(".part")
        with open(partial, "wb") as out:
            for line in lines:
                out.write(line + b"\n")
        partial.rename(final)
        return final.stat().st_size

    def delete(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def size(self, relative: str) -> int:
        try:
            return os.stat(self.path(relative)).st_size
        except FileNotFoundError:
            return 0
