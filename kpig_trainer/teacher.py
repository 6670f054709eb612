"""The previous-stage model (the teacher of the JSD term) and the twin forward passes.

Algorithm 1 of the paper (arXiv 2403.10056) freezes a copy of ``M_{t-1}`` at every stage
(lines 10-11) and runs it on the masked twins (line 17). Three ways to keep it, chosen by
``KPIGConfig.previous_model``:

* :class:`FrozenCopy` (``"copy"``): a deep copy, frozen, in eval mode, prepared through
  accelerate (DeepSpeed: TRL's ``prepare_deepspeed``, which shards it under ZeRO-3).
* :class:`AdapterSnapshot` (``"adapter"``, PEFT): the trained adapter's weights are copied into a
  second adapter, :data:`PREVIOUS_ADAPTER`, frozen and excluded from the optimizer; the teacher
  pass switches to it under ``torch.no_grad()`` and switches back even on errors. No second
  model in memory.
* :class:`CachedTeacher` (``"cached"``): the current model (which *is* ``M_{t-1}`` before the
  first update of a stage) is run once over the training set's JSD twins, and its top-k
  log-probs per response token are memory-mapped from disk (:class:`TeacherCache`); no model
  is kept at all (appendix B).

Lifecycle: :meth:`PreviousModel.snapshot` takes the current weights as the previous model. The
trainer calls it in its constructor (``"cached"``: when ``train()`` starts, before any update)
and the stage loop calls ``KPIGTrainer.snapshot_previous_model()`` at each stage boundary.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from kpig_trainer.fileio import atomic_write_text
from kpig_trainer.info_gain import information_gain_from_logits
from kpig_trainer.losses import IGNORE_INDEX, topk_teacher_cache

if TYPE_CHECKING:
    from kpig_trainer.trainer import KPIGTrainer

logger = logging.getLogger(__name__)

PREVIOUS_ADAPTER = "kpig_previous"
"""Name of the frozen PEFT adapter that holds the previous-stage weights (``"adapter"`` mode)."""

__all__ = [
    "PREVIOUS_ADAPTER",
    "Twin",
    "TwinBatch",
    "forward_twins",
    "TeacherTargets",
    "PreviousModel",
    "FrozenCopy",
    "AdapterSnapshot",
    "CachedTeacher",
    "TeacherCache",
    "make_previous_model",
]


# --------------------------------------------------------------------------------------------
# Twins and their forward passes
# --------------------------------------------------------------------------------------------


@dataclass
class Twin:
    """One side of a KPIG batch (the full instances or their masked twins).

    ``start`` and ``stop`` delimit the *logits frame*: the positions whose logits are computed.
    Losses receive ``logits[:, start:stop]`` with :attr:`frame_labels` ``= labels[:, start:stop]``,
    which keeps the causal convention (the logits at frame column ``j - 1`` predict the label at
    column ``j``). With ``response_logits_only`` the frame spans the batch's response tokens only.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    start: int
    stop: int

    @classmethod
    def from_tensors(cls, input_ids, attention_mask, labels, response_only: bool) -> Twin:
        start, stop = 0, labels.shape[1]
        if response_only:
            # The logits at position t predict the label at t + 1.
            columns = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
            if columns.numel() == 0:
                start, stop = 0, 1
            else:
                first, last = torch.stack([columns[0], columns[-1]]).tolist()
                start, stop = first, last + 2
        return cls(input_ids, attention_mask, labels, start, stop)

    @property
    def frame_labels(self) -> torch.Tensor:
        return self.labels[:, self.start : self.stop]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def response_counts(self) -> torch.Tensor:
        """Number of response tokens of each row, ``[B]``."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)

    def token_hashes(self) -> list[int]:
        """A hash of each row's unpadded token ids (identifies the exact twin a cache saw)."""
        rows = self.input_ids.tolist()
        masks = self.attention_mask.tolist()
        return [hash(tuple(t for t, m in zip(row, mask) if m)) for row, mask in zip(rows, masks)]


