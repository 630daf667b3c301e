"""byte_level (Phan et al.) on a byte-level BPE tokenizer trained here, against brute force.

The brute force shares no code with methods/byte_level.py: it enumerates token sequences whose bytes are
compatible with a prefix s, keeps the cover encodings (bytes(T) starts with s, bytes(T[:-1]) is shorter
than s: each byte stream starting with s starts with exactly one of them), keeps the canonical ones (some
continuation z of up to 2 characters over the tokenizer's alphabet re-encodes to a sequence starting with
T, the text re-encoded whole from its first byte), and sums P(T) computed by one plain forward pass of
[context] + T each (no cache, no tree).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from methods.base import SettingError, get_scorer
from methods.byte_level import END, ByteLM, byte_nll
from methods.common.canonical import ByteVocab, Canonical

TRAIN = "ab ab aab ba\n\nab abba\n\nbaa  ab ab\n\n\nab ba ab"  # merges: ab, Ġab, ĊĊ, ba, Ġabba ...
ALPHABET = "ab \n"
CACHE = Path(os.path.expanduser("~/.cache/decodebench"))


def byte_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer regex) with 13 byte tokens, trained on TRAIN."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=14, special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator([TRAIN], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tok():
    return byte_bpe()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(vocab_size=len(tok), seed=3)


@pytest.fixture(scope="module")
def brute(tok, model):
    return Brute(tok, model)


class Brute:
    def __init__(self, tok, model) -> None:
        self.tok, self.model = tok, model
        self.backend = tok.backend_tokenizer
        vocab = ByteVocab(tok, len(tok))
        self.bytes = {i: b for i, b in enumerate(vocab.bytes) if b}
        self.doc = tok.get_vocab()["<|endoftext|>"]
        self.continuations = [""] + [a + b for a in ALPHABET for b in [""] + list(ALPHABET)]
        self._p: dict[tuple[int, ...], torch.Tensor] = {}

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def canonical(self, seq: tuple[int, ...], complete: bool = False) -> bool:
        text = b"".join(self.bytes[t] for t in seq).decode()
        if complete:
            return self.encode(text) == list(seq)
        encoded = self.backend.encode_batch([text + z for z in self.continuations], add_special_tokens=False)
        return any(e.ids[:len(seq)] == list(seq) for e in encoded)

    def covers(self, s: bytes):
        """Every token sequence T with bytes(T) starting with s and bytes(T[:-1]) shorter than s."""
        out, stack = [], [((), b"")]
        while stack:
            seq, got = stack.pop()
            for t, b in self.bytes.items():
                new = got + b
                if new.startswith(s):
                    out.append((seq + (t,), new))
                elif s.startswith(new):
                    stack.append((seq + (t,), new))
        return out

    def log_probs(self, seq: tuple[int, ...]) -> torch.Tensor:
        """log P(next token | [doc] + seq[:i]) for i = 0..len(seq), one plain forward pass."""
        if seq not in self._p:
            with torch.no_grad():
                logits = self.model(torch.tensor([[self.doc, *seq]]), use_cache=False).logits[0]
            self._p[seq] = torch.log_softmax(logits.double(), -1)
        return self._p[seq]

    def log_p(self, seq: tuple[int, ...]) -> float:
        rows = self.log_probs(seq)
        return float(sum(rows[i, t] for i, t in enumerate(seq)))

    def q(self, s: bytes, canonical: bool = True) -> float:
        """Q(s): the summed probability of the (canonical) covers of s."""
        return sum(math.exp(self.log_p(seq)) for seq, _ in self.covers(s) if not canonical or self.canonical(seq))

    def next_byte(self, s: bytes) -> np.ndarray:
        mass = np.zeros(END + 1)
        for b in sorted({b for t in self.bytes.values() for b in t}):
            mass[b] = self.q(s + bytes([b]))
        for seq, got in self.covers(s):
            if got == s and self.canonical(seq, complete=True):
                mass[END] += math.exp(self.log_p(seq) + float(self.log_probs(seq)[-1, self.doc]))
        return mass / mass.sum()


def test_the_tiny_tokenizer_has_the_cases_that_matter(tok, brute):
    """Merges that make non-canonical splits ([a, b] for "ab"), and GPT-2's whitespace rule: "a\\n\\nb" is
    [a, \\n, \\n, b] but "a\\n\\n" alone is [a, \\n\\n]."""
    vocab = tok.get_vocab()
    assert {"ab", "Ġab", "ĊĊ"} <= set(vocab)
    assert tok.convert_ids_to_tokens(brute.encode("a\n\nb")) == ["a", "Ċ", "Ċ", "b"]
    assert tok.convert_ids_to_tokens(brute.encode("a\n\n")) == ["a", "ĊĊ"]


@pytest.mark.parametrize("prompt", ["ab a", "a\n\n", "ba  a"])
def test_next_byte_equals_brute_force_and_sums_to_one(tok, model, brute, prompt):
    ours = ByteLM(model, tok, tol=0.0).next_byte(prompt)
    assert ours.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(ours, brute.next_byte(prompt.encode()), rtol=1e-5, atol=1e-9)


def test_byte_nll_telescopes_to_the_brute_force_prefix_probabilities(tok, model, brute):
    text = "a\n\nab ab"
    nll = ByteLM(model, tok, tol=0.0).byte_nll(text)
    assert len(nll) == len(text.encode())
    raw = text.encode()
    for i in range(1, len(raw) + 1):
        assert sum(nll[:i]) == pytest.approx(-math.log(brute.q(raw[:i])), rel=1e-5)
    assert all(x >= -1e-9 for x in nll)  # Q never grows with the prefix
    # at most the token-level NLL of the canonical encoding (one of the covers), under the same context
    assert sum(nll) <= -brute.log_p(tuple(brute.encode(text))) + 1e-6


@pytest.mark.parametrize("text", ["ab ba\n\nab  abba aab ab", "ba a", "aab\n\n"])
def test_the_total_from_the_covers_at_the_end_equals_the_chain_rule(tok, model, text):
    """total_nll scores the text's tokens up to its last stable anchor in one pass and the covers of the rest."""
    lm = ByteLM(model, tok, tol=0.0)
    assert lm.total_nll(text) == pytest.approx(sum(lm.byte_nll(text)), rel=1e-6)  # float32 passes of other shapes


