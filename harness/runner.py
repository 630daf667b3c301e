"""Run methods over a suite: one atomic record per method x item x turn, resumable, with the
harness (not the method) counting cost and checking lossless claims against `ar`."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import threading
import time
import traceback
import zlib
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness import likelihood, quality, roofline
from harness import models as model_specs
from harness.console import escape, make_console, progress
from harness.instrument import (
    Budget,
    KVWatch,
    PassCounter,
    UncountedWork,
    registered_state_bytes,
    synchronize,
)
from harness.manifest import write_manifest
from harness.methodstate import MODES, MethodStates
from harness.record import LosslessCheck, Record
from harness.results import ResultStore, first_difference, record_key
from harness.runfolder import RunFolder, identity
from harness.trackers import EnergyTracker, PeakMemory
from methods.base import BudgetExhausted, DecodeContext, Method, Sampling
from methods.common.cache_policy import Spec, compose, parse
from suites.base import Item, Suite, items_sha256, resolve

BASELINE = "ar"
UNLIMITED = Budget()
# Relative top-2 logit gap under which a greedy divergence is a numerical tie, by dtype. Half
# precision: 4 machine epsilons, since batched and one-token passes differ by a few ulps of the
# logits after 20-30 layers (measured on an H100 in bf16: transformers' own assisted generation
# diverges from its greedy search at the same positions, with gaps of 1-4 ulps).
TIE_EPSILON = {"float32": 1e-5, "bfloat16": 4 * 2.0**-7, "float16": 4 * 2.0**-10}


@dataclass
class RunConfig:
    suite: str = "specbench"
    methods: list[str] = field(default_factory=lambda: ["ar", "sps", "pld"])
    target: str = model_specs.DEFAULT_TARGET
    draft: str | None = model_specs.DEFAULT_DRAFT
    data: str | None = None
    limit: int | None = None
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    budgets: list[Budget] = field(default_factory=lambda: [Budget()])  # several = a fixed-budget sweep
    settings: dict[str, dict] = field(default_factory=dict)  # method -> Config overrides
    device: str = "auto"
    dtype: str = "auto"
    warmup: bool = True
    trackers: bool = True  # memory and energy samplers
    repeats: int = 1  # runs of every record; timing spread over them (sampling: a new seed each)
    # state stateful methods keep across prompts: "carry" (the papers' hot start over distinct items, in
    # run order) or "fresh" (emptied before every item); every repeat and budget point of an (item, turn)
    # starts from the same snapshot either way (harness/methodstate.py)
    method_state: str = "carry"
    suite_options: dict[str, str] = field(default_factory=dict)  # the suite's own options (--option NAME=VALUE)
    # model work outside a counted pass (a method calling lm_head or a decoder layer itself), or a pass
    # marked as self-drafting that skipped nothing: counted in the record, or, when strict, an error
    strict_counting: bool = False
    out: str = "runs/latest"

    # let a model folder run its own Python code (transformers' trust_remote_code); off unless asked
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        """Every setting checked before anything loads, the message naming its command-line flag."""
        if self.data is not None:  # absolute, so the manifest (and `reproduce`) work from any directory
            self.data = str(Path(self.data).expanduser().resolve())
        if self.method_state not in MODES:
            raise RunConfigError(f"--method-state must be one of {', '.join(MODES)}; got {self.method_state!r}")
        if not self.methods:
            raise RunConfigError("--methods names no method")
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise RunConfigError(f"--methods names {', '.join(repeated)} more than once")
        for flag, value in (("--max-new-tokens", self.max_new_tokens), ("--limit", self.limit),
                            ("--repeats", self.repeats)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RunConfigError(f"{flag} must be at least 1; got {value!r}")
        s = self.sampling
        if not (math.isfinite(s.temperature) and s.temperature >= 0):
            raise RunConfigError(f"--temperature must be >= 0 (0 = greedy); got {s.temperature}")
        if not (0 < s.top_p <= 1):
            raise RunConfigError(f"--top-p must be in (0, 1]; got {s.top_p}")
        if s.top_k < 0:
            raise RunConfigError(f"--top-k must be >= 0 (0 = off); got {s.top_k}")
        if not self.budgets:
            raise RunConfigError("--budget: no budget point")
        for budget in self.budgets:
            for name, value in asdict(budget).items():
                if value is not None and not (math.isfinite(value) and value > 0):
                    raise RunConfigError(f"--budget {name.removeprefix('max_')} must be positive; got {value}")
        resolve_device(self.device)
        model_specs.pick_dtype(self.dtype, resolve_device(self.device))


class RunConfigError(ValueError):
    """A run setting out of range or unusable here; raised before anything loads."""


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT inside the block is acted on when the block ends (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and previous is signal.default_int_handler:
            raise KeyboardInterrupt
        if caught and callable(previous):
            previous(*caught[0])


def resolve_device(name: str) -> str:
    """The torch device a --device value names, or RunConfigError saying why it cannot be used here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise RunConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RunConfigError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; "
                             "use --device cpu (or auto)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise RunConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise RunConfigError("--device mps: MPS is not available here")
    return name


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids through the model's chat template (plain 'User:/Assistant:' text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text)["input_ids"]


