"""Cache and attention policies: what stays in a model's KV cache, at which positions, and which cached
keys each query attends to. In kvpress's spirit (one policy per file, a dataclass of knobs, a context
manager that attaches to the model), written for transformers 5.

A policy subclasses `CachePolicy` and fills one or both narrow hooks:
- eviction (`evicts = True`): after each forward pass, `keep(run, layer, keys, values)` returns the cache
  slots that stay (ascending; one row per KV head for per-head choices); the mechanism applies it to the
  `DynamicCache` and re-rotates every kept key by its slot's move, so that keys sit at "positions inside
  the cache" (StreamingLLM) and the next token's position, which transformers derives from the cache
  length, follows on.
- attention selection (`selects = True`): the full cache is kept, and `attend(run, layer, query, key,
  value, scaling)` computes the layer's attention itself (over a subset of keys, at other positions...),
  or returns None for plain causal attention. It runs as an attention function registered with
  transformers' `AttentionInterface` (with a mask function that returns None: it builds its own causal
  masks, for one sequence); `attach` switches the model to it and restores the model's own implementation
  on exit, exception or not. No model class is patched.

`policy.attach(model)` hooks the model for one generation and yields the `PolicyRun`, which holds the
per-generation state (`run.state`; nothing is kept on the policy). While attached, `kv.extend` feeds an
input longer than the policy's `prefill_chunk` in chunks, so that the policy acts between them. One policy
per model at a time, acting on one cache: a second cache on the same model (a self-drafting decoder, beams)
is refused; passes without a cache run plain.

Composition: `compose("sps+streaming_llm")` runs a registered decoder with a registered policy attached
to the target model (a policy alone means `ar+policy`); a model transform (methods/common/transform.py) is the
other modifier kind, `DECODER[+POLICY][+TRANSFORM]`, parsed here in one place (`parse`). An evicting policy changes cache lengths: a decoder
that crops its cache after rejected drafts must crop relative to the end (see ChainVerifier), and one that
passes explicit position ids (token trees) is refused.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from methods.base import (
    DecodeContext,
    Method,
    Paper,
    SettingError,
    Settings,
    build_config,
    get_method,
    get_policy,
    get_scorer,
    get_transform,
    policies,
    scorers,
    setting,
    transforms,
)
from methods.common import kv
from methods.common.rope import Rotation

ATTENTION_NAME = "decodebench_policy"


@dataclass
class PolicySettings(Settings):
    prefill_chunk: int = setting(0, "tokens per prefill pass when the input is longer; 0 = the whole input in one "
                                    "pass", low=0)


class CachePolicy:
    """Base of every cache/attention policy: `paper`, a `Config` (PolicySettings), and the hooks below."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    lossless: ClassVar[bool] = False
    evicts: ClassVar[bool] = False  # implements keep()
    selects: ClassVar[bool] = False  # implements attend()
    rotates: ClassVar[bool] = False  # moves keys or queries to other positions (evicting always does)

    @dataclass
    class Config(PolicySettings):
        pass

    def __init__(self, **overrides: Any) -> None:
        self.config = build_config(self.name, self.Config, overrides)

    # --- hooks (run = this generation's PolicyRun) ---
    def begin_pass(self, run: PolicyRun) -> None:
        """Before each forward pass: run.start, run.new and run.prefill describe it."""

    def keep(self, run: PolicyRun, layer: int, keys: torch.Tensor,
             values: torch.Tensor) -> torch.Tensor | tuple[slice, ...] | None:
        """Slots of `layer` that stay after the pass: a LongTensor [n] or [kv_heads, n] (ascending), or a tuple of
        ascending slices (contiguous runs move as one: cheaper); None keeps all."""
        return None

    def attend(self, run: PolicyRun, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor | None:
        """Attention output [batch, q, heads, head_dim] of `layer`'s queries over its cache, or None for plain
        causal attention. query [b, heads, q, d] holds the pass's last q positions of key/value [b, kv_heads, S, d]."""
        return None

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, record: bool = False) -> Iterator[PolicyRun]:
        run = PolicyRun(self, model, record)
        with run.installed():
            yield run

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"paper": cls.paper.title if cls.paper else "", "arxiv": cls.paper.arxiv if cls.paper else None,
                "lossless": cls.lossless, "evicts": cls.evicts, "selects": cls.selects}


