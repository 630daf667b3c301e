"""Converted-model caches that cannot lie (issue 12, findings 2 and 8): per-file hashes verified on
load, damage named and rebuilt (or a ModelError with the fix), no raw SafetensorError, per-entry locks
and no orphan temp folders, trust_remote_code never asked on stdin, and weights_sha256 in the info.

The caches here are real cache entries built by the real code path (harness.modelcache.ensure via
models.prepare_embedded) for a fake embedded model whose "conversion" copies a tiny saved model."""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from harness import modelcache, models
from harness.models import ModelError
from tests.test_models import fake_embedded

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test sees the cache as a new process would: nothing verified yet."""
    monkeypatch.setattr(modelcache, "_verified", set())
    monkeypatch.setattr(modelcache, "_file_hashes", {})


@pytest.fixture
def fake(tmp_path, monkeypatch, model_dirs, cache_dir):
    """An installed two-part embedded model 'fake' whose conversion copies the tiny target folder;
    `fake.conversions` counts the conversions that ran."""
    m = fake_embedded(tmp_path, monkeypatch, [b"GGUF", b"-parts"])
    monkeypatch.setitem(models.EMBEDDED, "fake", m)
    conversions = []

    def convert(gguf: Path, work: Path) -> None:
        assert gguf.read_bytes() == b"GGUF-parts" and gguf.parent.name.startswith(".partial-fake-")
        conversions.append(gguf)
        for f in Path(model_dirs[0]).iterdir():
            shutil.copy(f, work / f.name)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    object.__setattr__(m, "conversions", conversions)  # a frozen dataclass
    return m


def sha256sum_digest(folder: Path, names) -> str:
    """By hand, as `sha256sum` then `sha256sum` of its sorted lines would."""
    lines = "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()


def weights_file(m) -> Path:
    return models.cached_dir(m) / "model.safetensors"


def flip_middle_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))  # same size


def uninstall(monkeypatch) -> None:
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)


# ---------------------------------------------------------------- the marker and the manifest's hash


def test_marker_hashes_every_file_and_info_carries_weights_sha256(fake, model_dirs):
    loaded = models.load("fake")
    cache = models.cached_dir(fake)
    marker = json.loads((cache / modelcache.MARKER).read_text())
    written = sorted(p.name for p in cache.iterdir() if p.name != modelcache.MARKER)
    assert sorted(marker["files"]) == written and "model.safetensors" in written
    for name in written:
        assert marker["files"][name] == {"size": (cache / name).stat().st_size,
                                         "sha256": hashlib.sha256((cache / name).read_bytes()).hexdigest()}
    assert loaded.info["weights_sha256"] == sha256sum_digest(cache, written)
    assert loaded.info["sha256"] == fake.sha256  # the GGUF source's hash, as before
    assert "files" not in loaded.info and loaded.info["source"] == str(cache)
    assert len(fake.conversions) == 1
    models.load("fake")
    assert len(fake.conversions) == 1  # built once


def test_a_users_gguf_cache_is_verified_and_rebuilt_too(tmp_path, monkeypatch, model_dirs, cache_dir, capsys):
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"not really a GGUF")
    conversions = []
    monkeypatch.setattr(models, "_convert_gguf", lambda src, work: conversions.append(src) or [
        shutil.copy(f, work / f.name) for f in Path(model_dirs[0]).iterdir()])
    loaded = models.load(str(gguf))
    digest = hashlib.sha256(b"not really a GGUF").hexdigest()
    cache = cache_dir / f"gguf-{digest[:16]}"
    assert loaded.info["kind"] == "gguf" and loaded.info["sha256"] == digest and loaded.info["source"] == str(cache)
    assert loaded.info["weights_sha256"] == sha256sum_digest(cache, [n for n in os.listdir(cache)
                                                                     if n != modelcache.MARKER])
    flip_middle_bytes(cache / "model.safetensors")
    modelcache._verified.clear()
    models.load(str(gguf))
    assert "model.safetensors does not match" in capsys.readouterr().err and len(conversions) == 2


def test_user_folder_records_the_hash_of_its_loaded_files(model_dirs, tmp_path):
    folder = Path(model_dirs[0])
    loaded = models.load(str(folder))
    names = [p.name for p in folder.iterdir()]
    assert loaded.info["weights_sha256"] == sha256sum_digest(folder, names)
    assert len(loaded.info["fingerprint"]) == 64  # kept for older readers
    # a .bin beside safetensors is not what transformers loads: not hashed
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "pytorch_model.bin").write_bytes(b"unused")
    assert set(modelcache.folder_hashes(copy)) == set(names)


def test_hub_model_hash_comes_from_the_local_snapshot(tmp_path, monkeypatch, model_dirs):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    revision = "a" * 40
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / revision
    blobs = tmp_path / "hub" / "models--org--tiny" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in Path(model_dirs[0]).iterdir():  # the hub layout: snapshot links to blobs
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(blobs / f.name)
    expected = sha256sum_digest(Path(model_dirs[0]), [p.name for p in Path(model_dirs[0]).iterdir()])
    assert models._hub_weights("org/tiny", revision) == expected
    assert models._hub_weights("org/tiny", "b" * 40) is None  # not in the local cache: unknown, no network
    assert models._hub_weights("org/absent", revision) is None


# ---------------------------------------------------------------- damage


def test_flipped_bytes_are_named_and_rebuilt(fake, capsys):
    original = models.load("fake").model.lm_head.weight.clone()
    flip_middle_bytes(weights_file(fake))
    modelcache._verified.clear()  # a new process
    loaded = models.load("fake")
    err = capsys.readouterr().err
    assert f"{weights_file(fake)} does not match the sha256 in its marker" in err and "rebuilding" in err
    assert len(fake.conversions) == 2
    assert torch.equal(loaded.model.lm_head.weight, original)


def test_flipped_bytes_without_the_packages_are_an_error_naming_file_and_fix(fake, monkeypatch):
    models.load("fake")
    flip_middle_bytes(weights_file(fake))
    modelcache._verified.clear()
    uninstall(monkeypatch)
    with pytest.raises(ModelError) as err:
        models.load("fake")
    assert str(weights_file(fake)) in str(err.value) and "decodebench models install fake" in str(err.value)


def test_size_mismatch_is_found_without_hashing(fake, monkeypatch):
    models.load("fake")
    with open(weights_file(fake), "r+b") as f:
        f.truncate(1000)
    modelcache._verified.clear()
    monkeypatch.setattr(modelcache, "sha256_file", lambda path: pytest.fail(f"hashed {path}"))
    with pytest.raises(modelcache.Unverified, match=r"model.safetensors is 1000 bytes, its marker says \d+"):
        modelcache.verify(models.cached_dir(fake))
    uninstall(monkeypatch)
    with pytest.raises(ModelError, match="1000 bytes"):
        models.load("fake")


def test_truncated_weights_are_rebuilt(fake, capsys):
    models.load("fake")
    with open(weights_file(fake), "r+b") as f:
        f.truncate(1000)
    models.load("fake")
    assert "1000 bytes" in capsys.readouterr().err and len(fake.conversions) == 2


def test_a_cache_that_verifies_but_does_not_load_is_a_model_error_not_a_safetensor_error(fake):
    models.load("fake")
    cache = models.cached_dir(fake)
    with open(cache / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    modelcache.write_marker(cache, {"embedded": "fake"})  # the marker agrees with the damage
    modelcache._verified.clear()
    with pytest.raises(ModelError, match=f"cache {cache} cannot be loaded .*rm -rf {cache}"):
        models.load("fake")


def test_a_corrupt_user_folder_is_a_model_error(model_dirs, tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(model_dirs[0], folder)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelError, match="cannot load .*mine"):
        models.load(str(folder))


def test_extra_or_missing_files_fail_verification(fake):
    models.load("fake")
    cache = models.cached_dir(fake)
    (cache / "model-00002-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(modelcache.Unverified, match="unexpected model-00002-of-00002.safetensors"):
        modelcache.verify(cache, hash_files=False)
    (cache / "model-00002-of-00002.safetensors").unlink()
    (cache / "tokenizer.json").unlink()
    with pytest.raises(modelcache.Unverified, match="missing tokenizer.json"):
        modelcache.verify(cache, hash_files=False)


def test_a_cache_from_before_file_hashes_is_rebuilt(fake, capsys):
    models.load("fake")
    marker = models.cached_dir(fake) / modelcache.MARKER
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k not in ("files", "format")}
    marker.write_text(json.dumps(old))  # what the previous code wrote
    assert not models.is_cached(fake)
    models.load("fake")
    assert "older decodebench without file hashes" in capsys.readouterr().err and len(fake.conversions) == 2
    assert models.is_cached(fake)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '{"format": 2, "files": {"a": {"size": "1"}}}'])
def test_an_unreadable_marker_is_unverified_not_a_crash(tmp_path, text):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / modelcache.MARKER).write_text(text)
    with pytest.raises(modelcache.Unverified):
        modelcache.verify(tmp_path / "e")


def test_each_entry_is_hashed_once_per_process(fake, monkeypatch):
    models.load("fake")  # built: hashed as written
    calls = []
    real = modelcache.sha256_file
    monkeypatch.setattr(modelcache, "sha256_file", lambda p: calls.append(p) or real(p))
    models.load("fake")
    assert calls == []
    modelcache._verified.clear()  # another process
    models.load("fake")
    assert len(calls) == len(json.loads((models.cached_dir(fake) / modelcache.MARKER).read_text())["files"])


# ---------------------------------------------------------------- building: locks and orphans


def test_orphan_partial_folders_of_the_entry_are_removed_by_the_next_build(fake, cache_dir):
    cache_dir.mkdir(parents=True)
    orphan = cache_dir / ".partial-fake-k9x_2abc"  # a conversion killed mid-way
    (orphan / "sub").mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"half")
    others = [cache_dir / ".partial-fake-x-k9x_2abc", cache_dir / ".partial-fakeish-k9x_2abc"]  # other entries'
    for other in others:
        other.mkdir()
    models.load("fake")
    assert not orphan.exists() and all(o.exists() for o in others)
    assert {p.name for p in cache_dir.iterdir()} == {"fake", ".locks", *(o.name for o in others)}


def counting_build(log: Path, delay: float):
    """A build that logs each run and takes `delay` seconds (its source is also run in subprocesses)."""
    def build(work: Path) -> dict:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(delay)
        (work / "weights").write_bytes(b"w" * 100)
        return {"test": True}
    return build


def test_two_threads_building_one_entry_convert_once(tmp_path):
    log = tmp_path / "log"
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        modelcache.ensure(tmp_path / "c", "e", counting_build(log, 0.5), fix=""))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.read_text() == "built\n" and len(results) == 2 and results[0] == results[1]


def test_two_processes_building_one_entry_convert_once(tmp_path):
    code = ("import sys, time\nfrom pathlib import Path\nfrom harness import modelcache\n"  # not this file: no torch
            + inspect.getsource(counting_build)
            + "p = Path(sys.argv[1])\nmodelcache.ensure(p / 'c', 'e', counting_build(p / 'log', 1.0), fix='')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert (tmp_path / "log").read_text() == "built\n"
    modelcache.verify(tmp_path / "c" / "e")
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"e", ".locks"}


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def broken(work: Path) -> dict:
        (work / "half").write_bytes(b"x")
        raise ModelError("conversion failed")
    with pytest.raises(ModelError, match="conversion failed"):
        modelcache.ensure(tmp_path, "e", broken, fix="")
    assert {p.name for p in tmp_path.iterdir()} == {".locks"}


# ---------------------------------------------------------------- a model that ships its own code


def evil_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config maps to its own Python files; importing either writes `ran`."""
    folder, ran = tmp_path / "evil", tmp_path / "ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "decodebench-evil", "architectures": ["XModel"],
        "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}}))
    for module in ("configuration_x", "modeling_x"):
        (folder / f"{module}.py").write_text(f"open({str(ran)!r}, 'a').write('{module} ran\\n')\n")
    return folder, ran


