"""Perplexity of documents: token perplexity read with a strided sliding window, and word perplexity, byte
perplexity and bits per byte exactly as lm-evaluation-harness's wikitext task defines them (the log-likelihood
summed over a document, over its whitespace-split words, `re.split(r"\\s+")` as lm-eval counts them, and its
UTF-8 bytes; pooled over documents as lm-eval pools a corpus: harness/likelihood.py, harness/longtables.py).

Documents (each scored on its own, as lm-eval scores each document of a rolling task):
- built in: eight short texts written for this project (suites/data/prose.jsonl, about 2.9k SmolLM2 tokens;
  the same file lm-eval's `decodebench_prose_ppl` task reads), so it runs offline;
- `--data PATH`: a local text file (one document), a folder of .txt files, or a jsonl file with a `text` field
  (suites/documents.py; a malformed line is an error naming the file and line, before any model loads);
- `--option dataset=NAME` (with dataset_config, split, text_field): a Hugging Face dataset, when the network
  (or the datasets cache) is there; offline it is a clear error.
`--option length=N` cuts each document into pieces of about N tokens (at line ends); `--limit N` keeps the
first N documents.

Windows. Defaults: window = the model's max_position_embeddings (8192 for SmolLM2), stride = window, and the
first token scored after BOS (EOS without one): that is lm-eval's HF model with its default max_length
(max_position_embeddings) reading `loglikelihood_rolling` in disjoint windows, each token scored once, the
first of each later window after one token of context; the figures equal lm-eval's (tests/test_perplexity.py
checks it against lm-eval's own HFLM). `--option stride=S` (S < window) is Hugging Face's strided evaluation:
each later pass reads `window` tokens and scores the last S, so every token has at least window - S tokens
of context (lower perplexity, window / S times the passes). `--option prefix=none` leaves the first token
unscored (as longppl does). Under a cache policy (`--methods ar,streaming_llm`) a document is read in chunks
on the cache instead (`chunk`), so that the policy acts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from methods.base import SettingError, setting
from suites.base import Item, Suite, document, register
from suites.documents import (
    ReadingOptions,
    Source,
    count_tokens,
    cut,
    load_hf_dataset,
    read_documents,
)

BUILTIN = Path(__file__).parent / "data" / "prose.jsonl"


@dataclass
class PerplexityOptions(ReadingOptions):
    stride: int = setting(0, "sliding: tokens each later pass scores, at most the window (0 = window: disjoint "
                             "windows, as lm-eval)", low=0)
    prefix: Literal["bos", "none"] = setting(
        "bos", "bos: score the document's first token after the tokenizer's BOS (EOS without one), as lm-eval "
               "does; none: leave it unscored")
    length: int = setting(0, "cut each document into pieces of about this many tokens (0 = whole documents)", low=0)
    dataset: str = setting("", "a Hugging Face dataset name instead of --data (needs the network)")
    dataset_config: str = setting("", "the dataset's configuration (e.g. wikitext-2-raw-v1)")
    split: str = setting("test", "the dataset's split")
    text_field: str = setting("text", "the dataset's column holding the text")

    def stride_for(self, window: int) -> int:
        return min(self.stride or window, window)


@register("perplexity")
class PerplexitySuite(Suite):
    needs = "loglikelihood"
    description = "token/word/byte perplexity and bits per byte of documents (built-in prose, --data, or a HF dataset)"
    Options = PerplexityOptions

    def __init__(self, data: str | None = None, tokenizer: Any = None, **options: Any) -> None:
        super().__init__(data, tokenizer, **options)
        opts = self.options
        if data and opts.dataset:
            raise SettingError("perplexity: give --data or --option dataset=NAME, not both")
        if opts.dataset:
            self.sources = load_hf_dataset(opts.dataset, opts.dataset_config, opts.split, opts.text_field)
        else:
            self.sources = read_documents(data or BUILTIN)

    def items(self, limit: int | None = None) -> list[Item]:
        wanted = limit if limit is not None else float("inf")
        docs: list[Item] = []
        for source in self.sources:
            if len(docs) >= wanted:
                break
            docs += self._pieces(source, wanted - len(docs))
        return docs

    def _pieces(self, source: Source, wanted: float) -> list[Item]:
        if self.options.length:
            return cut(source, self.tokenizer, self.options.length, int(min(wanted, 1 << 30)), suffix_always=False)
        return [document(source.doc_id, source.text, meta={**source.meta, "tokens": count_tokens(self.tokenizer, source.text),
                                                            "chars": len(source.text)})]
