import json
import math

import pandas as pd
import pytest

from harness import report
from harness.report import build_report, format_table_markdown
from harness.tables import host_overhead, load_records, speed_table

# Hand-computed expectations for the synthetic run below, by Spec-Bench's speed.py definition: a question's
# speed is its tokens summed over turns / its wall time summed over turns (64 tokens per record). The errored
# sps record on m2 is excluded, which leaves ar's m2 question unmatched.
#   m1 (two turns): ar 128 / (6.4 + 3.2) = 13.33,  sps 128 / (4.267 + 2.133) = 20,  hf_assisted 128 / 8 = 16
#   mt_bench: sps 20 / 13.33 -> 1.50x;  hf_assisted 16 / 13.33 -> 1.20x
#   qa:       ar (10 + 30) / 2 = 20,  sps (20 + 60) / 2 = 40    -> 2.00x
#   overall:  ar (13.33 + 10 + 30) / 3 = 17.78,  sps (20 + 20 + 60) / 3 = 33.33  -> 1.875x
#             (a mean over turns instead of questions would give 31.25 / 17.5 = 1.79x)
MT_BENCH_SPEEDUP = 1.5
QA_SPEEDUP = 2.0
OVERALL_SPEEDUP = (100 / 3) / ((128 / 9.6 + 40) / 3)


def _record(method, category, item_id, turn, tokens_per_s, mean_accepted, **extra):
    new_tokens = 64
    record = {
        "method": method, "suite": "spec_bench", "category": category, "item_id": item_id, "turn": turn,
        "repeat": 0, "prompt_tokens": 32, "new_tokens": new_tokens, "wall_s": new_tokens / tokens_per_s,
        "prefill_s": 0.01, "tokens_per_s": tokens_per_s, "target_calls": round(new_tokens / mean_accepted),
        "target_tokens": 2 * new_tokens, "draft_calls": 0 if method == "ar" else 40, "draft_tokens": 0,
        "mean_accepted": mean_accepted, "accept_lengths": [], "peak_mem_bytes": 512 * 2**20, "energy_j": None,
        "output_text": "x", "output_ids": [1, 2], "stop_reason": "max_new_tokens", "temperature": 0.0,
        "seed": 0, "lossless_check": None, "error": None,
    }
    if method != "ar":
        record["lossless_check"] = {"reference": "ar", "equal": True, "position": None, "margin": None,
                                    "numerical_tie": False}
    record.update(extra)
    return record


RECORDS = [
    _record("ar", "mt_bench", "m1", 0, 10.0, 1.0),
    _record("ar", "mt_bench", "m1", 1, 20.0, 1.0),
    _record("ar", "mt_bench", "m2", 0, 100.0, 1.0),
    _record("ar", "qa", "q1", 0, 10.0, 1.0),
    _record("ar", "qa", "q2", 0, 30.0, 1.0),
    _record("sps", "mt_bench", "m1", 0, 15.0, 2.0),
    _record("sps", "mt_bench", "m1", 1, 30.0, 3.0),
    _record("sps", "mt_bench", "m2", 0, 999.0, 99.0, error="CUDA out of memory", lossless_check=None),
    _record("sps", "qa", "q1", 0, 20.0, 2.5),
    _record("sps", "qa", "q2", 0, 60.0, 2.5, lossless_check={
        "reference": "ar", "equal": False, "position": 7, "margin": 0.5, "numerical_tie": False}),
    _record("hf_assisted", "mt_bench", "m1", 0, 12.0, 1.5),
    _record("hf_assisted", "mt_bench", "m1", 1, 24.0, 1.5),
]

