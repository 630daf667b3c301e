"""The perplexity suite: documents from local files (errors before any model loads), the figures against one
forward pass computed by hand, windows, and the report's table and plot."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import WORDS

from harness import cli
from harness.results import read_records
from methods.base import SettingError
from suites.base import SuiteDataError, get_suite
from suites.perplexity import BUILTIN


def _text(lines: int = 12, offset: int = 0) -> str:
    return "\n".join(" ".join(WORDS[(7 * i + 3 * j + offset) % len(WORDS)] for j in range(9)) for i in range(lines)) + "\n"


def _run(args, capsys):
    code = cli.main(["run", "--suite", "perplexity", "--no-warmup", *args])
    return code, capsys.readouterr().out


def test_perplexity_equals_one_forward_pass_by_hand(model_dirs, pair, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(_text())
    out = tmp_path / "run"
    code, said = _run(["--data", str(doc), "--target", model_dirs[0], "--methods", "ar", "--out", str(out)], capsys)
    assert code == 0, said
    (record,) = read_records(out / "results.jsonl")
    # by hand: the tiny tokenizer has no BOS, so EOS (id 1) goes first; one pass over the whole document
    # (window = max_position_embeddings = 512), a plain log-softmax, every document token scored
    text = doc.read_text()
    ids = [1] + [WORDS.index(word) + 4 for word in text.split()]
    with torch.inference_mode():
        logits = pair[0](input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    nll = [-logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    total = sum(nll)
    assert record["token_nll"] == pytest.approx(nll, abs=2e-5)
    assert record["scored_tokens"] == len(ids) - 1 == 108 and record["prompt_tokens"] == 109
    words = len(text.split()) + 1  # lm-eval's re.split(r"\s+") counts the empty piece after the final newline
    assert record["words"] == words == len(re.split(r"\s+", text)) and record["bytes"] == len(text.encode())
    assert record["token_perplexity"] == pytest.approx(math.exp(total / 108), rel=1e-5)
    assert record["word_perplexity"] == pytest.approx(math.exp(total / words), rel=1e-5)
    assert record["byte_perplexity"] == pytest.approx(math.exp(total / len(text)), rel=1e-5)
    assert record["bits_per_byte"] == pytest.approx(total / (len(text) * math.log(2)), rel=1e-5)
    assert record["window_tokens"] == [108] and record["window_loglik"] == pytest.approx([-total], rel=1e-5)
    assert record["task_metric"] == "sliding 512/512, first token after BOS" and record["target_calls"] == 1


def test_disjoint_windows_score_each_token_once_after_the_window_before(model_dirs, pair, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(_text())
    out = tmp_path / "run"
    code, said = _run(["--data", str(doc), "--target", model_dirs[0], "--methods", "ar", "--option", "window=40",
                       "--option", "prefix=none", "--out", str(out)], capsys)
    assert code == 0, said
    (record,) = read_records(out / "results.jsonl")
    ids = [WORDS.index(word) + 4 for word in doc.read_text().split()]
    # 107 tokens after the first: passes read 0..39 (score 1..40), 40..79 (41..80), 67..106 (81..107, the last
    # window full-sized, as lm-eval's last rolling window)
    assert record["window_tokens"] == [40, 40, 27] and record["target_widths"] == [40, 40, 40]
    with torch.inference_mode():
        second = torch.log_softmax(pair[0](input_ids=torch.tensor([ids[40:80]])).logits[0].double(), -1)
        last = torch.log_softmax(pair[0](input_ids=torch.tensor([ids[67:107]])).logits[0].double(), -1)
    assert record["token_nll"][40] == pytest.approx(-second[0, ids[41]].item(), abs=2e-5)  # one token of context
    assert record["token_nll"][-1] == pytest.approx(-last[-1, ids[107]].item(), abs=2e-5)
    assert sum(record["window_loglik"]) == pytest.approx(-sum(record["token_nll"]))
    assert record["task_metric"] == "sliding 40/40"


def test_folder_jsonl_and_length_pieces(tiny_tok, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text(_text(3))
    (folder / "a.txt").write_text(_text(2, offset=5))
    (folder / "notes.md").write_text("not read")
    items = get_suite("perplexity")(data=str(folder), tokenizer=tiny_tok).items()
    assert [i.item_id for i in items] == ["a", "b"] and items[1].turns[0] == _text(3)
    assert items[0].meta["tokens"] == 18 and items[0].category == "document"
    rows = tmp_path / "docs.jsonl"
    rows.write_text(json.dumps({"id": "x", "text": _text(30)}) + "\n\n" + json.dumps({"text": _text(2)}) + "\n")
    suite = get_suite("perplexity")(data=str(rows), tokenizer=tiny_tok, length=100)
    pieces = suite.items()
    # 30 lines of 9 tokens: the 100th token ends line 12, so pieces of 12 lines (108 tokens), then the 54 left
    assert [(p.item_id, p.meta["tokens"]) for p in pieces] == [("x-0", 108), ("x-1", 108), ("x-2", 54), ("docs-3", 18)]
    assert "".join(p.turns[0] for p in pieces[:3]) == _text(30)
    assert [p.item_id for p in suite.items(limit=2)] == ["x-0", "x-1"]


def test_builtin_text_is_the_lm_eval_tasks_text():
    items = get_suite("perplexity")().items()
    assert len(items) == 8 and items[0].item_id == "sourdough" and items[0].meta["source"] == str(BUILTIN)
    assert 2400 < sum(len(i.turns[0].split()) for i in items) < 2700


@pytest.mark.parametrize("content, message", [
    ('{"text": "fine"}\n{"text": "broken\n', r"docs\.jsonl:2: not valid JSON"),
    ('{"text": "fine"}\n\n["a list"]\n', r"docs\.jsonl:3: each line must be a JSON object with a 'text' field"),
    ('{"body": "no text"}\n', r"docs\.jsonl:1: each line must be a JSON object with a 'text' field"),
    ('{"text": 3}\n', r"docs\.jsonl:1: 'text' must be a non-empty string"),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', r"docs\.jsonl: document id\(s\) a appear more than once"),
    ("\n\n", r"docs\.jsonl: no documents"),
])
def test_malformed_jsonl_is_an_error_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(SuiteDataError, match=message):
        get_suite("perplexity")(data=str(path))


def test_bad_data_fails_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "one"}\nnot json\n')
    missing = tmp_path / "target-that-does-not-exist"  # loading it would fail: the data error comes first
    for data, message in ((bad, "docs.jsonl:2: not valid JSON"), (tmp_path / "none.txt", "none.txt: no such file"),
                          (tmp_path, "a folder with no .txt files")):
        code, said = _run(["--data", str(data), "--target", "smollm2-135m", "--out", str(missing)], capsys)
        assert code == 2 and message in said and "loading target" not in said, said
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SuiteDataError, match="empty.txt: empty text"):
        get_suite("perplexity")(data=str(empty))
    with pytest.raises(SettingError, match="not both"):
        get_suite("perplexity")(data=str(empty), dataset="wikitext")


def test_hugging_face_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SuiteDataError, match=r"dataset no-such-org/no-such-set, split test could not be loaded .*"
                                             r"offline, use --data"):
        get_suite("perplexity")(dataset="no-such-org/no-such-set")


def test_report_has_the_perplexity_table_and_plot(model_dirs, tmp_path, capsys):
    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"id": f"d{i}", "text": _text(10 + 5 * i, offset=i)}) + "\n" for i in range(2)))
    out = tmp_path / "run"
    code, said = _run(["--data", str(rows), "--target", model_dirs[0], "--methods", "ar,streaming_llm",
                       "--set", "streaming_llm.window=24", "--option", "chunk=8", "--out", str(out)], capsys)
    assert code == 0, said
    records = {(r["method"], r["item_id"]): r for r in read_records(out / "results.jsonl")}
    assert len(records) == 4 and records[("streaming_llm", "d1")]["window_tokens"][:2] == [7, 8]
    report = (out / "report" / "report.md").read_text()
    section = report.split("## Perplexity against position")[1].split("\n## ")[0]
    ar = [r for (m, _), r in records.items() if m == "ar"]
    total = sum(sum(r["token_nll"]) for r in ar)
    words, size = sum(r["words"] for r in ar), sum(r["bytes"] for r in ar)
    row = next(line for line in section.splitlines() if line.startswith("| ar |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == model_dirs[0] and cells[2:6] == ["2", str(sum(r["scored_tokens"] for r in ar)), str(words), str(size)]
    assert cells[7] == f"{math.exp(total / words):.2f}" and cells[10] == f"{total / (size * math.log(2)):.4f}"
    assert cells[8] == "+0.00%"  # ar against itself
    assert f"| streaming_llm | {model_dirs[0]} | 2 |" in section and "cached, chunks of 8" in section
    assert (out / "report" / "perplexity_by_position.png").stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_tok():
    from conftest import tiny_tokenizer

    return tiny_tokenizer()


def test_perturbation_sweep_from_runs_at_several_strengths(model_dirs, tmp_path, capsys):
    """Two runs of `ar,perturb` at two strengths (one strength per run): their records pooled give one row per
    (kind, strength), word perplexity as the records' own, rising with the strength, and a plot."""
    import pandas as pd

    from harness import transformtables
    from harness.plots import plot_perturbation_sweep

    doc = tmp_path / "doc.txt"
    doc.write_text(_text())
    records = []
    for strength in ("0.05", "0.5"):
        out = tmp_path / f"run-{strength}"
        code, said = _run(["--data", str(doc), "--target", model_dirs[0], "--methods", "ar,perturb",
                           "--set", f"perturb.strength={strength}", "--set", "perturb.kind=rademacher",
                           "--out", str(out)], capsys)
        assert code == 0, said
        records += read_records(out / "results.jsonl")
    reading = pd.DataFrame(records)
    sweep = transformtables.perturbation_sweep(reading)
    assert list(sweep["strength"]) == [0.05, 0.5] and set(sweep["kind"]) == {"rademacher"}
    own = {r["transform_settings"]["strength"]: r["word_perplexity"] for r in records if r["transform"] == "perturb"}
    assert list(sweep["word ppl"]) == pytest.approx([own[0.05], own[0.5]], rel=1e-9)
    assert own[0.5] > own[0.05]
    levels = transformtables.baseline_levels(reading, "ar")
    assert set(levels) == {"ar"}
    assert plot_perturbation_sweep(sweep, levels, tmp_path / "sweep.png").stat().st_size > 0
    assert transformtables.perturbation_sweep(reading[reading["transform_settings"].map(
        lambda s: not s or s["strength"] == 0.05)]).empty  # one strength: no sweep
    # the report over both runs: perplexity by run, the sweep's table and plot, no Spec-Bench table
    code = cli.main(["report", str(tmp_path / "run-0.05"), str(tmp_path / "run-0.5"), "--out", str(tmp_path / "both")])
    assert code == 0, capsys.readouterr().out
    report = (tmp_path / "both" / "report.md").read_text()
    sweep_section = report.split("## Perturbation sweep")[1].split("\n## ")[0]
    assert f"| rademacher | 0.5 | 1 | {own[0.5]:.2f} |" in sweep_section.replace(f"| {model_dirs[0]} | weights ", "| ")
    assert "## Perplexity by run" in report and "## Spec-Bench table" not in report
    assert (tmp_path / "both" / "perturbation_sweep.png").stat().st_size > 0
