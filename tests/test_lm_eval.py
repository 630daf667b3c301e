"""lm-eval both ways: decodebench's lm-eval model answers lm-eval's own request objects (checked by hand and
against lm-eval's own HF model), `decodebench run --suite lm-eval:...` runs the shipped tasks offline and folds
their scores into records and the report, and lm-eval's wikitext-style perplexity equals the perplexity suite's.

Tolerance of the agreements with lm-eval's HFLM: both sum the same float32 log-softmax values of the same
forward passes (same windows, same tokens); they differ only in float32 summation order and in the kernels of
a pass over a different number of rows (HFLM keeps every row, decodebench only the scored ones), about 1e-6
relative on these sums; 1e-5 relative leaves room for that and nothing else (a window off by one token moves
word perplexity by percents)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import WORDS

lm_eval = pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from harness import cli
from harness.lm_eval_model import DecodebenchLM, main
from harness.results import read_records
from suites.base import SuiteDataError, get_suite

SMOLLM2 = Path("~/.cache/decodebench/smollm2-135m").expanduser()
TOLERANCE = 1e-5  # relative; see the module docstring


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """lm-eval's json datasets are cached under the test's folder, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _line(i: int, n: int = 9) -> str:
    return " ".join(WORDS[(5 * i + 3 * j) % len(WORDS)] for j in range(n))


@pytest.fixture(scope="module")
def lm(model_dirs, tmp_path_factory):
    """The adapter as lm-eval builds it from model_args: its own runner, sps on the tiny pair."""
    out = tmp_path_factory.mktemp("lm") / "run"
    return DecodebenchLM.create_from_arg_string(
        f"target={model_dirs[0]},draft={model_dirs[1]},method=sps,device=cpu,out={out},max_length=16,sps.gamma=3",
        {"batch_size": 1})


def _instance(kind: str, args: tuple, doc_id: int = 0, task: str = "toy") -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, doc_id, 1))


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return logits - torch.logsumexp(logits, -1, keepdim=True)


def test_loglikelihood_by_hand_and_as_lm_eval_scores_it(lm, pair, tiny_tok):
    requests = [_instance("loglikelihood", ("the robot paints the", " house")),
                _instance("loglikelihood", ("the cat reads  ", "a blue river")),  # trailing spaces move over
                _instance("loglikelihood", ("", "hello world")),  # empty context: after EOS (no BOS here)
                _instance("loglikelihood", (" ".join(_line(i) for i in range(3)), " and then"))]  # cut to 16
    ours = lm.loglikelihood(requests)
    ids = [WORDS.index(w) + 4 for w in ["the", "robot", "paints", "the", "house"]]
    logp = _log_softmax(pair[0], ids)
    assert ours[0][0] == pytest.approx(logp[3, ids[4]].item(), abs=2e-5)
    assert ours[0][1] == (logp[3].argmax().item() == ids[4])
    hf = HFLM(pretrained=pair[0], tokenizer=tiny_tok, max_length=16, batch_size=1)
    theirs = hf.loglikelihood(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=TOLERANCE) and greedy_a == greedy_b


def test_loglikelihood_rolling_matches_hflm_windows(lm, pair, tiny_tok):
    texts = ["\n".join(_line(i) for i in range(5)), _line(7, 4)]  # 45 tokens: 3 windows of 16; 4: one
    requests = [_instance("loglikelihood_rolling", (text,), i) for i, text in enumerate(texts)]
    ours = lm.loglikelihood_rolling(requests)
    hf = HFLM(pretrained=pair[0], tokenizer=tiny_tok, max_length=16, batch_size=1)
    theirs = hf.loglikelihood_rolling(requests, disable_tqdm=True)
    assert ours == pytest.approx(theirs, rel=TOLERANCE)
    # by hand for the short one: EOS, then its 4 words in one pass
    ids = [1] + [WORDS.index(w) + 4 for w in texts[1].split()]
    logp = _log_softmax(pair[0], ids)
    assert ours[1] == pytest.approx(sum(logp[i, ids[i + 1]].item() for i in range(4)), abs=5e-5)


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(_log_softmax(model, ids + out)[-1].argmax()))
    return out


