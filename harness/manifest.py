"""manifest.json: everything needed to know, and redo, what a run did."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch

from harness.record import SCHEMA_VERSION, check_manifest
from harness.trackers import describe_energy_support

PACKAGES = ("decodebench", "torch", "transformers", "accelerate", "gguf", "tokenizers", "numpy", "pandas",
            "matplotlib", "rich", "psutil", "nvidia-ml-py")


class ManifestMismatch(RuntimeError):
    """The output folder holds a run with different settings; resuming would mix them."""


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda or ""
    return found


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} (cpu)"


def git_commit() -> dict:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def run_settings(cfg) -> dict:
    """The settings that make two runs comparable (everything but the method list and output folder)."""
    settings = asdict(cfg)
    settings.pop("methods")
    settings.pop("out")
    return settings


def _describe(method) -> dict:
    """A method's paper, needs and config; a DECODER[+POLICY][+TRANSFORM][+SCORER] composition: the decoder's,
    with each modifier's paper and config under "policy", "transform" and "scorer" (lossless: relative to `ar` on the same transform,
    and only if the policy is lossless and the transform acts on each token alone)."""
    decoder = getattr(method, "decoder", None)
    if decoder is None:
        return {**method.describe(), "config": asdict(method.config)}
    out = {**decoder.describe(), "config": asdict(decoder.config), "decoder": decoder.name, "lossless": method.lossless}
    for kind in ("policy", "transform", "scorer"):
        part = getattr(method, kind, None)
        if part is not None:
            out[kind] = {"name": part.name, **part.describe(), "config": asdict(part.config)}
    if getattr(method, "transform", None) is not None:
        out["transform"]["token_wise"] = method.transform.token_wise
    return out


def write_manifest(out: Path, cfg, device: str, methods: dict, target, draft, roofline: dict | None = None,
                   identity: dict | None = None, data: dict | None = None) -> dict:
    """Write (or update, on resume) the manifest. The settings were checked against the folder's before
    anything loaded (harness.runfolder); what only loading reveals is checked here: the record schema,
    and the hash of the weights actually loaded."""
    path = Path(out) / "manifest.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    settings = run_settings(cfg)
    if previous and check_manifest(previous, str(path)) != SCHEMA_VERSION:
        raise ManifestMismatch(f"{out} holds a run of record schema version {check_manifest(previous)}; this "
                               f"decodebench writes version {SCHEMA_VERSION}: use another --out to start a new run")
    for role, loaded in (("target", target), ("draft", draft)):
        then = ((previous or {}).get(role) or {}).get("weights_sha256")
        now = loaded.info.get("weights_sha256") if loaded else None
        if then and now and then != now:
            raise ManifestMismatch(f"{out} was run with other {role} weights ({role} {loaded.spec}: sha256 "
                                   f"{then[:12]}... then, {now[:12]}... now); use another --out or --force-new")
    described = dict(previous["methods"]) if previous else {}
    for name, method in methods.items():
        described[name] = _describe(method)
    manifest = {
        "schema_version": SCHEMA_VERSION,  # of the records in results.jsonl (harness/record.py)
        "name": Path(out).name,
        "created": previous["created"] if previous else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "suite": cfg.suite,
        "settings": settings,
        # the flat settings that make this folder's records comparable, checked before any later run
        # writes into it (harness/runfolder.py)
        "identity": identity if identity is not None else (previous or {}).get("identity"),
        "data": data or (previous or {}).get("data"),
        "sampling": asdict(cfg.sampling),
        "max_new_tokens": cfg.max_new_tokens,
        # stateful methods' state across items: carry (hot start, in run order) or fresh; see harness/methodstate.py
        "method_state": {"mode": cfg.method_state,
                         "stateful": sorted(name for name, d in described.items() if d.get("stateful"))},
        "target": target.info,
        "draft": draft.info if draft else None,
        "device": device_description(device),
        "energy": describe_energy_support(device),
        "roofline": (previous or {}).get("roofline") or roofline,  # measured when the run began
        "versions": versions(),
        "git": git_commit(),
        "methods": described,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, default=str))
    os.replace(tmp, path)
    return manifest
