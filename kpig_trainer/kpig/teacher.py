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

The twins' forward passes are in :mod:`kpig_trainer.kpig.twins`, the cache's store in
:mod:`kpig_trainer.kpig.teacher_cache`.

Lifecycle: :meth:`Teacher.snapshot` takes the current weights as the previous model. The
trainer calls it in its constructor (``"cached"``: when ``train()`` starts, before any update)
and the stage loop calls ``KPIGTrainer.snapshot_teacher()`` at each stage boundary.

A teacher sees its trainer only through a :class:`TeacherContext` (the accelerator, the config,
the twins' forward function, the model being trained and the training data), so each mode runs
and is tested without a ``Trainer``. Modes are registered by name
(:func:`register_teacher_mode`); ``KPIGConfig.previous_model`` picks one.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from kpig_trainer.distributed import is_zero3_partitioned
from kpig_trainer.kpig.info_gain import information_gain_from_logits
from kpig_trainer.kpig.teacher_cache import TeacherCache, build_teacher_cache
from kpig_trainer.kpig.teacher_context import TeacherContext
from kpig_trainer.kpig.twins import TwinBatch

logger = logging.getLogger(__name__)

PREVIOUS_ADAPTER = "kpig_previous"
"""Name of the frozen PEFT adapter that holds the previous-stage weights (``"adapter"`` mode)."""

__all__ = [
    "PREVIOUS_ADAPTER",
    "TeacherContext",
    "TeacherTargets",
    "Teacher",
    "FrozenCopy",
    "AdapterSnapshot",
    "CachedTeacher",
    "make_teacher",
    "register_teacher_mode",
    "teacher_modes",
]

_MODES: dict[str, type] = {}


def register_teacher_mode(cls: type) -> type:
    """Register a :class:`Teacher` subclass under its ``mode`` (usable as a decorator);
    ``KPIGConfig.previous_model`` can then name it. Re-registering a name replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Teacher)) or not cls.mode:
        raise TypeError(f"a teacher mode is a Teacher subclass with a non-empty `mode`, got {cls!r}")
    _MODES[cls.mode] = cls
    return cls


def teacher_modes() -> tuple[str, ...]:
    """The registered teacher modes (the built-in ``copy``, ``adapter``, ``cached`` and any
    registered with :func:`register_teacher_mode`)."""
    return tuple(_MODES)


@dataclass
class TeacherTargets:
    """What the previous model contributes to a step: its distribution on the JSD twin (full
    ``logits`` in the frame of that twin, or a top-k cache in packed order) and, when asked,
    its information gain per instance."""

    logits: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    info_gain: torch.Tensor | None = None


class Teacher:
    """Base class of the three ways to keep the previous-stage model."""

    mode: str = ""

    def __init__(self, context: TeacherContext):
        self.context = context

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
        context = self.context
        names = ["full", "masked"] if with_info_gain else [jsd_twin]
        with torch.no_grad(), context.accelerator.autocast():
            logits = dict(zip(names, context.forward(teacher, [batch.twin(name) for name in names])))
        info_gain = None
        if with_info_gain:
            info_gain = information_gain_from_logits(
                logits["full"],
                batch.full.frame_labels,
                logits["masked"],
                batch.masked.frame_labels,
                context.args.alpha,
                check_twins=False,
            )
        return TeacherTargets(logits=logits[jsd_twin], info_gain=info_gain)


@register_teacher_mode
class FrozenCopy(Teacher):
    """``"copy"``: a frozen deep copy of the model, in eval mode."""

    mode = "copy"

    def __init__(self, context: TeacherContext):
        super().__init__(context)
        self.model: torch.nn.Module | None = None

    @property
    def ready(self) -> bool:
        return self.model is not None

    def snapshot(self) -> None:
        accelerator = self.context.accelerator
        source = accelerator.unwrap_model(self.context.model())
        if self.model is not None:  # later stages: overwrite the weights in place
            copy_weights(source, accelerator.unwrap_model(self.model))
            return
        if is_zero3_partitioned(source):
            # ZeRO-3 after training: the parameters are shards, a deep copy would copy shards and
            # DeepSpeed's hooks. Build the architecture anew and copy the gathered weights.
            if not hasattr(type(source), "_from_config"):
                raise ValueError(
                    "previous_model='copy' under DeepSpeed ZeRO-3 needs a transformers model; for PEFT "
                    "models use previous_model='adapter', or 'cached'"
                )
            teacher = type(source)._from_config(source.config, dtype=next(source.parameters()).dtype)
            copy_weights(source, teacher)
        else:
            teacher = copy.deepcopy(source)
        teacher.requires_grad_(False)
        teacher.eval()
        if self.context.deepspeed:
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


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy ``source``'s parameters and buffers into ``target`` (the same architecture).

    Under DeepSpeed ZeRO-3 either side may be sharded: each parameter pair is gathered, rank 0
    copies and DeepSpeed re-shards ``target`` from rank 0. Every process must call it.
    """
    if not (is_zero3_partitioned(source) or is_zero3_partitioned(target)):
        target.load_state_dict(source.state_dict())
        return
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    targets = dict(target.named_parameters())
    missing = [name for name, _ in source.named_parameters() if name not in targets]
    if missing:
        raise ValueError(f"copy_weights: the target model has no parameters {missing[:3]}")
    for name, param in source.named_parameters():
        into = targets[name]
        with deepspeed.zero.GatheredParameters([param, into], modifier_rank=0):
            if rank == 0 or not hasattr(into, "ds_id"):
                into.data.copy_(param.data)
    buffers = dict(target.named_buffers())
    for name, buffer in source.named_buffers():
        if name in buffers:
            buffers[name].copy_(buffer)


@register_teacher_mode
class AdapterSnapshot(Teacher):
    """``"adapter"``: the previous weights live in a second, frozen PEFT adapter."""

    mode = "adapter"

    def __init__(self, context: TeacherContext):
        from peft import PeftModel

        super().__init__(context)
        # The PeftModel itself: a DDP / DeepSpeed wrapper added later wraps this same object.
        self.model = context.accelerator.unwrap_model(context.model())
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


@register_teacher_mode
class CachedTeacher(Teacher):
    """``"cached"``: top-k log-probs of the previous model, computed once, memory-mapped."""

    mode = "cached"

    def __init__(self, context: TeacherContext):
        super().__init__(context)
        self.cache: TeacherCache | None = None

    @property
    def ready(self) -> bool:
        return self.cache is not None

    @property
    def directory(self) -> Path:
        args = self.context.args
        return Path(args.teacher_cache_dir or os.path.join(args.output_dir or ".", "kpig_teacher_cache"))

    def prepare(self) -> None:
        if self.cache is None:
            self.snapshot()

    def snapshot(self) -> None:
        self.release()
        self.cache = build_teacher_cache(self.context, self.directory)

    def targets(self, batch, jsd_twin, with_info_gain, strict=True):
        if batch.ids is None:
            raise KeyError("previous_model='cached' needs the instance ids in the batch (key 'ids')")
        twin = batch.twin(jsd_twin)
        found = self.cache.lookup(
            batch.ids,
            twin.response_counts().tolist(),
            twin.token_hashes(),
            twin.labels.device,
            with_info_gain=with_info_gain,
            strict=strict,
        )
        if found is None:
            return None
        logprobs, indices, info_gain = found
        return TeacherTargets(topk_logprobs=logprobs, topk_indices=indices, info_gain=info_gain)

    def release(self) -> None:
        self.cache = None


def make_teacher(mode: str, context: TeacherContext) -> Teacher:
    """The teacher of ``mode`` (a registered name) over ``context``."""
    if mode not in _MODES:
        raise ValueError(
            f"previous_model={mode!r} is not a teacher mode; registered: {', '.join(_MODES)} "
            "(add one with kpig_trainer.kpig.teacher.register_teacher_mode)"
        )
    return _MODES[mode](context)
