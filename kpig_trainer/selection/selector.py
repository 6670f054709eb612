"""INSTA-style task selection: relate tasks by the cosine similarity of their instructions.

Method of "Instruction Matters" (Lee et al., arXiv 2404.16418): a task's relevance to a target
task is the cosine similarity of sentence embeddings of their instructions; training on the top-k
related tasks only is the INSTA experiment. The embedder can first be aligned to the instruction
style of the meta-dataset (:func:`kpig_trainer.selection.align.align_embedder`).

One API for naming tasks: every function takes :class:`~kpig_trainer.data.Task` objects *or* task
names; names are resolved through the selector's ``tasks`` mapping (e.g. ``benchmark.tasks``).
A task's instructions are all the variants of its pool when ``pools`` has one (the diversity
pipeline's shape: ``{task: [{"instruction": str, ...}, ...]}``), else its definition.

    selector = InstructionSelector(tasks=benchmark.tasks)
    selector.select_tasks("task340_winomt_classification_gender_pro", benchmark.seen, k=10)
    # -> [("task341_winomt_classification_gender_anti", 1.0), ...]
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from kpig_trainer.data.records import DataError, Task
from kpig_trainer.fileio import atomic_write

logger = logging.getLogger(__name__)

AGGREGATES = ("mean", "max")
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"

TaskRef = Union[Task, str]
Pools = Mapping[str, Sequence[Mapping[str, Any]]]


class SelectionError(DataError):
    """Bad input to task selection; the message names the task, path or option at fault."""


# ---------------------------------------------------------------------------------------------
# Embedder loading and identity


def load_embedder(embedder: Any = None):
    """A ``SentenceTransformer`` from ``None`` (the embedded all-MiniLM-L6-v2), a path or name, or a model.

    Raises:
        SelectionError: the path or name does not load as a sentence-transformers model.
    """
    if embedder is None:
        embedder = DEFAULT_EMBEDDER
    if not isinstance(embedder, (str, os.PathLike)):
        if not callable(getattr(embedder, "encode", None)):
            raise SelectionError(
                f"embedder must be a path, a name or a SentenceTransformer, got {type(embedder).__name__}"
            )
        return embedder
    from kpig_trainer.models import EMBEDDER_ALIASES, load_sentence_embedder

    name = os.fspath(embedder)
    path = Path(name).expanduser()
    if name.lower() not in EMBEDDER_ALIASES:
        if path.exists() and not path.is_dir():
            raise SelectionError(
                f"embedder path {name!r} is a file; expected a folder saved by SentenceTransformer.save"
            )
        if (path.is_absolute() or name.startswith((".", "~"))) and not path.exists():
            raise SelectionError(f"embedder path {name!r} does not exist")
        if path.is_dir() and not any((path / f).is_file() for f in ("modules.json", "config.json")):
            raise SelectionError(f"embedder path {name!r} holds no modules.json or config.json: not a saved model")
    try:
        return load_sentence_embedder(str(path) if path.is_dir() else name)
    except Exception as err:  # noqa: BLE001 - any load failure is reported with the path named
        where = "folder" if path.is_dir() else "name (no such folder, nor a cached Hub model)"
        raise SelectionError(f"embedder {name!r} does not load as a SentenceTransformer {where}: {err}") from err


def model_fingerprint(model) -> str:
    """A content hash of a model's weights and module configuration (its identity for caching).

    Taken once per selector: a model fine-tuned in place afterwards needs a new selector.
    """
    import torch

    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().flatten().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_MEMORY_CACHE: dict[str, dict[str, np.ndarray]] = {}
"""Process-wide embeddings: model fingerprint -> text -> vector, shared by selectors of one model."""


def clear_embedding_cache() -> None:
    """Forget the in-memory embeddings of every model (disk caches are kept)."""
    _MEMORY_CACHE.clear()


# ---------------------------------------------------------------------------------------------
# Instructions of a task


def task_instructions(task: Task, pools: Pools | None = None) -> list[str]:
    """All instruction variants of ``task``'s pool when there is one, else ``[task.definition]``.

    Raises:
        SelectionError: the task has no non-empty instruction.
    """
    pool = (pools or {}).get(task.name)
    if pool:
        texts = []
        for index, entry in enumerate(pool):
            text = entry.get("instruction") if isinstance(entry, Mapping) else None
            if not isinstance(text, str) or not text.strip():
                raise SelectionError(f"task {task.name!r}: pool entry {index} has no 'instruction' text")
            texts.append(text)
        return texts
    if not isinstance(task.definition, str) or not task.definition.strip():
        raise SelectionError(f"task {task.name!r} has no instruction: empty definition and no pool")
    return [task.definition]


def load_pools(directory: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Instruction pools from a folder of ``<task>.jsonl`` files (one JSON object a line), read as
    :func:`kpig_trainer.diversity.read_pool` reads them; ``key_parts`` are optional here.

    A corrupt last line (an interrupted append) is dropped with a warning; any other bad line or an
    entry without ``instruction`` is an error naming the file and line.
    """
    from kpig_trainer.diversity.cache import read_pool

    root = Path(directory)
    if not root.is_dir():
        raise SelectionError(f"pools folder {str(root)!r} does not exist")
    pools: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.glob("*.jsonl")):
        try:
            entries = read_pool(path, key_parts=False)
        except DataError as err:
            raise SelectionError(str(err)) from None
        if entries:
            pools[path.stem] = entries
    if not pools:
        raise SelectionError(f"pools folder {str(root)!r} holds no <task>.jsonl file with entries")
    return pools


