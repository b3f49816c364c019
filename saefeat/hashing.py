"""Content hashes of files: one streaming loop for every checksum saefeat writes or verifies."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def update_with_file(h: Any, path: str | Path) -> Any:
    """Feed the bytes of `path` to the hash object `h` in 4 MiB blocks; returns `h`."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's content."""
    return update_with_file(hashlib.sha256(), path).hexdigest()
