"""Self-speculation by layer skipping: the target drafts for itself with some decoder sublayers skipped.

No weights are touched. Inside `skipping(model, skip)` the listed attention / MLP sublayers add nothing
to the residual stream (their `forward` is replaced, on the instance, by one returning zeros; a whole
skipped layer returns its input), and the original `forward` is put back on exit.

Every pass inside `skipping` is a self-draft pass: the block marks the model as drafting, so the
harness counts those passes as draft passes (not target passes that must each emit tokens) and checks
them against its own hooks: the stand-in forwards below are how it tells a skipped sublayer from one
that ran, and it prices each pass by the parameter bytes of the sublayers that ran.

KV cache: the draft re-uses the target's cache and is cropped before verification. The target's cache
holds full-model keys/values for every verified position; a draft pass appends entries only in the
layers whose attention runs (so layers can differ in length while drafting), and `draft_chain` crops
every layer back to the verified length before it returns, so the verification pass sees a clean cache.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from methods.base import DecodeContext
from methods.common.kv import crop, forward
from methods.common.sampling import argmax, sample, warp


@dataclass(frozen=True)
class SkipSet:
    """Decoder layers whose attention / MLP sublayer the draft skips (0-based layer indices)."""

    attention: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    @classmethod
    def of(cls, attention=(), mlp=()) -> SkipSet:
        return cls(frozenset(int(i) for i in attention), frozenset(int(i) for i in mlp))

    def check(self, num_layers: int) -> None:
        bad = sorted(i for i in self.attention | self.mlp if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"skip set names layers {bad}; the model has layers 0..{num_layers - 1}")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise TypeError(f"layer skipping needs a decoder-only model with model.layers[i].self_attn/.mlp "
                        f"(Llama, Qwen2, Mistral...); got {type(model).__name__}")
    return layers


def _skipped_attention(hidden_states, *args, **kwargs):
    return torch.zeros_like(hidden_states), None


def _skipped_mlp(hidden_states, *args, **kwargs):
    return torch.zeros_like(hidden_states)


def _skipped_layer(hidden_states, *args, **kwargs):
    return hidden_states


# the forwards a skipped module runs: the harness's hooks read a module's instance `forward` against these
SKIPPED_FORWARDS = (_skipped_attention, _skipped_mlp, _skipped_layer)
DRAFTING_FLAG = "_decodebench_self_drafting"


def is_skipped(module: torch.nn.Module) -> bool:
    """Whether `module` is skipped right now (its forward is one of the stand-ins)."""
    return module.__dict__.get("forward") in SKIPPED_FORWARDS


def is_self_drafting(model: torch.nn.Module) -> bool:
    """Whether passes of `model` are drafting passes now (inside `skipping`)."""
    return bool(model.__dict__.get(DRAFTING_FLAG, False))


@contextmanager
def skipping(model: torch.nn.Module, skip: SkipSet):
    """Within the block, the model runs with `skip`'s sublayers removed from the residual stream, and
    its passes are marked as self-drafting (the harness counts them as draft passes)."""
    layers = decoder_layers(model)
    skip.check(len(layers))
    patched = []
    for i, layer in enumerate(layers):
        if i in skip.attention and i in skip.mlp:
            patched.append((layer, _skipped_layer))
        elif i in skip.attention:
            patched.append((layer.self_attn, _skipped_attention))
        elif i in skip.mlp:
            patched.append((layer.mlp, _skipped_mlp))
    saved = [(module, module.__dict__.get("forward")) for module, _ in patched]
    was_drafting = model.__dict__.get(DRAFTING_FLAG, False)
    try:
        for module, replacement in patched:
            module.forward = replacement
        model.__dict__[DRAFTING_FLAG] = True
        yield
    finally:
        model.__dict__[DRAFTING_FLAG] = was_drafting
        for module, previous in saved:  # put back whatever was there (an accelerate hook, say)
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def attended_length(cache: DynamicCache, skip: SkipSet) -> int:
    """Positions held by the layers whose attention the draft runs (they all see the same tokens)."""
    for i, layer in enumerate(cache.layers):
        if i not in skip.attention:
            return layer.get_seq_length()
    return 0


def skipped_forward(model: torch.nn.Module, tokens: list[int], cache: DynamicCache, skip: SkipSet,
                    keep: int | None = 1) -> torch.Tensor:
    """One draft pass over `tokens` after what `cache` holds, with `skip` applied; the logits of the
    last `keep` tokens (all if None). A self-draft pass: `skipping` marks it for the harness.

    Where layer 0's attention is skipped, positions and the mask are given explicitly: the cache's
    first layer then lags behind, and transformers would size both from it. Otherwise transformers'
    own causal defaults are the same, and building them here would only cost host time per pass."""
    device = model.device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    kwargs = {"logits_to_keep": keep} if keep else {}
    if 0 in skip.attention:
        past, q = attended_length(cache, skip), len(tokens)
        mask = torch.ones(q, past + q, dtype=torch.bool, device=device)
        mask[:, past:] = torch.tril(mask[:, past:])
        kwargs.update(position_ids=torch.arange(past, past + q, device=device).unsqueeze(0),
                      attention_mask=mask[None, None])
    with skipping(model, skip):
        out = forward(model, cache, input_ids=ids, **kwargs)
    return out.logits[0]


def prefix_view(cache: DynamicCache, length: int) -> DynamicCache:
    """A cache holding the first `length` positions of `cache`, sharing its storage: passes on the view
    append to the view only (the layers concatenate into new tensors), `cache` stays as it is."""
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            part.keys, part.values = layer.keys[..., :length, :], layer.values[..., :length, :]
        view.layers.append(part)
    return view


def draft_chain(ctx: DecodeContext, cache: DynamicCache, pending: int, skip: SkipSet, max_tokens: int,
                stop_below: float | None = None, keep_logits: bool = False
                ) -> tuple[list[int], list[torch.Tensor], list[float]]:
    """Draft up to `max_tokens` tokens after `pending` (the last emitted token, not yet in `cache`) with
    the skipped model. Returns the drafts, one row per draft (under sampling the warped q it was drawn
    from; under greedy its logits, whose argmax it is, only if `keep_logits`: else none) and, when
    `stop_below` is given, each draft's confidence (the draft's plain softmax probability of it): drafting
    stops once a confidence falls below `stop_below` (that token is kept, the last drafted). Each of these
    is one more pass over the vocabulary per token, so only what the caller asks for is computed.
    `cache` comes back as it was."""
    verified = cache.get_seq_length()
    vocab = ctx.target.config.vocab_size
    sampling = ctx.sampling
    plain_q = sampling.temperature == 1.0 and not sampling.top_k and sampling.top_p >= 1.0  # q is the softmax
    drafts: list[int] = []
    rows: list[torch.Tensor] = []
    confidence: list[float] = []
    token = pending
    try:
        while len(drafts) < max_tokens:
            logits = skipped_forward(ctx.target, [token], cache, skip)[-1][:vocab].float()
            if sampling.greedy:
                token = argmax(logits)
                if keep_logits:
                    rows.append(logits)
            else:
                rows.append(warp(logits, sampling))
                token = sample(rows[-1], ctx.generator)
            drafts.append(token)
            if stop_below is None:
                continue
            plain = rows[-1] if not sampling.greedy and plain_q else logits.softmax(-1)
            confidence.append(float(plain[token]))
            if confidence[-1] < stop_below:
                break
    finally:
        crop(cache, verified)
    return drafts, rows, confidence
