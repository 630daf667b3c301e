"""The record: what one method did on one (item, turn, repeat, budget point), as the runner writes it to
results.jsonl and as the tables, cost model, reproduce and report read it. This is its one definition.

Fields are grouped by what measured them (one dataclass per group); `Record` joins the groups into one flat
object, and one flat JSON line per record. Renaming, removing or retyping a field is a schema change: bump
SCHEMA_VERSION (tests/test_record.py pins the field list of each version) and teach `upgrade` the old one.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 3
# Records and manifests written before the schema existed carry no version: they are read as version 0,
# whose fields are a subset of version 1's (the missing ones take their defaults, see `upgrade`).
# Version 2 added fields only (decoder/policy, item_meta, the KV cache's bytes, the likelihood group):
# a version 1 record reads with them at their defaults. Version 3 added fields only: the model transform (name,
# settings), prefill_calls, the bytes a cache policy holds beside the cache, each pass's scored tokens and
# log-likelihood, an evaluation's metrics; and the stop reason "stop" (a stop sequence reached).
LEGACY_VERSION = 0
KNOWN_VERSIONS = (LEGACY_VERSION, 1, 2, SCHEMA_VERSION)


class SchemaError(ValueError):
    """A record or manifest this code cannot read: an unknown schema version, or fields the schema lacks."""


def _key(default=dataclasses.MISSING, *, question: bool = False):
    """A field of the record's key (what tells two records apart); `question`: part of the question's id."""
    return field(default=default, metadata={"key": True, "question": question})


def _list():
    return field(default=None)  # None: not measured (an error record, or a run from before the field)


@dataclass(kw_only=True)
class Identity:
    """What ran: set by the runner before generating."""

    schema_version: int = SCHEMA_VERSION
    method: str = _key()
    suite: str = _key(question=True)
    item_id: str = _key(question=True)
    turn: int = _key(0)
    repeat: int = _key(0)
    budget: str = _key("")  # the budget point's label; '' = unlimited
    category: str = "uncategorized"
    subcategory: str | None = None  # e.g. MT-bench's 'writing' under Spec-Bench's 'mt_bench'
    item_turns: int | None = None  # how many turns the item has: a question is complete when all ran
    max_target_calls: int | None = None  # the budget point's limits
    max_target_tokens: int | None = None
    max_wall_s: float | None = None
    temperature: float | None = None
    seed: int | None = None  # this record's sampling seed
    method_state: Literal["carry", "fresh"] | None = None  # cross-prompt state carried over items, or reset
    state_items_seen: int | None = None  # earlier distinct items the method's cross-prompt state had seen
    state_note: str | None = None  # why the state is not what a straight run would have had (a resume, a failure)
    decoder: str | None = None  # `method` is DECODER[+POLICY][+TRANSFORM]: the decoder that ran ...
    policy: str | None = None  # ... the cache/attention policy attached to the target (None: full cache) ...
    transform: str | None = None  # ... and the model transform on target and draft (None: the models as loaded)
    transform_settings: dict[str, Any] | None = None  # that transform's settings, all of them
    item_meta: dict[str, Any] | None = None  # what a generated suite knows of the item (task, length, depth)


@dataclass(kw_only=True)
class Prompt:
    prompt_tokens: int | None = None
    prompt_sha: str | None = None  # of the prompt ids: equal prompts across methods (earlier turns agreed)


@dataclass(kw_only=True)
class Output:
    output_ids: list[int] | None = _list()
    output_text: str | None = None
    new_tokens: int | None = None
    stop_reason: Literal["eos", "max_new_tokens", "budget", "stop"] | None = None  # stop: a stop sequence
    budget_note: str | None = None  # which budget stopped it
    alternatives: list[list[int]] | None = _list()  # a multi-draft method's other outputs
    alternatives_text: list[str] | None = _list()


@dataclass(kw_only=True)
class Timing:
    """perf_counter on a CPU, synchronised on a GPU; the trackers' own cost is outside wall_s."""

    wall_s: float | None = None
    prefill_s: float | None = None  # start to the end of the target pass that finished reading the prompt
    decode_s: float | None = None
    tokens_per_s: float | None = None  # new_tokens / wall_s, one record (the table sums turns first)
    target_pass_s: list[float] | None = _list()  # each target pass, the first being the prefill
    draft_pass_s: list[float] | None = _list()  # each draft pass, self-draft passes last
    tracker_s: float | None = None


