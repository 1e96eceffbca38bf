"""Write one benchmark's named section of `bench/RESULTS.md`, leaving every other section as it was.

A section is delimited by HTML comments (`<!-- bench:NAME -->` … `<!-- /bench:NAME -->`) and starts with the
date, the machine (cores, RAM, CPU model, load) and the exact command, so a reader can reproduce it. Several
benchmarks may finish at once: the read-modify-write holds an exclusive lock and replaces the file atomically.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import psutil

BENCH_DIR = Path(__file__).resolve().parent
# IB_BENCH_RESULTS points a run from another copy of the code (e.g. an exported commit) at the real file.
RESULTS_PATH = Path(os.environ.get("IB_BENCH_RESULTS") or BENCH_DIR / "RESULTS.md")
_HEADER = (
    "# Benchmark results\n\n"
    "Each section is written by its benchmark (`bench/results.py`), which replaces only its own section.\n"
    "Speed figures are single runs on a shared 2-core machine: compare ratios within a section, not across.\n"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """E.g. `2 cores, 23.5 GiB RAM, Intel Xeon …, load avg 1.2 (Linux 6.1, Python 3.11.9)`."""
    ram_gib = psutil.virtual_memory().total / 2**30
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{psutil.cpu_count(logical=True)} cores, {ram_gib:.1f} GiB RAM, {cpu_model()}, "
        f"load avg {load:.1f} at start (Linux {platform.release()}, Python {platform.python_version()})"
    )


def command_line(argv: Sequence[str] | None = None, module: str | None = None) -> str:
    """The command as a user would type it: `python -m bench.x --flag …`."""
    args = list(sys.argv[1:] if argv is None else argv)
    head = f"python -m {module}" if module else shlex.join(["python", sys.argv[0]])
    return " ".join([head, *map(shlex.quote, args)]).strip()


def code_revision() -> str | None:
    """The commit benchmarked (IB_BENCH_REVISION, else `git rev-parse`), marked when the tree is dirty."""
    if os.environ.get("IB_BENCH_REVISION"):
        return os.environ["IB_BENCH_REVISION"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH_DIR,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev} (with uncommitted changes)" if dirty else rev


def render_section(name: str, title: str, body: str, command: str, machine: str | None = None) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    revision = code_revision()
    code = f"- code: {revision}\n" if revision else ""
    return (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"- date: {stamp}\n- machine: {machine or machine_line()}\n{code}- command: `{command}`\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->\n"
    )


def replace_section(document: str, name: str, section: str) -> str:
    """`document` with section `name` replaced by `section` (appended when absent)."""
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->\n.*?<!-- /bench:{re.escape(name)} -->\n?", re.DOTALL
    )
    if pattern.search(document):
        return pattern.sub(lambda _m: section, document, count=1)
    if not document.strip():
        document = _HEADER
    return document.rstrip("\n") + "\n\n" + section


def write_section(
    name: str,
    title: str,
    body: str,
    command: str,
    path: Path = RESULTS_PATH,
    machine: str | None = None,
) -> Path:
    """Replace (or add) section `name` of the results file; returns the file's path."""
    section = render_section(name, title, body, command, machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock lives outside the checkout (nothing to ignore in git); keyed by the results file's path.
    key = zlib.crc32(str(path.resolve()).encode())
    lock_path = Path(tempfile.gettempdir()) / f"ib-results-{key:08x}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = path.read_text() if path.exists() else ""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(replace_section(current, name, section))
        os.replace(tmp, path)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub table; numbers right-aligned."""
    def align(col: int) -> str:
        numeric = all(_NUMERIC.match(_cell(row[col])) for row in rows) if rows else False
        return "---:" if numeric else "---"

    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("| " + " | ".join(align(i) for i in range(len(headers))) + " |")
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


_NUMERIC = re.compile(r"^[+-]?[\d,.]+( ?(x|%|ms|us|s))?$")  # numbers, optionally with a unit: right-aligned


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)
