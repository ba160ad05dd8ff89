"""Atomic engine directories: build into a staging dir beside the target, then swap it in (never half-written)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path

# The file a complete engine directory holds, written last: a directory without it is not an engine.
MANIFEST = "engine.json"
STAGING_TAG = ".building-"
OLD_TAG = ".replaced-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(target: Path, tag: str) -> list[Path]:
    """Dirs beside `target` named with `tag` whose build process is gone (killed with SIGKILL), newest first."""
    found = []
    for p in target.parent.glob(f".{target.name}{tag}*"):
        try:
            pid = int(p.name[len(f".{target.name}{tag}"):].split("-")[0])
            if not _pid_alive(pid):
                found.append((p.stat().st_mtime_ns, p))
        except (ValueError, FileNotFoundError):  # not ours, or removed meanwhile by another build
            continue
    return [p for _, p in sorted(found, reverse=True)]


def restore_set_aside(target: Path) -> Path | None:
    """Put back the previous engine when a build was killed between the two renames of commit_staging's fallback
    (old engine set aside, new one not yet in): `target` is missing and a dead build's OLD_TAG dir holds it."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    for old in _stale(target, OLD_TAG):
        if (old / MANIFEST).is_file():
            try:
                os.rename(old, target)
            except OSError:  # another process restored it first, or the directory is read-only
                return None
            return target
    return None


def clean_stale_staging(target: Path) -> list[Path]:
    """Restore an engine a killed build had set aside, then remove the staging/old dirs of `target` left by builds
    whose process is gone."""
    removed = []
    if not target.parent.is_dir():
        return removed
    restore_set_aside(target)
    for tag in (STAGING_TAG, OLD_TAG):
        for p in _stale(target, tag):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike):
    """Yield a fresh directory beside `target`; on success commit_staging swaps it in, on any exception it is
    deleted. A killed build leaves only a dot-named staging dir (never `target` half-written), which the next
    build of the same target removes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(f"{target} exists, is not empty and is not an engine directory; refusing to replace it")
    stage = target.parent / f".{target.name}{STAGING_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        commit_staging(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


_AT_FDCWD = -100  # Linux <fcntl.h>
_RENAME_EXCHANGE = 2  # Linux <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where this OS, C
    library or filesystem cannot (the caller falls back to two renames); OSError for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def commit_staging(stage: Path, target: Path) -> None:
    """Move a complete staging dir into place so that `target` is at every instant the old or the new engine.

    No old engine: one rename. Else, on Linux, one renameat2(RENAME_EXCHANGE) swaps the two directories and the
    staging name, now holding the old engine, is deleted (a kill before that leaves it to the next build's
    clean-up). Elsewhere: old engine aside (rename), new one in (rename), old one deleted; a kill between the two
    renames leaves `target` missing and the old engine under a dot name, which restore_set_aside puts back (on
    the next load or build).
    """
    if not target.exists():
        os.rename(stage, target)
        return
    if _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)
        return
    old = target.parent / f".{target.name}{OLD_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
