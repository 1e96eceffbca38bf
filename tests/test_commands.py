"""Command builders, GPU splitting and port picking: what the launcher would run, without running it."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from lb.settings import ConfigError, from_mapping
from scripts import credentials
from scripts.cluster_config import ClusterConfig
from scripts.commands import WorkerSpec, balancer_command, balancer_env, worker_command, worker_env
from scripts.gpus import CPU, parse_gpu_ids, visible_gpus, worker_gpus
from scripts.ports import PortAllocator
from tests.processes import free_port

SPEC = WorkerSpec(index=1, gpus="2", port=8002, host="127.0.0.1")


def config(tmp_path: Path, yaml_text: str) -> ClusterConfig:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    return ClusterConfig.from_yaml(path)


def test_our_worker_command() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "batch_size": 4, "max_wait_time": 0.01,
                                       "served_model_name": "tiny", "engine_args": "--dtype float32"})
    assert worker_command(cfg, SPEC) == [
        sys.executable, "-m", "workers", "--engine", "hf", "--host", "127.0.0.1", "--port", "8002",
        "--model-path", "/m", "--served-model-name", "tiny", "--batch-size", "4", "--max-wait-time", "0.01",
        "--dtype", "float32"]


def test_vllm_command_uses_the_given_python_and_module_entry_point() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "engine": "vllm",
                                       "vllm_python": "/venv/bin/python", "engine_args": "--enforce-eager"})
    assert worker_command(cfg, SPEC) == [
        "/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
        "--host", "127.0.0.1", "--port", "8002", "--enforce-eager"]


def test_vllm_worker_with_two_gpus_gets_tensor_parallel() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "engine": "vllm"})
    argv = worker_command(cfg, WorkerSpec(0, "0,1", 8001, "127.0.0.1"))
    assert argv[-2:] == ["--tensor-parallel-size", "2"]


def test_sglang_command() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "engine": "sglang", "sglang_python": "/sg/python",
                                       "engine_args": "--mem-fraction-static 0.8"})
    assert worker_command(cfg, SPEC) == [
        "/sg/python", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1", "--port",
        "8002", "--mem-fraction-static", "0.8"]


def test_custom_worker_template_fills_placeholders_per_word() -> None:
    template = "srv --port {port} --dev {gpu} --model '{model}' --n {index}"
    cfg = from_mapping(ClusterConfig, {"model_path": "/my models/x", "worker_cmd": template})
    assert worker_command(cfg, SPEC) == ["srv", "--port", "8002", "--dev", "2", "--model", "/my models/x",
                                         "--n", "1"]


@pytest.mark.parametrize("section", ["api_server_args", "server_args"])
def test_yaml_list_and_dict_forms_produce_the_same_command_line(tmp_path: Path, section: str) -> None:
    as_list = config(tmp_path, f"backend: vllm\nmodel: /m\nconfig:\n  {section}: [--max-model-len, 1024, "
                               "--enforce-eager, --dtype, float32]\n")
    as_dict = config(tmp_path, f"backend: vllm\nmodel: /m\nconfig:\n  {section}:\n    max_model_len: 1024\n"
                               "    --enforce-eager: true\n    dtype: float32\n")
    assert worker_command(as_list, SPEC) == worker_command(as_dict, SPEC)
    assert worker_command(as_dict, SPEC)[-5:] == ["--max-model-len", "1024", "--enforce-eager", "--dtype",
                                                  "float32"]


def test_nsys_profile_without_nsys_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = config(tmp_path, "model: /m\nprofile: {enabled: true, tool: nsys}\n")
    with pytest.raises(ConfigError, match="nsys"):
        worker_command(cfg, SPEC)


def test_nsys_profile_prefixes_the_worker_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nsys = tmp_path / "nsys"
    nsys.write_text("#!/bin/sh\n")
    nsys.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    profile = f"{{enabled: true, output_dir: {tmp_path}/p, args: [-t, cuda]}}"
    cfg = config(tmp_path, f"model: /m\nprofile: {profile}\n")
    argv = worker_command(cfg, SPEC)
    assert argv[:6] == [str(nsys), "profile", "-o", f"{tmp_path}/p/worker-1", "-t", "cuda"]
    assert argv[6:9] == [sys.executable, "-m", "workers"]


def test_pytorch_profile_sets_vllms_profiler_dir(tmp_path: Path) -> None:
    cfg = config(tmp_path, f"backend: vllm\nmodel: /m\nprofile: {{enabled: true, tool: pytorch, output_dir: "
                           f"{tmp_path}}}\n")
    assert worker_env(cfg, SPEC, {})["VLLM_TORCH_PROFILER_DIR"] == f"{tmp_path}/worker-1"


def test_worker_env_pins_the_gpu_and_adds_env_vars() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "env_vars": {"A": "1"}})
    env = worker_env(cfg, SPEC, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "PATH": "/bin"})
    assert (env["CUDA_VISIBLE_DEVICES"], env["A"], env["PATH"]) == ("2", "1", "/bin")
    cpu_env = worker_env(cfg, WorkerSpec(0, CPU, 1, "h"), {"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu_env["CUDA_VISIBLE_DEVICES"] == ""


def test_balancer_command() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "policy": "round_robin", "admin_token": "t",
                                       "lb_args": "--max-retries 3", "stop_timeout": 10})
    argv = balancer_command(cfg, 8000, ["http://a:1", "http://b:2"])
    assert argv[:3] == [sys.executable, "-m", "lb"]
    assert argv[argv.index("--workers") + 1] == "http://a:1,http://b:2"
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert argv[argv.index("--drain-timeout") + 1] == "8.0"
    assert argv[-2:] == ["--max-retries", "3"]
    logs = [("balancer", "/r/balancer.log"), ("worker-0", "/r/w0.log")]
    with_logs = balancer_command(cfg, 8000, [], log_files=logs)
    assert with_logs[with_logs.index("--log-file") + 1] == "balancer=/r/balancer.log"
    assert "worker-0=/r/w0.log" in with_logs


def test_balancer_secrets_travel_in_0600_files_not_its_command_line(tmp_path: Path) -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "api_key": "sk-secret", "admin_token": "adm"})
    creds = credentials.prepare(cfg, tmp_path)
    argv = balancer_command(cfg, 8000, [], creds.balancer_flags())
    assert not any("sk-secret" in word or word == "adm" for word in argv)
    assert argv[argv.index("--admin-token-file") + 1] == str(tmp_path / "admin-token")
    assert (tmp_path / "api-key").read_text() == "sk-secret\n" and creds.admin_token == "adm"
    for name in ("admin-token", "api-key"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    # an IB_LB_* secret inherited from the launcher's environment would override the files: it is dropped
    assert balancer_env(cfg, {"IB_LB_ADMIN_TOKEN": "old", "PATH": "/bin"}) == {"PATH": "/bin"}


@pytest.mark.parametrize("engine", ["hf", "fake", "vllm", "sglang"])
def test_no_worker_command_carries_the_launch_secrets(engine: str) -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "engine": engine, "api_key": "sk-secret",
                                       "admin_token": "adm-secret", "vllm_python": "/v/bin/python"})
    argv = " ".join(worker_command(cfg, SPEC))
    assert "sk-secret" not in argv and "adm-secret" not in argv


def test_every_launch_gets_an_admin_token_even_without_one_configured(tmp_path: Path) -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m"})
    first, second = credentials.prepare(cfg, tmp_path / "a"), credentials.prepare(cfg, tmp_path / "b")
    assert len(first.admin_token) >= 32 and first.admin_token != second.admin_token
    assert first.api_key_file is None and "--api-key-file" not in first.balancer_flags()


@pytest.mark.parametrize(("flags", "visible", "expected"), [
    ({"cpu_workers": 3}, ["0", "1"], [CPU, CPU, CPU]),
    ({}, ["0", "1", "2"], ["0", "1", "2"]),
    ({}, [], [CPU, CPU]),
    ({"gpus": 2}, ["4", "5", "6"], ["4", "5"]),
    ({"gpus": 2}, [], ["0", "1"]),
    ({"gpu_ids": "0,2,4,6"}, [], ["0", "2", "4", "6"]),
    ({"gpu_ids": "0,1,2,3", "gpus_per_worker": 2}, [], ["0,1", "2,3"]),
])
def test_gpus_are_split_into_one_value_per_worker(flags: dict[str, object], visible: list[str],
                                                   expected: list[str]) -> None:
    args = {"gpus": None, "gpu_ids": None, "cpu_workers": None, "gpus_per_worker": 1, **flags}
    assert worker_gpus(visible=visible, **args) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "0,0", "0,x", "1,,1"])
def test_bad_gpu_ids_are_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="gpu_ids"):
        parse_gpu_ids(bad)


def test_more_gpus_than_visible_is_an_error() -> None:
    with pytest.raises(ConfigError, match="gpus"):
        worker_gpus(gpus=4, gpu_ids=None, cpu_workers=None, gpus_per_worker=1, visible=["0", "1"])


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_taken_and_skipped_ports_are_skipped_and_reported() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        alloc = PortAllocator("127.0.0.1", frozenset({taken + 2}))
        ports = alloc.take_run(taken, 3, "worker")
    assert taken not in ports and taken + 2 not in ports
    assert ports == sorted(set(ports)) and len(ports) == 3
    reported = f"port {ports[0]} instead of {taken}"
    assert any(reported in line and "taken" in line for line in alloc.substitutions)


def test_free_ports_are_used_as_asked() -> None:
    base = free_port()
    alloc = PortAllocator("127.0.0.1")
    assert alloc.take(base, "balancer") == base and alloc.substitutions == []


def test_amd_profile_without_rocprof_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = config(tmp_path, "model: /m\nprofile: {enabled: true, tool: amd}\n")
    with pytest.raises(ConfigError, match="`rocprof` is not on PATH"):
        worker_command(cfg, SPEC)


def test_amd_profile_prefixes_the_worker_command_with_rocprof(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rocprof = tmp_path / "rocprof"
    rocprof.write_text("#!/bin/sh\n")
    rocprof.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = config(tmp_path, f"model: /m\nprofile: {{enabled: true, tool: amd, output_dir: {tmp_path}/p, "
                           "args: [--hip-trace]}\n")
    argv = worker_command(cfg, SPEC)
    assert argv[:4] == [str(rocprof), "-d", f"{tmp_path}/p/worker-1", "--hip-trace"]
    assert argv[4:7] == [sys.executable, "-m", "workers"]


def test_model_loading_options_reach_our_worker() -> None:
    cfg = from_mapping(ClusterConfig, {"dcp_path": "/ckpt/step-10", "base_model": "/m",
                                       "quantization": "4bit", "trust_remote_code": True,
                                       "attn_implementation": "eager"})
    argv = worker_command(cfg, SPEC)
    assert argv[argv.index("--port") + 2:] == [
        "--trust-remote-code", "--attn-implementation", "eager", "--quantization", "4bit",
        "--dcp-path", "/ckpt/step-10", "--base-model", "/m"]


def test_vllm_gets_trust_remote_code_and_refuses_our_worker_only_options() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "engine": "vllm", "trust_remote_code": True})
    assert "--trust-remote-code" in worker_command(cfg, SPEC)
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "engine": "vllm", "gguf_file": "m.gguf"})
    with pytest.raises(ConfigError, match="only our worker"):
        worker_command(cfg, SPEC)


def test_our_workers_get_the_admin_token_for_model_swaps_in_their_environment() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "admin_token": "t0k"})
    assert worker_env(cfg, SPEC, base={})["IB_WORKER_ADMIN_TOKEN"] == "t0k"
    assert "t0k" not in worker_command(cfg, SPEC)


def test_a_dllm_worker_runs_our_worker_with_its_model_code_trusted() -> None:
    cfg = from_mapping(ClusterConfig, {"model_path": "/m", "engine": "dllm", "trust_remote_code": True,
                                       "engine_args": "--dllm-block-length 8"})
    assert worker_command(cfg, SPEC) == [
        sys.executable, "-m", "workers", "--engine", "dllm", "--host", "127.0.0.1", "--port", "8002",
        "--model-path", "/m", "--trust-remote-code", "--dllm-block-length", "8"]
