"""Atomic file writes: a temporary file in the target's folder, then a rename, so a reader or a
resumed run never sees a half-written file; and whole-line appends for JSONL logs and caches."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _readable(path: str) -> None:
    """Give a temporary file (mkstemp makes it 0600) the mode a plain ``open`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, data: Any, sort_keys: bool = True) -> Path:
    """Write ``data`` as indented JSON atomically (keys sorted unless ``sort_keys=False``)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` plus a newline to ``path`` (created with its folder) in one ``write`` on an
    ``O_APPEND`` descriptor: concurrent writers never interleave lines, and a kill leaves at
    most a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def replace_directory(new: str | Path, final: str | Path) -> None:
    """Move the finished folder ``new`` to ``final``. An existing ``final`` is moved aside first and
    removed only afterwards, so at every moment one complete folder sits at ``final`` or beside it."""
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
