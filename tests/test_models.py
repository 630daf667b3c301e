"""Loader error cases, the embedded-model assembly checks, and the tokenizer check."""
from __future__ import annotations

import hashlib
import importlib.util

import pytest

from harness import models
from harness.models import EmbeddedModel, ModelError


def test_missing_paths_are_clear_errors(tmp_path, cache_dir):
    with pytest.raises(ModelError, match="GGUF file .* not found"):
        models.resolve(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        models.resolve(str(tmp_path / "empty"))


def test_hub_ids_are_recognised_without_network():
    assert models.resolve("Qwen/Qwen2.5-0.5B-Instruct") == ("hub", "Qwen/Qwen2.5-0.5B-Instruct")


def test_uninstalled_embedded_model_names_the_install_command(monkeypatch, cache_dir):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="decodebench models install qwen2.5-coder-0.5b"):
        models.load("qwen2.5-coder-0.5b")


def fake_embedded(tmp_path, monkeypatch, chunks: list[bytes], sha: str | None = None) -> EmbeddedModel:
    """An embedded model whose parts are files in a fake installed package."""
    package = tmp_path / "fakepkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for i, chunk in enumerate(chunks, start=1):
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path))
    whole = b"".join(chunks)
    return EmbeddedModel("fake", "test", ("fakepkg==1",),
                         tuple(("fakepkg", f"data/part{i:02d}.bin") for i in range(1, len(chunks) + 1)),
                         len(whole), sha or hashlib.sha256(whole).hexdigest())


def test_assembly_checks_size_and_hash(tmp_path, monkeypatch):
    good = fake_embedded(tmp_path, monkeypatch, [b"abc", b"def"])
    out = tmp_path / "out"
    out.mkdir()
    assert models._assemble(good, out).read_bytes() == b"abcdef"

    wrong_hash = EmbeddedModel(**{**good.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelError, match="sha256"):
        models._assemble(wrong_hash, out)
    wrong_size = EmbeddedModel(**{**good.__dict__, "size": 99})
    with pytest.raises(ModelError, match="expected 99"):
        models._assemble(wrong_size, out)


def test_missing_part_is_reported(tmp_path, monkeypatch):
    m = fake_embedded(tmp_path, monkeypatch, [b"abc", b"def"])
    (tmp_path / "fakepkg" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelError, match="part .*part02.bin is missing"):
        models._part_paths(m)


def test_local_folder_loads_and_records_a_fingerprint(model_dirs, cache_dir):
    loaded = models.load(model_dirs[0])
    assert loaded.info["kind"] == "folder" and len(loaded.info["fingerprint"]) == 64
    assert loaded.model.config.num_hidden_layers == 2


def test_mismatched_tokenizers_are_refused(model_dirs, tmp_path, cache_dir):
    from transformers import AutoTokenizer

    target = models.load(model_dirs[0])
    other = models.load(model_dirs[1])
    models.check_same_tokenizer(target, other)  # same vocabulary: fine
    tok = AutoTokenizer.from_pretrained(model_dirs[1])
    tok.add_tokens(["zebra"])
    other.tokenizer = tok
    with pytest.raises(ModelError, match="do not share a tokenizer"):
        models.check_same_tokenizer(target, other)


def test_cache_root_follows_env(cache_dir):
    assert models.cache_root() == cache_dir


def test_unknown_dtype_is_an_error():
    with pytest.raises(ModelError, match="unknown dtype"):
        models.pick_dtype("float8", "cpu")


@pytest.mark.integration
def test_embedded_smollm_loads_from_cache_and_generates():
    """The smallest real model: conversion cache, chat template, ar == transformers generate."""
    if not models.installed(models.EMBEDDED["smollm2-135m"]):
        pytest.skip("smollm2-135m not installed: decodebench models install smollm2-135m")
    from harness.runner import encode_chat
    from methods.base import DecodeContext, Sampling, get_method

    loaded = models.load("smollm2-135m")
    assert loaded.info["sha256"] == models.EMBEDDED["smollm2-135m"].sha256
    ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": "Name three colours."}])
    outputs = {}
    for name in ("ar", "hf_generate", "pld"):
        ctx = DecodeContext(prompt_ids=ids, target=loaded.model, sampling=Sampling(), max_new_tokens=16,
                            eos_token_ids=models.eos_ids(loaded))
        outputs[name] = get_method(name)().generate(ctx)
    assert len(outputs["ar"]) > 3
    assert outputs["ar"] == outputs["hf_generate"] == outputs["pld"]
