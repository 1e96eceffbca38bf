"""Checkpoints as researchers hold them, loaded and served by real workers: a torch.distributed.checkpoint on
its base model and a model directory with its own code (trust_remote_code); and the clear errors of options
that cannot apply here. (GGUF loading is served in tests/test_real_model.py, which has the GGUF file.)"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from tests.processes import ManagedProcess, free_port, python_module
from workers.engines.hf_loading import LoadError, LoadSpec, check, load_model

PROMPT = "def handler(request):\n"
NEW_TOKENS = 12
CPU = torch.device("cpu")

CUSTOM_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"


class TinyCustomForCausalLM(LlamaForCausalLM):
    """The tiny Llama, except that one token always wins: output no stock class would give."""

    config_class = TinyCustomConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., self.config.favourite_token] += 1000.0
        return out
'''
FAVOURITE_TOKEN = 1234


def greedy(model_dir: Path | None, spec: LoadSpec | None = None) -> list[int]:
    """NEW_TOKENS greedy token ids for PROMPT, generated in this process with transformers."""
    model, tok = load_model(spec or LoadSpec(str(model_dir)), CPU, torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1]:]]


def decode(model_dir: Path, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return str(AutoTokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """reference: the tiny model re-initialised (seed 1); dcp: the same weights as a DCP checkpoint nested
    under "model" as trainers save them; custom: the tiny weights behind a custom model class."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(root / "reference")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, root / "reference" / name)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(root / "dcp"))  # type: ignore[attr-defined]

    custom = root / "custom"
    shutil.copytree(tiny_model_dir, custom)
    (custom / "modeling_tiny_custom.py").write_text(CUSTOM_CODE)
    import json

    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"],
                  favourite_token=FAVOURITE_TOKEN,
                  auto_map={"AutoConfig": "modeling_tiny_custom.TinyCustomConfig",
                            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    return {"reference": root / "reference", "dcp": root / "dcp", "custom": custom}


@pytest.fixture(scope="module")
def workers(checkpoints: dict[str, Path], tiny_model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OpenAI]]:
    """One worker per kind of checkpoint, started together; an SDK client on each."""
    logs = tmp_path_factory.mktemp("loading-workers")
    flags = {
        "dcp": ["--dcp-path", str(checkpoints["dcp"]), "--base-model", str(tiny_model_dir)],
        "custom": ["--model-path", str(checkpoints["custom"]), "--trust-remote-code"],
    }
    procs, urls = {}, {}
    for name, extra in flags.items():
        port = free_port()
        procs[name] = ManagedProcess(python_module(
            "workers", "--engine", "hf", "--port", str(port), "--device", "cpu", "--served-model-name", name,
            *extra), logs / f"{name}.log")
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        for name, proc in procs.items():
            proc.wait_http_ok(urls[name] + "/health", timeout=240)
        yield {name: OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
               for name, url in urls.items()}
    finally:
        for proc in procs.values():
            proc.stop()


def complete(client: OpenAI, model: str) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
                                    extra_body={"ignore_eos": True})
    return out.choices[0].text


def test_dcp_checkpoint_on_its_base_model_generates_exactly_what_the_original_does(
    checkpoints: dict[str, Path], tiny_model_dir: Path, workers: dict[str, OpenAI]
) -> None:
    original = greedy(checkpoints["reference"])
    loaded = greedy(None, LoadSpec(None, dcp_path=str(checkpoints["dcp"]), base_model=str(tiny_model_dir)))
    assert loaded == original  # token for token
    assert original != greedy(tiny_model_dir)  # the base's own weights were replaced
    assert complete(workers["dcp"], "dcp") == decode(tiny_model_dir, original)


def test_custom_model_code_runs_with_trust_remote_code(
    checkpoints: dict[str, Path], workers: dict[str, OpenAI]
) -> None:
    with pytest.raises(LoadError, match="--trust-remote-code"):
        check(LoadSpec(str(checkpoints["custom"])), CPU)
    expected = decode(checkpoints["custom"], [FAVOURITE_TOKEN] * NEW_TOKENS)
    assert complete(workers["custom"], "custom") == expected


@pytest.mark.parametrize(("spec", "message"), [
    (dict(quantization="8bit"), "needs a CUDA device"),
    (dict(quantization="4bit"), "needs a CUDA device"),
    (dict(attn_implementation="flash_attention_2"), "flash_attention_2 needs a CUDA device"),
    (dict(gguf_file="missing.gguf"), "is not a file"),
    (dict(model_path="/no/such/dir"), "is not a directory"),
    (dict(model_path=None, dcp_path="/tmp"), "base_model: required"),
])
def test_options_that_cannot_apply_fail_with_a_clear_error(
    tiny_model_dir: Path, spec: dict[str, str | None], message: str
) -> None:
    values: dict[str, str | None] = {"model_path": str(tiny_model_dir)} | spec
    with pytest.raises(LoadError, match=message):
        check(LoadSpec(**values), CPU)  # type: ignore[arg-type]


def test_a_directory_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"no config\.json"):
        check(LoadSpec(str(tmp_path)), CPU)