_RUNS: dict[int, PolicyRun] = {}  # id(model.config) -> the run attached (attention modules share the config)


def attached(model: torch.nn.Module) -> PolicyRun | None:
    """The policy run attached to `model` now, if any (the harness measures what it holds)."""
    return _RUNS.get(id(model.config))


class PolicyRun:
    """One generation under a policy: the hooks, the pass counters and the policy's state."""

    def __init__(self, policy: CachePolicy, model: torch.nn.Module, record: bool = False) -> None:
        self.policy, self.model = policy, model
        self.state: dict[str, Any] = {}  # the policy's own per-generation data
        self._rotation: Rotation | None = None
        self.passes = 0  # forward passes finished
        self.start = 0  # cache length before the current pass
        self.new = 0  # tokens in the current pass
        self.prefill = False  # the current pass is part of the prompt
        self.active = False  # the current pass has a cache (the policy acts on it)
        self.record = record  # keep `attended` (tests)
        self.attended: dict[int, torch.Tensor] = {}  # layer -> key positions its last pass attended (if recorded)
        self._prefilling = False
        self._cache: weakref.ref | None = None
        self.originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> 16-bit keys unmoved, positions

    @contextlib.contextmanager
    def installed(self) -> Iterator[PolicyRun]:
        model, key = self.model, id(self.model)
        if key in kv._chunkers or id(model.config) in _RUNS:
            raise RuntimeError("a cache policy is already attached to this model (one at a time)")
        original = model.config._attn_implementation
        handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                   model.register_forward_hook(self._after, with_kwargs=True)]
        kv._chunkers[key] = self
        _RUNS[id(model.config)] = self
        try:
            if self.policy.evicts or self.policy.rotates:
                self.rotation  # noqa: B018 -- a RoPE this mechanism cannot move fails here, before any pass
            if self.policy.selects:
                AttentionInterface.register(ATTENTION_NAME, _attention)
                AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
                model.set_attn_implementation(ATTENTION_NAME)
                if model.config._attn_implementation != ATTENTION_NAME:
                    raise NotImplementedError(f"{type(model).__name__} cannot switch its attention function")
            yield self
        finally:
            for handle in handles:
                handle.remove()
            kv._chunkers.pop(key, None)
            _RUNS.pop(id(model.config), None)
            if model.config._attn_implementation != original:
                model.set_attn_implementation(original)

    @property
    def rotation(self) -> Rotation:
        """The model's RoPE frequencies (read on first use)."""
        if self._rotation is None:
            self._rotation = Rotation.of(self.model)
        return self._rotation

    def log(self, layer: int, positions: torch.Tensor) -> None:
        if self.record:
            self.attended[layer] = positions.detach().cpu()

    # --- the hooks on the model ---
    def _before(self, module, args, kwargs) -> None:
        cache = kv.cache_in(kwargs)
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds", args[0] if args else None)
        if self.policy.evicts and kwargs.get("position_ids") is not None:
            raise NotImplementedError(f"{self.policy.name} moves positions; a decoder passing its own position ids "
                                      f"(token trees) cannot run under it")
        self.active = cache is not None
        if not self.active:  # a pass without a cache (scoring a whole text at once) runs plain
            return
        if self._cache is None:
            self._cache = weakref.ref(cache)
        elif self._cache() is not cache:
            raise NotImplementedError(f"{self.policy.name}: a second KV cache on the same model (a decoder drafting "
                                      f"with the target itself, or beams) is not supported under a cache policy")
        self.new = int(inputs.shape[1])
        self.start = cache.get_seq_length()
        self.prefill = self._prefilling or self.start == 0
        self.policy.begin_pass(self)

    def _after(self, module, args, kwargs, output) -> None:
        if not self.active:
            return
        self.passes += 1
        if self.policy.evicts:
            self._evict(kv.cache_in(kwargs))

    def _evict(self, cache) -> None:
        tables: dict[int, tuple] = {}  # id(index) -> (index, cos/sin): a policy returning one index for every layer
        for idx, layer in enumerate(cache.layers):
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            if getattr(layer, "is_sliding", False) or not isinstance(layer.keys, torch.Tensor):
                raise NotImplementedError(f"evicting from a {type(layer).__name__} cache layer is not supported")
            index = self.policy.keep(self, idx, keys, layer.values)
            if keys.element_size() < 4:
                layer.keys, layer.values = self._moved_originals(idx, keys, layer.values, index)
                continue
            if index is None:
                continue
            if isinstance(index, tuple):
                layer.keys, layer.values = moved_runs(keys, layer.values, index, self.rotation)
                continue
            if id(index) not in tables:  # the cos/sin of one move, computed once per pass (30 layers share it)
                shift = torch.arange(index.shape[-1], device=keys.device) - index.to(keys.device)
                tables[id(index)] = (index, self.rotation.table(shift, keys))
            layer.keys, layer.values = moved(keys, layer.values, index.to(keys.device), self.rotation,
                                             tables[id(index)][1])

    def _moved_originals(self, idx: int, keys: torch.Tensor, values: torch.Tensor,
                         index) -> tuple[torch.Tensor, torch.Tensor]:
        """Eviction for 16-bit keys: moves start from the keys as transformers computed them, kept with their
        positions (`originals`, one more copy of the keys), never from a moved key. Moving a moved bf16 key by
        -1 at every step loses the slow rotations (48% error after 1000 moves; float32: 2e-5)."""
        kv_heads, held, device = keys.shape[1], keys.shape[-2], keys.device
        empty = (keys[..., :0, :], torch.zeros(kv_heads, 0, dtype=torch.long, device=device))
        orig, pos = self.originals.get(idx, empty)
        start = min(self.start, orig.shape[-2])  # a decoder may have cropped the cache since the last pass
        orig = torch.cat((orig[..., :start, :], keys[..., start:, :]), dim=-2)
        pos = torch.cat((pos[:, :start], torch.arange(start, held, device=device).expand(kv_heads, -1)), dim=-1)
        if index is None:
            self.originals[idx] = (orig, pos)
            return keys, values
        if isinstance(index, tuple):
            index = torch.cat([torch.arange(run.start, run.stop, device=device) for run in index])
        index = index.to(device).expand(kv_heads, -1)
        rows = index[None, :, :, None].expand(keys.shape[0], -1, -1, keys.shape[-1])
        kept, kept_pos = orig.gather(-2, rows), pos.gather(-1, index)
        self.originals[idx] = (kept, kept_pos)
        moved_keys = self.rotation.rotate(kept, torch.arange(index.shape[-1], device=device) - kept_pos)
        return moved_keys, values.gather(-2, rows)

    def extra_bytes(self) -> int:
        """Bytes the mechanism holds beside the cache (the original 16-bit keys of an evicting policy)."""
        return sum(k.numel() * k.element_size() + p.numel() * p.element_size() for k, p in self.originals.values())

    # --- chunked prefill, called by kv.extend ---
    def extend(self, tokens: list[int], cache, keep: int | None) -> torch.Tensor:
        chunk, n = self.policy.config.prefill_chunk, len(tokens)
        if not chunk or n <= chunk:
            return kv.extend_once(self.model, tokens, cache, keep)
        self._prefilling = cache.get_seq_length() == 0
        try:
            want, pieces = (n if keep is None else keep), []
            for first in range(0, n, chunk):
                last = min(first + chunk, n)
                rows = last - max(first, n - want)  # rows of this chunk among the last `want`
                logits = kv.extend_once(self.model, tokens[first:last], cache, max(rows, 1))
                if rows > 0:
                    pieces.append(logits[-rows:])
            return torch.cat(pieces)
        finally:
            self._prefilling = False


