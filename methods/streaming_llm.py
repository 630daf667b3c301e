"""StreamingLLM: keep a few initial tokens (attention sinks) and a window of recent tokens, at positions
inside the cache.

Paper defaults (the release): 4 sinks; a recent window of 2000 in its streaming demo (Llama-2, 4k window),
255 with 1 sink in its perplexity script. Positions: a kept key sits at its slot in the cache (the
release re-applies RoPE to un-rotated cached keys; here cached keys are re-rotated by their move, which
gives the same scores).
Ours: 4 sinks + 2044 recent = a 2048-token cache. It lies well inside both embedded windows (SmolLM2-135M 8k,
Qwen2.5-0.5B 32k), so positions never leave the trained range, with room for a prefill chunk; and it is
small enough to evict at every longctx length above 2k and on a longppl document twice SmolLM2's window,
so the suites measure the policy rather than full attention. (Half the window as in the demo would be
4k for SmolLM2 but 16k for Qwen, which would never evict at our lengths.)
Open choices: eviction runs after each pass, so a pass attends to sinks + window + its own tokens (the
release's demo evicts room for the next prompt before it); prefill in chunks of 512 (the perplexity script
feeds one token at a time, the demo each turn's prompt in one pass: 512 keeps every chunk's span inside
the window at a fraction of the token-by-token cost; `prefill_chunk=1` reproduces the script); tokens of one
chunk attend to each other fully.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import Paper, register_policy, setting
from methods.common.cache_policy import CachePolicy, PolicyRun, PolicySettings


@register_policy("streaming_llm")
class StreamingLLM(CachePolicy):
    paper = Paper("Efficient Streaming Language Models with Attention Sinks", arxiv="2309.17453", venue="ICLR 2024")
    evicts = True

    @dataclass
    class Config(PolicySettings):
        sinks: int = setting(4, "initial tokens always kept (attention sinks; the release keeps 4)", low=0)
        window: int = setting(2044, "most recent tokens kept (release: 2000 in its demo, 255 in its perplexity run)",
                              low=1)
        prefill_chunk: int = setting(512, "tokens per prefill pass when the prompt is longer (1 = token by token, "
                                          "as the release's perplexity script; 0 = one pass)", low=0)

    def keep(self, run: PolicyRun, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[slice, ...] | None:
        held, sinks, window = keys.shape[-2], self.config.sinks, self.config.window
        if held <= sinks + window:
            return None
        return slice(0, sinks), slice(held - window, held)