def test_generate_until_runs_the_method_honours_until_and_max_gen_toks(lm, pair, tiny_tok):
    prompt = "the robot paints the"
    ids = [WORDS.index(w) + 4 for w in prompt.split()]
    greedy = _greedy(pair[0], ids, 6)
    words = tiny_tok.decode(greedy).split()
    stop = words[2]
    cut = next(i for i in range(6) if stop in tiny_tok.decode(greedy[:i + 1]))  # the token that completes it
    requests = [_instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 6}), doc_id=3, task="gen"),
                _instance("generate_until", (prompt, {"until": ["<never>"], "max_gen_toks": 4}), doc_id=4, task="gen")]
    texts = lm.generate_until(requests)
    assert texts[0] == tiny_tok.decode(greedy[:cut + 1]).split(stop)[0]
    assert texts[1] == tiny_tok.decode(greedy[:4])
    records = {r["item_id"]: r for r in read_records(lm.runner.out / "results.jsonl")}
    first, second = records["gen/3"], records["gen/4"]
    assert first["output_ids"] == greedy[:cut + 1] and first["stop_reason"] == "stop"
    assert second["output_ids"] == greedy[:4] and second["stop_reason"] == "max_new_tokens"
    for r in (first, second):  # the harness counted the method's work: sps drafts, the target verifies
        assert r["method"] == "sps" and r["suite"] == "lm-eval" and r["draft_calls"] > 0 and r["target_calls"] > 0
        assert r["category"] == "gen" and r["temperature"] == 0 and r["prompt_tokens"] == 4 and r["wall_s"] > 0
    manifest = json.loads((lm.runner.out / "manifest.json").read_text())
    assert manifest["methods"]["sps"]["config"]["gamma"] == 3


