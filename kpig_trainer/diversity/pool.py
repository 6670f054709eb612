"""Pool growth: evolve, validate and append instructions until each task has ``pool_size``.

Per task (paper, appendix A): the pool starts with the seed instruction (the task's
definition) and its key parts -- the hand annotation when the task has one, else extracted.
Then, repeatedly: pick a random pool entry and a random strategy, evolve, find the new key
parts, validate, and append. Validation rejects an instruction that is empty, repeats a pool
entry (after normalising case, spaces and end punctuation) or its parent (``unchanged``), contains a marker of our
templates, lost a key part it had to keep, or has no key part at all; every rejection is
counted by reason. Each task gets ``max_attempts_per_entry`` attempts per missing entry, so
an endpoint that never gives a valid answer cannot loop forever.

Tasks run concurrently (a thread each, at most ``concurrency``); a task's pool is written by
one thread only. A fatal endpoint error stops every worker; entries written so far stay,
and running the same call again resumes every pool where it stopped.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kpig_trainer.data.records import DataError, Task
from kpig_trainer.diversity.cache import PoolFile, now
from kpig_trainer.diversity.client import DiversityClient, DiversityError, RequestRejected, RunStopped
from kpig_trainer.diversity.extract import validate_key_parts
from kpig_trainer.diversity.heuristic import HeuristicBackend
from kpig_trainer.diversity.prompts import PromptTemplates, load_templates

logger = logging.getLogger(__name__)

__all__ = ["DiversitySummary", "TaskResult", "diversify", "grow_pool", "normalize_instruction"]

_MAX_EXAMPLE_CHARS = 1500


def normalize_instruction(text: str) -> str:
    """Key for duplicate detection: casefolded, whitespace collapsed, end punctuation dropped."""
    return re.sub(r"\s+", " ", text.casefold()).strip(" .!?;:\"'")


@dataclass
class TaskResult:
    """What happened to one task's pool in one run."""

    task: str
    existing: int = 0
    added: int = 0
    attempts: int = 0
    rejections: Counter = field(default_factory=Counter)
    status: str = "pending"
    message: str = ""

    @property
    def entries(self) -> int:
        """Pool size at the end of the run."""
        return self.existing + self.added


@dataclass
class DiversitySummary:
    """Result of :func:`diversify`: per-task counts, rejections by reason, endpoint counters."""

    pool_size: int
    model: str
    cache_dir: str
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def rejections(self) -> Counter:
        """Rejections of all tasks, by reason."""
        return sum((t.rejections for t in self.tasks.values()), Counter())

    @property
    def complete(self) -> bool:
        """Every task reached ``pool_size``."""
        return all(t.status == "complete" for t in self.tasks.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return {
            "pool_size": self.pool_size,
            "model": self.model,
            "cache_dir": self.cache_dir,
            "complete": self.complete,
            "elapsed_s": round(self.elapsed, 3),
            "stats": dict(self.stats),
            "rejections": dict(self.rejections),
            "tasks": {
                name: {
                    "entries": t.entries,
                    "existing": t.existing,
                    "added": t.added,
                    "attempts": t.attempts,
                    "rejections": dict(t.rejections),
                    "status": t.status,
                    "message": t.message,
                }
                for name, t in self.tasks.items()
            },
        }

    def format_table(self) -> str:
        """The table ``kpig diversify`` prints."""
        from kpig_trainer.data.summary import format_table

        rows = [
            {
                "task": t.task,
                "pool": t.entries,
                "existing": t.existing,
                "added": t.added,
                "attempts": t.attempts,
                "rejected": sum(t.rejections.values()),
                "status": t.status,
            }
            for t in self.tasks.values()
        ]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejections.items())) or "none"
        stats = ", ".join(f"{k} {v}" for k, v in self.stats.items()) or "no endpoint"
        lines = [
            f"Instruction pools ({self.model}, target {self.pool_size} per task) in {self.cache_dir}",
            format_table(rows),
            f"Rejections: {reasons}",
            f"Endpoint: {stats}",
            f"Elapsed: {self.elapsed:.1f}s",
        ]
        lines += [f"{t.task}: {t.message}" for t in self.tasks.values() if t.message]
        return "\n".join(lines)


