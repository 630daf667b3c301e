"""RdSca: Repeated Demonstrations with Sliding Causal Attention (Gong et al., arXiv 2310.19572).

What the paper says (its abstract; title, authors and abstract are all that the stored copies hold, see below):
causal attention lets a demonstration attend only to the ones before it, so the input-label information of
later demonstrations is lost to earlier ones. RdSca duplicates the later demonstrations and puts the copies in
front, so that earlier demonstrations observe later ones under causal attention, and uses "sliding causal
attention", a customized causal mask, to avoid information leakage (in our reading: a demonstration seeing its
own copy). It reports better input-label mapping than plain ICL, without training.

Construction here, for K demonstrations d1..dK (their token spans from the suite's meta) and r copies:
    prefill = prefix | d(K-r+1)' .. dK' | d1 .. dK | query
where a demonstration's block runs from its first token to the next one's (its separator included), the
prefix is what comes before d1 (a BOS), and the copies are token-for-token the originals' tokens. Blocks are
numbered in order (copies 0..r-1, originals r..r+K-1, the query r+K). Sliding causal attention, token i in
block b attends to token j <= i when
    - j is in the prefix, or in block b itself (causal within the block);
    - b is a demonstration or a copy, and j's block is one of the K-1 blocks before b (the window);
    - b is the query (and every generated token), and j's block is an original demonstration.
With r = K-1 each demonstration then sees every other demonstration exactly once and never its own copy (its
copy lies exactly K blocks back); the query sees the prompt it would see without RdSca, whose demonstrations
now carry what they saw of the others. With r = 0 the mask is plain causal attention: `ar`.
Defaults: r = K-1 (all later demonstrations), query_sees = "demonstrations".

Not read: the paper's method section, mask figure and experiments. The stored copy of
ar5iv.labs.arxiv.org/html/2310.19572 (and the abstract mirrors: emergentmind, arxivlens, llm-bible) ends inside
the abstract; no code or full text was found elsewhere. So each line below is our choice, not the paper's:
    - which demonstrations are copied: the last r (default all but d1), in their original order;
    - the window: each demonstration or copy sees the K-1 blocks before it (the widest that hides the own copy);
    - what the query sees: the originals only (`query_sees`; "all" adds the copies);
    - the prefix (BOS) stays visible to every token (an attention sink; hiding it would change every row);
    - positions: contiguous 0..n-1 over the prefill (copies take theirs), decoding goes on from n;
    - the mask hides the own copy in direct attention only: across layers it reaches a demonstration through
      its neighbours, as any sliding window's reach grows with depth.
The paper's models, shot counts, datasets and gains were not readable either; the abstract speaks of large
language models, so a 135M model may simply not benefit: check the paper before reading a loss as a bug.
Scoring: the decoder emits text (the icl suite's `first_word_match`); `label_loglikelihoods` scores the label
continuations under the same prefill (the suite's `label_loglikelihood`) for a harness path that scores
choices. Compare rdsca with the plain baseline on the same metric: `ar`'s text (or, for choices, this
function with repeat=0, which is plain causal scoring).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import torch
from transformers import DynamicCache

from methods.ar import decode_from
from methods.base import DecodeContext, Method, Paper, Settings, register, setting
from methods.common.kv import crop, forward, new_cache

PREFIX = -1  # the block of the tokens before the first demonstration


@dataclass(frozen=True)
class Replay:
    """The prefill of one item: tokens, each token's block, and where the copies lie."""

    ids: list[int]
    blocks: list[int]  # PREFIX, copies 0..copies-1, demonstrations copies..copies+shots-1, then the query
    shots: int
    copies: int
    copy_span: tuple[int, int]  # token range [start, end) of the copies in `ids`

    @property
    def query_block(self) -> int:
        return self.copies + self.shots


def replay(prompt_ids: list[int], demo_spans: list[list[int]], query_span: list[int], repeat: int = -1) -> Replay:
    """The repeated-demonstration prefill: the last `repeat` demonstrations (-1: all but the first) copied in
    front of the first, after the prefix."""
    shots = len(demo_spans)
    starts = [int(s) for s, _ in demo_spans] + [int(query_span[0])]
    if any(b <= a for a, b in pairwise(starts)) or starts[0] < 0 or starts[-1] >= len(prompt_ids):
        raise ValueError(f"demonstration and query token spans must start in order inside the prompt "
                         f"({len(prompt_ids)} tokens); got starts {starts}")
    copies = max(shots - 1, 0) if repeat < 0 else min(repeat, max(shots - 1, 0))
    demos = [list(prompt_ids[a:b]) for a, b in pairwise(starts)]
    copied = demos[shots - copies:]
    head = starts[0]
    ids = list(prompt_ids[:head]) + [t for demo in copied for t in demo] + list(prompt_ids[head:])
    blocks = ([PREFIX] * head + [c for c, demo in enumerate(copied) for _ in demo]
              + [copies + k for k, demo in enumerate(demos) for _ in demo]
              + [copies + shots] * (len(prompt_ids) - starts[-1]))
    width = sum(len(d) for d in copied)
    return Replay(ids, blocks, shots, copies, (head, head + width))


