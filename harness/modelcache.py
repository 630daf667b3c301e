"""Converted-model cache entries that cannot lie.

An entry is a folder <root>/<name> whose marker file lists the size and sha256 of every file the build
wrote. A load checks it (sizes every time, hashes once per process) and a mismatch names the file.
A build runs under an OS lock per entry (flock: it dies with its process, so kill -9 leaves no stale
lock), first deletes the temp folders `.partial-<name>-*` of builds that were killed, writes into a
fresh temp folder and renames it into place, so a reader never sees half an entry."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

MARKER = "decodebench-source.json"  # written last into an entry: its presence means "complete"
FORMAT = 2  # format-1 markers (before file hashes) are unverifiable: such entries are rebuilt
LOCKS = ".locks"  # <root>/.locks/<name>.lock; lock files stay (flock needs one inode), they are tiny

# Hashing cost, measured on the 2-core CPU box with the file in the page cache (hashlib sha256,
# 4 MiB reads): 1.25-1.3 GB/s, i.e. 0.42 s for smollm2-135m's 538 MB fp32 cache and ~5 s for
# qwen2.5-coder-1.5b's ~6 GB (a cold disk is slower still). Too much for every load in a process
# that loads the same model again and again (tests, reproduce, the demo), so an entry is hashed
# once per process (_verified, keyed by the marker's identity: a rebuild by anyone invalidates it);
# sizes and the file list are checked at every load, which catches truncation at no cost.
_verified: set[tuple] = set()
_file_hashes: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, for user folders


class ModelError(RuntimeError):
    """A model that cannot be had: not installed, corrupt, or incompatible."""


class Unverified(Exception):
    """An entry that is absent, unreadable, of an older format, or unlike its marker (the message says which)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(hashes: dict[str, str]) -> str:
    """One sha256 over per-file sha256s: that of `sha256sum`'s lines in name order, so
    `cd DIR && LC_ALL=C sha256sum FILES... | sha256sum` (names sorted) gives the same digest."""
    lines = "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


_OTHER_WEIGHT_FORMATS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of the files transformers loads from a model folder: its top-level files, less hidden
    ones and, when safetensors are present, the other weight formats (transformers prefers safetensors).
    Memoised per file identity: a 3 GB bf16 1.5B model costs ~2.5 s once per process at 1.3 GB/s."""
    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix not in _OTHER_WEIGHT_FORMATS]
    hashes = {}
    for path in files:
        st = path.stat()  # follows links: hub snapshots are links to blobs
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _file_hashes:
            _file_hashes[key] = sha256_file(path)
        hashes[path.name] = _file_hashes[key]
    return hashes


def write_marker(folder: Path, source: dict) -> dict:
    """Hash every file in `folder` and write the marker: `source` (where the entry came from) + files."""
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in names}
    marker = {**source, "format": FORMAT, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=1))
    return marker


def marker_hashes(marker: dict) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in marker["files"].items()}


def verify(folder: Path, hash_files: bool = True) -> dict:
    """The entry's marker if every file matches it; Unverified naming the first thing that does not."""
    try:
        with open(folder / MARKER, "rb") as f:
            st = os.fstat(f.fileno())
            marker = json.loads(f.read())
    except FileNotFoundError:
        raise Unverified(f"{folder} is not built") from None
    except (OSError, ValueError) as err:
        raise Unverified(f"{folder / MARKER} is unreadable ({err})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise Unverified(f"{folder} was written by an older decodebench without file hashes")
    files = marker.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        raise Unverified(f"{folder / MARKER} is malformed")
    present = {p.name for p in folder.iterdir()} - {MARKER}
    if present != set(files):
        problems = []
        if missing := sorted(set(files) - present):
            problems.append(f"missing {', '.join(missing)}")
        if extra := sorted(present - set(files)):
            problems.append(f"unexpected {', '.join(extra)}")
        raise Unverified(f"{folder}: {'; '.join(problems)}")
    for name, entry in sorted(files.items()):
        size = (folder / name).stat().st_size
        if size != entry["size"]:
            raise Unverified(f"{folder / name} is {size} bytes, its marker says {entry['size']} (damaged)")
    key = _identity(folder, st)
    if hash_files and key not in _verified:
        for name, entry in sorted(files.items()):
            if sha256_file(folder / name) != entry["sha256"]:
                raise Unverified(f"{folder / name} does not match the sha256 in its marker (damaged)")
        _verified.add(key)
    return marker


def ensure(root: Path, name: str, build: Callable[[Path], dict] | None, fix: str) -> dict:
    """The verified marker of entry `name`; built (or rebuilt, with a line on stderr saying why) by
    `build(work)`, which fills the empty folder `work` and returns what the entry was made from.
    With `build` None (its sources are gone) an unverified entry is a ModelError ending with `fix`."""
    dest = root / name
    try:
        return verify(dest)
    except Unverified as err:
        if build is None:
            raise ModelError(f"{err}; {fix}") from None
        if (dest / MARKER).exists():
            print(f"decodebench: {err}; rebuilding it", file=sys.stderr)
    return _build(root, name, build)


def partial_prefix(name: str) -> str:
    return f".partial-{name}-"


@contextmanager
def scratch(root: Path, name: str) -> Iterator[Path]:
    """A temp folder for building entry `name`, removed after; a killed build's is removed by the next build."""
    path = Path(tempfile.mkdtemp(prefix=partial_prefix(name), dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_partials(root: Path, name: str) -> list[Path]:
    """Delete the temp folders of entry `name` (call with its lock held: no live build owns one)."""
    prefix = partial_prefix(name)
    removed = []
    for path in root.glob(glob.escape(prefix) + "*"):
        rest = path.name[len(prefix):]
        if "-" in rest or "." in rest:  # mkdtemp's suffix has neither: this is another entry's
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path)
    return removed


def lock(root: Path, name: str):
    # filelock: a dependency of huggingface_hub, hence of transformers
    from filelock import FileLock

    (root / LOCKS).mkdir(parents=True, exist_ok=True)
    return FileLock(root / LOCKS / f"{name}.lock")


def _build(root: Path, name: str, build: Callable[[Path], dict]) -> dict:
    dest = root / name
    with lock(root, name):
        with suppress(Unverified):
            return verify(dest)  # another process built it while we waited for the lock
        remove_partials(root, name)
        with scratch(root, name) as work:
            marker = write_marker(work, build(work))
            if dest.exists():  # move the bad entry aside first: each rename is atomic
                with scratch(root, name) as old:
                    dest.rename(old)  # replaces the empty folder `old`
                    work.rename(dest)
            else:
                work.rename(dest)
        st = (dest / MARKER).stat()  # hashed as written: no need to hash again in this process
        _verified.add(_identity(dest, st))
    return marker


def _identity(folder: Path, marker_stat: os.stat_result) -> tuple:
    """An entry as built once: a rebuild (by any process) writes a new marker, hence a new identity."""
    return str(folder.resolve()), marker_stat.st_ino, marker_stat.st_mtime_ns, marker_stat.st_size
