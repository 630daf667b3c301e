"""`decodebench selfcheck`: validate decodebench on this device in one short command, and bring back the figures.

Random-weight models of the embedded architectures (harness/archs.py: a pass costs what the real model's does)
run through the ordinary runner on a few built-in prompts (one specbench run, in OUT/run), and each check reads
what that run recorded:
- timing: `ar`'s per-pass times (CUDA events on a GPU, perf_counter on a CPU) summed against its synchronised
  wall time; the prefill/decode split;
- nvml: energy (counter or integrated power), memory, utilisation, and the sampler's own cost (GPU only);
- lossless: every lossless method's greedy output against `ar`'s on this device and dtype, a divergence classed
  as the runner does (a numerical tie, or a mismatch: a failure);
- peers: `ar` against transformers' generate, `sps` against assisted generation, tokens/s in the same run;
- host_overhead: time outside forward passes per target pass, every method (harness/hostcost.py);
- profile: latency by width x context of the embedded architectures, saved as OUT/profile-<device>.json,
  which `decodebench report RUN --profile` reads;
- report: the run's report built with that profile.
It writes OUT/selfcheck.json and OUT/selfcheck.md. Beyond torch, transformers and numpy every import is lazy:
what is missing makes a check skip, with the reason.

Random weights give nearly tied logits, and a random draft never agrees with a random target; so the pair is
shaped (`agreeable_pair`): the draft is the target's first layers, the target's later layers add a damped
correction, and the LM head's rows get log-normal norms (peaked logits). The draft then agrees often, not
always, and the outputs vary.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from harness import archs, costmodel
from harness.console import make_console, progress

PROMPTS = ("Explain in two sentences why the sky looks blue during the day.",
           "Write a short Python function that returns the factorial of n.",
           "Summarize a story about a robot who learns to paint.")
INIT_STD = 0.06  # the configs' 0.02 makes a random model repeat one token
HEAD_SPREAD = 0.5  # log-normal spread of the LM head rows' norms
MAX_RATIO = 1.02  # `ar`: its pass times may add up to its wall time (timer noise), never more


@dataclass(frozen=True)
class Plan:
    """What a selfcheck runs on one kind of device."""

    arch: str  # the target's architecture (harness/arch_configs)
    shape: dict  # config changes (the quick CPU variant's smaller model); {}: the architecture itself
    draft_layers: int  # the draft is the target's first layers
    tail_scale: float  # the target's later layers add this fraction of their output (the draft then agrees often)
    items: int
    max_new_tokens: int
    profile_draft: str | None  # the draft architecture profiled; None: the pair's own draft
    widths: tuple[int, ...]
    contexts: tuple[int, ...]
    repeats: int
    # `ar`'s pass times over its wall time, at least: a real-size model's passes are nearly all of it; the quick
    # variant's tiny passes leave a larger share to the host (and to a loaded machine's scheduling)
    min_ratio: float = 0.90


def plan(device: str, quick: bool) -> Plan:
    if device.startswith("cuda"):  # the embedded Qwen pair's shapes
        if quick:
            return Plan("qwen2.5-coder-1.5b", {}, 4, 0.15, 2, 32, "qwen2.5-coder-0.5b", (1, 4, 16), (128, 512), 3)
        return Plan("qwen2.5-coder-1.5b", {}, 4, 0.15, 3, 64, "qwen2.5-coder-0.5b", costmodel.WIDTHS,
                    costmodel.CONTEXTS, 5)
    if quick:  # a test of the path: SmolLM2's width, 4 layers, a smaller vocabulary
        return Plan("smollm2-135m", {"num_hidden_layers": 4, "vocab_size": 8192}, 1, 0.2, 1, 12, None, (1, 4), (32,), 1,
                    min_ratio=0.70)
    return Plan("smollm2-135m", {}, 4, 0.15, 2, 24, None, (1, 2, 4, 8, 16, 32), (128, 512), 2)


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    reason: str
    figures: dict = field(default_factory=dict)


# ------------------------------------------------------------------ models


def agreeable_pair(arch: str, shape: dict, draft_layers: int, device: str, dtype, tail_scale: float, seed: int = 0):
    """A random-weight target of `arch` (with `shape`'s changes) and a draft made of its first `draft_layers`
    layers (a copy: no module is shared, so each model's hooks see only its own passes)."""
    target = archs.build(arch, device, dtype, seed, initializer_range=INIT_STD, **shape)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head = target.get_output_embeddings().weight
        norms = torch.exp(HEAD_SPREAD * torch.randn(head.shape[0], 1, generator=generator))
        head.mul_(norms.to(head.device, head.dtype))
        for layer in target.model.layers[draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(tail_scale)
            layer.mlp.down_proj.weight.mul_(tail_scale)
    layers = target.model.layers
    target.model.layers = layers[:draft_layers]  # so that the copy holds only the draft's layers
    try:
        draft = copy.deepcopy(target)
    finally:
        target.model.layers = layers
    draft.config.num_hidden_layers = draft_layers
    if isinstance(getattr(draft.config, "layer_types", None), list):
        draft.config.layer_types = draft.config.layer_types[:draft_layers]
    for model in (target, draft):
        model.generation_config.eos_token_id = None  # no end of sequence: every method writes to the limit
    return target, draft


def _loaded(label: str, model, dtype, device: str, how: str):
    from harness.models import LoadedModel

    info = {"spec": label, "kind": "architecture", "weights": how, "source": str(archs.FOLDER),
            "dtype": str(dtype).removeprefix("torch."), "device": device,
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_position_embeddings": getattr(model.config, "max_position_embeddings", None)}
    return LoadedModel(label, model, archs.ByteTokenizer(), info)


def _shape_label(arch: str, shape: dict) -> str:
    return arch + "".join(f", {k}={v}" for k, v in shape.items())


# ------------------------------------------------------------------ the run


def lossless_methods(only: list[str] | None = None) -> list[str]:
    """`ar` first, then every registered lossless decoder that needs no trained parts (of `only`, if given)."""
    from methods.base import get_method, registry

    for name in only or []:
        if not get_method(name).lossless:
            raise ValueError(f"selfcheck --methods: {name} is not lossless (selfcheck compares lossless methods with ar)")
    return ["ar"] + [n for n, c in registry().items()
                     if c.lossless and not c.needs.trained and n != "ar" and (only is None or n in only)]


def _fresh_run_dir(path: Path) -> Path:
    """OUT/run, emptied when it holds a previous selfcheck's run; anything else there is refused."""
    if path.exists():
        if any(path.iterdir()) and not (path / "manifest.json").is_file():
            raise FileExistsError(f"{path} exists and holds no run: move it away, or use another --out")
        shutil.rmtree(path)
    return path


def _run(out: Path, device: str, dtype, plan_: Plan, target, draft, methods: list[str], console):
    from harness.results import read_records
    from harness.runner import RunConfig, Runner

    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question_id": f"selfcheck-{i}", "category": "mt_bench", "turns": [p]}) + "\n"
                            for i, p in enumerate(PROMPTS[: plan_.items])))
    cfg = RunConfig(suite="specbench", methods=methods, target=target.spec, draft=draft.spec,
                    data=str(data), max_new_tokens=plan_.max_new_tokens, device=device,
                    dtype=str(dtype).removeprefix("torch."), out=str(_fresh_run_dir(out / "run")))
    runner = Runner(cfg, console, models={"target": target, "draft": draft})
    runner.run()
    runner.detach()
    return runner, read_records(Path(cfg.out) / "results.jsonl")


# ------------------------------------------------------------------ checks


def _ok(records: list[dict], method: str) -> list[dict]:
    return [r for r in records if r["method"] == method and not r.get("error")]


def check_timing(records: list[dict], device: str, min_ratio: float = 0.90) -> Check:
    ar = _ok(records, "ar")
    if not ar:
        return Check("timing", "fail", "ar produced no record without an error")
    wall = sum(r["wall_s"] for r in ar)
    passes = sum(sum(r["target_pass_s"]) for r in ar)
    ratio = passes / wall
    first = max(r["target_pass_s"][0] / r["prefill_s"] for r in ar)
    split = max(abs(r["prefill_s"] + r["decode_s"] - r["wall_s"]) for r in ar)
    figures = {"timer": "CUDA events" if device.startswith("cuda") else "perf_counter", "records": len(ar),
               "wall_s": wall, "passes_s": passes, "passes_over_wall": ratio,
               "prefill_s": statistics.fmean(r["prefill_s"] for r in ar),
               "decode_ms_per_token": 1000 * statistics.fmean(r["decode_s"] / max(1, r["new_tokens"] - 1) for r in ar),
               "first_pass_over_prefill_max": first, "prefill_plus_decode_minus_wall_max_s": split}
    problems = []
    if not min_ratio <= ratio <= MAX_RATIO:
        problems.append(f"ar's pass times add up to {ratio:.3f} of its wall time (expected {min_ratio}-{MAX_RATIO})")
    if first > 1.02:
        problems.append(f"a first pass lasted {first:.3f} x the prefill time that contains it")
    if split > 1e-6:
        problems.append(f"prefill + decode differs from wall by {split:.2e} s")
    said = (f"ar: passes ({figures['timer']}) sum to {ratio:.3f} of synchronised wall time; prefill "
            f"{figures['prefill_s'] * 1000:.1f} ms, decode {figures['decode_ms_per_token']:.2f} ms/token")
    return Check("timing", "fail" if problems else "pass", "; ".join(problems) or said, figures)


def check_nvml(records: list[dict], device: str) -> Check:
    ar = _ok(records, "ar")
    if not device.startswith("cuda"):
        energy = (ar[0].get("energy_source") or ar[0].get("energy_unavailable_reason")) if ar else None
        memory = ar[0].get("peak_mem_bytes") if ar else None
        return Check("nvml", "skip", f"no CUDA device (NVML reads GPUs); on this CPU, energy: {energy}; peak RSS: "
                                     + (f"{memory / 2**20:.0f} MiB" if memory else "not measured"),
                     {"energy_source": energy, "peak_mem_bytes": memory})
    if not ar:
        return Check("nvml", "fail", "ar produced no record without an error")
    r = ar[-1]
    keys = ("energy_j", "energy_source", "avg_power_w", "gpu_util_pct", "gpu_mem_used_peak_bytes",
            "process_gpu_mem_peak_bytes", "samples", "tracker_s", "peak_mem_bytes", "energy_unavailable_reason")
    figures = {k: r.get(k) for k in keys}
    figures["tracker_share_of_wall"] = r["tracker_s"] / r["wall_s"] if r.get("tracker_s") is not None else None
    figures.update(_sampler_cost(device))
    if r.get("energy_j") is None and "no NVML" in (r.get("energy_unavailable_reason") or ""):
        return Check("nvml", "skip", r["energy_unavailable_reason"], figures)
    missing = [k for k in ("energy_j", "gpu_mem_used_peak_bytes", "gpu_util_pct") if r.get(k) is None]
    said = (f"{r['energy_j'] or 0:.2f} J ({r['energy_source']}), utilisation {r.get('gpu_util_pct')}%, "
            f"device memory peak {(r.get('gpu_mem_used_peak_bytes') or 0) / 2**30:.2f} GiB; sampler "
            f"{figures.get('sampler_ms_per_sample', math.nan):.2f} ms a reading, trackers "
            f"{100 * (figures['tracker_share_of_wall'] or 0):.2f}% of wall")
    if missing:
        return Check("nvml", "fail", f"NVML gave no {', '.join(missing)} ({r.get('energy_unavailable_reason')})", figures)
    return Check("nvml", "pass", said, figures)


def _sampler_cost(device: str, readings: int = 20) -> dict:
    """What one NVML reading (power, memory, utilisation, this process's memory) costs the host."""
    from harness.trackers import EnergyTracker

    tracker = EnergyTracker(device)
    if tracker._nvml is None:
        return {}
    start = time.perf_counter()
    for _ in range(readings):
        tracker._sample()
    return {"sampler_ms_per_sample": 1000 * (time.perf_counter() - start) / readings,
            "sampler_interval_s": tracker.interval}


def check_lossless(records: list[dict], methods: list[str], tie_share: float | None, epsilon: float) -> Check:
    per, failures, skipped = {}, [], []
    for name in methods[1:]:
        rows = [r for r in records if r["method"] == name]
        row = {"equal": 0, "ties": [], "mismatches": [], "errors": [], "unchecked": 0,
               "mean_accepted": _mean([r.get("mean_accepted") for r in rows if not r.get("error")])}
        for r in rows:
            check = r.get("lossless_check")
            if r.get("error"):
                (skipped if "ModuleNotFoundError" in r["error"] else row["errors"]).append(r["error"])
            elif check is None:
                row["unchecked"] += 1
            elif check["equal"]:
                row["equal"] += 1
            else:
                where = {"item": r["item_id"], "position": check["position"], "relative_margin": check["relative_margin"]}
                row["ties" if check["numerical_tie"] else "mismatches"].append(where)
        per[name] = row
        if row["mismatches"] or row["errors"] or row["unchecked"]:
            failures.append(name)
    if not per:
        return Check("lossless", "skip", "--methods names no lossless method besides ar")
    ties = [n for n, row in per.items() if row["ties"]]
    figures = {"methods": per, "tie_epsilon": epsilon, "ar_tie_prone_share": tie_share}
    clean = [n for n, row in per.items() if row["equal"] and not (row["ties"] or row["mismatches"] or row["errors"])]
    said = (f"{len(clean)} of {len(per)} methods equal to ar on every prompt"
            + (f"; numerical ties in {', '.join(ties)}" if ties else "")
            + (f"; {tie_share:.0%} of ar's tokens have a top-2 margin under the tie epsilon {epsilon:.2g}"
               if tie_share is not None else ""))
    if skipped:
        said += f"; skipped for a missing package: {skipped[0]}"
    if failures:
        detail = "; ".join(f"{n}: " + ", ".join(
            [f"mismatch at {m['position']} (margin {m['relative_margin']:.2g})" for m in per[n]["mismatches"]]
            + per[n]["errors"] + (["no lossless check recorded"] if per[n]["unchecked"] else [])) for n in failures)
        return Check("lossless", "fail", detail, figures)
    return Check("lossless", "pass", said, figures)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def check_peers(records: list[dict], methods: list[str]) -> Check:
    pairs = [(ours, theirs) for ours, theirs in (("ar", "hf_generate"), ("sps", "hf_assisted"))
             if ours in methods and theirs in methods]
    if not pairs:
        return Check("peers", "skip", "--methods names no peer pair (hf_generate for ar, sps with hf_assisted)")
    speeds = {m: _mean([r.get("tokens_per_s") for r in _ok(records, m)]) for pair in pairs for m in pair}
    missing = [m for m, s in speeds.items() if s is None]
    if missing:
        return Check("peers", "fail", f"no tokens/s for {', '.join(missing)}", {"tokens_per_s": speeds})
    ratios = {f"{ours}/{theirs}": speeds[ours] / speeds[theirs] for ours, theirs in pairs}
    said = "; ".join(f"{ours} {speeds[ours]:.1f} vs {theirs} {speeds[theirs]:.1f} tokens/s (x{ratios[f'{ours}/{theirs}']:.2f})"
                     for ours, theirs in pairs)
    return Check("peers", "pass", said, {"tokens_per_s": speeds, "ratios": ratios})


def check_host_overhead(records: list[dict], methods: list[str]) -> Check:
    from harness.hostcost import HostCost

    per = {}
    for name in methods:
        costs = [HostCost.from_record(r) for r in _ok(records, name)]
        if costs:
            per[name] = {"host_ms_per_target_pass": statistics.median(c.host_ms_per_target_pass for c in costs),
                         "target_calls": sum(c.target_calls for c in costs),
                         "forward_share_of_wall": sum(c.forward_s for c in costs) / sum(c.wall_s for c in costs)}
    if not per:
        return Check("host_overhead", "fail", "no method produced a record without an error")
    worst = max(per, key=lambda n: per[n]["host_ms_per_target_pass"])
    said = (f"{len(per)} methods; ar {per.get('ar', {}).get('host_ms_per_target_pass', math.nan):.2f} ms per target "
            f"pass, most: {worst} {per[worst]['host_ms_per_target_pass']:.2f} ms")
    return Check("host_overhead", "pass", said, {"methods": per})


def check_profile(out: Path, device: str, plan_: Plan, target, draft, dtype, bar) -> tuple[Check, Path | None]:
    from harness.manifest import device_description

    labels = {"target": f"{_shape_label(plan_.arch, plan_.shape)} (architecture, random weights)"}
    builders = {"target": lambda: target}
    if plan_.profile_draft:
        labels["draft"] = f"{plan_.profile_draft} (architecture, random weights)"
        builders["draft"] = lambda: archs.build(plan_.profile_draft, device, dtype)
    else:
        labels["draft"] = f"{labels['target'].split(' (')[0]}, first {plan_.draft_layers} layers (random weights)"
        builders["draft"] = lambda: draft
    tables, roof = costmodel.profile(builders, device, plan_.widths, plan_.contexts, plan_.repeats, bar)
    path = out / f"profile-{device_slug(device)}.json"
    costmodel.save_profile(path, device_description(device), tables, labels, roof)
    loaded = costmodel.load_profile(path)["tables"]
    cells = [s for table in loaded.values() for row in table.seconds for s in row]
    figures = {"file": str(path), "models": labels,
               "one_token_ms": {role: {str(c): 1000 * row[0] for c, row in zip(t.contexts, t.seconds)}
                                for role, t in loaded.items()},
               "read_bandwidth_gb_s": roof["device"]["read_bandwidth_bytes_s"] / 1e9,
               "matmul_tflop_s": roof["device"]["matmul_flops_s"] / 1e12}
    if not all(math.isfinite(s) and s > 0 for s in cells):
        return Check("profile", "fail", f"{path}: a cell is not a positive time", figures), None
    t = loaded["target"]
    said = (f"{path.name}: target {t.seconds[0][0] * 1000:.2f} ms at width {t.widths[0]}, "
            f"{t.seconds[0][-1] * 1000:.2f} ms at width {t.widths[-1]} (context {t.contexts[0]})")
    return Check("profile", "pass", said, figures), path


def check_report(run_dir: Path, profile: Path | None) -> Check:
    try:
        from harness.report import build_report
    except ImportError as err:
        return Check("report", "skip", f"the report needs a package missing here: {err}")
    if profile is None:
        return Check("report", "skip", "no profile to predict with")
    folder = build_report(run_dir, profile=[profile])
    text = (folder / "report.md").read_text()
    if "Predicted on" not in text:
        return Check("report", "fail", f"{folder / 'report.md'} has no predicted column for {profile.name}")
    return Check("report", "pass", f"{folder / 'report.md'}, with the speed-up predicted from {profile.name}",
                 {"report": str(folder / "report.md")})


def device_slug(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def tie_prone_share(runner, records: list[dict], epsilon: float) -> float | None:
    """Of `ar`'s output tokens, the share whose top-2 logit margin (relative, as the runner classes a
    divergence) is under the tie epsilon: how many positions a numerical tie could flip."""
    from harness.runner import encode_chat

    items = {item.item_id: item for item in runner.items}
    model, below, total = runner.target.model, 0, 0
    for r in _ok(records, "ar"):
        prompt = encode_chat(runner.target.tokenizer, items[r["item_id"]].messages(0, []))
        ids = torch.tensor([prompt + r["output_ids"]], device=model.device)
        with torch.inference_mode():
            logits = model(ids, logits_to_keep=len(r["output_ids"]) + 1).logits[0, :-1].float()
        top = torch.topk(logits, 2, dim=-1).values
        relative = (top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp(min=1e-6)
        below += int((relative < epsilon).sum())
        total += len(r["output_ids"])
    return below / total if total else None


# ------------------------------------------------------------------ the command


def selfcheck(device: str = "auto", out: str | Path = "runs/selfcheck", quick: bool = False, dtype: str = "auto",
              methods: list[str] | None = None, console=None) -> dict:
    """Run every check; write OUT/selfcheck.json and OUT/selfcheck.md; return the JSON's content. `methods`:
    the lossless methods compared with `ar` (default: every one registered)."""
    from harness.models import pick_dtype
    from harness.runner import TIE_EPSILON, resolve_device

    console = console or make_console()
    start = time.perf_counter()
    device = resolve_device(device)
    torch_dtype = pick_dtype(dtype, device)
    names = lossless_methods(methods)  # an unknown or lossy name fails before any model is built
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = plan(device, quick)
    console.print(f"selfcheck on {device} ({str(torch_dtype).removeprefix('torch.')}): {p.arch} "
                  f"{'(quick) ' if quick else ''}random weights, draft = its first {p.draft_layers} layers")
    target_model, draft_model = agreeable_pair(p.arch, p.shape, p.draft_layers, device, torch_dtype, p.tail_scale)
    how = f"random (seed 0, init std {INIT_STD}, later layers x{p.tail_scale}, head row norms log-normal {HEAD_SPREAD})"
    label = _shape_label(p.arch, p.shape)
    target = _loaded(f"{label} (random weights)", target_model, torch_dtype, device, how)
    draft = _loaded(f"{label}, first {p.draft_layers} layers (random weights)", draft_model, torch_dtype, device, how)
    runner, records = _run(out, device, torch_dtype, p, target, draft, names, console)
    epsilon = TIE_EPSILON.get(target.info["dtype"], 1e-5)
    checks = [check_timing(records, device, p.min_ratio), check_nvml(records, device),
              check_lossless(records, names, tie_prone_share(runner, records, epsilon), epsilon),
              check_peers(records, names), check_host_overhead(records, names)]
    with progress(console) as bar:
        profile_check, profile = check_profile(out, device, p, target_model, draft_model, torch_dtype, bar)
    checks += [profile_check, check_report(runner.out, profile)]
    from harness.manifest import device_description

    result = {"device": device_description(device), "quick": quick, "dtype": target.info["dtype"],
              "plan": asdict(p), "models": {"target": target.info, "draft": draft.info},
              "run": str(runner.out), "wall_s": time.perf_counter() - start,
              "summary": {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")},
              "checks": [asdict(c) for c in checks], "packages": _packages()}
    (out / "selfcheck.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "selfcheck.md").write_text(markdown(result))
    return result


def _packages() -> dict[str, str | None]:
    """What decodebench can import here, with its version; None where a module cannot be imported (then the
    checks that need it skip)."""
    import importlib.util
    from importlib import metadata

    found = {}
    for module, dist in (("torch", "torch"), ("transformers", "transformers"), ("numpy", "numpy"),
                         ("pandas", "pandas"), ("matplotlib", "matplotlib"), ("jinja2", "jinja2"), ("rich", "rich"),
                         ("psutil", "psutil"), ("pynvml", "nvidia-ml-py"), ("filelock", "filelock"),
                         ("platformdirs", "platformdirs")):
        if importlib.util.find_spec(module) is None:
            found[module] = None
            continue
        try:
            found[module] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[module] = "(version unknown)"
    return found


def markdown(result: dict) -> str:
    summary, models = result["summary"], result["models"]
    lines = [f"# decodebench selfcheck: {result['device']}", "",
             (f"{summary['pass']} passed, {summary['fail']} failed, {summary['skip']} skipped in {result['wall_s']:.0f} s; "
              f"dtype {result['dtype']}; run folder `{result['run']}`."), "",
             (f"Target: {models['target']['spec']}; draft: {models['draft']['spec']}; weights "
              f"{models['target']['weights']}."), "",
             "| Check | Status | Reason |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['reason']} |" for c in result["checks"]]
    for c in result["checks"]:
        if c["figures"]:
            lines += ["", f"## {c['name']}", "", "```json", json.dumps(c["figures"], indent=1, default=str), "```"]
    missing = [n for n, v in result["packages"].items() if v is None]
    lines += ["", "Packages absent here: " + (", ".join(missing) or "none") + "."]
    return "\n".join(lines) + "\n"
