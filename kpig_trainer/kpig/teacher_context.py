"""What a teacher (the previous-stage model) needs from the training loop, and nothing more."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["TeacherContext"]


@dataclass
class TeacherContext:
    """The training loop as a teacher sees it. ``KPIGTrainer`` builds one over itself; a test or
    another loop can build one without a ``Trainer``.

    Attributes:
        accelerator: the ``accelerate.Accelerator`` (``unwrap_model``, ``prepare_model``,
            ``autocast``, ``process_index``, ``num_processes``).
        args: the ``KPIGConfig`` (``alpha``, ``jsd_on``, ``ig_source``, ``teacher_topk``,
            ``teacher_cache_dir``, ``output_dir``, ``response_logits_only``,
            ``per_device_eval_batch_size``, ``dataloader_num_workers``, ``disable_tqdm``).
        forward: ``forward(model, twins) -> [logits per twin]``, the twins' forward passes.
        model: returns the model being trained (possibly wrapped), read at each snapshot.
        train_dataset: returns the current training set (the ``"cached"`` mode scores it).
        data_collator: returns the collator of that training set.
        prepare_inputs: moves a collated batch to the device.
        deepspeed: whether the model runs under DeepSpeed (the frozen copy is prepared by it).
        show_progress: whether this process shows progress bars.
    """

    accelerator: Any
    args: Any
    forward: Callable[[Any, list], list]
    model: Callable[[], Any]
    train_dataset: Callable[[], Any] = lambda: None
    data_collator: Callable[[], Any] = lambda: None
    prepare_inputs: Callable[[Any], Any] = lambda inputs: inputs
    deepspeed: bool = False
    show_progress: bool = True
