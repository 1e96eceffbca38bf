"""Sample a running process with py-spy and say where its time goes (self time per function).

Used by `bench.overhead --py-spy PATH` on the balancer while wrk loads it. py-spy is a separate binary (not a
project dependency): `pip install --target DIR py-spy` and pass DIR/bin/py-spy. Sampling needs ptrace rights
over the target (root, or the same user with ptrace_scope 0).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"(?P<name>.*) \((?P<path>.*):\d+\)$")


def start_recording(
    py_spy: str, pid: int, seconds: float, out: Path, rate: int = 200
) -> subprocess.Popen[bytes]:
    """py-spy record in the background (collapsed stacks to `out`); wait() on the result."""
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(rate),
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _short(frame: str) -> str:
    """`Proxy._relay (lb/proxy.py)` from `Proxy._relay (/any/prefix/lb/proxy.py:212)`."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["path"].split("site-packages/")[-1]
    for package in ("/lb/", "/workers/", "/bench/", "/asyncio/"):
        if package in path:
            path = package.strip("/") + "/" + path.split(package, 1)[1]
            break
    return f"{match['name']} ({path})"


def self_time(raw: Path, top: int = 12) -> tuple[int, list[tuple[float, str]]]:
    """(samples, [(share of samples, function)]) by self time, from py-spy's collapsed-stack output."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        counts[_short(stack.split(";")[-1])] += int(n)
    return total, [(c / total, f) for f, c in counts.most_common(top)] if total else []
