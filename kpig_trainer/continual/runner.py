"""The continual run: for each stage, replay set, previous-model snapshot, training, evaluation,
checkpoint. A stopped run resumes at the stage it was in (see :mod:`kpig_trainer.continual.state`).

Training methods (``ContinualArguments.method``, plug-ins of :mod:`kpig_trainer.continual.methods`), so the
paper's baselines are runs of this code:

* ``kpig``: CE + lambda * JSD on the masked twin with the IG temperature (``KPIGTrainer``).
* ``sft``: sequential fine-tuning, plain loss.
* ``lora``: ``sft`` on LoRA adapters (PEFT).
* ``l2`` / ``ewc``: ``sft`` plus a quadratic anchor to the previous stage's weights (EWC weighs
  it by the diagonal Fisher of the previous stage's data).
* ``multi``: every seen task in one stage (the upper bound on seen tasks).
* ``init``: no training; the model is only evaluated.

Replay (``replay_strategy``) is independent of the method: ``kpig`` (lowest IG), ``random``,
``entropy``, ``all``, ``none``, or any strategy registered in :mod:`kpig_trainer.continual.replay`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from typing import Any, Callable

import torch

from kpig_trainer.continual.arguments import METHODS, MODEL_CONFIG_OPTIONS, ContinualArguments, load_stream
from kpig_trainer.continual.callbacks import LogRecordsCallback, ReplayCallback
from kpig_trainer.continual.methods import ContinualMethod, RegularizedKPIGTrainer, get_method
from kpig_trainer.continual.replay import ReplayChoice, ReplayRequest, ReplayStrategy
from kpig_trainer.continual.state import RunDirectory, RunState
from kpig_trainer.data import Instance, Stream
from kpig_trainer.distributed import full_weights
from kpig_trainer.fileio import atomic_write_json
from kpig_trainer.kpig.config import KPIGConfig

__all__ = [
    "METHODS",
    "ContinualArguments",
    "ContinualRunner",
    "RegularizedKPIGTrainer",
    "load_stream",
    "loss_evaluation",
]

logger = logging.getLogger(__name__)

_LOGGERS = ("kpig_trainer", "transformers")  # copied to logs/run.log
_JUDGE_OPTIONS = ("judge_base_url", "judge_model", "judge_api_key_env", "judge_cache")  # see fingerprint()
#: Options added after runs were made: at their defaults they leave the hash as it was.
# Options added after the first runs; at their defaults they leave a run's fingerprint as it was.
_LATER_OPTIONS = (
    "test_sampling",
    "seen_tasks",
    "held_out_tasks",
    "eval_tasks",
    "eval_init",
    "eval_split",
    "validation_size",
    *MODEL_CONFIG_OPTIONS,
)


def _rows(instances: list[Instance]) -> list[dict[str, Any]]:
    return [
        {
            "id": i.id,
            "task": i.task,
            "instruction": i.instruction,
            "input": i.input,
            "outputs": list(i.outputs),
            "key_parts": list(i.key_parts),
        }
        for i in instances
    ]


class ContinualRunner:
    """Runs (or resumes) a continual stream.

    Args:
        args: what to run.
        training_args: the per-stage training configuration; ``output_dir`` is the run directory.
        evaluate_fn: ``(model, tokenizer, stream, stage_index) -> dict`` scoring the model after a
            stage (``stage_index=-1``: before training); default: generation with P/V-scores
            (:meth:`generation_evaluation`), or :func:`loss_evaluation` with ``evaluation="loss"``.
        callbacks: extra ``TrainerCallback``s added to every stage's trainer.
        method: a configured :class:`~kpig_trainer.continual.methods.ContinualMethod` instance to use
            instead of building ``args.method`` (its ``name`` must be ``args.method``).
        replay_strategy: a configured :class:`~kpig_trainer.continual.replay.ReplayStrategy` instance to use
            instead of building ``args.replay_strategy`` (which is set to its ``name``).
    """

    def __init__(
        self,
        args: ContinualArguments,
        training_args: KPIGConfig,
        evaluate_fn: Callable[..., dict[str, Any]] | None = None,
        callbacks: list | None = None,
        method: ContinualMethod | None = None,
        replay_strategy: ReplayStrategy | None = None,
    ) -> None:
        if method is not None and method.name != args.method:
            raise ValueError(
                f"the method object is {method.name!r} but args.method is {args.method!r}: "
                f"set ContinualArguments(method={method.name!r})"
            )
        if replay_strategy is not None:
            args.replay_strategy = replay_strategy.name  # the record and the fingerprint name it
            self._replay_strategy = replay_strategy
        self.args = args
        self.method = get_method(method or args.method, args)
        self.training_args = training_args
        # TrainingArguments joins the process group lazily; until then process_index is 0 on
        # every rank, and every rank would write the run state.
        _ = training_args.device
        self.dir = RunDirectory(training_args.output_dir)
        self.stream = load_stream(args, training_args.seed)
        _ = self.instruction_pools  # a missing pool fails now, not after the first evaluation
        if args.judge_base_url:  # on every process, so that all stop together
            from kpig_trainer.evaluation.judge import check_api_key

            check_api_key(args.judge_api_key_env, args.judge_base_url, option="judge_api_key_env")
        self.evaluate_fn = evaluate_fn or (
            loss_evaluation if args.evaluation == "loss" else self.generation_evaluation
        )
        self.callbacks = list(callbacks or [])
        self.state = self._load_or_create_state()
        self.model = self.tokenizer = None

    # -- state ---------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hash of everything that decides the run's results (not logging or checkpoint options)."""
        training = {
            k: v
            for k, v in self.training_args.to_dict().items()
            if k
            not in {
                "output_dir",
                "logging_dir",
                "logging_steps",
                "save_steps",
                "report_to",
                "disable_tqdm",
                "save_total_limit",
                "logging_first_step",
            }
        }
        continual = {k: v for k, v in dataclasses.asdict(self.args).items() if k not in _JUDGE_OPTIONS}
        for name in _LATER_OPTIONS:  # at their defaults, runs from before them keep their hash
            if continual[name] == ContinualArguments.__dataclass_fields__[name].default:
                del continual[name]
        data = {"continual": continual, "training": training, "stages": [list(s.tasks) for s in self.stream.stages]}
        if self.args.judge_base_url:  # the judging model decides GPT scores; unset, the hash is as before
            data["judge"] = self.args.judge_model
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _load_or_create_state(self) -> RunState:
        fingerprint = self.fingerprint()
        if self.dir.state_path.exists():
            state = RunState.load(self.dir.state_path)
            if state.fingerprint != fingerprint:
                raise ValueError(
                    f"{self.dir.state_path}: this run directory holds a run with other settings "
                    f"(fingerprint {state.fingerprint}, now {fingerprint}); use another output_dir or delete it"
                )
            logger.info("resuming %s: %d of %d stages done", self.dir.root, state.completed, len(state.stages))
            return state
        return RunState(fingerprint, [s.name for s in self.stream.stages])

    def _save_state(self) -> None:
        if self.training_args.process_index == 0:
            self.state.save(self.dir.state_path)

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    # -- model ---------------------------------------------------------------------------

    def _model_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` options from the model options (``trl.ModelConfig`` fields)."""
        args = self.args
        if args.load_in_8bit or args.load_in_4bit:
            raise ValueError("load_in_8bit / load_in_4bit: the continual runner does not train quantized models")
        kwargs: dict[str, Any] = {"dtype": args.dtype if args.dtype in (None, "auto") else getattr(torch, args.dtype)}
        if args.attn_implementation:
            kwargs["attn_implementation"] = args.attn_implementation
        return kwargs

    def _load_model(self) -> None:
        from trl import get_peft_config

        from kpig_trainer.models import load_model_and_tokenizer

        done = self.state.completed
        source = self.dir.model_dir(done - 1) if done > 0 else None
        # The revision applies to the Hub model only: load_model_and_tokenizer ignores it for folders.
        options = {**self._model_kwargs(), "revision": self.args.model_revision}
        if source is not None and self.args.use_peft:
            from peft import PeftModel

            base, self.tokenizer = load_model_and_tokenizer(self.args.model_name_or_path, **options)
            self.model = PeftModel.from_pretrained(base, str(source), is_trainable=True)
        else:
            self.model, self.tokenizer = load_model_and_tokenizer(
                str(source or self.args.model_name_or_path), **options
            )
            if self.args.use_peft and self.method.trains:
                from peft import get_peft_model

                self.model = get_peft_model(self.model, get_peft_config(self.args))
        if done > 0 and self.dir.extra_path(done - 1).exists():
            self.method.load_state_dict(torch.load(self.dir.extra_path(done - 1), weights_only=False))

    def collator(self, with_masked: bool = True, *, scoring: bool = False):
        """The training collator of every stage (instruction pools included); ``scoring=True``: the
        one replay scoring and the evaluation's IG share, with the same tokenization and each task's
        own instruction."""
        from kpig_trainer.kpig.collator import build_collator

        return build_collator(
            self.tokenizer,
            self.training_args,
            max_length=self.training_args.max_length or 1024,
            instruction_pools=self.instruction_pools,
            with_masked=with_masked,
            scoring=scoring,
        )

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> RunState:
        """Train (or resume) every remaining stage; returns the final state."""
        handler = self._open_log()
        try:
            return self._run()
        finally:
            for name in _LOGGERS:
                logging.getLogger(name).removeHandler(handler)
            handler.close()

    def _open_log(self) -> logging.Handler:
        """Copy this process's kpig_trainer log (and transformers' at its own verbosity, warnings by
        default) to ``logs/run.log``."""
        path = self.dir.log_path("run.log", self.training_args.process_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        for name in _LOGGERS:
            logging.getLogger(name).addHandler(handler)
        package = logging.getLogger("kpig_trainer")
        if package.getEffectiveLevel() > logging.INFO:  # transformers keeps its own verbosity
            package.setLevel(logging.INFO)
        return handler

    def _run(self) -> RunState:
        self._load_model()
        self.method.check(self.model)
        if self.training_args.process_index == 0:
            atomic_write_json(
                self.dir.config_path,
                {"continual": dataclasses.asdict(self.args), "training": self.training_args.to_dict()},
            )
        if self.args.evaluate and self.args.eval_init and "init" not in self.state.evaluation:
            with full_weights(self.model):
                self.state.record_evaluation("init", self.evaluate_fn(self.model, self.tokenizer, self.stream, -1))
            self._save_state()
            self.write_report()
        if not self.method.trains:
            return self.state
        for stage in range(self.state.completed, len(self.stream.stages)):
            self._run_stage(stage)
        return self.state

    @property
    def replay_strategy(self):
        """The replay strategy, built once (similarity strategies keep their embeddings)."""
        if getattr(self, "_replay_strategy", None) is None:
            from kpig_trainer.continual.replay import replay_strategy_class

            self._replay_strategy = replay_strategy_class(self.args.replay_strategy).from_run(self)
        return self._replay_strategy

    @functools.cached_property
    def instruction_pools(self) -> dict[str, list[dict[str, Any]]] | None:
        """The run's instruction pools (``instruction_pools``: a folder, or ``"benchmark"`` for the
        shipped ones), read once."""
        from kpig_trainer.diversity import load_run_pools

        return load_run_pools(self.args.instruction_pools, self.stream.seen, custom_tasks=self.args.tasks)

    @functools.cached_property
    def judge(self):
        """The LLM judge of GPT-metric tasks (``judge_base_url``), built once per run and on process
        0 only (see :meth:`generation_evaluation`); its verdicts are cached in ``judge_cache``
        (default: ``judge_cache.jsonl`` in the run directory), so a resumed run does not ask again.
        None without a judge: GPT tasks fall back to ROUGE-L, flagged in the report."""
        if not self.args.judge_base_url or self.training_args.process_index != 0:
            return None
        from kpig_trainer.evaluation.judge import LLMJudge

        return LLMJudge(
            base_url=self.args.judge_base_url,
            model=self.args.judge_model,
            api_key_env=self.args.judge_api_key_env,
            cache_path=self.args.judge_cache or self.dir.root / "judge_cache.jsonl",
        )

    def replay_request(self, stage: int) -> ReplayRequest:
        seen = self.stream.seen_before(stage)
        return ReplayRequest(
            stage=stage,
            seen_tasks=seen,
            next_tasks=list(self.stream.stages[stage].tasks),
            candidates={t: self.stream.train[t] for t in seen},
            num_tasks=self.training_args.replay_tasks,
            num_instances=self.training_args.replay_instances,
            seed=self.training_args.seed,
            tasks=self.stream.tasks,
        )

    def _replay_callback(self, stage: int) -> ReplayCallback:
        def record(choice: ReplayChoice) -> None:
            entry = choice.to_dict()
            self.state.replay[str(stage)] = entry
            self.state.timings[f"stage_{stage + 1}_replay_selection"] = callback.seconds
            # Every process logs its own choice: they must agree (sharded scores, all-gathered).
            self.dir.append_log(
                "replay.jsonl",
                {"stage": stage + 1, "seconds": callback.seconds, **entry},
                self.training_args.process_index,
            )
            self._save_state()

        callback = ReplayCallback(
            self.replay_strategy,
            self.replay_request(stage),
            self.collator(scoring=True),
            alpha=self.training_args.alpha,
            batch_size=self.args.eval_batch_size,
            on_choice=record,
            show_progress=not self.training_args.disable_tqdm,
        )
        return callback

    def _replay_instances(self, stage: int) -> list[Instance]:
        if stage == 0:
            return []
        if str(stage) not in self.state.replay:  # resumed between stages: choose now
            self._replay_callback(stage).select(self.model)
        by_id = {(i.task, i.id): i for t in self.stream.seen_before(stage) for i in self.stream.train[t]}
        return [by_id[(task, iid)] for task, iid in self.state.replay[str(stage)]["instances"]]

    def _run_stage(self, stage: int) -> None:
        from datasets import Dataset

        start = time.perf_counter()
        instances = self.method.stage_instances(
            self, stage, self.stream.stage_instances(stage) + self._replay_instances(stage)
        )
        logger.info(
            "stage %d/%d (%s): %d instances",
            stage + 1,
            len(self.stream.stages),
            self.stream.stages[stage].name,
            len(instances),
        )
        args = dataclasses.replace(self.training_args, output_dir=str(self.dir.trainer_dir(stage)))
        if not self.args.uses_jsd:
            args.jsd_weight = 0.0
        callbacks = list(self.callbacks)
        callbacks.append(
            LogRecordsCallback(lambda record: self.dir.append_log("train.jsonl", {"stage": stage + 1, **record}))
        )
        if stage + 1 < len(self.stream.stages):
            callbacks.append(self._replay_callback(stage + 1))
        trainer = self.method.trainer_class()(
            model=self.model,
            args=args,
            train_dataset=Dataset.from_list(_rows(instances)),
            processing_class=self.tokenizer,
            data_collator=self.collator(self.args.uses_jsd),
            callbacks=callbacks,
            use_teacher=self.args.uses_jsd,
        )
        self.method.before_stage(self, stage, trainer)
        trainer.train(resume_from_checkpoint=self.dir.last_trainer_checkpoint(stage))
        trainer.release_teacher()
        self.model = trainer.model
        self.state.timings[f"stage_{stage + 1}_train"] = time.perf_counter() - start

        self.method.after_stage(self, stage, trainer)
        row_stream = self.evaluation_stream(stage)
        if self.args.evaluate and row_stream is not None:
            began = time.perf_counter()
            with full_weights(self.model):
                self.state.record_evaluation(
                    str(stage + 1), self.evaluate_fn(self.model, self.tokenizer, row_stream, stage)
                )
            self.state.timings[f"stage_{stage + 1}_eval"] = time.perf_counter() - began
        with full_weights(self.model):  # ZeRO-3: every rank gathers, rank 0 saves
            if self.training_args.process_index == 0:
                self.dir.save_model(stage, self.model, self.tokenizer)
        if self.training_args.process_index == 0:
            carried = self.method.state_dict()
            if carried:
                torch.save(carried, self.dir.extra_path(stage))
        self._barrier()
        self.state.completed = stage + 1
        self._save_state()
        self.write_report()
        if self.training_args.process_index == 0:
            self.dir.finish_stage(stage, self.args.keep_last_stages)
        self._barrier()

    def evaluation_stream(self, stage: int) -> Stream | None:
        """The stream whose test sets the row after ``stage`` scores (``eval_tasks``): all of it,
        only the tasks trained so far, or None for no row."""
        last = stage == len(self.stream.stages) - 1
        if self.args.eval_tasks == "all" or last:
            return self.stream
        if self.args.eval_tasks == "final":
            return None
        trained = self.stream.seen_before(stage + 1)
        return dataclasses.replace(
            self.stream, seen=trained, held_out=[], test={t: self.stream.test[t] for t in trained}
        )

    def generation_evaluation(self, model, tokenizer, stream: Stream, stage: int) -> dict[str, Any]:
        """Generate and score every seen and held-out task (one row of the matrix).

        The predictions go to ``predictions/<row>.json`` in the run directory; the returned
        entry (kept in ``state.json``) holds scores, IG, timings and settings.
        """
        from kpig_trainer.evaluation.evaluate import evaluate_stream_stage

        result = evaluate_stream_stage(
            model,
            tokenizer,
            stream,
            None if stage < 0 else stage,
            batch_size=self.args.eval_batch_size,
            held_out_demonstrations=self.args.held_out_demonstrations,
            compute_ig=self.args.eval_ig,
            alpha=self.training_args.alpha,
            mask_token=self.training_args.mask_token,
            judge=self.judge,
            ig_collator=self.collator(scoring=True) if self.args.eval_ig else None,
            show_progress=not self.training_args.disable_tqdm,
        )
        entry = result.to_dict()
        if self.args.judge_base_url and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process generates the same answers; only process 0 asks the judge, the others
            # take its row, so the state is the same everywhere and no answer is judged twice.
            box = [entry]
            torch.distributed.broadcast_object_list(box, src=0)
            entry = box[0]
        predictions = entry.pop("predictions")
        if self.training_args.process_index == 0:
            key = "init" if stage < 0 else f"stage_{stage + 1:02d}"
            atomic_write_json(self.dir.root / "predictions" / f"{key}.json", predictions)
        return entry

    def write_report(self) -> None:
        """``report.json``, ``report.md`` and plots of the run so far (generation evaluation only)."""
        if self.training_args.process_index != 0 or not self.state.evaluation:
            return
        if any("scores" not in entry for entry in self.state.evaluation.values()):
            return  # loss evaluation: no P/V-scores to report
        from kpig_trainer.evaluation.evaluate import EvalResult
        from kpig_trainer.evaluation.matrix import ContinualMatrix
        from kpig_trainer.evaluation.report import write_report

        matrix = ContinualMatrix.from_stream(self.stream)
        last = None
        for key, entry in self.state.evaluation.items():
            last = EvalResult.from_dict({**entry, "predictions": {}})
            matrix.record(None if key == "init" else int(key) - 1, last)
        config = {
            "name": self.dir.root.name,
            "continual": dataclasses.asdict(self.args),
            "training": self.training_args.to_dict(),
            "stages": [list(s.tasks) for s in self.stream.stages],
            "replay": self.state.replay,
        }
        write_report(
            self.dir.root,
            matrix,
            config,
            final=last,
            name=f"{self.args.method} ({self.dir.root.name})",
            timings=self.state.timings,
        )


@torch.no_grad()
def loss_evaluation(model, tokenizer, stream: Stream, stage: int) -> dict[str, Any]:
    """Mean response cross entropy of every seen and held-out task's test split."""
    from kpig_trainer.kpig.collator import build_collator
    from kpig_trainer.kpig.losses import cross_entropy_loss

    collator = build_collator(tokenizer, with_masked=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = {}
    try:
        for task in stream.seen + stream.held_out:
            total, count = 0.0, 0
            for start in range(0, len(stream.test[task]), 8):
                batch = collator(stream.test[task][start : start + 8])
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                labels = batch["labels"].to(device)
                n = int((labels[:, 1:] != -100).sum())
                total += cross_entropy_loss(logits, labels).item() * n
                count += n
            losses[task] = total / max(count, 1)
    finally:
        model.train(was_training)
    return {"test_loss": losses}
