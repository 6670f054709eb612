"""Continual streams: seen / held-out tasks, per-task train/test splits, and stages.

Two orders, as in the KPIG paper: ``ST`` trains one task per stage, ``SC`` one category per
stage. Splits are deterministic per task (seeded by the stream seed and the task name), so a
task's split does not change when other tasks are added or the stage order changes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from kpig_trainer.data.records import DataError, Instance, Task
from kpig_trainer.data.sampling import (
    TEST_SAMPLINGS,
    balanced_sample,
    check_test_sampling,
    label_key,
    self_bleu_sample,
)

logger = logging.getLogger(__name__)

# label_key and balanced_sample live in .sampling; they stay importable from here.
__all__ = [
    "ORDERS",
    "STAGE_ORDERS",
    "TEST_SAMPLINGS",
    "Stage",
    "Stream",
    "balanced_sample",
    "build_stream",
    "label_key",
    "plan_stages",
    "split_task",
]

ORDERS = ("ST", "SC")
STAGE_ORDERS = ("given", "shuffle")


@dataclass(frozen=True)
class Stage:
    """One step of the stream: the tasks trained together."""

    index: int
    name: str
    tasks: tuple[str, ...]


@dataclass
class Stream:
    """A continual stream of stages, with each task's train and test instances.

    Attributes:
        stages: the stages, in training order.
        tasks: every task of the stream (seen and held-out), by name.
        train: train instances of each seen task.
        test: test instances of each seen and held-out task.
        seen / held_out: task names.
        order: ``"ST"`` or ``"SC"``.
        seed: the seed the splits and the order were drawn with.
    """

    stages: list[Stage]
    tasks: dict[str, Task]
    train: dict[str, list[Instance]]
    test: dict[str, list[Instance]]
    seen: list[str]
    held_out: list[str]
    order: str
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)

    def stage_of(self, task: str) -> int:
        """Index of the stage that trains ``task``."""
        for stage in self.stages:
            if task in stage.tasks:
                return stage.index
        raise KeyError(f"task {task!r} is not trained in this stream")

    def seen_before(self, stage_index: int) -> list[str]:
        """Tasks trained in the stages before ``stage_index``, in stream order."""
        return [t for stage in self.stages[:stage_index] for t in stage.tasks]

    def stage_instances(self, stage_index: int) -> list[Instance]:
        """Train instances of a stage's own tasks (replay is added by the continual loop)."""
        return [i for t in self.stages[stage_index].tasks for i in self.train[t]]

    def to_dataset_dict(self):
        """The stream as a ``datasets.DatasetDict``.

        Splits: ``stage_1`` ... ``stage_T`` (train instances of each stage), ``test`` (test
        instances of seen tasks, with the stage that trains them) and ``held_out`` (test
        instances of held-out tasks, stage ``-1``). Columns: ``id, task, category, stage,
        instruction, input, outputs, key_parts``.
        """
        from datasets import Dataset, DatasetDict

        from kpig_trainer.data import instances_to_columns

        splits = {}
        for stage in self.stages:
            rows = [i for t in stage.tasks for i in self.train[t]]
            splits[f"stage_{stage.index + 1}"] = Dataset.from_dict(
                instances_to_columns(rows, self.tasks, stage=stage.index), features=_features()
            )
        test_rows = [(i, self.stage_of(t)) for t in self.seen for i in self.test[t]]
        splits["test"] = Dataset.from_dict(
            instances_to_columns([i for i, _ in test_rows], self.tasks, stage=[s for _, s in test_rows]),
            features=_features(),
        )
        held = [i for t in self.held_out for i in self.test[t]]
        splits["held_out"] = Dataset.from_dict(instances_to_columns(held, self.tasks, stage=-1), features=_features())
        return DatasetDict(splits)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per task: name, category, metric, role, stage, train and test counts."""
        rows = []
        for name in self.seen + self.held_out:
            task = self.tasks[name]
            rows.append(
                {
                    "task": name,
                    "category": task.category,
                    "metric": task.constraints.metric,
                    "role": "seen" if name in self.seen else "held-out",
                    "stage": self.stage_of(name) + 1 if name in self.seen else "-",
                    "train": len(self.train.get(name, [])),
                    "test": len(self.test.get(name, [])),
                    "key_parts": len(task.key_parts),
                    "maskable": "yes" if task.maskable else "no",
                }
            )
        return rows


def _features():
    from datasets import Features, Value
    from datasets import Sequence as Seq

    return Features(
        {
            "id": Value("string"),
            "task": Value("string"),
            "category": Value("string"),
            "stage": Value("int32"),
            "instruction": Value("string"),
            "input": Value("string"),
            "outputs": Seq(Value("string")),
            "key_parts": Seq(Value("string")),
        }
    )


def _n_test(total: int, test_size: int | float, cap: int | None, task: str) -> int:
    """Test instances of a seen task: a fraction of it, or a count capped to half of it.

    A count (``test_size >= 1``, e.g. the paper's 100) asks for a number a small task may not
    have: it is lowered to half the task's instances, so the other half still trains, and a
    warning names the task. A fraction is taken as asked (at least 1 test and 1 train).
    """
    if isinstance(test_size, float) and 0 < test_size < 1:
        n = max(1, round(total * test_size))
    elif isinstance(test_size, int) and test_size >= 1:
        n = test_size
    else:
        raise DataError(f"test_size must be a fraction in (0, 1) or a positive count, got {test_size!r}")
    if cap is not None:
        n = min(n, cap)
    if isinstance(test_size, int) and n > total // 2 and total >= 2:
        logger.warning(
            "task %r: %d instances cannot give %d test instances and keep half for training; taking %d test instances",
            task,
            total,
            n,
            total // 2,
        )
        n = total // 2
    if n >= total:
        raise DataError(f"task {task!r}: {total} instance(s) cannot give {n} test and at least 1 train instance")
    return n


def split_task(
    task: Task,
    *,
    seed: int,
    test_size: int | float = 0.2,
    max_train_instances: int | None = None,
    max_test_instances: int | None = None,
    balance_labels: bool = True,
    test_only: bool = False,
    test_sampling: str = "balanced",
) -> tuple[list[Instance], list[Instance]]:
    """Deterministic train/test split of one task.

    The random generator is seeded with ``(seed, task name)``. Test instances are drawn first
    (their number: see :func:`_n_test`), by ``test_sampling``: ``"balanced"``, a random draw
    spread over labels for ``In choice`` tasks when ``balance_labels`` (plain random
    otherwise); ``"self_bleu"``, the same label balance with a low-Self-BLEU pick within it
    (:func:`~kpig_trainer.data.sampling.self_bleu_sample`). Train instances are the rest,
    shuffled and capped at ``max_train_instances``. Both keep file order. With ``test_only``
    (held-out tasks) every instance may be drawn for the test and train is empty.
    """
    check_test_sampling(test_sampling)
    rng = random.Random(f"{seed}/{task.name}")
    pool = list(task.instances)
    if test_only:
        n_test = min(len(pool), max_test_instances) if max_test_instances else len(pool)
    else:
        n_test = _n_test(len(pool), test_size, max_test_instances, task.name)
    by_label = balance_labels and task.constraints.scope == "In choice"
    if test_sampling == "self_bleu":
        test = self_bleu_sample(pool, n_test, rng, by_label=by_label) if n_test < len(pool) else list(pool)
    elif by_label:
        test = balanced_sample(pool, n_test, rng)
    else:
        test = rng.sample(pool, n_test)
    test_ids = {id(i) for i in test}
    rest = [i for i in pool if id(i) not in test_ids]
    if test_only:
        rest = []
    rng.shuffle(rest)
    train = rest[:max_train_instances] if max_train_instances is not None else rest
    position = {id(i): k for k, i in enumerate(pool)}
    return sorted(train, key=lambda i: position[id(i)]), sorted(test, key=lambda i: position[id(i)])


def plan_stages(
    tasks: Mapping[str, Task],
    seen: Sequence[str],
    *,
    order: str = "ST",
    stage_order: str = "given",
    seed: int = 42,
    categories: Sequence[str] | None = None,
) -> list[Stage]:
    """Group seen tasks into stages.

    ``ST``: one task per stage, in the order of ``seen``. ``SC``: one category per stage, in the
    order the categories first appear in ``seen`` (or the explicit ``categories`` order); tasks
    of a category keep their ``seen`` order. ``stage_order="shuffle"`` shuffles the stages
    with ``seed``.
    """
    if order not in ORDERS:
        raise DataError(f"order must be one of {ORDERS}, got {order!r}")
    if stage_order not in STAGE_ORDERS:
        raise DataError(f"stage_order must be one of {STAGE_ORDERS}, got {stage_order!r}")
    if not seen:
        raise DataError("the stream has no stage: no seen task")
    if order == "ST":
        groups = [(name, [name]) for name in seen]
    else:
        by_category: dict[str, list[str]] = {}
        for name in seen:
            by_category.setdefault(tasks[name].category, []).append(name)
        if categories is not None:
            empty = [c for c in categories if c not in by_category]
            if empty:
                raise DataError(f"categories with no seen task: {empty}; seen categories: {sorted(by_category)}")
            missing = [c for c in by_category if c not in categories]
            if missing:
                raise DataError(f"seen categories missing from the category order: {missing}")
            names = list(categories)
        else:
            names = list(by_category)
        groups = [(c, by_category[c]) for c in names]
    if stage_order == "shuffle":
        random.Random(f"{seed}/stages").shuffle(groups)
    return [Stage(index, name, tuple(members)) for index, (name, members) in enumerate(groups)]


def build_stream(
    tasks: Mapping[str, Task] | Iterable[Task],
    seen: Sequence[str],
    held_out: Sequence[str] = (),
    *,
    order: str = "ST",
    stage_order: str = "given",
    seed: int = 42,
    test_size: int | float = 0.2,
    max_train_instances: int | None = None,
    max_test_instances: int | None = 100,
    balance_labels: bool = True,
    categories: Sequence[str] | None = None,
    test_sampling: str = "balanced",
) -> Stream:
    """Build a continual stream.

    Args:
        tasks: the tasks, by name (or an iterable of tasks).
        seen: tasks to train, in the given stage order.
        held_out: tasks only evaluated.
        order: ``"ST"`` (one task per stage) or ``"SC"`` (one category per stage).
        stage_order: ``"given"`` or ``"shuffle"`` (seeded).
        seed: seeds splits and shuffles.
        test_size: per seen task, a fraction or a count of test instances; a count is
            lowered to half of a task that is too small for it (with a warning).
        max_train_instances / max_test_instances: caps per task.
        balance_labels: spread test instances over labels for ``In choice`` tasks.
        categories: explicit category order for ``SC``.
        test_sampling: how test instances are drawn: ``"balanced"`` (seeded, label-balanced)
            or ``"self_bleu"`` (label-balanced and diverse, as the KPIG paper; see
            :func:`~kpig_trainer.data.sampling.self_bleu_sample`).

    Raises:
        DataError: a split names an unknown task, a task is both seen and held out, there is
            no stage, a category has no task, a task is too small to split, or
            ``test_sampling`` is unknown.
    """
    from kpig_trainer.data.loaders import Split

    if not isinstance(tasks, Mapping):
        tasks = {t.name: t for t in tasks}
    Split(list(seen), list(held_out)).check(tasks, "stream")
    stages = plan_stages(tasks, seen, order=order, stage_order=stage_order, seed=seed, categories=categories)
    train, test = {}, {}
    for name in seen:
        train[name], test[name] = split_task(
            tasks[name],
            seed=seed,
            test_size=test_size,
            max_train_instances=max_train_instances,
            max_test_instances=max_test_instances,
            balance_labels=balance_labels,
            test_sampling=test_sampling,
        )
    for name in held_out:
        _, test[name] = split_task(
            tasks[name],
            seed=seed,
            max_test_instances=max_test_instances,
            balance_labels=balance_labels,
            test_only=True,
            test_sampling=test_sampling,
        )
    used = {n: tasks[n] for n in list(seen) + list(held_out)}
    settings = {
        "order": order,
        "stage_order": stage_order,
        "seed": seed,
        "test_size": test_size,
        "max_train_instances": max_train_instances,
        "max_test_instances": max_test_instances,
        "balance_labels": balance_labels,
        "test_sampling": test_sampling,
    }
    return Stream(stages, used, train, test, list(seen), list(held_out), order, seed, settings)
