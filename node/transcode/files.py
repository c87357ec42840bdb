"""Durable file writes: a reader never sees a half-written instance."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(dst: Path, data: bytes) -> None:
    _replace_atomically(dst, lambda out: out.write(data))


def copy_atomically(src: Path, dst: Path) -> None:
    def copy(out: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)

    _replace_atomically(dst, copy)


def _replace_atomically(dst: Path, fill: Callable[[BinaryIO], object]) -> None:
    # Temporary file in the destination folder so os.replace never crosses filesystems;
    # fsync the file before the rename and the folder after it, so both survive a crash.
    folder = dst.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dst)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