def sliding_causal_mask(rep: Replay, query_sees: str = "demonstrations") -> np.ndarray:
    """visible[i, j]: may token i attend to token j (n x n, bool), as the module docstring defines it."""
    b = np.asarray(rep.blocks)
    row, col = b[:, None], b[None, :]
    demo_row = (row >= 0) & (row < rep.query_block)
    window = demo_row & (col < row) & (col >= row - (rep.shots - 1))
    query_row = row == rep.query_block
    seen_by_query = col >= (rep.copies if query_sees == "demonstrations" else 0)
    visible = (col == PREFIX) | (row == col) | window | (query_row & seen_by_query)
    return visible & np.tri(len(b), dtype=bool)


def additive(visible: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    """A bool visibility matrix as the 1 x 1 x q x kv additive mask transformers takes as-is (0 or dtype min;
    eager attention adds the mask, so not bool)."""
    mask = torch.zeros(1, 1, *visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(torch.from_numpy(~visible).to(device), torch.finfo(dtype).min)


class ReplayKV:
    """The target's cache after the RdSca prefill, fed on with the copies hidden from every later token."""

    def __init__(self, model: torch.nn.Module, rep: Replay, query_sees: str) -> None:
        self.model, self.rep, self.query_sees = model, rep, query_sees
        self.hide = rep.copy_span if query_sees == "demonstrations" and rep.copies else None
        self.cache: DynamicCache = new_cache(model)
        self.dtype = next(model.parameters()).dtype
        self.length = 0

    def prefill(self) -> torch.Tensor:
        """The last prompt position's logits."""
        mask = additive(sliding_causal_mask(self.rep, self.query_sees), self.dtype, self.model.device)
        return self._forward(self.rep.ids, mask, keep=1)[-1]

    def feed(self, tokens: list[int], keep: int | None = 1) -> torch.Tensor:
        """Logits after `tokens` (fed causally after what the cache holds), the copies masked."""
        past, q = self.length, len(tokens)
        visible = np.concatenate([np.ones((q, past), dtype=bool), np.tri(q, dtype=bool)], 1)
        if self.hide:
            visible[:, self.hide[0]:self.hide[1]] = False
        return self._forward(tokens, additive(visible, self.dtype, self.model.device), keep)

    def _forward(self, tokens: list[int], mask: torch.Tensor, keep: int | None) -> torch.Tensor:
        device, start = self.model.device, self.length
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        kwargs = {"logits_to_keep": keep} if keep else {}
        out = forward(self.model, self.cache, input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        self.length += len(tokens)
        return out.logits[0]

    def rewind(self, length: int) -> None:
        crop(self.cache, length)
        self.length = length


def replay_for(ctx: DecodeContext, repeat: int) -> Replay:
    meta = ctx.item_meta or {}
    if "demo_token_spans" not in meta or "query_token_span" not in meta:
        raise ValueError("rdsca needs an item whose suite marks its demonstrations and query in tokens "
                         "(meta['demo_token_spans'], meta['query_token_span'], as the icl suite does with a "
                         "tokenizer); this item has none")
    return replay(list(ctx.prompt_ids), meta["demo_token_spans"], meta["query_token_span"], repeat)


def label_loglikelihoods(model: torch.nn.Module, rep: Replay, continuations: list[list[int]],
                         query_sees: str = "demonstrations") -> list[float]:
    """Log-likelihood of each continuation (token ids, e.g. ' positive') after the RdSca prefill."""
    kv = ReplayKV(model, rep, query_sees)
    last = kv.prefill().float().log_softmax(-1)
    base, out = kv.length, []
    for tokens in continuations:
        if not tokens:
            raise ValueError("an empty continuation has no likelihood")
        total = float(last[tokens[0]])
        if len(tokens) > 1:
            rows = kv.feed(tokens[:-1], keep=None).float().log_softmax(-1)
            total += float(rows[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].sum())
            kv.rewind(base)
        out.append(total)
    return out


@register("rdsca")
class RepeatedDemonstrations(Method):
    paper = Paper("Improving Input-label Mapping with Demonstration Replay for In-context Learning",
                  arxiv="2310.19572")
    lossless = False  # the demonstrations are read differently: another output distribution

    @dataclass
    class Config(Settings):
        repeat: int = setting(-1, "later demonstrations copied in front (-1: all but the first, the paper's "
                                  "'later demonstrations'; 0: none, which is plain in-context decoding)", low=-1, high=32)
        query_sees: Literal["demonstrations", "all"] = setting(
            "demonstrations", "what the query and the answer attend to besides the prefix and themselves: the "
                              "original demonstrations (the prompt without RdSca), or the copies too")

    def generate(self, ctx: DecodeContext) -> list[int]:
        rep = replay_for(ctx, self.config.repeat)
        ctx.extras["rdsca_prompt_tokens"] = float(len(rep.ids))
        ctx.extras["rdsca_copies"] = float(rep.copies)
        kv = ReplayKV(ctx.target, rep, self.config.query_sees)
        return decode_from(ctx, kv.prefill(), lambda token: kv.feed([token])[-1])
