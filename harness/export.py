"""`decodebench export`: a run's records as one Parquet or CSV file others can load without decodebench.

Parquet goes through pyarrow with an explicit Arrow schema derived from the record schema (harness/record.py):
int -> int64, float -> float64, str and Literal -> string, bool -> bool, list[int] -> list<int64> (and so on,
nested lists too), the lossless check (a dataclass with fixed fields) -> a struct of its fields. Fields that
are free-form dicts (item_meta, transform_settings, extras, metrics: their keys differ between records and
suites) are JSON strings, marked so in the field's Arrow metadata (decodebench.encoding=json). Every record of
results.jsonl is exported, failed ones included (their `error` says so), each with the record schema version
it was written with. The run's identity is in columns beside the record fields (run_name, run_device,
run_target, run_created, run_commit: several exports concatenate and stay apart) and the whole manifest is in
the file's metadata (key decodebench.manifest). CSV goes through pandas with the same columns, lists and
dicts as JSON strings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from harness import record as schema
from harness.results import read_records

FORMATS = ("parquet", "csv")
JSON_ENCODING = {b"decodebench.encoding": b"json"}
MANIFEST_KEY = b"decodebench.manifest"
# the run's identity, one column each: a row knows which run it came from after files are concatenated
RUN_COLUMNS = ("run_name", "run_device", "run_target", "run_created", "run_commit")


class ExportError(ValueError):
    """The run folder cannot be exported (no results), or the format or output is not one export writes."""


def arrow_type(hint: Any):
    """The Arrow type of one record field's type hint; None for a free-form dict (written as JSON text)."""
    import pyarrow as pa

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"no Arrow type for the union {hint}")
        return arrow_type(inner[0])
    if origin is Literal:
        kinds = {type(a) for a in args}
        if kinds != {str}:
            raise TypeError(f"no Arrow type for {hint}")
        return pa.string()
    if origin is list:
        return pa.list_(arrow_type(args[0]))
    if origin is dict or hint is Any:
        return None
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return pa.struct([pa.field(f.name, arrow_type(hints[f.name])) for f in dataclasses.fields(hint)])
    simple = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}
    if hint in simple:
        return simple[hint]
    raise TypeError(f"no Arrow type for {hint}")


def arrow_schema(manifest: dict | None = None):
    """The record schema as an Arrow schema, the run's columns after it; the manifest in its metadata."""
    import pyarrow as pa

    fields = []
    for name, hint in schema.HINTS.items():
        kind = arrow_type(hint)
        fields.append(pa.field(name, pa.string(), metadata=JSON_ENCODING) if kind is None else pa.field(name, kind))
    fields += [pa.field(name, pa.string()) for name in RUN_COLUMNS]
    metadata = {b"decodebench.record_schema_version": str(schema.SCHEMA_VERSION).encode()}
    if manifest:
        metadata[MANIFEST_KEY] = json.dumps(manifest, default=str).encode()
    return pa.schema(fields, metadata=metadata)


def json_fields() -> tuple[str, ...]:
    """The record fields written as JSON text (free-form dicts)."""
    return tuple(name for name, hint in schema.HINTS.items() if arrow_type(hint) is None)


def run_identity(run_dir: Path, manifest: dict) -> dict[str, str | None]:
    """The values of RUN_COLUMNS for one run folder."""
    target = manifest.get("target")
    return {
        "run_name": manifest.get("name") or run_dir.name,
        "run_device": manifest.get("device"),
        "run_target": target.get("spec") if isinstance(target, dict) else target,
        "run_created": manifest.get("created"),
        "run_commit": (manifest.get("git") or {}).get("commit"),
    }


def load_run(run_dir: str | Path) -> tuple[list[dict], dict]:
    """The run's records (as the current schema's fields) and its manifest ({} when it has none)."""
    run_dir = Path(run_dir)
    results = run_dir / "results.jsonl"
    if not results.is_file():
        raise ExportError(f"{run_dir} has no results.jsonl (is it a run folder?)")
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    if manifest:
        schema.check_manifest(manifest, str(manifest_path))
    return read_records(results), manifest


def rows(records: list[dict], identity: dict, as_json: tuple[str, ...]) -> list[dict]:
    """One row per record: the fields in `as_json` as JSON text, the run's columns added."""
    out = []
    for record in records:
        row = {name: record.get(name) for name in schema.FIELDS}
        for name in as_json:
            if row[name] is not None:
                row[name] = json.dumps(row[name], ensure_ascii=False)
        out.append({**row, **identity})
    return out


def to_arrow(run_dir: str | Path):
    """The run as a pyarrow Table with `arrow_schema`."""
    import pyarrow as pa

    records, manifest = load_run(run_dir)
    table_schema = arrow_schema(manifest)
    return pa.Table.from_pylist(rows(records, run_identity(Path(run_dir), manifest), json_fields()),
                                schema=table_schema)


def to_frame(run_dir: str | Path):
    """The run as a pandas DataFrame for CSV: every list and dict field as JSON text."""
    import pandas as pd

    records, manifest = load_run(run_dir)
    nested = tuple(name for name, hint in schema.HINTS.items() if not _scalar(arrow_type(hint)))
    table = rows(records, run_identity(Path(run_dir), manifest), nested)
    return pd.DataFrame(table, columns=[*schema.FIELDS, *RUN_COLUMNS])


def _scalar(kind) -> bool:
    """One value per cell (CSV writes it as it is); lists, structs and free-form dicts are JSON text there."""
    import pyarrow as pa

    return kind is not None and not pa.types.is_nested(kind)


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> tuple[Path, int]:
    """Write the run's records to `out` (default RUN/results.parquet or RUN/results.csv); returns the path
    and the number of records. Written to a temporary file and renamed: a reader never sees half a file."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    path = Path(out) if out else run_dir / f"results.{fmt}"
    if path.is_dir():
        raise ExportError(f"--out {path} is a folder; name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = to_arrow(run_dir)
        pq.write_table(table, tmp)
        count = table.num_rows
    else:
        frame = to_frame(run_dir)
        frame.to_csv(tmp, index=False)
        count = len(frame)
    os.replace(tmp, path)
    return path, count