def test_custom_code_is_refused_without_asking(tmp_path, monkeypatch):
    folder, ran = evil_folder(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # were anything asked, the answer is yes
    with pytest.raises(ModelError, match="ships its own Python code.*--trust-remote-code"):
        models.load(str(folder))
    assert not ran.exists() and sys.stdin.read() == "y\n" * 10  # no code ran, nothing was read


def test_custom_code_is_refused_in_a_process_with_no_stdin(tmp_path):
    folder, ran = evil_folder(tmp_path)
    code = "import sys; from harness import models; models.load(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(folder)], check=False, cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ModelError" in done.stderr and "--trust-remote-code" in done.stderr
    assert not ran.exists()


def test_trust_remote_code_reaches_transformers(tmp_path):
    folder, ran = evil_folder(tmp_path)
    with pytest.raises(ModelError):  # the code runs, then the bogus model fails to build
        models.load(str(folder), trust_remote_code=True)
    assert "configuration_x ran" in ran.read_text()


# ---------------------------------------------------------------- the real model, killed mid-conversion


@pytest.mark.integration
def test_slow_kill9_during_real_conversion_then_rebuild(tmp_path, monkeypatch):
    """The slow one (~1 min on 2 cores): smollm2-135m's conversion (about 22 s here) is killed twice,
    once at a random time while the GGUF is dequantised and once while the safetensors are being
    written; the next build removes the orphans, and the cache verifies."""
    if not models.installed(models.EMBEDDED["smollm2-135m"]):
        pytest.skip("smollm2-135m not installed: decodebench models install smollm2-135m")
    root = tmp_path / "cache"
    monkeypatch.setenv("DECODEBENCH_CACHE", str(root))
    code = "from harness import models; models.prepare_embedded('smollm2-135m')"

    def partials() -> list[Path]:
        return list(root.glob(".partial-smollm2-135m-*"))

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def start():
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    proc = start()  # 1: at a random moment of the conversion (the work folder exists ~2 s after the start)
    wait_for(lambda: partials())
    time.sleep(random.uniform(1, 8))
    assert proc.poll() is None, "the conversion finished before the kill: lower the delay"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partials() and not (root / "smollm2-135m").exists()

    proc = start()  # 2: while files are being written into the work folder
    wait_for(lambda: any(any(p.iterdir()) for p in partials() if p.is_dir()))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(any(p.iterdir()) for p in partials()) and not (root / "smollm2-135m").exists()

    models.prepare_embedded("smollm2-135m")
    modelcache._verified.clear()
    marker = modelcache.verify(root / "smollm2-135m")  # every file hashed against the marker
    assert marker["sha256"] == models.EMBEDDED["smollm2-135m"].sha256
    assert {p.name for p in root.iterdir()} == {"smollm2-135m", ".locks"}
    assert [p.name for p in (root / ".locks").iterdir()] == ["smollm2-135m.lock"]
