"""The transformers engine's running batch: left-padded rows sharing one KV cache; prefilled, merged, stepped.

Shapes: attention_mask [B, S] (1 = real token, left padding = 0), KV cache [B, H_kv, S, D] per layer,
next_tokens [B] (each row's newest token, the input of the next decode step). Positions come from the mask
(`cumsum - 1`), so padding never shifts a row's positions: a row's result does not depend on its neighbours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from workers.engines import hf_cache
from workers.engines.hf_sequence import SequenceState


class DecodeBatch:
    """Rows being decoded together. All methods run under torch.inference_mode on the engine thread."""

    def __init__(
        self, seqs: list[SequenceState], cache: Any, attention_mask: torch.Tensor, next_tokens: torch.Tensor,
    ) -> None:
        self.seqs = seqs
        self.cache = cache
        self.attention_mask = attention_mask
        self.next_tokens = next_tokens

    def __len__(self) -> int:
        return len(self.seqs)

    @classmethod
    def prefill(cls, model: Any, seqs: list[SequenceState], pad_id: int) -> tuple[DecodeBatch, torch.Tensor]:
        """Run the contexts of `seqs` as one left-padded batch; return it and the last logits [B, V]."""
        device = model.device
        prompts = [s.context_ids for s in seqs]  # a resumed sequence brings its generated tokens too
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # [B, S]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # [B, S]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]; pads get 0, they are masked anyway
        cache = _new_cache(model)
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        batch = cls(seqs, out.past_key_values, mask, torch.zeros(len(seqs), dtype=torch.long, device=device))
        return batch, out.logits[:, -1, :]

    def decode(self, model: Any) -> torch.Tensor:
        """One step for every row: feed next_tokens, return logits [B, V]."""
        ones = torch.ones((len(self), 1), dtype=self.attention_mask.dtype, device=self.attention_mask.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)  # [B, S+1]
        position_ids = self.attention_mask.sum(-1, keepdim=True) - 1  # [B, 1]: real tokens before this one
        out = model(
            input_ids=self.next_tokens[:, None], attention_mask=self.attention_mask,
            position_ids=position_ids, past_key_values=self.cache, use_cache=True,
        )
        self.cache = out.past_key_values
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def set_next_tokens(self, tokens: list[int]) -> None:
        self.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.next_tokens.device)

    def keep(self, rows: list[int], trim: bool = True) -> None:
        """Keep only `rows` (indices into seqs, ascending); drop padding columns no surviving row needs."""
        if len(rows) == len(self.seqs):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.attention_mask.device)
        self.seqs = [self.seqs[i] for i in rows]
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        hf_cache.select_rows(self.cache, index)
        if self.seqs and trim:
            # leading columns that are padding in every surviving row cost compute and change nothing
            real_columns = self.attention_mask.any(dim=0).nonzero()
            shared_padding = int(real_columns[0]) if real_columns.numel() else 0
            if shared_padding:
                self.attention_mask = self.attention_mask[:, shared_padding:]
                hf_cache.trim_left(self.cache, shared_padding)

    def merge(self, other: DecodeBatch) -> None:
        """Append `other`'s rows, left-padding whichever batch is shorter to the common length."""
        length = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        hf_cache.append_rows(self.cache, other.cache)
        self.attention_mask = torch.cat(
            [_left_pad(self.attention_mask, length), _left_pad(other.attention_mask, length)]
        )
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        self.seqs = self.seqs + other.seqs


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(mask, (length - mask.shape[1], 0)) if mask.shape[1] < length else mask


def cache_is_mergeable(model: Any) -> bool:
    """True when every layer is a plain growing cache (no sliding window): rows can be padded and merged."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(_new_cache(model), "layers", []))


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56 has no config argument
        return DynamicCache()
