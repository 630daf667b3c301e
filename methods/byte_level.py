"""byte_level: exact byte-level probabilities from a tokenized language model, for byte-level BPE tokenizers.

Paper (Phan et al., arXiv 2410.09303). A tokenized LM is a distribution over token sequences; read through
the tokenizer's decoder it is a distribution over byte streams. The Byte-Token Representation Lemma: the
probability that the stream starts with bytes s is the sum, over the cover encodings of s, of the probability
that the token stream starts with that encoding. A cover encoding T = t1..tk decodes to s plus possibly more
(bytes(T) starts with s) while t1..t(k-1) decodes to less than s: the last token covers the end of s. The
events "the token stream starts with T" of distinct covers are disjoint and together make "the byte stream
starts with s". Only canonical encodings count (the data never held another); the paper and its release
zero the probability of non-canonical ones without renormalising each step, and normalise the next-byte
distribution at the end. So here:

    Q(s) = sum over canonical-prefix covers T of s of P(T | context)          (P from the raw model)
    next-byte distribution after s: p(b | s) = Q(s b) / (sum_b' Q(s b') + Q(s, end)), b in 0..255,
        end = the document ends after s (the end-of-text token after an encoding that is all of s, canonical
        as a complete text).

Canonicality is decided by re-encoding with the tokenizer (methods/common/canonical.py): a sequence is a
canonical prefix if some continuation of its bytes encodes to a sequence starting with it; a set of probe
continuations stands for every continuation (why that is exact for the GPT-2 and Qwen2 pre-tokenizer regexes
is argued there, and tested against every 2-character continuation). A check re-encodes a short window, from a
pre-token start no continuation can move, in one batched Rust call: 1 string when the window ends in a letter
or digit, else up to 34 (the probes). Where a pre-token boundary falls between a node and the next token
whatever follows (after a space following a non-space, a newline following a letter or digit, at the start),
the check splits in two: the node followed by that byte (one check per node) and the token at a text's start
(memoised per token, for the tokenizer's lifetime). Measured on 421 bytes of tinyshakespeare with SmolLM2
(tol 1e-4): 428 exact encodings, 1.74M (node, token) decisions, 72.6k strings encoded, 12 s of CPU in all.

Byte-level log-likelihood of a text x (`byte_nll`): -log Q(x), split per byte as log Q(x[:i-1]) - log Q(x[:i])
(the chain rule, telescoped); a per-byte list needs Q(x[:i]) for every i, so the encodings tree spans the text.
The total alone (`total_nll`, what bits per byte need) takes the cheaper route, the covers at the end: every
canonical cover of x shares x's own tokens up to its last stable anchor, so -log Q(x) = their token-level NLL
(one causal pass) - log Q(rest of x | them), a tree of the last ~10 bytes.
A per-byte term is Q(x[:i]) / Q(x[:i-1]), not the normalised p(x_i | x[:i-1]): the two differ by the mass the
model puts on non-canonical next tokens (which Q drops, so the byte-level likelihood is of a sub-probability:
it never flatters the model). Since the canonical encoding of x is one of its covers, -log Q(x) is at most
the token-level NLL of that encoding under the same context.

Algorithm (`ByteLM.prefixes`):
1. The tree of exact encodings (no model): the canonical prefixes that decode to exactly x[:j], for every j,
   as a trie of tokens. From each one, every token whose bytes are the next bytes of x is checked, and kept as
   a child if canonical. Usually 1-2 encodings per j (more after whitespace runs).
2. One model pass per block of tree nodes on a KV cache holding the context (tree attention,
   methods/common/tree.py TreeKV: each node sees its ancestors): every node's next-token distribution.
3. Masses: a node e at j adds P(e) * (sum of P(t | e) over canonical t whose bytes start with x[j:j+d]) to
   Q(x[:j+d]) for every d: its children (the tokens inside x) and the tokens that agree with x for d bytes and
   then leave it or run past its end. Those are thousands (every token starting with a space), so they are
   checked most probable first, and checking stops when the mass left unchecked can move no Q(x[:i]) by more
   than `tol` of itself (each (node, depth) gets tol/K of a lower bound of Q(x[:i]), K the pairs that reach i);
   the rest counts as non-canonical, so Q is low by at most a fraction tol and -log Q(x), the whole text's
   NLL, high by at most -log(1 - tol) nats. tol = 0 checks every candidate (exact; the tests).
The next-byte distribution after a prompt conditions on the prompt's stable part (tokens before the last
anchor are the same in every canonical cover, so their probability cancels) and reuses that part's KV cache
between the steps of a greedy byte continuation (`kv.extend`, `kv.crop`).

Paper defaults: nothing to set (the method is exact; the release's generate.py samples bytes with a
temperature and top-p). Here: scores and greedy bytes; `tol` and `block` are ours.
Deviations: the release handles SentencePiece only and takes the encoding before the prompt's last whitespace
as fixed; here byte-level BPE, with canonicality decided by re-encoding under pre-tokenization with probe
continuations (re-encoding the bytes alone, as the release's cover check does, drops SmolLM2's own encoding
of "a\\n\\n" in "a\\n\\nb": see canonical.py) and the fixed part chosen by the anchors. The unchecked-candidate
tolerance is ours (the release masks the whole vocabulary per step, by a rule that holds for SentencePiece).
The document context is the tokenizer's end-of-text token (both embedded models separate pre-training
documents with it); end of document = that token. Prefixes cut inside a multi-byte character are handled, with
one approximation (canonical.py); a text must be as the tokenizer's normalizer leaves it (NFC for Qwen2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from methods.base import Paper, Scorer, Settings, register_scorer, setting
from methods.common import kv
from methods.common.canonical import ByteVocab, Canonical, char_end
from methods.common.tree import ROOT, DraftTree, TreeKV

END = 256  # the end-of-document entry of a next-byte distribution
PAPER = Paper("Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles",
              arxiv="2410.09303", venue="ICLR 2025")


@lru_cache(maxsize=4)
def _tables(tokenizer, size: int) -> tuple[ByteVocab, Canonical]:
    vocab = ByteVocab(tokenizer, size)
    return vocab, Canonical(tokenizer, vocab)


def document_token(tokenizer) -> int:
    """The token that separates documents: <|endoftext|> where the vocabulary has it, else BOS, else EOS."""
    index = tokenizer.get_vocab().get("<|endoftext|>")
    for candidate in (index, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has no end-of-text, BOS or EOS token to start a document with")


@dataclass
class Prefixes:
    log_q: list[float]  # log Q(x[:i]) for i = 0..len(x), given the context
    next_byte: np.ndarray | None  # 257 probabilities after x (END last), if asked
    log_total: float | None  # log Q(x) from the covers of all of x, if the ends were asked for
    nodes: int  # exact encodings in the tree (model rows computed)
    checked: int  # candidate tokens whose canonicality was decided


class ByteLM:
    """A tokenized causal LM read as a byte-level LM."""

    def __init__(self, model: torch.nn.Module, tokenizer, tol: float = 1e-4, block: int = 256) -> None:
        self.model, self.tokenizer, self.block = model, tokenizer, block
        self.log_tol = math.log(tol) if tol > 0 else -math.inf
        self.vocab, self.canon = _tables(tokenizer, int(model.get_output_embeddings().weight.shape[0]))
        self.doc = document_token(tokenizer)
        self._context: tuple[list[int], object, np.ndarray] | None = None  # ids, their cache, the last row

    # ------------------------------------------------------------ public
    def byte_nll(self, text: str) -> list[float]:
        """-log Q(x[:i]) + log Q(x[:i-1]) for each byte of `text` (nats), after a document start."""
        if self.canon.normalized(text) != text:
            raise ValueError("the tokenizer normalizes this text (NFC) before encoding it: pass it normalized")
        raw = text.encode("utf-8")
        log_q = self.prefixes(raw, self.canon.anchors(text), [self.doc]).log_q
        return [log_q[i - 1] - log_q[i] for i in range(1, len(raw) + 1)]

    def next_byte(self, prompt: str | bytes) -> np.ndarray:
        """p(b | prompt) for b in 0..255 and END, the prompt starting a document (it may end mid-token, or
        mid-character)."""
        raw = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        known = raw.decode("utf-8", errors="ignore")
        while not raw.startswith(known.encode("utf-8")):  # a bad byte inside: keep what decodes before it
            known = known[:-1]
        start = self.canon.anchors(known)[-1]  # stable for every text extending the prompt
        fixed = self._tokens_until(known, start)
        return self.prefixes(raw[start:], None, [self.doc, *fixed], ends="next").next_byte

    def total_nll(self, text: str) -> float:
        """-log Q(text), the whole text's byte-level NLL (= sum(byte_nll(text)), cheaper): the text's own tokens
        up to its last stable anchor, which every canonical cover shares, scored in one pass, times the covers
        of the rest."""
        if self.canon.normalized(text) != text:
            raise ValueError("the tokenizer normalizes this text (NFC) before encoding it: pass it normalized")
        raw = text.encode("utf-8")
        start = self.canon.anchors(text)[-1]
        context = [self.doc, *self._tokens_until(text, start)]
        cache = kv.new_cache(self.model)
        logits = torch.log_softmax(kv.extend(self.model, context, cache).float(), dim=-1)
        fixed = -float(logits[:-1].gather(-1, torch.tensor(context[1:])[:, None]).sum())
        self._context = (context, cache, logits[-1].numpy())
        return fixed - self.prefixes(raw[start:], None, context, ends="total").log_total

    def greedy(self, prompt: str | bytes, count: int) -> bytes:
        """The most likely next byte, `count` times (stops at END)."""
        out = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        grown = b""
        for _ in range(count):
            best = int(np.argmax(self.next_byte(out + grown)))
            if best == END:
                break
            grown += bytes([best])
        return grown

    # ------------------------------------------------------------ the algorithm
    def prefixes(self, text: bytes, anchors: list[int] | None, context: list[int],
                 ends: str | None = None) -> Prefixes:
        """After `context` (tokens): Q(text[:i]) for every i (`anchors[j]`: the byte offset canonicality checks
        after text[:j] start from), or only the covers of all of `text` (`ends`: "total" for log Q(text),
        "next" for it and the next-byte distribution; anchors None: every check from byte 0, which must be
        stable for every text extending `text`, and log_q is not computed)."""
        only_ends = ends is not None
        n, vocab = len(text), self.vocab
        run = _Run(text, anchors if anchors is not None else [0] * (n + 1), whole=anchors is None)
        matches = self._encodings(run)
        for j in range(n):
            if run.at[j]:
                run.reach[j + 1:j + 1 + int(matches[j][1].max(initial=0))] += len(run.at[j])
        cache, root = self._cached_context(context)
        feeder = TreeKV(self.model, [], cache=cache)
        groups: list[tuple] = []
        try:
            rows: list[tuple[int, np.ndarray]] = [(ROOT, root)]
            nodes = list(range(len(run.tree)))
            for first in range(0, max(len(nodes), 1), self.block):
                block = nodes[first:first + self.block]
                if block:
                    logits = feeder.feed(run.tree, block)
                    rows += list(zip(block, torch.log_softmax(logits.float(), dim=-1).numpy()))
                for e, row in rows:  # children first: they raise the lower bounds the candidates are held to
                    self._children(run, e, row)
                for e, row in rows:
                    j = run.pos[e]
                    if j < n and not only_ends:
                        self._candidates(run, e, row, *matches[j])
                    if only_ends and j > n - vocab.maxlen:  # a token can still run past the end
                        groups.append(self._extensions(run, e, row, matches.get(j)))
                rows = []
        finally:
            kv.crop(cache, len(context))
        log_q = [float(np.logaddexp.reduce(t)) if t else -math.inf for t in run.terms]
        log_q[0] = 0.0
        following, log_total = self._ends(run, groups, ends == "next") if only_ends else (None, None)
        return Prefixes(log_q, following, log_total, len(run.tree), run.checked)

    def _encodings(self, run: _Run) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Step 1: the trie of canonical prefixes decoding to exactly text[:j], for every j (no model); returns
        the tokens starting at each j with how many bytes of the text each agrees with."""
        text, vocab = run.text, self.vocab
        matches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for j in range(len(text)):
            if not run.at[j]:
                continue
            ids, agree = matches[j] = vocab.matches(text, j)
            whole = agree == vocab.lengths[ids]
            inside = list(zip(ids[whole].tolist(), agree[whole].tolist()))
            a, items, keys = run.anchors[j], [], []
            for e in run.at[j]:
                base = run.window(e, a)
                for t, d in inside if base is not None else ():
                    # the bytes checked: all the text when only covers of all of it count, else up to the end
                    # of the character the token ends in
                    end = len(text) if run.whole else char_end(text, j + d)
                    items.append((base + [t], text[a:end], False))
                    keys.append((e, t, d))
            for (e, t, d), ok in zip(keys, self.canon.check(items)):
                run.memo[e, t] = ok
                if ok:
                    child = run.tree.add(e, t)
                    run.pos[child] = j + d
                    run.at[j + d].append(child)
        return matches

    def _children(self, run: _Run, e: int, row: np.ndarray) -> None:
        """Children's probabilities, and their masses as lower bounds of the Q they reach."""
        j, log_e = run.pos[e], run.log_p[e]
        spans = np.zeros(self.vocab.maxlen + 2)
        for token, child in run.tree.children[e].items():
            run.log_p[child] = log_e + float(row[token])
            spans[run.pos[child] - j] += math.exp(float(row[token]))
        run.inside[e] = spans[::-1].cumsum()[::-1]  # [d]: children reaching depth d
        for d in np.nonzero(run.inside[e][1:])[0] + 1:
            run.raise_bound(j + d, log_e + math.log(run.inside[e][d]))

    def _candidates(self, run: _Run, e: int, row: np.ndarray, ids: np.ndarray, agree: np.ndarray) -> None:
        """Step 3 for one node: the canonical mass of every depth, children plus checked candidates."""
        j, log_e, depth = run.pos[e], run.log_p[e], min(self.vocab.maxlen, len(run.text) - run.pos[e])
        other = agree < self.vocab.lengths[ids]
        cand, reach = ids[other], agree[other]
        probs = np.exp(row[cand].astype(np.float64))
        order = np.argsort(-probs, kind="stable")
        cand, reach, probs = cand[order], reach[order], probs[order]
        found = run.inside[e][:depth + 1].copy()
        extra = np.zeros(depth + 1)
        k, step = 0, 32
        while k < len(cand):
            rest = np.bincount(reach[k:], weights=probs[k:], minlength=depth + 1)[::-1].cumsum()[::-1]
            if not any(rest[d] > 0 and log_e + math.log(rest[d]) > self._allowed(run, j + d, log_e, found[d])
                       for d in range(1, depth + 1)):
                break
            part = slice(k, min(len(cand), k + step))
            ok = self._canonical(run, e, cand[part])
            gained = np.bincount(reach[part][ok], weights=probs[part][ok], minlength=depth + 1)[::-1].cumsum()[::-1]
            found += gained
            extra += gained
            k, step = part.stop, step * 2
        for d in range(1, depth + 1):
            if found[d] > 0:
                run.terms[j + d].append(log_e + math.log(found[d]))
            if extra[d] > 0:
                run.raise_bound(j + d, log_e + math.log(extra[d]))

    def _allowed(self, run: _Run, i: int, log_e: float, found: float) -> float:
        """log of the unchecked mass one (node, depth) pair may leave at Q(text[:i])."""
        own = log_e + math.log(found) if found > 0 else -math.inf
        return self.log_tol + max(run.bound[i], own) - math.log(run.reach[i])

    def _extensions(self, run: _Run, e: int, row: np.ndarray, match) -> tuple:
        """The tokens from node e that run past the text's end, with the byte each puts next."""
        j, n, vocab = run.pos[e], len(run.text), self.vocab
        if j == n:
            ids = vocab.order
            following = vocab.matrix[ids, 0]
        else:
            ids, agree = match
            ids = ids[(agree == n - j) & (vocab.lengths[ids] > n - j)]
            following = vocab.matrix[ids, n - j]
        probs = np.exp(row[ids].astype(np.float64))
        order = np.argsort(-probs, kind="stable")
        end = math.exp(float(row[self.doc])) if j == n else 0.0
        return e, run.log_p[e], ids[order], probs[order], following[order], end

    def _ends(self, run: _Run, groups: list[tuple], following: bool) -> tuple[np.ndarray | None, float]:
        """log Q(text): the encodings of all of it, plus the canonical tokens running past its end; and if
        `following`, Q(text + b) for every b and END, normalised. Groups most probable first, each checked until
        its unchecked mass is within tol / len(groups) of the mass found so far."""
        n = len(run.text)
        groups.sort(key=lambda g: -(g[1] + math.log(g[3][0])) if len(g[3]) else math.inf)
        top = max((g[1] for g in groups), default=0.0)
        exact = [g[1] for g in groups if run.pos[g[0]] == n]  # covers of the text ending with it
        # the lower bound budgets are held to: of Q(text), or of the next symbols' mass (which may be less)
        bound = float(np.logaddexp.reduce(exact)) if exact and not following else -math.inf
        mass, total = np.zeros(END + 1), sum(math.exp(x - top) for x in exact)
        for e, log_e, ids, probs, nexts, end in groups:
            at_end = run.pos[e] == n
            found, k, step = 0.0, 0, 32
            while k < len(ids) and (following or not at_end):
                rest = float(probs[k:].sum())
                own = log_e + math.log(found) if found > 0 else -math.inf
                if rest <= 0 or log_e + math.log(rest) <= self.log_tol + max(bound, own) - math.log(len(groups)):
                    break
                part = slice(k, min(len(ids), k + step))
                ok = self._canonical(run, e, ids[part])
                np.add.at(mass, nexts[part][ok], math.exp(log_e - top) * probs[part][ok])
                found += float(probs[part][ok].sum())
                k, step = part.stop, step * 2
            if not at_end:
                total += math.exp(log_e - top) * found
            elif following and end > 0 and self._complete(run, e):
                mass[END] += math.exp(log_e - top) * end
                found += end
            if found > 0:
                bound = np.logaddexp(bound, log_e + math.log(found))
        log_total = math.log(total) + top if total > 0 else -math.inf
        return (mass / mass.sum() if mass.sum() > 0 else mass) if following else None, log_total

    def _canonical(self, run: _Run, e: int, tokens: np.ndarray) -> np.ndarray:
        """Whether e + [t] is a canonical prefix, for each t. Where a pre-token boundary falls between e and t
        whatever follows (`Canonical.boundary`), it is decided from e (one check) and t alone (`initial`,
        memoised per token); else by re-encoding the window (memoised per node and token)."""
        j = run.pos[e]
        a = run.anchors[j]
        base = run.window(e, a)
        out = np.zeros(len(tokens), dtype=bool)
        if base is None or not len(tokens):
            return out
        head, firsts = run.text[a:j], self.vocab.matrix[tokens, 0]
        groups = {f: np.nonzero(firsts == f)[0] for f in np.unique(firsts).tolist()}
        split = {f: self.canon.boundary(run.text, j, f) for f in groups}
        # one batch: e followed by each byte a boundary comes before, and every other (e, t) not seen yet
        keys = [(e, -1 - f) for f in groups if split[f] and j > 0 and (e, -1 - f) not in run.memo]
        items = [(base, head + bytes([-1 - k]), False) for _, k in keys]
        for f in groups:
            if not split[f]:
                todo = [t for t in tokens[groups[f]].tolist() if (e, t) not in run.memo]
                keys += [(e, t) for t in todo]
                items += [(base + [t], head + self.vocab.bytes[t], False) for t in todo]
        run.memo.update(zip(keys, self.canon.check(items)))
        apart = []
        for f, chosen in groups.items():
            if not split[f]:
                out[chosen] = [run.memo[e, t] for t in tokens[chosen].tolist()]
            elif j == 0 or run.memo[e, -1 - f]:
                apart.append(chosen)
        if apart:
            chosen = np.concatenate(apart)
            out[chosen] = self.canon.initial(tokens[chosen], self.vocab)
        run.checked += len(tokens)
        return out

    def _complete(self, run: _Run, e: int) -> bool:
        """Whether e (all of the text) is the tokenizer's encoding of the text as a whole document."""
        a = run.anchors[len(run.text)]
        base = run.window(e, a)
        return base is not None and self.canon.check([(base, run.text[a:], True)])[0]

    # ------------------------------------------------------------ context
    def _cached_context(self, ids: list[int]):
        """A KV cache holding `ids` and the log-probabilities after them; the previous call's cache is
        extended when `ids` continue its tokens (a greedy byte continuation), else rebuilt."""
        if self._context is not None and self._context[0] == ids[:len(self._context[0])]:
            held, cache, row = self._context
            kv.crop(cache, len(held))
        else:
            held, cache, row = [], kv.new_cache(self.model), None
        if len(ids) > len(held) or row is None:
            logits = kv.extend(self.model, ids[len(held):], cache, keep=1)
            row = torch.log_softmax(logits[-1].float(), dim=-1).numpy()
        self._context = (list(ids), cache, row)
        return cache, row

    def _tokens_until(self, known: str, end: int) -> list[int]:
        """The canonical tokens of `known` before byte `end` (a stable anchor: a token boundary)."""
        ids = self.tokenizer.backend_tokenizer.encode(known, add_special_tokens=False).ids
        out, size = [], 0
        for t in ids:
            if size >= end:
                break
            out.append(t)
            size += len(self.vocab.bytes[t])
        if size != end:
            raise RuntimeError(f"anchor {end} is not a token boundary of the prompt's encoding")
        return out