def _steps(calls: int, prefill_calls: int) -> int:
    """Decoding steps in `calls` target passes: a prompt read in several chunks (a cache policy's chunked
    prefill) is one step, the one that emits the first token."""
    return calls - max(prefill_calls - 1, 0)


def _extras(ctx: DecodeContext) -> dict[str, float]:
    """The figures a method put in ctx.extras, checked to be numbers (they go into tables)."""
    extras = {}
    for key, value in ctx.extras.items():
        try:
            extras[str(key)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"ctx.extras[{key!r}] must be a number, got {value!r}") from None
    return extras


def item_seed(seed: int, item_id: str, turn: int, repeat: int) -> int:
    """A per-record seed, so a record's sampling does not depend on which records ran before it."""
    return zlib.crc32(f"{seed}:{item_id}:{turn}:{repeat}".encode())


class Runner:
    def __init__(self, cfg: RunConfig, console=None, suite: Suite | None = None,
                 models: dict[str, model_specs.LoadedModel] | None = None) -> None:
        """`suite`: an instance to run instead of the one cfg.suite names (the lm-eval adapter's requests).
        `models`: models the caller built itself, by role ("target", "draft"), used instead of loading
        cfg.target and cfg.draft, which then only name them (selfcheck's random-weight models)."""
        self.cfg = cfg
        self.console = console or make_console()
        self.given = dict(models or {})
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out)
        self.methods: dict[str, Method] = {}
        for name in ([BASELINE] if BASELINE in cfg.methods else []) + [m for m in cfg.methods if m != BASELINE]:
            self.methods[name] = compose(name, cfg.settings)  # DECODER[+POLICY][+TRANSFORM]; errors before loading
        if suite is None:
            suite_cls, options = resolve(cfg.suite, cfg.suite_options)  # NAME or NAME:VALUE (lm-eval:TASK)
            # a suite sized in tokens gets the target's tokenizer now: only the tokenizer, no weights, loads
            tokenizer = None
            if suite_cls.needs_tokenizer or suite_cls.needs == "loglikelihood":
                tokenizer = (self.given["target"].tokenizer if "target" in self.given
                             else model_specs.load_tokenizer(cfg.target, cfg.trust_remote_code))
            suite = suite_cls(data=cfg.data, tokenizer=tokenizer, **options)
        self.suite = suite
        if self.suite.needs == "loglikelihood":
            self._check_likelihood_methods()
        else:
            scoring = [name for name in self.methods if parse(name).scorer]
            if scoring:
                raise RunConfigError(f"{', '.join(scoring)}: a scorer changes how a document's likelihood is read; "
                                     f"suite {cfg.suite} generates (use it with --suite perplexity or longppl)")
        if self.suite.needs == "lm-eval" and (cfg.budgets != [Budget()]):
            raise RunConfigError(f"--budget does not apply to suite {cfg.suite}: lm-eval sets each task's budget")
        self.items: list[Item] = self.suite.items(cfg.limit)
        if not self.items:
            raise RunConfigError(f"suite {cfg.suite} has no items" + (f" in {cfg.data}" if cfg.data else ""))
        self.data = {"path": cfg.data, "sha256": items_sha256(self.items)}  # what the run reads, hashed
        self.identity = identity(cfg, self.methods, self.data["sha256"])
        self.written = 0  # records appended by this process, and how many of them failed
        self.failures: list[str] = []
        # what corpus-based methods build their stores from when their settings name no file: the turns'
        # texts (never the references)
        self.corpus: list[str] = [text for item in self.items for text in item.turns]
        # a stateful method's state across lm-eval's generation requests (carried in request order), and how
        # many requests it has seen
        self.request_states: dict[str, tuple[dict, int]] = {}

    # ------------------------------------------------------------ set-up

    def _load_models(self) -> None:
        cfg = self.cfg
        needs_draft = [n for n, m in self.methods.items() if m.needs.draft]
        if needs_draft and not cfg.draft:
            raise model_specs.ModelError(f"{', '.join(needs_draft)} need a draft model: pass --draft")
        self.console.print(f"loading target [bold]{cfg.target}[/] on {self.device}")
        self.target = self.given.get("target") or model_specs.load(cfg.target, self.device, cfg.dtype,
                                                                   trust_remote_code=cfg.trust_remote_code)
        self.draft = None
        if needs_draft:
            self.console.print(f"loading draft [bold]{cfg.draft}[/]")
            self.draft = self.given.get("draft") or model_specs.load(cfg.draft, self.device, cfg.dtype,
                                                                     trust_remote_code=cfg.trust_remote_code)
            model_specs.check_same_tokenizer(self.target, self.draft)
        self.eos = model_specs.eos_ids(self.target)
        strict = self.cfg.strict_counting
        self.target_counter = PassCounter(self.target.model, "target", strict=strict)
        self.draft_counter = PassCounter(self.draft.model, "draft", strict=strict) if self.draft else None
        # passes a self-drafting method runs through the target (layers skipped) are draft passes
        self.self_draft_counter = PassCounter(self.target.model, "self-draft", self_draft=True, strict=strict)
        self.kv_watch = KVWatch(self.target.model)

    def detach(self) -> None:
        """Take the harness's hooks off the models, for a caller that goes on using them (selfcheck)."""
        for watcher in (self.target_counter, self.draft_counter, self.self_draft_counter, self.kv_watch):
            if watcher is not None:
                watcher.remove()

    def _roofline(self) -> dict:
        """The device's bandwidth and matmul throughput (measured once per process) and the weight
        bytes each model reads per token: what the report needs to place `ar` under its roofline."""
        dtype = str(next(self.target.model.parameters()).dtype).removeprefix("torch.")
        roles = {"target": self.target, **({"draft": self.draft} if self.draft else {})}
        roof = {"device": roofline.measure(self.device, dtype),
                **{role: roofline.model_roof(loaded.model) for role, loaded in roles.items()}}
        # the target under each transform that reads fewer bytes (int8): its own memory-bound limit
        full = roof["target"]["weight_bytes_per_token"]
        transforms = {m.transform.name: m.transform for m in self.methods.values() if getattr(m, "transform", None)}
        smaller = {name: full - t.bytes_saved(self.target.model) for name, t in transforms.items()}
        roof["transforms"] = {name: {"weight_bytes_per_token": size, "bytes_per_parameter": 1.0}
                              for name, size in smaller.items() if size < full}
        return roof

    # ------------------------------------------------------------ one generation

    def _generate(self, method: Method, prompt_ids: list[int], seed: int, max_new_tokens: int,
                  budget: Budget = Budget(), state: dict | None = None, item_meta: dict | None = None,
                  sampling: Sampling | None = None, stop_strings: tuple[str, ...] = ()) -> dict:
        """Run the method once under the hooks; figures come from the harness's own counters. `state` is
        the method's ctx.state (the dict it leaves is `self.state_left` afterwards); `sampling` replaces the
        run's (an lm-eval task's own), and a stop string ends the generation (lm-eval's `until`)."""
        self.target_counter.reset(budget, prompt_tokens=len(prompt_ids))
        drafters = [c for c in (self.draft_counter, self.self_draft_counter) if c]
        for counter in drafters:
            counter.reset()
        self.kv_watch.reset()
        ctx = DecodeContext(
            prompt_ids=list(prompt_ids), target=self.target.model, draft=self.draft.model if self.draft else None,
            sampling=Sampling(**{**asdict(sampling or self.cfg.sampling), "seed": seed}), max_new_tokens=max_new_tokens,
            eos_token_ids=self.eos, tokenizer=self.target.tokenizer, stop_strings=tuple(stop_strings),
            state=state if state is not None else {}, corpus=self.corpus, item_meta=item_meta,
        )
        stop_note = None
        with self._transformed(method):  # outside the timing: generate() finds it attached
            synchronize(self.target.model)
            memory, energy = PeakMemory(self.device), EnergyTracker(self.device)
            entering = time.perf_counter()
            with ExitStack() as trackers:
                if self.cfg.trackers:  # off only to measure the trackers' own cost
                    trackers.enter_context(memory)
                    trackers.enter_context(energy)
                start = time.perf_counter()
                try:
                    method.generate(ctx)
                except BudgetExhausted as exhausted:
                    stop_note = str(exhausted)
                synchronize(self.target.model)
                wall = time.perf_counter() - start
                stop_trackers = time.perf_counter()
        self.kv_watch.finish()
        # Their own cost, outside `wall`: entering and leaving, plus their sampler threads' CPU time
        tracker_s = (start - entering) + (time.perf_counter() - stop_trackers) + memory.thread_cpu_s + energy.thread_cpu_s
        self.state_left = ctx.state
        out = ctx.output
        tc = self.target_counter
        uncounted, uncounted_note = self._uncounted()
        unskipped = self.self_draft_counter.unskipped
        if self.cfg.strict_counting and (uncounted or unskipped):  # the hooks raised; a method swallowed it
            raise UncountedWork(f"uncounted model work: {uncounted_note}" if uncounted else
                                f"{unskipped} passes marked as self-drafting ran every sublayer")
        if stop_note:
            stop = "budget"
        elif out and out[-1] in self.eos:
            stop = "eos"
        elif ctx.stopped:
            stop = "stop"
        else:
            stop = "max_new_tokens"
        return {
            "output_ids": out, "new_tokens": len(out), "wall_s": wall,
            "prefill_s": (tc.first_pass_end - start) if tc.first_pass_end else None,
            "decode_s": (wall - (tc.first_pass_end - start)) if tc.first_pass_end else None,
            "target_pass_s": tc.pass_seconds(),  # per pass: the first is the prefill (or prefill + first verification)
            "draft_pass_s": [s for c in drafters for s in c.pass_seconds()],
            "draft_widths": [w for c in drafters for w in c.widths],
            "tokens_per_s": len(out) / wall if wall > 0 else None,
            "target_calls": tc.calls, "target_tokens": tc.tokens,
            "draft_calls": sum(c.calls for c in drafters), "draft_tokens": sum(c.tokens for c in drafters),
            "self_draft_calls": self.self_draft_counter.calls,  # of draft_calls: passes through the target
            # parameter bytes each self-draft pass ran (sublayers that ran + final norm + head, measured by
            # the hooks), and a full target pass's: the cost model prices a self-draft pass by their ratio
            "self_draft_bytes": list(self.self_draft_counter.pass_bytes),
            "target_pass_bytes": tc.full_pass_bytes,
            "self_draft_unskipped": unskipped,  # passes marked as self-drafting that skipped no sublayer
            "uncounted_calls": uncounted, "uncounted_note": uncounted_note,
            "method_state_bytes": registered_state_bytes(ctx.state),  # measured here, not reported by the method
            "kv_cache_peak_bytes": self.kv_watch.peak, "kv_cache_final_bytes": self.kv_watch.last,
            "policy_state_bytes": self.kv_watch.policy_peak,
            "extras": _extras(ctx), "alternatives": [list(a) for a in ctx.alternatives],
            "prefill_calls": tc.prefill_calls,
            "mean_accepted": len(out) / _steps(tc.calls, tc.prefill_calls) if tc.calls else None,
            "target_widths": tc.widths,  # tokens fed to each target pass: prefill, then verification widths
            "accept_lengths": ctx.trace.accepted, "proposed_lengths": ctx.trace.proposed,
            "trace_error": self._check_trace(ctx, _steps(tc.calls, tc.prefill_calls)), "peak_mem_bytes": memory.peak_bytes,
            **energy.result, "stop_reason": stop, "budget_note": stop_note, "tracker_s": tracker_s,
            "energy_per_token_j": energy.result["energy_j"] / len(out) if energy.result["energy_j"] and out else None,
        }

    def _uncounted(self) -> tuple[int, str | None]:
        """Model parts called outside any counted pass in the generation: target's, then draft's."""
        total, notes = 0, []
        for prefix, counter in (("", self.target_counter), ("draft ", self.draft_counter)):
            if counter is not None:
                n, note = counter.watch.uncounted(prefix)
                total += n
                if note:
                    notes.append(note)
        return total, ", ".join(notes) or None

    @staticmethod
    def _check_trace(ctx: DecodeContext, steps: int) -> str | None:
        """A method's own trace must agree with what the harness counted (`steps`: target passes, the
        prompt's chunks counted as one)."""
        accepted = ctx.trace.accepted
        if not accepted:
            return None
        problems = []
        if sum(accepted) != len(ctx.output):
            problems.append(f"trace accepts {sum(accepted)} tokens, output has {len(ctx.output)}")
        if len(accepted) != steps:
            problems.append(f"trace has {len(accepted)} steps, harness counted {steps} target passes")
        return "; ".join(problems) or None

    def _check_likelihood_methods(self) -> None:
        """A likelihood suite runs what changes likelihoods: `ar` (the model itself), and cache policies and model
        transforms under it. Another decoder reads the document as `ar` does, so it is refused, not recomputed."""
        others = [name for name in self.methods if parse(name).decoder != BASELINE]
        if others:
            raise RunConfigError(f"suite {self.cfg.suite} scores log-likelihoods, which a decoder does not change: "
                                 f"{', '.join(others)} would give ar's figures; run ar, cache policies, "
                                 "transforms and scorers (e.g. --methods ar,streaming_llm,w8,byte_level)")
        if self.cfg.budgets != [Budget()]:
            raise RunConfigError(f"--budget does not apply to suite {self.cfg.suite}: a document is read whole")

    def _likelihood(self, method: Method, item: Item) -> dict:
        """Read the document under the method (a transform applied and/or a policy attached, or the model
        itself), timed and counted as a generation is, as the suite's reading options say (suites/documents.py:
        ReadingOptions); the NLL of every scored token, the log-likelihood of each pass, and the perplexities
        lm-eval defines. The transform goes on before the timing starts. A scorer reads it its own way."""
        scorer = getattr(method, "scorer", None)
        if scorer is not None:
            return self._scored(method, scorer, item)
        opts, model, text = self.suite.options, self.target.model, item.turns[0]
        ids = self.target.tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = likelihood.prefix_token_id(self.target.tokenizer) if opts.prefix == "bos" else None
        ids = ([prefix] if prefix is not None else []) + ids  # lm-eval scores the first token after it
        policy = getattr(method, "policy", None)
        if policy is not None or opts.full_attention == "dense":
            read, how = (lambda: likelihood.read_cached(model, ids, opts.chunk)), f"cached, chunks of {opts.chunk}"
        else:
            window = opts.window or int(getattr(model.config, "max_position_embeddings", 0) or len(ids))
            stride = opts.stride_for(window)
            read, how = (lambda: likelihood.read_sliding(model, ids, window, stride)), f"sliding {window}/{stride}"
        reading, counted = self._timed_reading(method, read, len(ids))
        return {"prompt_tokens": len(ids), "token_nll": reading.nll, "window_tokens": reading.windows,
                "window_loglik": reading.window_loglik, **counted,
                "task_metric": how + (", first token after BOS" if prefix is not None else ""),
                **likelihood.perplexities(reading.nll, text)}

    def _timed_reading(self, method: Method, read, tokens: int) -> tuple[Any, dict]:
        """`read()` under the method's transform (applied before the timing) and policy (attached inside it),
        timed and counted, and the record fields it measured."""
        model, policy = self.target.model, getattr(method, "policy", None)
        with self._transformed(method):
            self.target_counter.reset()
            self.kv_watch.reset()
            synchronize(model)
            start = time.perf_counter()
            with policy.attach(model) if policy is not None else contextlib.nullcontext():
                result = read()
            synchronize(model)
            wall = time.perf_counter() - start
        self.kv_watch.finish()
        tc = self.target_counter
        return result, {"wall_s": wall, "target_calls": tc.calls, "target_tokens": tc.tokens,
                        "target_widths": tc.widths, "target_pass_s": tc.pass_seconds(),
                        "tokens_per_s": tokens / wall if wall > 0 else None, "extras": {},
                        "kv_cache_peak_bytes": self.kv_watch.peak, "kv_cache_final_bytes": self.kv_watch.last,
                        "policy_state_bytes": self.kv_watch.policy_peak}

    def _scored(self, method: Method, scorer, item: Item) -> dict:
        """The document's log-likelihood as the scorer reads it (byte_level: over every canonical tokenization,
        methods/byte_level.py), timed and counted as a reading is. It has no per-token NLL, so no token
        perplexity: word and byte perplexity and bits per byte from its total; one "window", the document."""
        model, tokenizer, text = self.target.model, self.target.tokenizer, item.turns[0]
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        if limit and tokens + 1 > limit:
            raise RunConfigError(f"{scorer.name} reads a document in one pass: {item.item_id} has {tokens} tokens, "
                                 f"more than the model's {limit}; cut it with --option length=N")
        total, counted = self._timed_reading(method, lambda: scorer.total_nll(model, tokenizer, text), tokens)
        settings = ", ".join(f"{k} {v}" for k, v in asdict(scorer.config).items())
        return {"prompt_tokens": tokens, "token_nll": [], "window_tokens": [tokens], "window_loglik": [-total],
                **counted, "task_metric": f"{scorer.name} ({scorer.unit}s, every canonical tokenization; {settings})",
                **likelihood.perplexities_of_total(total, text, scored_tokens=0)}

    def _prompt_ids(self, item: Item, turn: int, answers: list[str]) -> list[int]:
        """The suite's own prompt ids (a prompt sized in tokens) or the chat template over the turns."""
        ids = self.suite.prompt_ids(item) if turn == 0 else None
        return ids if ids is not None else encode_chat(self.target.tokenizer, item.messages(turn, answers))

    def _max_new_tokens(self, item: Item) -> int:
        """--max-new-tokens, or less where the suite's item asks for less (RULER's per-task budgets)."""
        asked = (item.meta or {}).get("max_new_tokens")
        return min(self.cfg.max_new_tokens, int(asked)) if asked else self.cfg.max_new_tokens

    def _quality(self, item: Item, turn: int, prompt_ids: list[int], record: Record) -> dict:
        """The suite's own score (RULER's match on a long-context item), else output perplexity under the
        target and the category's task score. The perplexity pass runs after the record's counts and timings
        were taken, with the counter reset, so no budget or count sees it; a suite that scores its items
        itself (long prompts) gets no perplexity pass, which would re-read the whole prompt."""
        score, metric = self.suite.score(item, record.output_text)
        if metric is not None:
            return {"task_score": score, "task_metric": metric}
        self.target_counter.reset()
        perplexity = quality.output_perplexity(self.target.model, prompt_ids, record.output_ids)
        references = quality.references_for_turn(item.reference, len(item.turns), turn)
        score, metric = quality.task_score(item.category, record.output_text, references)
        return {"output_perplexity": perplexity, "task_score": score, "task_metric": metric}

    # ------------------------------------------------------------ lossless check

    def _transformed(self, method: Method):
        """The method's model transform applied to the target and draft (a no-op context without one)."""
        transform = getattr(method, "transform", None)
        if transform is None:
            return contextlib.nullcontext()
        return transform.attach(self.target.model, self.draft.model if self.draft else None)

    def _lossless_reference(self, name: str) -> str | None:
        """The run's method a lossless `name` must equal under greedy decoding: `ar`, or `ar` on the same transform
        (`w8` or `ar+w8` for `sps+w8`); None when the run has none."""
        want = Spec(BASELINE, None, parse(name).transform)
        return next((other for other in self.methods if parse(other) == want), None)

    def _lossless_check(self, record: Record, prompt_ids: list[int], name: str) -> LosslessCheck | None:
        reference_name = self._lossless_reference(name)
        reference = self.store.get(record_key(dataclasses.replace(record, method=reference_name)))
        if reference is None or reference.get("prompt_sha") != record.prompt_sha:
            return None  # no baseline, or an earlier turn already diverged so the prompts differ
        ours, theirs = record.output_ids, reference["output_ids"]
        position = first_difference(ours, theirs)
        budget_cut = record.stop_reason == "budget" or reference["stop_reason"] == "budget"
        # one being a prefix of the other is equality only when a budget cut the shorter one short;
        # otherwise one stopped early (EOS) where the other went on
        if position is None or (budget_cut and position == min(len(ours), len(theirs))):
            return LosslessCheck(reference=reference_name, equal=True)
        with self._transformed(self.methods[name]):  # the margin of the model both ran on
            margin, relative = self._top2_margin(prompt_ids + theirs[:position])
        transform = getattr(self.methods[name], "transform", None)
        dtypes = [self.target.info["dtype"], transform and transform.compute_dtype]  # the coarser one decides
        eps = max(TIE_EPSILON.get(dtype, 1e-5) if dtype else 0.0 for dtype in dtypes)
        return LosslessCheck(reference=reference_name, equal=False, position=position, margin=margin,
                             relative_margin=relative, numerical_tie=relative < eps)

    def _top2_margin(self, ids: list[int]) -> tuple[float, float]:
        """The target's top-1 minus top-2 logit after `ids` (one clean pass, not counted)."""
        self.target_counter.reset()
        with torch.inference_mode():
            logits = self.target.model(torch.tensor([ids], device=self.target.model.device), logits_to_keep=1).logits
        top = torch.topk(logits[0, -1].float(), 2).values.tolist()
        return top[0] - top[1], (top[0] - top[1]) / max(abs(top[0]), 1e-6)

    # ------------------------------------------------------------ the run

    def pending(self) -> list[tuple[str, Item, int, int, Budget]]:
        """Item-major order: every method runs an item before the next item starts, so the records
        a speed-up compares are measured minutes, not an hour, apart on a drifting machine."""
        return [(name, item, turn, repeat, budget) for item in self.items for turn in range(len(item.turns))
                for repeat in range(self.cfg.repeats) for budget in self.cfg.budgets for name in self.methods
                if not self.store.has(self._key(name, item, turn, repeat, budget))]

    def run(self, force_new: bool = False) -> Path:
        """Run every pending record into the folder, which this process holds alone while it writes;
        a folder holding a run with other settings is refused before any model loads."""
        folder = RunFolder(self.out)
        if force_new and folder.manifest() is not None:
            with folder:  # nobody else may be writing what we move
                self.moved_aside = folder.move_aside()
            self.console.print(f"--force-new: the previous run in {self.out} is now in {self.moved_aside}")
        with folder:
            folder.check(self.identity)
            return self._run()

    def _run(self) -> Path:
        self.store = ResultStore(self.out)
        self.states = MethodStates(self.out / "state", self.cfg.method_state,
                                   [(item.item_id, turn) for item in self.items for turn in range(len(item.turns))],
                                   attempts=self.cfg.repeats * len(self.cfg.budgets))
        todo = self.pending()
        if not todo:
            self.console.print(f"nothing to do: all records are in {self.store.path}")
            return self.out
        self._load_models()
        write_manifest(self.out, self.cfg, self.device, self.methods, self.target, self.draft, self._roofline(),
                       identity=self.identity, data=self.data)
        per_item = len(self.methods) * self.cfg.repeats * len(self.cfg.budgets)
        skipped = sum(len(i.turns) for i in self.items) * per_item - len(todo)
        if skipped:
            self.console.print(f"resuming: {skipped} records already done, {len(todo)} to go")
        with progress(self.console) as bar:
            task = bar.add_task("run", total=len(todo))
            warmed: set[str] = set()
            for name, item, turn, repeat, budget in todo:
                bar.update(task, description=f"{name:>12} {item.item_id} turn {turn} {budget.label}")
                if self.cfg.warmup and name not in warmed and self.suite.needs == "generation":
                    self._warm_up(self.methods[name])
                    warmed.add(name)
                record = self._record(name, item, turn, repeat, budget)
                with interrupts_deferred():  # Ctrl-C mid-write: the record and its count both land first
                    self.store.append(record)
                    self.written += 1
                if record.error:
                    self.failures.append(record.error)
                bar.advance(task)
        for name, error in self.states.save_errors.items():
            self.console.print(f"[yellow]{name}: its method state could not be saved ({escape(error)}); "
                               f"a resumed run cannot restore it[/]")
        return self.out

    def _warm_up(self, method: Method) -> None:
        """One short untimed generation per method, so lazy initialisation is not timed. Its method state
        is a throwaway empty dict: nothing it stores reaches a record."""
        ids = self._prompt_ids(self.items[0], 0, [])
        try:
            self._generate(method, ids, seed=0, max_new_tokens=min(4, self.cfg.max_new_tokens), state={},
                           item_meta=self.items[0].meta)
        except Exception:  # noqa: BLE001 - a failing method fails again, recorded, in the timed run
            pass

    def _key(self, name: str, item: Item, turn: int, repeat: int, budget: Budget) -> tuple:
        return record_key({"method": name, "suite": self.cfg.suite, "item_id": item.item_id, "turn": turn,
                           "repeat": repeat, "budget": budget.label})

    def new_record(self, name: str, item: Item, turn: int, repeat: int = 0, budget: Budget = UNLIMITED) -> Record:
        """A record holding what ran (method, item, turn, repeat, budget point, seed), nothing measured yet."""
        record = Record(method=name, suite=self.cfg.suite, category=item.category, subcategory=item.subcategory,
                        item_id=item.item_id, item_turns=len(item.turns), turn=turn, repeat=repeat,
                        budget=budget.label, **asdict(budget), temperature=self.cfg.sampling.temperature,
                        seed=item_seed(self.cfg.sampling.seed, item.item_id, turn, repeat),
                        method_state=self.cfg.method_state, item_meta=item.meta)
        parsed = parse(name)
        record.decoder, record.policy, record.transform = parsed.decoder, parsed.policy, parsed.transform
        transform = getattr(self.methods[name], "transform", None)
        record.transform_settings = transform.settings() if transform is not None else None
        return record

    def _record(self, name: str, item: Item, turn: int, repeat: int = 0, budget: Budget = Budget()) -> Record:
        record = self.new_record(name, item, turn, repeat, budget)
        method = self.methods[name]
        # the canonical attempt (repeat 0, first budget point) is the one whose state goes on to the next item
        carries = method.stateful and repeat == 0 and budget == self.cfg.budgets[0]
        try:
            if self.suite.needs == "loglikelihood":
                record.update(self._likelihood(method, item))
                return record
            if self.suite.needs == "lm-eval":  # the task's generations are records of their own
                # lm-eval is an optional extra: imported only here
                from harness import lm_eval_model

                record.update(lm_eval_model.run_task(self, name, item, repeat))
                return record
            state = None
            if method.stateful:
                state, record.state_items_seen, record.state_note = self.states.attempt(name, (item.item_id, turn))
            answers = [self.store.get(self._key(name, item, t, repeat, budget)) for t in range(turn)]
            if any(a is None for a in answers):
                raise RuntimeError("an earlier turn of this item failed; the conversation cannot go on")
            prompt_ids = self._prompt_ids(item, turn, [a["output_text"] for a in answers])
            record.prompt_tokens = len(prompt_ids)
            record.prompt_sha = hashlib.sha1(str(prompt_ids).encode()).hexdigest()[:16]
            record.update(self._generate(method, prompt_ids, record.seed, self._max_new_tokens(item), budget, state,
                                         item.meta if turn == 0 else None))
            if carries:
                self.states.carry(name, (item.item_id, turn), self.state_left)
                carries = False
            record.output_text = self.target.tokenizer.decode(record.output_ids, skip_special_tokens=True)
            record.update(self._quality(item, turn, prompt_ids, record))
            record.alternatives_text = [self.target.tokenizer.decode(a, skip_special_tokens=True)
                                        for a in record.alternatives]
            reference = self._lossless_reference(name)
            if self.methods[name].lossless and self.cfg.sampling.greedy and reference not in (None, name):
                record.lossless_check = self._lossless_check(record, prompt_ids, name)
        except Exception as err:  # noqa: BLE001 - recorded, and the run goes on
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if carries:  # a failed attempt: the state goes on as it was before this item
                self.states.carry(name, (item.item_id, turn), None)
            record.error = f"{type(err).__name__}: {err}"
            record.traceback = traceback.format_exc(limit=8)
            self.console.print(f"[red]{name} {item.item_id} turn {turn}: {escape(record.error)}[/]")
        return record
