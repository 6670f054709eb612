"""What a continual run runs: :class:`ContinualArguments` (model, data, stream, method,
replay, checkpoints) and :func:`load_stream`. Training hyperparameters are in
:class:`~kpig_trainer.kpig.config.KPIGConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig

from kpig_trainer.data import Stream, load_benchmark, load_tasks
from kpig_trainer.data.records import DataError

METHODS = ("kpig", "sft", "lora", "l2", "ewc", "multi", "init")  # built in; more with methods.register_method
EVAL_TASKS = ("all", "trained", "final")


# trl.ModelConfig fields that ContinualArguments did not have before it took them from TRL.
MODEL_CONFIG_OPTIONS = tuple(
    f.name
    for f in dataclasses.fields(ModelConfig)
    if f.name not in {"model_name_or_path", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
)


@dataclass
class ContinualArguments(ModelConfig):
    """What to run: model, data, stream, method, replay and checkpoints.

    The model and LoRA options are TRL's (:class:`trl.ModelConfig`: ``model_name_or_path``,
    ``model_revision``, ``dtype``, ``attn_implementation``, ``use_peft``, ``lora_r``, ...), with
    the embedded SmolLM2 as the default model and rank-8 adapters as the default LoRA.

    Training hyperparameters (learning rate, batch size, ``alpha``, ``jsd_weight``, ``replay_tasks``
    M, ``replay_instances`` N, ``previous_model``, ``output_dir`` = the run directory, ...) live
    in :class:`~kpig_trainer.kpig.config.KPIGConfig`.
    """

    model_name_or_path: str = field(
        default="smollm2",
        metadata={"help": "Model: an embedded alias (smollm2, tiny-llama), a local path or a Hub id."},
    )
    benchmark: str = field(
        default="demo", metadata={"help": "Shipped benchmark: demo or superni-kpig (ignored with --tasks)."}
    )
    tasks: str | None = field(
        default=None, metadata={"help": "Your own tasks: a SuperNI folder, .json or .jsonl file."}
    )
    annotations: str | None = field(
        default=None, metadata={"help": "Annotations JSON for --tasks (metric, scope, format, key parts)."}
    )
    splits: str | None = field(
        default=None,
        metadata={"help": "Splits JSON for --tasks ({'seen': [...], 'held_out': [...]}); default: every task seen."},
    )
    order: str = field(
        default="ST", metadata={"help": "Stream order: ST (one task per stage) or SC (one category per stage)."}
    )
    stage_order: str = field(default="given", metadata={"help": "Stage order: given, or shuffle (seeded)."})
    insta_target: str | None = field(
        default=None,
        metadata={
            "help": "INSTA task selection: train only on the insta_k seen tasks whose instructions are most similar to this task, which is held out."
        },
    )
    insta_k: int = field(default=10, metadata={"help": "Number of tasks INSTA selects for insta_target."})
    seen_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Train these tasks of the benchmark (or of --tasks), in this stage order, instead of its seen split."
        },
    )
    held_out_tasks: list[str] | None = field(
        default=None, metadata={"help": "Evaluate these tasks as held out instead of the benchmark's held-out split."}
    )
    max_stages: int | None = field(default=None, metadata={"help": "Train only the first this many stages."})
    max_held_out_tasks: int | None = field(
        default=None, metadata={"help": "Evaluate only the first this many held-out tasks."}
    )
    max_train_instances: int | None = field(
        default=None, metadata={"help": "Cap of train instances per task (default: the benchmark's)."}
    )
    max_test_instances: int | None = field(
        default=None, metadata={"help": "Cap of test instances per task (default: the benchmark's)."}
    )
    test_size: float = field(
        default=0.2,
        metadata={
            "help": "Test instances per seen task: a fraction (<1) or a count (the paper: 100; a task too small for the count gives half its instances)."
        },
    )
    test_sampling: str = field(
        default="balanced",
        metadata={
            "help": "How test instances are drawn: balanced (seeded, spread over labels) or self_bleu (spread over labels and diverse, low Self-BLEU, as the KPIG paper)."
        },
    )
    method: str = field(
        default="kpig",
        metadata={
            "help": f"Training method: one of {', '.join(METHODS)}, or one added with kpig_trainer.continual.methods.register_method."
        },
    )
    replay_strategy: str | None = field(
        default=None,
        metadata={"help": "Replay: kpig, random, entropy, all, none, ... (default: kpig for method kpig, else none)."},
    )
    similarity_embedder: str | None = field(
        default=None,
        metadata={
            "help": "Embedder of the similarity replay strategies (default: embedded all-MiniLM-L6-v2; an aligned one from `kpig align-embedder`)."
        },
    )
    similarity_aggregate: str = field(
        default="mean", metadata={"help": "similarity replay: mean or max over instruction variants."}
    )
    regularization_weight: float = field(default=1.0, metadata={"help": "Weight of the l2 / ewc penalty."})
    fisher_batches: int = field(
        default=16, metadata={"help": "Batches of the finished stage used to estimate the EWC Fisher."}
    )
    ewc_decay: float = field(default=1.0, metadata={"help": "Online EWC: Fisher <- decay * Fisher + new Fisher."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (implied by method lora)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA target modules (default: PEFT's for the architecture)."}
    )
    instruction_pools: str | None = field(
        default=None,
        metadata={
            "help": "Instruction pools; each training instance is shown a variant drawn from its task's pool (paper section 3.2). A folder from `kpig diversify`, or 'benchmark': the pools shipped with the superni-kpig / demo benchmark (offline-heuristic variants, 31 per task; not with --tasks, and every trained task needs one). Default: none, every instance keeps its own instruction (the paper's 'w/o div' ablation)."
        },
    )
    keep_last_stages: int = field(default=2, metadata={"help": "Stage checkpoints to keep (0: keep all)."})
    evaluate: bool = field(default=True, metadata={"help": "Evaluate every seen and held-out task after each stage."})
    evaluation: str = field(
        default="generate",
        metadata={
            "help": "generate: answers scored with P-score / V-score (the continual-learning matrix and report); loss: test-split cross entropy only (fast)."
        },
    )
    eval_tasks: str = field(
        default="all",
        metadata={
            "help": "Which tasks each evaluation row scores. all: every seen and held-out task after every stage (needed for forward transfer); trained: after the intermediate stages only the tasks trained so far, with every task before training and after the last stage (enough for average performance, BWT and forgetting, and much cheaper on a long stream); final: every task, after the last stage only."
        },
    )
    eval_init: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the model before training (the matrix's init row: forward transfer and the 'before' of each task). A study that evaluates the base model once, in its own run of method init, can switch it off in the other runs."
        },
    )
    eval_split: str = field(
        default="test",
        metadata={
            "help": "What is evaluated. test: the test split. validation: validation_size instances carved from each seen task's training pool, beyond max_train_instances (the training set keeps its size; held-out tasks are not evaluated); for tuning hyperparameters without touching the test sets."
        },
    )
    validation_size: int = field(
        default=10, metadata={"help": "Validation instances per seen task with eval_split validation."}
    )
    eval_ig: bool = field(
        default=True,
        metadata={"help": "Also measure the mean information gain of every task's test instances after each stage."},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of evaluation."})
    held_out_demonstrations: int = field(
        default=2, metadata={"help": "Positive demonstrations in the prompt of held-out tasks (the paper: 2)."}
    )
    # The LLM judge of GPT-metric tasks, as `kpig eval --judge-*`; without one they are scored with ROUGE-L.
    judge_base_url: str | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible endpoint that judges GPT-metric tasks (e.g. http://127.0.0.1:8000/v1). Default: none, GPT tasks fall back to ROUGE-L and the report says so."
        },
    )
    judge_model: str = field(default="gpt-4o", metadata={"help": "Model name sent to judge_base_url."})
    judge_api_key_env: str | None = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the judge's API key; '' for an endpoint that needs none."},
    )
    judge_cache: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file of judge verdicts, reused across runs (default: judge_cache.jsonl in the run directory)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        method = self.method_class  # raises for an unknown method, naming the registered ones
        if method.uses_peft:
            self.use_peft = True
        if self.replay_strategy is None:
            self.replay_strategy = method.default_replay
        if self.evaluation not in ("generate", "loss"):
            raise ValueError(f"evaluation must be 'generate' or 'loss', got {self.evaluation!r}")
        if self.eval_tasks not in EVAL_TASKS:
            raise ValueError(f"eval_tasks must be one of {EVAL_TASKS}, got {self.eval_tasks!r}")
        if self.eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split must be 'test' or 'validation', got {self.eval_split!r}")
        if self.eval_split == "validation" and self.validation_size < 1:
            raise ValueError(f"validation_size must be >= 1 with eval_split validation, got {self.validation_size}")
        from kpig_trainer.data.sampling import check_test_sampling

        check_test_sampling(self.test_sampling)
        # '' from the command line switches an option of the recipe off, as in `kpig eval`.
        self.judge_base_url = self.judge_base_url or None
        self.judge_api_key_env = self.judge_api_key_env or None
        if self.judge_base_url and self.evaluation != "generate":
            raise ValueError(
                f"judge_base_url is set but evaluation is {self.evaluation!r}: only evaluation "
                "'generate' scores answers (set judge_base_url to '' or evaluation to 'generate')"
            )
        if self.judge_base_url and not self.judge_model:
            raise ValueError("judge_model is empty: name the model judge_base_url serves")
        if self.instruction_pools:
            from kpig_trainer.diversity.shipped import check_pools_option

            check_pools_option(self.instruction_pools, self.tasks)  # fail before any model loads

    @property
    def method_class(self):
        """The :class:`~kpig_trainer.continual.methods.ContinualMethod` registered as ``method``."""
        from kpig_trainer.continual.methods import method_class

        return method_class(self.method)

    @property
    def uses_jsd(self) -> bool:
        return self.method_class.uses_jsd


def load_stream(args: ContinualArguments, seed: int) -> Stream:
    """The stream the run trains on (``multi``: one stage of every seen task)."""
    options: dict[str, Any] = {
        "order": args.order,
        "stage_order": args.stage_order,
        "seed": seed,
        "test_size": int(args.test_size) if args.test_size >= 1 else args.test_size,
        "test_sampling": args.test_sampling,
    }
    for key in ("max_train_instances", "max_test_instances"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    from kpig_trainer.data import Benchmark, load_annotations, load_splits

    if args.tasks:
        annotations = load_annotations(args.annotations) if args.annotations else None
        tasks = load_tasks(args.tasks, annotations=annotations)
        split = load_splits(args.splits, known_tasks=tasks) if args.splits else None
        benchmark = Benchmark(
            Path(args.tasks).stem, tasks, split.seen if split else list(tasks), split.held_out if split else []
        )
    else:
        benchmark = load_benchmark(args.benchmark)
    for option in ("seen_tasks", "held_out_tasks"):
        names = getattr(args, option)
        if names:
            unknown = [n for n in names if n not in benchmark.tasks]
            if unknown:
                raise DataError(f"{option} names task(s) that benchmark {benchmark.name!r} does not have: {unknown}")
            if args.insta_target:
                raise DataError(f"{option} and insta_target both choose the stream's tasks; set one of them")
    if args.seen_tasks:
        options["seen"] = list(args.seen_tasks)
    if args.held_out_tasks is not None:
        options["held_out"] = list(args.held_out_tasks)
    if args.insta_target:
        from kpig_trainer.selection.selector import select_training_tasks

        # The INSTA experiment: train on the k seen tasks most similar to the target, hold it out.
        options["seen"] = select_training_tasks(
            benchmark,
            args.insta_target,
            args.insta_k,
            embedder=args.similarity_embedder,
            aggregate=args.similarity_aggregate,
        )
        options["held_out"] = [args.insta_target]
    stream = benchmark.stream(**options)
    if args.eval_split == "validation":
        if args.max_train_instances is None:
            raise DataError(
                "eval_split validation needs max_train_instances: the validation instances are "
                "the next validation_size of each task's shuffled training pool beyond it"
            )
        # The same draw with a larger cap: its extra instances are the ones a run never trains on.
        wider = benchmark.stream(**{**options, "max_train_instances": args.max_train_instances + args.validation_size})
        stream = validation_stream(stream, wider, args.validation_size)
    if args.max_stages is not None:
        if args.max_stages < 1:
            raise DataError(f"max_stages must be >= 1, got {args.max_stages}")
        kept = stream.stages[: args.max_stages]
        trained = [t for s in kept for t in s.tasks]
        stream = dataclasses.replace(
            stream,
            stages=kept,
            seen=trained,
            train={t: stream.train[t] for t in trained},
            test={t: stream.test[t] for t in trained + stream.held_out},
        )
    if args.max_held_out_tasks is not None:
        kept = stream.held_out[: args.max_held_out_tasks]
        dropped = set(stream.held_out) - set(kept)
        stream = dataclasses.replace(
            stream,
            held_out=kept,
            test={t: v for t, v in stream.test.items() if t not in dropped},
            tasks={t: v for t, v in stream.tasks.items() if t not in dropped},
        )
    return args.method_class(args).plan_stream(stream)


def validation_stream(stream: Stream, wider: Stream, size: int) -> Stream:
    """``stream`` with no held-out tasks and, as each seen task's evaluation set, the training
    instances that ``wider`` (the same draw with ``size`` more training instances per task) has
    and ``stream`` has not: hyperparameters are chosen on them, never on a test set."""
    valid = {}
    for name in stream.seen:
        used = {i.id for i in stream.train[name]}
        valid[name] = [i for i in wider.train[name] if i.id not in used]
        if len(valid[name]) < size:
            raise DataError(
                f"task {name!r} has {len(valid[name])} training instances beyond max_train_instances, "
                f"too few for validation_size={size}"
            )
    kept = {t: v for t, v in stream.tasks.items() if t not in set(stream.held_out)}
    return dataclasses.replace(
        stream,
        test=valid,
        held_out=[],
        tasks=kept,
        settings={**stream.settings, "eval_split": "validation", "validation_size": size},
    )
