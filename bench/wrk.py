"""Drive `wrk` (the C load generator) with a POST body and read its figures back as JSON.

A Python client tops out near 5k req/s on this machine, below what one fake worker serves, so the overhead
benchmark needs wrk to see the balancer's own cost. wrk's Lua `done()` hook prints one JSON line that we
parse; latency percentiles are wrk's, in microseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_MARK = "IBJSON "
_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %(body)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,"err_connect":%%d,"err_read":%%d,' ..
    '"err_write":%%d,"err_status":%%d,"err_timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


class WrkMissingError(RuntimeError):
    """wrk is not installed and could not be installed."""


def ensure_wrk() -> str:
    """Path of `wrk`; installs the Debian package when missing and we are root with apt-get (and says so)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("[overhead] wrk not found: installing the Debian package (apt-get install -y wrk)", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, env=env, capture_output=True)
        found = shutil.which("wrk")
        if found:
            return found
    raise WrkMissingError("wrk is needed (Debian/Ubuntu: apt-get install -y wrk)")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: int  # connect + read + write + non-2xx status + timeout
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def lua_script(body: bytes) -> str:
    # A Lua long string holds any JSON without escaping, as long as it has no "]==]".
    return _LUA % {"body": "[==[" + body.decode() + "]==]", "mark": _MARK}


def run_wrk(
    url: str, body: bytes, connections: int, duration: float, threads: int = 1, timeout: float = 10.0
) -> WrkResult:
    """POST `body` to `url` from `connections` keep-alive connections for `duration` seconds."""
    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="ib-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(lua_script(body))
        args = [
            wrk, "-t", str(min(threads, connections)), "-c", str(connections), "-d", f"{duration:g}s",
            "--timeout", f"{timeout:g}s", "-s", str(script), url,
        ]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    data = json.loads(line[len(_MARK):])
    errors = sum(int(data[k]) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return WrkResult(
        requests=int(data["requests"]), duration_s=data["duration_us"] / 1e6, bytes=int(data["bytes"]),
        errors=errors, p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000, mean_ms=float(data["mean_us"]) / 1000,
    )