def _examples(task: Task) -> list[tuple[str, str]]:
    pairs = [(d.input, d.output) for d in task.positive_examples]
    pairs += [(i.input, i.output) for i in task.instances[:20]]
    cut = lambda text: text if len(text) <= _MAX_EXAMPLE_CHARS else text[:_MAX_EXAMPLE_CHARS] + " ..."  # noqa: E731
    return [(cut(a), cut(b)) for a, b in pairs] or [("", "")]


def _seed_entry(task: Task, backend: Any, example: tuple[str, str]) -> dict[str, Any]:
    if task.key_parts:
        checked = validate_key_parts(task.definition, task.key_parts)
        if checked.dropped:
            logger.warning(
                "task %r: annotated key parts not found in the definition: %s",
                task.name,
                [c for c, _ in checked.dropped],
            )
        key_parts, by = checked.kept, "annotation"
    else:
        try:
            key_parts = backend.extract(task.definition, example)
        except RequestRejected as error:
            logger.warning("task %r: key-part extraction of the seed rejected: %s", task.name, error)
            key_parts = []
        by = backend.name
        if not key_parts:
            logger.warning("task %r: no key parts found for the seed instruction", task.name)
    return {
        "instruction": task.definition,
        "key_parts": key_parts,
        "strategy": "seed",
        "parent": None,
        "model": None,
        "key_parts_by": by,
        "timestamp": now(),
    }


def _candidate(
    backend: Any,
    templates: PromptTemplates | None,
    strategy: str,
    parent: Mapping[str, Any],
    example: tuple[str, str],
    rng: random.Random,
    seen: set[str],
) -> tuple[str | None, Any]:
    """Evolve once and validate: ``(None, (text, key_parts))`` when accepted, else ``(reason, None)``."""
    try:
        text = backend.evolve(strategy, parent["instruction"], parent["key_parts"], example, rng).strip()
    except RequestRejected:
        return "request_rejected", None
    if not text:
        return "empty", None
    if normalize_instruction(text) == normalize_instruction(parent["instruction"]):
        return "unchanged", None
    if normalize_instruction(text) in seen:
        return "duplicate", None
    if templates is not None and templates.find_marker(text):
        return "template_marker", None
    if backend.keeps_key_parts(strategy) and parent["key_parts"]:
        checked = validate_key_parts(text, parent["key_parts"])
        if any(reason != "duplicate" for _, reason in checked.dropped):
            return "lost_key_part", None
        return None, (text, checked.kept)
    try:
        key_parts = backend.extract(text, example)
    except RequestRejected:
        return "request_rejected", None
    return ("no_key_parts", None) if not key_parts else (None, (text, key_parts))


def grow_pool(
    task: Task,
    backend: Any,
    directory: str | Path,
    pool_size: int,
    *,
    seed: int = 0,
    strategies: Sequence[str] | None = None,
    templates: PromptTemplates | None = None,
    max_attempts_per_entry: int = 5,
    stop: threading.Event | None = None,
    on_entries: Callable[[int], None] | None = None,
) -> TaskResult:
    """Grow (or resume) one task's pool in ``directory`` up to ``pool_size`` entries.

    Args:
        backend: :class:`~kpig_trainer.diversity.evolve.LLMBackend` or
            :class:`~kpig_trainer.diversity.heuristic.HeuristicBackend`.
        templates: used to reject answers that echo template markers.
        stop: when set, the loop ends before its next attempt (status ``"stopped"``).
        on_entries: called with the number of entries found or added (progress bars).

    Raises:
        DataError: the pool on disk was grown from another seed instruction, or another run
            is writing it.
    """
    result = TaskResult(task.name)
    try:
        return _grow(
            task,
            backend,
            directory,
            pool_size,
            result,
            seed=seed,
            strategies=strategies,
            templates=templates,
            max_attempts_per_entry=max_attempts_per_entry,
            stop=stop,
            on_entries=on_entries,
        )
    except RunStopped as error:  # another worker failed for good; this pool is fine as it is
        result.status, result.message = "stopped", str(error)
        return result
    except DiversityError as error:
        result.status, result.message = "error", str(error)
        error.task_result = result
        raise