def test_a_composed_cache_policy_serves_the_likelihoods(model_dirs, tmp_path, capsys):
    """ar+streaming_llm as an lm-eval model: rolling log-likelihoods read on the cache in chunks with the policy
    attached, equal to the perplexity suite's record under the same policy (not to plain ar's)."""
    text = "\n".join(_line(i) for i in range(6))  # 54 tokens: past the policy's 2 + 12 kept slots
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    settings = {"streaming_llm.sinks": 2, "streaming_llm.window": 12}
    policy = DecodebenchLM(target=model_dirs[0], method="streaming_llm", device="cpu", out=str(tmp_path / "lm"),
                           chunk=8, **settings)
    ours = policy.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])[0]
    assert policy.calls == math.ceil(55 / 8)  # EOS + 54 tokens, 8 a pass
    out = tmp_path / "run"
    code = cli.main(["run", "--suite", "perplexity", "--data", str(doc), "--target", model_dirs[0], "--methods",
                     "ar,streaming_llm", "--option", "chunk=8", "--set", "streaming_llm.sinks=2", "--set",
                     "streaming_llm.window=12", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    records = {r["method"]: r for r in read_records(out / "results.jsonl")}
    assert ours == pytest.approx(-sum(records["streaming_llm"]["token_nll"]), rel=TOLERANCE)
    assert abs(ours + sum(records["ar"]["token_nll"])) > 0.1  # the policy changed the likelihood


def _tiny_task(folder: Path, rows: list[str]) -> Path:
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    (folder / "toy_ppl.yaml").write_text(f"""task: toy_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""")
    return data


def test_wikitext_style_perplexity_agrees_with_the_perplexity_suite(model_dirs, pair, tiny_tok, tmp_path, capsys):
    """lm-eval's own HF model on a wikitext-style task (loglikelihood_rolling, max_length 16) against
    `decodebench run --suite perplexity` with window = stride = 16 on the same text and model."""
    rows = ["\n".join(_line(i + 3 * d) for i in range(4 + d)) + "\n" for d in range(3)]  # 36-54 tokens each
    data = _tiny_task(tmp_path, rows)
    hf = HFLM(pretrained=pair[0], tokenizer=tiny_tok, max_length=16, batch_size=1)
    results = simple_evaluate(model=hf, tasks=["toy_ppl"], task_manager=TaskManager(include_path=str(tmp_path),
                                                                                   include_defaults=False),
                              bootstrap_iters=0)["results"]["toy_ppl"]
    out = tmp_path / "run"
    code = cli.main(["run", "--suite", "perplexity", "--data", str(data), "--target", model_dirs[0], "--methods",
                     "ar", "--option", "window=16", "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    records = read_records(out / "results.jsonl")
    total = sum(sum(r["token_nll"]) for r in records)
    words, size = sum(r["words"] for r in records), sum(r["bytes"] for r in records)
    assert words == sum(len(row.split()) + 1 for row in rows)  # lm-eval's count: the empty piece after "\n"
    assert math.exp(total / words) == pytest.approx(results["word_perplexity,none"], rel=TOLERANCE)
    assert math.exp(total / size) == pytest.approx(results["byte_perplexity,none"], rel=TOLERANCE)
    assert total / (size * math.log(2)) == pytest.approx(results["bits_per_byte,none"], rel=TOLERANCE)
    report = (out / "report" / "report.md").read_text()
    assert f"| {math.exp(total / words):.2f} |" in report


def test_lm_eval_suite_runs_shipped_tasks_offline_into_records_and_report(model_dirs, pair, tiny_tok, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "--suite", "lm-eval:decodebench_prose_ppl,decodebench_mc,decodebench_gen",
                     "--target", model_dirs[0], "--draft", model_dirs[1], "--methods", "ar,sps,token_recycling", "--limit", "2",
                     "--no-warmup", "--out", str(out)])
    said = capsys.readouterr().out
    assert code == 0, said
    records = {(r["method"], r["item_id"]): r for r in read_records(out / "results.jsonl")}
    tasks = ("decodebench_prose_ppl", "decodebench_mc", "decodebench_gen")
    assert set(records) == {(m, i) for m in ("ar", "sps", "token_recycling") for i in (*tasks, *(f"decodebench_gen/{d}" for d in range(2)))}
    mc, ppl, gen = (records[("ar", t)]["metrics"] for t in ("decodebench_mc", "decodebench_prose_ppl", "decodebench_gen"))
    assert set(mc) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(ppl) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert set(gen) == {"exact_match,strip", "exact_match_stderr,strip"}
    # the same tasks through lm-eval's own HF model on the same target give the same figures
    suite = get_suite("lm-eval")(tasks="decodebench_prose_ppl,decodebench_mc")
    hf = HFLM(pretrained=pair[0], tokenizer=tiny_tok, batch_size=1)
    theirs = simple_evaluate(model=hf, tasks=[suite.task_spec(t) for t in suite.names], limit=2, bootstrap_iters=0,
                             task_manager=suite.task_manager())["results"]
    assert mc["acc"] == theirs["decodebench_mc"]["acc,none"] and mc["acc_norm"] == theirs["decodebench_mc"]["acc_norm,none"]
    assert ppl["word_perplexity"] == pytest.approx(theirs["decodebench_prose_ppl"]["word_perplexity,none"], rel=TOLERANCE)
    for method in ("ar", "sps", "token_recycling"):  # the generation task's records: cost, score per document
        for doc in range(2):
            r = records[(method, f"decodebench_gen/{doc}")]
            assert r["new_tokens"] <= 8 and r["target_calls"] >= 1 and r["task_metric"] == "exact_match,strip"
            assert r["task_score"] in (0.0, 1.0) and r["category"] == "decodebench_gen"
        assert records[(method, "decodebench_gen")]["metrics"] == gen  # greedy: sps answers as ar does
    assert all(records[(m, f"decodebench_gen/{d}")]["lossless_check"]["equal"] for d in range(2)
               for m in ("sps", "token_recycling"))
    # Token Recycling's matrix is carried from one request to the next (the papers' hot start)
    recycled = [records[("token_recycling", f"decodebench_gen/{d}")] for d in range(2)]
    assert [r["state_items_seen"] for r in recycled] == [0, 1] and recycled[1]["method_state_bytes"] > 0
    assert records[("sps", "decodebench_gen/0")]["draft_calls"] > 0
    report = (out / "report" / "report.md").read_text()
    section = report.split("## lm-eval tasks")[1].split("\n## ")[0]
    assert f"| decodebench_mc | acc ↑ | {model_dirs[0]} | sps | {mc['acc']:.4g} | {mc['acc_stderr']:.4g} | 2 |" in section
    assert "| decodebench_prose_ppl | word_perplexity ↓ |" in section and "| n/a | 2 |" in section
    assert "## Spec-Bench table" in report and "| decodebench_gen |" in report.split("## Spec-Bench table")[1]
    assert "| decodebench_mc | acc ↑ |" in said  # the command prints the task table too


def test_lm_eval_suite_errors_before_any_model_loads(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "no-model")
    code = cli.main(["run", "--suite", "lm-eval:decodebench_mc", "--data", str(tmp_path / "x.yaml"), "--target",
                     missing, "--out", str(tmp_path / "a")])
    assert code == 2 and "--data for suite lm-eval is a folder of task YAML files" in capsys.readouterr().out
    code = cli.main(["run", "--suite", "perplexity:x", "--target", missing, "--out", str(tmp_path / "b")])
    assert code == 2 and "suite perplexity takes no ':VALUE' argument" in capsys.readouterr().out
    code = cli.main(["run", "--suite", "lm-eval:decodebench_mc", "--target", missing, "--budget", "target_calls=4",
                     "--out", str(tmp_path / "c")])
    assert code == 2 and "--budget does not apply" in capsys.readouterr().out
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SuiteDataError, match=r"pip install -e '\.\[eval\]'"):
        get_suite("lm-eval")()


def test_python_m_entry_prints_lm_eval_table(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model_args", f"target={model_dirs[0]},out={out}", "--tasks", "decodebench_mc", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "decodebench_mc" in printed and "acc" in printed and str(out / "results.jsonl") in printed


@pytest.mark.integration
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="smollm2-135m is not installed (decodebench models install)")
def test_smollm2_word_perplexity_agrees_with_lm_eval(tmp_path, capsys):
    """The built-in prose's first two documents (about 750 tokens) on SmolLM2-135M: the perplexity suite
    with its defaults against lm-eval's own HF model on the shipped wikitext-style task (defaults too)."""
    from harness import models

    loaded = models.load("smollm2-135m", "cpu", "float32")
    suite = get_suite("lm-eval")(tasks="decodebench_prose_ppl")
    hf = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    theirs = simple_evaluate(model=hf, tasks=[suite.task_spec("decodebench_prose_ppl")], limit=2, bootstrap_iters=0,
                             task_manager=suite.task_manager())["results"]["decodebench_prose_ppl"]
    del loaded
    out = tmp_path / "run"
    assert cli.main(["run", "--suite", "perplexity", "--target", "smollm2-135m", "--limit", "2", "--out", str(out)]) == 0
    records = read_records(out / "results.jsonl")
    total = sum(sum(r["token_nll"]) for r in records)
    words, size = sum(r["words"] for r in records), sum(r["bytes"] for r in records)
    assert math.exp(total / words) == pytest.approx(theirs["word_perplexity,none"], rel=TOLERANCE)
    assert total / (size * math.log(2)) == pytest.approx(theirs["bits_per_byte,none"], rel=TOLERANCE)
    capsys.readouterr()


@pytest.fixture(scope="module")
def tiny_tok():
    from conftest import tiny_tokenizer

    return tiny_tokenizer()
