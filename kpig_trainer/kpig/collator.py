"""Paired data collator: each instance with its key-part-masked twin, tokenized for KPIG.

For an instance ``(instruction, input, output)`` the collator builds two token sequences:

* the *full* instance: ``prompt(instruction, input) + response``;
* its *masked twin*: ``prompt(mask(instruction), input) + response``, the key parts of the
  instruction replaced by the mask token (:func:`~kpig_trainer.data.masking.mask_key_parts`).

``prompt`` is :func:`~kpig_trainer.data.prompts.format_prompt` (chat template, or the plain
template without one) and ``response`` is the instance's first output followed by the end
token (the tokenizer's EOS, which ends a turn in ChatML models such as SmolLM2), so the model
learns to stop. Prompt and response are tokenized separately and concatenated: the label
boundary is exact and both twins carry the very same response ids. Labels are ``-100`` on the
prompt and on padding.

The batch is a :class:`~kpig_trainer.kpig.batch.KPIGBatch`: ``input_ids``,
``attention_mask``, ``labels`` (full), ``masked_input_ids``, ``masked_attention_mask``,
``masked_labels`` (twin), each side right-padded to its own longest row, plus ``ids`` and
``tasks`` (lists of strings, for teacher caches and per-task logging).

Truncation never cuts the response. A too-long instance first loses tokens from the end of its
input (the same input prefix is kept in both twins, so they differ only by the key parts); if
the prompt is still too long with an empty input, each twin's instruction is shortened from its
end. A response that does not fit next to the bare prompt scaffolding is an error, or, with
``on_overlong="skip"``, dropped and counted (one log line per batch).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kpig_trainer.data.masking import mask_key_parts
from kpig_trainer.data.prompts import format_prompt, has_chat_template
from kpig_trainer.kpig.batch import KPIGBatch

logger = logging.getLogger(__name__)

__all__ = ["KPIGDataCollator", "batches_by_task", "build_collator"]

_PRETOKENIZED_KEYS = ("input_ids", "labels", "masked_input_ids", "masked_labels")
_MASK_CACHE_SIZE = 65536


@dataclass
class _Row:
    """An instance reduced to what the collator needs."""

    id: str
    task: str
    instruction: str
    input: str
    output: str
    key_parts: list[str]


def _as_row(feature: Any) -> _Row:
    """Accept an ``Instance``, an ``Instance.to_dict()`` or a ``Stream.to_dataset_dict()`` row."""
    get = feature.get if isinstance(feature, Mapping) else lambda k, d=None: getattr(feature, k, d)
    outputs = get("outputs")
    output = outputs[0] if outputs else get("output")
    if output is None or get("instruction") is None:
        raise ValueError(f"an instance needs 'instruction' and 'outputs' (or 'output'); got {feature!r}")
    return _Row(
        id=str(get("id", "") or ""),
        task=str(get("task", "") or ""),
        instruction=get("instruction"),
        input=get("input", "") or "",
        output=output,
        key_parts=list(get("key_parts", None) or []),
    )


def batches_by_task(instances: Sequence[Any], indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` of ``instances`` in batches of one task each: tasks by name, each task's
    instances by length (characters of instruction, input and first output), ``batch_size`` at
    most. A task's instances share their instruction, which ``information_gain`` then runs once
    per batch (``share_prefix``); similar lengths waste little padding."""

    def length(k: int) -> int:
        i = instances[k]
        return len(i.instruction) + len(i.input) + len(i.outputs[0] if i.outputs else "")

    by_task: dict[str, list[int]] = {}
    for k in sorted(indices, key=lambda k: (instances[k].task, length(k), k)):
        by_task.setdefault(instances[k].task, []).append(k)
    return [rows[s : s + batch_size] for rows in by_task.values() for s in range(0, len(rows), batch_size)]


def _pad(rows: Sequence[Sequence[int]], value: int, multiple: int | None) -> torch.Tensor:
    length = max((len(r) for r in rows), default=0)
    if multiple:
        length = math.ceil(length / multiple) * multiple
    return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=torch.long)


