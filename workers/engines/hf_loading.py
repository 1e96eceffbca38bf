"""How the transformers engine gets its model and tokenizer: checkpoints as researchers hold them, local only.

A `LoadSpec` names one of three sources: a `save_pretrained` directory, a GGUF file inside a directory
(`gguf_file`), or a `torch.distributed.checkpoint` directory (`dcp_path`) whose tensors fill the architecture
of a base model directory (`base_model`), the way training frameworks save sharded checkpoints. Options that
cannot apply here (bitsandbytes without CUDA, flash-attention without its package or a GPU, custom code
without `trust_remote_code`, a directory that holds no model) fail in `check()` with a `LoadError` that says
what to change, before anything slow happens. Nothing here downloads: every path must be a local directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.config import ATTN_IMPLEMENTATIONS, QUANTIZATIONS, WorkerConfig

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class LoadError(ValueError):
    """The model cannot be loaded as asked; the message names the option or path to change."""


@dataclass(frozen=True)
class LoadSpec:
    """What to load and how. `model_path` may be None only for a DCP checkpoint (its base gives the rest)."""

    model_path: str | None
    gguf_file: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "auto"
    quantization: str = "none"
    dcp_path: str | None = None
    base_model: str | None = None

    @property
    def architecture_dir(self) -> Path:
        """The directory whose config.json and tokenizer define the model."""
        source = self.base_model if self.dcp_path else self.model_path
        assert source is not None  # check() guarantees it
        return Path(source).expanduser()

    @classmethod
    def from_config(cls, config: WorkerConfig) -> LoadSpec:
        return cls(config.model_path, gguf_file=config.gguf_file, trust_remote_code=config.trust_remote_code,
                   attn_implementation=config.attn_implementation, quantization=config.quantization,
                   dcp_path=config.dcp_path, base_model=config.base_model)

    def describe(self) -> str:
        if self.dcp_path:
            return f"DCP checkpoint {self.dcp_path} on base model {self.base_model}"
        if self.gguf_file:
            return f"GGUF file {self.gguf_file} in {self.model_path}"
        return str(self.model_path)


def check(spec: LoadSpec, device: torch.device) -> None:
    """Raise LoadError if `spec` cannot load on `device`; cheap (reads directory listings and config.json)."""
    if spec.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise LoadError(f"attn_implementation: must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if spec.quantization not in QUANTIZATIONS:
        raise LoadError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}")
    if spec.dcp_path:
        _check_dcp(spec)
    elif not spec.model_path:
        raise LoadError("model_path: required (or --dcp-path with --base-model)")
    else:
        _require_dir("model_path", spec.model_path)
    if spec.gguf_file:
        _check_gguf(spec)
    else:
        _check_model_dir(spec.architecture_dir, "base_model" if spec.dcp_path else "model_path",
                         weights=not spec.dcp_path)
        _check_remote_code(spec)
    if spec.quantization != "none":
        if device.type != "cuda":
            raise LoadError(f"quantization: {spec.quantization} loading uses bitsandbytes, which needs a "
                            f"CUDA device; this worker runs on {device.type} (use --quantization none)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise LoadError(f"quantization: {spec.quantization} needs the bitsandbytes package "
                            "(`pip install bitsandbytes`)")
    if spec.attn_implementation == "flash_attention_2":
        if device.type != "cuda":
            raise LoadError("attn_implementation: flash_attention_2 needs a CUDA device; this worker runs on "
                            f"{device.type} (use sdpa or eager)")
        if importlib.util.find_spec("flash_attn") is None:
            raise LoadError("attn_implementation: flash_attention_2 needs the flash-attn package "
                            "(`pip install flash-attn`), or use sdpa")


def load_model(spec: LoadSpec, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model on `device` in eval mode, tokenizer). Slow: run it off the event loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check(spec, device)
    source = str(spec.architecture_dir)
    common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        common["gguf_file"] = spec.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    kwargs: dict[str, Any] = dict(common, dtype=dtype)
    if spec.attn_implementation != "auto":
        kwargs["attn_implementation"] = spec.attn_implementation
    placed = spec.quantization != "none"
    if placed:
        from transformers import BitsAndBytesConfig

        bits = {"load_in_8bit": True} if spec.quantization == "8bit" else {"load_in_4bit": True}
        kwargs["quantization_config"] = BitsAndBytesConfig(**bits)  # type: ignore[no-untyped-call]
        kwargs["device_map"] = {"": device.index or 0}  # bitsandbytes places the weights itself
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if spec.dcp_path:
        load_dcp_weights(model, Path(spec.dcp_path).expanduser())
    if not placed:
        model = model.to(device)  # type: ignore[arg-type]
    log.info("loaded %s (attention %s, quantization %s)", spec.describe(),
             getattr(model.config, "_attn_implementation", "?"), spec.quantization)
    return model.eval(), tokenizer  # type: ignore[no-untyped-call]


def load_dcp_weights(model: Any, dcp_dir: Path) -> None:
    """Overwrite `model`'s parameters in place with a `torch.distributed.checkpoint` directory's tensors.

    Training frameworks save either the bare state dict or one nested under "model" ({"model": sd, "optim":
    ...}); both are recognised from the checkpoint's metadata. Tied weights may be stored once.
    """
    from torch.distributed.checkpoint import FileSystemReader  # type: ignore[attr-defined]
    from torch.distributed.checkpoint import load as dcp_load  # type: ignore[attr-defined]

    stored = set(FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata)
    state = model.state_dict()
    tied = _tied_names(model)
    wanted = {k: v for k, v in state.items() if k not in tied or k in stored}
    if all(k in stored for k in wanted):
        target: dict[str, Any] = wanted
    elif all(f"model.{k}" in stored for k in wanted):
        target = {"model": wanted}
    else:
        missing = sorted(k for k in wanted if k not in stored and f"model.{k}" not in stored)
        raise LoadError(f"dcp_path: {dcp_dir} does not fit the base model's architecture: {len(missing)} of "
                        f"{len(wanted)} tensors missing (e.g. {', '.join(missing[:3])})")
    dcp_load(target, checkpoint_id=str(dcp_dir))  # no process group: a single-process load
    model.load_state_dict(wanted, strict=False)  # the tensors were filled in place; this re-ties pointers
    log.info("filled %d tensors from the DCP checkpoint %s", len(wanted), dcp_dir)


def _tied_names(model: Any) -> set[str]:
    """Parameter names that share storage with an earlier one (e.g. lm_head tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr()
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def _require_dir(key: str, path: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise LoadError(f"{key}: {path!r} is not a directory (only local paths are loaded; nothing is "
                        "downloaded)")
    return directory


def _check_model_dir(directory: Path, key: str, *, weights: bool) -> None:
    if not (directory / "config.json").is_file():
        raise LoadError(f"{key}: {directory} holds no model (no config.json; expected a save_pretrained "
                        "directory)")
    if weights and not any((directory / name).is_file() for name in WEIGHT_FILES) and not any(
        directory.glob("model-*.safetensors")
    ):
        raise LoadError(f"{key}: {directory} holds no weights (no model.safetensors or pytorch_model.bin)")


def _check_gguf(spec: LoadSpec) -> None:
    assert spec.model_path is not None
    path = Path(spec.model_path).expanduser() / spec.gguf_file  # type: ignore[operator]
    if not path.is_file():
        raise LoadError(f"gguf_file: {spec.gguf_file!r} is not a file in {spec.model_path}")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise LoadError(f"gguf_file: loading GGUF needs the {package} package (`pip install {package}`)")


def _check_dcp(spec: LoadSpec) -> None:
    assert spec.dcp_path is not None
    if not spec.base_model:
        raise LoadError("base_model: required with --dcp-path (the directory whose config.json and tokenizer "
                        "the checkpoint's tensors fit)")
    directory = _require_dir("dcp_path", spec.dcp_path)
    if not (directory / ".metadata").is_file():
        raise LoadError(f"dcp_path: {spec.dcp_path} is not a torch.distributed.checkpoint directory (no "
                        ".metadata file)")
    _require_dir("base_model", spec.base_model)
    if spec.gguf_file:
        raise LoadError("gguf_file: cannot be combined with --dcp-path")


def _check_remote_code(spec: LoadSpec) -> None:
    """A config.json with `auto_map` runs Python from the model directory: only with trust_remote_code."""
    try:
        config = json.loads((spec.architecture_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"model_path: cannot read {spec.architecture_dir / 'config.json'}: {exc}") from None
    if isinstance(config, dict) and config.get("auto_map") and not spec.trust_remote_code:
        raise LoadError(f"trust_remote_code: {spec.architecture_dir} defines its own model code (auto_map in "
                        "config.json); pass --trust-remote-code to run it")
