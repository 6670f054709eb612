"""Align the instruction embedder to the meta-dataset's instruction style (INSTA, section 3.2).

Training pairs (:func:`build_alignment_pairs`):

- **positives**: two instructions of the same task. With a pool of at least two variants they are
  pool variants. A task with only its definition gets *views* of it (:func:`instruction_views`):
  the definition itself, the definition with one sentence dropped (each sentence's turn, seeded
  order), the task's key parts joined into one line (what evolved variants keep), and the
  definition followed by its first positive example. Dropped-sentence and key-part views mimic
  what paraphrases and evolutions change and keep; the example view teaches that the worked
  example does not change what the task is.
- **negatives**: an instruction of the anchor's task against one of a different task whose *base*
  task similarity (before training) is below ``negative_threshold`` (the paper: 0.3), so related
  tasks are never pushed apart.

Loss: ``CosineSimilarityLoss`` (target cosine 1 for positives, 0 for negatives) by default, or
``CoSENTLoss`` on the same pairs, trained with ``SentenceTransformerTrainer`` (``model.fit`` is a
deprecated wrapper around it in sentence-transformers v3+). The result is saved atomically (temp
folder + rename) and loads by path: ``InstructionSelector(embedder=out_dir)``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kpig_trainer.data.records import Task
from kpig_trainer.fileio import replace_directory
from kpig_trainer.selection.selector import InstructionSelector, Pools, SelectionError, TaskRef, load_embedder

logger = logging.getLogger(__name__)

ALIGNMENT_LOSSES = ("cosine", "cosent")
METADATA_FILE = "kpig_alignment.json"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


@dataclass(frozen=True)
class InstructionPair:
    """Two instructions and the tasks they belong to; same task = positive."""

    text_a: str
    text_b: str
    task_a: str
    task_b: str

    @property
    def same_task(self) -> bool:
        return self.task_a == self.task_b


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (a split after ``.!?`` followed by whitespace and a capital, digit or quote)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def instruction_views(task: Task, pools: Pools | None = None, *, max_views: int = 4, seed: int = 0) -> list[str]:
    """Distinct instructions of one task used as positives of each other (see the module docstring).

    The first view is the task's own instruction (the pool's first variant or the definition).
    """
    pool = (pools or {}).get(task.name) or []
    variants = [entry["instruction"] for entry in pool if str(entry.get("instruction") or "").strip()]
    if len(variants) >= 2:
        rest = variants[1:]
        random.Random(f"{seed}:{task.name}").shuffle(rest)
        return list(dict.fromkeys([variants[0], *rest]))[:max_views]
    base = variants[0] if variants else task.definition
    if not base.strip():
        raise SelectionError(f"task {task.name!r} has no instruction: empty definition and no pool")
    views = [base]
    sentences = split_sentences(base)
    if len(sentences) >= 2:
        order = list(range(len(sentences)))
        random.Random(f"{seed}:{task.name}").shuffle(order)
        for drop in order[:2]:
            views.append(" ".join(s for i, s in enumerate(sentences) if i != drop))
    if task.key_parts:
        views.append("; ".join(task.key_parts) + ".")
    if task.positive_examples:
        example = task.positive_examples[0]
        views.append(f"{base}\nExample input: {example.input}\nExample output: {example.output}")
    return list(dict.fromkeys(v for v in views if v.strip()))[:max_views]


def build_alignment_pairs(
    tasks: Sequence[TaskRef],
    selector: InstructionSelector,
    *,
    pools: Pools | None = None,
    negative_threshold: float | None = 0.3,
    positives_per_task: int = 2,
    negatives_per_positive: int = 1,
    max_views: int = 4,
    seed: int = 0,
) -> list[InstructionPair]:
    """Positive and negative instruction pairs over ``tasks`` (see the module docstring).

    ``negative_threshold=None`` accepts every different task as a negative (for evaluation sets).
    Base similarities come from ``selector`` (task level, its ``aggregate`` over pool variants).
    """
    resolved = [selector.resolve(task) for task in tasks]
    names = [task.name for task in resolved]
    if len(set(names)) < 2:
        raise SelectionError("alignment needs at least two distinct tasks")
    pools = selector.pools if pools is None else pools
    views = {task.name: instruction_views(task, pools, max_views=max_views, seed=seed) for task in resolved}
    _, base = selector.similarity_matrix(resolved)
    rng = random.Random(seed)
    pairs: list[InstructionPair] = []
    no_positive, no_negative = [], []
    for row, name in enumerate(names):
        combos = list(itertools.combinations(views[name], 2))
        if not combos:
            no_positive.append(name)
            continue
        rng.shuffle(combos)
        eligible = [
            other
            for col, other in enumerate(names)
            if other != name and (negative_threshold is None or base[row, col] < negative_threshold)
        ]
        if not eligible:
            no_negative.append(name)
        for text_a, text_b in combos[:positives_per_task]:
            pairs.append(InstructionPair(text_a, text_b, name, name))
            for other in rng.sample(eligible, min(negatives_per_positive, len(eligible))):
                pairs.append(InstructionPair(text_a, rng.choice(views[other]), name, other))
    if no_positive:
        logger.warning("No positive pair (a single instruction view) for %d tasks: %s", len(no_positive), no_positive)
    if no_negative:
        logger.warning("No negative below %s for %d tasks: %s", negative_threshold, len(no_negative), no_negative)
    if not any(p.same_task for p in pairs):
        raise SelectionError("no positive pair: every task has a single instruction view")
    return pairs


def separation_report(selector: InstructionSelector, pairs: Sequence[InstructionPair]) -> dict[str, Any]:
    """How well ``selector`` separates same-task from different-task instructions on ``pairs``.

    Returns ``same_task_mean`` and ``different_task_mean`` (mean cosine of the positive and
    negative pairs), ``gap`` (their difference) and ``ranking_accuracy``: over positive pairs
    ``(a, b)``, the share where ``b`` is closer to ``a`` than every text of another task in
    ``pairs`` is; plus the counts. Use pairs the embedder was not trained on.
    """
    positives = [p for p in pairs if p.same_task]
    negatives = [p for p in pairs if not p.same_task]
    if not positives or not negatives:
        raise SelectionError("separation_report needs same-task and different-task pairs")
    task_of: dict[str, set[str]] = {}
    for p in pairs:
        task_of.setdefault(p.text_a, set()).add(p.task_a)
        task_of.setdefault(p.text_b, set()).add(p.task_b)
    texts = list(task_of)
    index = {text: i for i, text in enumerate(texts)}
    vectors = selector.embed(texts)
    cosine = vectors @ vectors.T

    def mean_cosine(subset: Sequence[InstructionPair]) -> float:
        return float(np.mean([cosine[index[p.text_a], index[p.text_b]] for p in subset]))

    correct = 0
    for p in positives:
        a = index[p.text_a]
        others = [index[t] for t, owners in task_of.items() if p.task_a not in owners]
        correct += bool(not others or cosine[a, index[p.text_b]] > cosine[a, others].max())
    same, different = mean_cosine(positives), mean_cosine(negatives)
    return {
        "same_task_mean": same,
        "different_task_mean": different,
        "gap": same - different,
        "ranking_accuracy": correct / len(positives),
        "same_task_pairs": len(positives),
        "different_task_pairs": len(negatives),
        "texts": len(texts),
    }


@dataclass
class AlignmentResult:
    """What :func:`align_embedder` did: the saved folder, the trained model and its training pairs."""

    path: Path
    model: Any
    pairs: list[InstructionPair]
    train_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


def align_embedder(
    tasks: Sequence[TaskRef] | Mapping[str, Task],
    out_dir: str | os.PathLike,
    pools: Pools | None = None,
    negative_threshold: float = 0.3,
    epochs: float = 1,
    *,
    embedder: Any = None,
    loss: str = "cosine",
    batch_size: int = 16,
    learning_rate: float = 2e-5,
    max_seq_length: int | None = 128,
    positives_per_task: int = 2,
    negatives_per_positive: int = 1,
    max_views: int = 4,
    max_steps: int = -1,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> AlignmentResult:
    """Fine-tune ``embedder`` (default: the embedded MiniLM) on instruction pairs of ``tasks``.

    Args:
        tasks: the tasks to align on (Task objects, or a name -> Task mapping). Keep held-out
            tasks out if you evaluate on them.
        out_dir: where the aligned model is saved; it appears only complete (temp folder + rename).
        pools: instruction pools; a task with >= 2 variants draws its positives from them.
        negative_threshold: a different task is a negative only below this base similarity.
        epochs: training epochs (``max_steps > 0`` overrides).
        loss: ``"cosine"`` (CosineSimilarityLoss to 1 / 0) or ``"cosent"`` (CoSENTLoss, same pairs).
        max_seq_length: token limit while training (CPU cost); the saved model keeps the base limit.
        overwrite: replace an existing ``out_dir``; otherwise an existing one is an error.
    """
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses

    if loss not in ALIGNMENT_LOSSES:
        raise SelectionError(f"loss must be one of {ALIGNMENT_LOSSES}, got {loss!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SelectionError(f"output folder {str(out)!r} exists; pass overwrite=True (--overwrite) to replace it")
    task_map = dict(tasks) if isinstance(tasks, Mapping) else None
    task_list = list(task_map.values()) if task_map is not None else list(tasks)
    base_model = load_embedder(embedder)
    model = copy.deepcopy(base_model) if base_model is embedder else base_model
    selector = InstructionSelector(model, tasks=task_map, pools=pools, show_progress=show_progress)
    base_fingerprint = selector.fingerprint
    pairs = build_alignment_pairs(
        task_list,
        selector,
        pools=pools,
        negative_threshold=negative_threshold,
        positives_per_task=positives_per_task,
        negatives_per_positive=negatives_per_positive,
        max_views=max_views,
        seed=seed,
    )
    task_names = [selector.resolve(t).name for t in task_list]
    del selector  # it caches under the base fingerprint; the model is about to change in place
    dataset = Dataset.from_dict(
        {
            "sentence1": [p.text_a for p in pairs],
            "sentence2": [p.text_b for p in pairs],
            "score": [1.0 if p.same_task else 0.0 for p in pairs],
        }
    )
    loss_module = losses.CosineSimilarityLoss(model) if loss == "cosine" else losses.CoSENTLoss(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp / "trainer"),
            num_train_epochs=epochs,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=0.1,
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            seed=seed,
            data_seed=seed,
            disable_tqdm=not show_progress,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        base_length = model.max_seq_length
        if max_seq_length:
            model.max_seq_length = min(base_length, max_seq_length)
        started = time.perf_counter()
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss_module)
        history = trainer.train()
        seconds = time.perf_counter() - started
        model.max_seq_length = base_length
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save(str(tmp / "model"), create_model_card=False)
        metadata = {
            "base_fingerprint": base_fingerprint,
            "loss": loss,
            "epochs": epochs,
            "max_steps": max_steps,
            "negative_threshold": negative_threshold,
            "tasks": task_names,
            "positive_pairs": sum(p.same_task for p in pairs),
            "negative_pairs": sum(not p.same_task for p in pairs),
            "train_seconds": round(seconds, 2),
            "train_loss": getattr(history, "training_loss", None),
            "max_seq_length": max_seq_length,
            "seed": seed,
        }
        (tmp / "model" / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        replace_directory(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Aligned embedder saved to %s (%d pairs, %.1f s)", out, len(pairs), seconds)
    return AlignmentResult(out, model, pairs, seconds, metadata)
