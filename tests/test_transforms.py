"""Model transforms: the quantizers' error bounds (by hand and against their definitions), the perturbations'
strengths, exact restoration of the models, composition with decoders and policies, lossless decoders on a
transformed model, and the runner (records, folder identity, likelihood suites, settings errors)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import WORDS, tiny_llama
from transformers import DynamicCache

from harness import cli
from harness.report import build_report
from harness.results import read_records
from harness.runfolder import identity
from harness.runner import RunConfig, Runner
from methods.base import (
    DecodeContext,
    Sampling,
    SettingError,
    get_transform,
    transforms,
)
from methods.common import kv
from methods.common.cache_policy import Composition, Spec, compose, parse, split
from methods.common.quantize import fake_quantize, per_group, rtn, signed_power
from methods.common.transform import Edit, ModelTransform
from methods.quant_perturbation import clipped, perturbed, relative_error

# --- the quantizers ---


def test_rtn_by_hand():
    row = torch.tensor([[-1.0, -0.3, 0.2, 0.6]])
    q, scale = rtn(row, bits=2, symmetric=True)  # scale max|x| / 1: integers -1, 0, 1
    assert scale.item() == 1.0 and q.tolist() == [[-1.0, 0.0, 0.0, 1.0]]
    q, scale = rtn(row, bits=2, symmetric=False)  # scale 1.6 / 3, zero point round(1.875) = 2, q = 0 1 2 3
    s = 1.6 / 3
    assert scale.item() == pytest.approx(s)
    assert q[0].tolist() == pytest.approx([-2 * s, -s, 0.0, s])
    q, _ = rtn(torch.full((1, 4), 0.25), bits=4, symmetric=False)  # a constant row stays as it is
    assert q.tolist() == [[0.25] * 4]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 16), (3, 12)])
def test_uniform_error_within_half_a_step_per_channel_and_group(bits, group, symmetric):
    torch.manual_seed(bits + group)
    w = torch.randn(24, 40) * torch.rand(24, 1) * 3  # rows of different ranges
    q = fake_quantize(w, bits, symmetric, group)
    size = group or 40
    for start in range(0, 40, size):  # 40 columns in groups of 12: 12, 12, 12 and a last group of 4
        g, qg = w[:, start:start + size], q[:, start:start + size]
        if symmetric:
            step = g.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        else:
            step = (g.amax(1, keepdim=True) - g.amin(1, keepdim=True)) / (2**bits - 1)
        assert ((g - qg).abs() <= step / 2 + 1e-6).all()
        levels = 2 ** bits - (1 if symmetric else 0)
        assert all(len(torch.unique(r)) <= levels for r in qg)  # on the grid
    assert not torch.equal(q, w)


def test_per_group_splits_rows_with_a_shorter_last_group():
    x = torch.arange(8.0).reshape(1, 8)
    assert per_group(x, 3, lambda g: g - g.amin(-1, keepdim=True)).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert per_group(x, 0, lambda g: g - g.amin(-1, keepdim=True)).tolist() == [list(range(8))]


def test_nonuniform_inverse_is_exact_without_rounding_and_bounded_in_the_transformed_domain():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.05
    assert torch.allclose(signed_power(signed_power(w, 1 / 3), 3.0), w, rtol=1e-5, atol=1e-9)
    # values whose cube roots sit on the 4-bit symmetric grid come back unchanged
    grid = torch.randint(-7, 8, (16, 32)).float() * 0.05
    grid[:, 0] = 7 * 0.05  # every row reaches the grid's top, so that its scale is 0.05
    on_grid = signed_power(grid, 3.0)
    assert torch.allclose(fake_quantize(on_grid, 4, True, 0, power=1 / 3), on_grid, rtol=1e-5, atol=1e-9)
    # the error bound holds for the cube roots: |w^(1/3) - q(w^(1/3))| <= step / 2
    q = fake_quantize(w, 4, True, 0, power=1 / 3)
    root, qroot = signed_power(w, 1 / 3), signed_power(q, 1 / 3)
    step = root.abs().amax(1, keepdim=True) / 7
    assert ((root - qroot).abs() <= step / 2 + 1e-5).all()
    # non-uniform levels are dense near zero: small weights come back closer than under uniform 4 bits
    small = w.abs() < w.abs().amax(1, keepdim=True) / 8
    uniform = fake_quantize(w, 4, True, 0)
    assert (q - w)[small].abs().mean() < (uniform - w)[small].abs().mean()


# --- the perturbations ---

@pytest.mark.parametrize("kind", ["gaussian", "uniform", "rademacher", "magnitude", "inverse_magnitude", "clip"])
def test_perturbations_have_the_set_relative_strength(kind):
    torch.manual_seed(1)
    w = torch.randn(32, 48)
    for strength in (0.003, 0.05):
        out = perturbed(w, kind, strength, torch.Generator().manual_seed(7))
        assert relative_error(w, out) == pytest.approx(strength, rel=1e-4)
    x = torch.randn(2, 5, 48) * torch.rand(2, 5, 1)  # activations: per token
    out = perturbed(x, kind, 0.02, torch.Generator().manual_seed(7), per_row=True)
    assert relative_error(x, out, per_row=True).flatten().tolist() == pytest.approx([0.02] * 10, rel=1e-4)


def test_perturbation_shapes_and_seeds():
    torch.manual_seed(2)
    w = torch.randn(16, 16)
    d = perturbed(w, "rademacher", 0.01, torch.Generator().manual_seed(3)) - w
    c = 0.01 * w.norm() / 16  # ||D|| = c * sqrt(256): every entry is +-c
    assert torch.allclose(d.abs(), torch.full_like(d, c.item()), rtol=1e-4)
    d = perturbed(w, "magnitude", 0.01, torch.Generator().manual_seed(3)) - w
    ratio = d.abs() / w.abs()
    assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3)  # proportional to |w|
    d = perturbed(w, "inverse_magnitude", 0.01, torch.Generator().manual_seed(3)) - w
    assert d.flatten()[w.abs().argmax()].item() == 0  # the largest weight is left alone
    again = perturbed(w, "gaussian", 0.01, torch.Generator().manual_seed(3))
    assert torch.equal(again, perturbed(w, "gaussian", 0.01, torch.Generator().manual_seed(3)))
    assert not torch.equal(again, perturbed(w, "gaussian", 0.01, torch.Generator().manual_seed(4)))


def test_clipping_bound_is_respected_and_only_the_largest_move():
    w = torch.tensor([[3.0, -2.0, 1.0, 0.5, -0.25]])
    # clipping to t = 1.5 moves 3 -> 1.5 and -2 -> -1.5: error sqrt(1.5^2 + 0.5^2)
    strength = math.sqrt(1.5**2 + 0.5**2) / w.norm().item()
    out = clipped(w, strength)
    assert out[0].tolist() == pytest.approx([1.5, -1.5, 1.0, 0.5, -0.25])
    torch.manual_seed(3)
    w = torch.randn(64, 64)
    out = clipped(w, 0.02)
    t = out.abs().max()
    assert (out.abs() <= t).all() and torch.equal(out[w.abs() <= t], w[w.abs() <= t])
    assert relative_error(w, out) == pytest.approx(0.02, rel=1e-5)


# --- attach and restore ---

def _state(model):
    return {name: (p, p.detach().clone()) for name, p in model.named_parameters()}


def _restored(model, before) -> bool:
    now = dict(model.named_parameters())
    same = all(now[name] is p and torch.equal(p, copy) for name, (p, copy) in before.items())
    clean = all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules())
    return same and clean and set(now) == set(before)


def _logits(model, ids=(5, 6, 7, 8, 9, 10)):
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits


@pytest.mark.parametrize("name", sorted(transforms()))
def test_attach_changes_the_model_and_restores_it_bit_exactly(name):
    model = tiny_llama(seed=4)
    before, reference = _state(model), _logits(model)
    transform = get_transform(name)()
    with transform.attach(model):
        inside = _logits(model)
        assert transform.attached_to(model)
    assert not torch.equal(inside, reference)
    assert _restored(model, before) and torch.equal(_logits(model), reference)
    with pytest.raises(ZeroDivisionError), transform.attach(model):  # an exception inside: restored all the same
        _ = 1 / 0
    assert _restored(model, before) and not transform.attached_to(model)


@pytest.mark.parametrize("name", ["int8", "int8_wo"])
def test_torchao_backend_restores_too(name):
    pytest.importorskip("torchao")
    model = tiny_llama(seed=9)
    before, reference = _state(model), _logits(model)
    with get_transform(name)(backend="torchao").attach(model):
        assert type(model.lm_head.weight).__name__ == "Int8Tensor"  # torchao's int8 weights, head included
        inside = _logits(model)
    assert relative_error(reference, inside) < 0.2 and not torch.equal(inside, reference)
    assert _restored(model, before) and torch.equal(_logits(model), reference)


def test_target_and_draft_both_change_and_one_transform_at_a_time(pair):
    target, draft = pair
    befores = [_state(target), _state(draft)]
    w8, w4 = get_transform("w8")(), get_transform("w4")()
    with w8.attach(target, draft):
        assert not torch.equal(target.model.layers[0].mlp.up_proj.weight, befores[0]["model.layers.0.mlp.up_proj.weight"][1])
        assert not torch.equal(draft.model.layers[0].mlp.up_proj.weight, befores[1]["model.layers.0.mlp.up_proj.weight"][1])
        assert torch.equal(target.lm_head.weight, befores[0]["lm_head.weight"][1])  # the head stays (head=false)
        with w8.attach(target):  # the same transform again: nothing more happens
            pass
        assert w8.attached_to(target)
        with pytest.raises(RuntimeError, match="already attached"), w4.attach(draft):
            pass
    assert _restored(target, befores[0]) and _restored(draft, befores[1])


def test_a_failing_apply_undoes_what_it_did():
    class Failing(ModelTransform):
        name = "failing"

        def apply(self, model, edit: Edit) -> None:
            edit.replace_weight(model.lm_head, torch.zeros_like(model.lm_head.weight))
            raise RuntimeError("half way")

    model = tiny_llama(seed=5)
    before = _state(model)
    with pytest.raises(RuntimeError, match="half way"), Failing().attach(model):
        pass
    assert _restored(model, before)


def test_tied_head_is_transformed_alone():
    model = tiny_llama(seed=6)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    embedding = model.model.embed_tokens.weight.detach().clone()
    with get_transform("w4")(head=True).attach(model):
        assert torch.equal(model.model.embed_tokens.weight, embedding)
        assert not torch.equal(model.lm_head.weight, embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_activation_quantization_is_per_token():
    model = tiny_llama(seed=7)
    ids = [5, 9, 13, 17, 21, 25]
    with get_transform("w8a8")().attach(model):
        together = _logits(model, ids)[0, 2]
        alone = _logits(model, ids[:3])[0, 2]  # the same token with fewer tokens after it in the pass
    assert torch.allclose(together, alone, atol=1e-4)


# --- composition ---

def test_compose_and_split_parse_transforms():
    assert parse("sps+w8") == Spec("sps", None, "w8") and split("sps+w8") == ("sps", ["w8"])
    assert parse("w8") == Spec("ar", None, "w8") and compose("w8").name == "ar+w8"
    assert parse("streaming_llm+w8") == Spec("ar", "streaming_llm", "w8") == parse("ar+w8+streaming_llm")
    composed = compose("sps+streaming_llm+w4", {"w4": {"group_size": 64}, "sps": {"gamma": 3}})
    assert isinstance(composed, Composition) and composed.transform.config.group_size == 64
    assert composed.decoder.config.gamma == 3 and composed.policy.name == "streaming_llm"
    assert compose("sps+w8").lossless and compose("pld+w8a8").lossless
    assert not compose("sps+int8").lossless  # activation rounding flips (methods/int8.py)
    assert compose("sps+int8_wo").lossless
    assert not compose("sps+perturb", {"perturb": {"on": "activations"}}).lossless
    assert compose("sps+perturb", {"perturb": {"on": "activations", "kind": "clip"}}).lossless
    with pytest.raises(SettingError, match="one transform per run"):
        compose("sps+w8+w4")
    with pytest.raises(SettingError, match="not a cache policy, a transform or a scorer"):
        compose("sps+w9")
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        compose("nope+w8")
    with pytest.raises(SettingError, match=r"w4\.bits must be in \[2, 8\]"):
        compose("sps+w4", {"w4": {"bits": "9"}})


def test_short_names_have_the_papers_settings():
    assert get_transform("w4")().config.bits == 4 and get_transform("w4")().config.granularity == "group"
    nu = get_transform("w4_nonuniform")().config
    assert nu.nonuniform and nu.power == pytest.approx(1 / 3) and nu.group_size == 128
    assert get_transform("w8a8")().config.activation_bits == 8
    assert get_transform("perturb")().config.mode == "perturb"
    with pytest.raises(SettingError, match="strength must be > 0"):
        get_transform("perturb")(strength="0")
    with pytest.raises(SettingError, match="kind must be one of"):
        get_transform("quant_perturbation")(kind="laplace")
    with pytest.raises(SettingError, match="needs activation_bits"):
        get_transform("perturb")(on="activations", match_quant="true")


def test_match_quant_takes_the_norm_of_the_quantization_error():
    model = tiny_llama(seed=8)
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    quant = get_transform("w4")()
    error = relative_error(w, quant.quantize_weight(w))
    with get_transform("perturb")(match_quant=True, bits=4, granularity="group", kind="uniform").attach(model):
        assert relative_error(w, model.model.layers[0].mlp.down_proj.weight) == pytest.approx(error, rel=1e-4)


def _greedy(spec: str, target, draft, prompt, settings=None) -> list[int]:
    ctx = DecodeContext(prompt_ids=prompt, target=target, draft=draft, sampling=Sampling(), max_new_tokens=20,
                        eos_token_ids=frozenset())
    return compose(spec, settings).generate(ctx)


@pytest.mark.parametrize("transform", ["w8", "w4_nonuniform", "w8a8", "perturb"])
def test_lossless_decoders_equal_ar_on_the_same_transformed_model(pair, transform):
    target, draft = pair
    before = [_state(target), _state(draft)]
    settings = {"perturb": {"strength": "0.2"}}
    changed = 0
    for prompt in ([5, 9, 13], [20, 21, 22, 23], [40, 8, 30, 31, 7]):
        reference = _greedy(f"ar+{transform}", target, draft, prompt, settings)
        changed += reference != _greedy("ar", target, draft, prompt)
        for decoder in ("sps", "pld"):
            assert _greedy(f"{decoder}+{transform}", target, draft, prompt, settings) == reference
    assert changed  # the transform changed what the model says: the equality above is not the plain models'
    assert _restored(target, before[0]) and _restored(draft, before[1])


# --- the runner ---

def test_a_run_records_the_transform_and_checks_against_ar_on_it(model_dirs, tmp_path, cache_dir):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question_id": "q1", "category": "qa", "turns": ["the cat reads"]}\n'
                    '{"question_id": "q2", "category": "qa", "turns": ["one plus two equals"]}\n')
    cfg = RunConfig(methods=["ar", "w4", "sps+w4", "sps+int8"], target=model_dirs[0], draft=model_dirs[1],
                    data=str(data), max_new_tokens=10, out=str(tmp_path / "run"), warmup=False,
                    settings={"w4": {"group_size": "32"}}, strict_counting=True)
    runner = Runner(cfg)
    flat = identity(cfg, runner.methods, "x")
    assert flat["w4.group_size"] == 32 and flat["int8.backend"] == "auto" and flat["sps.gamma"] > 0
    runner.run()
    records = {(r["method"], r["item_id"]): r for r in read_records(tmp_path / "run" / "results.jsonl")}
    assert not [r["error"] for r in records.values() if r["error"]]
    for item in ("q1", "q2"):
        ar, w4, sps = records[("ar", item)], records[("w4", item)], records[("sps+w4", item)]
        assert (w4["decoder"], w4["transform"], sps["decoder"], sps["transform"]) == ("ar", "w4", "sps", "w4")
        assert w4["transform_settings"]["group_size"] == 32 and w4["transform_settings"]["bits"] == 4
        assert ar["transform"] is None and ar["transform_settings"] is None
        assert w4["lossless_check"] is None  # ar on the transform is the reference itself
        assert sps["lossless_check"] == {"reference": "w4", "equal": True, "position": None, "margin": None,
                                         "relative_margin": None, "numerical_tie": False}
        assert records[("sps+int8", item)]["lossless_check"] is None  # not claimed (activation rounding)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["methods"]["sps+int8"]["transform"]["simulated"] is False
    assert manifest["methods"]["sps+w4"]["transform"]["config"]["group_size"] == 32
    # the roofline of the int8 target: every Linear (head included) at 1 byte a weight + 4 bytes a row
    target = tiny_llama(seed=0)
    linears = [m for m in target.modules() if isinstance(m, torch.nn.Linear)]
    saved = sum(3 * m.weight.numel() - 4 * m.weight.shape[0] for m in linears)
    roof = manifest["roofline"]
    assert roof["transforms"]["int8"]["weight_bytes_per_token"] == roof["target"]["weight_bytes_per_token"] - saved
    assert "w4" not in roof["transforms"]  # simulated: it reads what the model reads
    report = (build_report(tmp_path / "run") / "report.md").read_text()
    assert "Target weight bytes read per token under int8" in report


def test_likelihood_suites_take_transforms(model_dirs, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("\n".join(" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(12)) for i in range(20)))
    out = tmp_path / "ppl"
    code = cli.main(["run", "--suite", "longppl", "--data", str(text), "--target", model_dirs[0], "--methods",
                     "ar,w4,perturb", "--option", "length=150", "--option", "window=64", "--option", "stride=32",
                     "--set", "perturb.strength=0.05", "--no-warmup", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    found = {r["method"]: r for r in read_records(out / "results.jsonl")}
    assert found["w4"]["transform"] == "w4" and found["w4"]["task_metric"] == found["ar"]["task_metric"]
    assert found["w4"]["token_nll"] != found["ar"]["token_nll"] != found["perturb"]["token_nll"]
    assert len(found["w4"]["token_nll"]) == len(found["ar"]["token_nll"])
    code = cli.main(["run", "--suite", "longppl", "--target", model_dirs[0], "--draft", model_dirs[1],
                     "--methods", "ar,sps+w8", "--out", str(tmp_path / "x")])
    assert code == 2 and "sps+w8 would give ar's figures" in capsys.readouterr().out


def test_a_bad_transform_setting_exits_2_before_any_model_loads(tmp_path):
    for args, message in ((["--methods", "ar,w4", "--set", "w4.bits=9"], "w4.bits must be in [2, 8]"),
                          (["--methods", "ar,sps+w8+w4"], "one transform per run")):
        result = subprocess.run([sys.executable, "-m", "harness.cli", "run", *args, "--target",
                                 str(tmp_path / "no-such-model"), "--out", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2 and message in result.stdout + result.stderr, result.stdout + result.stderr
    assert not (tmp_path / "run").exists()  # refused before the folder, the tokenizer or any model


def test_int8_layers_give_each_token_the_same_output_in_any_pass():
    """The CPU `int8` kernel quantizes a whole pass with one scale; our per-token scaling makes a layer's output
    for a token bit-for-bit independent of the other tokens of its pass, and the model's logits for a sequence
    read at once close to those read token by token on a cache (attention's order of summation differs)."""
    model = tiny_llama(seed=11)
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    with get_transform("int8")().attach(model), torch.inference_mode():
        layer = model.model.layers[0].mlp.up_proj
        x = torch.randn(1, 6, layer.in_features) * torch.tensor([1e-3, 1, 10, 0.5, 100, 2])[None, :, None]
        whole = layer(x)
        assert all(torch.equal(whole[:, i], layer(x[:, i:i + 1])[:, 0]) for i in range(6))
        wide = model(torch.tensor([ids])).logits[0]
        cache = DynamicCache(config=model.config)
        steps = [kv.forward(model, cache, input_ids=torch.tensor([ids[:3]])).logits[0]]
        steps += [kv.forward(model, cache, input_ids=torch.tensor([[token]])).logits[0] for token in ids[3:]]
        stepped = torch.cat(steps)
    assert relative_error(wide, stepped) < 1e-5  # attention's float sums differ by order only


def test_int8_packs_each_weight_once_and_again_after_a_change():
    model = tiny_llama(seed=10)
    transform = get_transform("int8_wo")()
    with transform.attach(model):
        first = _logits(model)
    held = {key: value[2] for key, value in transform.derived_cache().items()}
    assert len(held) == len([m for m in model.modules() if isinstance(m, torch.nn.Linear)])  # the head included
    with transform.attach(model):
        assert torch.equal(_logits(model), first)
    assert all(transform.derived_cache()[key][2] is value for key, value in held.items())  # reused, not packed again
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # changed in place: packed again
    with transform.attach(model):
        assert not torch.equal(_logits(model), first)
    assert transform.derived_cache()[id(model.lm_head.weight)][2] is not held[id(model.lm_head.weight)]
    # another instance with the same settings (`pld+int8_wo` beside `int8_wo`) reuses the packs; others do not
    assert get_transform("int8_wo")().derived_cache() is transform.derived_cache()
    assert get_transform("int8_wo")(head=False).derived_cache() is not transform.derived_cache()


def test_run_transform_option_moves_every_method_and_the_baseline(model_dirs, tmp_path, capsys):
    """`run --transform w8`: ar -> ar+w8 (the report's baseline), pld -> pld+w8 checked against it; a method
    with its own transform, or an unknown transform, is an error before any model loads."""
    from harness.cli import demo_transform

    data = tmp_path / "q.jsonl"
    data.write_text('{"question_id": "q1", "category": "qa", "turns": ["the cat reads the cat reads"]}\n')
    out = tmp_path / "run"
    code = cli.main(["run", "--data", str(data), "--target", model_dirs[0], "--methods", "ar,pld", "--transform",
                     "w8", "--max-new-tokens", "8", "--no-warmup", "--out", str(out)])
    said = capsys.readouterr().out
    assert code == 0, said
    records = {r["method"]: r for r in read_records(out / "results.jsonl")}
    assert set(records) == {"ar+w8", "pld+w8"} and records["pld+w8"]["lossless_check"]["reference"] == "ar+w8"
    report = (out / "report" / "report.md").read_text()
    table = report.split("## Spec-Bench table")[1].split("\n## ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| ar+w8 |"))
    assert "1.00x" in row  # the baseline against itself
    for args, message in ((["--transform", "w9"], "not a transform"),
                          (["--methods", "ar,sps+w4", "--transform", "w8"], "with their own transform: sps+w4")):
        assert cli.main(["run", "--target", str(tmp_path / "none"), "--out", str(tmp_path / "x"), *args]) == 2
        assert message in capsys.readouterr().out
    assert demo_transform("none") is None and demo_transform("w8") == "w8"
    assert demo_transform("auto") == (None if torch.cuda.is_available() else "int8_wo")
