"""The paired batch: what :class:`~kpig_trainer.kpig.collator.KPIGDataCollator` yields and what
the information gain, the JSD and the trainer read."""

from __future__ import annotations

from typing import TypedDict

import torch

__all__ = ["KPIGBatch", "MASKED_KEYS", "PLAIN_KEYS"]

PLAIN_KEYS = ("input_ids", "attention_mask", "labels")
MASKED_KEYS = ("masked_input_ids", "masked_attention_mask", "masked_labels")


class KPIGBatch(TypedDict, total=False):
    """A collated batch of ``B`` instances and their key-part-masked twins.

    ====================== ========== =====================================================
    key                    shape      meaning
    ====================== ========== =====================================================
    input_ids              [B, T1]    full instance (instruction with key parts, input, output)
    attention_mask         [B, T1]    1 on real tokens, 0 on padding (either side)
    labels                 [B, T1]    response token ids, -100 everywhere else
    masked_input_ids       [B, T2]    the masked twin (key parts replaced by the mask token)
    masked_attention_mask  [B, T2]
    masked_labels          [B, T2]    the *same* response tokens as ``labels``, -100 elsewhere
    ids, tasks             B strings  instance ids and task names
    ====================== ========== =====================================================

    Row ``b`` of the masked tensors is the twin of row ``b`` of the full ones; ``T1`` and ``T2``
    may differ, so the twins are compared on their response tokens (left-aligned), never by
    position. Both sides mark the same sequence of response token ids (checked: a mismatch
    raises ``ValueError``). A collator built with ``with_masked=False`` yields the first three
    keys only (a plain SFT batch). Extra keys are ignored.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    masked_input_ids: torch.Tensor
    masked_attention_mask: torch.Tensor
    masked_labels: torch.Tensor
    ids: list[str]
    tasks: list[str]
