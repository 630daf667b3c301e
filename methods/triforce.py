"""TriForce: hierarchical speculative decoding for long contexts, lossless.

Three levels, two models, three caches:
1. the draft model on a StreamingLLM cache (sinks + recent window, the `streaming_llm` policy attached
   to it) drafts gamma1 tokens;
2. the target on a *retrieval cache* verifies them (speculative sampling) and so drafts, step after step,
   at least gamma2 tokens. The retrieval cache is chosen once after prefill: the prompt's keys are cut into
   chunks, each chunk scored by the last prompt token's query against the chunk's mean key, and the first
   chunk plus the best ones are kept up to `budget` entries;
3. the target on its full cache verifies those tokens against the distributions level 2 drew them from.
A level-2 token is distributed as the retrieval-cache target's p_R (an accepted draft or a correction
alike), so level 3 verifies with q = p_R: the output follows the target's distribution exactly (greedy:
`ar`'s tokens). ctx.trace has one step per full-cache pass.

Paper and release (Infini-AI-Lab/TriForce, test/on_chip.py): Llama2-7B-128K target, Llama-68M draft;
draft cache 16 sinks + 234 recent (a 256-slot budget less gamma and scratch); retrieval budget 4096 in
chunks of 8 (about 3% of a 120k prompt); gamma 6 (12-16 when offloading); top_p 0.9, temperature 0.6.
Release details followed here: chunk 0 is always kept; chunks are chosen per attention head (per KV head
here); retained keys keep their original positions (cached keys stay rotated where they were; new tokens
get their true positions); after each full-cache verification the accepted tokens' keys and values are
copied from the full cache into the retrieval cache, where they replace the lowest-ranked chunks' entries.
Ours, for Qwen2.5-Coder-1.5B / 0.5B at 1k-8k tokens: budget 512 (below every longctx length, so retrieval
always drops something; 6% of an 8k prompt, the paper's order of magnitude; 1024 would keep a 1k prompt
whole), chunk 8, gamma2 6, 16 sinks + 240 recent (the release's 256 slots), gamma1 2.
Deviations and open choices, one line each:
- gamma1: the release's middle loop drafts one token per retrieval pass (a 68M draft is ~1% of a 7B pass);
  our draft costs a third of the target, so 2 drafts per retrieval pass.
- GQA: a KV head's chunk score is the sum over its query heads of query . mean key (the release: MHA).
- a prompt tail shorter than a chunk is always kept, like generated tokens (the release needs
  prompt % chunk == 0); once only chunk 0 is left, the oldest recent tokens go (a window, never reached
  in the release).
- the draft's cache is evicted after every pass (the policy mechanism), so it never holds more than
  sinks + window; the release evicts after each verification, keeping gamma + 3 scratch slots.
- level 2 runs on a DynamicCache with only new tokens per pass (cropped after rejections); the release
  re-runs a static gamma+1 window (CUDA graphs). The release's re-selection on a width-1 full pass is
  left out: chosen once.
- prefill: the target reads the prompt in one pass (the release: chunks of 128), the draft in chunks of 512
  under its StreamingLLM cache (the release: 64; larger chunks, fewer passes, the same final budget).
Counting: retrieval-cache passes draft for the full-cache target, so they are marked as self-drafting
(`layerskip.skipping` with nothing skipped): the harness counts them as self-draft passes, priced as full
target passes of their width (weights dominate at these lengths), and lists them as "skipped no sublayer"
(which --strict-counting refuses). ctx.extras: draft_acceptance (level 1 by level 2) and
retrieval_acceptance (level 2 by level 3, bonus tokens aside).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from methods.base import (
    DecodeContext,
    Method,
    Needs,
    Paper,
    SettingError,
    Settings,
    register,
    setting,
)
from methods.common.cache_policy import grouped, scores
from methods.common.kv import crop, extend, forward, new_cache
from methods.common.layerskip import SkipSet, decoder_layers, skipping
from methods.common.rope import Rotation
from methods.common.sampling import next_token, warp
from methods.common.speculation import DraftCache
from methods.common.verify import verify, verify_greedy, verify_speculative
from methods.streaming_llm import StreamingLLM


def chunk_order(keys: torch.Tensor, query: torch.Tensor, chunk: int, count: int) -> torch.Tensor:
    """The `count` chunks one layer keeps, per KV head, best first: chunk 0, then the others by the score
    query . mean key (summed over the KV head's query heads). keys [kv_heads, n, d] (n = chunks * chunk),
    query [heads, d] -> LongTensor [kv_heads, min(count, chunks)]."""
    kv_heads, n, d = keys.shape
    means = keys.float().reshape(kv_heads, n // chunk, chunk, d).mean(-2)
    rank = scores(grouped(query.float()[None, :, None], kv_heads), means[None], 1.0)[0, :, :, 0].sum(1)
    rest = rank[:, 1:].topk(min(count, n // chunk) - 1, dim=-1).indices + 1
    return torch.cat((torch.zeros(kv_heads, 1, dtype=torch.long, device=keys.device), rest), dim=-1)


def chunk_slots(order: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunk indices [kv_heads, m] -> the positions they cover [kv_heads, m * chunk], in the same order."""
    return (order[..., None] * chunk + torch.arange(chunk, device=order.device)).flatten(1)


@contextlib.contextmanager
def last_queries(model: torch.nn.Module):
    """During the block's passes, each layer's query of a pass's last token, before RoPE (q_proj's output,
    the layer's q_norm applied where it has one): {layer: [heads, head_dim]}."""
    found: dict[int, torch.Tensor] = {}

    def keep(index, attention):
        def hook(module, args, output):
            q = output[0, -1].detach().view(-1, attention.head_dim)
            norm = getattr(attention, "q_norm", None)
            found[index] = norm(q) if norm is not None else q
        return hook

    handles = [layer.self_attn.q_proj.register_forward_hook(keep(i, layer.self_attn))
               for i, layer in enumerate(decoder_layers(model))]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class RetrievalCache:
    """The prompt's chunks one generation keeps for level 2, best first per layer and KV head, and
    `view(full)`: a new DynamicCache of the target holding them plus the full cache's entries from `start`
    on (the prompt's tail and the generated tokens), within `budget` entries."""

    def __init__(self, full: DynamicCache, queries: dict[int, torch.Tensor], rotation: Rotation, chunk: int,
                 budget: int) -> None:
        self.chunk, self.budget = chunk, budget
        self.order: list[torch.Tensor] = []  # per layer: chunk indices [kv_heads, kept], best first
        self.region: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: their keys, values
        length = full.get_seq_length()
        self.start = length // chunk * chunk  # positions from here on are always kept
        for i, layer in enumerate(full.layers):
            if getattr(layer, "is_sliding", False):
                raise NotImplementedError("triforce needs full-attention cache layers (no sliding window)")
            keys, values = layer.keys[0], layer.values[0]  # [kv_heads, n, d]
            kv_heads, _, d = keys.shape
            if self.start == 0:
                order = torch.zeros(kv_heads, 0, dtype=torch.long, device=keys.device)
            else:
                query = rotation.rotate(queries[i].to(keys.device).float(), torch.tensor(length - 1))
                order = chunk_order(keys[:, : self.start], query, chunk, budget // chunk)
            index = chunk_slots(order, chunk)[..., None].expand(-1, -1, d)
            self.order.append(order)
            self.region.append((keys.gather(1, index)[None], values.gather(1, index)[None]))

    def positions(self, layer: int, length: int) -> torch.Tensor:
        """Original positions of what `view` holds in `layer` ([kv_heads, n]) when the full cache holds `length`."""
        slots = chunk_slots(self.order[layer], self.chunk)
        kept, recent = self._sizes(slots.shape[1], length)
        tail = torch.arange(length - recent, length, device=slots.device).expand(slots.shape[0], -1)
        return torch.cat((slots[:, :kept], tail), dim=1)

    def _sizes(self, region: int, length: int) -> tuple[int, int]:
        """(chunk entries kept, recent entries kept): recent tokens replace the lowest-ranked chunks' entries,
        chunk 0 stays, and past that the oldest recent tokens go."""
        first = min(self.chunk, region)
        recent = min(length - self.start, max(0, self.budget - first))
        return max(first, min(region, self.budget - recent)), recent

    def view(self, full: DynamicCache, model: torch.nn.Module) -> DynamicCache:
        cache = new_cache(model)
        length = full.get_seq_length()
        for i, (layer, (keys, values)) in enumerate(zip(full.layers, self.region)):
            kept, recent = self._sizes(keys.shape[-2], length)
            cache.update(torch.cat((keys[..., :kept, :], layer.keys[..., length - recent:, :]), dim=-2),
                         torch.cat((values[..., :kept, :], layer.values[..., length - recent:, :]), dim=-2), i)
        return cache


class StreamingDraft(DraftCache):
    """A DraftCache whose model has a StreamingLLM policy attached (eviction after every pass): rejected
    tokens are cropped counting from the end, and `fixed` (set by the caller) is how many leading tokens
    of every later context are final; tokens past it may be level-2 tokens that level 3 rejects."""

    fixed = 0

    def sync(self, context: list[int]) -> torch.Tensor:
        common, limit = min(self.verified, len(self.tokens)), min(len(self.tokens), len(context))
        while common < limit and self.tokens[common] == context[common]:
            common += 1
        common = min(common, len(context) - 1)
        crop(self.cache, self.cache.get_seq_length() - (len(self.tokens) - common))
        del self.tokens[common:]
        self.verified = min(self.fixed, len(context))  # where the next sync starts comparing
        return self.feed(context[common:])


def retrieval_verify(drafts: list[int], draft_probs: torch.Tensor | None, logits: torch.Tensor, ctx: DecodeContext
                     ) -> tuple[list[int], torch.Tensor | None]:
    """Level 2: the draft's tokens verified against the retrieval-cache target's logits (one row per draft
    plus one). Returns the tokens it emits and, under sampling, the distributions level 3 verifies them
    against (see `retrieval_sample`)."""
    if ctx.sampling.greedy:
        accepted, token = verify_greedy(drafts, logits)
        return drafts[:accepted] + [token], None
    return retrieval_sample(drafts, draft_probs, warp(logits, ctx.sampling).cpu(), ctx.generator)


def retrieval_sample(drafts: list[int], draft_probs: torch.Tensor | None, p: torch.Tensor,
                     generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """Speculative sampling of the drafts against p (the retrieval-cache target's warped rows). Each token
    emitted comes with p at its position: a correction, drawn from the residual, is distributed as p too
    (over the draft's randomness), so p is what level 3 must verify it against."""
    q = draft_probs.cpu() if drafts else p[:0]
    accepted, token = verify_speculative(drafts, q, p, generator)
    return drafts[:accepted] + [token], p[: accepted + 1]


class Levels:
    """One generation's three levels: the full cache and its pending token, the retrieval cache, the draft."""

    def __init__(self, ctx: DecodeContext, config: TriForce.Config) -> None:
        self.ctx, self.config = ctx, config
        self.full = new_cache(ctx.target)
        self.draft = StreamingDraft(ctx)
        self.retrieval: RetrievalCache | None = None
        self.pending: int | None = None
        self.drafted = self.accepted = 0  # level-1 tokens proposed to / accepted by level 2
        self.proposed = self.verified = 0  # level-2 tokens proposed to / accepted by level 3

    def prefill(self) -> None:
        """One full-cache pass over the prompt (it emits the first token), then the retrieval cache."""
        ctx = self.ctx
        with last_queries(ctx.target) as queries:
            logits = extend(ctx.target, ctx.prompt_ids, self.full, keep=1)[-1]
        self.retrieval = RetrievalCache(self.full, queries, Rotation.of(ctx.target), self.config.chunk,
                                        self.config.budget)
        self.pending = next_token(logits, ctx.sampling, ctx.generator)
        ctx.emit([self.pending], proposed=0)

    def middle(self, room: int) -> tuple[list[int], torch.Tensor | None]:
        """Level 2: at least gamma2 tokens (at most `room`) from the target on the retrieval cache, each step
        verifying up to gamma1 draft tokens; under sampling, the distributions they follow."""
        ctx, c = self.ctx, self.config
        cache = self.retrieval.view(self.full, ctx.target)
        position, unseen = self.full.get_seq_length(), [self.pending]
        base = ctx.prompt_ids + ctx.output
        self.draft.fixed = len(base)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        while len(tokens) < min(c.gamma2, room) and not (tokens and tokens[-1] in ctx.eos_token_ids):
            k = min(c.gamma1, room - len(tokens) - 1)
            drafts, probs = ([], None) if k == 0 else \
                self.draft.chain(ctx, base + tokens, k, not ctx.sampling.greedy)[:2]
            ids = torch.tensor([unseen + drafts], device=ctx.target.device)
            at = torch.arange(position, position + ids.shape[1], device=ctx.target.device)[None]
            with skipping(ctx.target, SkipSet()):  # a drafting pass of the target (see the module docstring)
                logits = forward(ctx.target, cache, input_ids=ids, position_ids=at, logits_to_keep=k + 1).logits[0]
            emitted, dists = retrieval_verify(drafts, probs, logits, ctx)
            self.drafted, self.accepted = self.drafted + k, self.accepted + len(emitted) - 1
            crop(cache, cache.get_seq_length() - (k + 1 - len(emitted)))
            position += len(unseen) + len(emitted) - 1
            unseen = emitted[-1:]
            tokens += emitted
            if dists is not None:
                rows.append(dists)
        return tokens, torch.cat(rows) if rows else None

    def step(self) -> None:
        """One round: level 2 drafts, the full-cache target verifies in one pass and emits."""
        ctx = self.ctx
        room = max(0, ctx.max_new_tokens - len(ctx.output) - 1)
        tokens, dists = self.middle(room) if room else ([], None)
        logits = extend(ctx.target, [self.pending] + tokens, self.full, keep=len(tokens) + 1)
        accepted, correction = verify(tokens, dists, logits, ctx.sampling, ctx.generator)
        ctx.emit(tokens[:accepted] + [correction], proposed=len(tokens))
        self.proposed, self.verified = self.proposed + len(tokens), self.verified + accepted
        crop(self.full, self.full.get_seq_length() - (len(tokens) - accepted))
        self.pending = correction


@register("triforce")
class TriForce(Method):
    paper = Paper("TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical Speculative "
                  "Decoding", arxiv="2404.11912", venue="COLM 2024")
    needs = Needs(draft=True)
    lossless = True

    @dataclass
    class Config(Settings):
        gamma1: int = setting(2, "draft-model tokens per retrieval-cache verification (release: 1)", low=1)
        gamma2: int = setting(6, "tokens the retrieval-cache target drafts per full-cache verification (release: "
                                 "6 on one GPU)", low=1)
        budget: int = setting(512, "retrieval cache entries: chunk 0, the best chunks, the recent tokens (release: "
                                   "4096 of 120k)", low=2)
        chunk: int = setting(8, "tokens per retrieval chunk, scored by their mean key (release: 8)", low=1)
        sinks: int = setting(16, "draft cache: initial tokens kept (release: 16)", low=0)
        window: int = setting(240, "draft cache: recent tokens kept (release: 256 slots with the sinks)", low=1)
        draft_prefill_chunk: int = setting(512, "draft prompt tokens per pass under its StreamingLLM cache (release: "
                                                "64)", low=1)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.budget < 2 * self.chunk:
                raise SettingError(f"budget must hold chunk 0 and one more chunk (>= 2 x chunk = {2 * self.chunk}); "
                                   f"got {self.budget}")
            if self.window <= self.gamma1 + self.gamma2:
                raise SettingError(f"window must exceed gamma1 + gamma2 ({self.gamma1 + self.gamma2}): rejected "
                                   f"tokens are cropped from the draft's window; got {self.window}")

    def generate(self, ctx: DecodeContext) -> list[int]:
        c = self.config
        if ctx.draft is None or ctx.draft is ctx.target:
            raise ValueError("triforce needs a draft model other than the target (--draft): the draft's cache "
                             "policy would act on the target's passes too")
        policy = StreamingLLM(sinks=c.sinks, window=c.window, prefill_chunk=c.draft_prefill_chunk)
        with policy.attach(ctx.draft):
            levels = Levels(ctx, c)
            levels.prefill()
            while not ctx.done:
                levels.step()
        ctx.extras["draft_acceptance"] = levels.accepted / levels.drafted if levels.drafted else 0.0
        ctx.extras["retrieval_acceptance"] = levels.verified / levels.proposed if levels.proposed else 0.0
        return ctx.output
