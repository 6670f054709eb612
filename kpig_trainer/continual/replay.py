"""Replay strategies: which earlier tasks (and instances) join the next stage.

Every strategy answers one :class:`ReplayRequest` with one :class:`ReplayChoice`, so the
paper's baselines are runs of the same code with another ``replay_strategy`` name:

* ``kpig``: sample ``N`` instances of every seen task, score their information gain with the
  model as it stands, replay the ``M`` tasks with the lowest mean IG (paper, Algorithm 1).
* ``random``: ``M`` seen tasks drawn at random, ``N`` instances each.
* ``entropy``: DynaInst-like: of the ``N`` sampled instances of every seen task, the ``M x N``
  with the highest predictive entropy on their outputs.
* ``all``: every seen task, ``N`` instances each (the replay-everything budget).
* ``none``: no replay.
* ``similarity`` (INSTA): the ``M`` seen tasks whose instructions are most similar to the next
  stage's (sentence-embedding cosine, :mod:`kpig_trainer.selection.selector`).
* ``kpig+similarity``: the ``M`` lowest-IG tasks among the ``2M`` most similar ones.

Model scores come from a :class:`~kpig_trainer.kpig.scoring.ModelScorer`, the pipeline evaluation
uses too; they are all-gathered, so that every rank sees the same numbers and selects the same
tasks (a rank that chose differently would hang the run). A task none of whose sampled instances
has a maskable key part has no IG: it is left out of the IG ranking (and logged), never chosen
for it.
Ties are broken by task name, never by dictionary or set order.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from kpig_trainer.data.records import Instance, Task
from kpig_trainer.kpig.scoring import ModelScorer, response_entropy

__all__ = [
    "ModelScorer",
    "ReplayChoice",
    "ReplayRequest",
    "ReplayStrategy",
    "get_replay_strategy",
    "lowest",
    "register_replay_strategy",
    "replay_strategy_class",
    "response_entropy",
]

logger = logging.getLogger(__name__)


@dataclass
class ReplayRequest:
    """What a strategy knows at a stage boundary.

    Attributes:
        stage: index of the stage about to be trained.
        seen_tasks: tasks trained in earlier stages, in stream order.
        next_tasks: the tasks of the stage about to be trained.
        candidates: train instances of every seen task.
        num_tasks: ``M``, tasks to replay.
        num_instances: ``N``, instances sampled (and replayed) per task.
        seed: seeds the sampling; the same request always gives the same choice.
        tasks: the stream's tasks by name (their definitions, for similarity strategies).
    """

    stage: int
    seen_tasks: list[str]
    next_tasks: list[str]
    candidates: Mapping[str, Sequence[Instance]]
    num_tasks: int
    num_instances: int
    seed: int = 0
    tasks: Mapping[str, Task] = field(default_factory=dict)

    def sample(self, task: str) -> list[Instance]:
        """``N`` instances of ``task``, drawn with a generator seeded by (seed, stage, task)."""
        pool = list(self.candidates[task])
        rng = random.Random(f"{self.seed}/{self.stage}/{task}")
        return rng.sample(pool, min(self.num_instances, len(pool)))


@dataclass
class ReplayChoice:
    """A strategy's answer: the replayed tasks and instances, with the scores behind them."""

    strategy: str
    tasks: list[str]
    instances: list[Instance]
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (instance ids, not instances) for the run state and logs."""
        return {
            "strategy": self.strategy,
            "tasks": list(self.tasks),
            "instances": [[i.task, i.id] for i in self.instances],
            "scores": dict(self.scores),
        }


class ReplayStrategy:
    """Base class: subclasses set ``name`` and implement :meth:`select`."""

    name = ""
    needs_model = False

    @classmethod
    def from_run(cls, runner) -> ReplayStrategy:
        """The strategy a continual run uses, with its options taken from the run's arguments
        (``runner.args``) and state; the base class takes none."""
        return cls()

    def select(self, request: ReplayRequest, scorer: ModelScorer | None = None) -> ReplayChoice:
        raise NotImplementedError

    def _choice(
        self,
        request: ReplayRequest,
        tasks: Sequence[str],
        scores: Mapping[str, float] | None = None,
        instances: Sequence[Instance] | None = None,
    ) -> ReplayChoice:
        if instances is None:
            instances = [i for t in tasks for i in request.sample(t)]
        return ReplayChoice(self.name, list(tasks), list(instances), dict(scores or {}))


class NoReplay(ReplayStrategy):
    name = "none"

    def select(self, request, scorer=None):
        return self._choice(request, [])


class ReplayAll(ReplayStrategy):
    name = "all"

    def select(self, request, scorer=None):
        return self._choice(request, request.seen_tasks)


class RandomReplay(ReplayStrategy):
    name = "random"

    def select(self, request, scorer=None):
        rng = random.Random(f"{request.seed}/{request.stage}/random-tasks")
        tasks = rng.sample(request.seen_tasks, min(request.num_tasks, len(request.seen_tasks)))
        return self._choice(request, sorted(tasks, key=request.seen_tasks.index))


class KPIGReplay(ReplayStrategy):
    """The ``M`` seen tasks with the lowest mean IG over ``N`` sampled instances."""

    name = "kpig"
    needs_model = True

    def task_scores(
        self, request: ReplayRequest, scorer: ModelScorer
    ) -> tuple[dict[str, float], dict[str, list[Instance]]]:
        """Mean IG per seen task over its sampled instances that have a maskable key part, and the
        sampled instances. A task with no such instance has no score (it cannot be ranked)."""
        samples = {t: request.sample(t) for t in request.seen_tasks}
        flat = [i for t in request.seen_tasks for i in samples[t]]
        values = iter(scorer.information_gain(flat))
        scores = {}
        for task in request.seen_tasks:
            task_values = [v for v in (next(values) for _ in samples[task]) if v is not None]
            if task_values:
                scores[task] = sum(task_values) / len(task_values)
        unscored = [t for t in request.seen_tasks if t not in scores]
        if unscored:
            logger.warning(
                "stage %d replay: no sampled instance of %s has a maskable key part; left out of the IG ranking",
                request.stage + 1,
                ", ".join(unscored),
            )
        return scores, samples

    def select(self, request, scorer=None):
        if not request.seen_tasks:
            return self._choice(request, [])
        if scorer is None:
            raise ValueError("replay strategy 'kpig' scores information gain and needs a model scorer")
        scores, samples = self.task_scores(request, scorer)
        tasks = lowest(scores, request.num_tasks)
        return self._choice(request, tasks, scores, [i for t in tasks for i in samples[t]])


class EntropyReplay(ReplayStrategy):
    """DynaInst-like: the ``M x N`` sampled instances with the highest predictive entropy."""

    name = "entropy"
    needs_model = True

    def select(self, request, scorer=None):
        if not request.seen_tasks:
            return self._choice(request, [])
        if scorer is None:
            raise ValueError("replay strategy 'entropy' scores predictive entropy and needs a model scorer")
        flat = [i for t in request.seen_tasks for i in request.sample(t)]
        values = scorer.entropy(flat)
        budget = request.num_tasks * request.num_instances
        order = sorted(range(len(flat)), key=lambda k: (-values[k], flat[k].task, flat[k].id))[:budget]
        chosen = [flat[k] for k in sorted(order)]
        per_task: dict[str, list[float]] = {}
        for instance, value in zip(flat, values):
            per_task.setdefault(instance.task, []).append(value)
        scores = {t: sum(v) / len(v) for t, v in per_task.items()}
        tasks = [t for t in request.seen_tasks if any(i.task == t for i in chosen)]
        return self._choice(request, tasks, scores, chosen)


class SimilarityReplay(ReplayStrategy):
    """INSTA: the ``M`` seen tasks most similar to the next stage's tasks (scores: cosine).

    Args:
        embedder: sentence-transformers model or path (default: the embedded all-MiniLM-L6-v2,
            or an aligned one from ``kpig align-embedder``).
        aggregate: ``mean`` or ``max`` over instruction variants.
        pools: instruction pools (``kpig diversify``), embedded through all their variants.
    """

    name = "similarity"

    def __init__(self, embedder: Any = None, aggregate: str = "mean", pools: Mapping[str, Any] | None = None) -> None:
        self.embedder, self.aggregate, self.pools = embedder, aggregate, pools
        self._selector = None

    @classmethod
    def from_run(cls, runner) -> SimilarityReplay:
        """``similarity_embedder`` and ``similarity_aggregate`` from the run, and its instruction pools."""
        return cls(
            embedder=runner.args.similarity_embedder,
            aggregate=runner.args.similarity_aggregate,
            pools=runner.instruction_pools,
        )

    def selector(self, request: ReplayRequest):
        from kpig_trainer.selection.selector import InstructionSelector

        if self._selector is None:  # the embedder loads once, on first use
            self._selector = InstructionSelector(
                self.embedder, self.aggregate, show_progress=False, tasks=request.tasks, pools=self.pools
            )
        return self._selector

    def ranked(self, request: ReplayRequest, k: int) -> list[tuple[str, float]]:
        from kpig_trainer.selection.selector import similar_seen_tasks

        if not request.tasks:
            raise ValueError(f"replay strategy {self.name!r} needs the tasks' instructions (ReplayRequest.tasks)")
        return similar_seen_tasks(request.next_tasks, request.seen_tasks, k, self.selector(request))

    def select(self, request, scorer=None):
        if not request.seen_tasks:
            return self._choice(request, [])
        ranked = self.ranked(request, request.num_tasks)
        return self._choice(request, [t for t, _ in ranked], dict(ranked))


class KPIGSimilarityReplay(SimilarityReplay):
    """The ``M`` lowest-IG tasks among the ``top_similar`` (default ``2M``) most similar seen tasks."""

    name = "kpig+similarity"
    needs_model = True

    def __init__(
        self,
        embedder: Any = None,
        aggregate: str = "mean",
        pools: Mapping[str, Any] | None = None,
        top_similar: int | None = None,
    ) -> None:
        super().__init__(embedder, aggregate, pools)
        self.top_similar = top_similar

    def select(self, request, scorer=None):
        from kpig_trainer.selection.selector import lowest_ig_among

        if not request.seen_tasks:
            return self._choice(request, [])
        if scorer is None:
            raise ValueError(f"replay strategy {self.name!r} scores information gain and needs a model scorer")
        similar = self.ranked(request, self.top_similar or 2 * request.num_tasks)
        narrowed = dataclasses.replace(request, seen_tasks=[t for t, _ in similar])
        ig, samples = KPIGReplay().task_scores(narrowed, scorer)
        similar = [(t, s) for t, s in similar if t in ig]
        chosen = [t for t, _ in lowest_ig_among(similar, ig, request.num_tasks)]
        return self._choice(request, chosen, ig, [i for t in chosen for i in samples[t]])


def lowest(scores: Mapping[str, float], k: int) -> list[str]:
    """The ``k`` keys with the lowest scores; ties broken by name, so every rank agrees."""
    return sorted(scores, key=lambda t: (scores[t], t))[:k]


REPLAY_STRATEGIES: dict[str, type[ReplayStrategy]] = {
    cls.name: cls
    for cls in (KPIGReplay, RandomReplay, EntropyReplay, ReplayAll, NoReplay, SimilarityReplay, KPIGSimilarityReplay)
}


def register_replay_strategy(cls: type[ReplayStrategy]) -> type[ReplayStrategy]:
    """Register a strategy class under its ``name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty 'name'")
    REPLAY_STRATEGIES[cls.name] = cls
    return cls


def replay_strategy_class(name: str) -> type[ReplayStrategy]:
    """The strategy class registered as ``name``."""
    try:
        return REPLAY_STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown replay strategy {name!r}; choose one of {sorted(REPLAY_STRATEGIES)}") from None


def get_replay_strategy(name: str, **kwargs: Any) -> ReplayStrategy:
    """Instantiate the strategy registered as ``name``."""
    return replay_strategy_class(name)(**kwargs)
