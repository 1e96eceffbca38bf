"""The single-server Python API: command lines per backend and config form, profilers, a custom subclass,
the heartbeat, and stop's proof (by pid, process group and environment marker) that nothing is left."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from lb.settings import ConfigError
from scripts.server import InferenceServer, ServerStartError
from scripts.server_backends import SGLangServer, VLLMServer, WorkerServer
from scripts.server_config import create_server, load_server_config, server_from_config
from tests.processes import free_port

VLLM_ARGS_DICT = {"enforce_eager": True, "max-model-len": 1024, "dtype": "float32",
                  "override-generation-config": {"temperature": 0}}
VLLM_ARGS_LIST = ["--enforce-eager", "--max-model-len", 1024, "--dtype", "float32",
                  "--override-generation-config", '{"temperature": 0}']
VLLM_ARGS_MIXED = ["--enforce-eager", {"max_model_len": 1024, "dtype": "float32"},
                   {"override_generation_config": {"temperature": 0}}]


def vllm_command(config: object) -> list[str]:
    server = VLLMServer("/models/m", port=8100, python="/venv/bin/python",
                        config={"api_server_args": config})
    return server.get_launch_command()


def test_vllm_command_is_the_same_from_list_dict_and_mixed_arguments() -> None:
    expected = ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/m",
                "--host", "127.0.0.1", "--port", "8100", "--enforce-eager", "--max-model-len", "1024",
                "--dtype", "float32", "--override-generation-config", '{"temperature": 0}']
    assert vllm_command(VLLM_ARGS_LIST) == expected
    assert vllm_command(VLLM_ARGS_DICT) == expected
    assert vllm_command(VLLM_ARGS_MIXED) == expected


def test_create_server_and_yaml_in_list_and_dict_form_give_the_same_command(tmp_path: Path) -> None:
    direct = vllm_command(VLLM_ARGS_DICT)
    made = create_server("vllm", "/models/m", port=8100, python="/venv/bin/python",
                         config={"api_server_args": VLLM_ARGS_DICT})
    assert made.get_launch_command() == direct
    assert made.get_backend_name() == "vllm" and made.get_health_endpoint() == "/health"
    for name, args in (("dict", "{enforce_eager: true, max-model-len: 1024, dtype: float32, "
                                "override-generation-config: {temperature: 0}}"),
                       ("list", "[--enforce-eager, --max-model-len, 1024, --dtype, float32, "
                                "--override-generation-config, '{\"temperature\": 0}']")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"backend: vllm\nmodel: /models/m\nport: 8100\npython: /venv/bin/python\n"
                        f"output_dir: {tmp_path}/logs\nconfig:\n  api_server_args: {args}\n")
        assert load_server_config(path)["backend"] == "vllm"
        assert server_from_config(path).get_launch_command() == direct, name


def test_sglang_command_is_the_documented_one() -> None:
    server = SGLangServer("/models/m", port=30000, python="/sg/bin/python",
                          config={"server_args": {"tp_size": 2, "mem_fraction_static": 0.8}})
    assert server.get_launch_command() == [
        "/sg/bin/python", "-m", "sglang.launch_server", "--model-path", "/models/m", "--host", "127.0.0.1",
        "--port", "30000", "--tp-size", "2", "--mem-fraction-static", "0.8"]
    assert server.list_endpoints()[0] == "http://127.0.0.1:30000/health"


@pytest.mark.parametrize(("make", "message"), [
    (lambda: create_server("tgi", "/m"), "backend: 'tgi' is not one of"),
    (lambda: VLLMServer(None).get_launch_command(), "model: required for the vllm backend"),
    (lambda: VLLMServer("/m", config={"api_args": []}), "unknown key config.api_args"),
    (lambda: VLLMServer("/m", heartbeat_timeout=0), "heartbeat_timeout: must be > 0"),
    (lambda: WorkerServer("/m", engine="llama"), "engine: 'llama' is not one of hf, dllm, fake"),
    (lambda: VLLMServer("/m", profile={"tool": "perf"}), "profile.tool: 'perf' is not one of"),
])
def test_bad_settings_are_errors_naming_the_key(make: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make()  # type: ignore[operator]


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("backend: vllm\nmodel: /m\nbatching: {batch_size: 8}\n")
    with pytest.raises(ConfigError, match="unknown key batching"):
        load_server_config(path)


def test_amd_profiler_missing_is_a_clear_error_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    server = WorkerServer(engine="fake", port=free_port(), output_dir=tmp_path,
                          profile={"enabled": True, "tool": "amd"})
    with pytest.raises(ConfigError, match="`rocprof` is not on PATH"):
        server.start()
    assert server.pid is None and not server.log_path.exists()  # nothing was started


def test_amd_profiler_prefixes_the_command_with_rocprof_and_its_args(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rocprof = bin_dir / "rocprof"
    rocprof.write_text("#!/bin/sh\n# stand-in: drop the profiler's own options, run the program\n"
                       "while [ \"$1\" != \"--\" ]; do shift; done; shift; exec \"$@\"\n")
    rocprof.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    server = WorkerServer(engine="fake", port=free_port(), output_dir=tmp_path / "logs",
                          profile={"enabled": True, "tool": "amd", "output_dir": tmp_path / "prof",
                                   "args": ["--hip-trace", "--"]})
    prefix = [str(rocprof), "-d", str(tmp_path / "prof" / server.name), "--hip-trace", "--"]
    with server:  # the stand-in runs the worker, so the prefixed command really starts and serves
        assert server.process is not None and server.process.argv[:5] == prefix
        assert server.process.argv[5:] == server.get_launch_command()
        assert server.check_health()


class OwnWorker(InferenceServer):
    """A backend of one's own, written as the README shows: our worker with the fake engine."""

    backend_name = "own-worker"

    def get_binary_path(self) -> str:
        return sys.executable

    def get_launch_command(self) -> list[str]:
        return [self.get_binary_path(), "-m", "workers", "--engine", "fake", "--served-model-name", "own",
                "--host", self.host, "--port", str(self.port), *self.server_arguments()]

    def get_health_endpoint(self) -> str:
        return "/health"

    def list_endpoints(self) -> list[str]:
        return [self.url + path for path in ("/health", "/v1/models", "/v1/chat/completions")]


