"""transformers' own `generate` and assisted generation, run as peers so every report compares
our implementations with what users already have. They are references, not ours."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from methods.base import DecodeContext, Method, Needs, Paper, Settings, register, setting

_TRANSFORMERS = "https://github.com/huggingface/transformers"


def _generation_config(ctx: DecodeContext, **extra) -> GenerationConfig:
    """A fresh config, so a model's shipped defaults (repetition penalty, top-k...) cannot leak in."""
    s = ctx.sampling
    eos = sorted(ctx.eos_token_ids)
    return GenerationConfig(
        max_new_tokens=ctx.max_new_tokens,
        do_sample=not s.greedy,
        temperature=s.temperature if not s.greedy else None,
        top_p=s.top_p if not s.greedy else None,
        top_k=s.top_k if not s.greedy else None,
        eos_token_id=eos,
        pad_token_id=eos[0] if eos else None,
        **extra,
    )


def _run(ctx: DecodeContext, config: GenerationConfig, **kwargs) -> list[int]:
    ids = torch.tensor([ctx.prompt_ids], dtype=torch.long, device=ctx.target.device)
    torch.manual_seed(ctx.sampling.seed)  # transformers samples from the global generator
    with torch.inference_mode():
        out = ctx.target.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs
        )
    ctx.emit(out[0, ids.shape[1] :].tolist(), record_step=False)  # per-step acceptance is not exposed
    return ctx.output


@register("hf_generate")
class TransformersGenerate(Method):
    paper = Paper("transformers generate()", url=_TRANSFORMERS)
    lossless = True
    reference = True
    counterpart = "ar"

    def generate(self, ctx: DecodeContext) -> list[int]:
        return _run(ctx, _generation_config(ctx))


@register("hf_assisted")
class TransformersAssisted(Method):
    paper = Paper("transformers assisted generation", url=_TRANSFORMERS)
    needs = Needs(draft=True)
    lossless = True
    reference = True
    counterpart = "sps"

    @dataclass
    class Config(Settings):
        num_assistant_tokens: int = setting(5, "draft tokens per step: sps's gamma, constant, no confidence cut-off",
                                            low=1)

    def generate(self, ctx: DecodeContext) -> list[int]:
        # transformers reads these from the ASSISTANT's generation config (default: 20 tokens, 0.4 cut-off)
        schedule = {
            "num_assistant_tokens": self.config.num_assistant_tokens,
            "num_assistant_tokens_schedule": "constant",
            "assistant_confidence_threshold": 0.0,
        }
        draft_config = ctx.draft.generation_config
        saved = {key: getattr(draft_config, key, None) for key in schedule}
        try:
            for key, value in schedule.items():
                setattr(draft_config, key, value)
            return _run(ctx, _generation_config(ctx, **schedule), assistant_model=ctx.draft)
        finally:
            for key, value in saved.items():
                setattr(draft_config, key, value)
