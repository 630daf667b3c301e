"""decodebench as an lm-evaluation-harness model, and lm-eval's tasks folded into decodebench's records.

`DecodebenchLM` (registered with lm-eval as "decodebench") answers lm-eval's three request types:
- `loglikelihood` (context, continuation) and `loglikelihood_rolling` (a document) from the target, through the
  method's cache policy when one is composed (`ar+streaming_llm`: read in chunks on the cache, so that it acts;
  a model transform plugs in at the same place, `_read`), as lm-eval's HF model scores them: a pair in one pass
  over at most `max_length` tokens (the context cut from the left; an empty context is BOS), a document after
  BOS (EOS without one) in disjoint windows of `max_length` tokens (harness/likelihood.py; tests/test_lm_eval.py
  checks both against lm-eval's own HFLM);
- `generate_until` through the decoder (`sps`, `token_recycling`, ...) with the runner's counters and trackers
  on: every request is a decodebench record (item `<task>/<doc_id>`, turn = its index among that document's
  requests), lm-eval's `until` as stop strings (the text returned is cut at the first), `max_gen_toks` as its
  token budget, greedy unless the task samples (`do_sample: true` with a temperature); a lossless decoder's
  greedy output is checked against `ar`'s record of the same request when there is one.
Requests are served one at a time (no batching: the harness times and counts each generation alone).

Two ways in:
- from lm-eval: `import harness.lm_eval_model` (that registers it), then `lm_eval.simple_evaluate(
  model="decodebench", model_args="target=smollm2-135m,method=sps,draft=...,out=runs/x,sps.gamma=4", ...)`,
  or `python -m harness.lm_eval_model --model_args ... --tasks ...` (the shipped tasks offline). The records
  go to `out` (results.jsonl and manifest.json: `decodebench report OUT` builds a report).
- from decodebench: `decodebench run --suite lm-eval:TASK[,TASK...]` (suites/lm_eval.py): per method x task
  `run_task` runs `simple_evaluate`, appends the task's generation records (each with its document's score)
  and returns the task's metrics for the task's own record.
This module imports lm-eval: it is imported only on those paths (lm-eval is the optional extra `eval`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import time
from collections import Counter
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from harness import likelihood
from harness.record import Record
from harness.results import record_key
from harness.runner import BASELINE, RunConfig, Runner
from methods.base import Sampling
from suites.base import Item, Suite

NOT_METRICS = ("alias", "name", "sample_len", "sample_count")


class Requests(Suite):
    """The suite of a run lm-eval drives (its requests arrive one by one): one placeholder item."""

    name = "lm-eval"
    needs = "lm-eval"

    def items(self, limit: int | None = None) -> list[Item]:
        return [Item("lm-eval", "lm-eval", ("",))]


def _standalone(method: str, target: str, draft: str | None, device: str, dtype: str, out: str | None,
                settings: dict[str, dict]) -> Runner:
    """A runner of its own (models loaded, a run folder with a manifest) for lm-eval's model_args."""
    from harness.manifest import write_manifest
    from harness.results import ResultStore

    cfg = RunConfig(suite="lm-eval", methods=[method], target=target, draft=draft, device=device, dtype=dtype,
                    settings=settings, out=out or f"runs/lm-eval-{time.strftime('%Y%m%d-%H%M%S')}")
    runner = Runner(cfg, suite=Requests())
    runner._load_models()
    runner.store = ResultStore(runner.out)
    write_manifest(runner.out, cfg, runner.device, runner.methods, runner.target, runner.draft, runner._roofline(),
                   identity=runner.identity, data=runner.data)
    return runner


