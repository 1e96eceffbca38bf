"""The tiny model builder: a real, loadable Llama checkpoint whose bytes depend only on the seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from workers import tiny_model

HASHED_FILES = ("model.safetensors", "tokenizer.json", "config.json")


def digests(model_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest() for name in HASHED_FILES}


def test_same_seed_gives_same_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    rebuilt = tiny_model.build(tmp_path / "again", seed=0)
    assert digests(rebuilt) == digests(tiny_model_dir)


def test_different_seed_changes_weights_not_tokenizer(tmp_path: Path) -> None:
    cap = 300_000  # a small corpus keeps this cheap; the tokenizer does not depend on the seed
    a = digests(tiny_model.build(tmp_path / "a", seed=0, train_bytes=cap))
    b = digests(tiny_model.build(tmp_path / "b", seed=1, train_bytes=cap))
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"]


def test_model_loads_with_tokens_and_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert 1_000_000 <= model.num_parameters() <= 5_000_000
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True,
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = "def main():\n    return 'héllo'\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level BPE round-trips any text


def test_cli_writes_the_model_files(tmp_path: Path) -> None:
    tiny_model.main([str(tmp_path / "cli"), "--seed", "3", "--train-bytes", "200000"])
    written = {p.name for p in (tmp_path / "cli").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= written


def test_dllm_same_seed_gives_same_bytes_and_loads_bidirectional(tiny_dllm_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    rebuilt = tiny_model.build_dllm(tmp_path / "again", seed=0, train_bytes=300_000)  # weights: corpus-free
    for name in ("model.safetensors", "config.json", "modeling_tiny_dllm.py"):
        assert (rebuilt / name).read_bytes() == (tiny_dllm_dir / name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dllm_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(tiny_dllm_dir, trust_remote_code=True).eval()  # the real loading path
    assert model.config.model_type == "tiny_dllm"
    assert model.config.mask_token_id == tokenizer.mask_token_id == 3
    ids = torch.tensor([tokenizer.encode("def main():") + [3] * 4])
    changed = ids.clone()
    changed[0, -1] = 42  # a change at the END of the sequence ...
    with torch.inference_mode():
        first, second = model(ids).logits, model(changed).logits
    assert not torch.allclose(first[0, 0], second[0, 0])  # ... reaches the FIRST position: no causal mask
