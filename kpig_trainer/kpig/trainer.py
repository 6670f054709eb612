"""KPIGTrainer: a ``transformers.Trainer`` for continual instruction tuning with KPIG.

Paper: arXiv 2403.10056, section 3.3, equation 4::

    L = CE(full) + lambda * JSD( p_t(masked) / T  ||  p_{t-1}(masked) / T ),   T = 2 - min(IG, 1)

The math lives in :mod:`kpig_trainer.kpig.losses` and :mod:`kpig_trainer.kpig.info_gain`, the previous-stage
model in :mod:`kpig_trainer.kpig.teacher`; this module wires them into ``Trainer.compute_loss``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from kpig_trainer.kpig.config import KPIGConfig
from kpig_trainer.kpig.info_gain import check_twin_labels, ig_temperature, info_score
from kpig_trainer.kpig.losses import cross_entropy_loss, kpig_jsd, kpig_jsd_topk
from kpig_trainer.kpig.teacher import Teacher, TeacherTargets, make_teacher
from kpig_trainer.kpig.teacher_context import TeacherContext
from kpig_trainer.kpig.twins import TwinBatch, accepts_logits_to_keep, forward_twins

logger = logging.getLogger(__name__)

__all__ = ["KPIGTrainer", "StepPlan"]

# Logged metrics; each is accumulated as (sum, count) so the logged value is an exact mean over
# the logging window: ce and jsd per response token, ig and temperature per instance.
_METRICS = ("ce", "jsd", "ig", "temperature")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What a ``compute_loss`` call runs, resolved once per configuration (and teacher on/off).

    Attributes:
        jsd: the JSD term is on (``jsd_weight > 0`` and the previous model is ready).
        jsd_twin: the twin the JSD compares on (``jsd_on``).
        student_twins: the twins the current model runs with gradients.
        need_masked: the batch's masked twin is read (for the JSD or for the IG).
        want_ig: the step computes IG (for the temperature, or ``always_log_info_gain``).
        ig_from_previous: the IG comes from the previous model's passes (``ig_source="previous"``).
        temperature: the JSD uses the IG temperature (``use_temperature``); else 1.
    """

    jsd: bool
    jsd_twin: str
    student_twins: tuple[str, ...]
    need_masked: bool
    want_ig: bool
    ig_from_previous: bool
    temperature: bool

    @classmethod
    def resolve(cls, args: KPIGConfig, jsd_active: bool) -> StepPlan:
        want_ig = args.always_log_info_gain or (jsd_active and args.use_temperature)
        students = ("full", "masked") if jsd_active and args.jsd_on == "masked" else ("full",)
        return cls(
            jsd=jsd_active,
            jsd_twin=args.jsd_on,
            student_twins=students,
            need_masked="masked" in students or want_ig,
            want_ig=want_ig,
            ig_from_previous=jsd_active and args.ig_source == "previous" and want_ig,
            temperature=args.use_temperature,
        )


