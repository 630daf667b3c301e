"""InfLLM: attention to the initial tokens, a local window, and the memory units (blocks of past tokens)
whose representative keys best match the current chunk's queries.

Paper and release defaults: blocks of 128 tokens, n_init 128 initial tokens, n_local 4096, top 16 blocks
retrieved, 4 representative keys per block (the block's tokens that received the most attention from
the local-window queries while they were in the window, their keys averaged), retrieval by the mean
query of each 512-token execution block (exc_block_size), every memory key (initial tokens, retrieved
blocks, tokens past the window not yet in a block) at one position: queries at n_local, memory keys at 0.
Ours: n_local 1024, the rest as released. The release's 4096 is half of SmolLM2-135M's 8k window and longer
than most longctx prompts here (1k-8k), which it would read with plain attention; 1024 puts most of every
prompt above 2k in memory while init + 16 blocks + local (3.2k keys) stays well inside both models' windows.
Open choices: the local window holds n_local keys, the query's own included; a block joins memory once all
of its tokens have left the window at the end of a pass (the release: when the tokens past the window
exceed a block); the prompt goes in passes of 512 (= the release's execution block; it feeds the model
8192 at a time but retrieves per 512), and a decoding step retrieves for its single query; retrieval is
per layer, shared by its heads (scores summed over heads), representative keys per query head; the full
cache stays in the model's DynamicCache (the release offloads memory units to CPU and keeps a GPU cache of
them), so the KV bytes held are those of full attention; scores use the whole joint softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import Paper, SettingError, register_policy, setting
from methods.common.cache_policy import (
    CachePolicy,
    PolicyRun,
    PolicySettings,
    grouped,
    scores,
    softmax_attend,
)


@register_policy("infllm")
class InfLLM(CachePolicy):
    paper = Paper("InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient Context Memory",
                  arxiv="2402.04617")
    selects = True
    rotates = True

    @dataclass
    class Config(PolicySettings):
        n_init: int = setting(128, "initial tokens always attended (as memory once out of the window)", low=0)
        n_local: int = setting(1024, "local window (keys at their true distance; release 4096, scaled down here)",
                               low=1)
        block_size: int = setting(128, "tokens per memory unit", low=1)
        topk: int = setting(16, "memory units retrieved per chunk and layer", low=0)
        repr_topk: int = setting(4, "representative keys per unit (most attended while in the window)", low=1)
        prefill_chunk: int = setting(512, "tokens per prefill pass, one retrieval each (the release's execution "
                                          "block); at most n_local", low=1)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.prefill_chunk > self.n_local:
                raise SettingError(f"prefill_chunk must be at most n_local ({self.n_local}): a chunk's own tokens are "
                                   f"local to it; got {self.prefill_chunk}")
            if self.repr_topk > self.block_size:
                raise SettingError(f"repr_topk must be at most block_size ({self.block_size}); got {self.repr_topk}")

    def attend(self, run: PolicyRun, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor | None:
        if query.shape[0] != 1:
            raise NotImplementedError("infllm handles one sequence at a time")
        cfg, kv_heads, held, device = self.config, key.shape[1], key.shape[-2], key.device
        memory = run.state.setdefault("memory", {}).setdefault(layer, {
            "received": torch.zeros(query.shape[1], 0, device=device),  # [heads, held] attention while local
            "repr": key.new_zeros(0, query.shape[1], key.shape[-1]),  # [units, heads, head_dim] at position 0
        })
        at = torch.arange(held - query.shape[2], held, device=device)  # the queries' positions
        if held <= cfg.n_local:  # every key is local: plain attention; still score keys for the units to come
            logits = scores(grouped(query, kv_heads), key, scaling)
            allowed = torch.arange(held, device=device) <= at[:, None]
            _, probs = softmax_attend(logits, allowed, value)
            self._remember(run, memory, probs, allowed, torch.arange(held, device=device), key)
            return None
        rotation = run.rotation
        memory_query = rotation.rotate(query, cfg.n_local - at)  # every query at position n_local
        positions = self._retrieved(memory, memory_query, held, device)
        everything = positions.shape[0] == held  # no unit left out: the cache as it is, no copy
        k, v = (key, value) if everything else (key[:, :, positions], value[:, :, positions])
        distance = at[:, None] - positions
        local, remote = (distance >= 0) & (distance < cfg.n_local), distance >= cfg.n_local
        # memory scores (query at n_local, keys at 0) for every key; local ones only where some query is near
        logits = scores(grouped(memory_query, kv_heads), rotation.to_zero(k, positions), scaling)
        near = int(torch.searchsorted(positions, held - query.shape[2] - cfg.n_local + 1))
        logits[..., near:] = torch.where(local[:, near:], scores(grouped(query, kv_heads), k[:, :, near:], scaling),
                                         logits[..., near:])
        out, probs = softmax_attend(logits, local | remote, v)
        self._remember(run, memory, probs, local, positions, key)
        run.log(layer, positions)
        return out

    def _retrieved(self, memory: dict, memory_query: torch.Tensor, held: int, device) -> torch.Tensor:
        """Positions this pass attends: initial tokens, the top units by the chunk's mean query, and every
        token after the last unit (the local window among them)."""
        cfg, units = self.config, memory["repr"].shape[0]
        chosen = torch.arange(units, device=device)
        if units > cfg.topk:
            mean = memory_query[0].mean(dim=1)  # [heads, head_dim]
            fit = torch.einsum("hd,uhd->u", mean.float(), memory["repr"].float())
            chosen = fit.topk(cfg.topk).indices.sort().values
        offsets = torch.arange(cfg.block_size, device=device)
        blocks = (cfg.n_init + chosen[:, None] * cfg.block_size + offsets).flatten()
        init = torch.arange(min(cfg.n_init, held), device=device)
        rest = torch.arange(min(cfg.n_init + units * cfg.block_size, held), held, device=device)
        return torch.cat((init, blocks, rest))

    def _remember(self, run: PolicyRun, memory: dict, probs: torch.Tensor, local: torch.Tensor,
                  positions: torch.Tensor, key: torch.Tensor) -> None:
        """Add the attention each key received from local queries; turn tokens that left the window into units."""
        cfg, heads = self.config, probs.shape[1] * probs.shape[2]
        received = probs.mul_(local.to(probs.dtype)).sum(dim=3)[0].reshape(heads, -1)  # [heads, m]; probs spent
        held, before = key.shape[-2], key.shape[-2] - probs.shape[3]
        acc = memory["received"][:, :before]  # scores of slots a decoder cropped since (rejected drafts) go
        acc = memory["received"] = torch.cat((acc, acc.new_zeros(heads, held - acc.shape[1])), dim=1)
        acc.index_add_(1, positions, received.float())
        units = memory["repr"].shape[0]
        kv_of_head = torch.arange(heads, device=key.device) // (heads // key.shape[1])
        new = []
        while cfg.n_init + (units + 1) * cfg.block_size <= held - cfg.n_local:
            first = cfg.n_init + units * cfg.block_size
            best = acc[:, first:first + cfg.block_size].topk(cfg.repr_topk, dim=-1).indices + first  # [heads, r]
            chosen = key[0, kv_of_head[:, None], best]  # [heads, r, head_dim]
            new.append(run.rotation.rotate(chosen, -best).mean(dim=1))
            units += 1
        if new:
            memory["repr"] = torch.cat((memory["repr"], torch.stack(new)))
