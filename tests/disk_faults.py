"""Helpers for tests of faults on real file systems (the `tmpfs` fixture in conftest.py mounts them)."""

from __future__ import annotations

from pathlib import Path


def fill_disk(directory: Path, name: str = "filler") -> Path:
    """Write zeros into directory/name until the file system is full (ENOSPC); returns the file."""
    path = Path(directory) / name
    block = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
    # Smaller and smaller writes take the last partial blocks too.
    with open(path, "ab", buffering=0) as f:
        for size in (1024, 256, 64, 16, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue
    return path
