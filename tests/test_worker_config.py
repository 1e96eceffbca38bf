"""WorkerConfig: flags, YAML and IB_WORKER_* variables fill one frozen dataclass; bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.settings import ConfigError, from_mapping, load_config
from workers.config import ENV_PREFIX, WorkerConfig, load_worker_config
from workers.engines import create_engine
from workers.engines.fake import FakeEngine


def load(argv: list[str], environ: dict[str, str] | None = None) -> WorkerConfig:
    return load_config(WorkerConfig, argv, prog="test", description="", env_prefix=ENV_PREFIX,
                       environ=environ or {})


def test_defaults_bind_localhost_and_fake_needs_no_model() -> None:
    config = load(["--engine", "fake"])
    assert (config.host, config.port, config.batch_size, config.max_queue) == ("127.0.0.1", 8001, 8, 256)
    assert config.model_name == "fake-model"


def test_served_name_defaults_to_the_model_directory(tmp_path: Path) -> None:
    config = load(["--model-path", str(tmp_path / "my-model")])
    assert config.engine == "hf"
    assert config.model_name == "my-model"
    assert load(["--model-path", str(tmp_path), "--served-model-name", "x"]).model_name == "x"


def test_flag_beats_environment_beats_yaml_beats_default(tmp_path: Path) -> None:
    yaml_file = tmp_path / "worker.yaml"
    yaml_file.write_text("engine: fake\nbatch_size: 4\nmax_queue: 10\nfake-step-latency: 0.5\n")
    config = load(["--config", str(yaml_file), "--batch-size", "2"],
                  environ={"IB_WORKER_BATCH_SIZE": "3", "IB_WORKER_MAX_QUEUE": "20"})
    assert (config.batch_size, config.max_queue, config.fake_step_latency) == (2, 20, 0.5)


@pytest.mark.parametrize(("values", "key"), [
    ({"engine": "hf"}, "model_path"),
    ({"engine": "fake", "batch_size": 0}, "batch_size"),
    ({"engine": "fake", "max_queue": 0}, "max_queue"),
    ({"engine": "fake", "port": 70000}, "port"),
    ({"engine": "fake", "max_wait_time": -1}, "max_wait_time"),
    ({"engine": "fake", "fake_step_latency": -0.1}, "fake_step_latency"),
    ({"engine": "fake", "max_model_len": 1}, "max_model_len"),
    ({"engine": "fake", "batch_size": "many"}, "batch_size"),
    ({"engine": "fake", "colour": "red"}, "colour"),
])
def test_bad_settings_name_their_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        from_mapping(WorkerConfig, values)


def test_fake_engine_takes_its_latency_model_from_the_config() -> None:
    config = load_worker_config(["--engine", "fake", "--batch-size", "5", "--fake-step-latency", "0.01",
                                 "--fake-per-seq-latency", "0.002", "--max-model-len", "128"])
    engine = create_engine(config)
    assert isinstance(engine, FakeEngine)
    assert (engine.max_num_seqs, engine.step_latency, engine.per_seq_latency) == (5, 0.01, 0.002)
    assert engine.info.max_model_len == 128