@register_model("decodebench")
class DecodebenchLM(LM):
    """lm-eval's LM served by decodebench's runner: one method (DECODER[+POLICY]) on the runner's target."""

    def __init__(self, runner: Runner | None = None, method: str = "ar", target: str | None = None,
                 draft: str | None = None, device: str = "auto", dtype: str = "auto", out: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, chunk: int = 256, repeat: int = 0,
                 batch_size: Any = None, max_batch_size: Any = None, **settings: Any) -> None:
        """From lm-eval's model_args: target, method, draft, device, dtype, out, max_length (default: the
        model's max_position_embeddings), max_gen_toks (when a task sets none), chunk (tokens per pass on the
        cache under a policy) and METHOD.KNOB=VALUE settings. batch_size is accepted and unused."""
        super().__init__()
        if runner is None:
            from harness import models

            knobs: dict[str, dict] = {}
            for key, value in settings.items():
                part, dot, knob = key.partition(".")
                if not dot:
                    raise ValueError(f"decodebench model: unknown argument {key!r} (settings are METHOD.KNOB=VALUE)")
                knobs.setdefault(part, {})[knob] = str(value)
            runner = _standalone(method, target or models.DEFAULT_TARGET, draft, device, dtype, out, knobs)
            self.flush_each = True  # lm-eval drives: a generation's record is written when it is done
        else:
            self.flush_each = False  # run_task writes them after scoring
        self.runner, self.name, self.repeat, self.chunk = runner, method, repeat, chunk
        self.method = runner.methods[method]
        self.policy = getattr(self.method, "policy", None)
        self.model, self.tokenizer = runner.target.model, runner.target.tokenizer
        self.max_length = int(max_length or getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix = likelihood.prefix_token_id(self.tokenizer)
        self.pending: list[Record] = []  # generation records not yet written
        self.turns: Counter[str] = Counter()
        self.calls = self.tokens = 0  # target passes and tokens over every request served
        self.warmed = not runner.cfg.warmup

    # ------------------------------------------------------------ what lm-eval reads

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "decodebench")).replace("/", "__")

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"decodebench_method": self.name, "target": self.runner.cfg.target}

    # ------------------------------------------------------------ scoring

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _read(self, ids: list[int], scored: int | None = None) -> likelihood.Reading:
        """The last `scored` tokens of `ids` (all after the first when None) under the method's policy, or
        in lm-eval's windows without one; the target's passes added to the adapter's counts."""
        counter = self.runner.target_counter
        counter.reset()
        with self.policy.attach(self.model) if self.policy is not None else contextlib.nullcontext():
            if self.policy is not None:
                reading = likelihood.read_cached(self.model, ids, self.chunk)
                reading = reading.tail(scored) if scored is not None else reading
            elif scored is not None:
                reading = likelihood.read_continuation(self.model, ids, scored, self.max_length)
            else:
                reading = likelihood.read_sliding(self.model, ids, self.max_length, self.max_length)
        self.calls += counter.calls
        self.tokens += counter.tokens
        return reading

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) pair as lm-eval's HF model makes them: trailing spaces of
        the context move to the continuation, the whole text is encoded and split where the context's ids
        end; an empty context is the BOS (EOS) token."""
        if not context:
            return [self.prefix], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self._encode(context + continuation), self._encode(context)
        return head, whole[len(head):]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            head, tail = self._pair(*request.args)
            reading = self._read(head + tail, scored=len(tail))
            out.append((-math.fsum(reading.nll), all(reading.greedy)))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        first = [self.prefix] if self.prefix is not None else []  # no BOS or EOS: the first token goes unscored
        return [-math.fsum(self._read(first + self._encode(request.args[0])).nll) for request in requests]

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = [self._generate(request) for request in requests]
        if self.flush_each:
            self.flush()
        return out

    def _sampling(self, kwargs: dict) -> Sampling:
        """The task's sampling: greedy unless it asks to sample (do_sample with a temperature > 0)."""
        run = self.runner.cfg.sampling
        temperature = float(kwargs.get("temperature", run.temperature) or 0.0)
        if kwargs.get("do_sample") is False or temperature <= 0:
            return Sampling(temperature=0.0, seed=run.seed)
        return Sampling(temperature=temperature, top_p=float(kwargs.get("top_p", run.top_p) or 1.0),
                        top_k=int(kwargs.get("top_k", run.top_k) or 0), seed=run.seed)

    def _generate(self, request) -> str:
        context, gen_kwargs = request.args
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        sampling = self._sampling(kwargs)
        ids = self._encode(context) or [self.prefix]
        if self.max_length > max_new:
            ids = ids[-(self.max_length - max_new):]  # the context cut from the left, as lm-eval's HF model
        runner, task = self.runner, request.task_name or "lm-eval"
        item_id = f"{task}/{request.doc_id}"
        item = Item(item_id, task, (context,), meta={"task": task, "doc_id": request.doc_id})
        record = runner.new_record(self.name, item, self.turns[item_id], self.repeat)
        self.turns[item_id] += 1
        record.item_turns = None  # lm-eval may send several requests for one document
        record.temperature = sampling.temperature
        record.prompt_tokens = len(ids)
        record.prompt_sha = hashlib.sha1(str(ids).encode()).hexdigest()[:16]
        text = ""
        try:
            if not self.warmed:  # one short untimed generation, so lazy initialisation is not timed
                runner._generate(self.method, ids, seed=0, max_new_tokens=min(4, max_new), state={})
                self.warmed = True
            carry = self.method.stateful and runner.cfg.method_state == "carry"
            state, seen = runner.request_states.get(self.name, ({}, 0)) if carry else ({}, 0)
            record.update(runner._generate(self.method, ids, record.seed, max_new,
                                           state=state if self.method.stateful else None, sampling=sampling,
                                           stop_strings=tuple(until)))
            if self.method.stateful:
                record.state_items_seen = seen
            if carry:
                runner.request_states[self.name] = (runner.state_left, seen + 1)
            record.output_text = self.tokenizer.decode(record.output_ids, skip_special_tokens=True)
            text = record.output_text
            for stop in until:  # lm-eval's HF model cuts the text at each stop string
                text = text.split(stop)[0]
            if self.method.lossless and sampling.greedy and self.name != BASELINE:
                record.lossless_check = runner._lossless_check(record, ids, self.name)
        except Exception as err:  # noqa: BLE001 - recorded; lm-eval gets an empty answer and goes on
            record.error = f"{type(err).__name__}: {err}"
            runner.console.print(f"[red]{self.name} {item_id}: {record.error}[/]", markup=False)
        self.calls += record.target_calls or 0
        self.tokens += record.target_tokens or 0
        self.pending.append(record)
        return text

    def flush(self, scores: dict[int, float] | None = None, metric: str | None = None) -> None:
        """Write the pending generation records (with their document's score, when given)."""
        for record in self.pending:
            if self.runner.store.has(record_key(record)):  # a resumed task: its first run's record stays
                continue
            if scores is not None and record.error is None:
                doc_id = int(record.item_id.rsplit("/", 1)[1])
                record.task_score, record.task_metric = scores.get(doc_id), metric
            self.runner.store.append(record)
            self.runner.written += 1
            if record.error:
                self.runner.failures.append(record.error)
        self.pending.clear()


