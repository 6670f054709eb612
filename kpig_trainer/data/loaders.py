"""Loaders: Super-NaturalInstructions task files, JSONL files and ``datasets.Dataset`` objects.

Each loader returns :class:`Task` records, validated, with errors naming the file, the task and
the record.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kpig_trainer.data.records import Constraints, DataError, Demonstration, Instance, Task, where

logger = logging.getLogger(__name__)

#: Record fields understood by :func:`tasks_from_records`, mapped to their default column names.
DEFAULT_COLUMNS = {
    "task": "task",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "id": "id",
    "key_parts": "key_parts",
    "category": "category",
}


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def _demonstrations(raw: Any, context: str) -> list[Demonstration]:
    demos = []
    for index, item in enumerate(raw or []):
        if not isinstance(item, Mapping) or "input" not in item or "output" not in item:
            raise DataError(f"{context}demonstration {index} needs 'input' and 'output'")
        demos.append(Demonstration(str(item["input"]), str(item["output"]), str(item.get("explanation", ""))))
    return demos


def _as_outputs(value: Any, context: str) -> list[str]:
    outputs = [value] if isinstance(value, str) else value
    if not isinstance(outputs, (list, tuple)):
        raise DataError(f"{context}output must be a string or a list of strings, got {type(value).__name__}")
    return [str(o) for o in outputs]


def load_superni_task(
    path: str | Path,
    *,
    annotation: Mapping[str, Any] | None = None,
    max_instances: int | None = None,
    skip_invalid: bool = False,
    strict_key_parts: bool = False,
) -> Task:
    """Load one Super-NaturalInstructions task file (``taskNNN_name.json``).

    Args:
        path: the task file.
        annotation: the task's entry of an annotations file (metric, scope, format, labels,
            format_spec, max_words, key_parts, category). Without one the task is scored with
            ROUGE-L and has no key parts.
        max_instances: keep only the first ``max_instances`` instances (file order).
        skip_invalid: drop invalid instances (empty output, ...) with one warning that counts
            them, instead of raising.
        strict_key_parts: raise when a key part does not occur in the definition (default: warn).

    Raises:
        DataError: the file is missing or malformed, or a record is invalid.
    """
    path = Path(path)
    data = _read_json(path)
    name = path.stem
    context = where(str(path), name)
    if not isinstance(data, Mapping):
        raise DataError(f"{context}expected a JSON object with 'Definition' and 'Instances'")
    for key in ("Definition", "Instances"):
        if key not in data:
            raise DataError(f"{context}missing field {key!r}")
    definition = data["Definition"]
    definition = definition[0] if isinstance(definition, list) and definition else definition
    if not isinstance(definition, str) or not definition.strip():
        raise DataError(f"{context}empty 'Definition'")
    annotation = dict(annotation or {})
    categories = data.get("Categories") or []
    category = annotation.get("category") or (categories[0] if categories else "uncategorized")
    key_parts = list(annotation.get("key_parts") or [])
    constraints = Constraints.from_dict(annotation, context=context) if annotation else Constraints()

    raw_instances = data["Instances"]
    if not isinstance(raw_instances, list):
        raise DataError(f"{context}'Instances' must be a list")
    if max_instances is not None:
        raw_instances = raw_instances[:max_instances]
    instances, skipped = [], 0
    for index, raw in enumerate(raw_instances):
        record = where(str(path), name, f"{index} (id {raw.get('id')!r})" if isinstance(raw, Mapping) else index)
        try:
            if not isinstance(raw, Mapping) or "output" not in raw:
                raise DataError(f"{record}instance needs 'input' and 'output'")
            instance = Instance(
                id=str(raw.get("id", f"{name}-{index}")),
                task=name,
                instruction=definition,
                input=str(raw.get("input", "")),
                outputs=_as_outputs(raw["output"], record),
                key_parts=key_parts,
            )
            instance.validate(str(path), f"{index} (id {instance.id!r})")
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
            continue
        instances.append(instance)
    if skipped:
        logger.warning("%sskipped %d invalid instance(s) of %d", context, skipped, len(raw_instances))
    if not instances:
        raise DataError(f"{context}no valid instance")

    task = Task(
        name=name,
        category=category,
        definition=definition,
        instances=instances,
        constraints=constraints,
        key_parts=key_parts,
        positive_examples=_demonstrations(data.get("Positive Examples"), context),
        negative_examples=_demonstrations(data.get("Negative Examples"), context),
        source=str(path),
        metadata={k: data[k] for k in ("Source", "Categories", "Domains", "Reasoning") if k in data},
    )
    task.validate(strict_key_parts=strict_key_parts)
    return task


def load_superni_tasks(
    directory: str | Path,
    names: Sequence[str] | None = None,
    *,
    annotations: Mapping[str, Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> dict[str, Task]:
    """Load SuperNI task files from ``directory`` (all ``*.json``, or the given ``names``).

    ``kwargs`` go to :func:`load_superni_task`. Returns tasks keyed by name, in file-name order
    (or in the order of ``names``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: task directory not found")
    if names is None:
        paths = sorted(directory.glob("*.json"))
        if not paths:
            raise DataError(f"{directory}: no task file (*.json)")
    else:
        paths = [directory / f"{name}.json" for name in names]
    annotations = annotations or {}
    tasks = {}
    for path in paths:
        tasks[path.stem] = load_superni_task(path, annotation=annotations.get(path.stem), **kwargs)
    return tasks


def tasks_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str,
    columns: Mapping[str, str] | None = None,
    annotations: Mapping[str, Mapping[str, Any]] | None = None,
    default_task: str | None = None,
    default_category: str = "uncategorized",
    skip_invalid: bool = False,
) -> dict[str, Task]:
    """Group flat instance records into tasks.

    Args:
        records: mappings with (after ``columns`` renaming) ``task``, ``instruction``, ``input``,
            ``output`` (a string or a list) and optionally ``id``, ``key_parts``, ``category``.
        source: a name for error messages (file path, dataset name).
        columns: maps our field names to the record's column names, e.g.
            ``{"instruction": "prompt", "output": "completion"}``; unmapped fields keep their names.
        annotations: per-task constraints and key parts (the annotations-file schema).
        default_task: task name for records without a ``task`` column.
        default_category: category for tasks without one.
        skip_invalid: drop invalid records with a warning instead of raising.

    The task definition is the instruction of its first record; records may carry their own
    instruction (kept per instance).
    """
    mapping = {**DEFAULT_COLUMNS, **(columns or {})}
    unknown = set(columns or {}) - set(DEFAULT_COLUMNS)
    if unknown:
        raise DataError(
            f"{source}: unknown field(s) in column mapping: {sorted(unknown)}; known: {sorted(DEFAULT_COLUMNS)}"
        )
    annotations = annotations or {}
    grouped: dict[str, list[Instance]] = {}
    categories: dict[str, str] = {}
    skipped = 0
    for index, record in enumerate(records):
        name = record.get(mapping["task"], default_task)
        context = where(source, name, index)
        try:
            if not name:
                raise DataError(f"{context}no task name (column {mapping['task']!r}) and no default_task")
            for field_name in ("instruction", "output"):
                if mapping[field_name] not in record:
                    raise DataError(f"{context}missing column {mapping[field_name]!r}")
            annotation = annotations.get(name, {})
            key_parts = record.get(mapping["key_parts"]) or annotation.get("key_parts") or []
            instance = Instance(
                id=str(record.get(mapping["id"]) or f"{name}-{index}"),
                task=str(name),
                instruction=str(record[mapping["instruction"]] or ""),
                input=str(record.get(mapping["input"]) or ""),
                outputs=_as_outputs(record[mapping["output"]], context),
                key_parts=list(key_parts),
            )
            instance.validate(source, index)
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
            continue
        grouped.setdefault(instance.task, []).append(instance)
        category = record.get(mapping["category"]) or annotations.get(instance.task, {}).get("category")
        categories.setdefault(instance.task, category or default_category)
    if skipped:
        logger.warning("%s: skipped %d invalid record(s)", source, skipped)
    if not grouped:
        raise DataError(f"{source}: no valid record")

    tasks = {}
    for name, instances in grouped.items():
        annotation = annotations.get(name, {})
        context = where(source, name)
        definition = instances[0].instruction
        task = Task(
            name=name,
            category=categories[name],
            definition=definition,
            instances=instances,
            constraints=Constraints.from_dict(annotation, context=context) if annotation else Constraints(),
            key_parts=list(annotation.get("key_parts") or instances[0].key_parts),
            source=source,
        )
        task.validate()
        tasks[name] = task
    return tasks