def moved(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, rotation: Rotation,
          table: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of slots `index` ([n] or [kv_heads, n]) packed to slots 0..n-1, keys re-rotated by
    their move (new slot - old slot); `table`: that move's cos/sin if already computed."""
    if index.dim() == 1:
        kept_k, kept_v = keys.index_select(-2, index), values.index_select(-2, index)
    else:
        expand = index[None, :, :, None].expand(keys.shape[0], -1, -1, keys.shape[-1])
        kept_k, kept_v = keys.gather(-2, expand), values.gather(-2, expand)
    return rotation.rotate(kept_k, torch.arange(index.shape[-1], device=index.device) - index, table), kept_v


def moved_runs(keys: torch.Tensor, values: torch.Tensor, runs: tuple[slice, ...],
               rotation: Rotation) -> tuple[torch.Tensor, torch.Tensor]:
    """`moved` for slots given as ascending runs: each run shifts by one delta (no index tensors, one cat)."""
    kept_k, kept_v, slot = [], [], 0
    for run in runs:
        part = keys[..., run, :]
        shift = slot - run.start
        kept_k.append(rotation.rotate(part, torch.tensor(shift, device=keys.device)) if shift else part)
        kept_v.append(values[..., run, :])
        slot += part.shape[-2]
    return torch.cat(kept_k, dim=-2), torch.cat(kept_v, dim=-2)


# --- attention helpers for `attend` ---
def grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, heads, q, d] -> [b, kv_heads, group, q, d]: query heads next to the KV head they share."""
    b, heads, q, d = query.shape
    return query.view(b, kv_heads, heads // kv_heads, q, d)


def scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """query [b, kv_heads, group, q, d] . key [b, kv_heads, m, d] -> [b, kv_heads, group, q, m]."""
    return torch.einsum("bkgqd,bkmd->bkgqm", query, key) * scaling


def softmax_attend(logits: torch.Tensor, allowed: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over allowed keys (float32, as transformers' eager path), then the values: output
    [b, q, heads, d] as attention functions return it, and the probabilities [b, kv_heads, group, q, m].
    `logits` may be overwritten; every query needs one allowed key (its own, under causal attention)."""
    logits = logits.float().masked_fill_(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bkgqm,bkmd->bkgqd", probs.to(value.dtype), value)
    b, k, g, q, d = out.shape
    return out.reshape(b, k * g, q, d).transpose(1, 2), probs


def causal_mask(q: int, s: int, device) -> torch.Tensor | None:
    """Bool [1, 1, q, s] (True = attend) for q queries at the last q of s positions; None where sdpa's own
    causal flag is right (one query, or no cached prefix)."""
    if q == 1 or q == s:
        return None
    rows = torch.arange(s - q, s, device=device)[:, None]
    return (torch.arange(s, device=device)[None, :] <= rows)[None, None]


def _no_mask(*args, **kwargs) -> None:
    """The mask function registered beside `_attention`: it builds its own masks (one sequence, causal)."""
    return


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as ATTENTION_NAME: the attached policy's `attend`, else plain causal
    attention through transformers' sdpa function."""
    run = _RUNS.get(id(module.config))
    run = run if run is not None and run.active else None
    if attention_mask is not None and run is not None:
        raise NotImplementedError(f"{run.policy.name} builds its own masks; explicit attention masks "
                                  f"(padding, token trees) are not supported under it")
    scaling = module.scaling if scaling is None else scaling
    out = None if run is None else run.policy.attend(run, module.layer_idx, query, key, value, scaling)
    if out is None:
        mask = attention_mask if attention_mask is not None else causal_mask(query.shape[2], key.shape[2], query.device)
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling)
    return out, None


