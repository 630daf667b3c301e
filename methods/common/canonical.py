"""Byte-level BPE tokenizers seen from the bytes: each token's bytes, and which token sequences are canonical.

A byte-level BPE tokenizer (Hugging Face `tokenizers`: a BPE model, a ByteLevel pre-tokenizer and decoder, no
normalizer but NFC, which transformers adds to Qwen2's) cuts a text into pre-tokens with a regex (GPT-2's, or
Qwen2's Split), then runs BPE inside each pre-token. Its canonical encoding of a text is the only one it ever
produces; a language model trained on its output only ever saw canonical sequences.

Canonical prefix. A token sequence T is a canonical prefix when some text extending its bytes encodes to a
sequence starting with T: T = encode(bytes(T) + z)[:len(T)] for some continuation z. Checking only z = ""
(re-encoding bytes(T) alone, as Phan et al.'s release does for SentencePiece) is wrong under a regex
pre-tokenizer: SmolLM2 encodes "a\\n\\nb" as [a, \\n, \\n, b] but "a\\n\\n" as [a, \\n\\n], so the text's own
encoding of its first three characters fails a z = "" check. `Canonical.check` re-encodes with a set of
probe continuations instead (`PROBES`, one or two characters of every class the regexes read). Why that
suffices: (1) BPE inside one pre-token is prefix-closed (a token boundary of bpe(word) at k implies the tokens
before it are bpe(word[:k]): merges never cross a final boundary, and the merges left of it run in the same
order alone), so a continuation can only matter by moving pre-token boundaries inside bytes(T); (2) the
GPT-2 and Qwen2 regexes decide a pre-token by reading at most 3 characters past its start or 1 past a run of
one class, except whitespace runs, which they read to the first non-space; so z matters only through the
class of its first character (its first two for contractions like 're). A text ending in a letter or digit,
with no apostrophe among its last 3 characters, needs no probe: any z keeps the boundaries inside it or
removes the last one. tests/test_byte_level.py compares this with every continuation of up to 2 characters
from a wide alphabet on both embedded tokenizers.

Windows. Re-encoding the whole prefix for every check costs O(length); a check re-encodes only the bytes from
an anchor: a pre-token start of the known text that no continuation can move (`Canonical.anchors`: a
non-space character at or after it, with 2 more characters known after that one, so every regex decision up
to the anchor read only known characters). Tokens never cross a pre-token boundary, so every canonical
prefix passes through the anchor with the text's own tokens before it. Where a boundary is certain between
a sequence and its next token (`Canonical.boundary`), the two are checked apart (`initial`: per token, once).

A sequence ending inside a multi-byte UTF-8 character is checked on that character completed: by the text's
own bytes where the caller has them (it passes them), else by the smallest continuation bytes that decode
(an approximation: another completion could be a character of another class; rare, and never in ASCII text).
"""
from __future__ import annotations

import bisect
import json
import unicodedata
from functools import lru_cache

import numpy as np