MANIFEST = {
    "name": "synthetic-run", "created": "2025-01-01T00:00:00Z", "suite": "spec_bench",
    "target": {"spec": "tiny-target", "sha256": "ab" * 32}, "draft": {"spec": "tiny-draft", "sha256": None},
    "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}, "max_new_tokens": 64,
    "device": "cpu", "versions": {"python": "3.11.7", "torch": "2.4.0", "transformers": "5.0.0"},
    "methods": {
        "ar": {"paper": "autoregressive", "arxiv": None, "lossless": True, "reference": False, "needs": "target",
               "config": {}},
        "sps": {"paper": "Speculative sampling", "arxiv": "2302.01318", "lossless": True, "reference": False,
                "needs": "target+draft", "config": {"gamma": 4}},
        "hf_assisted": {"paper": "transformers assisted generation", "arxiv": None, "lossless": True,
                        "reference": True, "needs": "target+draft", "config": {}},
    },
}


@pytest.fixture
def run_dir(tmp_path):
    lines = [json.dumps(record) for record in RECORDS]
    lines.append('{"method": "sps", "suite": "spec_be')  # a run killed mid-write
    (tmp_path / "results.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST), encoding="utf-8")
    return tmp_path


@pytest.fixture
def records(run_dir):
    with pytest.warns(UserWarning, match="unparsable"):
        return load_records(run_dir / "results.jsonl")


def test_truncated_last_line_is_skipped(records):
    assert len(records) == len(RECORDS)


def test_speed_table_matches_hand_computation(records):
    table = speed_table(records)
    assert list(table.index) == ["ar", "sps", "hf_assisted"]
    assert list(table.columns[:5]) == ["mt_bench", "qa", "#MAT", "Overall speed-up", "Tokens/s"]
    assert table.loc["sps", "mt_bench"] == pytest.approx(MT_BENCH_SPEEDUP)
    assert table.loc["sps", "qa"] == pytest.approx(QA_SPEEDUP)
    assert table.loc["sps", "Overall speed-up"] == pytest.approx(OVERALL_SPEEDUP)
    assert table.loc["ar", ["mt_bench", "qa", "Overall speed-up"]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # The errored record (999 tok/s, MAT 99) must not leak into any figure. Tokens/s: mean over the method's
    # complete questions; #MAT pooled over steps: 256 tokens over 32 + 21 + 26 + 26 target calls.
    assert table.loc["sps", "Tokens/s"] == pytest.approx(100 / 3)
    assert table.loc["sps", "#MAT"] == pytest.approx(256 / 105)
    assert table.loc["ar", "Tokens/s"] == pytest.approx((128 / 9.6 + 100 + 10 + 30) / 4)
    # hf_assisted only has m1, matched against ar's; no qa data at all.
    assert table.loc["hf_assisted", "mt_bench"] == pytest.approx(1.2)
    assert math.isnan(table.loc["hf_assisted", "qa"])


def test_bootstrap_interval_is_reproducible_and_needs_two_pairs(records):
    table = speed_table(records)
    low, high = table.loc["sps", ["Overall CI low", "Overall CI high"]]
    assert low <= OVERALL_SPEEDUP <= high
    assert speed_table(records).loc["sps", "Overall CI low"] == low
    assert math.isnan(table.loc["hf_assisted", "Overall CI low"])  # a single pair gives no interval
    assert math.isnan(table.loc["ar", "Overall CI low"])


def test_missing_baseline_leaves_tokens_per_s_only(records):
    table = speed_table(records[records["method"] != "ar"])
    assert list(table.columns) == ["#MAT", "Tokens/s"]


def test_format_table_markdown(records):
    text = format_table_markdown(speed_table(records), MANIFEST["methods"])
    assert "| ar | 1.00x | 1.00x |" in text
    assert "1.88x [" in text
    assert "hf_assisted (reference: transformers)" in text
    assert "| — |" in text  # hf_assisted has no qa speed-up


def test_build_report_writes_all_outputs(run_dir):
    with pytest.warns(UserWarning, match="unparsable"):
        folder = build_report(run_dir)
    assert folder == run_dir / "report"
    for name in ["report.md", "report.html", "speedup_by_category.png", "mat_by_category.png", "tokens_per_s.png"]:
        assert (folder / name).stat().st_size > 0, name
    markdown = (folder / "report.md").read_text()
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "![Speed-up by category](speedup_by_category.png)" in markdown
    for text in (markdown, html):
        assert "synthetic-run" in text
        assert "1.88x [" in text
        assert "(reference: transformers)" in text
        assert "Speed-up is Spec-Bench" in text


def _section(markdown, title):
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_lists_divergences_errors_and_missing_energy(run_dir):
    with pytest.warns(UserWarning):
        folder = build_report(run_dir)
    markdown = (folder / "report.md").read_text()

    lossless = _section(markdown, "Lossless check")
    assert "3/4 outputs identical to ar" in lossless
    assert "| q2 | 0 | 7 | 0.5 | MISMATCH |" in lossless
    assert "all 2 outputs identical to ar" in lossless  # hf_assisted

    errors = _section(markdown, "Errors")
    assert "| sps | m2 | 0 | CUDA out of memory |" in errors

    cost = _section(markdown, "Cost per method")
    sps_row = next(line for line in cost.splitlines() if line.startswith("| sps |"))
    assert sps_row.rstrip(" |").endswith("n/a")  # energy was never measured: not 0
    assert "| 512 |" in sps_row  # peak memory in MiB


def test_missing_templates_give_a_clear_error(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "TEMPLATE_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="templates"):
        build_report(run_dir)


def test_host_overhead_per_target_pass(tmp_path):
    # host = wall - target passes - draft passes, pooled over records per target pass
    timed = [
        _record("ar", "qa", "q1", 0, 64.0, 1.0, wall_s=1.0, target_calls=4, target_pass_s=[0.2] * 4, draft_pass_s=[]),
        _record("ar", "qa", "q2", 0, 64.0, 1.0, wall_s=1.0, target_calls=4, target_pass_s=[0.24] * 4, draft_pass_s=[]),
        _record("sps", "qa", "q1", 0, 64.0, 2.0, wall_s=1.0, target_calls=2, target_pass_s=[0.3, 0.3],
                draft_pass_s=[0.05] * 4),
        _record("sps", "qa", "q2", 0, 64.0, 2.0, wall_s=1.0, target_calls=2, target_pass_s=[0.1, 0.1],
                draft_pass_s=[0.05] * 4),
    ]
    table = host_overhead(pd.DataFrame(timed), ["ar", "sps"])
    assert table.loc["ar", "Host ms/target pass"] == pytest.approx(1000 * (0.2 + 0.04) / 8)
    assert table.loc["sps", "Host ms/target pass"] == pytest.approx(1000 * (0.2 + 0.6) / 4)
    assert table.loc["sps", "Host share of wall time"] == pytest.approx(0.8 / 2)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in timed))
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    host = _section((build_report(tmp_path) / "report.md").read_text(), "Host overhead")
    assert "| sps | 200.00 | 40.0% |" in host and "wall time minus" in host


def test_report_flags_uncounted_work_unskipped_self_drafts_and_lost_state(tmp_path):
    flagged = [
        _record("ar", "qa", "q1", 0, 10.0, 1.0),
        _record("sps", "qa", "q1", 0, 20.0, 2.0, uncounted_calls=3, uncounted_note="lm_head x3"),
        _record("ar", "qa", "q2", 0, 10.0, 1.0),
        _record("sps", "qa", "q2", 0, 20.0, 2.0, self_draft_unskipped=2,
                state_note="saved state not found on resume; started from empty"),
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flagged))
    (tmp_path / "manifest.json").write_text(json.dumps(MANIFEST))
    warnings = _section((build_report(tmp_path) / "report.md").read_text(), "Counting and state warnings")
    assert "| sps | q1 | 0 | 0 | — | uncounted model work: lm_head x3 |" in warnings
    assert "2 self-draft passes skipped no sublayer" in warnings and "saved state not found" in warnings
    assert "| ar |" not in warnings