def load_jsonl_tasks(path: str | Path, **kwargs: Any) -> dict[str, Task]:
    """Load tasks from a JSONL file of instance records (see :func:`tasks_from_records`)."""
    path = Path(path)

    def records() -> Iterable[Mapping[str, Any]]:
        try:
            handle = path.open(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        with handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {lineno}: malformed JSON: {err.msg}") from None
                if not isinstance(record, Mapping):
                    raise DataError(f"{path}: line {lineno}: expected a JSON object")
                yield record

    return tasks_from_records(records(), source=str(path), **kwargs)


def load_dataset_tasks(dataset: Any, *, name: str = "dataset", **kwargs: Any) -> dict[str, Task]:
    """Load tasks from a ``datasets.Dataset`` (or any iterable of row mappings).

    Use ``columns`` to map its column names, e.g.
    ``load_dataset_tasks(ds, columns={"instruction": "prompt", "output": "answer"}, default_task="qa")``.
    """
    return tasks_from_records(iter(dataset), source=name, **kwargs)


def load_tasks(path: str | Path, **kwargs: Any) -> dict[str, Task]:
    """Load tasks from a SuperNI task directory, a SuperNI ``.json`` file or a ``.jsonl`` file."""
    path = Path(path)
    if path.is_dir():
        return load_superni_tasks(path, **kwargs)
    if path.suffix == ".jsonl":
        return load_jsonl_tasks(path, **kwargs)
    if path.suffix == ".json":
        annotations = kwargs.pop("annotations", None) or {}
        task = load_superni_task(path, annotation=annotations.get(path.stem), **kwargs)
        return {task.name: task}
    raise DataError(f"{path}: not a task directory, .json or .jsonl file")


@dataclass(frozen=True)
class Split:
    """Seen (trained) and held-out (evaluation only) task names."""

    seen: list[str]
    held_out: list[str]

    def check(self, known: Iterable[str], source: str = "split") -> None:
        """Raise :class:`DataError` naming every task of the split that is not ``known``."""
        known = set(known)
        for part, names in (("seen", self.seen), ("held_out", self.held_out)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise DataError(f"{source}: {part} names unknown task(s): {unknown}")
            duplicates = [n for n, c in Counter(names).items() if c > 1]
            if duplicates:
                raise DataError(f"{source}: {part} lists task(s) twice: {duplicates}")
        both = sorted(set(self.seen) & set(self.held_out))
        if both:
            raise DataError(f"{source}: task(s) both seen and held out: {both}")


def load_splits(path: str | Path, known_tasks: Iterable[str] | None = None) -> Split:
    """Read a splits file ``{"seen": [...], "held_out": [...]}`` and check it against ``known_tasks``."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, Mapping) or "seen" not in data:
        raise DataError(f"{path}: expected an object with 'seen' and 'held_out' lists")
    split = Split(list(data["seen"]), list(data.get("held_out", [])))
    if known_tasks is not None:
        split.check(known_tasks, str(path))
    return split
