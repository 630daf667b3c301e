"""Documents for the likelihood suites (perplexity, longppl): reading them from local files or a Hugging Face
dataset, cutting them into pieces of about N tokens, and the options that say how the runner reads them
(harness/likelihood.py). Errors are SuiteDataError naming the file and line, raised before any model loads.

Local input (`--data PATH`):
- a `.jsonl` file: one JSON object a line with a string `text` (and optionally `id`); blank lines skipped;
- a folder: every `*.txt` file in it (sorted by name), one document each;
- any other file: its whole text, one document.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from methods.base import Settings, setting
from suites.base import Item, SuiteDataError, document, read_text_file

CHARS_PER_TOKEN = 4  # the estimate used when no tokenizer is given


@dataclass
class ReadingOptions(Settings):
    """How the runner reads a document (harness/likelihood.py); a likelihood suite's Options extend these."""

    chunk: int = setting(256, "tokens per pass when reading on the cache (1 = token by token, as StreamingLLM's "
                              "script): a cache policy acts between passes", low=1)
    full_attention: Literal["sliding", "dense"] = setting(
        "sliding", "without a policy: a strided sliding window within the model's window, or one cache that keeps "
                   "everything (positions run past the window)")
    window: int = setting(0, "sliding: tokens each pass reads (0 = the model's max_position_embeddings)", low=0)
    stride: int = setting(0, "sliding: tokens each later pass scores, at most the window (0 = window / 4)", low=0)
    prefix: Literal["bos", "none"] = setting(
        "none", "bos: score the document's first token after the tokenizer's BOS (EOS without one), as lm-eval "
                "does; none: leave it unscored")

    def stride_for(self, window: int) -> int:
        return min(self.stride or max(1, window // 4), window)


@dataclass(frozen=True)
class Source:
    """One document as read: its id, text and where it came from (JSON-able)."""

    doc_id: str
    text: str
    meta: dict[str, Any]


def read_documents(path: str | Path) -> list[Source]:
    """The documents of a local .jsonl file, folder of .txt files, or text file (module docstring)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise SuiteDataError(f"{path}: a folder with no .txt files")
        return [_whole(p) for p in files]
    if path.suffix == ".jsonl":
        return _jsonl(path)
    return [_whole(path)]


def _whole(path: Path) -> Source:
    text = read_text_file(path)
    if not text.strip():
        raise SuiteDataError(f"{path}: empty text")
    return Source(path.stem, text, {"source": str(path)})


def _jsonl(path: Path) -> list[Source]:
    docs = []
    for line_no, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SuiteDataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict) or "text" not in row:
            raise SuiteDataError(f"{where}: each line must be a JSON object with a 'text' field")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise SuiteDataError(f"{where}: 'text' must be a non-empty string")
        doc_id = str(row.get("id", f"{path.stem}-{line_no}"))
        docs.append(Source(doc_id, row["text"], {"source": str(path), "line": line_no}))
    if not docs:
        raise SuiteDataError(f"{path}: no documents (every line blank)")
    ids = [d.doc_id for d in docs]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise SuiteDataError(f"{path}: document id(s) {', '.join(repeated)} appear more than once")
    return docs


def load_hf_dataset(name: str, config: str, split: str, field: str) -> list[Source]:
    """A Hugging Face dataset's `field` column, one document a row; needs the network (or the datasets cache).
    Offline (or a wrong name, split or field) is a SuiteDataError saying so."""
    try:
        import datasets
    except ImportError:
        raise SuiteDataError("dataset=...: the `datasets` package is not installed (pip install datasets)") from None
    where = f"dataset {name}" + (f" ({config})" if config else "") + f", split {split}"
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name or split: all one message
        raise SuiteDataError(f"{where} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                             "offline, use --data with a local text, folder or jsonl file") from None
    if field not in rows.column_names:
        raise SuiteDataError(f"{where} has no column {field!r}; it has {', '.join(rows.column_names)}")
    return [Source(f"{name.split('/')[-1]}-{i}", text, {"source": f"hf:{name}", "row": i})
            for i, text in enumerate(rows[field]) if isinstance(text, str) and text.strip()]


def token_ends(tokenizer: Any, text: str) -> list[int]:
    """The end character of every token of the text (empty without a tokenizer)."""
    if tokenizer is None:
        return []
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [end for _, end in offsets]


def count_tokens(tokenizer: Any, text: str) -> int | None:
    if tokenizer is None:
        return None
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut(source: Source, tokenizer: Any, length: int, wanted: int, suffix_always: bool = True) -> list[Item]:
    """Consecutive pieces of about `length` tokens of the target's tokenizer (about 4 characters a token
    without one), each cut at the end of the line its length-th token is on; at most `wanted` pieces.
    Ids `<doc_id>-<i>` (only `<doc_id>` for a document left whole when not `suffix_always`)."""
    text, ends = source.text, token_ends(tokenizer, source.text)
    pieces: list[tuple[int, str]] = []
    start = 0
    while len(pieces) < wanted and start < len(text):
        if ends:  # the end of the piece's length-th token, then on to the line's end
            at = ends[min(len(ends) - 1, bisect.bisect_right(ends, start) + length - 1)]
        else:
            at = min(len(text), start + length * CHARS_PER_TOKEN)
        newline = text.find("\n", at)
        stop = len(text) if newline < 0 else newline + 1
        if text[start:stop].strip():
            pieces.append((start, text[start:stop]))
        start = stop
    whole = len(pieces) == 1 and pieces[0][1] == text and not suffix_always
    return [document(source.doc_id if whole else f"{source.doc_id}-{i}", piece,
                     meta={**source.meta, "start_char": begin, "tokens": count_tokens(tokenizer, piece),
                           "chars": len(piece)})
            for i, (begin, piece) in enumerate(pieces)]
