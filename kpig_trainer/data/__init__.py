"""Data layer: task and instance records, loaders, streams and the shipped benchmark."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from kpig_trainer.data.benchmark import BENCHMARK_DIR, Benchmark, load_annotations, load_benchmark
from kpig_trainer.data.loaders import (
    DEFAULT_COLUMNS,
    Split,
    load_dataset_tasks,
    load_jsonl_tasks,
    load_splits,
    load_superni_task,
    load_superni_tasks,
    load_tasks,
    tasks_from_records,
)
from kpig_trainer.data.prompts import PLAIN_TEMPLATE, format_message, format_prompt, has_chat_template
from kpig_trainer.data.records import Constraints, DataError, Demonstration, Instance, Task
from kpig_trainer.data.sampling import TEST_SAMPLINGS, balanced_sample, self_bleu_sample
from kpig_trainer.data.stream import Stage, Stream, build_stream, plan_stages, split_task


def instances_to_columns(
    instances: Sequence[Instance], tasks: Mapping[str, Task], stage: int | Sequence[int] = -1
) -> dict[str, list[Any]]:
    """Column-major dict of instances, ready for ``datasets.Dataset.from_dict``."""
    stages = [stage] * len(instances) if isinstance(stage, int) else list(stage)
    return {
        "id": [i.id for i in instances],
        "task": [i.task for i in instances],
        "category": [tasks[i.task].category for i in instances],
        "stage": stages,
        "instruction": [i.instruction for i in instances],
        "input": [i.input for i in instances],
        "outputs": [list(i.outputs) for i in instances],
        "key_parts": [list(i.key_parts) for i in instances],
    }


__all__ = [
    "BENCHMARK_DIR",
    "Benchmark",
    "PLAIN_TEMPLATE",
    "format_message",
    "format_prompt",
    "has_chat_template",
    "Constraints",
    "DEFAULT_COLUMNS",
    "DataError",
    "Demonstration",
    "Instance",
    "Split",
    "Stage",
    "Stream",
    "TEST_SAMPLINGS",
    "Task",
    "balanced_sample",
    "build_stream",
    "instances_to_columns",
    "load_annotations",
    "load_benchmark",
    "load_dataset_tasks",
    "load_jsonl_tasks",
    "load_splits",
    "load_superni_task",
    "load_superni_tasks",
    "load_tasks",
    "plan_stages",
    "self_bleu_sample",
    "split_task",
    "tasks_from_records",
]