@dataclass
class TwinBatch:
    """A collated KPIG batch (see the batch contract in :mod:`kpig_trainer.info_gain`)."""

    full: Twin
    masked: Twin | None
    ids: list[str] | None

    @classmethod
    def from_inputs(
        cls, inputs: Mapping[str, Any], response_only: bool, need_masked: bool = True
    ) -> TwinBatch:
        required = ["input_ids", "attention_mask", "labels"]
        if need_masked:
            required += ["masked_input_ids", "masked_attention_mask", "masked_labels"]
        missing = [key for key in required if key not in inputs]
        if missing:
            raise KeyError(
                f"KPIG batch is missing {missing}; a KPIG batch carries input_ids, attention_mask, "
                "labels, masked_input_ids, masked_attention_mask, masked_labels (and ids for the "
                "'cached' mode), as built by kpig_trainer.data.collator.KPIGDataCollator"
            )
        def twin(prefix: str) -> Twin:
            return Twin.from_tensors(
                inputs[f"{prefix}input_ids"], inputs[f"{prefix}attention_mask"], inputs[f"{prefix}labels"],
                response_only,
            )

        full = twin("")
        masked = twin("masked_") if need_masked else None
        ids = inputs.get("ids")
        return cls(full, masked, list(ids) if ids is not None else None)

    def twin(self, name: str) -> Twin:
        if name == "full":
            return self.full
        if self.masked is None:
            raise KeyError("this step needs the masked twin, but the batch has no masked_input_ids")
        return self.masked