# continuations tried when "" fails: every class the regexes read (space, newline, letter, digit, punctuation,
# apostrophe, non-ASCII letters) and the letters of the contractions 's 't 're 've 'm 'll 'd, both cases
PROBES = ("", " ", "\n", "\t", "\r\n", "  ", "\n\n", " a", "\na", "a", "A", "0", ".", "(", "'", "'s", "é", "中",
          *"stelrvmd", *"STELRVMD")


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def backend_config(tokenizer) -> dict:
    """The tokenizer.json of a fast tokenizer, refusing what is not byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError("byte-level probabilities need a fast (tokenizers) tokenizer")
    config = json.loads(backend.to_str())
    model, decoder = config.get("model") or {}, config.get("decoder") or {}
    normalizer = (config.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or normalizer not in (None, "NFC"):
        raise NotImplementedError("byte-level probabilities are written for byte-level BPE (a BPE model, a ByteLevel "
                                  "decoder, no normalizer but NFC); this tokenizer is not one")
    if model.get("byte_fallback") or model.get("dropout"):
        raise NotImplementedError("BPE with byte fallback or dropout is not byte-level BPE")
    return config


class ByteVocab:
    """Every token's bytes (b"" for special and added tokens, and for model rows the tokenizer lacks), in a
    dict, a padded matrix, and sorted (a prefix's tokens are one range of the sorted order)."""

    def __init__(self, tokenizer, size: int) -> None:
        config = backend_config(tokenizer)
        added = {entry["id"] for entry in config.get("added_tokens", [])}
        byte_of = _byte_of_char()
        self.bytes: list[bytes] = [b""] * size
        for text, index in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
            if index < size and index not in added and all(c in byte_of for c in text):
                self.bytes[index] = bytes(byte_of[c] for c in text)
        self.ids = {b: i for i, b in enumerate(self.bytes) if b}
        self.lengths = np.array([len(b) for b in self.bytes], dtype=np.int64)
        self.maxlen = int(self.lengths.max())
        matrix = np.zeros((size, self.maxlen), dtype=np.uint8)
        for i, b in enumerate(self.bytes):
            matrix[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        self.matrix = matrix
        self.order = np.array(sorted(self.ids.values(), key=lambda i: self.bytes[i]), dtype=np.int64)
        self.sorted = [self.bytes[i] for i in self.order]

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """[lo, hi) of the sorted order: the tokens whose bytes start with `prefix`."""
        lo = bisect.bisect_left(self.sorted, prefix)
        return lo, bisect.bisect_right(self.sorted, prefix + b"\xff" * self.maxlen, lo)

    def matches(self, text: bytes, start: int) -> tuple[np.ndarray, np.ndarray]:
        """The tokens whose first byte is text[start] and how many bytes of text[start:] each agrees with."""
        first = self.prefix_range(text[start:start + 1])
        ids = self.order[first[0]:first[1]]
        agree = np.zeros(len(ids), dtype=np.int64)
        depth = 1
        while depth <= self.maxlen and start + depth <= len(text):
            lo, hi = self.prefix_range(text[start:start + depth])
            if lo == hi:
                break
            agree[lo - first[0]:hi - first[0]] = depth
            depth += 1
        return ids, agree


def _completed(raw: bytes) -> str | None:
    """`raw` as text, a cut last character completed with the smallest continuation bytes that decode; None if
    it is not UTF-8 otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.end != len(raw) or err.reason != "unexpected end of data":
            return None
        lead = raw[err.start]
        need = (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4) - (len(raw) - err.start)
        for first in (b"\x80", b"\xa0", b"\x90"):
            try:
                return (raw + first + b"\x80" * (need - 1)).decode("utf-8")
            except UnicodeDecodeError:
                continue
        return None


def char_end(raw: bytes, k: int) -> int:
    """The first character boundary of `raw` at or after byte k."""
    while k < len(raw) and 0x80 <= raw[k] < 0xC0:
        k += 1
    return k


def _needs_probes(text: str) -> bool:
    """False when no continuation can move a pre-token boundary inside `text` (see the module docstring)."""
    return not text or unicodedata.category(text[-1])[0] not in "LN" or "'" in text[-3:]


class Canonical:
    """Decides canonical prefixes by re-encoding (batched, in the Rust tokenizer)."""

    def __init__(self, tokenizer, vocab: ByteVocab) -> None:
        config = backend_config(tokenizer)
        self.backend = tokenizer.backend_tokenizer
        pre = config.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        kinds = [p.get("type") for p in parts]
        # the anchors' argument holds for the regex splits of GPT-2 (ByteLevel with its regex) and of Qwen2
        # (a Split, then ByteLevel without regex); any other pre-tokenizer re-encodes from the text's start
        self.windowed = kinds in (["ByteLevel"], ["Split", "ByteLevel"]) and not any(
            p.get("add_prefix_space") for p in parts)
        # a probe the tokenizer cannot write (a tiny test vocabulary) would be dropped silently when encoded
        self.probes = tuple(z for z in PROBES if all(vocab.ids.get(bytes([b])) is not None for b in z.encode()))
        self.encodes = 0  # strings encoded (the cost of canonicality, reported by the scorer)
        self._initial: np.ndarray | None = None  # per token: 1 canonical at a text's start, 0 not, -1 unknown

    def normalized(self, text: str) -> str:
        """`text` as the tokenizer reads it (NFC under Qwen2's); a text that changes has no canonical encoding
        of its own bytes at all."""
        normalizer = self.backend.normalizer
        return normalizer.normalize_str(text) if normalizer is not None else text

    def anchors(self, text: str) -> list[int]:
        """For every byte position j of `text` (0..len), the byte offset checks after j start from."""
        raw = text.encode("utf-8")
        if not self.windowed or not text:
            return [0] * (len(raw) + 1)
        starts = [start for _, (start, _end) in self.backend.pre_tokenizer.pre_tokenize_str(text)]
        sizes = [len(c.encode("utf-8")) for c in text]
        char_at = np.cumsum([0, *sizes])  # byte offset of each character (and the end)
        last_solid, solid = [], -1  # last non-space character at or before each index
        for k, char in enumerate(text):
            solid = solid if char.isspace() else k
            last_solid.append(solid)
        out = []
        for j in range(len(raw) + 1):
            whole = int(np.searchsorted(char_at, j, side="right")) - 1  # characters entirely before byte j
            p = last_solid[whole - 3] if whole >= 3 else -1
            start = starts[bisect.bisect_right(starts, p) - 1] if p >= 0 else 0
            out.append(int(char_at[start]))
        return out

    def boundary(self, text: bytes, j: int, first: int) -> bool:
        """Whether every text starting with text[:j] then byte `first` has a pre-token boundary at j, under the
        GPT-2 and Qwen2 regexes: at the start; before a space after a non-space (no pre-token takes a space
        but as its first character); before a newline after a letter or digit (Qwen2 joins newlines to a
        punctuation run). Then e + [t] is canonical exactly when e is, followed by that byte, and [t] is at a
        text's start (`initial`): the tokens on either side never meet."""
        if not self.windowed:
            return False
        if j == 0:
            return True
        i = j - 1
        while i > 0 and 0x80 <= text[i] < 0xC0:
            i -= 1
        try:
            char = text[i:j].decode("utf-8")
        except UnicodeDecodeError:
            return False
        if first == 0x20:
            return not char.isspace()
        return first in (0x0A, 0x0D) and unicodedata.category(char)[0] in "LN"

    def initial(self, tokens: np.ndarray, vocab: ByteVocab) -> np.ndarray:
        """Whether [t] is a canonical prefix of a text that starts with its bytes, for each t (memoised: it
        depends on the token alone)."""
        if self._initial is None:
            self._initial = np.full(len(vocab.bytes), -1, dtype=np.int8)
        known = self._initial[tokens]
        todo = np.unique(tokens[known < 0]).tolist()
        if todo:
            self._initial[todo] = self.check([([t], vocab.bytes[t], False) for t in todo])
            known = self._initial[tokens]
        return known == 1

    def check(self, items: list[tuple[list[int], bytes, bool]]) -> list[bool]:
        """Each item: (tokens, bytes from an anchor, complete), the bytes starting with the tokens' own. A prefix
        item is canonical if re-encoding its bytes (a cut last character completed) plus some probe starts
        with its tokens; a complete one (the document ends there) only if its bytes encode to exactly them."""
        out = [False] * len(items)
        texts: list[tuple[int, str]] = []
        for index, (_tokens, raw, complete) in enumerate(items):
            text = _completed(raw)
            if text is not None and not (complete and len(text.encode("utf-8")) != len(raw)):
                texts.append((index, text))
        retry = []
        for (index, text), ids in zip(texts, self._encode([t for _, t in texts])):
            tokens, complete = items[index][0], items[index][2]
            if ids[:len(tokens)] == tokens and (not complete or len(ids) == len(tokens)):
                out[index] = True
            elif not complete and _needs_probes(text):
                retry.append((index, text))
        if retry:
            probes = self.probes[1:]
            encoded = self._encode([text + z for _, text in retry for z in probes])
            for k, (index, _text) in enumerate(retry):
                tokens = items[index][0]
                out[index] = any(ids[:len(tokens)] == tokens for ids in encoded[k * len(probes):(k + 1) * len(probes)])
        return out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        self.encodes += len(texts)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)] if texts else []