# ---------------------------------------------------------------- decodebench run --suite lm-eval:TASK


def task_metrics(results: dict, task: str) -> tuple[dict[str, float], str | None]:
    """A task's numeric figures from simple_evaluate's results ({metric: value, metric_stderr: error}, the
    filter appended as `metric,filter` when it is not lm-eval's default `none`) and its first metric."""
    metrics: dict[str, float] = {}
    for key, value in (results.get("results", {}).get(task) or {}).items():
        metric, comma, filt = key.partition(",")
        if not comma or metric in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            metrics[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    first = next((m for m in metrics if not m.split(",")[0].endswith("_stderr")), None)
    return metrics, first


def doc_scores(results: dict, task: str, metric: str | None) -> dict[int, float]:
    """Each document's value of `metric` (`name` or `name,filter`) from simple_evaluate's logged samples."""
    if metric is None:
        return {}
    name, _, filt = metric.partition(",")
    scores = {}
    for sample in (results.get("samples") or {}).get(task) or []:
        value = sample.get(name)
        if sample.get("filter", "none") == (filt or "none") and isinstance(value, (int, float)):
            scores[int(sample["doc_id"])] = float(value)
    return scores


@contextlib.contextmanager
def _quiet():
    """lm-eval's INFO logging off while it runs (the runner shows progress); warnings stay."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_task(runner: Runner, name: str, item: Item, repeat: int = 0) -> dict:
    """One lm-eval task under one method: simple_evaluate through DecodebenchLM (offline for the shipped
    tasks), its generation records written with their documents' scores; the task record's fields returned."""
    from lm_eval import simple_evaluate

    suite, task = runner.suite, item.item_id
    lm = DecodebenchLM(runner=runner, method=name, repeat=repeat)
    opts = suite.options
    start = time.perf_counter()
    with _quiet():
        results = simple_evaluate(model=lm, tasks=[suite.task_spec(task)], task_manager=suite.task_manager(),
                                  limit=runner.cfg.limit, num_fewshot=None if opts.num_fewshot < 0 else opts.num_fewshot,
                                  bootstrap_iters=opts.bootstrap_iters, log_samples=True,
                                  random_seed=runner.cfg.sampling.seed, numpy_random_seed=runner.cfg.sampling.seed,
                                  torch_random_seed=runner.cfg.sampling.seed)
    wall = time.perf_counter() - start
    metrics, first = task_metrics(results, task)
    lm.flush(doc_scores(results, task, first), first)
    higher = (results.get("higher_is_better") or {}).get(task) or {}
    return {"metrics": metrics, "task_metric": first, "wall_s": wall, "target_calls": lm.calls,
            "target_tokens": lm.tokens, "item_meta": {**(item.meta or {}), "documents": results.get("n-samples", {})
                                                      .get(task, {}).get("effective"),
                                                      "higher_is_better": {k: bool(v) for k, v in higher.items()}}}


# ---------------------------------------------------------------- python -m harness.lm_eval_model


def main(argv: list[str] | None = None) -> int:
    """lm-eval's simple_evaluate on decodebench's model: the shipped tasks by name (offline), any other
    lm-eval task when its data can be loaded."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    from suites.lm_eval import LmEvalSuite

    p = argparse.ArgumentParser(prog="python -m harness.lm_eval_model", description=main.__doc__)
    p.add_argument("--model_args", default="", help="target=...,method=...,draft=...,out=...,METHOD.KNOB=VALUE")
    p.add_argument("--tasks", default="decodebench_prose_ppl,decodebench_mc,decodebench_gen")
    p.add_argument("--include_path", help="a folder of your own task YAML files")
    p.add_argument("--limit", type=int)
    p.add_argument("--num_fewshot", type=int)
    p.add_argument("--output", help="write simple_evaluate's results (JSON) here")
    args = p.parse_args(argv)
    from lm_eval.utils import simple_parse_args_string
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # as the decodebench command does

    suite = LmEvalSuite(data=args.include_path, tasks=args.tasks)
    lm = DecodebenchLM.create_from_arg_obj(simple_parse_args_string(args.model_args))
    results = simple_evaluate(model=lm, tasks=[suite.task_spec(t) for t in suite.names],
                              task_manager=suite.task_manager(), limit=args.limit, num_fewshot=args.num_fewshot,
                              bootstrap_iters=1000)
    print(make_table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    print(f"decodebench records: {lm.runner.out / 'results.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
