"""Long-context retrieval and aggregation tasks generated the way RULER (Hsieh et al., arXiv 2404.06654,
github.com/NVIDIA/RULER) builds its synthetic set, sized in tokens of the model under test.

Tasks (RULER's names and knobs; every sentence, word list and template here was written for this project):
- niah_single: one needle (a key and its value) in the haystack; asked for its value.
- niah_multikey: `needles` needles with different keys, one asked, the rest distractors (RULER multikey_1);
  haystack=needles makes the whole haystack distractor needles (RULER multikey_2/3).
- niah_multivalue: one key with `needles` values; all asked.
- niah_multiquery: `needles` keys, all asked.
- vt: variable tracking: `chains` chains `VAR A = 12345`, `VAR B = VAR A`, ... of `hops` hops each, spread
  through the haystack; asked which variables hold the first chain's value; a solved example comes first.
- cwe: common-words extraction: a numbered list where 10 words occur often (6 times below 4k tokens, else
  30) and the rest rarely (1, else 3); asked for the 10; a solved example comes first (RULER's one shot).
- fwe: frequent-words extraction: coded words drawn with Zipf frequencies (alpha 2, vocabulary length/50,
  the top rank replaced by '...'); asked for the three most frequent coded words.

Layout (RULER's): instructions, the context, the question after it; the reply starts with an answer prefix
(`answer_prefix`, in meta and in the rendered prompt). A prompt is rendered by `LongContextSuite.prompt_ids`:
the tokenizer's chat template around the user turn (chat=true and the tokenizer has one), then the answer
prefix as the reply's start. Its length (meta['tokens']) is `length` or a few tokens less: the fill stops
between words (numbers and UUIDs every 3 characters), a cwe list between entries, fwe between coded words.
RULER instead counts the generation budget inside its length (meta['max_new_tokens'] is RULER's budget).

Depth: the first needle asked goes to the sentence boundary nearest `depth` percent of the context's tokens
(the needle itself left out, so 100 is the very end); other needles and the chains go to seeded random
sentence boundaries (RULER places all of them at random). meta['depth_actual'] is the depth measured in the
rendered prompt; it drifts from `depth` by up to half a sentence (a few percent only for short contexts with
long needles, e.g. UUIDs at 1k tokens).

Scoring as RULER's evaluate: case-insensitive substring match, `string_match_all` (the fraction of the
references found in the output) for every synthetic task, multi-value and multi-query included; RULER uses
`string_match_part` (any reference found) only for its QA tasks, which this suite does not have.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from methods.base import SettingError, Settings, setting
from suites import wordlists as W
from suites.base import Item, Suite, read_text_file, register
from suites.haystack import Haystack, TextSource, generated_sentences, noise_sentences
from suites.sizing import Fit, PromptFormat, fit, largest_within

NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
TASKS = NIAH + ("vt", "cwe", "fwe")
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate
TOLERANCE = 2  # a prompt is `length` tokens or at most this many fewer
KINDS = {"numbers": ("number", "numbers"), "words": ("word", "words"), "uuids": ("code", "codes")}
MAKERS = {"numbers": W.number, "words": W.adjective_noun, "uuids": W.uuid4}
ZETA_2 = math.pi**2 / 6


def string_match_all(output: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER: the fraction of references found in the output (case-insensitive substring)."""
    text = output.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(output: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER (QA tasks): 1 if any reference is found in the output (case-insensitive substring)."""
    text = output.lower()
    return float(any(r.lower() in text for r in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def parse_lengths(text: str) -> tuple[int, ...]:
    """'1k,2k,4096' -> (1024, 2048, 4096); k = 1024 tokens, as RULER's 4k = 4096."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", part)
        if not match:
            raise SettingError(f"lengths must be token counts like 1024 or 1k (comma-separated); got {text!r}")
        value = float(match.group(1)) * (1024 if match.group(2) else 1)
        if value != int(value):
            raise SettingError(f"lengths must be whole numbers of tokens; got {part!r}")
        out.append(int(value))
    return tuple(out)


@dataclass
class LongContextOptions(Settings):
    tasks: tuple[str, ...] = setting(TASKS, "tasks to generate: " + ", ".join(TASKS))
    lengths: tuple[int, ...] = setting((1024, 2048, 4096), "prompt lengths in tokens of the target's tokenizer "
                                       "(1k = 1024)", low=64, high=1 << 21)
    depths: tuple[float, ...] = setting((0.0, 25.0, 50.0, 75.0, 100.0), "needle depths, percent of the haystack "
                                        "(niah tasks only)", low=0, high=100)
    samples: int = setting(1, "items per task x length x depth cell", low=1, high=100_000)
    seed: int = setting(0, "generation seed")
    haystack: Literal["auto", "noise", "needles", "text"] = setting(
        "auto", "niah haystack: noise sentences, distractor needles, or the --data text (auto: text with --data, "
        "else noise); vt uses noise or text")
    keys: Literal["words", "numbers", "uuids"] = setting("words", "niah keys")
    values: Literal["words", "numbers", "uuids"] = setting("numbers", "niah values")
    needles: int = setting(4, "needles of niah_multikey / multivalue / multiquery", low=2, high=64)
    chains: int = setting(1, "vt chains (the first is asked)", low=1, high=16)
    hops: int = setting(4, "vt assignments after the first in each chain", low=1, high=64)
    chat: bool = setting(True, "wrap the prompt in the tokenizer's chat template when it has one")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise SettingError(f"tasks: unknown task {', '.join(unknown)}; known: {', '.join(TASKS)}")
        self.tasks = tuple(dict.fromkeys(self.tasks))
        self.lengths = tuple(dict.fromkeys(self.lengths))
        self.depths = tuple(dict.fromkeys(float(d) for d in self.depths))


@register("longctx")
class LongContextSuite(Suite):
    description = "RULER-style synthetic long-context tasks (niah x4, vt, cwe, fwe), lengths x depths, generated"
    needs_tokenizer = True
    Options = LongContextOptions

    def __init__(self, data: str | None = None, tokenizer: Any = None, **options: Any) -> None:
        if isinstance(options.get("lengths"), str):
            try:
                options["lengths"] = parse_lengths(options["lengths"])
            except SettingError as err:
                raise SettingError(f"longctx.{err}") from None
        super().__init__(data, tokenizer, **options)
        opts = self.options
        if opts.haystack == "auto":
            opts.haystack = "text" if data else "noise"
        if opts.haystack == "text" and not data:
            raise SettingError("longctx.haystack=text reads its text from --data FILE; none given")
        if data and opts.haystack != "text":
            raise SettingError(f"longctx: --data gives the haystack text, but haystack={opts.haystack}")
        self.source = TextSource(read_text_file(data), data) if data else None
        self.format = PromptFormat(tokenizer, chat=opts.chat)

    # ------------------------------------------------------------ the suite contract

    def items(self, limit: int | None = None) -> list[Item]:
        out: list[Item] = []
        for task in self.options.tasks:
            cells = [(length, depth) for length in self.options.lengths
                     for depth in (self.options.depths if task in NIAH else (None,))]
            made = 0
            for length, depth in cells:
                for sample in range(self.options.samples):
                    if limit is not None and made >= limit:
                        break
                    out.append(self.item(task, length, depth, sample))
                    made += 1
        return out

    def item(self, task: str, length: int, depth: float | None, sample: int) -> Item:
        where = f"d{depth:g}-" if depth is not None else ""
        item_id = f"{task}-{length}-{where}s{sample}"
        rng = random.Random(f"longctx:{self.options.seed}:{item_id}")
        build = {"vt": self._vt, "cwe": self._cwe, "fwe": self._fwe}.get(task, self._niah)
        try:
            user, answers, prefix, meta = build(task, length, depth, rng)
        except SettingError as err:
            raise SettingError(f"longctx.{err}") from None
        meta = {"task": task, "length": length, "depth": depth, "sample": sample, "answer_prefix": prefix,
                "metric": "string_match_all",
                "max_new_tokens": MAX_NEW_TOKENS["niah" if task in NIAH else task], **meta}
        return Item(item_id, task, (user,), tuple(answers), meta=meta)

    def prompt_text(self, item: Item) -> str:
        return self.format.text(item.turns[0], item.meta["answer_prefix"])

    def prompt_ids(self, item: Item) -> list[int]:
        return self.format.ids(self.prompt_text(item))

    def score(self, item: Item, output_text: str) -> tuple[float, str]:
        metric = item.meta["metric"]
        return METRICS[metric](output_text, item.reference), metric

    # ------------------------------------------------------------ shared mechanics

    def _fit(self, layout, haystack: Haystack, stream, length: int, inserts, what: str):
        """Fill `layout(context)` with haystack words to `length` tokens; `inserts(n)` places the needles.
        Returns the fit, the user text, the context, where it starts in the user text, and where each
        inserted sentence starts in the context."""
        fmt = self.format
        need = length - fmt.count(fmt.text(*layout("")))

        def build(n: int) -> str:
            return fmt.text(*layout(haystack.text(n, inserts(n))[0]))

        while True:
            need = int(need * 1.25) + 64
            haystack.extend(stream, fmt, need)
            result: Fit = fit(build, lambda n: haystack.prefix[n], len(haystack.units), length, fmt.count, what,
                              TOLERANCE)
            if result.n < len(haystack.units) or length - result.tokens <= TOLERANCE:
                break  # else the estimate undercounted this tokenizer: more haystack, and again
        context, offsets = haystack.text(result.n, inserts(result.n))
        user = layout(context)[0]
        start = user.index(context) if context else len(user)
        return result, user, context, start, offsets

    def _stream(self, rng: random.Random, needles_maker=None):
        if self.options.haystack == "text":
            return self.source.stream(rng)
        if self.options.haystack == "needles" and needles_maker is not None:
            return generated_sentences(needles_maker, rng)
        return noise_sentences(rng)

    # ------------------------------------------------------------ needle in a haystack

    def _niah(self, task: str, length: int, depth: float, rng: random.Random):
        for _attempt in range(8):  # again when the haystack or a distractor repeats an answer (rare)
            result, user, context, start, offsets, answers, prefix, asked = self._niah_once(task, length, depth, rng)
            if all(user.count(a) == 1 for a in answers):
                break
        # token positions in the rendered prompt: the context's start and end, the asked needle's end, each
        # needle's start; depth_actual = context tokens before the asked needle / context tokens without it
        fmt, at_char = self.format, len(self.format.head) + start
        chars = [0, len(context), offsets[0] + len(asked), *offsets]
        first, end, asked_end, *needle_at = fmt.token_indices(result.text, [at_char + c for c in chars])
        without = max(end - first - (asked_end - needle_at[0]), 1)
        o = self.options
        meta = {"tokens": result.tokens, "haystack": o.haystack, "keys": o.keys, "values": o.values,
                "needle_tokens": needle_at, "depth_actual": round(100 * (needle_at[0] - first) / without, 2),
                "context_span": [start, start + len(context)]}
        return user, answers, prefix, meta

    def _niah_once(self, task: str, length: int, depth: float, rng: random.Random):
        o = self.options
        singular, plural = KINDS[o.values]
        make_key, make_value = MAKERS[o.keys], MAKERS[o.values]
        n_keys = o.needles if task in ("niah_multikey", "niah_multiquery") else 1
        n_values = o.needles if task == "niah_multivalue" else 1
        n_asked = o.needles if task == "niah_multiquery" else 1
        keys = W.distinct(make_key, rng, n_keys)
        values = [W.distinct(make_value, rng, n_values) for _ in keys]
        needles = [(k, v) for k, vs in zip(keys, values) for v in vs]  # the asked key's first: at depth
        asked = keys[:n_asked]
        answers = [v for k, vs in zip(keys, values) if k in asked for v in vs]
        fractions = [depth / 100] + [rng.random() for _ in needles[1:]]
        many = len(answers) > 1
        listed = _listing(asked)

        def sentence(key: str, value: str) -> str:
            return f"Note: the hidden {singular} filed under {key} is {value}."

        def distractor(r: random.Random) -> str:
            key = make_key(r)
            while key in keys:
                key = make_key(r)
            return sentence(key, make_value(r))

        if many:
            intro = (f"Some hidden {plural} are tucked into the text below. Remember them: you will be asked for "
                     f"them afterwards.")
            question = f"What are all the hidden {plural} filed under {listed}?"
            prefix = f"The hidden {plural} filed under {listed} are:"
        else:
            intro = (f"A hidden {singular} is tucked into the text below. Remember it: you will be asked for it "
                     f"afterwards.")
            question = f"What is the hidden {singular} filed under {listed}?"
            prefix = f"The hidden {singular} filed under {listed} is:"

        def layout(context: str) -> tuple[str, str]:
            return f"{intro}\n\n{context}\n\n{question}", prefix

        haystack = Haystack()
        sentences = [sentence(k, v) for k, v in needles]
        sizes = self.format.piece_counts([" " + s for s in sentences])

        def inserts(n: int) -> list[tuple[int, str, int]]:
            # the others first, at random; then the asked needle at its depth counting the others' tokens
            others = [haystack.position(f, n) for f in fractions[1:]]
            last = fractions[0] >= 0.5  # sharing a position, the asked needle goes after the others when deep
            first = haystack.position(fractions[0], n, list(zip(others, sizes[1:])), last)
            return [(first, sentences[0], 1 if last else -1)] + [(p, s, 0) for p, s in zip(others, sentences[1:])]

        fitted = self._fit(layout, haystack, self._stream(rng, distractor), length, inserts, task)
        return (*fitted, answers, prefix, sentences[0])

    # ------------------------------------------------------------ variable tracking

    def _chains(self, rng: random.Random, chains: int, hops: int) -> tuple[list[list[str]], list[str], list[str]]:
        names = W.distinct(W.variable_name, rng, chains * (hops + 1))
        values = [str(v) for v in W.distinct(lambda r: r.randint(10000, 99999), rng, chains)]
        groups = [names[i * (hops + 1):(i + 1) * (hops + 1)] for i in range(chains)]
        statements = [[f"VAR {g[0]} = {v}."] + [f"VAR {g[j + 1]} = VAR {g[j]}." for j in range(hops)]
                      for g, v in zip(groups, values)]
        return statements, groups[0], values

    def _vt(self, task: str, length: int, depth: None, rng: random.Random):
        o = self.options
        instruction = "Follow the chains of variable assignments hidden in the text below."

        def question(value: str) -> str:
            return f"Question: Which variables are assigned the value {value} in the text above?"

        def answer_prefix(count: int, value: str) -> str:
            return f"Answer: {count} variables hold the value {value}:"

        # the solved example: a short chain among a few noise sentences
        ex_statements, ex_names, ex_values = self._chains(rng, 1, o.hops)
        ex_noise = [" ".join(s) for s, _ in zip(noise_sentences(rng), range(2 * len(ex_statements[0])))]
        ex_noise[1::2] = ex_statements[0]
        example = (f"Here is a solved example.\n{instruction}\n\n{' '.join(ex_noise)}\n{question(ex_values[0])}\n"
                   f"{answer_prefix(len(ex_names), ex_values[0])} {' '.join(ex_names)}.\n\nNow the task.\n")

        statements, answers, values = self._chains(rng, o.chains, o.hops)
        prefix = answer_prefix(len(answers), values[0])
        fractions = [sorted(rng.random() for _ in chain) for chain in statements]

        def layout(context: str) -> tuple[str, str]:
            return f"{example}{instruction}\n\n{context}\n\n{question(values[0])}", prefix

        haystack = Haystack()

        def inserts(n: int) -> list[tuple[int, str, int]]:
            return [(haystack.position(f, n), s, k) for chain, fs in zip(statements, fractions)
                    for k, (f, s) in enumerate(zip(fs, chain))]

        result, user, context, start, _ = self._fit(layout, haystack, self._stream(rng), length, inserts, task)
        meta = {"tokens": result.tokens, "haystack": "text" if o.haystack == "text" else "noise",
                "chains": o.chains, "hops": o.hops, "context_span": [start, start + len(context)]}
        return user, answers, prefix, meta

    # ------------------------------------------------------------ common words

    def _cwe(self, task: str, length: int, depth: None, rng: random.Random):
        common_n = 10
        short = length < 4096  # RULER: fewer repeats (and a smaller example) below 4k tokens
        often, rarely = (6, 1) if short else (30, 3)
        instruction = ("Below is a numbered list of words. A few of them occur far more often than the rest; "
                       "remember which.")
        question = f"Question: Which are the {common_n} most frequent words in the list above?"
        prefix = f"Answer: The {common_n} most frequent words in the list are:"

        def numbered(words: list[str]) -> list[str]:
            return [f" {i + 1}. {w}" for i, w in enumerate(words)]

        def word_list(words: list[str], often: int, rarely: int, seed: str) -> list[str]:
            listed = words[:common_n] * often + words[common_n:] * rarely
            random.Random(seed).shuffle(listed)
            return listed

        ex_words = W.distinct(W.pseudo_word, rng, 20 if short else 40)
        ex_list = word_list(ex_words, 3 if short else 10, 1 if short else 3, f"{rng.random()}")
        example = (f"{instruction}\n{''.join(numbered(ex_list)).strip()}\n{question}\n{prefix}"
                   f"{''.join(numbered(ex_words[:common_n]))}\n\n")

        def layout(context: str) -> tuple[str, str]:
            return f"{example}{instruction}\n{context}\n{question}", prefix

        # RULER sizes the list by its number of distinct words: estimate that number from the tokens of each
        # word and list number, take one word more, and let the fill drop the last few entries
        fmt = self.format
        room = length - fmt.count(fmt.text(*layout("")))
        sample = fmt.piece_counts([f" {max(room // 8, 1)}. {w}" for w in ex_words])
        most = common_n + 1 + int(1.2 * max(room, 0) / (rarely * np.mean(sample)))
        words: list[str] = []
        while True:  # enough distinct words to overfill the room
            words += W.distinct(W.pseudo_word, rng, most - len(words), exclude=set(words) | set(ex_words))
            word_cost = np.array(fmt.piece_counts([" " + w for w in words]), dtype=float)
            entries = common_n * often + (most - common_n) * rarely
            number_cost = np.concatenate([[0], np.cumsum(fmt.piece_counts([f" {i + 1}." for i in range(entries)]))])

            def estimate(distinct: int, word_cost=word_cost, number_cost=number_cost) -> float:
                listed = common_n * often + (distinct - common_n) * rarely
                return (number_cost[listed] + often * word_cost[:common_n].sum()
                        + rarely * word_cost[common_n:distinct].sum())

            if estimate(most) > room:
                break
            most *= 2
        distinct = common_n + largest_within(lambda extra: estimate(common_n + extra), room, most - common_n)
        distinct = min(distinct + 1, most)
        listed = word_list(words[:distinct], often, rarely, f"{rng.random()}")
        units = numbered(listed)
        prefix_sums = np.concatenate([[0], np.cumsum(fmt.piece_counts(units))])

        def build(n: int) -> str:
            return fmt.text(*layout("".join(units[:n]).strip()))

        result = fit(build, lambda n: float(prefix_sums[n]), len(units), length, fmt.count, task, TOLERANCE)
        context = "".join(units[:result.n]).strip()
        user = layout(context)[0]
        kept = Counter(listed[:result.n])
        start = user.index(context) if context else len(user)
        meta = {"tokens": result.tokens, "often": often, "rarely": rarely, "distinct": distinct,
                "entries": result.n, "dropped": len(units) - result.n,
                "least_common": min(kept[w] for w in words[:common_n]),
                "most_rare": max([kept[w] for w in words[common_n:distinct]] or [0]),
                "context_span": [start, start + len(context)]}
        return user, words[:common_n], prefix, meta

    # ------------------------------------------------------------ frequent words

    def _fwe(self, task: str, length: int, depth: None, rng: random.Random):
        alpha, top = 2.0, 3
        vocab_size = max(length // 50, top + 2)  # RULER's default vocabulary: length / 50
        instruction = ("Read the coded text below and keep count of how often each coded word occurs. Find the "
                       "three coded words that occur most often.")
        question = ("Question: Ignore the dots '....'. Which three coded words occur most often in the coded text "
                    "above? Give no explanation.")
        prefix = "Answer: The three coded words that occur most often are:"
        fmt = self.format

        def layout(context: str) -> tuple[str, str]:
            return f"{instruction}\n{context}\n{question}", prefix

        # RULER draws floor(n * k^-alpha / zeta(alpha)) copies of the rank-k word; here one long shuffled draw
        # whose first words the fill keeps, so it can stop at any word (the answers are then counted in what
        # was kept)
        weights = np.arange(1, vocab_size + 1, dtype=float) ** -alpha / ZETA_2
        fixed = fmt.count(fmt.text(*layout("")))
        for _attempt in range(8):
            vocab = W.distinct(W.coded_word, rng, vocab_size)
            vocab[0] = "..."  # RULER: the most frequent rank is noise, not a word
            cost = dict(zip(vocab, fmt.piece_counts([" " + w for w in vocab])))
            total = 4 * max(length - fixed, 1) / max(min(cost.values()), 1) + 64
            drawn = [w for w, c in zip(vocab, np.floor(total * weights).astype(int)) for _ in range(c)]
            rng.shuffle(drawn)
            prefix_sums = np.concatenate([[0], np.cumsum([cost[w] for w in drawn])])

            def build(n: int, drawn: list[str] = drawn) -> str:
                return fmt.text(*layout(" ".join(drawn[:n])))

            result = fit(build, lambda n, p=prefix_sums: float(p[n]), len(drawn), length, fmt.count, task, TOLERANCE)
            ranked = Counter(w for w in drawn[:result.n] if w != "...").most_common(top + 1)
            if len(ranked) > top and ranked[top - 1][1] > ranked[top][1]:  # a strict top three
                break
        answers = [w for w, _ in ranked[:top]]
        context = " ".join(drawn[:result.n])
        user = layout(context)[0]
        start = user.index(context) if context else len(user)
        meta = {"tokens": result.tokens, "alpha": alpha, "vocabulary": vocab_size,
                "answer_counts": [c for _, c in ranked[:top]], "next_count": ranked[top][1],
                "context_span": [start, start + len(context)]}
        return user, answers, prefix, meta


def _listing(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]

