"""Engines behind one protocol (`base.Engine`), chosen by name; optional ones are imported only when chosen.

Adding an engine = one builder function here plus its module. A future in-process vLLM engine would plug in
as `"vllm": _build_vllm`, importing `vllm` inside the builder and adapting `LLMEngine.step()` outputs to
`TokenEvent`s (the seam is already step-shaped: add, step, abort). External servers (vLLM, SGLang) are not
engines: the launcher runs them as workers behind the same HTTP contract.
"""

from __future__ import annotations

from collections.abc import Callable

from lb.settings import ConfigError
from workers.config import WorkerConfig
from workers.engines.base import Engine
from workers.engines.fake import DEFAULT_MAX_MODEL_LEN, FakeEngine


def _build_fake(config: WorkerConfig) -> Engine:
    return FakeEngine(
        served_model_name=config.model_name,
        max_model_len=config.max_model_len or DEFAULT_MAX_MODEL_LEN,
        max_num_seqs=config.batch_size,
        load_latency=config.fake_load_latency,
        prefill_latency=config.fake_prefill_latency,
        step_latency=config.fake_step_latency,
        per_seq_latency=config.fake_per_seq_latency,
    )


def _build_hf(config: WorkerConfig) -> Engine:
    try:
        from workers.engines.hf import HFEngine
        from workers.engines.hf_loading import LoadSpec
    except ImportError as exc:  # torch / transformers are the optional `hf` extra
        raise ConfigError(
            f"engine: 'hf' needs torch and transformers ({exc}); install them with "
            "`pip install 'inference-balancer[hf]'` or use --engine fake"
        ) from exc
    spec = LoadSpec.from_config(config)
    return HFEngine(
        str(spec.architecture_dir),
        served_model_name=config.model_name,
        device=config.device,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        load_spec=spec,
    )


def _build_dllm(config: WorkerConfig) -> Engine:
    try:
        from workers.engines.dllm import DllmEngine
        from workers.engines.dllm_schedule import DiffusionDefaults
    except ImportError as exc:
        raise ConfigError(
            f"engine: 'dllm' needs torch and transformers ({exc}); install them with "
            "`pip install 'inference-balancer[hf]'`"
        ) from exc
    assert config.model_path is not None  # WorkerConfig requires it for dllm
    defaults = DiffusionDefaults(
        gen_length=config.dllm_gen_length, block_length=config.dllm_block_length, steps=config.dllm_steps,
        algorithm=config.dllm_algorithm, threshold=config.dllm_threshold, cfg_scale=config.dllm_cfg_scale,
    )
    return DllmEngine(
        config.model_path, served_model_name=config.model_name, device=config.device, dtype=config.dtype,
        max_model_len=config.max_model_len, defaults=defaults, mask_token_id=config.mask_token_id,
        trust_remote_code=config.trust_remote_code, max_num_seqs=config.batch_size,
    )


ENGINE_BUILDERS: dict[str, Callable[[WorkerConfig], Engine]] = {
    "fake": _build_fake, "hf": _build_hf, "dllm": _build_dllm,
}


def create_engine(config: WorkerConfig) -> Engine:
    """The engine named by `config.engine`, built but not loaded (`load()` is slow: call it off-loop)."""
    try:
        builder = ENGINE_BUILDERS[config.engine]
    except KeyError:
        known = ", ".join(ENGINE_BUILDERS)
        raise ConfigError(f"engine: unknown engine {config.engine!r}; known: {known}") from None
    return builder(config)
