"""The benchmark shipped inside the package: the KPIG paper's SuperNI tasks and a demo subset.

Data lives in ``kpig_trainer/benchmark/superni_kpig/`` (see its README for attribution, the
licence and the annotation rules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kpig_trainer.data.loaders import _read_json, load_splits, load_superni_tasks
from kpig_trainer.data.records import DataError, Task
from kpig_trainer.data.stream import Stream, build_stream

BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "benchmark" / "superni_kpig"
BENCHMARKS = ("superni-kpig", "demo")


def load_annotations(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Per-task annotations (metric, scope, format, labels, format_spec, max_words, key parts)."""
    path = Path(path) if path else BENCHMARK_DIR / "annotations.json"
    data = _read_json(path)
    if not isinstance(data, Mapping):
        raise DataError(f"{path}: expected an object keyed by task name")
    return {name: dict(entry) for name, entry in data.items()}


@dataclass
class Benchmark:
    """Tasks with their seen / held-out split and the per-task caps the benchmark suggests."""

    name: str
    tasks: dict[str, Task]
    seen: list[str]
    held_out: list[str]
    max_train_instances: int | None = None
    max_test_instances: int | None = 100

    def stream(self, **kwargs: Any) -> Stream:
        """Build a :class:`Stream`: keyword arguments go to :func:`build_stream` (``test_sampling``,
        ``test_size``, ...) and override the benchmark's caps."""
        options = {"max_train_instances": self.max_train_instances, "max_test_instances": self.max_test_instances}
        options.update(kwargs)
        seen = options.pop("seen", None) or self.seen
        held_out = options.pop("held_out", None)
        held_out = self.held_out if held_out is None else held_out
        return build_stream(self.tasks, seen, held_out, **options)


def load_benchmark(name: str = "demo", *, directory: str | Path | None = None) -> Benchmark:
    """Load a shipped benchmark: ``"superni-kpig"`` (101 tasks) or ``"demo"`` (its CPU subset).

    Args:
        name: benchmark name.
        directory: another folder of the same layout (``tasks/``, ``splits.json``,
            ``annotations.json``, optional ``demo.json``).
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")
    root = Path(directory) if directory else BENCHMARK_DIR
    annotations = load_annotations(root / "annotations.json")
    if name == "demo":
        demo = _read_json(root / "demo.json")
        seen, held_out = list(demo["seen"]), list(demo["held_out"])
        tasks = load_superni_tasks(root / "tasks", seen + held_out, annotations=annotations)
        return Benchmark(
            "demo", tasks, seen, held_out, demo.get("max_train_instances"), demo.get("max_test_instances")
        )
    tasks = load_superni_tasks(root / "tasks", annotations=annotations)
    split = load_splits(root / "splits.json", known_tasks=tasks)
    return Benchmark(name, tasks, split.seen, split.held_out)


def demo_selection(directory: str | Path | None = None) -> dict[str, Any]:
    """The demo subset's definition (``demo.json``)."""
    root = Path(directory) if directory else BENCHMARK_DIR
    return json.loads((root / "demo.json").read_text(encoding="utf-8"))