class KPIGTrainer(Trainer):
    """Trainer for KPIG: cross entropy on the full instance plus a temperature-scaled JSD between
    the current and the previous-stage model on the key-part-masked twin.

    A drop-in ``transformers.Trainer``: same constructor, plus

    Args:
        peft_config (`peft.PeftConfig`, *optional*):
            Wrap ``model`` with ``peft.get_peft_model(model, peft_config)`` (as TRL does).
            Needed by ``previous_model="adapter"`` unless ``model`` is a ``PeftModel`` already.
        use_teacher (`bool`, *optional*, defaults to `True`):
            Whether a previous-stage model exists. Algorithm 1 freezes ``M_{t-1}`` at every
            stage, the first included (where it is the foundation model), so the default takes
            ``model`` as passed in as ``M_{t-1}``. ``False``: no teacher, the JSD term is 0 and
            every step costs an SFT step (no masked pass).

    Teacher lifecycle (``KPIGConfig.previous_model``): the constructor snapshots ``model``
    as ``M_{t-1}`` -- a frozen copy (``"copy"``) or a frozen copy of the active adapter
    (``"adapter"``); the ``"cached"`` mode builds its top-k cache when ``train()`` starts, before
    any update, then keeps no model. For a new stage, either build a new trainer with the
    trained model (simplest: fresh optimizer and schedule), or call
    :meth:`snapshot_teacher` and train again. :meth:`release_teacher` frees it.

    The batch is the KPIG collator's (see :mod:`kpig_trainer.kpig.info_gain`); without a
    ``data_collator`` the trainer builds ``KPIGDataCollator(processing_class, ...)`` from the config.
    Logged per logging step (train and ``eval_``): ``ce``, ``jsd`` (the unweighted JSD term, 0
    when off), ``ig`` and ``temperature`` (when computed, see ``always_log_info_gain``), exact
    means over the window: per response token for ``ce`` and ``jsd``, per instance for the rest.

    What a step costs against SFT, per mode: ``benchmarks/README.md`` (``step_cost.py``).
    """

    _tag_names = ["kpig", "continual-learning"]

    def __init__(
        self,
        model: nn.Module | str | None = None,
        args: KPIGConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        *,
        peft_config: Any = None,
        use_teacher: bool = True,
    ):
        if model_init is not None:
            raise ValueError("KPIGTrainer does not support model_init: pass the model (M_{t-1}) itself")
        if compute_loss_func is not None:
            raise ValueError("KPIGTrainer computes its own loss (equation 4); drop compute_loss_func")
        args = _as_kpig_config(args)
        if isinstance(model, str):
            from kpig_trainer.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(model)
            processing_class = processing_class if processing_class is not None else tokenizer
        if model is None:
            raise ValueError("KPIGTrainer needs a model (a module or a name for load_model_and_tokenizer)")
        if peft_config is not None:
            model = _wrap_peft(model, peft_config, args)
        if data_collator is None:
            data_collator = _default_collator(processing_class, args)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if self.args.n_gpu > 1:
            raise ValueError(
                "KPIGTrainer does not support torch.nn.DataParallel (several GPUs in one process); "
                "launch one process per GPU with `accelerate launch` or `torchrun`"
            )
        # compute_loss normalises by `num_items_in_batch` itself. This flag makes the Trainer count
        # it for every batch and treat the returned loss as already scaled for gradient
        # accumulation (transformers 5.23 `training_step`: no second division by the steps).
        self.model_accepts_loss_kwargs = True
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._logits_to_keep = accepts_logits_to_keep(unwrapped)
        self._twin_passes = self._resolve_twin_passes()
        self._fuse_twins = self._twin_passes == "fused"  # also used by the teacher passes
        self._in_training_step = False
        if hasattr(unwrapped, "add_model_tags"):
            unwrapped.add_model_tags(self._tag_names)

        self._metric_sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._announced: set[str] = set()
        self._twins_checked = False
        self._plans: dict[tuple, StepPlan] = {}
        self._teacher: Teacher = make_teacher(self.args.previous_model, self._teacher_context())
        self.use_teacher = use_teacher
        if use_teacher and self.args.previous_model != "cached":
            self._teacher.snapshot()

    def _teacher_context(self) -> TeacherContext:
        """This trainer as its teacher sees it (the model and data are read when needed: the
        Trainer wraps the model later, and a stage loop may swap the training set)."""
        return TeacherContext(
            accelerator=self.accelerator,
            args=self.args,
            forward=self._forward,
            model=lambda: self.model,
            train_dataset=lambda: self.train_dataset,
            data_collator=lambda: self.data_collator,
            prepare_inputs=self._prepare_inputs,
            deepspeed=self.is_deepspeed_enabled,
            show_progress=self.is_local_process_zero(),
        )

    def _resolve_twin_passes(self) -> str:
        passes = self.args.twin_passes
        if passes == "auto":
            on_cpu = self.accelerator.device.type == "cpu"
            return "sequential" if on_cpu and not self.is_deepspeed_enabled else "fused"
        if passes == "sequential" and self.is_deepspeed_enabled:
            raise ValueError(
                "KPIGConfig.twin_passes='sequential' does not work with DeepSpeed; use 'fused' or 'separate'"
            )
        return passes

    # ----------------------------------------------------------------------------------------
    # Previous-stage model
    # ----------------------------------------------------------------------------------------

    @property
    def teacher(self) -> Teacher:
        """The previous-stage model holder (``.mode``, ``.ready``; ``.model`` in ``"copy"`` mode,
        ``.cache`` in ``"cached"`` mode)."""
        return self._teacher

    def snapshot_teacher(self) -> None:
        """Take the current weights as the frozen previous-stage model ``M_{t-1}``.

        Call at a stage boundary, before training on the new stage (Algorithm 1, lines 10-11).
        ``"copy"`` overwrites the frozen copy's weights, ``"adapter"`` copies the active adapter
        into the frozen ``kpig_previous`` adapter, ``"cached"`` rebuilds the top-k cache over the
        current ``train_dataset`` (set it first). Also turns the JSD term on.
        """
        self._teacher.snapshot()
        self.use_teacher = True

    def release_teacher(self) -> None:
        """Free the previous-stage model (copy, adapter or cache); the JSD term becomes 0."""
        self._teacher.release()
        self.use_teacher = False

    def train(self, *args, **kwargs):
        # The cached teacher is M_{t-1}: build it before any update (and before a checkpoint of
        # a later step is loaded on resume).
        if self.use_teacher and self.args.jsd_weight > 0:
            self._teacher.prepare()
        return super().train(*args, **kwargs)

    # ----------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE on the full instances + ``jsd_weight`` * JSD on the JSD twins (equation 4).

        Token losses are summed and divided by ``num_items_in_batch`` (the response tokens of
        the whole accumulated batch, counted by the Trainer on ``labels``; the masked twin has
        the same response tokens), else by this batch's response tokens. So gradient
        accumulation is exact, and the result is multiplied by the number of processes when
        ``average_tokens_across_devices`` is on, as ``Trainer.compute_loss`` does.

        The current model runs the twins as ``twin_passes`` says. With ``"sequential"`` (CPU
        default), inside ``training_step`` only, the CE of the full twin is backpropagated here
        before the masked twin's forward; the returned loss then has the value of the whole loss
        and the gradient of the JSD term, so the gradients after ``training_step`` are the same.
        """
        args = self.args
        mode = "train" if model.training else "eval"
        if self.use_teacher and args.jsd_weight > 0 and not self._teacher.ready and mode == "train":
            self._teacher.prepare()
        plan = self._step_plan(self._jsd_active())
        jsd_active, jsd_twin, student_twins = plan.jsd, plan.jsd_twin, plan.student_twins
        want_ig, ig_from_previous = plan.want_ig, plan.ig_from_previous

        full_info = None  # Info of the full twin under the current model, when taken early
        response_only = args.response_logits_only and not return_outputs
        batch = TwinBatch.from_inputs(inputs, response_only, need_masked=plan.need_masked)
        if batch.masked is not None and not self._twins_checked and mode == "train":
            check_twin_labels(batch.full.labels, batch.masked.labels)  # once: the collator's contract
            self._twins_checked = True
        full = batch.full
        num_tokens = full.response_counts().sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else num_tokens.clamp(min=1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(num_tokens.device)
        scale = 1
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()  # as Trainer.compute_loss

        def normalise(total: torch.Tensor) -> torch.Tensor:
            return total / denominator * scale

        if len(student_twins) == 2 and self._twin_passes == "sequential" and self._in_training_step:
            # Full twin: forward, CE and backward now, so that its activations are freed before
            # the masked twin's forward. The returned loss then carries the JSD's gradient only.
            full_logits = self._forward(model, [full])[0]
            ce_sum = cross_entropy_loss(full_logits, full.frame_labels, num_items_in_batch=1)
            ce_loss = normalise(ce_sum)
            if num_items_in_batch is None:  # training_step divides an unscaled loss by the steps
                ce_loss = ce_loss / self.current_gradient_accumulation_steps
            self.accelerator.backward(ce_loss)
            ce_sum = ce_sum.detach()
            if not ig_from_previous and (want_ig or args.ig_source == "current"):
                full_info = info_score(full_logits.detach(), full.frame_labels, args.alpha)
            del full_logits  # the full twin's logits are not needed past this point
            logits = {"masked": self._forward(model, [batch.masked])[0]}
        else:
            logits = dict(zip(student_twins, self._forward(model, [batch.twin(n) for n in student_twins])))
            ce_sum = cross_entropy_loss(logits["full"], full.frame_labels, num_items_in_batch=1)

        targets: TeacherTargets | None = None
        if jsd_active:
            targets = self._teacher.targets(batch, jsd_twin, ig_from_previous, strict=mode == "train")
            if targets is None:
                jsd_active = False
                self._announce("cache-miss", "KPIG: eval batches outside the teacher cache get no JSD term.")
        info_gain = targets.info_gain if targets is not None else None
        if info_gain is None and (want_ig or ("masked" in logits and args.ig_source == "current")):
            info_gain = self._current_info_gain(model, batch, logits, full_info)
        temperature = None
        if info_gain is not None:
            temperature = ig_temperature(info_gain) if plan.temperature else torch.ones_like(info_gain)

        jsd_sum = ce_sum.new_zeros(())
        if jsd_active:
            jsd_sum = self._jsd_sum(logits[jsd_twin], batch.twin(jsd_twin).frame_labels, targets, temperature)
        else:
            self._announce_no_jsd()
        loss = normalise(ce_sum + args.jsd_weight * jsd_sum)

        self._accumulate(mode, ce_sum, jsd_sum, num_tokens, info_gain, temperature)
        if return_outputs:
            return loss, CausalLMOutputWithPast(loss=loss, logits=logits["full"])
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Marks the calls of compute_loss that may run a backward of their own
        # (twin_passes="sequential"); a direct compute_loss call stays free of side effects.
        self._in_training_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._in_training_step = False

    def _step_plan(self, jsd_active: bool) -> StepPlan:
        args = self.args
        key = (jsd_active, args.jsd_on, args.always_log_info_gain, args.use_temperature, args.ig_source)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = StepPlan.resolve(args, jsd_active)
        return plan

    def _forward(self, model, twins) -> list[torch.Tensor]:
        return forward_twins(model, twins, fuse=self._fuse_twins, logits_to_keep=self._logits_to_keep)

    def _jsd_active(self) -> bool:
        return self.args.jsd_weight > 0 and self.use_teacher and self._teacher.ready

    def _jsd_sum(self, student_logits, labels, targets: TeacherTargets, temperature) -> torch.Tensor:
        args = self.args
        temperature = 1.0 if temperature is None else temperature
        if targets.logits is not None:
            return kpig_jsd(
                student_logits,
                targets.logits,
                labels,
                temperature,
                log_base=args.jsd_log_base,
                reduction="sum",
            )
        return kpig_jsd_topk(
            student_logits,
            targets.topk_logprobs,
            targets.topk_indices,
            labels,
            temperature,
            log_base=args.jsd_log_base,
            reduction="sum",
        )

    def _current_info_gain(self, model, batch: TwinBatch, logits: dict[str, torch.Tensor], full_info=None):
        """IG (equation 1) of the current model from its own detached logits, ``[B]``; runs a
        no-grad forward of the masked twin only when the step did not run one."""
        alpha = self.args.alpha
        masked_logits = logits.get("masked")
        if masked_logits is None:
            with torch.no_grad():
                masked_logits = forward_twins(model, [batch.masked], logits_to_keep=self._logits_to_keep)[0]
        if full_info is None:
            full_info = info_score(logits["full"].detach(), batch.full.frame_labels, alpha)
        return full_info - info_score(masked_logits.detach(), batch.masked.frame_labels, alpha)

    # ----------------------------------------------------------------------------------------
    # Evaluation and logging
    # ----------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss = the KPIG loss (mean over this batch's response tokens); logits of the full
        twin only when needed."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits, inputs.get("labels")

    def _accumulate(self, mode, ce_sum, jsd_sum, num_tokens, info_gain, temperature) -> None:
        tokens = num_tokens.to(ce_sum.dtype)
        zero = ce_sum.new_zeros(())
        instances = ce_sum.new_tensor(float(info_gain.numel())) if info_gain is not None else zero
        stats = torch.stack(
            [
                ce_sum.detach(),
                tokens,
                jsd_sum.detach().to(ce_sum.dtype),
                tokens,
                info_gain.sum().to(ce_sum.dtype) if info_gain is not None else zero,
                instances,
                temperature.sum().to(ce_sum.dtype) if temperature is not None else zero,
                instances,
            ]
        )
        running = self._metric_sums[mode]
        self._metric_sums[mode] = stats if running is None else running + stats

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._metric_sums[mode]
        self._metric_sums[mode] = None
        if self.accelerator.num_processes > 1:  # a collective: every rank takes part
            if sums is None:
                sums = torch.zeros(2 * len(_METRICS), device=self.accelerator.device)
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum")
        if sums is not None:
            values = sums.tolist()
            prefix = "eval_" if mode == "eval" else ""
            for i, name in enumerate(_METRICS):
                total, count = values[2 * i], values[2 * i + 1]
                if count > 0:
                    logs[f"{prefix}{name}"] = total / count
        super().log(logs, start_time)

    def _announce(self, key: str, message: str) -> None:
        if key not in self._announced:
            self._announced.add(key)
            logger.info(message)

    def _announce_no_jsd(self) -> None:
        if self.args.jsd_weight == 0:
            self._announce("no-jsd", "KPIG: jsd_weight=0 ('w/o jsd'): the JSD term is 0; steps cost SFT steps")
        elif not self.use_teacher:
            self._announce(
                "no-previous",
                "KPIG: no previous-stage model (use_teacher=False): the JSD term is 0 and logged as "
                "jsd=0; steps cost an SFT step.",
            )


# --------------------------------------------------------------------------------------------
# Constructor helpers
# --------------------------------------------------------------------------------------------


def _as_kpig_config(args: TrainingArguments | None) -> KPIGConfig:
    if args is None:
        return KPIGConfig(output_dir="kpig-output")
    if isinstance(args, KPIGConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a KPIGConfig (or TrainingArguments), got {type(args).__name__}")
    logger.warning("KPIGTrainer got plain TrainingArguments; the KPIG fields take KPIGConfig's defaults.")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    values["remove_unused_columns"] = False
    return KPIGConfig(**values)


def _wrap_peft(model: nn.Module, peft_config: Any, args: KPIGConfig) -> nn.Module:
    try:
        from peft import PeftConfig, PeftModel, get_peft_model
    except ImportError as error:
        raise ImportError("peft_config needs the `peft` package: pip install peft") from error
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
    if isinstance(model, PeftModel):
        raise ValueError(
            "model is a PeftModel already: pass it without peft_config, or the base model with peft_config"
        )
    if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config)


def _default_collator(processing_class: Any, args: KPIGConfig) -> Callable:
    if processing_class is None:
        raise ValueError(
            "KPIGTrainer needs processing_class= (the tokenizer) to build its collator, or a data_collator"
        )
    from kpig_trainer.kpig.collator import build_collator

    return build_collator(processing_class, args)
