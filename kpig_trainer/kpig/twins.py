r"""The two sides of a KPIG batch (full instances and masked twins) and their forward passes.

A collated KPIG batch (the contract is in :mod:`kpig_trainer.kpig.info_gain`) holds each instance
and its key-part-masked twin; :class:`TwinBatch` views it as two :class:`Twin`\ s, and
:func:`forward_twins` computes a model's logits on them, only at the positions the losses read.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kpig_trainer.kpig.losses import IGNORE_INDEX

__all__ = ["Twin", "TwinBatch", "forward_twins", "forward_shared_prefix", "accepts_logits_to_keep"]

MIN_SHARED_PREFIX = 16
"""Shortest common prefix (tokens) that :func:`forward_shared_prefix` runs once."""


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
    """A collated KPIG batch (see the batch contract in :mod:`kpig_trainer.kpig.info_gain`)."""

    full: Twin
    masked: Twin | None
    ids: list[str] | None

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any], response_only: bool, need_masked: bool = True) -> TwinBatch:
        required = ["input_ids", "attention_mask", "labels"]
        if need_masked:
            required += ["masked_input_ids", "masked_attention_mask", "masked_labels"]
        missing = [key for key in required if key not in inputs]
        if missing:
            raise KeyError(
                f"KPIG batch is missing {missing}; a KPIG batch carries input_ids, attention_mask, "
                "labels, masked_input_ids, masked_attention_mask, masked_labels (and ids for the "
                "'cached' mode), as built by kpig_trainer.kpig.collator.KPIGDataCollator"
            )

        def twin(prefix: str) -> Twin:
            return Twin.from_tensors(
                inputs[f"{prefix}input_ids"],
                inputs[f"{prefix}attention_mask"],
                inputs[f"{prefix}labels"],
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


def _logits(model, input_ids, attention_mask, start: int, stop: int, keep_kwarg: bool, **extra) -> torch.Tensor:
    """Logits at positions ``[start, stop)`` of ``input_ids``, asking the model for those only when
    it can; ``extra`` goes to the model as is (a key/value cache to continue from)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if getattr(getattr(model, "module", model), "config", None) is not None:
        kwargs["use_cache"] = False  # Hugging Face models (also inside a DDP/DeepSpeed wrapper)
    kwargs.update(extra)
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
        return [_logits(model, t.input_ids, t.attention_mask, t.start, t.stop, logits_to_keep) for t in twins]
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


def common_prefix_length(twin: Twin) -> int:
    """Leading tokens that every row of ``twin`` has in common (all real tokens), capped so that
    every position of the frame comes after them."""
    ids, mask = twin.input_ids, twin.attention_mask
    same = ((ids == ids[:1]) & (mask == 1)).all(dim=0)
    run = int(same.int().cumprod(dim=0).sum())
    return max(0, min(run, twin.start, int(mask.sum(dim=1).min()) - 1))


def forward_shared_prefix(model: torch.nn.Module, twin: Twin, logits_to_keep: bool = False) -> torch.Tensor | None:
    """Logits of ``model`` on ``twin`` in its frame, running the rows' common prefix only once.

    The instances of one task share their instruction, so their prompts start with the same
    tokens (on the shipped SuperNI benchmark, over half the tokens of a task's scoring batch).
    The prefix runs on one row; its key/value cache is repeated for every row and the rest of
    each row runs on top of it, with the positions and attention of a full forward (a no-grad
    pass: scoring, not training). Returns ``None`` where this does not apply: one row, a prefix
    shorter than :data:`MIN_SHARED_PREFIX`, or a model without a key/value cache.
    """
    rows, prefix = twin.batch_size, common_prefix_length(twin)
    if rows < 2 or prefix < MIN_SHARED_PREFIX or getattr(getattr(model, "config", None), "use_cache", None) is None:
        return None
    keep_one = {"logits_to_keep": 1} if logits_to_keep else {}
    head = model(
        input_ids=twin.input_ids[:1, :prefix],
        attention_mask=twin.attention_mask[:1, :prefix],
        use_cache=True,
        **keep_one,
    )
    cache = getattr(head, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(rows)
    return _logits(
        model,
        twin.input_ids[:, prefix:],
        twin.attention_mask,
        twin.start - prefix,
        twin.stop - prefix,
        logits_to_keep,
        past_key_values=cache,
        use_cache=True,
    )
