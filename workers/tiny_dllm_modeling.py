"""A tiny masked-diffusion language model: a bidirectional transformer that predicts every position's token.

This file travels inside the model directory as `modeling_tiny_dllm.py` (config.json `auto_map`) and loads
with `trust_remote_code`, the way LLaDA checkpoints load; it imports only torch and transformers.
`forward(input_ids [B, S], attention_mask [B, S] (1 = real, 0 = left padding), position_ids [B, S])` returns
logits [B, S, V] for every position. There is no causal mask: every query attends to every real position of
its row, and padding keys are hidden from every query. Rotary position embeddings, as LLaDA uses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class TinyDllmConfig(PretrainedConfig):  # type: ignore[no-untyped-call]
    model_type = "tiny_dllm"

    def __init__(
        self, vocab_size: int = 4096, hidden_size: int = 256, intermediate_size: int = 512,
        num_hidden_layers: int = 2, num_attention_heads: int = 4, max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5, initializer_range: float = 0.1,
        mask_token_id: int = 3, **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed: torch.Tensor = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed  # type: ignore[no-any-return]


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, H, S, D] at positions [B, S] (the half-split layout Llama uses)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # [D/2]
    angles = positions[:, None, :, None].float() * freqs  # [B, 1, S, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class Layer(nn.Module):
    """Pre-norm attention (bidirectional) and SwiGLU MLP."""

    def __init__(self, config: TinyDllmConfig) -> None:
        super().__init__()
        size = config.hidden_size
        self.heads = config.num_attention_heads
        self.theta = config.rope_theta
        self.attn_norm = RMSNorm(size, config.rms_norm_eps)
        self.qkv = nn.Linear(size, 3 * size, bias=False)
        self.out = nn.Linear(size, size, bias=False)
        self.mlp_norm = RMSNorm(size, config.rms_norm_eps)
        self.gate_up = nn.Linear(size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, size, bias=False)

    def forward(self, h: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, length, size = h.shape
        q, k, v = self.qkv(self.attn_norm(h)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)  # [B, H, S, D]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # no is_causal: bidirectional
        h = h + self.out(attn.transpose(1, 2).reshape(batch, length, size))
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, dim=-1)
        out: torch.Tensor = h + self.down(F.silu(gate) * up)
        return out


class TinyDllmModel(PreTrainedModel):  # type: ignore[no-untyped-call]
    config_class = TinyDllmConfig
    base_model_prefix = "tiny_dllm"
    _no_split_modules = ["Layer"]

    def __init__(self, config: TinyDllmConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()  # type: ignore[no-untyped-call]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, **kwargs: Any,
    ) -> MaskedLMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding never shifts a row
        key_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]: padding keys hidden from all
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, key_mask, position_ids)
        return MaskedLMOutput(logits=self.lm_head(self.norm(h)))
