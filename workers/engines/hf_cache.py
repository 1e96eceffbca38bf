"""Row surgery on a transformers KV cache: keep some rows, left-pad to a longer length, append rows, trim.

Every layer holds keys and values shaped [B, H_kv, S, D]; the batch's attention mask [B, S] says which of the
S positions are real. Padding positions get zero keys/values and mask 0, so they never receive attention.
Works on transformers 5 (`cache.layers[i].keys`) and on the older `key_cache`/`value_cache` lists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]


def layers(cache: Any) -> list[KV]:
    """The (keys, values) tensors of every layer, each [B, H_kv, S, D]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _set_layers(cache: Any, kvs: list[KV]) -> None:
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kvs, strict=True):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in kvs]
        cache.value_cache[:] = [v for _, v in kvs]


def select_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep only `rows` (a LongTensor of batch indices), in that order."""
    _set_layers(cache, [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in layers(cache)])


def trim_left(cache: Any, n: int) -> None:
    """Drop the first n positions (columns that are padding in every row)."""
    if n > 0:
        _set_layers(cache, [(k[:, :, n:], v[:, :, n:]) for k, v in layers(cache)])


def append_rows(cache: Any, other: Any) -> None:
    """Append `other`'s rows below this cache's, left-padding the shorter of the two to the common length."""
    mine, theirs = layers(cache), layers(other)
    length = max(mine[0][0].shape[2], theirs[0][0].shape[2])
    merged = [
        (torch.cat([_pad_to(k1, length), _pad_to(k2, length)]),
         torch.cat([_pad_to(v1, length), _pad_to(v2, length)]))
        for (k1, v1), (k2, v2) in zip(mine, theirs, strict=True)
    ]
    _set_layers(cache, merged)


def _pad_to(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad the sequence dimension (2) of [B, H, S, D] with zeros up to `length`."""
    missing = length - t.shape[2]
    return F.pad(t, (0, 0, missing, 0)) if missing > 0 else t


def seq_length(cache: Any) -> int:
    return int(layers(cache)[0][0].shape[2])