def _grow(
    task: Task,
    backend: Any,
    directory: str | Path,
    pool_size: int,
    result: TaskResult,
    *,
    seed: int,
    strategies: Sequence[str] | None,
    templates: PromptTemplates | None,
    max_attempts_per_entry: int,
    stop: threading.Event | None,
    on_entries: Callable[[int], None] | None,
) -> TaskResult:
    strategies = list(strategies or backend.strategies)
    with PoolFile(directory, task.name) as pool:
        entries = pool.entries
        result.existing = len(entries)
        if entries and entries[0]["instruction"].strip() != task.definition.strip():
            raise DataError(
                f"{pool.path}: this pool was grown from another seed instruction than the "
                f"definition of task {task.name!r}; delete the file or choose another folder"
            )
        rng = random.Random(f"{seed}:{task.name}:{len(entries)}")
        examples = _examples(task)
        if on_entries and entries:
            on_entries(min(len(entries), pool_size))
        if not entries:
            pool.append(_seed_entry(task, backend, rng.choice(examples)))
            result.added += 1
            if on_entries:
                on_entries(1)
        seen = {normalize_instruction(e["instruction"]) for e in entries}
        budget = max_attempts_per_entry * max(0, pool_size - len(entries))
        while len(entries) < pool_size:
            if stop is not None and stop.is_set():
                result.status = "stopped"
                return result
            if result.attempts >= budget:
                reasons = ", ".join(f"{k} {v}" for k, v in result.rejections.most_common())
                result.status, result.message = (
                    "incomplete",
                    (
                        f"gave up after {result.attempts} attempts with {len(entries)}/{pool_size} entries "
                        f"(rejections: {reasons}); check the endpoint, the model and the templates, then rerun "
                        f"to resume"
                    ),
                )
                logger.warning("task %r: %s", task.name, result.message)
                return result
            result.attempts += 1
            parent_index = rng.randrange(len(entries))
            parent = entries[parent_index]
            # A backend may know that some strategies cannot change this parent (offline rewrites).
            usable = getattr(backend, "strategies_for", None)
            choices = (
                [s for s in usable(parent["instruction"], parent["key_parts"]) if s in strategies] if usable else []
            )
            strategy = rng.choice(choices or strategies)
            reason, accepted = _candidate(backend, templates, strategy, parent, rng.choice(examples), rng, seen)
            if reason is not None:
                result.rejections[reason] += 1
                logger.debug("task %r: %s answer rejected (%s)", task.name, strategy, reason)
                continue
            text, key_parts = accepted
            pool.append(
                {
                    "instruction": text,
                    "key_parts": key_parts,
                    "strategy": strategy,
                    "parent": parent_index,
                    "model": backend.name,
                    "key_parts_by": backend.name,
                    "timestamp": now(),
                }
            )
            seen.add(normalize_instruction(text))
            result.added += 1
            if on_entries:
                on_entries(1)
    result.status = "complete"
    return result