# --- composition: DECODER[+POLICY][+TRANSFORM] ---
class Composition(Method):
    """A registered decoder run with a cache policy attached to the target and/or a model transform applied to
    the target and the draft (methods.common.transform). The transform goes on first, so a policy sees the
    transformed model. A scorer (methods.base.Scorer) replaces how a likelihood suite reads a document; it
    generates nothing."""

    def __init__(self, decoder: Method, policy: CachePolicy | None = None, transform: Any = None,
                 scorer: Any = None) -> None:
        self.decoder, self.policy, self.transform, self.scorer = decoder, policy, transform, scorer
        parts = (policy, transform, scorer)
        self.name = "+".join([decoder.name, *(part.name for part in parts if part is not None)])
        self.config = decoder.config
        self.paper = next(part for part in parts if part is not None).paper
        self.needs, self.stateful = decoder.needs, decoder.stateful
        # lossless relative to `ar` under the same transform (the runner checks it against that method)
        self.lossless = (decoder.lossless and (policy is None or policy.lossless)
                         and (transform is None or transform.token_wise))

    def parts(self) -> list:
        return [part for part in (self.decoder, self.policy, self.transform, self.scorer) if part is not None]

    def generate(self, ctx: DecodeContext) -> list[int]:
        if self.scorer is not None:
            raise SettingError(f"{self.name}: scorer {self.scorer.name} scores documents (likelihood suites); "
                               "it generates nothing")
        with contextlib.ExitStack() as stack:
            if self.transform is not None:  # a no-op where the runner applied it already (outside the timing)
                stack.enter_context(self.transform.attach(ctx.target, ctx.draft))
            if self.policy is not None:
                stack.enter_context(self.policy.attach(ctx.target))
            return self.decoder.generate(ctx)


