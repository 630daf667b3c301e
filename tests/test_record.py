"""The record schema: one definition, versioned; unknown versions and fields are clear errors."""
from __future__ import annotations

import json

import pytest

from harness import record as schema
from harness.cli import main
from harness.manifest import ManifestMismatch, write_manifest
from harness.record import SCHEMA_VERSION, LosslessCheck, Record, SchemaError
from harness.report import build_report
from harness.reproduce import config_from_manifest
from harness.results import ResultStore, read_records, record_key
from harness.runner import RunConfig
from harness.tables import load_records

# The fields of each schema version, in order. Renaming, removing or retyping a field changes this list:
# bump SCHEMA_VERSION, add the new version's list here, and teach harness.record.upgrade the old one.
FIELDS_BY_VERSION = {
    1: ["schema_version", "method", "suite", "item_id", "turn", "repeat", "budget", "category", "subcategory",
        "item_turns", "max_target_calls", "max_target_tokens", "max_wall_s", "temperature", "seed", "method_state",
        "state_items_seen", "state_note", "prompt_tokens", "prompt_sha", "output_ids", "output_text", "new_tokens",
        "stop_reason", "budget_note", "alternatives", "alternatives_text", "wall_s", "prefill_s", "decode_s",
        "tokens_per_s", "target_pass_s", "draft_pass_s", "tracker_s", "target_calls", "target_tokens",
        "target_widths", "draft_calls", "draft_tokens", "draft_widths", "self_draft_calls", "self_draft_bytes",
        "target_pass_bytes", "self_draft_unskipped", "uncounted_calls", "uncounted_note", "mean_accepted", "accept_lengths", "proposed_lengths", "trace_error",
        "extras", "peak_mem_bytes", "method_state_bytes", "energy_j", "energy_per_token_j", "energy_source",
        "energy_unavailable_reason", "avg_power_w", "gpu_util_pct", "gpu_mem_used_peak_bytes",
        "process_gpu_mem_peak_bytes", "samples", "output_perplexity", "task_score", "task_metric",
        "lossless_check", "error", "traceback"],
}
_V1 = FIELDS_BY_VERSION[1]


def _with(fields: list[str], after: str, new: list[str]) -> list[str]:
    i = fields.index(after) + 1
    return fields[:i] + new + fields[i:]


# version 2 added fields only: who ran (decoder, policy), the item's metadata, the KV cache's bytes, and the
# likelihood group of loglikelihood suites
FIELDS_BY_VERSION[2] = _with(_with(_with(_V1, "state_note", ["decoder", "policy", "item_meta"]),
                                   "method_state_bytes", ["kv_cache_peak_bytes", "kv_cache_final_bytes"]),
                             "task_metric", ["token_nll", "scored_tokens", "words", "bytes", "token_perplexity",
                                             "word_perplexity", "byte_perplexity", "bits_per_byte"])
# version 3 added fields only: the model transform and its settings, the passes of a chunked prefill, what a
# cache policy holds beside the cache, each pass's scored tokens and log-likelihood, an evaluation's metrics
# (and the stop reason "stop", a stop sequence reached)
FIELDS_BY_VERSION[3] = _with(_with(_with(_with(_with(FIELDS_BY_VERSION[2], "policy", ["transform", "transform_settings"]),
                                               "target_calls", ["prefill_calls"]),
                                         "kv_cache_final_bytes", ["policy_state_bytes"]),
                                   "task_metric", ["metrics"]),
                             "bits_per_byte", ["window_tokens", "window_loglik"])


def test_a_renamed_field_is_a_schema_change():
    assert list(schema.FIELDS) == FIELDS_BY_VERSION[SCHEMA_VERSION], "changed fields: bump SCHEMA_VERSION"
    assert schema.KEY_FIELDS == ("method", "suite", "item_id", "turn", "repeat", "budget")
    assert schema.QUESTION_FIELDS == ("suite", "item_id")


def _record(**values) -> Record:
    record = Record(method="sps", suite="specbench", item_id="81", turn=1)
    record.update({"new_tokens": 3, "wall_s": 0.5, "output_ids": [1, 2, 3], "target_pass_s": [0.1, 0.2],
                   "extras": {"x": 1.0}, "method_state": "carry", "self_draft_bytes": [10, 20], **values})
    return record