@dataclass(kw_only=True)
class Counts:
    """Counted by the harness's hooks on the models, never reported by the method."""

    target_calls: int | None = None
    prefill_calls: int | None = None  # of target_calls: passes that read the prompt (>1: a policy's chunked prefill)
    target_tokens: int | None = None
    target_widths: list[int] | None = _list()  # tokens fed to each target pass
    draft_calls: int | None = None  # draft-model passes plus self-draft passes through the target
    draft_tokens: int | None = None
    draft_widths: list[int] | None = _list()
    self_draft_calls: int | None = None  # of draft_calls: passes through the target with layers skipped
    self_draft_bytes: list[int] | None = _list()  # parameter bytes each self-draft pass ran
    target_pass_bytes: int | None = None  # a full target pass's: the cost model prices self-drafts by the ratio
    self_draft_unskipped: int | None = None  # passes marked as self-drafting that skipped no sublayer
    uncounted_calls: int | None = None  # model submodule calls outside a counted top-level pass
    uncounted_note: str | None = None
    mean_accepted: float | None = None  # new_tokens per decoding step (target passes, the prompt's chunks as one)


@dataclass(kw_only=True)
class MethodReport:
    """What the method reported itself; the trace is checked against the counts (trace_error)."""

    accept_lengths: list[int] | None = _list()  # tokens kept per target pass, bonus included
    proposed_lengths: list[int] | None = _list()  # draft tokens verified per target pass
    trace_error: str | None = None  # where the trace disagrees with the harness's counts
    extras: dict[str, float] | None = None  # per-record figures the method puts in ctx.extras


@dataclass(kw_only=True)
class MemoryEnergy:
    peak_mem_bytes: int | None = None  # CUDA allocator peak on a GPU, process RSS on a CPU
    method_state_bytes: int | None = None  # bytes of the structures in ctx.state, measured by the harness
    kv_cache_peak_bytes: int | None = None  # keys + values held by the target's cache after a pass: the peak ...
    kv_cache_final_bytes: int | None = None  # ... and after the last pass (measured by the harness's hooks)
    policy_state_bytes: int | None = None  # peak held by a cache policy beside the cache (its state, key originals)
    energy_j: float | None = None
    energy_per_token_j: float | None = None
    energy_source: str | None = None
    energy_unavailable_reason: str | None = None
    avg_power_w: float | None = None
    gpu_util_pct: float | None = None
    gpu_mem_used_peak_bytes: int | None = None
    process_gpu_mem_peak_bytes: int | None = None
    samples: int | None = None  # sampler readings behind the energy and GPU figures


@dataclass(kw_only=True)
class Quality:
    """Computed by the harness after generation, outside the timing and the counts."""

    output_perplexity: float | None = None
    task_score: float | None = None
    task_metric: str | None = None
    # an lm-eval task's figures (a task's record): metric -> value, and metric_stderr -> its standard error
    metrics: dict[str, float] | None = None


@dataclass(kw_only=True)
class Likelihood:
    """A loglikelihood suite's record: the document scored by the target (through the method's policy)."""

    token_nll: list[float] | None = _list()  # negative log-likelihood of each scored token, in order (nats)
    scored_tokens: int | None = None
    words: int | None = None  # whitespace-split words of the original text (lm-eval's wikitext definition)
    bytes: int | None = None  # its UTF-8 bytes
    token_perplexity: float | None = None  # exp(sum NLL / scored tokens)
    word_perplexity: float | None = None  # exp(sum NLL / words)
    byte_perplexity: float | None = None  # exp(sum NLL / bytes)
    bits_per_byte: float | None = None  # sum NLL / (bytes ln 2)
    window_tokens: list[int] | None = _list()  # tokens each pass scored (a sliding window, or a chunk on the cache)
    window_loglik: list[float] | None = _list()  # their log-likelihood (nats), pass by pass


@dataclass(kw_only=True)
class LosslessCheck:
    """A lossless method's greedy output against the reference method's, same item and turn."""

    reference: str
    equal: bool
    position: int | None = None  # first differing new token
    margin: float | None = None  # the target's top-1 minus top-2 logit there
    relative_margin: float | None = None
    numerical_tie: bool = False


