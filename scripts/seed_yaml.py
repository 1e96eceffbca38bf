"""Translate the seed inference-server YAML format into `ClusterConfig` keys, and server args into argv words.

Seed format (every key optional; our flat keys, e.g. `gpus`, `policy`, `cpu_workers`, may sit beside it):

    backend: vllm                 # -> engine (hf | fake | vllm | sglang)
    model: /models/llama          # -> model_path
    port: 8000                    # -> port (the balancer's)
    output_dir: ./logs            # -> log_dir
    env_vars: {VLLM_CPU_KVCACHE_SPACE: 1}
    config:
      api_server_args: [--max-model-len, 1024, --enforce-eager]   # vLLM; or a dict:
      server_args: {max_model_len: 1024, enforce_eager: true}    # SGLang
    profile: {enabled: true, tool: nsys, output_dir: ./prof, args: [--trace, cuda]}
    batching: {batch_size: 8, max_wait_time: 0.05}
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

from lb.settings import ConfigError

# Seed key -> our flat key, for keys that only change name.
RENAMED = {"backend": "engine", "model": "model_path", "output_dir": "log_dir"}
SECTION_KEYS = {
    "config": {"api_server_args", "server_args"},
    "profile": {"enabled", "tool", "output_dir", "args"},
    "batching": {"batch_size", "max_wait_time"},
}


def server_args(value: Any, key: str) -> list[str]:
    """Argv words from a list (kept in order; a mapping item expands in place), or a dict (`--key value`;
    true = bare flag; false/null dropped).

    Dict keys may be written with or without `--`; underscores become dashes. A dict value is JSON-encoded
    (vLLM reads e.g. `--override-generation-config '{"temperature": 0}'`); list values follow the flag.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):  # mixed form: a mapping inside the list expands in place as dict form
        words: list[str] = []
        for item in value:
            if isinstance(item, Mapping):
                words += server_args(item, key)
            elif isinstance(item, list):
                raise ConfigError(f"{key}: list items must be strings, numbers or mappings, got {item!r}")
            else:
                words.append(_scalar(item))
        return words
    if isinstance(value, Mapping):
        words = []
        for raw_name, item in value.items():
            name = "--" + str(raw_name).lstrip("-").replace("_", "-")
            if item is True:
                words.append(name)
            elif item is False or item is None:
                continue
            elif isinstance(item, Mapping):
                words += [name, json.dumps(item, sort_keys=True)]
            elif isinstance(item, list):
                words += [name, *(_scalar(v) for v in item)]
            else:
                words += [name, _scalar(item)]
        return words
    raise ConfigError(f"{key}: expected a list or a mapping of arguments, got {value!r}")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def translate(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Flat `ClusterConfig` keys from a YAML mapping in our format, the seed's, or a mix of both."""
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        if key in RENAMED:
            out[RENAMED[key]] = value
        elif key in SECTION_KEYS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} in {source}: expected a mapping, got {value!r}")
            unknown = sorted(set(map(str, value)) - SECTION_KEYS[key])
            if unknown:
                known = ", ".join(sorted(SECTION_KEYS[key]))
                raise ConfigError(f"unknown key {key}.{unknown[0]} in {source}; known keys: {known}")
            out.update(_section(key, value))
        elif key in ("engine_args", "lb_args", "profile_args") and not isinstance(value, str):
            out[key] = shlex.join(server_args(value, key))
        else:
            out[key] = value  # a flat key: validated (or rejected as unknown) by the caller
    return out


def _section(name: str, value: Mapping[str, Any]) -> dict[str, Any]:
    if name == "config":
        words: list[str] = []
        for sub in ("api_server_args", "server_args"):
            words += server_args(value.get(sub), f"config.{sub}")
        return {"engine_args": shlex.join(words)} if words else {}
    if name == "profile":
        renamed = {"enabled": "profile_enabled", "tool": "profile_tool", "output_dir": "profile_output_dir"}
        out = {renamed[k]: v for k, v in value.items() if k in renamed}
        if "args" in value:
            out["profile_args"] = shlex.join(server_args(value["args"], "profile.args"))
        return out
    return dict(value)  # batching: its keys are already ours