class _Run:
    """One `prefixes` call's working state: the tree of exact encodings and the masses found."""

    def __init__(self, text: bytes, anchors: list[int], whole: bool) -> None:
        self.text, self.anchors, self.whole = text, anchors, whole
        self.tree = DraftTree()
        self.pos: dict[int, int] = {ROOT: 0}  # node -> the bytes its encoding decodes to
        self.at: list[list[int]] = [[] for _ in range(len(text) + 1)]  # j -> the nodes decoding to text[:j]
        self.at[0].append(ROOT)
        self.memo: dict[tuple[int, int], bool] = {}  # (node, token) -> canonical
        self.windows: dict[tuple[int, int], list[int] | None] = {}
        self.log_p: dict[int, float] = {ROOT: 0.0}
        self.inside: dict[int, np.ndarray] = {}
        self.reach = np.zeros(len(text) + 2)  # how many (node, depth) pairs can add to each Q(text[:i])
        self.terms: list[list[float]] = [[] for _ in range(len(text) + 1)]
        self.bound = np.full(len(text) + 1, -math.inf)  # log lower bounds of Q(text[:i])
        self.checked = 0

    def raise_bound(self, i: int, log_mass: float) -> None:
        self.bound[i] = np.logaddexp(self.bound[i], log_mass)

    def window(self, e: int, anchor: int) -> list[int] | None:
        """Node e's tokens after byte `anchor` (None if a token of e straddles it: e is not canonical)."""
        key = (e, anchor)
        if key not in self.windows:
            tokens, node = [], e
            while self.pos[node] > anchor:
                tokens.append(self.tree.tokens[node])
                node = self.tree.parents[node]
            self.windows[key] = tokens[::-1] if self.pos[node] == anchor else None
        return self.windows[key]