@dataclass
class KPIGDataCollator:
    """Collate instances into paired batches (full instance + masked twin) for KPIG training.

    Use it as the ``data_collator`` of a ``transformers.Trainer`` (subclass). Raw instance rows
    need ``TrainingArguments(remove_unused_columns=False)`` so that the Trainer keeps their text
    columns; or pre-tokenize with ``dataset.map(collator.tokenize, batched=True,
    remove_columns=dataset.column_names)``.

    ``__call__`` accepts, in any mix: ``Instance`` objects; mappings with ``instruction``,
    ``input``, ``outputs`` (or ``output``), ``key_parts``, ``id`` and ``task`` (rows of
    ``Stream.to_dataset_dict()`` splits or ``Instance.to_dict()``); rows produced by
    :meth:`tokenize`.

    Args:
        tokenizer: the model's tokenizer (the Trainer's ``processing_class``). Its chat
            template, if any, lays out the prompt (:func:`~kpig_trainer.data.prompts.format_prompt`).
        max_length: most tokens of one sequence (prompt + response); each twin is truncated to
            it on its own. ``None`` disables truncation.
        mask_token: text that replaces the key parts in the masked twin.
        per_token_mask: replace each key-part region by as many mask tokens as it had tokens
            (``mask_key_parts(per_token=True)``), so that the twin keeps about the same length.
        instruction_pools: optional ``{task: [{"instruction": str, "key_parts": [str]}, ...]}``
            (entries may also be objects with those attributes). As in the paper, each instance
            of a task with a pool is shown one variant drawn from it, in both twins; tasks without
            a pool (or with an empty one) use the instance's own instruction and key parts.
            Include the original instruction in the pool if it should stay among the choices.
        seed: seed of the variant draw. The draw is a hash of ``(seed, task, instance id)``, not
            an RNG stream, so a resumed run, a worker process and a cached-teacher pass all see
            the same variant for the same instance.
        system_prompt: system turn (or first paragraph of a plain prompt); ``None`` for none.
        on_overlong: what to do with an instance whose response does not fit in ``max_length``
            even with an empty input and instruction: ``"error"`` raises ``ValueError`` naming the
            task and instance id; ``"skip"`` drops it and logs a count once per batch.
        pad_to_multiple_of: round each side's padded length up to a multiple of this.
        with_masked: ``False`` builds a plain SFT batch (``input_ids``, ``attention_mask``,
            ``labels`` only, ready for a vanilla ``Trainer``) with the same tokenization.
        label_pad_token_id: label of prompt and padding positions.
        eos_token: token appended to every response; default ``tokenizer.eos_token``. Set it
            when the chat template ends assistant turns with another token (e.g.
            ``"<|eot_id|>"``).
        plain_template: prompt template used without a chat template (default
            :data:`~kpig_trainer.data.prompts.PLAIN_TEMPLATE`).
        use_chat_template: ``None``: use the tokenizer's chat template when it has one;
            ``False``: always the plain template.

    Attributes:
        counts: running totals over this collator's life (per process): ``"skipped"``,
            ``"input_truncated"``, ``"instruction_truncated"``.
    """

    tokenizer: Any
    max_length: int | None = 1024
    mask_token: str = "[MASK]"
    per_token_mask: bool = False
    instruction_pools: Mapping[str, Sequence[Any]] | None = None
    seed: int = 0
    system_prompt: str | None = None
    on_overlong: str = "error"
    pad_to_multiple_of: int | None = None
    with_masked: bool = True
    label_pad_token_id: int = -100
    eos_token: str | None = None
    plain_template: str | None = None
    use_chat_template: bool | None = None
    counts: Counter = field(default_factory=Counter, init=False, repr=False)
    _mask_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.on_overlong not in ("error", "skip"):
            raise ValueError(f"on_overlong must be 'error' or 'skip', got {self.on_overlong!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        tokenizer = self.tokenizer
        eos = self.eos_token if self.eos_token is not None else tokenizer.eos_token
        self._eos_id = tokenizer.convert_tokens_to_ids(eos) if eos is not None else None
        if self._eos_id is None or self._eos_id == tokenizer.unk_token_id:
            raise ValueError(f"end token {eos!r} is not a token of the tokenizer; set eos_token")
        pad_id = tokenizer.pad_token_id
        self._pad_id = pad_id if pad_id is not None else self._eos_id  # masked out by attention
        chat = has_chat_template(tokenizer) if self.use_chat_template is None else self.use_chat_template
        # A chat template writes its own special tokens (BOS included); a plain prompt gets the
        # ones the tokenizer normally puts in front (e.g. Llama-2's BOS), never twice.
        self._prefix_ids = [] if chat else self._leading_special_ids()

    # ---------------------------------------------------------------- public API

    def __call__(self, features: Sequence[Any]) -> KPIGBatch:
        """Collate raw instances and/or pre-tokenized rows into a padded paired batch.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels``, ``masked_input_ids``,
            ``masked_attention_mask``, ``masked_labels`` (``[B, T]`` long tensors, right-padded
            with the pad id / 0 / ``label_pad_token_id``), ``ids`` and ``tasks`` (lists of
            ``B`` strings). With ``with_masked=False`` only the first three.
        """
        stats = Counter()
        raw = [i for i, f in enumerate(features) if not (isinstance(f, Mapping) and "input_ids" in f)]
        encoded: list[dict | None] = [self._checked_pretokenized(f) for f in features]
        for i, row in zip(raw, self._encode_many([_as_row(features[i]) for i in raw], stats)):
            encoded[i] = row
        # tokenize() marks a skipped instance with empty ids.
        stats["skipped"] += sum(e is not None and not e["input_ids"] for e in encoded)
        kept = [e for e in encoded if e is not None and e["input_ids"]]
        self._log(stats, len(features))
        if not kept:
            raise ValueError(
                f"all {len(features)} instances of the batch were skipped as overlong; drop them "
                "beforehand with dataset.map(collator.tokenize, batched=True, "
                "remove_columns=dataset.column_names)"
            )
        return self._pad_batch(kept)

    def tokenize(self, example: Mapping[str, Any]) -> dict[str, Any]:
        """Pre-tokenize for ``datasets.Dataset.map``; the result feeds :meth:`__call__`.

        Works on one row (``dataset.map(collator.tokenize)``) or on a batch of rows
        (``batched=True``; columns of lists). Returns plain lists: ``input_ids``, ``labels``,
        ``masked_input_ids``, ``masked_labels`` (the latter two only with ``with_masked``),
        ``id``, ``task``. An overlong instance under ``on_overlong="skip"`` is dropped from a
        batched result (pass ``remove_columns=dataset.column_names``, since the row count
        changes) and left with empty lists in a single-row result (``__call__`` drops it).
        """
        batched = isinstance(example.get("instruction"), list)
        columns = dict(example)
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())] if batched else [example]
        stats = Counter()
        encoded = self._encode_many([_as_row(r) for r in rows], stats)
        if batched:
            self._log(stats, len(rows))
            kept = [e for e in encoded if e is not None]
            keys = self._output_keys()
            return {k: [e[k] for e in kept] for k in keys}
        row = _as_row(example)
        return encoded[0] or {**{k: [] for k in self._output_keys()}, "id": row.id, "task": row.task}

    def instruction_for(self, instance: Any) -> tuple[str, list[str]]:
        """The ``(instruction, key_parts)`` the collator shows for ``instance``.

        The instance's own ones, or the variant drawn from its task's pool (see ``seed``).
        """
        row = instance if isinstance(instance, _Row) else _as_row(instance)
        pool = (self.instruction_pools or {}).get(row.task)
        if not pool:
            return row.instruction, row.key_parts
        # An id-less row is keyed by its content, so that it still gets a stable draw.
        key = row.id or f"{row.input}\0{row.output}"
        digest = hashlib.blake2b(f"{self.seed}\0{row.task}\0{key}".encode(), digest_size=8).digest()
        entry = pool[int.from_bytes(digest, "big") % len(pool)]
        get = entry.get if isinstance(entry, Mapping) else lambda k, d=None: getattr(entry, k, d)
        return get("instruction"), list(get("key_parts", None) or [])

    def has_key_part(self, instance: Any) -> bool:
        """Whether the mask changes the instruction shown for ``instance``. Without a maskable
        key part its twins are identical and its information gain is 0 by construction."""
        instruction, key_parts = self.instruction_for(instance)
        return bool(key_parts) and self._masked(instruction, key_parts) != instruction

    # ---------------------------------------------------------------- encoding

    def _checked_pretokenized(self, feature: Any) -> dict | None:
        """A row made by :meth:`tokenize` as a dict (None for anything else)."""
        if not (isinstance(feature, Mapping) and "input_ids" in feature):
            return None
        missing = [k for k in self._output_keys()[:-2] if k not in feature]
        if missing:
            raise ValueError(
                f"pre-tokenized row lacks {missing}; was it made by a collator with the same with_masked setting?"
            )
        return dict(feature)

    def _output_keys(self) -> tuple[str, ...]:
        keys = _PRETOKENIZED_KEYS if self.with_masked else _PRETOKENIZED_KEYS[:2]
        return (*keys, "id", "task")

    def _leading_special_ids(self) -> list[int]:
        """Special ids the tokenizer puts before a text (e.g. BOS) with ``add_special_tokens``."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(special) - len(plain) + 1):
            if special[start : start + len(plain)] == plain:
                return special[:start]
        return []

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _prompt_text(self, instruction: str, input: str) -> str:
        return format_prompt(
            self.tokenizer,
            instruction,
            input,
            system_prompt=self.system_prompt,
            plain_template=self.plain_template,
            use_chat_template=self.use_chat_template,
        )

    def _prompt_ids(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids of the prompts of ``(instruction, input)`` pairs, in one tokenizer call."""
        return [self._prefix_ids + ids for ids in self._ids([self._prompt_text(*p) for p in pairs])]

    def _masked(self, instruction: str, key_parts: list[str]) -> str:
        # Cached: the regex work and mask_key_parts' warnings then happen once per instruction.
        key = (instruction, tuple(key_parts))
        if key not in self._mask_cache:
            if len(self._mask_cache) >= _MASK_CACHE_SIZE:
                self._mask_cache.clear()
            self._mask_cache[key] = mask_key_parts(
                instruction,
                key_parts,
                self.mask_token,
                per_token=self.per_token_mask,
                tokenizer=self.tokenizer if self.per_token_mask else None,
            )
        return self._mask_cache[key]

    def _encode_many(self, rows: list[_Row], stats: Counter) -> list[dict | None]:
        """Encode rows: one batched tokenizer call for the common case, a slow path to truncate."""
        twins = []
        for row in rows:
            instruction, key_parts = self.instruction_for(row)
            masked = [self._masked(instruction, key_parts)] if self.with_masked else []
            twins.append([instruction, *masked])
        pairs = [(instruction, row.input) for row, twin in zip(rows, twins) for instruction in twin]
        prompt_ids = iter(self._prompt_ids(pairs))
        responses = [ids + [self._eos_id] for ids in self._ids([row.output for row in rows])]
        encoded = []
        for row, twin, response in zip(rows, twins, responses):
            prompts = [next(prompt_ids) for _ in twin]
            if self.max_length is not None and max(map(len, prompts)) + len(response) > self.max_length:
                prompts = self._truncate(row, twin, prompts, len(response), stats)
            if prompts is None:
                encoded.append(None)
                continue
            item = {}
            for prefix, prompt in zip(("", "masked_"), prompts):
                item[f"{prefix}input_ids"] = prompt + response
                item[f"{prefix}labels"] = [self.label_pad_token_id] * len(prompt) + response
            item.update(id=row.id, task=row.task)
            encoded.append(item)
        return encoded

    def _truncate(
        self, row: _Row, instructions: list[str], prompts: list[list[int]], n_response: int, stats: Counter
    ) -> list[list[int]] | None:
        """Prompt ids of each twin that fit next to the response, or None (skipped)."""
        budget = self.max_length - n_response
        # One input prefix for both twins: they must differ only by the key parts.
        both = lambda text: self._prompt_ids([(i, text) for i in instructions])  # noqa: E731
        fitted = self._shrink(row.input, prompts, both, budget)
        if fitted is not None:
            stats["input_truncated"] += 1
            return fitted
        fitted = []
        for instruction in instructions:
            encode = lambda text: self._prompt_ids([(text, "")])  # noqa: E731
            one = self._shrink(instruction, encode(instruction), encode, budget)
            if one is None:
                return self._overlong(row, n_response, stats)
            fitted.extend(one)
        stats["instruction_truncated"] += 1
        return fitted

    def _shrink(
        self, text: str, encoded: list[list[int]], encode: Callable[[str], list[list[int]]], budget: int
    ) -> list[list[int]] | None:
        """``encode`` of the longest token-wise prefix of ``text`` whose encodings fit ``budget``.

        ``encoded`` is ``encode(text)``. Returns None when even the empty prefix does not fit.
        """
        over = max(map(len, encoded)) - budget
        if over <= 0:
            return encoded
        keep, prefix_of = self._prefixer(text)
        while keep > 0:
            # Re-encode after each cut: tokens at the seam with the template may merge.
            keep = max(keep - over, 0)
            encoded = encode(prefix_of(keep))
            over = max(map(len, encoded)) - budget
            if over <= 0:
                return encoded
        return None

    def _prefixer(self, text: str) -> tuple[int, Callable[[int], str]]:
        """``(n, prefix)``: the token count of ``text`` and the text of its first ``k`` tokens."""
        if not text:
            return 0, lambda keep: ""
        if getattr(self.tokenizer, "is_fast", False):
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = encoding["offset_mapping"]
            return len(offsets), lambda keep: text[: offsets[keep - 1][1]] if keep else ""
        ids = self._ids([text])[0]
        return len(ids), lambda keep: self.tokenizer.decode(ids[:keep]) if keep else ""

    def _overlong(self, row: _Row, n_response: int, stats: Counter) -> None:
        if self.on_overlong == "error":
            raise ValueError(
                f"task {row.task!r}: instance {row.id!r}: its response ({n_response} tokens with the "
                f"end token) does not fit in max_length={self.max_length} even with an empty input "
                "and instruction; raise max_length or pass on_overlong='skip'"
            )
        stats["skipped"] += 1
        return None

    # ---------------------------------------------------------------- batching and logs

    def _pad_batch(self, rows: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for prefix in ("", "masked_") if self.with_masked else ("",):
            ids = _pad([r[f"{prefix}input_ids"] for r in rows], self._pad_id, self.pad_to_multiple_of)
            lengths = torch.tensor([len(r[f"{prefix}input_ids"]) for r in rows])
            batch[f"{prefix}input_ids"] = ids
            batch[f"{prefix}attention_mask"] = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
            batch[f"{prefix}labels"] = _pad(
                [r[f"{prefix}labels"] for r in rows], self.label_pad_token_id, self.pad_to_multiple_of
            )
        if self.with_masked:
            batch["ids"] = [str(r.get("id", "")) for r in rows]
            batch["tasks"] = [str(r.get("task", "")) for r in rows]
        return batch

    def _log(self, stats: Counter, total: int) -> None:
        """One line per batch for what happened to its instances (never one per instance)."""
        self.counts.update(stats)
        if stats["skipped"] or stats["instruction_truncated"]:
            logger.warning(
                "KPIG collator: of %d instances, skipped %d (response longer than max_length=%s), "
                "shortened the instruction of %d, shortened the input of %d",
                total,
                stats["skipped"],
                self.max_length,
                stats["instruction_truncated"],
                stats["input_truncated"],
            )
        elif stats["input_truncated"]:
            logger.info(
                "KPIG collator: shortened the input of %d of %d instances to fit max_length=%s",
                stats["input_truncated"],
                total,
                self.max_length,
            )

    def __getstate__(self) -> dict[str, Any]:
        # Leave caches and counters out: datasets fingerprints a pickled `tokenize`, and a
        # growing cache would change the fingerprint (and cost pickling time in workers).
        state = dict(self.__dict__)
        state["_mask_cache"] = {}
        state["counts"] = Counter()
        return state


def build_collator(tokenizer: Any, config: Any = None, *, scoring: bool = False, **options: Any) -> KPIGDataCollator:
    """The collator of every path: the trainer's default, each stage of a continual run, replay
    scoring and evaluation.

    Args:
        tokenizer: the model's tokenizer.
        config: a :class:`~kpig_trainer.kpig.config.KPIGConfig` (or any object with ``mask_token``,
            ``max_length`` and ``seed``) whose values are the defaults; None for the collator's own.
        scoring: for measuring, not training: each instance shows its task's own instruction (no
            pool variant) and gets its masked twin, so that the IG ranking of replay and the IG an
            evaluation reports are the same quantity.
        **options: any :class:`KPIGDataCollator` field; wins over ``config``.
    """
    values: dict[str, Any] = {}
    if config is not None:
        values.update(mask_token=config.mask_token, max_length=config.max_length, seed=config.seed)
    values.update(options)
    if scoring:
        values.update(instruction_pools=None, with_masked=True)
    return KPIGDataCollator(tokenizer, **values)