def diversify(
    tasks: Mapping[str, Task] | Sequence[Task],
    pool_size: int = 31,
    client: DiversityClient | None = None,
    cache_dir: str | Path = "instruction_pools",
    concurrency: int = 4,
    seed: int = 0,
    strategies: Sequence[str] | None = None,
    *,
    templates: str | Path | PromptTemplates | None = None,
    max_attempts_per_entry: int = 5,
    progress: bool = True,
) -> DiversitySummary:
    """Build (or resume) an instruction pool of ``pool_size`` entries for every task.

    Args:
        tasks: the tasks (their ``definition`` is the seed; their ``key_parts``, when
            annotated, the seed's key parts).
        pool_size: entries per task, seed included (the paper uses 31).
        client: an OpenAI-compatible :class:`DiversityClient`; ``None`` uses the offline
            heuristic backend (no network, see :mod:`kpig_trainer.diversity.heuristic`).
        cache_dir: folder of the JSONL pools (one file per task); read them with
            :func:`~kpig_trainer.diversity.cache.load_pools`.
        concurrency: tasks processed at the same time.
        seed: seeds the random choices of parents, strategies and examples.
        strategies: subset of the backend's strategies (LLM: ``concretizing``, ``reasoning``,
            ``constraint``, ``breadth``; offline: ``paraphrase``, ``reorder``, ``preamble``,
            ``reasoning``); default all.
        templates: folder of template overrides, or loaded :class:`PromptTemplates`.
        max_attempts_per_entry: attempts per missing entry before a task is given up.
        progress: show a tqdm bar of pool entries.

    Returns:
        A :class:`DiversitySummary`; tasks that could not be completed have status
        ``"incomplete"`` (attempts exhausted) or ``"error"`` (e.g. a stale pool file).

    Raises:
        EndpointError / EndpointUnavailable: the endpoint failed for good; every worker was
            stopped, the pools keep what was accepted, and ``error.summary`` holds the summary.
    """
    task_list = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    if pool_size < 1:
        raise ValueError("pool_size must be at least 1")
    if not isinstance(templates, PromptTemplates):
        templates = load_templates(templates)
    if client is None:
        backend: Any = HeuristicBackend()
    else:
        from kpig_trainer.diversity.evolve import LLMBackend

        client.reset()
        backend = LLMBackend(client, templates)
    unknown = [s for s in strategies or () if s not in backend.strategies]
    if unknown:
        raise ValueError(
            f"unknown strategies {unknown} for the {backend.name} backend; choose from {backend.strategies}"
        )
    summary = DiversitySummary(pool_size, backend.name, str(cache_dir))
    stop = threading.Event()
    from tqdm.auto import tqdm

    bar = tqdm(total=pool_size * len(task_list), unit="entry", desc="instruction pools", disable=not progress)
    bar_lock = threading.Lock()

    def advance(n: int) -> None:
        with bar_lock:
            bar.update(n)

    def work(task: Task) -> TaskResult:
        return grow_pool(
            task,
            backend,
            cache_dir,
            pool_size,
            seed=seed,
            strategies=strategies,
            templates=templates if client is not None else None,
            max_attempts_per_entry=max_attempts_per_entry,
            stop=stop,
            on_entries=advance,
        )

    def halt() -> None:
        stop.set()
        if client is not None:
            client.stop()

    fatal: BaseException | None = None
    start, counters_before = time.monotonic(), backend.stats()
    executor = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="diversify")
    futures = {executor.submit(work, task): task.name for task in task_list}
    try:
        for future in as_completed(futures):
            error = future.exception()
            if error is not None and not isinstance(error, DataError):
                halt()  # a broken endpoint or a bug: do not let the other workers go on
                fatal = fatal or error
    except KeyboardInterrupt:  # accepted entries are on disk already; stop the rest quickly
        halt()
        executor.shutdown(wait=False, cancel_futures=True)
        bar.close()
        raise
    executor.shutdown()
    bar.close()
    for future, name in futures.items():
        error = future.exception()
        if error is None:
            summary.tasks[name] = future.result()
        else:
            summary.tasks[name] = getattr(error, "task_result", None) or TaskResult(
                name,
                status="error",
                message=f"{type(error).__name__}: {error}" if not isinstance(error, DataError) else str(error),
            )
    # A reused client keeps counting across runs: report this run's share only.
    summary.stats = {k: v - counters_before.get(k, 0) for k, v in backend.stats().items()}
    summary.elapsed = time.monotonic() - start
    if fatal is not None:
        if isinstance(fatal, DiversityError):
            fatal.summary = summary
        raise fatal
    return summary