def test_non_canonical_encodings_are_excluded_and_it_matters(tok, model, brute):
    s = b"aab"
    canonical, every = brute.q(s), brute.q(s, canonical=False)
    # [a, ab], [a, a, b] are covers the tokenizer never writes ("aab" is one token); with them Q is 3.6x larger
    assert every > canonical * 2
    nll = ByteLM(model, tok, tol=0.0).byte_nll("aab")
    assert sum(nll) == pytest.approx(-math.log(canonical), rel=1e-6)


def test_a_prefix_is_canonical_by_its_continuations_not_alone(tok):
    """[a, \\n, \\n] is how "a\\n\\nb" starts, though "a\\n\\n" alone encodes as [a, \\n\\n]: a check that re-encodes
    the bytes alone (z = "") would drop the text's own encoding; as a complete text it is not canonical."""
    vocab = ByteVocab(tok, len(tok))
    canon = Canonical(tok, vocab)
    a, nl = vocab.ids[b"a"], vocab.ids[b"\n"]
    assert canon.check([([a, nl, nl], b"a\n\n", False), ([a, nl, nl], b"a\n\n", True),
                        ([vocab.ids[b"ab"]], b"ab", False), ([a, vocab.ids[b"b"]], b"ab", False)]) == [
        True, False, True, False]


def test_windows_from_anchors_change_nothing(tok, model):
    text = "ab ba\n\nab  abba aab ab"
    lm = ByteLM(model, tok, tol=0.0)
    raw = text.encode()
    windowed = lm.prefixes(raw, lm.canon.anchors(text), [lm.doc]).log_q
    whole = lm.prefixes(raw, [0] * (len(raw) + 1), [lm.doc]).log_q
    assert max(lm.canon.anchors(text)) > 0
    assert np.allclose(windowed, whole, rtol=1e-12, atol=1e-12)


