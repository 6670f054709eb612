"""Configuration of :class:`~kpig_trainer.kpig.trainer.KPIGTrainer`.

Paper: "Don't Half-listen: Capturing Key-part Information in Continual Instruction Tuning"
(arXiv 2403.10056). Equation numbers below refer to its section 3.3; the defaults are the
optimal settings it reports for Sup-NatInst (section 4.1): ``alpha=0.3, lambda=0.02, M=10,
N=10``, learning rate 2e-5, one epoch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

TEACHER_MODES = ("adapter", "copy", "cached")
IG_SOURCES = ("current", "previous")
JSD_TWINS = ("masked", "full")
TWIN_PASSES = ("auto", "fused", "separate", "sequential")

__all__ = ["KPIGConfig", "TEACHER_MODES", "IG_SOURCES", "JSD_TWINS", "TWIN_PASSES"]


class _TeacherModes:
    """The teacher modes registered when asked (the command line checks membership and lists
    them), so a mode added with ``register_teacher_mode`` is a valid ``previous_model``."""

    @staticmethod
    def _modes() -> tuple[str, ...]:
        from kpig_trainer.kpig.teacher import teacher_modes

        return teacher_modes()

    def __contains__(self, value: object) -> bool:
        return value in self._modes()

    def __iter__(self):
        return iter(self._modes())

    def __len__(self) -> int:
        return len(self._modes())


@dataclass
class KPIGConfig(TrainingArguments):
    r"""Configuration class for :class:`~kpig_trainer.kpig.trainer.KPIGTrainer`.

    Extends :class:`transformers.TrainingArguments` with the parameters of KPIG. The loss of a
    batch is equation 4 of the paper::

        L = CE(full) + jsd_weight * JSD( p_t(masked) / T  ||  p_{t-1}(masked) / T ),
        T = 2 - min(IG, 1)                                  (equation 5)
        IG = Info(y | x) - Info(y | mask(x))                (equation 1)

    Parameters:
        > Parameters of the KPIG objective

        alpha (`float`, *optional*, defaults to `0.3`):
            Exponential decay of ``Info(y|x) = sum_k alpha**k p(t_k)`` (equation 2). The paper
            searches {0.05, 0.1, 0.3, 0.6, 1.0}; 0.3 is best on Sup-NatInst (0.6 on Domain).
        jsd_weight (`float`, *optional*, defaults to `0.02`):
            Weight ``lambda`` of the JSD term (equation 4). The paper searches {0.001, 0.01,
            0.02, 0.03, 0.05, 0.1}; 0.02 is best on Sup-NatInst (0.01 on Domain). ``0`` is the
            paper's "w/o jsd" ablation and costs exactly an SFT step (no masked or teacher pass).
        jsd_on (`str`, *optional*, defaults to `"masked"`):
            Twin the JSD is computed on. ``"masked"`` is KPIG; ``"full"`` is the paper's "w/o
            mask" ablation (JSD between current and previous model on the full instance). With
            ``"full"`` the temperature still comes from the IG (which needs a no-grad pass of the
            masked twin); set ``use_temperature=False`` as well for a run that never touches the
            masked twin.
        use_temperature (`bool`, *optional*, defaults to `True`):
            Use the dynamic temperature ``T = 2 - min(IG, 1)`` (equation 5). ``False`` sets
            ``T = 1``: the paper's "w/o temp" ablation.
        jsd_log_base (`float`, *optional*, defaults to `2.0`):
            Base of the logarithm in the JSD. 2 bounds it in [0, 1] as the paper states (section
            3.3); ``math.e`` gives nats (a JSD ``ln 2`` times larger for the same ``jsd_weight``).
        ig_source (`str`, *optional*, defaults to `"current"`):
            Model whose IG sets the temperature. ``"current"``: the model being trained, from the
            logits of its own full and masked passes (detached) -- free, since both passes run
            anyway. ``"previous"``: the frozen previous-stage model, as in Algorithm 1 (lines
            3-8): one more teacher forward of the full twin per step in the ``"copy"`` and
            ``"adapter"`` modes; in the ``"cached"`` mode the IG is stored with the cache.
        mask_token (`str`, *optional*, defaults to `"[MASK]"`):
            Symbol that replaces key parts in the masked twin (section 3.3). Used by the default
            data collator.
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Maximum tokenized length of an instance (and of its masked twin), used by the default
            data collator; it truncates the prompt side, never the response. ``None``: no limit.

        > Parameters of the previous-stage model (the teacher ``p_{t-1}``)

        previous_model (`str`, *optional*, defaults to `"copy"`):
            How the frozen previous-stage model is kept (Algorithm 1, lines 10-11):
            ``"copy"``: a frozen deep copy in eval mode, prepared through accelerate (and
            DeepSpeed when configured); doubles the weights in memory.
            ``"adapter"`` (PEFT only): the trained adapter is copied into a second, frozen
            adapter; the teacher pass switches to it; no second model in memory.
            ``"cached"``: before training, the previous model's top-``teacher_topk`` log-probs on
            the JSD twin of every training instance are computed once and memory-mapped from
            ``teacher_cache_dir`` (appendix B: only the current model stays in memory). The JSD
            is then taken on the renormalised top-k support, an approximation: the mass outside
            the top k is dropped (see ``kpig_trainer.kpig.losses.kpig_jsd_topk``; its error is measured
            in ``tests/kpig/test_losses.py``).
        teacher_topk (`int`, *optional*, defaults to `64`):
            Number of vocabulary entries kept per response token in the ``"cached"`` mode.
        teacher_cache_dir (`str` or `None`, *optional*, defaults to `None`):
            Folder of the teacher cache in the ``"cached"`` mode; ``None`` uses
            ``<output_dir>/kpig_teacher_cache``. Must be on a file system shared by all ranks.

        > Parameters of replay (used by the replay callback between stages)

        replay_tasks (`int`, *optional*, defaults to `10`):
            ``M``: number of seen tasks with the lowest mean IG replayed at each stage
            (Algorithm 1, line 8). The paper searches {1, 5, 10, 15, 20}.
        replay_instances (`int`, *optional*, defaults to `10`):
            ``N``: number of instances sampled per seen task to score its IG, and replayed per
            selected task (Algorithm 1, line 5). The paper searches {1, 5, 10, 15, 20}.

        > Parameters of the implementation (no effect on the loss's value)

        twin_passes (`str`, *optional*, defaults to `"auto"`):
            How the current model runs the full instance and its masked twin when both need
            gradients. ``"fused"``: one forward of ``2B`` rows (both twins right-padded to a
            common length), one backward. ``"separate"``: two forwards, one backward.
            ``"sequential"``: forward and backward of the full twin, then of the masked twin, so
            that only one twin's activations are alive at a time (two backward calls per step;
            not with DeepSpeed). ``"auto"``: ``"fused"`` on accelerators (CUDA, XPU, MPS, ...),
            where one batch of ``2B`` rows uses the device better; ``"sequential"`` on CPU, where
            compute grows with the padded tokens (fusing pads the shorter masked twin) and the
            masked twin's activations stay alive next to the full twin's (time and memory of
            each choice: ``benchmarks/README.md``); ``"fused"`` under DeepSpeed. The loss and its gradient are the same in every case.
        response_logits_only (`bool`, *optional*, defaults to `True`):
            Ask the model for logits at the response positions only (``logits_to_keep``, the
            span from the first to the last response token of the batch) instead of all
            positions. Saves the LM head's compute and the ``[B, T, V]`` logits' memory on the
            prompt; ignored for models whose ``forward`` has no ``logits_to_keep``.
        always_log_info_gain (`bool`, *optional*, defaults to `False`):
            ``ig`` and ``temperature`` are logged whenever they are computed (the default KPIG
            step computes them for free). When they are not needed (``jsd_weight=0``, no
            previous model, or ``use_temperature=False`` with ``ig_source="previous"``), ``True``
            still computes them from the current model, at the price of a no-grad forward of
            the masked twin; ``False`` keeps such steps at SFT cost.

        > Parameters whose default differs from `transformers.TrainingArguments`

        learning_rate (`float`, *optional*, defaults to `2e-5`):
            Initial AdamW learning rate; 2e-5 in the paper (section 4.1).
        num_train_epochs (`float`, *optional*, defaults to `1.0`):
            Epochs per stage; 1 in the paper (section 4.1).
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Keep the dataset's text columns (instruction, input, outputs, key parts): the KPIG
            collator builds both twins from them.
    """

    # Defaults that differ from TrainingArguments.
    learning_rate: float = field(
        default=2e-5,
        metadata={"help": "Initial learning rate of AdamW; 2e-5 in the paper (section 4.1)."},
    )
    num_train_epochs: float = field(
        default=1.0,
        metadata={"help": "Epochs per stage; 1 in the paper (section 4.1)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Keep the dataset's raw columns (instruction, key parts, ...): the KPIG collator "
            "builds the masked twin from them."
        },
    )

    # KPIG objective.
    alpha: float = field(
        default=0.3,
        metadata={"help": "Exponential decay of Info (equation 2); 0.3 in the paper for Sup-NatInst."},
    )
    jsd_weight: float = field(
        default=0.02,
        metadata={
            "help": "Weight lambda of the JSD term (equation 4); 0.02 in the paper for Sup-NatInst. "
            "0 is the 'w/o jsd' ablation."
        },
    )
    jsd_on: str = field(
        default="masked",
        metadata={
            "help": "Twin the JSD is computed on: 'masked' (KPIG) or 'full' (the 'w/o mask' ablation).",
            "choices": list(JSD_TWINS),
        },
    )
    use_temperature: bool = field(
        default=True,
        metadata={"help": "Use T = 2 - min(IG, 1) (equation 5); False sets T = 1 ('w/o temp' ablation)."},
    )
    jsd_log_base: float = field(
        default=2.0,
        metadata={"help": "Log base of the JSD: 2 bounds it in [0, 1] (the paper), e gives nats."},
    )
    ig_source: str = field(
        default="current",
        metadata={
            "help": "Model whose IG sets the temperature: 'current' (free, from the student's own "
            "passes) or 'previous' (the frozen previous-stage model).",
            "choices": list(IG_SOURCES),
        },
    )
    mask_token: str = field(
        default="[MASK]",
        metadata={"help": "Symbol that replaces key parts in the masked twin."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokenized length of an instance; the prompt side is truncated."},
    )

    # Previous-stage model.
    previous_model: str = field(
        default="copy",
        metadata={
            "help": "How the frozen previous-stage model is kept: 'copy' (frozen deep copy), "
            "'adapter' (frozen copy of the PEFT adapter), 'cached' (top-k log-probs on disk), or a "
            "mode added with kpig_trainer.kpig.teacher.register_teacher_mode.",
            "choices": _TeacherModes(),
        },
    )
    teacher_topk: int = field(
        default=64,
        metadata={"help": "Vocabulary entries kept per response token in the 'cached' mode."},
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the teacher cache ('cached' mode); default <output_dir>/kpig_teacher_cache."},
    )

    # Replay.
    replay_tasks: int = field(
        default=10,
        metadata={"help": "M: seen tasks with the lowest IG replayed per stage (Algorithm 1, line 8)."},
    )
    replay_instances: int = field(
        default=10,
        metadata={"help": "N: instances sampled (and replayed) per seen task (Algorithm 1, line 5)."},
    )

    # Implementation.
    twin_passes: str = field(
        default="auto",
        metadata={
            "help": "How the current model runs both twins: 'fused' (one forward of 2B rows), 'separate' "
            "(two forwards, one backward), 'sequential' (forward+backward per twin: least memory) or "
            "'auto' (fused on accelerators, sequential on CPU).",
            "choices": list(TWIN_PASSES),
        },
    )
    response_logits_only: bool = field(
        default=True,
        metadata={"help": "Compute logits at the response positions only (logits_to_keep)."},
    )
    always_log_info_gain: bool = field(
        default=False,
        metadata={
            "help": "Compute and log ig/temperature even on steps that do not need them (one extra "
            "no-grad forward of the masked twin)."
        },
    )

    def __post_init__(self):
        if _cpu_only_machine():
            # On a machine without an accelerator, TrainingArguments joins a multi-process launch
            # only with use_cpu (`accelerate launch --multi_gpu`, torchrun) or, under DeepSpeed,
            # with an explicit gloo backend; otherwise every process trains alone as rank 0 of 1.
            if self.deepspeed or _deepspeed_launch():
                self.ddp_backend = self.ddp_backend or "gloo"
            elif not self.use_cpu:
                self.use_cpu = True
        super().__post_init__()
        self._validate_kpig()

    def _validate_kpig(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        def choice(name: str, choices: tuple[str, ...]) -> None:
            value = getattr(self, name)
            check(value in choices, f"KPIGConfig.{name} must be one of {choices}, got {value!r}")

        def whole(name: str, minimum: int) -> None:
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                f"KPIGConfig.{name} must be an integer >= {minimum}, got {value!r}",
            )

        check(
            _is_real(self.alpha) and self.alpha >= 0,
            f"KPIGConfig.alpha must be a finite number >= 0 (the paper uses 0.3), got {self.alpha!r}",
        )
        check(
            _is_real(self.jsd_weight) and self.jsd_weight >= 0,
            f"KPIGConfig.jsd_weight must be a finite number >= 0 (lambda; the paper uses 0.02), "
            f"got {self.jsd_weight!r}",
        )
        check(
            _is_real(self.jsd_log_base) and self.jsd_log_base > 0 and self.jsd_log_base != 1,
            f"KPIGConfig.jsd_log_base must be > 0 and != 1 (2 or math.e), got {self.jsd_log_base!r}",
        )
        choice("twin_passes", TWIN_PASSES)
        choice("jsd_on", JSD_TWINS)
        choice("ig_source", IG_SOURCES)
        choice("previous_model", tuple(_TeacherModes()))
        whole("teacher_topk", 1)
        whole("replay_tasks", 0)
        whole("replay_instances", 0)
        check(
            isinstance(self.mask_token, str) and self.mask_token.strip() != "",
            f"KPIGConfig.mask_token must be a non-empty string, got {self.mask_token!r}",
        )
        if self.max_length is not None:
            whole("max_length", 1)
        if self.previous_model == "adapter":
            from transformers.utils import is_peft_available

            check(
                is_peft_available(),
                "KPIGConfig.previous_model='adapter' needs the `peft` package (pip install peft); "
                "use previous_model='copy' or 'cached' for full fine-tuning",
            )


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cpu_only_machine() -> bool:
    import torch

    if hasattr(torch, "accelerator"):
        return not torch.accelerator.is_available()
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