WithPolicy = Composition  # the name it had when policies were the only modifier


@dataclass(frozen=True)
class Spec:
    """A method name taken apart: `sps+streaming_llm+w8` -> Spec("sps", "streaming_llm", "w8");
    `byte_level+w8` -> Spec("ar", None, "w8", "byte_level")."""

    decoder: str
    policy: str | None = None
    transform: str | None = None
    scorer: str | None = None

    @property
    def modifiers(self) -> list[str]:
        return [name for name in (self.policy, self.transform, self.scorer) if name]


def parse(spec: str) -> Spec:
    """The one place a method name is taken apart: a decoder (`ar` when it is left out), then at most one
    modifier of each kind in any order. Unknown names and two modifiers of one kind are SettingErrors."""
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    kinds = {"cache policy": policies(), "transform": transforms(), "scorer": scorers()}
    known = {name for registry in kinds.values() for name in registry}
    decoder = parts.pop(0) if parts and parts[0] not in known else "ar"
    chosen: dict[str, str] = {}
    for name in parts:
        kind = next((kind for kind, registry in kinds.items() if name in registry), None)
        if kind is None:
            raise SettingError(f"{name!r} in {spec!r} is not a cache policy, a transform or a scorer; cache policies: "
                               f"{', '.join(kinds['cache policy'])}; transforms: {', '.join(kinds['transform'])}; "
                               f"scorers: {', '.join(kinds['scorer'])}")
        if kind in chosen:
            raise SettingError(f"{spec!r}: one {kind} per run ({chosen[kind]} and {name})")
        chosen[kind] = name
    if "scorer" in chosen and "cache policy" in chosen:  # a scorer reads with its own tree masks, which policies refuse
        raise SettingError(f"{spec!r}: scorer {chosen['scorer']} reads the document itself (tree attention on one "
                           f"cache); it does not run under cache policy {chosen['cache policy']}")
    return Spec(decoder, chosen.get("cache policy"), chosen.get("transform"), chosen.get("scorer"))


def split(spec: str) -> tuple[str, list[str]]:
    """`sps+streaming_llm+w8` -> ("sps", ["streaming_llm", "w8"]): the decoder and every modifier."""
    parsed = parse(spec)
    return parsed.decoder, parsed.modifiers


def method_parts(method: Method) -> list:
    """The configured parts of a runnable method: the decoder, then its policy and transform if any."""
    return method.parts() if isinstance(method, Composition) else [method]


def compose(spec: str, settings: dict[str, dict[str, Any]] | None = None) -> Method:
    """A runnable method for `DECODER[+POLICY][+TRANSFORM]`, settings given per part name. One policy per model:
    two attention functions cannot both be installed, and an eviction would move the keys another policy
    indexes; one transform per model: quantizing twice is no setting anyone means."""
    settings = settings or {}
    parsed = parse(spec)
    decoder = get_method(parsed.decoder)(**settings.get(parsed.decoder, {}))  # unknown: KeyError naming the known
    if not parsed.modifiers:
        return decoder
    policy = get_policy(parsed.policy)(**settings.get(parsed.policy, {})) if parsed.policy else None
    transform = get_transform(parsed.transform)(**settings.get(parsed.transform, {})) if parsed.transform else None
    scorer = get_scorer(parsed.scorer)(**settings.get(parsed.scorer, {})) if parsed.scorer else None
    return Composition(decoder, policy, transform, scorer)
