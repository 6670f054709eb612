"""Instruction pools on disk: one JSONL file per task, one accepted instruction per line.

An entry is ``{"task", "instruction", "key_parts", "strategy", "parent", "model",
"key_parts_by", "timestamp"}``; entry 0 is the seed (the task's own definition, ``parent``
null). Each accepted entry is appended with a single ``os.write`` of the whole line on an
``O_APPEND`` descriptor, then ``fsync``-ed, so a crash leaves at most one torn last line.
Opening a pool for writing drops such a line with a warning and truncates the file back to
its last complete line; a bad line anywhere else is not a crash artefact and raises
:class:`~kpig_trainer.data.records.DataError`. While a run grows a pool it holds an exclusive
``flock`` on the file, so two runs cannot append to the same pool.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kpig_trainer.data.records import DataError

try:  # POSIX only; elsewhere two concurrent runs on one folder are simply not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["PoolFile", "load_pools", "pool_path", "read_pool"]


def pool_path(directory: str | Path, task: str) -> Path:
    """The pool file of ``task``: its name with characters unsafe in file names replaced."""
    return Path(directory) / (re.sub(r"[^A-Za-z0-9._-]", "_", task) + ".jsonl")


def now() -> str:
    """UTC timestamp for entries (ISO 8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_entry(entry: Any, where: str, key_parts: bool = True) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}expected a JSON object")
    if not isinstance(entry.get("instruction"), str) or not entry["instruction"].strip():
        raise ValueError(f"{where}missing or empty 'instruction'")
    if not key_parts and "key_parts" not in entry:
        return entry
    parts = entry.get("key_parts")
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ValueError(f"{where}'key_parts' must be a list of strings")
    return entry


def _parse(data: bytes, path: Path, key_parts: bool = True) -> tuple[list[dict[str, Any]], int | None]:
    """Entries of a pool file, and the byte offset to truncate to when the last line is torn."""
    entries: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    offset = 0
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines) or (number == len(lines) - 1 and complete)
        if raw.strip():
            try:
                entries.append(_check_entry(json.loads(raw.decode("utf-8")), "", key_parts))
            except (ValueError, UnicodeDecodeError) as error:
                if not is_last:
                    raise DataError(
                        f"{path}: line {number}: corrupt pool entry ({error}); "
                        f"only a torn last line is repaired automatically"
                    ) from None
                logger.warning("%s: line %d is incomplete or corrupt (%s); dropping it", path, number, error)
                return entries, offset
        offset += len(raw) + 1
    return entries, None


def read_pool(path: str | Path, *, repair: bool = False, key_parts: bool = True) -> list[dict[str, Any]]:
    """Entries of one pool file (``[]`` when it does not exist).

    A corrupt last line is dropped with a warning; ``repair=True`` also truncates the file
    to its last complete line (and adds a missing final newline). ``key_parts=False`` accepts
    entries that carry only an ``instruction`` (as instruction similarity needs).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    entries, cut = _parse(data, path, key_parts)
    if repair and (cut is not None or (data and not data.endswith(b"\n"))):
        with open(path, "r+b") as handle:
            if cut is not None:
                handle.truncate(cut)
            else:  # complete JSON without its newline: finish the line
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    return entries


def load_pools(directory: str | Path, tasks: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Instruction pools of a folder, in the shape ``KPIGDataCollator(instruction_pools=...)`` takes.

    Args:
        directory: the ``--out`` folder of ``kpig diversify``.
        tasks: only these tasks (default: every ``*.jsonl`` file of the folder).

    Returns:
        ``{task: [{"instruction": str, "key_parts": [str, ...]}, ...]}``, the seed first. The
        file is read, never modified: a torn last line is skipped with a warning.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: instruction-pool folder not found")
    paths = [pool_path(directory, t) for t in tasks] if tasks else sorted(directory.glob("*.jsonl"))
    pools: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        entries = read_pool(path)
        if not entries:
            continue
        task = entries[0].get("task") or path.stem
        pools[task] = [{"instruction": e["instruction"], "key_parts": list(e["key_parts"])} for e in entries]
    return pools


class PoolFile:
    """One task's pool opened for growing: repaired on open, locked, appended line by line."""

    def __init__(self, directory: str | Path, task: str):
        self.task = task
        self.path = pool_path(directory, task)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            self._fsync_directory()
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.close()
                raise DataError(f"{self.path}: another diversify run is writing this pool") from None
        try:
            self.entries = read_pool(self.path, repair=True)
        except BaseException:
            self.close()
            raise

    def _fsync_directory(self) -> None:
        # Make the new file's directory entry durable too, not only its content.
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:  # pragma: no cover - e.g. platforms without directory fds
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, entry: dict[str, Any]) -> None:
        """Write one entry durably and add it to :attr:`entries`."""
        entry = {"task": self.task, **entry}
        _check_entry(entry, f"{self.path}: ")
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # a short write leaves a torn line: the next open repairs it
            raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
        os.fsync(self._fd)
        self.entries.append(entry)

    def close(self) -> None:
        """Release the lock and the descriptor."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PoolFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
