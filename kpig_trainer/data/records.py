"""Task and instance records, with validation that names the file, task and record."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Sequence

from kpig_trainer.answers import normalize_answer

logger = logging.getLogger(__name__)

METRICS = ("ACC", "F1", "ROUGE", "BLEU", "Match", "GPT")
FORMAT_TYPES = (
    "list",
    "2d_list",
    "split",
    "number",
    "json",
    "uppercase_letter",
    "max_words",
    "one_answer",
    "contains",
    "pattern",
)
_FORMAT_KEYS = {"split": ("delimiter",), "max_words": ("n",), "contains": ("text",), "pattern": ("regex",)}


class DataError(ValueError):
    """Bad input data. The message names the file, the task and the record at fault."""


def where(source: str | None = None, task: str | None = None, record: Any = None) -> str:
    """Format a location prefix such as ``tasks/x.json: task 'x': record 3: ``."""
    parts = []
    if source:
        parts.append(str(source))
    if task:
        parts.append(f"task {task!r}")
    if record is not None:
        parts.append(f"record {record}")
    return ": ".join(parts) + (": " if parts else "")


@dataclass(frozen=True)
class Constraints:
    """What an answer of a task must look like, and how it is scored.

    Args:
        metric: performance metric: ``ACC``, ``F1``, ``ROUGE``, ``BLEU``, ``Match`` or ``GPT``
            (LLM judge), as annotated in the KPIG paper's tables 7-9.
        scope: answer scope: ``"In choice"`` (one of ``labels``), ``"In context"`` (spans of
            the input), ``"Noun"`` or ``"-"`` for none.
        format: the annotation's format string (``"List"``, ``"Split by ,"``, ``"-"``, ...).
        labels: allowed answers of an ``In choice`` task, spelled as the instruction does.
        labels_from_input: the options of an ``In choice`` task are written in each input.
        format_spec: machine-readable format, e.g. ``{"type": "split", "delimiter": ","}``;
            ``None`` when the format is free.
        max_words: a response with more words than this counts as wordy; ``None`` disables
            the wordy check.
        notes: free text for scorers.
    """

    metric: str = "ROUGE"
    scope: str = "-"
    format: str = "-"
    labels: tuple[str, ...] = ()
    labels_from_input: bool = False
    format_spec: Mapping[str, Any] | None = None
    max_words: int | None = None
    notes: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, context: str = "") -> "Constraints":
        """Build from an annotation mapping, ignoring keys that are not constraint fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "labels" in kwargs:
            kwargs["labels"] = tuple(kwargs["labels"] or ())
        constraints = cls(**kwargs)
        constraints.validate(context)
        return constraints

    def validate(self, context: str = "") -> None:
        if self.metric not in METRICS:
            raise DataError(f"{context}unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.scope == "In choice" and not self.labels and not self.labels_from_input:
            raise DataError(f"{context}scope 'In choice' needs a non-empty 'labels' list (or labels_from_input)")
        spec = self.format_spec
        if spec is not None:
            kind = spec.get("type") if isinstance(spec, Mapping) else None
            if kind not in FORMAT_TYPES:
                raise DataError(f"{context}format_spec type {kind!r} is not one of {FORMAT_TYPES}")
            missing = [key for key in _FORMAT_KEYS.get(kind, ()) if key not in spec]
            if missing:
                raise DataError(f"{context}format_spec {dict(spec)!r} lacks {missing}")
        if self.max_words is not None and (not isinstance(self.max_words, int) or self.max_words < 1):
            raise DataError(f"{context}max_words must be a positive integer, got {self.max_words!r}")

    @cached_property
    def label_set(self) -> frozenset[str]:
        """The labels after :func:`kpig_trainer.evaluation.normalize_answer`."""
        return frozenset(map(normalize_answer, self.labels))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["labels"] = list(self.labels)
        data["format_spec"] = dict(self.format_spec) if self.format_spec is not None else None
        return data


@dataclass(frozen=True)
class Demonstration:
    """A worked example of a task (SuperNI's positive or negative examples)."""

    input: str
    output: str
    explanation: str = ""


@dataclass
class Instance:
    """One ``(instruction, input, outputs)`` triple of a task.

    Args:
        id: unique id within the task.
        task: the task's name.
        instruction: the instruction shown to the model (the task definition or a variant).
        input: the instance's own context; may be empty.
        outputs: reference outputs; the first is the training target, all count for scoring.
        key_parts: spans of ``instruction`` that decide content, length and format of the answer.
    """

    id: str
    task: str
    instruction: str
    input: str
    outputs: list[str]
    key_parts: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        """The training target: the first reference output."""
        return self.outputs[0]

    def validate(self, source: str | None = None, record: Any = None) -> None:
        context = where(source, self.task, record if record is not None else self.id)
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise DataError(f"{context}empty instruction")
        if not isinstance(self.input, str):
            raise DataError(f"{context}input must be a string, got {type(self.input).__name__}")
        if not self.outputs:
            raise DataError(f"{context}no reference output")
        for output in self.outputs:
            if not isinstance(output, str) or not output.strip():
                raise DataError(f"{context}empty output {output!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Task:
    """A task: its definition, demonstrations, constraints and instances.

    Args:
        name: unique name, e.g. ``task1599_smcalflow_classification``.
        category: task category; stages of an SC stream group tasks by it.
        definition: the task's instruction as written by its authors.
        instances: the task's instances.
        constraints: answer constraints and metric.
        key_parts: spans of ``definition`` that decide the answer.
        positive_examples / negative_examples: demonstrations (held-out evaluation puts
            positive ones in the context).
        source: the file the task came from, for error messages.
        metadata: anything else the source carried.
    """

    name: str
    category: str
    definition: str
    instances: list[Instance] = field(default_factory=list)
    constraints: Constraints = field(default_factory=Constraints)
    key_parts: list[str] = field(default_factory=list)
    positive_examples: list[Demonstration] = field(default_factory=list)
    negative_examples: list[Demonstration] = field(default_factory=list)
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self, *, strict_key_parts: bool = False) -> list[str]:
        """Check the task and every instance; return the key parts not found in the definition.

        Raises:
            DataError: on an empty definition, an instance with no or empty output, or, with
                ``strict_key_parts``, a key part that does not occur in the instruction.
        """
        context = where(self.source, self.name)
        if not self.name:
            raise DataError(f"{where(self.source)}task without a name")
        if not self.definition.strip():
            raise DataError(f"{context}empty definition")
        if not self.category:
            raise DataError(f"{context}empty category")
        self.constraints.validate(context)
        seen_ids: set[str] = set()
        for index, instance in enumerate(self.instances):
            instance.validate(self.source, f"{index} (id {instance.id!r})")
            if instance.id in seen_ids:
                raise DataError(f"{where(self.source, self.name, index)}duplicate instance id {instance.id!r}")
            seen_ids.add(instance.id)
        check = self.key_part_check()
        missing = check.unmatched
        if missing:
            scope = "the definition" if check.instructions == 1 else f"its {check.instructions} instructions"
            message = f"{context}key parts not found in {scope}: {missing}" + (
                "; nothing in this task can be masked, so its masked twins equal the instances (IG 0, temperature 2)"
                if not check.maskable
                else ""
            )
            if strict_key_parts:
                raise DataError(message)
            logger.warning(message)
        return missing

    def key_part_check(self) -> "KeyPartCheck":
        """Which key parts occur where: the definition and every distinct (instruction, key
        parts) pair of the instances are matched once each."""
        pairs = dict.fromkeys(
            [(self.definition, tuple(self.key_parts)), *((i.instruction, tuple(i.key_parts)) for i in self.instances)]
        )
        unmatched: dict[str, None] = {}
        maskable = False
        for instruction, parts in pairs:
            if not parts:
                continue
            missing = unmatched_key_parts(instruction, parts)
            unmatched.update(dict.fromkeys(missing))
            maskable = maskable or len(missing) < len([p for p in parts if p.strip()])
        return KeyPartCheck(
            has_key_parts=any(parts for _, parts in pairs),
            maskable=maskable,
            unmatched=list(unmatched),
            instructions=len({i for i, _ in pairs}),
        )

    @property
    def maskable(self) -> bool:
        """Whether masking changes anything: some key part occurs in some instruction of the task.
        A task without it has masked twins equal to its instances (IG 0 by construction)."""
        return self.key_part_check().maskable

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "metric": self.constraints.metric,
            "instances": self.num_instances,
            "key_parts": len(self.key_parts),
            "maskable": self.maskable,
        }


@dataclass(frozen=True)
class KeyPartCheck:
    """Result of :meth:`Task.key_part_check`.

    Attributes:
        has_key_parts: the task or any instance names a key part.
        maskable: at least one key part occurs in the instruction it belongs to.
        unmatched: key parts that do not occur in (one of) their instructions, in first-seen order.
        instructions: distinct instructions checked (the definition included).
    """

    has_key_parts: bool
    maskable: bool
    unmatched: list[str]
    instructions: int


def unmatched_key_parts(instruction: str, key_parts: Sequence[str]) -> list[str]:
    """Key parts that the robust matcher of :mod:`kpig_trainer.data.masking` cannot find."""
    if not key_parts:
        return []
    from kpig_trainer.data.masking import find_key_part_spans

    return list(find_key_part_spans(instruction, key_parts).unmatched)
