"""Running a causal LM over new tokens on top of its KV cache, and cutting the cache back."""
from __future__ import annotations

import inspect
from functools import cache

import torch
from transformers import DynamicCache


@cache
def _cache_argument(model_class: type) -> str:
    """`cache` where the installed transformers has it (5.24 deprecates `past_key_values`, to be removed in
    5.40), else `past_key_values` (older 5.x, e.g. the GPU machines' 5.17)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward(model: torch.nn.Module, cache: DynamicCache | None, **kwargs):
    """One forward pass of `model` on top of `cache` (use_cache on, no autograd): every method's way
    into a model, so the cache argument's name lives in one place."""
    if cache is not None:
        kwargs[_cache_argument(type(model))] = cache
    with torch.inference_mode():
        return model(use_cache=True, **kwargs)


def cache_in(kwargs: dict):
    """The cache a model's forward was called with (for hooks registered with `with_kwargs=True`)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def kv_bytes(cache) -> int:
    """Bytes of keys and values a cache holds, over all layers (a static layer counts what it allocated)."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def new_cache(model: torch.nn.Module) -> DynamicCache:
    return DynamicCache(config=model.config)


# id(model) -> the cache policy run attached to it (methods.common.cache_policy), which feeds long inputs
# in chunks so that the policy acts between them
_chunkers: dict[int, object] = {}


def extend(model: torch.nn.Module, tokens: list[int], cache: DynamicCache, keep: int | None = None) -> torch.Tensor:
    """Feed `tokens` after what `cache` holds; return the logits of the last `keep` of them (all if None).

    Keeping only the rows a method reads skips most of the LM head on a prompt (a large saving). Under an
    attached cache policy the tokens may go in several passes (its prefill chunks).
    """
    chunker = _chunkers.get(id(model))
    if chunker is not None:
        return chunker.extend(tokens, cache, keep)  # type: ignore[attr-defined]
    return extend_once(model, tokens, cache, keep)


def extend_once(model: torch.nn.Module, tokens: list[int], cache: DynamicCache, keep: int | None = None) -> torch.Tensor:
    """`extend` in exactly one forward pass."""
    ids = torch.tensor([tokens], dtype=torch.long, device=model.device)
    kwargs = {"logits_to_keep": keep} if keep else {}
    return forward(model, cache, input_ids=ids, **kwargs).logits[0]


def crop(cache: DynamicCache, keep: int) -> None:
    """Keep the first `keep` positions in every layer. Layer by layer, since a layer-skipping draft
    leaves layers of different lengths (crop's argument is negative: tokens to remove, in transformers 5)."""
    for layer in cache.layers:
        remove = layer.get_seq_length() - keep
        if remove > 0:
            layer.crop(-remove)


def compact(cache: DynamicCache, prefix: int, positions: list[int]) -> None:
    """Keep the first `prefix` positions of every layer followed by `positions` (ascending, all >= prefix):
    the accepted path of a token tree, moved in place (only the path's entries are copied)."""
    if positions != list(range(prefix, prefix + len(positions))):
        with torch.inference_mode():
            for layer in cache.layers:
                if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                    raise NotImplementedError(f"compacting a {type(layer).__name__} cache layer is not supported")
                if layer.keys is None or layer.keys.numel() == 0:
                    continue
                index = torch.tensor(positions, dtype=torch.long, device=layer.keys.device)
                span = slice(prefix, prefix + len(positions))
                layer.keys[..., span, :] = layer.keys.index_select(-2, index)
                layer.values[..., span, :] = layer.values.index_select(-2, index)
    crop(cache, prefix + len(positions))
