"""An on-disk cache of decoded datasets, shared by every process of a run.

Each process of a simulation (the ServerApp and every Ray actor) needs the decoded arrays. Decoding
Fashion-MNIST's gzipped IDX files into normalised float32 takes about 0.9 s of CPU per process;
with the cache a process maps the ready ``.npy`` files instead, and pages in only the rows it reads.

An entry is a folder of ``.npy`` files named by a key over the caller's name for the decoding,
the source files' paths, sizes and modification times, and this module's format version, so
changed sources or a changed decoding are decoded afresh. Entries are written to a temporary
folder and renamed into place under a lock, so a reader never sees half an entry. The cache lives
in ``$FL_MAESTRO_CACHE`` (default ``~/.cache/fl-maestro``; about 220 MB for Fashion-MNIST); where
it is not writable, each process decodes for itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def cache_root() -> Path:
    """``$FL_MAESTRO_CACHE``, else ``$XDG_CACHE_HOME/fl-maestro``, else ``~/.cache/fl-maestro``."""
    if os.environ.get("FL_MAESTRO_CACHE"):
        return Path(os.environ["FL_MAESTRO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fl-maestro"


def entry_key(name: str, sources: Sequence[Path]) -> str:
    """A key that changes when any source file is replaced, resized or touched."""
    digest = hashlib.sha256(f"{name}:{FORMAT_VERSION}".encode())
    for path in sources:
        stat = Path(path).stat()
        digest.update(f"|{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{name}-{digest.hexdigest()[:16]}"


def cached_arrays(name: str, sources: Sequence[Path], decode: Callable[[], Sequence[np.ndarray]],
                  root: Path | None = None) -> tuple[np.ndarray, ...]:
    """The arrays ``decode()`` makes from ``sources``, memory-mapped read-only from the cache.

    ``name`` must change whenever ``decode`` would give other arrays from the same files (put
    the decoding's version and constants in it). One process decodes while others wait for it
    (a lock file next to the entry), so a cold cache is decoded once, not once per process.
    """
    root = root or cache_root()
    folder = root / entry_key(name, sources)
    arrays = None
    try:
        if folder.is_dir():
            try:
                return _load(folder)
            except (ValueError, EOFError) as err:  # a corrupt entry: rebuilt under the lock
                log.warning("cache entry %s is corrupt (%s); decoding again", folder, err)
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / f"{folder.name}.lock"):
            if folder.is_dir():
                try:
                    return _load(folder)  # another process built it while this one waited
                except (ValueError, EOFError):
                    shutil.rmtree(folder)
            for stale in root.glob(f".{folder.name}.*"):  # left by a writer that was killed
                shutil.rmtree(stale, ignore_errors=True)
            arrays = tuple(decode())
            _store(folder, arrays)
            return _load(folder)
    except OSError as err:
        log.info("could not use the cache for %s in %s (%s); decoding in this process",
                 name, root, err)
        return arrays if arrays is not None else tuple(decode())


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(folder: Path) -> tuple[np.ndarray, ...]:
    count = int((folder / "count").read_text())
    return tuple(np.load(folder / f"{i}.npy", mmap_mode="r").view(np.ndarray) for i in range(count))


def _store(folder: Path, arrays: Sequence[np.ndarray]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for i, array in enumerate(arrays):
            np.save(tmp / f"{i}.npy", np.ascontiguousarray(array))
        (tmp / "count").write_text(str(len(arrays)))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not another writer's finished entry: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