def _pad_right(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


def _logits(model, input_ids, attention_mask, start: int, stop: int, keep_kwarg: bool) -> torch.Tensor:
    """Logits at positions ``[start, stop)``, asking the model for those only when it can."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    length = input_ids.shape[1]
    trimmed = start > 0 or stop < length
    if keep_kwarg and trimmed:
        # An int keeps the last positions (a view); a tensor selects arbitrary ones (a copy).
        kwargs["logits_to_keep"] = (
            length - start if stop == length else torch.arange(start, stop, device=input_ids.device)
        )
    output = model(**kwargs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    if trimmed and not keep_kwarg:
        logits = logits[:, start:stop]
    return logits


def forward_twins(
    model: torch.nn.Module, twins: Sequence[Twin], *, fuse: bool = True, logits_to_keep: bool = False
) -> list[torch.Tensor]:
    """Logits of ``model`` on each twin, in that twin's frame (``[B, stop - start, V]``).

    With ``fuse`` the twins are right-padded to a common length (attention mask 0) and run as
    one batch of ``sum(B)`` rows. Right padding after a row's last token cannot change a causal
    model's logits at earlier positions, so each twin's logits equal those of its own forward
    (up to float reassociation in batched kernels). ``logits_to_keep``: the model's ``forward``
    accepts that argument (Hugging Face causal LMs do).
    """
    if not fuse or len(twins) == 1:
        return [
            _logits(model, t.input_ids, t.attention_mask, t.start, t.stop, logits_to_keep) for t in twins
        ]
    length = max(t.input_ids.shape[1] for t in twins)
    input_ids = torch.cat([_pad_right(t.input_ids, length, 0) for t in twins])
    attention_mask = torch.cat([_pad_right(t.attention_mask, length, 0) for t in twins])
    start, stop = min(t.start for t in twins), max(t.stop for t in twins)
    logits = _logits(model, input_ids, attention_mask, start, stop, logits_to_keep)
    out, row = [], 0
    for t in twins:
        out.append(logits[row : row + t.batch_size, t.start - start : t.stop - start])
        row += t.batch_size
    return out


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped) model's ``forward`` takes ``logits_to_keep``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Previous-stage model
# --------------------------------------------------------------------------------------------


@dataclass
class TeacherTargets:
    """What the previous model contributes to a step: its distribution on the JSD twin (full
    ``logits`` in the frame of that twin, or a top-k cache in packed order) and, when asked,
    its information gain per instance."""

    logits: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    info_gain: torch.Tensor | None = None


class PreviousModel:
    """Base class of the three ways to keep the previous-stage model."""

    mode: str = ""

    def __init__(self, trainer: KPIGTrainer):
        self.trainer = trainer

    @property
    def ready(self) -> bool:
        """Whether :meth:`targets` can be called (a snapshot exists)."""
        raise NotImplementedError

    def snapshot(self) -> None:
        """Take the current model's weights as the previous model."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Called when ``train()`` starts, before any update (the ``"cached"`` mode builds then)."""

    def targets(
        self, batch: TwinBatch, jsd_twin: str, with_info_gain: bool, strict: bool = True
    ) -> TeacherTargets | None:
        """Teacher outputs for ``batch`` (its distribution on the ``jsd_twin``, and its IG when
        ``with_info_gain``); ``None`` if unavailable and not ``strict`` (a cache miss in eval)."""
        raise NotImplementedError

    def release(self) -> None:
        """Free the previous model (memory, adapter or cache)."""

    # Shared by the two exact modes.
    def _exact_targets(self, teacher, batch: TwinBatch, jsd_twin: str, with_info_gain: bool):
        args = self.trainer.args
        names = ["full", "masked"] if with_info_gain else [jsd_twin]
        with torch.no_grad(), self.trainer.accelerator.autocast():
            logits = dict(zip(names, self.trainer._forward(teacher, [batch.twin(name) for name in names])))
        info_gain = None
        if with_info_gain:
            info_gain = information_gain_from_logits(
                logits["full"], batch.full.frame_labels, logits["masked"], batch.masked.frame_labels,
                args.alpha, check_twins=False,
            )
        return TeacherTargets(logits=logits[jsd_twin], info_gain=info_gain)


class FrozenCopy(PreviousModel):
    """``"copy"``: a frozen deep copy of the model, in eval mode."""

    mode = "copy"

    def __init__(self, trainer: KPIGTrainer):
        super().__init__(trainer)
        self.model: torch.nn.Module | None = None

    @property
    def ready(self) -> bool:
        return self.model is not None

    def snapshot(self) -> None:
        accelerator = self.trainer.accelerator
        source = accelerator.unwrap_model(self.trainer.model)
        if self.model is not None:  # later stages: overwrite the weights in place
            with torch.no_grad():
                accelerator.unwrap_model(self.model).load_state_dict(source.state_dict())
            return
        teacher = copy.deepcopy(source)
        teacher.requires_grad_(False)
        teacher.eval()
        if self.trainer.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed  # ZeRO-3 shards the copy too

            self.model = prepare_deepspeed(teacher, accelerator)
        else:
            self.model = accelerator.prepare_model(teacher, evaluation_mode=True)

    def targets(self, batch, jsd_twin, with_info_gain, strict=True):
        if self.model.training:  # frozen in eval mode; guard against an outside .train()
            self.model.eval()
        return self._exact_targets(self.model, batch, jsd_twin, with_info_gain)

    def release(self) -> None:
        self.model = None


class AdapterSnapshot(PreviousModel):
    """``"adapter"``: the previous weights live in a second, frozen PEFT adapter."""

    mode = "adapter"

    def __init__(self, trainer: KPIGTrainer):
        from peft import PeftModel

        super().__init__(trainer)
        # The PeftModel itself: a DDP / DeepSpeed wrapper added later wraps this same object.
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        if not isinstance(self.model, PeftModel):
            raise ValueError(
                "previous_model='adapter' needs a PEFT model: pass peft_config= to KPIGTrainer or a "
                "peft.PeftModel; for full fine-tuning use previous_model='copy' or 'cached'"
            )
        config = self.model.peft_config[self.model.active_adapter]
        if config.is_prompt_learning or config.is_adaption_prompt:
            raise ValueError(
                "previous_model='adapter' needs a tuner adapter such as LoRA; "
                f"{type(config).__name__} is not supported (use previous_model='copy')"
            )

    @property
    def ready(self) -> bool:
        return PREVIOUS_ADAPTER in self.model.peft_config

    def snapshot(self) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        model = self.model
        active = model.active_adapter
        if active == PREVIOUS_ADAPTER:
            raise RuntimeError(f"the training adapter must not be {PREVIOUS_ADAPTER!r}")
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        if PREVIOUS_ADAPTER not in model.peft_config:
            config = copy.deepcopy(model.peft_config[active])
            config.inference_mode = True
            model.add_adapter(PREVIOUS_ADAPTER, config)
        with torch.no_grad():
            weights = get_peft_model_state_dict(model, adapter_name=active)
            set_peft_model_state_dict(model, weights, adapter_name=PREVIOUS_ADAPTER)
        model.set_adapter(active)  # add_adapter must not leave another adapter active
        for name, param in model.named_parameters():
            # Existing parameters keep their flag; every parameter of the snapshot is frozen, so
            # the optimizer (built from requires_grad) never sees it.
            param.requires_grad_(flags.get(name, False) and not _in_adapter(name, PREVIOUS_ADAPTER))

    @contextmanager
    def active(self):
        """Run the model as the previous model: frozen adapter active, eval mode. Restores the
        training adapter, the ``requires_grad`` flags and the train/eval mode on exit, also when
        the body raises."""
        model = self.model
        training_adapter = model.active_adapter
        flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        try:
            model.set_adapter(PREVIOUS_ADAPTER, inference_mode=True)
            model.eval()
            yield model
        finally:
            model.set_adapter(training_adapter)
            for param, flag in flags:
                param.requires_grad_(flag)
            model.train(was_training)

    def targets(self, batch, jsd_twin, with_info_gain, strict=True):
        with self.active() as teacher:
            return self._exact_targets(teacher, batch, jsd_twin, with_info_gain)

    def release(self) -> None:
        if PREVIOUS_ADAPTER in self.model.peft_config:
            self.model.delete_adapter(PREVIOUS_ADAPTER)


def _in_adapter(param_name: str, adapter: str) -> bool:
    return f".{adapter}." in param_name or param_name.endswith(f".{adapter}")


class CachedTeacher(PreviousModel):
    """``"cached"``: top-k log-probs of the previous model, computed once, memory-mapped."""

    mode = "cached"

    def __init__(self, trainer: KPIGTrainer):
        super().__init__(trainer)
        self.cache: TeacherCache | None = None

    @property
    def ready(self) -> bool:
        return self.cache is not None

    @property
    def directory(self) -> Path:
        args = self.trainer.args
        return Path(args.teacher_cache_dir or os.path.join(args.output_dir or ".", "kpig_teacher_cache"))

    def prepare(self) -> None:
        if self.cache is None:
            self.snapshot()

    def snapshot(self) -> None:
        self.release()
        self.cache = build_teacher_cache(self.trainer, self.directory)

    def targets(self, batch, jsd_twin, with_info_gain, strict=True):
        if batch.ids is None:
            raise KeyError("previous_model='cached' needs the instance ids in the batch (key 'ids')")
        twin = batch.twin(jsd_twin)
        found = self.cache.lookup(
            batch.ids, twin.response_counts().tolist(), twin.token_hashes(), twin.labels.device,
            with_info_gain=with_info_gain, strict=strict,
        )
        if found is None:
            return None
        logprobs, indices, info_gain = found
        return TeacherTargets(topk_logprobs=logprobs, topk_indices=indices, info_gain=info_gain)

    def release(self) -> None:
        self.cache = None


def make_previous_model(mode: str, trainer: KPIGTrainer) -> PreviousModel:
    classes = {cls.mode: cls for cls in (FrozenCopy, AdapterSnapshot, CachedTeacher)}
    return classes[mode](trainer)


# --------------------------------------------------------------------------------------------
# Teacher cache on disk
# --------------------------------------------------------------------------------------------

_FORMAT = 1


class TeacherCache:
    """Read side of the ``"cached"`` mode's store.

    Layout of ``directory`` (one set of files per rank that built a shard)::

        part-00000.logprobs.f32   float32 [N_tokens, k]  top-k log-probs (temperature 1)
        part-00000.indices.i32    int32   [N_tokens, k]  their vocabulary ids
        part-00000.index.json     {"meta": {...}, "entries": {id: [offset, length, ig, hash]}}

    Rows ``offset .. offset + length`` of the arrays are the instance's response tokens, left to
    right (the packed order of :func:`kpig_trainer.losses.gather_response_positions`); ``ig`` is
    the previous model's information gain (``null`` when not computed); ``hash`` identifies the
    exact token ids of the twin the teacher saw. Arrays are opened with ``numpy.memmap``: only
    the rows a step reads are paged in.
    """

    def __init__(self, directory: str | os.PathLike, world_size: int = 1):
        self.directory = Path(directory)
        self._arrays: list[tuple[np.memmap, np.memmap]] = []
        self.entries: dict[str, tuple[int, int, int, float | None, int]] = {}
        self.meta: dict[str, Any] = {}
        self._warned_twins = False
        for part in range(world_size):
            stem = self.directory / f"part-{part:05d}"
            with open(f"{stem}.index.json", encoding="utf-8") as handle:
                index = json.load(handle)
            meta = index["meta"]
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{stem}.index.json: unknown teacher cache format {meta.get('format')!r}")
            self.meta = meta
            k, tokens = meta["k"], meta["num_tokens"]
            shape = (tokens, k)
            logprobs = _open_array(f"{stem}.logprobs.f32", np.float32, shape)
            self._arrays.append((logprobs, _open_array(f"{stem}.indices.i32", np.int32, shape)))
            for key, (offset, length, ig, digest) in index["entries"].items():
                self.entries.setdefault(key, (part, offset, length, ig, digest))

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def lookup(
        self,
        ids: Sequence[str],
        lengths: Sequence[int],
        hashes: Sequence[int] | None,
        device: torch.device,
        *,
        with_info_gain: bool = False,
        strict: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Packed ``(logprobs [N, k], indices [N, k] int64, info_gain [B] or None)`` for a batch.

        ``lengths`` are the rows' response-token counts (checked against the cache). A missing id
        raises ``KeyError`` when ``strict``, else the method returns ``None``.
        """
        missing = [key for key in ids if key not in self.entries]
        if missing:
            if not strict:
                return None
            raise KeyError(
                f"{len(missing)} instance ids of the batch are not in the teacher cache {self.directory} "
                f"(e.g. {missing[0]!r}); the cache covers the train dataset at the last snapshot: call "
                "trainer.snapshot_previous_model() after changing train_dataset"
            )
        entries = [self.entries[key] for key in ids]
        bad = [key for key, entry, n in zip(ids, entries, lengths) if entry[2] != n]
        if bad:
            raise ValueError(
                f"teacher cache and batch disagree on the number of response tokens for {bad[:3]}; "
                "was the dataset or max_length changed after the cache was built?"
            )
        if hashes is not None and not self._warned_twins:
            changed = sum(entry[4] != h for entry, h in zip(entries, hashes))
            if changed:
                self._warned_twins = True
                logger.warning(
                    "%d of %d twins in a batch differ from the ones the teacher cache was built on "
                    "(same response, different prompt tokens): the collator samples instruction "
                    "variants on the fly. The cached teacher targets then belong to another variant; "
                    "sample the variants once as a pre-processing step (appendix B). Warned once.",
                    changed, len(entries),
                )
        logprobs = np.concatenate([self._arrays[p][0][o : o + n] for p, o, n, _, _ in entries])
        indices = np.concatenate([self._arrays[p][1][o : o + n] for p, o, n, _, _ in entries])
        info_gain = None
        if with_info_gain:
            values = [entry[3] for entry in entries]
            if any(v is None for v in values):
                raise ValueError(
                    "the teacher cache holds no information gain; it was built with ig_source='current'"
                )
            info_gain = torch.tensor(values, dtype=torch.float32, device=device)
        return (
            torch.from_numpy(logprobs).to(device),
            torch.from_numpy(indices).to(device=device, dtype=torch.long),
            info_gain,
        )


def _open_array(path: str, dtype, shape: tuple[int, int]) -> np.ndarray:
    # numpy cannot memory-map an empty file.
    return np.memmap(path, dtype=dtype, mode="r", shape=shape) if shape[0] else np.zeros(shape, dtype)


class _CacheWriter:
    """Append-only writer of one rank's part of a :class:`TeacherCache`."""

    def __init__(self, directory: Path, rank: int, meta: dict[str, Any]):
        directory.mkdir(parents=True, exist_ok=True)
        self.stem = directory / f"part-{rank:05d}"
        self.meta = {"format": _FORMAT, **meta}
        self.entries: dict[str, list] = {}
        self.offset = 0
        self._logprobs = open(f"{self.stem}.logprobs.f32", "wb")
        self._indices = open(f"{self.stem}.indices.i32", "wb")

    def add(self, ids, logprobs: torch.Tensor, indices: torch.Tensor, lengths, hashes, info_gain) -> None:
        self._logprobs.write(logprobs.detach().float().cpu().numpy().tobytes())
        self._indices.write(indices.detach().to(torch.int32).cpu().numpy().tobytes())
        for i, (key, length, digest) in enumerate(zip(ids, lengths, hashes)):
            ig = None if info_gain is None else float(info_gain[i])
            if key not in self.entries:  # a repeated id (shard padding) keeps its first copy
                self.entries[key] = [self.offset, int(length), ig, digest]
            self.offset += int(length)

    def close(self) -> None:
        self._logprobs.close()
        self._indices.close()
        self.meta["num_tokens"] = self.offset
        atomic_write_text(f"{self.stem}.index.json", json.dumps({"meta": self.meta, "entries": self.entries}))


def build_teacher_cache(trainer: KPIGTrainer, directory: Path) -> TeacherCache:
    """Run the current model over the train dataset's JSD twins once and store the cache.

    Each rank scores the instances ``rank, rank + world, ...`` (no grad, eval mode, batches of
    ``per_device_eval_batch_size``) and writes its own part; all ranks then open every part.
    """
    from torch.utils.data import DataLoader, IterableDataset, Subset
    from tqdm.auto import tqdm

    args, accelerator = trainer.args, trainer.accelerator
    dataset = trainer.train_dataset
    if dataset is None:
        raise ValueError("previous_model='cached' needs a train_dataset to build the teacher cache from")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError("previous_model='cached' needs a map-style train_dataset (with __len__)")
    jsd_twin = args.jsd_on
    with_info_gain = args.ig_source == "previous"
    names = ["full", "masked"] if with_info_gain else [jsd_twin]
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = DataLoader(
        Subset(dataset, range(rank, len(dataset), world)),
        batch_size=args.per_device_eval_batch_size,
        collate_fn=trainer.data_collator,
        shuffle=False,
        num_workers=args.dataloader_num_workers,
    )
    meta = {"k": args.teacher_topk, "twin": jsd_twin, "alpha": args.alpha, "has_info_gain": with_info_gain}
    writer = _CacheWriter(directory, rank, meta)
    model = accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    progress = tqdm(
        loader, desc="KPIG teacher cache", disable=args.disable_tqdm or not trainer.is_local_process_zero()
    )
    try:
        with torch.no_grad(), accelerator.autocast():
            for inputs in progress:
                inputs = trainer._prepare_inputs(inputs)
                batch = TwinBatch.from_inputs(inputs, args.response_logits_only, "masked" in names)
                if batch.ids is None:
                    raise KeyError("previous_model='cached' needs the instance ids in the batch (key 'ids')")
                logits = dict(zip(names, trainer._forward(model, [batch.twin(name) for name in names])))
                twin = batch.twin(jsd_twin)
                logprobs, indices = topk_teacher_cache(logits[jsd_twin], twin.frame_labels, args.teacher_topk)
                info_gain = None
                if with_info_gain:
                    info_gain = information_gain_from_logits(
                        logits["full"], batch.full.frame_labels, logits["masked"], batch.masked.frame_labels,
                        args.alpha,
                    ).tolist()
                counts = twin.response_counts().tolist()
                writer.add(batch.ids, logprobs, indices, counts, twin.token_hashes(), info_gain)
    finally:
        writer.close()
        model.train(was_training)
    accelerator.wait_for_everyone()
    cache = TeacherCache(directory, world)
    logger.info(
        "KPIG teacher cache: %d instances, top-%d log-probs on the %s twins, in %s",
        len(cache), args.teacher_topk, jsd_twin, directory,
    )
    return cache
