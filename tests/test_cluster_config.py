"""The launcher's configuration: flags, env, our YAML keys and the seed YAML format fill one ClusterConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.settings import ConfigError
from scripts.cluster_config import ClusterConfig, load_cluster_config
from scripts.seed_yaml import server_args


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_flags_fill_the_config() -> None:
    cfg = load_cluster_config(["--model-path", "/m", "--gpu-ids", "0,2", "--engine", "vllm", "--port", "9000",
                               "--skip-ports", "5003,5004", "--skip-ports", "5005"], environ={})
    assert (cfg.model_path, cfg.gpu_ids, cfg.engine, cfg.port) == ("/m", "0,2", "vllm", 9000)
    assert cfg.skip_port_numbers == {5003, 5004, 5005}


def test_words_after_double_dash_become_engine_args() -> None:
    argv = ["--model-path", "/m", "--engine-args=--dtype float32", "--", "--enforce-eager"]
    cfg = load_cluster_config(argv, environ={})
    assert cfg.engine_arg_list == ["--dtype", "float32", "--enforce-eager"]


def test_environment_variables_fill_the_config_and_flags_win() -> None:
    env = {"IB_CLUSTER_CPU_WORKERS": "3", "IB_CLUSTER_PORT": "7000"}
    cfg = load_cluster_config(["--model-path", "/m", "--port", "7100"], environ=env)
    assert (cfg.cpu_workers, cfg.port) == (3, 7100)


def test_env_vars_accept_words_or_json() -> None:
    words = load_cluster_config(["--model-path", "/m", "--env-vars", "A=1 B='x y'"], environ={})
    as_json = load_cluster_config(["--model-path", "/m", "--env-vars", '{"A": 1, "B": "x y"}'], environ={})
    assert dict(words.env_vars or {}) == dict(as_json.env_vars or {}) == {"A": "1", "B": "x y"}


@pytest.mark.parametrize(("argv", "named"), [
    (["--gpus", "2", "--cpu-workers", "2"], "gpus and cpu_workers"),
    (["--cpu-workers", "0"], "cpu_workers"),
    (["--port", "70000"], "port"),
    (["--skip-ports", "80,abc"], "skip_ports"),
    (["--env-vars", "NOEQUALS"], "env_vars"),
    (["--startup-timeout", "0"], "startup_timeout"),
])
def test_bad_values_name_the_key(argv: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_cluster_config(["--model-path", "/m", *argv], environ={})


def test_model_path_is_required_except_for_fake_workers() -> None:
    with pytest.raises(ConfigError, match="model_path"):
        load_cluster_config(["--engine", "hf"], environ={})
    assert load_cluster_config(["--engine", "fake"], environ={}).model_path is None


def test_seed_yaml_format_is_translated(tmp_path: Path) -> None:
    path = write(tmp_path, """
backend: vllm
model: /models/tiny
port: 9100
output_dir: /tmp/out
env_vars: {VLLM_CPU_KVCACHE_SPACE: 1, HF_HUB_OFFLINE: "1"}
config:
  api_server_args: {max_model_len: 1024, enforce_eager: true}
profile: {enabled: false, tool: pytorch, output_dir: /tmp/prof, args: [--trace, cuda]}
batching: {batch_size: 4, max_wait_time: 0.02}
cpu_workers: 2
policy: round_robin
""")
    cfg = load_cluster_config(["--config", str(path)], environ={})
    assert (cfg.engine, cfg.model_path, cfg.port, cfg.log_dir) == ("vllm", "/models/tiny", 9100, "/tmp/out")
    assert dict(cfg.env_vars or {}) == {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    assert cfg.engine_arg_list == ["--max-model-len", "1024", "--enforce-eager"]
    profile = (cfg.profile_tool, cfg.profile_output_dir, cfg.profile_args)
    assert profile == ("pytorch", "/tmp/prof", "--trace cuda")
    assert (cfg.batch_size, cfg.max_wait_time, cfg.cpu_workers, cfg.policy) == (4, 0.02, 2, "round_robin")


def test_flags_override_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "model: /m\nport: 9100\n")
    assert load_cluster_config(["--config", str(path), "--port", "9200"], environ={}).port == 9200


@pytest.mark.parametrize(("text", "named"), [
    ("model: /m\nbogus_key: 1\n", "bogus_key"),
    ("model: /m\nconfig: {api_server_arg: []}\n", "config.api_server_arg"),
    ("model: /m\nprofile: {enabled: true, tool: perf}\n", "profile_tool"),
    ("model: /m\nbatching: {batch_size: many}\n", "batch_size"),
    ("model: /m\nconfig: {api_server_args: 5}\n", "config.api_server_args"),
    ("model: /m\nenv_vars: [A, B]\n", "env_vars"),
])
def test_bad_yaml_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_cluster_config(["--config", str(write(tmp_path, text))], environ={})


def test_from_yaml_with_overrides(tmp_path: Path) -> None:
    cfg = ClusterConfig.from_yaml(write(tmp_path, "backend: fake\ncpu_workers: 2\n"), port=9300)
    assert (cfg.engine, cfg.cpu_workers, cfg.port) == ("fake", 2, 9300)


@pytest.mark.parametrize(("as_list", "as_dict"), [
    (["--max-model-len", "1024", "--enforce-eager"], {"max_model_len": 1024, "enforce_eager": True}),
    (["--max-model-len", "1024"], {"--max-model-len": 1024, "disable_log_stats": False}),
    (["--tensor-parallel-size", "2"], {"tensor-parallel-size": 2}),
    (["--override-generation-config", '{"temperature": 0}'],
     {"override_generation_config": {"temperature": 0}}),
    (["--middleware", "a", "b"], {"middleware": ["a", "b"]}),
])
def test_server_args_list_and_dict_forms_agree(as_list: list[str], as_dict: dict[str, object]) -> None:
    assert server_args(as_list, "k") == server_args(as_dict, "k") == as_list
