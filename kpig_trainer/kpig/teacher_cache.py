"""On-disk store of the ``"cached"`` previous-model mode: top-k log-probs of ``M_{t-1}``.

:func:`build_teacher_cache` runs the model once over the training set's JSD twins (sharded over
the processes) and writes, per rank, the top-k log-probs of every response token and their
vocabulary ids; :class:`TeacherCache` memory-maps them and serves a batch's rows to the loss
(:func:`kpig_trainer.kpig.losses.kpig_jsd_topk`, which renormalises the top-k; appendix B of
arXiv 2403.10056).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kpig_trainer.distributed import full_weights
from kpig_trainer.fileio import atomic_write_text
from kpig_trainer.kpig.info_gain import information_gain_from_logits
from kpig_trainer.kpig.losses import topk_teacher_cache
from kpig_trainer.kpig.twins import TwinBatch

if TYPE_CHECKING:
    from kpig_trainer.kpig.teacher_context import TeacherContext

logger = logging.getLogger(__name__)

__all__ = ["TeacherCache", "build_teacher_cache"]


_FORMAT = 1


class TeacherCache:
    """Read side of the ``"cached"`` mode's store.

    Layout of ``directory`` (one set of files per rank that built a shard)::

        part-00000.logprobs.f32   float32 [N_tokens, k]  top-k log-probs (temperature 1)
        part-00000.indices.i32    int32   [N_tokens, k]  their vocabulary ids
        part-00000.index.json     {"meta": {...}, "entries": {id: [offset, length, ig, hash]}}

    Rows ``offset .. offset + length`` of the arrays are the instance's response tokens, left to
    right (the packed order of :func:`kpig_trainer.kpig.losses.gather_response_positions`); ``ig`` is
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
                "trainer.snapshot_teacher() after changing train_dataset"
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
                    changed,
                    len(entries),
                )
        logprobs = np.concatenate([self._arrays[p][0][o : o + n] for p, o, n, _, _ in entries])
        indices = np.concatenate([self._arrays[p][1][o : o + n] for p, o, n, _, _ in entries])
        info_gain = None
        if with_info_gain:
            values = [entry[3] for entry in entries]
            if any(v is None for v in values):
                raise ValueError("the teacher cache holds no information gain; it was built with ig_source='current'")
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


def build_teacher_cache(context: TeacherContext, directory: Path) -> TeacherCache:
    """Run the current model over the train dataset's JSD twins once and store the cache.

    Each rank scores the instances ``rank, rank + world, ...`` (no grad, eval mode, batches of
    ``per_device_eval_batch_size``) and writes its own part; all ranks then open every part.
    """
    from torch.utils.data import DataLoader, IterableDataset, Subset
    from tqdm.auto import tqdm

    args, accelerator = context.args, context.accelerator
    dataset = context.train_dataset()
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
        collate_fn=context.data_collator(),
        shuffle=False,
        num_workers=args.dataloader_num_workers,
    )
    meta = {"k": args.teacher_topk, "twin": jsd_twin, "alpha": args.alpha, "has_info_gain": with_info_gain}
    writer = _CacheWriter(directory, rank, meta)
    model = accelerator.unwrap_model(context.model())
    was_training = model.training
    model.eval()
    progress = tqdm(loader, desc="KPIG teacher cache", disable=args.disable_tqdm or not context.show_progress)
    try:
        # ZeRO-3: the weights are gathered for the build (a full copy on every rank, freed
        # afterwards), so the ranks need not run their forwards in lockstep.
        with full_weights(model), torch.no_grad(), accelerator.autocast():
            for inputs in progress:
                inputs = context.prepare_inputs(inputs)
                batch = TwinBatch.from_inputs(inputs, args.response_logits_only, "masked" in names)
                if batch.ids is None:
                    raise KeyError("previous_model='cached' needs the instance ids in the batch (key 'ids')")
                logits = dict(zip(names, context.forward(model, [batch.twin(name) for name in names])))
                twin = batch.twin(jsd_twin)
                logprobs, indices = topk_teacher_cache(logits[jsd_twin], twin.frame_labels, args.teacher_topk)
                info_gain = None
                if with_info_gain:
                    info_gain = information_gain_from_logits(
                        logits["full"],
                        batch.full.frame_labels,
                        logits["masked"],
                        batch.masked.frame_labels,
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
        len(cache),
        args.teacher_topk,
        jsd_twin,
        directory,
    )
    return cache
