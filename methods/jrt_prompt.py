"""JRT-Prompt (Arora et al., "Just read twice"): the context is given twice, the question before and after it,
then the answer is decoded as `ar` does.

The release's layout (HazyResearch/prefix-linear-attention, lm-eval-harness tasks `*_twice`: NQ, TriviaQA,
DROP, FDA, SWDE, SQuAD): `{question} {context}\\n{context} {question}`, i.e. the question, a space, the
context, a newline, the context again, a space, the question (the QA tasks put the natural question first and
their cloze cue last; FDA/SWDE put "Information about {key}." first). Here, on a `longctx` item, the user turn
`instructions + context + question` (RULER's layout; the question is the text after `meta['context_span']`)
becomes
    instructions + question + " " + context + "\\n" + context + " " + question
rendered as the suite renders its prompt (`suites.sizing.PromptFormat`: the chat template around the user turn
when the prompt was made with it, then `meta['answer_prefix']`), and tokenized once.
Deviations, in one line each: the release also trims each context to end in exactly one period (a clean-up of
its datasets' text), here the context is kept verbatim; the instructions before the context (the release's
prompts have none) stay first.
The user text is recovered by decoding the prompt ids and checked by re-tokenizing it (an error if the tokenizer
does not give the same ids back). An item without a marked context (a plain chat item) is an error, not a
fallback: repeating a whole chat prompt is another method, and its record would pass for JRT's.
The extra prefill is counted by the harness (target tokens processed); the record's prompt_tokens stay the
original prompt's, and `ctx.extras` carries `jrt_prompt_tokens` and `jrt_extra_tokens`.
"""
from __future__ import annotations

from typing import Any

from methods.ar import decode_from
from methods.base import DecodeContext, Method, Paper, SettingError, register
from methods.common.kv import extend, new_cache
from suites.sizing import PromptFormat


def jrt_user_text(user: str, span: tuple[int, int] | list[int]) -> str:
    """The user turn in the release's layout: instructions, question, context, context again, question."""
    start, end = span
    if not 0 <= start <= end <= len(user):
        raise ValueError(f"context_span {list(span)} is outside the user turn ({len(user)} characters)")
    instructions, context, question = user[:start], user[start:end], user[end:].strip()
    if not question:
        raise ValueError("no question after the context: JRT-Prompt needs the question to place it twice")
    return f"{instructions}{question} {context}\n{context} {question}"


def decode_exact(tokenizer: Any, ids: list[int], fmt: PromptFormat) -> str | None:
    """The text that `fmt` tokenizes back to exactly `ids`, or None."""
    text = tokenizer.decode(ids, skip_special_tokens=fmt.special, clean_up_tokenization_spaces=False)
    return text if fmt.ids(text) == ids else None


def split_prompt(tokenizer: Any, ids: list[int], answer_prefix: str) -> tuple[PromptFormat, str]:
    """The format (chat template or plain) the prompt was rendered with, and its user turn."""
    for chat in (True, False):
        try:
            fmt = PromptFormat(tokenizer, chat=chat)
        except SettingError:  # the template rewrites the user text: only the plain format can match
            continue
        text = decode_exact(tokenizer, ids, fmt)
        closing = fmt.tail + answer_prefix
        if text is not None and text.startswith(fmt.head) and text.endswith(closing) \
                and len(text) >= len(fmt.head) + len(closing):
            return fmt, text[len(fmt.head): len(text) - len(closing)]
    raise ValueError("jrt_prompt: the prompt ids do not decode to a text that this tokenizer turns back into the "
                     "same ids, in the suite's format (chat template or plain, then the answer prefix)")


def jrt_prompt_ids(ctx: DecodeContext) -> list[int]:
    meta = ctx.item_meta or {}
    if "context_span" not in meta:
        raise ValueError("jrt_prompt needs an item whose suite marks its context and question (meta['context_span'], "
                         "as the longctx suite does); this item has none (a plain chat item?)")
    if ctx.tokenizer is None:
        raise ValueError("jrt_prompt needs the target's tokenizer to rebuild the prompt")
    fmt, user = split_prompt(ctx.tokenizer, list(ctx.prompt_ids), meta.get("answer_prefix", ""))
    return fmt.ids(fmt.text(jrt_user_text(user, meta["context_span"]), meta.get("answer_prefix", "")))


@register("jrt_prompt")
class JustReadTwice(Method):
    paper = Paper("Just read twice: closing the recall gap for recurrent language models", arxiv="2407.05483")
    lossless = False  # another prompt: another output distribution

    def generate(self, ctx: DecodeContext) -> list[int]:
        ids = jrt_prompt_ids(ctx)
        ctx.extras["jrt_prompt_tokens"] = float(len(ids))
        ctx.extras["jrt_extra_tokens"] = float(len(ids) - len(ctx.prompt_ids))
        cache = new_cache(ctx.target)
        logits = extend(ctx.target, ids, cache, keep=1)[-1]
        return decode_from(ctx, logits, lambda token: extend(ctx.target, [token], cache)[-1])
