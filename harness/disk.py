"""Filling a (small, test-owned) filesystem to the last block, for full-disk tests."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fill_until_full(path: Path, first_chunk_bytes: int = 1 << 20) -> None:
    """Append zeros to ``path`` until the filesystem refuses even 512 bytes:
    chunks halve on each ENOSPC, so the last partly free block is taken too."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = first_chunk_bytes
        while chunk >= 512:
            try:
                os.write(descriptor, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(descriptor)