def test_tolerance_bounds_the_error(tok, model):
    text = "ab ba\n\nab  abba aab ab"
    exact = ByteLM(model, tok, tol=0.0).byte_nll(text)
    loose = ByteLM(model, tok, tol=1e-2).byte_nll(text)
    assert abs(sum(loose) - sum(exact)) <= 1e-2  # -log Q(x) moves by at most -log(1 - tol)
    assert sum(loose) >= sum(exact) - 1e-12  # unchecked candidates count as non-canonical


def test_greedy_continuation_reuses_the_context_cache(tok, model):
    lm = ByteLM(model, tok, tol=0.0)
    grown = lm.greedy("ab ba\n\nab a", 4)
    assert len(grown) >= 1
    assert grown[:1] == bytes([int(np.argmax(ByteLM(model, tok, tol=0.0).next_byte("ab ba\n\nab a")))])
    fresh = ByteLM(model, tok, tol=0.0).next_byte("ab ba\n\nab a" + grown[:2].decode())
    assert np.allclose(lm.next_byte("ab ba\n\nab a" + grown[:2].decode()), fresh, atol=1e-9)


def test_registered_as_a_scorer_with_checked_settings(tok, model):
    cls = get_scorer("byte_level")
    assert cls.paper.arxiv == "2410.09303" and cls.unit == "byte"
    assert cls(tol=0.0).nll(model, tok, "ab ab") == pytest.approx(byte_nll(model, tok, "ab ab", tol=0.0))
    with pytest.raises(SettingError):
        cls(tol=2.0)


def test_refuses_a_tokenizer_that_is_not_byte_level_bpe(model):
    from conftest import tiny_tokenizer

    with pytest.raises(NotImplementedError):
        ByteLM(model, tiny_tokenizer())


# --- the probes against every short continuation, on the embedded models' own tokenizers (no weights) ---
WIDE = [" ", "\n", "\t", "\r", "a", "s", "t", "e", "l", "r", "v", "m", "d", "L", "S", "0", "1", ".", ",", "(", "'",
        "é", "中", "!"]


def _embedded_tokenizer(name: str):
    folder = CACHE / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{name} not installed: decodebench models install {name}")
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_probes_decide_as_every_continuation_would(name):
    """For cut-outs w of varied text and token sequences T decoding to w (the tokenizer's own prefixes and
    splices of two encodings), `Canonical.check` (probes) agrees with trying every continuation of up to 2
    characters from a wide alphabet."""
    tok = _embedded_tokenizer(name)
    vocab = ByteVocab(tok, len(tok))
    canon = Canonical(tok, vocab)
    backend = tok.backend_tokenizer

    def encode(text):
        return backend.encode(text, add_special_tokens=False).ids

    rng = random.Random(0)
    source = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.  We'll go; "
              "it's 2024 (or 12.5%)!\n\n\n  café 中文 x=f(a,b) don't they're I'VE\t\tend\r\n")
    cases = set()
    for _ in range(80):
        start = rng.randrange(len(source))
        w = source[start:start + rng.randint(1, 12)]
        if len(w) > 1:
            cut = rng.randint(1, len(w) - 1)
            cases.add((w, tuple(encode(w[:cut]) + encode(w[cut:]))))  # often not canonical
        for z in ("", rng.choice(WIDE), rng.choice(WIDE) + rng.choice(WIDE)):
            ids, size = encode(w + z), 0
            for k, t in enumerate(ids):
                size += len(vocab.bytes[t])
                if size == len(w.encode()):
                    cases.add((w, tuple(ids[:k + 1])))
    every = [""] + WIDE + [a + b for a, b in itertools.product(WIDE, WIDE)]
    verdicts = canon.check([(list(seq), w.encode(), False) for w, seq in cases])
    truth = [any(ids[:len(seq)] == list(seq) for ids in (e.ids for e in backend.encode_batch(
        [w + z for z in every], add_special_tokens=False))) for w, seq in cases]
    assert sum(truth) > 15 and len(truth) - sum(truth) > 15  # both kinds are tested
    assert verdicts == truth


