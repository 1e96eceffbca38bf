"""Build a tiny deterministic model and a locally trained byte-level BPE tokenizer, offline.

`python -m workers.tiny_model DIR [--seed 0]` writes a `save_pretrained` Llama directory (about 9 MB, 2.2 M
parameters) that tests and demos serve; `--kind dllm` writes a masked-diffusion model instead: a small
bidirectional transformer with a mask token, whose model code (`workers/tiny_dllm_modeling.py`) ships inside
the directory and loads with `trust_remote_code`, as LLaDA checkpoints do. Same seed and same Python stdlib
give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

BUILDER_VERSION = 1  # bump whenever the files written by build() change
DLLM_BUILDER_VERSION = 1  # the same for build_dllm()
KINDS = ("llama", "dllm")

VOCAB_SIZE = 4096
PAD_TOKEN, IM_START, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # ids 0, 1, 2
MASK_TOKEN = "<|mdm_mask|>"  # id 3, in the diffusion model's tokenizer only
DEFAULT_TRAIN_BYTES = 8_000_000  # tokenizer training corpus cap; ~3 s of training on one core
LICENSES_DIR = Path("/usr/share/common-licenses")

# ChatML, as Qwen uses it: <|im_start|>role\ncontent<|im_end|>\n ... then the assistant's opening tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def training_files() -> list[Path]:
    """The tokenizer's corpus: CPython stdlib *.py, then the common licenses, each sorted (deterministic)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    py_files = sorted(
        p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )
    licenses = sorted(p for p in LICENSES_DIR.rglob("*") if p.is_file()) if LICENSES_DIR.is_dir() else []
    return py_files + licenses


def training_texts(max_bytes: int) -> Iterator[str]:
    """Yield file contents until `max_bytes` (of UTF-8 text) have been produced."""
    budget = max_bytes
    for path in training_files():
        if budget <= 0:
            return
        try:
            text = path.read_bytes()[:budget].decode("utf-8", errors="ignore")
        except OSError:
            continue
        budget -= len(text.encode("utf-8"))
        yield text


def train_tokenizer(
    max_bytes: int = DEFAULT_TRAIN_BYTES, specials: tuple[str, ...] = (PAD_TOKEN, IM_START, EOS_TOKEN),
) -> object:
    """A byte-level BPE `tokenizers.Tokenizer` of VOCAB_SIZE tokens with `specials` at ids 0, 1, 2, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(max_bytes), trainer=trainer)
    return tokenizer


def build(out_dir: Path, seed: int = 0, train_bytes: int = DEFAULT_TRAIN_BYTES) -> Path:
    """Write config, weights, tokenizer, chat template and generation config into `out_dir`; return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=train_tokenizer(train_bytes), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    pad_id, eos_id = (int(tokenizer.convert_tokens_to_ids(t)) for t in (PAD_TOKEN, EOS_TOKEN))  # type: ignore[arg-type]

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,  # the HF default 0.02 makes a model that repeats one token (engines.md §2)
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # float32, the default dtype
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_dllm(out_dir: Path, seed: int = 0, train_bytes: int = DEFAULT_TRAIN_BYTES) -> Path:
    """The diffusion model: config with auto_map, weights, its modeling file, tokenizer with a mask token.

    A custom class rather than a standard architecture configured bidirectional: transformers' causal-LM
    classes build their own causal masks, and the real checkpoints this engine serves (LLaDA) are custom
    code loaded with trust_remote_code too, so the tiny model exercises that same loading path.
    """
    import torch
    from transformers import PreTrainedTokenizerFast

    from workers import tiny_dllm_modeling as modeling

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=train_tokenizer(train_bytes, (PAD_TOKEN, IM_START, EOS_TOKEN, MASK_TOKEN)),
        eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, mask_token=MASK_TOKEN,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    pad_id, eos_id, mask_id = (int(tokenizer.convert_tokens_to_ids(t))  # type: ignore[arg-type]
                               for t in (PAD_TOKEN, EOS_TOKEN, MASK_TOKEN))
    config = modeling.TinyDllmConfig(
        vocab_size=VOCAB_SIZE, mask_token_id=mask_id, eos_token_id=eos_id, pad_token_id=pad_id,
        bos_token_id=None, architectures=["TinyDllmModel"],
        auto_map={"AutoConfig": "modeling_tiny_dllm.TinyDllmConfig",
                  "AutoModel": "modeling_tiny_dllm.TinyDllmModel"},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = modeling.TinyDllmModel(config)
    model.save_pretrained(out_dir)
    shutil.copyfile(modeling.__file__, out_dir / "modeling_tiny_dllm.py")
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_cached(seed: int = 0, cache_dir: Path | None = None, kind: str = "llama") -> Path:
    """The model in the shared cache (IB_CACHE_DIR or ~/.cache/inference-balancer), built there if missing.

    The same layout as the tests' `tiny_model_dir` / `tiny_dllm_dir` fixtures, so benchmarks and tests share
    one build.
    """
    cache = cache_dir or Path(os.environ.get("IB_CACHE_DIR", Path.home() / ".cache" / "inference-balancer"))
    if kind == "dllm":
        target, builder = cache / f"tiny-dllm-v{DLLM_BUILDER_VERSION}-seed{seed}", build_dllm
    else:
        target, builder = cache / f"tiny-model-v{BUILDER_VERSION}-seed{seed}", build
    if not (target / "config.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=f"{target.name}-build-"))
        builder(staging, seed=seed)
        try:
            staging.rename(target)  # atomic: a concurrent reader never sees a half-written model
        except OSError:  # someone else finished first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m workers.tiny_model",
        description="Build a tiny deterministic model (a Llama causal LM, or a masked-diffusion model) and "
        "its locally trained tokenizer into DIR.",
    )
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (same seed, same bytes)",
    )
    parser.add_argument(
        "--train-bytes", type=int, default=DEFAULT_TRAIN_BYTES,
        help="cap on the tokenizer training corpus, in bytes of text",
    )
    parser.add_argument(
        "--kind", choices=KINDS, default="llama",
        help="llama = causal LM for --engine hf; dllm = bidirectional masked-diffusion model with a mask "
        "token for --engine dllm (serve it with --trust-remote-code)",
    )
    args = parser.parse_args(argv)
    builder = build_dllm if args.kind == "dllm" else build
    out = builder(args.dir, seed=args.seed, train_bytes=args.train_bytes)
    print(f"tiny model written to {out}")


if __name__ == "__main__":
    main()
