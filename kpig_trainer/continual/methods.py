"""Training methods of a continual run, as plug-ins.

A method decides how each stage trains: which trainer, whether the batch carries masked twins and
the JSD term, LoRA adapters, what happens around a stage, and the state it carries from one stage
to the next (saved with the stage checkpoint, so a resumed run gets it back). The paper's methods
are the built-in ones; add another with :func:`register_method` and name it in
``ContinualArguments.method`` (or pass an instance to ``ContinualRunner(method=...)``)::

    @register_method
    class Halves(ContinualMethod):
        name = "halves"            # trains on the first half of every stage's data

        def stage_instances(self, runner, stage, instances):
            return instances[: len(instances) // 2]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kpig_trainer.continual.regularizers import ParameterAnchor, estimate_fisher, merge_fisher
from kpig_trainer.distributed import is_zero3_partitioned
from kpig_trainer.kpig.trainer import KPIGTrainer

if TYPE_CHECKING:
    from kpig_trainer.data import Instance, Stream

__all__ = [
    "ContinualMethod",
    "RegularizedKPIGTrainer",
    "get_method",
    "method_class",
    "method_names",
    "register_method",
]

_METHODS: dict[str, type[ContinualMethod]] = {}


def register_method(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Register a :class:`ContinualMethod` subclass under its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, ContinualMethod)) or not cls.name:
        raise TypeError(f"a method is a ContinualMethod subclass with a non-empty `name`, got {cls!r}")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """The registered method names."""
    return tuple(_METHODS)


def method_class(name: str) -> type[ContinualMethod]:
    """The class registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"method must be one of {method_names()}, got {name!r} "
            "(add one with kpig_trainer.continual.methods.register_method)"
        ) from None


def get_method(method: str | ContinualMethod, args: Any) -> ContinualMethod:
    """``method`` itself when it is an instance, else the registered class of that name over ``args``."""
    return method if isinstance(method, ContinualMethod) else method_class(method)(args)


class ContinualMethod:
    """Base class: plain sequential fine-tuning. Subclasses set ``name`` and override hooks.

    Attributes:
        name: the ``method`` value that selects it.
        trains: False for a method that only evaluates the model (``init``).
        uses_jsd: the batch carries masked twins and the loss the JSD term to the previous
            stage's model (``kpig``).
        uses_peft: train LoRA adapters (``ContinualArguments.lora_*``).
        needs_full_weights: refuse DeepSpeed ZeRO-3 (the hooks read every weight on every process).
        default_replay: the replay strategy when the run names none.
    """

    name = ""
    trains = True
    uses_jsd = False
    uses_peft = False
    needs_full_weights = False
    default_replay = "none"

    def __init__(self, args: Any = None):
        self.args = args

    def plan_stream(self, stream: Stream) -> Stream:
        """The stream the method trains on (``multi``: one stage of every seen task)."""
        return stream

    def check(self, model: torch.nn.Module) -> None:
        """Called once the model is loaded, before any stage: refuse what cannot work."""
        if self.needs_full_weights and is_zero3_partitioned(model):
            raise ValueError(
                f"method={self.name!r} needs the full weights on every process; it does not "
                "run under DeepSpeed ZeRO-3 (use ZeRO-2, DDP, or another method)"
            )

    def stage_instances(self, runner, stage: int, instances: list[Instance]) -> list[Instance]:
        """The training instances of ``stage`` (its own plus the replayed ones)."""
        return instances

    def trainer_class(self) -> type[KPIGTrainer]:
        return KPIGTrainer

    def before_stage(self, runner, stage: int, trainer: KPIGTrainer) -> None:
        """Called with the stage's trainer before it trains."""

    def after_stage(self, runner, stage: int, trainer: KPIGTrainer) -> None:
        """Called after the stage trained, before it is evaluated and saved."""

    def state_dict(self) -> dict[str, Any]:
        """What the method carries to later stages (saved with each stage; empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when a run resumes."""


@register_method
class KPIGMethod(ContinualMethod):
    """``kpig``: CE + lambda * JSD on the masked twin with the IG temperature, lowest-IG replay."""

    name = "kpig"
    uses_jsd = True
    default_replay = "kpig"


@register_method
class SFTMethod(ContinualMethod):
    """``sft``: sequential fine-tuning, plain loss."""

    name = "sft"


@register_method
class LoRAMethod(ContinualMethod):
    """``lora``: ``sft`` on LoRA adapters (PEFT)."""

    name = "lora"
    uses_peft = True


@register_method
class MultiMethod(ContinualMethod):
    """``multi``: every seen task in one stage (the upper bound on seen tasks)."""

    name = "multi"

    def plan_stream(self, stream: Stream) -> Stream:
        import dataclasses

        from kpig_trainer.data import Stage

        return dataclasses.replace(stream, stages=[Stage(0, "multi", tuple(stream.seen))])


@register_method
class InitMethod(ContinualMethod):
    """``init``: no training; the model is only evaluated."""

    name = "init"
    trains = False


class RegularizedKPIGTrainer(KPIGTrainer):
    """``KPIGTrainer`` plus an L2 / EWC anchor (``anchor``: a ParameterAnchor state dict or None)."""

    anchor: dict[str, Any] | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.anchor is None or not model.training:
            return result
        if not isinstance(self.anchor, ParameterAnchor):
            self.anchor = ParameterAnchor.from_state_dict(self.anchor)
        # compute_loss returns a loss already scaled for gradient accumulation; the penalty is
        # added once per optimizer step, so each micro-batch carries its share.
        penalty = self.anchor.penalty(self.accelerator.unwrap_model(model)) / self.args.gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty


@register_method
class L2Method(ContinualMethod):
    """``l2``: ``sft`` plus a quadratic anchor to the previous stage's weights."""

    name = "l2"
    needs_full_weights = True

    def __init__(self, args: Any = None):
        super().__init__(args)
        self.state: dict[str, Any] = {}

    def trainer_class(self) -> type[KPIGTrainer]:
        return RegularizedKPIGTrainer

    def before_stage(self, runner, stage, trainer):
        trainer.anchor = self.state.get("anchor")

    def importance(self, runner, trainer):
        """Per-parameter weights of the anchor (None: plain L2)."""
        return None

    def after_stage(self, runner, stage, trainer):
        importance = self.importance(runner, trainer)
        self.state["anchor"] = ParameterAnchor(runner.model, self.args.regularization_weight, importance).state_dict()

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = dict(state)


@register_method
class EWCMethod(L2Method):
    """``ewc``: the anchor weighted by the diagonal Fisher of each finished stage's data (online)."""

    name = "ewc"

    def importance(self, runner, trainer):
        fisher = estimate_fisher(runner.model, trainer.get_train_dataloader(), max_batches=self.args.fisher_batches)
        self.state["fisher"] = merge_fisher(self.state.get("fisher"), fisher, self.args.ewc_decay)
        return self.state["fisher"]