# ---------------------------------------------------------------------------------------------
# The selector


class InstructionSelector:
    """Scores tasks by the cosine similarity of their instruction embeddings.

    Args:
        embedder: ``None`` (embedded all-MiniLM-L6-v2), a folder or name loadable by
            ``SentenceTransformer`` (e.g. an aligned embedder's folder), or a loaded model.
        aggregate: how a task pair is scored from its instruction variants: ``"mean"`` of all
            pairwise cosines or their ``"max"``. With one instruction per task both are the cosine.
        batch_size: encoding batch size.
        cache: ``True`` caches embeddings in memory per (model fingerprint, text), shared by all
            selectors of the same weights in this process; a folder also
            keeps them on disk (``<folder>/<fingerprint>.npz``, written atomically); ``False`` none.
        show_progress: a progress bar while encoding texts not yet cached.
        tasks: name -> Task mapping used to resolve task names (e.g. ``benchmark.tasks``).
        pools: name -> instruction pool; a task with a pool is embedded through all its variants.
    """

    def __init__(
        self,
        embedder: Any = None,
        aggregate: str = "mean",
        batch_size: int = 64,
        cache: bool | str | os.PathLike = True,
        show_progress: bool = True,
        *,
        tasks: Mapping[str, Task] | None = None,
        pools: Pools | None = None,
    ) -> None:
        if aggregate not in AGGREGATES:
            raise SelectionError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if batch_size < 1:
            raise SelectionError(f"batch_size must be positive, got {batch_size}")
        self.model = load_embedder(embedder)
        self.aggregate = aggregate
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.tasks: dict[str, Task] = dict(tasks or {})
        self.pools: dict[str, Sequence[Mapping[str, Any]]] = dict(pools or {})
        self.fingerprint = model_fingerprint(self.model)
        self._memory: dict[str, np.ndarray] | None = _MEMORY_CACHE.setdefault(self.fingerprint, {}) if cache else None
        self._cache_file = None
        if cache and not isinstance(cache, bool):
            self._cache_file = Path(cache) / f"{self.fingerprint}.npz"
            self._memory.update(_read_cache(self._cache_file))

    # -- embedding ----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, shape ``(len(texts), dim)``; only uncached texts are encoded."""
        texts = list(texts)
        if self._memory is None:
            return self._encode(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._memory))
        if missing:
            for text, vector in zip(missing, self._encode(missing)):
                self._memory[text] = vector
            if self._cache_file is not None:
                _write_cache(self._cache_file, self._memory)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._memory[t] for t in texts])

    @property
    def dimension(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(vectors, dtype=np.float32)

    # -- tasks ---------------------------------------------------------------------------------

    def resolve(self, task: TaskRef) -> Task:
        """The Task object for a Task or a name known to ``tasks``."""
        if isinstance(task, Task):
            return task
        if isinstance(task, str):
            if task in self.tasks:
                return self.tasks[task]
            raise SelectionError(
                f"unknown task {task!r}: the selector knows {len(self.tasks)} tasks (pass tasks=... or Task objects)"
            )
        raise SelectionError(f"expected a Task or a task name, got {type(task).__name__}")

    def instructions(self, task: TaskRef) -> list[str]:
        return task_instructions(self.resolve(task), self.pools)

    def task_embeddings(self, task: TaskRef) -> np.ndarray:
        """Embeddings of all instructions of ``task``, shape ``(variants, dim)``."""
        return self.embed(self.instructions(task))

    def score(self, a: TaskRef, b: TaskRef) -> float:
        """Similarity of two tasks: mean or max (``aggregate``) of their variants' pairwise cosines."""
        return float(self._aggregate(self.task_embeddings(a) @ self.task_embeddings(b).T))

    def similarity_matrix(self, tasks: Sequence[TaskRef]) -> tuple[list[str], np.ndarray]:
        """Task names and their pairwise :meth:`score` matrix (diagonal included), one embedding call."""
        resolved = [self.resolve(task) for task in tasks]
        texts = [self.instructions(task) for task in resolved]
        vectors = self.embed([text for group in texts for text in group])
        bounds = np.cumsum([0] + [len(group) for group in texts])
        if all(len(group) == 1 for group in texts):
            return [t.name for t in resolved], vectors @ vectors.T
        blocks = [vectors[bounds[i] : bounds[i + 1]] for i in range(len(texts))]
        matrix = np.array([[self._aggregate(a @ b.T) for b in blocks] for a in blocks], dtype=np.float32)
        return [t.name for t in resolved], matrix

    def _aggregate(self, cosines: np.ndarray) -> float:
        return float(cosines.mean() if self.aggregate == "mean" else cosines.max())

    def rank(self, target: TaskRef, candidates: Iterable[TaskRef]) -> list[tuple[str, float]]:
        """Every candidate with its score, best first (ties by name); the target itself is skipped."""
        target_task = self.resolve(target)
        resolved = {}
        for candidate in candidates:
            task = self.resolve(candidate)
            if task.name != target_task.name:
                resolved.setdefault(task.name, task)
        # One embedding call for the target and every candidate (one progress bar), then slice.
        texts = [self.instructions(target_task)] + [self.instructions(task) for task in resolved.values()]
        vectors = self.embed([text for group in texts for text in group])
        bounds = np.cumsum([0] + [len(group) for group in texts])
        blocks = [vectors[bounds[i] : bounds[i + 1]] for i in range(len(texts))]
        scored = [(name, self._aggregate(blocks[0] @ block.T)) for name, block in zip(resolved, blocks[1:])]
        return sorted(scored, key=lambda item: (-item[1], item[0]))

    def select_tasks(self, target: TaskRef, candidates: Iterable[TaskRef], k: int) -> list[tuple[str, float]]:
        """The ``k`` candidates most similar to ``target``, as ``(task_name, score)``, best first.

        The target is never its own candidate; duplicate candidates count once.

        Raises:
            SelectionError: ``k`` is not positive or exceeds the number of candidates (no silent
                clamping: asking for more tasks than exist is a configuration error), a task has no
                instruction, or a name is unknown.
        """
        candidates = list(candidates)
        ranking = self.rank(target, candidates)
        if not isinstance(k, int) or k < 1:
            raise SelectionError(f"k must be a positive integer, got {k!r}")
        if k > len(ranking):
            name = self.resolve(target).name
            raise SelectionError(f"k={k} exceeds the {len(ranking)} candidate tasks for target {name!r}")
        return ranking[:k]


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return dict(zip(data["texts"].tolist(), data["vectors"]))
    except Exception as err:  # noqa: BLE001 - a broken cache is rebuilt, not fatal
        logger.warning("Ignoring unreadable embedding cache %s: %s", path, err)
        return {}


def _write_cache(path: Path, memory: Mapping[str, np.ndarray]) -> None:
    texts = list(memory)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a file name
            np.savez(handle, texts=np.array(texts, dtype=str), vectors=np.stack([memory[t] for t in texts]))

    atomic_write(path, write)


def select_training_tasks(
    benchmark, target: str, k: int, selector: InstructionSelector | None = None, **options: Any
) -> list[str]:
    """The INSTA experiment's training set: the ``k`` seen tasks of ``benchmark`` most similar to ``target``.

    ``options`` build a selector when none is given (``embedder``, ``aggregate``, ``pools``). Train on them with
    ``benchmark.stream(seen=select_training_tasks(benchmark, target, k), held_out=[target])``.
    """
    if selector is None:
        selector = InstructionSelector(tasks=benchmark.tasks, show_progress=False, **options)
    target_task = benchmark.tasks.get(target) if isinstance(target, str) else target
    if target_task is None:
        raise SelectionError(f"unknown target task {target!r} in benchmark {benchmark.name!r}")
    return [name for name, _ in selector.select_tasks(target_task, [benchmark.tasks[n] for n in benchmark.seen], k)]


# ---------------------------------------------------------------------------------------------
# Replay uses (the `similarity` and `kpig+similarity` strategies)


def similar_seen_tasks(
    next_tasks: Iterable[TaskRef], seen_tasks: Iterable[TaskRef], k: int, selector: InstructionSelector
) -> list[tuple[str, float]]:
    """The ``k`` seen tasks most similar to the next stage, as ``(task_name, score)``, best first.

    A seen task's score is its highest :meth:`InstructionSelector.score` against any next-stage
    task (one closely related new task is reason enough to replay it). With one next task this is
    exactly ``selector.select_tasks(next_task, seen_tasks, k)``. Seen tasks that are also in the
    next stage are skipped. Unlike ``select_tasks``, ``k`` is clamped to the seen tasks available:
    early stages have fewer seen tasks than the replay budget, and that is not an error.
    """
    if not isinstance(k, int) or k < 0:
        raise SelectionError(f"k must be a non-negative integer, got {k!r}")
    next_names = [selector.resolve(t).name for t in next_tasks]
    if not next_names:
        raise SelectionError("similar_seen_tasks needs at least one next-stage task")
    seen = [t for t in seen_tasks if selector.resolve(t).name not in next_names]
    best: dict[str, float] = {}
    for target in dict.fromkeys(next_names):
        for name, score in selector.rank(target, seen):
            best[name] = max(score, best.get(name, -np.inf))
    ranking = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return ranking[:k]


def lowest_ig_among(similar: Sequence[tuple[str, float]], ig: Mapping[str, float], m: int) -> list[tuple[str, float]]:
    """The ``m`` tasks of ``similar`` with the lowest mean IG, as ``(task_name, ig)``, lowest first.

    Ties in IG go to the more similar task. Raises if a task of ``similar`` has no IG.
    """
    missing = [name for name, _ in similar if name not in ig]
    if missing:
        raise SelectionError(f"no IG for the similar tasks {missing}")
    order = {name: position for position, (name, _) in enumerate(similar)}
    chosen = sorted(order, key=lambda name: (float(ig[name]), order[name]))
    return [(name, float(ig[name])) for name in chosen[:m]]


def kpig_similarity_tasks(
    next_tasks: Iterable[TaskRef],
    seen_tasks: Iterable[TaskRef],
    ig: Mapping[str, float],
    m: int,
    selector: InstructionSelector,
    *,
    top_similar: int | None = None,
) -> list[tuple[str, float]]:
    """The ``kpig+similarity`` mix: the ``m`` lowest-IG tasks among the ``top_similar`` seen tasks
    most similar to the next stage (default ``2 * m``), as ``(task_name, ig)``, lowest IG first."""
    if not isinstance(m, int) or m < 0:
        raise SelectionError(f"m must be a non-negative integer, got {m!r}")
    top_similar = 2 * m if top_similar is None else top_similar
    if top_similar < m:
        raise SelectionError(f"top_similar={top_similar} must be at least m={m}")
    similar = similar_seen_tasks(next_tasks, seen_tasks, top_similar, selector)
    return lowest_ig_among(similar, ig, m)