@register_scorer("byte_level")
class ByteLevel(Scorer):
    """Per-byte negative log-likelihood of a document over all its canonical tokenizations (Phan et al.)."""

    paper = PAPER
    unit = "byte"

    @dataclass
    class Config(Settings):
        tol: float = setting(1e-4, "relative error allowed on each prefix probability from leaving unlikely "
                                   "candidate tokens unchecked (0 = check every one: exact, slow)", low=0, high=0.1)
        block: int = setting(256, "exact encodings per model pass (tree attention)", low=1)

    def nll(self, model: torch.nn.Module, tokenizer, text: str) -> list[float]:
        return ByteLM(model, tokenizer, self.config.tol, self.config.block).byte_nll(text)

    def total_nll(self, model: torch.nn.Module, tokenizer, text: str) -> float:
        """sum(nll(...)) by the cheaper route (what bits per byte needs)."""
        return ByteLM(model, tokenizer, self.config.tol, self.config.block).total_nll(text)


def byte_nll(model: torch.nn.Module, tokenizer, text: str, tol: float = 1e-4) -> list[float]:
    """The negative log-likelihood (nats) of each UTF-8 byte of `text`, as a document, over every canonical
    tokenization: sum = -log Q(text) (`ByteLM.total_nll` gives the sum alone, cheaper)."""
    return ByteLM(model, tokenizer, tol).byte_nll(text)