def test_custom_subclass_serves_and_stops_with_nothing_left(tmp_path: Path) -> None:
    server = OwnWorker(port=free_port(), output_dir=tmp_path, debug_mode=True,
                       config={"server_args": {"batch_size": 4}})
    with server:
        client = OpenAI(base_url=server.openai_base_url, api_key="none", timeout=30)
        reply = client.chat.completions.create(model="own", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.choices[0].message.content
        for url in server.list_endpoints():  # each listed URL answers (GET on a POST route is a 405)
            import urllib.error
            import urllib.request

            try:
                status = urllib.request.urlopen(url, timeout=5).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status in (200, 405), url
        pid = server.pid
        assert pid is not None and server.healthy
    report = server.stop_report
    assert report is not None and report.clean and report.checked >= 1, report
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not server.healthy


def test_debug_mode_finds_an_orphan_that_escaped_the_process_group(tmp_path: Path) -> None:
    class Leaky(OwnWorker):
        def get_launch_command(self) -> list[str]:
            # a subshell double-forks a sleeper into its own session (not a descendant, not in the group)
            return ["sh", "-c", "(setsid sleep 300 &); exec \"$0\" \"$@\"", *super().get_launch_command()]

    server = Leaky(port=free_port(), output_dir=tmp_path, debug_mode=True)
    with server:
        pass
    report = server.stop_report
    assert report is not None and not report.clean
    try:
        assert len(report.orphans) == 1
        assert psutil.Process(report.orphans[0]).cmdline() == ["sleep", "300"]
        assert "orphans carrying its id" in report.describe()
    finally:
        for pid in report.orphans:
            os.kill(pid, signal.SIGKILL)


def test_heartbeat_reports_unhealthy_after_the_timeout_and_recovers(tmp_path: Path) -> None:
    calls: list[bool] = []
    server = WorkerServer(engine="fake", port=free_port(), output_dir=tmp_path, heartbeat_interval=0.2,
                          heartbeat_timeout=1.0, on_unhealthy=lambda s: calls.append(s.healthy))
    with server:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)  # alive but silent: probes time out
        try:
            time.sleep(0.6)
            assert server.healthy and not calls  # within the timeout a missed probe is tolerated
            deadline = time.monotonic() + 10
            while server.healthy and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not server.healthy and calls == [False]
        finally:
            os.kill(server.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not server.healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.healthy and calls == [False]


def test_a_server_that_exits_during_start_up_raises_with_its_log(tmp_path: Path) -> None:
    server = WorkerServer(tmp_path / "no-such-model", engine="hf", port=free_port(), output_dir=tmp_path,
                          startup_timeout=60)
    with pytest.raises(ServerStartError, match="exited with code"):
        server.start()
    assert server.stop_report is not None and server.stop_report.clean


def test_the_readme_custom_backend_example_runs(tmp_path: Path) -> None:
    import re
    import subprocess

    from tests.processes import REPO_ROOT, test_env

    readme = (REPO_ROOT / "README.md").read_text()
    code = re.search(r"<!-- custom-server-example -->\n```python\n(.*?)```", readme, re.S)
    assert code is not None
    port = free_port()
    source = code.group(1).replace("port=8123", f"port={port}").replace("/tmp/my-server-logs", str(tmp_path))
    result = subprocess.run([sys.executable, "-c", source], env=test_env(), capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert f"True ['http://127.0.0.1:{port}/health'" in result.stdout
    assert "verified by pid: none of the" in result.stdout
