"""The harness counts all model work: parts called outside a counted pass are uncounted work (an error
under strict counting), self-draft passes are marked by the layer-skipping mechanism, checked, and priced
by the parameter bytes they ran."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.costmodel import LatencyTable, predicted_seconds
from harness.hostcost import measure_host_cost
from harness.instrument import PassCounter, UncountedWork
from harness.results import read_records
from harness.runner import RunConfig, Runner
from methods import base as method_base
from methods.base import DecodeContext, Method, Sampling, get_method
from methods.common.kv import new_cache
from methods.common.layerskip import SkipSet, skipped_forward, skipping
from tests.conftest import tiny_llama, tiny_tokenizer
from tests.test_runner import data_file  # noqa: F401 - the fixture

PROMPT = [4, 6, 9, 7, 8, 10, 11, 12]


def nbytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


@pytest.fixture(scope="module")
def deep():
    return tiny_llama(seed=3, layers=6)


@pytest.fixture
def sneaky_methods():
    """Two methods that do model work no top-level pass covers."""

    @method_base.register("sneaky_head_test")
    class SneakyHead(Method):  # a counted pass for the hidden states, then the LM head by hand, twice
        lossless = False

        def generate(self, ctx):
            while not ctx.done:
                ids = torch.tensor([ctx.prompt_ids + ctx.output])
                hidden = ctx.target(ids, output_hidden_states=True).hidden_states[-1][:, -1:]
                ctx.target.lm_head(hidden)
                ctx.emit([int(ctx.target.lm_head(hidden)[0, -1].argmax())])
            return ctx.output

    @method_base.register("sneaky_layers_test")
    class SneakyLayers(Method):  # the decoder stack without the top-level model, then a layer's MLP alone
        lossless = False

        def generate(self, ctx):
            hidden = ctx.target.model(input_ids=torch.tensor([ctx.prompt_ids])).last_hidden_state
            ctx.target.model.layers[0].mlp(hidden)
            ctx.emit([int(ctx.target.lm_head(hidden)[0, -1].argmax())], record_step=False)
            return ctx.output

    yield
    method_base._REGISTRY.pop("sneaky_head_test")
    method_base._REGISTRY.pop("sneaky_layers_test")


def config(model_dirs, out, data, **kw):
    defaults = dict(methods=["ar", "sneaky_head_test", "sneaky_layers_test"], target=model_dirs[0], draft=None,
                    data=data, limit=1, max_new_tokens=4, out=str(out), warmup=False, trackers=False)
    return RunConfig(**{**defaults, **kw})


def run(cfg) -> dict[str, dict]:
    Runner(cfg).run()
    return {r["method"]: r for r in read_records(Path(cfg.out) / "results.jsonl")
            if r["item_id"] == "chat-1" and r["turn"] == 0}


def test_sneaky_work_is_counted_or_stopped(model_dirs, data_file, tmp_path, cache_dir, sneaky_methods):  # noqa: F811
    counted = run(config(model_dirs, tmp_path / "counted", data_file))
    assert counted["ar"]["uncounted_calls"] == 0 and counted["ar"]["uncounted_note"] is None
    head = counted["sneaky_head_test"]
    assert head["error"] is None and head["target_calls"] == head["new_tokens"] == 4
    assert head["uncounted_calls"] == 8 and head["uncounted_note"] == "lm_head x8"
    layers = counted["sneaky_layers_test"]
    assert layers["error"] is None and layers["target_calls"] == 0
    assert layers["uncounted_note"] == ("model.embed_tokens x1, model.layers.0 x1, model.layers.0.self_attn x1, "
                                        "model.layers.0.mlp x2, model.layers.1 x1, model.layers.1.self_attn x1, "
                                        "model.layers.1.mlp x1, lm_head x1")
    assert layers["uncounted_calls"] == 9

    stopped = run(config(model_dirs, tmp_path / "strict", data_file, strict_counting=True))
    assert stopped["ar"]["error"] is None
    assert "UncountedWork: lm_head was called outside a forward pass" in stopped["sneaky_head_test"]["error"]
    assert "UncountedWork: model.embed_tokens was called outside" in stopped["sneaky_layers_test"]["error"]


def test_a_swallowed_strict_error_still_fails_the_record(model_dirs, data_file, tmp_path, cache_dir):  # noqa: F811
    @method_base.register("swallowing_test")
    class Swallowing(Method):
        lossless = False

        def generate(self, ctx):
            try:
                ctx.target.lm_head(torch.zeros(1, 1, ctx.target.config.hidden_size))
            except Exception:  # noqa: BLE001 - the point of the test
                pass
            ctx.emit([4], record_step=False)
            return ctx.output

    try:
        records = run(config(model_dirs, tmp_path / "swallow", data_file, methods=["swallowing_test"],
                             strict_counting=True))
    finally:
        method_base._REGISTRY.pop("swallowing_test")
    assert "uncounted model work: lm_head x1" in records["swallowing_test"]["error"]


def test_self_draft_passes_are_priced_by_the_sublayers_that_ran(deep):
    target = PassCounter(deep, "target")
    drafts = PassCounter(deep, "self-draft", self_draft=True)
    layers = deep.model.layers
    try:
        full = nbytes(deep) - nbytes(deep.model.embed_tokens)  # every layer, the final norm, the head
        assert target.full_pass_bytes == drafts.full_pass_bytes == full
        skip = SkipSet.of(attention=[1, 2], mlp=[2, 3])  # layer 2 skipped whole: its norms do not run either
        skipped_forward(deep, PROMPT, new_cache(deep), skip)
        skipped_forward(deep, PROMPT[:3], new_cache(deep), SkipSet.of(mlp=[4]))
        assert drafts.calls == 2 and target.calls == 0 and drafts.unskipped == 0
        assert drafts.pass_bytes == [full - nbytes(layers[1].self_attn, layers[2], layers[3].mlp),
                                     full - nbytes(layers[4].mlp)]
        with torch.inference_mode():
            deep(torch.tensor([PROMPT]))  # a target pass is not priced as a draft
        assert target.calls == 1 and len(drafts.pass_bytes) == 2
    finally:
        target.remove()
        drafts.remove()
    assert not deep._forward_pre_hooks and not deep._forward_hooks  # every hook went with the counters
    assert not any(m._forward_pre_hooks for m in deep.modules())


def test_a_drafting_pass_that_skips_nothing_is_flagged_or_stopped(deep):
    drafts = PassCounter(deep, "self-draft", self_draft=True)
    try:
        skipped_forward(deep, PROMPT, new_cache(deep), SkipSet())  # marked as drafting, runs the full model
        assert drafts.unskipped == 1 and drafts.pass_bytes == [drafts.full_pass_bytes]
    finally:
        drafts.remove()
    strict = PassCounter(deep, "self-draft", self_draft=True, strict=True)
    try:
        with pytest.raises(UncountedWork, match="marked as drafting but ran every sublayer"):
            skipped_forward(deep, PROMPT, new_cache(deep), SkipSet())
    finally:
        strict.remove()


def test_only_skipping_marks_a_pass_as_drafting(deep):
    target, drafts = PassCounter(deep, "target"), PassCounter(deep, "self-draft", self_draft=True)
    try:
        with torch.inference_mode():
            deep(torch.tensor([PROMPT]))
            with skipping(deep, SkipSet.of([1])):
                deep(torch.tensor([PROMPT]))
            deep(torch.tensor([PROMPT]))
        assert (target.calls, drafts.calls) == (2, 1)
    finally:
        target.remove()
        drafts.remove()


def test_self_draft_pricing_uses_measured_bytes_not_method_extras():
    table = LatencyTable([1, 8], [10, 100], [[1.0, 4.5], [1.0, 4.5]])  # 1 s + 0.5 s per extra token
    record = {"prompt_tokens": 10, "new_tokens": 4, "target_widths": [10, 3], "draft_widths": [1, 1],
              "draft_calls": 2, "self_draft_calls": 2, "self_draft_bytes": [250, 500], "target_pass_bytes": 1000,
              "extras": {"draft_layer_fraction": 0.9}}  # a method's own figure: ignored
    # target: 10 tokens (4.5 + 0.5 * 2 = 5.5 s) + 3 tokens (2 s); drafts: 0.25 x 1 s + 0.5 x 1 s
    assert predicted_seconds(record, {"target": table}) == pytest.approx(5.5 + 2.0 + 0.25 + 0.5)
    assert predicted_seconds({**record, "self_draft_bytes": None}, {"target": table}) is None  # not measured


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, deep):
    folder = tmp_path_factory.mktemp("deep") / "target"
    deep.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_a_run_records_self_draft_bytes_and_prices_them(deep_dir, data_file, tmp_path, cache_dir):  # noqa: F811
    records = run(config([deep_dir], tmp_path / "skip", data_file, methods=["ar", "layer_skip"], strict_counting=True,
                         max_new_tokens=12))
    skip = records["layer_skip"]
    assert skip["error"] is None and skip["uncounted_calls"] == 0 and skip["self_draft_unskipped"] == 0
    assert len(skip["self_draft_bytes"]) == skip["self_draft_calls"] > 0
    assert all(0 < b < skip["target_pass_bytes"] for b in skip["self_draft_bytes"])
    table = LatencyTable([1, 64], [1, 1000], [[1.0, 1.0], [1.0, 1.0]])  # every pass 1 s
    fraction = sum(skip["self_draft_bytes"]) / skip["target_pass_bytes"]
    assert predicted_seconds(skip, {"target": table}) == pytest.approx(skip["target_calls"] + fraction)


def test_host_cost_still_measures_with_the_part_hooks(deep):
    cost = measure_host_cost(get_method("layer_skip")(speedup=3.0), deep, None, PROMPT, 8)
    assert cost.target_calls > 0 and cost.new_tokens == 8 and 0 < cost.forward_s <= cost.wall_s
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in deep.modules())
    ctx = DecodeContext(prompt_ids=list(PROMPT), target=deep, sampling=Sampling(), max_new_tokens=2,
                        eos_token_ids=frozenset())
    get_method("ar")().generate(ctx)  # no hooks left: nothing is counted, nothing raises
