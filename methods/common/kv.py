"""Running a causal LM over new tokens on top of its KV cache, and cutting the cache back."""
from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(model: torch.nn.Module) -> DynamicCache:
    return DynamicCache(config=model.config)


def extend(model: torch.nn.Module, tokens: list[int], cache: DynamicCache, keep: int | None = None) -> torch.Tensor:
    """Feed `tokens` after what `cache` holds; return the logits of the last `keep` of them (all if None).

    Keeping only the rows a method reads skips most of the LM head on a prompt (a large saving).
    """
    ids = torch.tensor([tokens], dtype=torch.long, device=model.device)
    kwargs = {"logits_to_keep": keep} if keep else {}
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
    return out.logits[0]


def crop(cache: DynamicCache, keep: int) -> None:
    """Keep the first `keep` positions (negative argument = tokens to remove, in every transformers 4.x/5.x)."""
    remove = cache.get_seq_length() - keep
    if remove > 0:
        cache.crop(-remove)
