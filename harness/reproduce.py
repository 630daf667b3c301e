"""Re-run a run from its manifest and say what changed: outputs, harness counts, speed, environment."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.instrument import Budget
from harness.record import Counts, check_manifest, group_fields
from harness.results import first_difference, read_records, record_key
from harness.runner import RunConfig
from harness.tables import bootstrap_interval
from methods.base import Sampling

# what must not change when the outputs do not: the hooks' counts (a count is exact, not a timing)
COUNTS = ("new_tokens", *group_fields(Counts, int))


class ReproduceError(ValueError):
    """The runs cannot be compared: nothing to compare with, the run itself, or other input."""


def prepare(original: Path, out: Path) -> tuple[Path, RunConfig]:
    """The original run's folder and the config that redoes it into `out`; ReproduceError when a comparison
    could not mean anything."""
    folder = original if original.is_dir() else original.parent
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ReproduceError(f"{folder} holds no manifest.json: not a decodebench run folder")
    if out.resolve() == folder.resolve():
        raise ReproduceError(f"--out is the original run itself ({folder}): give a new folder to compare with")
    if not any(not r.get("error") for r in read_records(folder / "results.jsonl")):
        raise ReproduceError(f"{folder} has no results to compare with (no successful record in results.jsonl)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as err:
        raise ReproduceError(f"{manifest_path} is not valid JSON ({err})") from None
    return folder, config_from_manifest(manifest, str(out))


def check_data(original: Path, data: dict) -> None:
    """The suite data must be what the original run read (its hash, when the original recorded one)."""
    then = (json.loads((original / "manifest.json").read_text()).get("data") or {}).get("sha256")
    if then and then != data["sha256"]:
        raise ReproduceError(f"the suite data changed since the original run ({data['path'] or 'built-in data'}: "
                             f"sha256 {then[:12]}... then, {data['sha256'][:12]}... now); the outputs cannot be "
                             "compared")


def config_from_manifest(manifest: dict, out: str) -> RunConfig:
    check_manifest(manifest)  # an unknown schema version is an error before anything runs
    settings = dict(manifest["settings"])
    settings["sampling"] = Sampling(**settings["sampling"])
    settings["budgets"] = [Budget(**b) for b in settings["budgets"]]
    methods = list(manifest["methods"])
    # the manifest holds each method's full config; pass it as overrides so defaults changed since cannot drift in
    overrides: dict[str, dict] = {}
    for name, described in manifest["methods"].items():  # a composition: decoder and policy, each by its name
        overrides[described.get("decoder", name)] = described.get("config", {})
        if described.get("policy"):
            overrides[described["policy"]["name"]] = described["policy"].get("config", {})
    settings["settings"] = overrides
    return RunConfig(**settings, methods=methods, out=out)


@dataclass
class Comparison:
    output_diffs: list[dict] = field(default_factory=list)  # same settings, different tokens
    count_diffs: list[dict] = field(default_factory=list)  # same tokens, different harness counts
    speed: list[dict] = field(default_factory=list)  # per method: tokens/s then and now, ratio interval
    environment: list[str] = field(default_factory=list)
    missing: list[tuple] = field(default_factory=list)
    compared: int = 0  # records present in both runs

    @property
    def identical_outputs(self) -> bool:
        return not self.output_diffs and not self.missing


def compare_runs(old_dir: Path, new_dir: Path) -> Comparison:
    old = {record_key(r): r for r in read_records(Path(old_dir) / "results.jsonl") if not r.get("error")}
    new = {record_key(r): r for r in read_records(Path(new_dir) / "results.jsonl") if not r.get("error")}
    result = Comparison(missing=sorted(set(old) - set(new)), compared=len(set(old) & set(new)))
    speeds: dict[str, list[tuple[float, float]]] = {}
    for key in sorted(set(old) & set(new)):
        before, after = old[key], new[key]
        if before["output_ids"] != after["output_ids"]:
            result.output_diffs.append({"key": key, "position": first_difference(before["output_ids"], after["output_ids"])})
        else:
            changed = {c: (before.get(c), after.get(c)) for c in COUNTS if before.get(c) != after.get(c)}
            if changed:
                result.count_diffs.append({"key": key, "changed": changed})
        if before.get("tokens_per_s") and after.get("tokens_per_s"):
            speeds.setdefault(key[0], []).append((before["tokens_per_s"], after["tokens_per_s"]))
    for method, pairs in speeds.items():
        then, now = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        low, high = bootstrap_interval(now, then)
        ratio = now.mean() / then.mean()
        result.speed.append({"method": method, "then": then.mean(), "now": now.mean(), "ratio": ratio,
                             "low": low, "high": high, "within_noise": bool(low <= 1.0 <= high) if not math.isnan(low) else None})
    result.environment = _environment_diff(Path(old_dir) / "manifest.json", Path(new_dir) / "manifest.json")
    return result


def _environment_diff(old_path: Path, new_path: Path) -> list[str]:
    old, new = json.loads(old_path.read_text()), json.loads(new_path.read_text())
    lines = []
    versions = check_manifest(old, str(old_path)), check_manifest(new, str(new_path))
    if versions[0] != versions[1]:
        lines.append(f"record schema version: {versions[0]} -> {versions[1]}")
    for section in ("versions", "git"):
        for name in sorted(set(old.get(section, {})) | set(new.get(section, {}))):
            a, b = old.get(section, {}).get(name), new.get(section, {}).get(name)
            if a != b:
                lines.append(f"{section}.{name}: {a} -> {b}")
    for name in ("device",):
        if old.get(name) != new.get(name):
            lines.append(f"{name}: {old.get(name)} -> {new.get(name)}")
    for role in ("target", "draft"):
        for key, what in (("sha256", "source sha256"), ("weights_sha256", "loaded weights sha256")):
            a, b = (old.get(role) or {}).get(key), (new.get(role) or {}).get(key)
            if a != b:
                lines.append(f"{role} {what}: {a} -> {b}")
    return lines