@pytest.mark.integration
def test_smollm2_heals_a_cut_word_and_scores_no_worse_than_its_tokens():
    from harness import models

    if not models.installed(models.EMBEDDED["smollm2-135m"]):
        pytest.skip("smollm2-135m not installed: decodebench models install smollm2-135m")
    loaded = models.load("smollm2-135m")
    lm = ByteLM(loaded.model, loaded.tokenizer)
    text = "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are"  # its own encoding has [., \n, \n]-like splits
    nll = lm.byte_nll(text)
    assert sum(nll) == pytest.approx(lm.total_nll(text), abs=1e-3)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(loaded.model(torch.tensor([[lm.doc, *ids]])).logits[0].float(), -1)
    assert sum(nll) <= -sum(float(logp[i, t]) for i, t in enumerate(ids)) + 1e-3
    # the prompt ends inside a word its tokens cut as [" fur", "th"]: the next byte is "e" ("further")
    assert int(np.argmax(lm.next_byte("First Citizen:\nBefore we proceed any furth"))) == ord("e")


# --- as a scorer in the perplexity suite (harness/runner.py `_scored`) ---
def test_perplexity_suite_scores_a_document_per_byte(tok, model, tmp_path, capsys):
    """`--methods ar,byte_level`: the byte_level record's log-likelihood is ByteLM's total for the document,
    its bits per byte and word perplexity come from that total, it has no token perplexity, and the report's
    perplexity table shows both methods; the canonical encoding being one of the covers, the byte-level NLL
    is at most the token-level one under the same first token (EOS here: the tokenizer has no BOS)."""
    from harness import cli
    from harness.results import read_records

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    text = "ab ba\n\nab abba ab\nba ab"
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    out = tmp_path / "run"
    code = cli.main(["run", "--suite", "perplexity", "--no-warmup", "--data", str(doc), "--target", str(folder),
                     "--methods", "ar,byte_level", "--set", "byte_level.tol=0", "--out", str(out)])
    said = capsys.readouterr().out
    assert code == 0, said
    records = {r["method"]: r for r in read_records(out / "results.jsonl")}
    scored = records["byte_level"]
    total = ByteLM(model, tok, tol=0.0).total_nll(text)
    assert scored["window_loglik"] == pytest.approx([-total], rel=1e-6) and scored["token_nll"] == []
    assert scored["token_perplexity"] is None and scored["bytes"] == len(text.encode())
    assert scored["bits_per_byte"] == pytest.approx(total / (len(text) * math.log(2)), rel=1e-6)
    assert scored["target_calls"] >= 1 and scored["task_metric"].startswith("byte_level (bytes")
    assert total <= sum(records["ar"]["token_nll"]) + 1e-6
    table = (out / "report" / "report.md").read_text().split("## Perplexity against position")[1].split("\n## ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| byte_level |"))
    assert f"{total / (len(text) * math.log(2)):.4f}" in row
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["methods"]["byte_level"]["scorer"]["arxiv"] == "2410.09303"
    methods = (out / "report" / "report.md").read_text().split("## Methods")[1]
    listed = next(line for line in methods.splitlines() if line.startswith("| byte_level |"))
    assert "2410.09303" in listed and "(scorer), under ar" in listed and "| — |" in listed


def test_a_scorer_is_refused_where_it_cannot_apply(tmp_path):
    from harness.runner import RunConfig, RunConfigError, Runner
    from methods.common.cache_policy import parse

    assert parse("byte_level+w8").scorer == "byte_level" and parse("byte_level").decoder == "ar"
    with pytest.raises(SettingError, match="cache policy"):
        parse("byte_level+streaming_llm")
    with pytest.raises(RunConfigError, match="scorer"):
        Runner(RunConfig(suite="specbench", methods=["ar", "byte_level"], target="unused", out=str(tmp_path)))
