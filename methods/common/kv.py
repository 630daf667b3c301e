"""Running a causal LM over new tokens on top of its KV cache, and cutting the cache back."""
from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(model: torch.nn.Module) -> DynamicCache:
    return DynamicCache(config=model.config)


def extend(model: torch.nn.Module, tokens: list[int], cache: DynamicCache, last_only: bool = False) -> torch.Tensor:
    """Feed `tokens` after what `cache` holds; return their logits (q x vocab), or the last row only.

    `last_only` skips the LM head on all but the last position (a large saving on prefill).
    """
    ids = torch.tensor([tokens], dtype=torch.long, device=model.device)
    kwargs = {"logits_to_keep": 1} if last_only else {}
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
    return out.logits[0]


def crop(cache: DynamicCache, keep: int) -> None:
    """Keep the first `keep` positions (negative argument = tokens to remove, in every transformers 4.x/5.x)."""
    remove = cache.get_seq_length() - keep
    if remove > 0:
        cache.crop(-remove)
