"""BalancerConfig: every setting of `python -m lb`, declared once (CLI flags, YAML keys, IB_LB_* env vars)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

from lb.discovery import parse_ranges
from lb.policies import POLICIES
from lb.settings import ConfigError, load_config, setting

POLICY_NAMES = tuple(POLICIES)
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "IB_LB_"


@dataclasses.dataclass(frozen=True)
class BalancerConfig:
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    workers: tuple[str, ...] = setting(
        (),
        "worker base URLs, comma separated or repeated; may be empty (workers join via POST /workers); "
        "URL@WEIGHT gives a worker WEIGHT times the share of a weight-1 worker (e.g. a faster GPU)",
        metavar="URL[@WEIGHT][,...]",
    )
    workers_file: str | None = setting(
        None, "file with one worker URL[@WEIGHT] per line (# comments allowed)", metavar="FILE"
    )
    policy: str = setting(
        "least_connections",
        "how to pick a backend: round_robin (smooth, weighted), least_connections, power_of_two, "
        "least_tokens (estimated prompt + max_tokens in flight), prefix_affinity (same prompt prefix, same "
        "worker), session (same --session-header or body 'user', same worker); all honour weights",
        choices=POLICY_NAMES,
    )
    affinity_max_load: float = setting(
        1.25,
        "prefix_affinity / session: a key's worker is passed over for the least-loaded one once it carries "
        "more than this x its weighted share of the requests in flight, and 4 more than the least-loaded "
        "(bounded-load consistent hashing)",
    )
    affinity_prefix_chars: int = setting(
        512,
        "prefix_affinity: characters of prompt text (chat roles and contents, in order) that form the key",
    )
    session_header: str = setting(
        "X-Session-ID", "session: the request header holding the session key (else the body's 'user')"
    )
    discover: tuple[str, ...] = setting(
        (),
        "probe HOST:PORT-PORT ranges (or HOST:PORT) in the background and add the workers that answer "
        "/health; they are forgotten when their probes fail --unhealthy-threshold times",
        metavar="HOST:PORT-PORT[,...]",
    )
    discover_skip_ports: tuple[str, ...] = setting(
        (), "ports (or PORT-PORT ranges) --discover never probes", metavar="PORT[,PORT-PORT...]"
    )
    discover_interval: float = setting(30.0, "seconds between --discover scans")
    rate_limit_rpm: int | None = setting(
        None,
        "requests per minute per API key (429 + Retry-After beyond); per-key 'KEY rpm=N tpm=N' lines in "
        "--api-key-file override it",
        metavar="N",
    )
    rate_limit_tpm: int | None = setting(
        None,
        "estimated tokens per minute per API key (body bytes / 4 + max_tokens of each request)",
        metavar="N",
    )
    cache_size: int = setting(
        0,
        "keep this many responses to deterministic requests (temperature 0 or a fixed seed, not streamed) "
        "and answer repeats from memory; 0 turns the cache off",
        metavar="N",
    )
    scale_command: str | None = setting(
        None,
        "auto-scaling hook: run as 'COMMAND DESIRED_WORKERS' when the admission queue stays above "
        "--scale-up-queue (or at most --scale-down-queue) for --scale-window seconds",
        metavar="COMMAND",
    )
    scale_min: int = setting(1, "auto-scaling: fewest workers the hook is asked for")
    scale_max: int = setting(8, "auto-scaling: most workers the hook is asked for")
    scale_up_queue: int = setting(1, "auto-scaling: queued requests at or above which to add a worker")
    scale_down_queue: int = setting(
        0, "auto-scaling: queued requests at or below which (with spare in-flight room) to remove one"
    )
    scale_window: float = setting(30.0, "auto-scaling: seconds a threshold must hold before a decision")
    scale_cooldown: float = setting(120.0, "auto-scaling: seconds after a decision before the next one")
    health_check_interval: float = setting(10.0, "seconds between active /health probes of each worker")
    health_check_timeout: float = setting(2.0, "seconds a /health probe may take before it counts as failed")
    unhealthy_threshold: int = setting(3, "consecutive failed probes that drop a backend")
    healthy_threshold: int = setting(2, "consecutive good probes that re-add a dropped backend")
    connect_timeout: float = setting(5.0, "seconds to open a connection to a worker")
    request_timeout: float = setting(
        300.0,
        "seconds a worker may stay silent (before its headers or between two chunks); "
        "a stream that keeps producing has no total limit",
    )
    max_retries: int = setting(
        2, "retries on a different backend when a worker fails before any byte was sent"
    )
    max_inflight_per_worker: int | None = setting(
        None,
        "cap on concurrent requests per worker; beyond every cap requests wait in the queue",
        metavar="N",
    )
    max_queue: int = setting(1024, "requests that may wait for a free worker before 429")
    queue_timeout: float = setting(30.0, "seconds a request may wait in the queue before 429")
    max_body_size: int = setting(
        16 * 1024 * 1024, "largest request body in bytes (413 beyond)", metavar="BYTES"
    )
    api_key: tuple[str, ...] = setting(
        (), "client key required as 'Authorization: Bearer KEY' (repeatable)", metavar="KEY"
    )
    api_key_file: str | None = setting(None, "file with one accepted client key per line", metavar="FILE")
    admin_token: str | None = setting(
        None,
        "bearer token for POST/DELETE /workers; without it the admin API answers loopback clients only",
        metavar="TOKEN",
    )
    admin_token_file: str | None = setting(
        None,
        "file whose first line is the admin token (keeps it off the command line); the launcher and the "
        "SLURM job always pass one",
        metavar="FILE",
    )
    fast_front: bool = setting(
        True,
        "serve the hot endpoints (chat/completions, completions, embeddings, generate) with the lean "
        "HTTP/1.1 front; everything else, and all of it with --no-fast-front, goes through aiohttp",
    )
    data_dir: str = setting(
        "~/.cache/inference-balancer/data",
        "directory for what the balancer must not lose across restarts: its SQLite database (batches, jobs, "
        "checkpoint registry) and uploaded / output files",
        metavar="DIR",
    )
    batch_max_lines: int = setting(50_000, "most request lines in one batch input file (OpenAI's limit)")
    batch_max_file_size: int = setting(
        512 * 1024 * 1024,
        "largest batch input file in bytes; an upload beyond it is refused (413); uploads are streamed to "
        "disk",
        metavar="BYTES",
    )
    batch_line_retries: int = setting(
        3,
        "retries of a batch line on another worker after a retryable failure (worker died, connect error, "
        "5xx or 429 before any byte)",
    )
    batch_max_inflight_per_worker: int | None = setting(
        None,
        "most batch lines in flight on one worker (default: twice the batch size its /health reports, or 16: "
        "its batch full and as many waiting); while interactive requests arrive, batch lines leave one slot "
        "of the worker's batch free for them",
        metavar="N",
    )
    datasets_dir: str | None = setting(
        None,
        "directory of the JSONL datasets that eval and data-generation jobs name by `dataset_ref` "
        "(default: DATA_DIR/datasets)",
        metavar="DIR",
    )
    drain_timeout: float = setting(30.0, "seconds in-flight requests may take to finish on SIGTERM/SIGINT")
    header_timeout: float = setting(
        10.0, "seconds a client has to send a whole request head, from its first byte (408 after)"
    )
    body_timeout: float = setting(
        60.0,
        "seconds a client has to send a whole request body once its head arrived (408 after); the body is "
        "received before the request takes a worker slot",
    )
    keepalive_timeout: float = setting(
        75.0, "seconds an idle client connection is kept open between requests"
    )
    max_header_size: int = setting(
        64 * 1024,
        "largest request head (request line and all headers) in bytes (431 beyond)",
        metavar="BYTES",
    )
    max_header_line: int = setting(
        16 * 1024, "largest request line or single header line in bytes (431 beyond)", metavar="BYTES"
    )
    max_connections: int = setting(
        4096, "open client connections; a new one above it is answered 503 and closed", metavar="N"
    )
    worker_api_key: str | None = setting(
        None,
        "key sent to workers as 'Authorization: Bearer KEY' in place of the client's credentials; clients' "
        "Authorization / X-API-Key are never forwarded when --api-key is set",
        metavar="KEY",
    )
    model_load_timeout: float = setting(
        900.0, "seconds one worker may take to load a checkpoint during POST /models/set_active"
    )
    log_level: str = setting("info", "logging level", choices=LOG_LEVELS)
    telemetry_interval: float = setting(
        2.0,
        "seconds between background reads of each worker's /metrics, /gpu and /system for /cluster and the "
        "dashboard (each read times out after at most this long)",
    )
    log_file: tuple[str, ...] = setting(
        (),
        "a log GET /logs/NAME may show, as NAME=PATH (repeatable; the launcher passes balancer=... and "
        "worker-N=...); only these files can be read",
        metavar="NAME=PATH",
    )
    otlp_endpoint: str | None = setting(
        None,
        "OpenTelemetry collector (OTLP/HTTP, e.g. http://collector:4318) to export one span per proxied "
        "request to; needs the opentelemetry packages, which are imported only when this is set",
        metavar="URL",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        if self.policy not in POLICY_NAMES:
            raise ConfigError(f"policy: {self.policy!r} is not one of {', '.join(POLICY_NAMES)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        for name in (
            "health_check_interval",
            "health_check_timeout",
            "connect_timeout",
            "request_timeout",
            "queue_timeout",
            "header_timeout",
            "body_timeout",
            "keepalive_timeout",
            "telemetry_interval",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")
        for name in (
            "unhealthy_threshold",
            "healthy_threshold",
            "max_body_size",
            "max_header_size",
            "max_header_line",
            "max_connections",
            "batch_max_lines",
            "batch_max_file_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        for name in ("max_retries", "max_queue", "drain_timeout", "batch_line_retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if self.affinity_max_load < 1:
            raise ConfigError("affinity_max_load: must be >= 1 (1 = perfectly even, no affinity slack)")
        for name in ("affinity_prefix_chars", "scale_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        for name in ("rate_limit_rpm", "rate_limit_tpm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.cache_size < 0:
            raise ConfigError("cache_size: must be >= 0")
        if self.discover_interval <= 0 or self.scale_window <= 0 or self.scale_cooldown < 0:
            raise ConfigError("discover_interval and scale_window must be > 0, scale_cooldown >= 0")
        parse_ranges(self.discover, self.discover_skip_ports)  # ConfigError naming a bad range
        if self.scale_max < self.scale_min:
            raise ConfigError(f"scale_max: {self.scale_max} is below scale_min {self.scale_min}")
        if self.scale_down_queue >= self.scale_up_queue:
            raise ConfigError("scale_down_queue: must be below scale_up_queue")
        if self.batch_max_inflight_per_worker is not None and self.batch_max_inflight_per_worker < 1:
            raise ConfigError("batch_max_inflight_per_worker: must be >= 1")
        if self.max_inflight_per_worker is not None and self.max_inflight_per_worker < 1:
            raise ConfigError("max_inflight_per_worker: must be >= 1")
        for url in self.workers:
            _worker_spec("workers", url)
        self.worker_urls()  # unreadable --workers-file / --api-key-file: fail at load, naming the key
        self.api_keys()
        self.key_limits()
        self.admin_secret()
        self.log_files()
        if self.otlp_endpoint is not None:
            _check_url("otlp_endpoint", self.otlp_endpoint)
            if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
                raise ConfigError(
                    "otlp_endpoint: needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http"
                )

    def worker_urls(self) -> list[str]:
        """--workers followed by the lines of --workers-file, normalised, without duplicates."""
        return [url for url, _ in self.worker_specs()]

    def worker_specs(self) -> list[tuple[str, float]]:
        """(url, weight) of --workers then --workers-file; the first mention of a URL wins."""
        specs = [_worker_spec("workers", item) for item in self.workers]
        if self.workers_file:
            specs += [
                _worker_spec("workers_file", line) for line in _read_lines("workers_file", self.workers_file)
            ]
        out: dict[str, float] = {}
        for url, weight in specs:
            out.setdefault(url, weight)
        return list(out.items())

    def api_keys(self) -> tuple[str, ...]:
        keys = list(self.api_key)
        if self.api_key_file:
            keys += [line.split()[0] for line in _read_lines("api_key_file", self.api_key_file)]
        return tuple(keys)

    def admin_secret(self) -> str | None:
        """The admin token: --admin-token, else the first line of --admin-token-file; None means the admin
        API answers loopback clients only."""
        if self.admin_token is not None:
            return self.admin_token
        if self.admin_token_file:
            lines = _read_lines("admin_token_file", self.admin_token_file)
            if not lines:
                raise ConfigError(f"admin_token_file: {self.admin_token_file} holds no token")
            return lines[0]
        return None

    def key_limits(self) -> dict[str, tuple[int | None, int | None]]:
        """Per-key (rpm, tpm) from `KEY rpm=N tpm=N` lines of --api-key-file; others use the flags."""
        out: dict[str, tuple[int | None, int | None]] = {}
        if not self.api_key_file:
            return out
        for line in _read_lines("api_key_file", self.api_key_file):
            key, *options = line.split()
            limits = {"rpm": self.rate_limit_rpm, "tpm": self.rate_limit_tpm}
            for option in options:
                name, _, value = option.partition("=")
                if name not in limits or not value.isdigit() or int(value) < 1:
                    raise ConfigError(
                        f"api_key_file: {option!r} after a key: expected rpm=N or tpm=N with N >= 1"
                    )
                limits[name] = int(value)
            if options:
                out[key] = (limits["rpm"], limits["tpm"])
        return out

    def log_files(self) -> dict[str, str]:
        """--log-file NAME=PATH entries as a table (names of letters, digits, '-', '_', '.')."""
        table: dict[str, str] = {}
        for entry in self.log_file:
            name, sep, path = entry.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not _LOG_NAME.match(name) or not path:
                raise ConfigError(f"log_file: {entry!r} is not NAME=PATH (NAME of letters, digits, - _ .)")
            table[name] = path
        return table


def _worker_spec(key: str, item: str) -> tuple[str, float]:
    """`http://host:port[@weight]` -> (url, weight); an '@' followed by a number is the weight."""
    url, weight = item.strip(), 1.0
    head, sep, tail = url.rpartition("@")
    if sep and "/" not in tail and ":" not in tail and _is_number(tail):
        weight = float(tail)
        if not 0 < weight <= 1000:
            raise ConfigError(f"{key}: {item!r}: the weight must be > 0 and <= 1000")
        url = head
    return _check_url(key, url), weight


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_LOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_url(key: str, url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{key}: {url!r} is not an http(s) URL")
    return url


def _read_lines(key: str, path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load(argv: list[str] | None = None) -> BalancerConfig:
    return load_config(
        BalancerConfig,
        argv,
        prog="python -m lb",
        env_prefix=ENV_PREFIX,
        description="One OpenAI-compatible port in front of N inference workers: routing policies, health "
        "checks, retries, a bounded queue, /stats, /metrics and an admin API to add or drain workers.",
    )
