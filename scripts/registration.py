"""Register a healthy worker with a balancer that runs elsewhere (SLURM: the balancer on the first node).

`POST {balancer}/workers {"url": ...}` with the admin token; retried until the deadline, because the balancer
may start after this node's workers. A 409 (already registered) counts as success.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class RegistrationError(RuntimeError):
    """The balancer never accepted the worker before the deadline."""


def register_worker(balancer_url: str, worker_url: str, admin_token: str | None, deadline: float,
                    retry_every: float = 1.0) -> None:
    """`deadline` is a time.monotonic() value."""
    body = json.dumps({"url": worker_url}).encode()
    headers = {"Content-Type": "application/json"}
    if admin_token:
        headers["Authorization"] = f"Bearer {admin_token}"
    target = balancer_url.rstrip("/") + "/workers"
    last_error = "no attempt"
    while True:
        request = urllib.request.Request(target, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                if 200 <= resp.status < 300:
                    return
                last_error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code == 409:
                return
            detail = exc.read().decode(errors="replace")[:300]
            last_error = f"HTTP {exc.code}: {detail}"
            if exc.code in (401, 403, 404):  # wrong token or not a balancer: retrying cannot help
                raise RegistrationError(f"{target} refused {worker_url}: {last_error}") from None
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        if time.monotonic() + retry_every > deadline:
            raise RegistrationError(f"could not register {worker_url} with {target}: {last_error}")
        time.sleep(retry_every)
