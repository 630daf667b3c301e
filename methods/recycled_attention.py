"""Recycled Attention (RefreshKV in the paper's ACL 2025 version): the full cache is kept; every S-th
decoding step attends to all of it, and the steps in between attend only to the K keys that the last
full step attended to most, plus the tokens that came after it.

Paper: prefill with full attention and take the prompt's last token's attention; scores max-pooled over
neighbouring positions (kernel 7, SnapKV's) before the top-K; for grouped-query attention, scores of the
query heads of one group aggregated by their max (its Table 8: max > mean > first head), so the K keys are
chosen per layer and per KV head. K = 1/8 of the input length (4096 for its 100k-token set); fixed stride
S in {10, 15} beside the adaptive query-similarity schedule of the later version.
Ours: S = 10 (the paper's fixed-stride setting), K = prompt length / 8 (`k=0`), kernel 7, max over a group.
Open choices: a full step is decoding step t with t % S == 0 (t counts passes after the prompt; its
Figure 1 has full attention at t = 3 for S = 3); the first version keeps the tokens generated since the last
full step beside the K (as here), the later one holds the small cache at exactly K by evicting its
lowest-scored entry; a pass of several tokens (a speculative verification) is one step; the prompt is
prefilled in one pass (`prefill_chunk=0`; with chunks, each chunk is a full step and the last one's
scores choose the K); the full step's own output uses plain attention, its last query's scores are
computed again beside it (as the paper does under FlashAttention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.base import Paper, SettingError, register_policy, setting
from methods.common.cache_policy import (
    CachePolicy,
    PolicyRun,
    PolicySettings,
    grouped,
    scores,
    softmax_attend,
)


def top_keys(probs: torch.Tensor, k: int, pool: int) -> torch.Tensor:
    """probs [kv_heads, group, S] of one query -> the k positions per KV head (ascending) with the highest
    max-pooled score, taking the max over the group's query heads."""
    kv_heads, group, held = probs.shape
    pooled = F.max_pool1d(probs.reshape(kv_heads * group, 1, held), pool, stride=1, padding=pool // 2)
    best = pooled.reshape(kv_heads, group, held).amax(dim=1)
    return best.topk(min(k, held), dim=-1).indices.sort(dim=-1).values


@register_policy("recycled_attention")
class RecycledAttention(CachePolicy):
    paper = Paper("Recycled Attention: Efficient inference for long-context language models (RefreshKV)",
                  arxiv="2411.05787")
    selects = True

    @dataclass
    class Config(PolicySettings):
        stride: int = setting(10, "S: every S-th decoding step attends to the full cache and re-chooses the K keys",
                              low=1)
        k: int = setting(0, "K: keys kept per KV head between full steps; 0 = one eighth of the prompt (the paper's)",
                         low=0)
        pool: int = setting(7, "width of the max-pooling over the full step's scores (odd; the paper's 7)", low=1)
        prefill_chunk: int = setting(0, "tokens per prefill pass (0 = the prompt in one full-attention pass, as the "
                                        "paper)", low=0)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.pool % 2 == 0:
                raise SettingError(f"pool must be odd (a window centred on each position); got {self.pool}")

    def begin_pass(self, run: PolicyRun) -> None:
        state = run.state
        if run.prefill:
            state.update(step=0, full=True)
            state.setdefault("chosen", {})
            state.setdefault("fresh", {})
        else:
            state["step"] += 1
            state["full"] = state["step"] % self.config.stride == 0

    def attend(self, run: PolicyRun, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor | None:
        state, kv_heads, held = run.state, key.shape[1], key.shape[-2]
        if query.shape[0] != 1:
            raise NotImplementedError("recycled_attention handles one sequence at a time")
        if state["full"]:
            self._refresh(run, layer, query, key, scaling)
            run.log(layer, torch.arange(held))
            return None
        # a decoder may have cropped the full step's own tokens (rejected drafts) since: those slots are recent now
        fresh = min(state["fresh"][layer], run.start)
        chosen = state["chosen"][layer]
        if chosen.shape[-1] >= fresh:  # every older key is chosen: plain attention
            return None
        stale = chosen >= fresh
        recent = torch.arange(fresh, held, device=key.device).expand(kv_heads, -1)
        positions = torch.cat((chosen.masked_fill(stale, 0), recent), dim=-1)  # [kv_heads, m]
        index = positions[None, :, :, None].expand(1, -1, -1, key.shape[-1])
        queries = torch.arange(held - query.shape[2], held, device=key.device)
        allowed = positions[None, :, None, None, :] <= queries[:, None]  # causal among the recent tokens
        allowed = allowed & ~torch.cat((stale, torch.zeros_like(recent, dtype=torch.bool)), dim=-1)[None, :, None, None]
        out, _ = softmax_attend(scores(grouped(query, kv_heads), key.gather(2, index), scaling), allowed,
                                value.gather(2, index))
        run.log(layer, positions)  # stale entries (masked) only after a crop
        return out

    def _refresh(self, run: PolicyRun, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """The last query of a full step chooses the K keys the next steps recycle."""
        state, held = run.state, key.shape[-2]
        if run.prefill:
            state["k"] = self.config.k or max(1, -(-held // 8))
        last = grouped(query[:, :, -1:], key.shape[1])
        probs = torch.softmax(scores(last, key, scaling).float(), dim=-1)[0, :, :, 0]  # it sees every key
        state["chosen"][layer] = top_keys(probs, state["k"], self.config.pool)
        state["fresh"][layer] = held
