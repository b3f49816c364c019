"""Atomic writes: a file or a whole folder is written beside its target, then renamed over it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: str | Path, write: Callable[[str], object], durable: bool = False) -> None:
    """Call `write(tmp_path)`, then move the result onto `target`; a crash leaves the old file intact.

    `durable` also flushes the file and the rename to disk, so a power loss or machine stop cannot leave an empty
    or partial `target` behind (an interrupted process never can).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp" + target.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        if durable:
            _fsync(tmp)
        os.replace(tmp, target)
        if durable:
            _fsync(target.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_dir(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp_dir)` on a fresh folder beside `target`, then swap it in as `target`.

    A reader sees the old folder or the new one, never a mix of the two: a crash before the swap leaves the old
    folder intact, one during it leaves the old folder under a hidden ``.<name>.old-*`` name beside it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_dir(src: str | Path, target: str | Path) -> None:
    """Move folder `src` onto `target`, replacing any folder there (renamed away first, then removed)."""
    src, target = Path(src), Path(target)
    if not target.exists():
        os.replace(src, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.rmdir(old)
    os.replace(target, old)
    os.replace(src, target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: str | Path) -> None:
    """Flush a file's or a folder's (its entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
