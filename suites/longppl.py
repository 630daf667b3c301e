"""Documents for long-document perplexity (StreamingLLM's evaluation: one text longer than the window, scored
token by token or in chunks under each cache policy).

Items are documents (see suites/base.py): `turns == (text,)`. The built-in documents are generated town
chronicles (suites/chronicle.py, seeded), each cut at the first paragraph end past `length` tokens of the
target's tokenizer (about 4 characters a token when no tokenizer is given); `--data FILE` takes any local text,
cut into `documents` consecutive pieces of about `length` tokens (at the next line end).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from methods.base import Settings, setting
from suites.base import Item, Suite, SuiteDataError, document, read_text_file, register
from suites.chronicle import Chronicle

CHARS_PER_TOKEN = 4  # the estimate used when no tokenizer is given


@dataclass
class LongPerplexityOptions(Settings):
    length: int = setting(16384, "tokens per document (about 2x SmolLM2's 8k window)", low=16, high=1 << 22)
    documents: int = setting(1, "documents (generated ones get seeds seed, seed+1, ...)", low=1, high=10_000)
    seed: int = setting(0, "seed of the generated documents")
    # how a document is read (harness/likelihood.py)
    chunk: int = setting(256, "tokens per pass when reading on the cache (1 = token by token, as StreamingLLM's "
                              "script): a cache policy acts between passes", low=1)
    full_attention: Literal["sliding", "dense"] = setting(
        "sliding", "without a policy: a strided sliding window within the model's window, or one cache that keeps "
                   "everything (positions run past the window)")
    window: int = setting(0, "sliding: tokens per window (0 = the model's max_position_embeddings)", low=0)
    stride: int = setting(0, "sliding: tokens each later window scores (0 = window / 4)", low=0)


@register("longppl")
class LongPerplexitySuite(Suite):
    needs = "loglikelihood"
    description = "long documents for perplexity against position (generated chronicle, or --data text)"
    Options = LongPerplexityOptions

    def __init__(self, data: str | None = None, tokenizer: Any = None, **options: Any) -> None:
        super().__init__(data, tokenizer, **options)
        self.text = read_text_file(data) if data else None
        if self.text is not None and not self.text.strip():
            raise SuiteDataError(f"{data}: empty text")

    def count(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def items(self, limit: int | None = None) -> list[Item]:
        wanted = min(self.options.documents, limit) if limit is not None else self.options.documents
        docs = self._from_text(wanted) if self.text is not None else [self._generated(i) for i in range(wanted)]
        return docs

    def _generated(self, index: int) -> Item:
        seed = self.options.seed + index
        chronicle = Chronicle(random.Random(f"longppl:{seed}"))
        parts = [chronicle.title()]
        tokens, chars = self.count(parts[0]), len(parts[0])
        while (tokens if tokens is not None else chars / CHARS_PER_TOKEN) < self.options.length:
            paragraph = chronicle.paragraph()
            parts.append(paragraph)
            chars += len(paragraph)
            if tokens is not None:
                tokens += self.count(paragraph)  # paragraphs follow a blank line: their tokens add up
        text = "".join(parts).rstrip() + "\n"
        return document(f"chronicle-{seed}", text, meta={"source": "generated", "seed": seed,
                                                         "tokens": self.count(text), "chars": len(text)})

    def _from_text(self, wanted: int) -> list[Item]:
        text, stem = self.text, Path(self.data).stem
        length = self.options.length
        ends = self._token_ends(text)
        docs: list[Item] = []
        start = 0
        while len(docs) < wanted and start < len(text):
            if ends:  # the end of the piece's length-th token, then on to the line's end
                cut = ends[min(len(ends) - 1, bisect.bisect_right(ends, start) + length - 1)]
            else:
                cut = min(len(text), start + length * CHARS_PER_TOKEN)
            newline = text.find("\n", cut)
            stop = len(text) if newline < 0 else newline + 1
            piece = text[start:stop]
            if piece.strip():
                docs.append(document(f"{stem}-{len(docs)}", piece, meta={
                    "source": str(self.data), "start_char": start, "tokens": self.count(piece), "chars": len(piece)}))
            start = stop
        return docs

    def _token_ends(self, text: str) -> list[int]:
        """The end character of every token of the text (empty without a tokenizer)."""
        if self.tokenizer is None:
            return []
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [end for _, end in offsets]