def test_record_round_trips_and_checks_types():
    record = _record(lossless_check=LosslessCheck(reference="ar", equal=False, position=2, margin=0.1))
    raw = json.loads(json.dumps(record.to_json()))
    assert raw["schema_version"] == SCHEMA_VERSION and raw["lossless_check"]["position"] == 2
    assert Record.from_json(raw) == record
    assert record_key(record) == record_key(raw) == ("sps", "specbench", "81", 1, 0, "")
    with pytest.raises(SchemaError, match="no field 'wall_time'"):
        record.wall_time = 1.0  # a typo is not a new field
    with pytest.raises(SchemaError, match="no field 'tokens'"):
        record.update({"tokens": 3})
    for bad in ({"new_tokens": 2.5}, {"output_ids": [1, "2"]}, {"method_state": "warm"}, {"extras": {"x": "y"}},
                {"uncounted_calls": True}):
        with pytest.raises(SchemaError, match=f"{next(iter(bad))}="):
            _record(**bad).to_json()
    assert _record(wall_s=1).to_json()["wall_s"] == 1  # an int is a float


def test_store_writes_only_schema_records(tmp_path):
    store = ResultStore(tmp_path)
    store.append(_record())
    store.append({"method": "ar", "suite": "specbench", "item_id": "81", "new_tokens": 3})
    with pytest.raises(SchemaError, match="not in record schema"):
        store.append({"method": "ar", "suite": "specbench", "item_id": "82", "tokens": 3})
    with pytest.raises(SchemaError, match="new_tokens="):
        store.append({"method": "ar", "suite": "specbench", "item_id": "82", "new_tokens": "3"})
    records = read_records(tmp_path / "results.jsonl")
    assert [r["schema_version"] for r in records] == [SCHEMA_VERSION] * 2
    assert records[1]["uncounted_calls"] is None and records[1]["category"] == "uncategorized"


def test_legacy_records_read_with_defaults_and_unknown_versions_fail(tmp_path):
    legacy = {"method": "ar", "suite": "specbench", "category": "qa", "item_id": "q1", "turn": 0,
              "new_tokens": 4, "wall_s": 1.0, "verify_widths": [5, 1, 1, 1], "error": None}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(legacy) + "\n")
    (record,) = read_records(path)
    assert record["schema_version"] == schema.LEGACY_VERSION and "verify_widths" not in record
    assert record["subcategory"] is None and record["method_state"] is None and record["repeat"] == 0
    assert set(record) == set(schema.FIELDS)
    table = load_records(path)  # every field a column, numbers as numbers
    assert set(schema.FIELDS) <= set(table) and table["max_wall_s"].dtype.kind == "f"

    path.write_text(json.dumps({**legacy, "schema_version": SCHEMA_VERSION}) + "\n")
    with pytest.raises(SchemaError, match=f"verify_widths are not in record schema version {SCHEMA_VERSION}"):
        read_records(path)
    v1 = {k: v for k, v in legacy.items() if k != "verify_widths"}
    path.write_text(json.dumps({**v1, "schema_version": 1}) + "\n")  # version 1: the added fields at defaults
    (record,) = read_records(path)
    assert record["schema_version"] == 1 and record["policy"] is None and record["token_nll"] is None
    path.write_text(json.dumps({**legacy, "schema_version": 99}) + "\n")
    with pytest.raises(SchemaError, match=r"results.jsonl:1: written with record schema version 99"):
        read_records(path)


def test_manifest_versions(tmp_path):
    legacy = {"methods": {}, "settings": {"sampling": {}, "budgets": []}}
    (tmp_path / "manifest.json").write_text(json.dumps(legacy))
    (tmp_path / "results.jsonl").write_text("")
    # a run from before the schema cannot be resumed by this code: its records would be mixed with newer ones
    with pytest.raises(ManifestMismatch, match="record schema version 0"):
        write_manifest(tmp_path, RunConfig(), "cpu", {}, None, None)
    future = {**legacy, "schema_version": 99}
    (tmp_path / "manifest.json").write_text(json.dumps(future))
    with pytest.raises(SchemaError, match="manifest.json: written with record schema version 99"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2  # said as an error, not a traceback
    with pytest.raises(SchemaError, match="version 99"):
        config_from_manifest(future, str(tmp_path / "again"))