@dataclass(kw_only=True)
class Lossless:
    lossless_check: LosslessCheck | None = None


@dataclass(kw_only=True)
class Errors:
    error: str | None = None  # set: the record failed, and no table uses it
    traceback: str | None = None


# The groups in the order their fields appear in a record (a dataclass lays out base fields last base first).
GROUPS = (Identity, Prompt, Output, Timing, Counts, MethodReport, MemoryEnergy, Quality, Likelihood, Lossless, Errors)


@dataclass(kw_only=True)
class Record(*reversed(GROUPS)):
    """One record. Build it with the identity fields, then `update` it with what was measured."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in FIELDS:
            raise SchemaError(f"record has no field {name!r}")
        object.__setattr__(self, name, value)

    def update(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def problems(self) -> list[str]:
        """Fields whose value does not have the declared type."""
        return [f"{name}={getattr(self, name)!r} is not {hint}" for name, hint in HINTS.items()
                if not _conforms(getattr(self, name), hint)]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of results.jsonl; a value of the wrong type is an error, not a silent write."""
        problems = self.problems()
        if problems:
            raise SchemaError(f"record {self.method} {self.item_id} turn {self.turn}: " + "; ".join(problems))
        return {name: _plain(getattr(self, name)) for name in FIELDS}

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str = "record") -> Record:
        values = upgrade(raw, where)
        try:
            if isinstance(values.get("lossless_check"), dict):
                values["lossless_check"] = LosslessCheck(**values["lossless_check"])
            return cls(**values)
        except TypeError as err:  # a required field missing, or a check with fields the schema lacks
            raise SchemaError(f"{where}: {err}") from None


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Record)}
HINTS: dict[str, Any] = {name: typing.get_type_hints(Record)[name] for name in FIELDS}
KEY_FIELDS: tuple[str, ...] = tuple(name for name, f in FIELDS.items() if f.metadata.get("key"))
QUESTION_FIELDS: tuple[str, ...] = tuple(name for name, f in FIELDS.items() if f.metadata.get("question"))
KEY_DEFAULTS: dict[str, Any] = {name: FIELDS[name].default for name in KEY_FIELDS
                                if FIELDS[name].default is not dataclasses.MISSING}


def group_fields(group: type, of_type: type | None = None) -> tuple[str, ...]:
    """The fields of one group, optionally only those holding one value of `of_type` (int, float...)."""
    return tuple(f.name for f in dataclasses.fields(group) if of_type is None or _bare(HINTS[f.name]) is of_type)


def _bare(hint) -> Any:
    """The type under `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def defaults() -> dict[str, Any]:
    """Every field's value when a record lacks it (None for the required identity fields)."""
    return {name: None if f.default is dataclasses.MISSING else f.default for name, f in FIELDS.items()}


def numeric_fields() -> list[str]:
    """Fields holding one number (int or float): the columns a table converts to numbers."""
    return [name for name, hint in HINTS.items() if _bare(hint) in (int, float)]


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:  # a suite's item metadata: any JSON value
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def version_of(raw: dict, where: str) -> int:
    """The schema version a record or manifest was written with; an unknown one is an error."""
    version = raw.get("schema_version", LEGACY_VERSION)
    if version not in KNOWN_VERSIONS:
        raise SchemaError(
            f"{where}: written with record schema version {version!r}; this decodebench reads versions "
            f"{', '.join(map(str, KNOWN_VERSIONS))} (0 = before the schema). Use the decodebench that wrote it."
        )
    return version


def upgrade(raw: dict[str, Any], where: str = "record") -> dict[str, Any]:
    """A stored record as the current schema's fields (its own version kept). Version 0 predates the schema:
    the fields it lacks take their defaults, and the few it had that the schema dropped (`verify_widths`,
    an early name of target_widths) are left out. A current record with a field the schema lacks is an error."""
    version = version_of(raw, where)
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown and version != LEGACY_VERSION:
        raise SchemaError(f"{where}: field(s) {', '.join(unknown)} are not in record schema version {version}")
    values = {**defaults(), **{k: v for k, v in raw.items() if k in FIELDS}}
    values["schema_version"] = version
    return values


def check_manifest(manifest: dict, where: str = "manifest.json") -> int:
    return version_of(manifest, where)
