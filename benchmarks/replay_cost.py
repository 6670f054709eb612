"""What the ``kpig`` replay strategy's scoring costs, as a share of a stage's training.

At a stage boundary the ``kpig`` strategy samples ``N`` instances of every seen task and scores
their information gain with the model as it stands: two no-grad forwards per instance (the
instance and its key-part-masked twin). This script measures, on the shipped SuperNI benchmark
(ST order) with SmolLM2-135M-Instruct on the CPU:

* **scoring**: the wall time of the whole selection (``KPIGReplay.select`` with a
  ``ModelScorer``: collation, both twins' forwards, IG) at the boundary before the stage that has
  ``--seen-tasks`` (20) seen tasks, with ``N = --replay-instances`` (10) and
  ``M = --replay-tasks`` (10). Timed in full, after a one-batch warm-up;
* **a stage's training**: that stage as the continual runner trains it (its task's training
  split plus the ``M x N`` replayed instances; ``KPIGTrainer`` with the KPIG loss, a frozen copy
  as the previous model, AdamW, batch ``--batch-size``). Training the whole stage takes an hour
  on 2 cores, so ``--train-steps`` optimizer steps are timed after a warm-up step, and the
  stage's time is their median times the stage's number of steps;
* **the share** scoring / training of a stage, for this benchmark's stage and for a stage of
  the paper's size (SupNatInst-ST: 50,901 training instances over 88
  stages, about 578 per stage, plus the 100 replayed).

Usage::

    python benchmarks/replay_cost.py                 # SmolLM2, 2 threads (~20 min)
    python benchmarks/replay_cost.py --model tiny    # the tiny random Llama (seconds)

Results: ``benchmarks/results/replay_cost_cpu.{json,md}`` (``--model tiny``: ``*_tiny.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Sleeping OpenMP waits: spinning threads distort timings on a shared machine (step_cost.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

PAPER_STAGE_INSTANCES = 50901 / 88  # SupNatInst-ST, Table 6 of arXiv 2403.10056


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny")
    parser.add_argument("--seen-tasks", type=int, default=20, help="seen tasks at the boundary (default 20)")
    parser.add_argument("--replay-tasks", type=int, default=10, help="M (default 10)")
    parser.add_argument("--replay-instances", type=int, default=10, help="N (default 10)")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch (default 4)")
    parser.add_argument("--score-batch-size", type=int, default=8, help="scoring batch (default 8)")
    parser.add_argument("--train-steps", type=int, default=8, help="timed optimizer steps (default 8)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--previous-model", default="copy", choices=["copy", "cached"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="results stem (default benchmarks/results/replay_cost_cpu)")
    return parser.parse_args(argv)


class StepTimer:
    """A TrainerCallback recording the wall time of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.steps.append(time.perf_counter() - timer.began)

        self.steps: list[float] = []
        self.began = 0.0
        self.callback = Callback()


def measure(opts: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset

    from kpig_trainer.continual.replay import ModelScorer, ReplayRequest, get_replay_strategy
    from kpig_trainer.data import load_benchmark
    from kpig_trainer.kpig.collator import KPIGDataCollator
    from kpig_trainer.kpig.config import KPIGConfig
    from kpig_trainer.kpig.trainer import KPIGTrainer
    from kpig_trainer.models import load_model_and_tokenizer
    from kpig_trainer.testing import tiny_llama

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    if opts.model == "tiny":
        model, tokenizer = tiny_llama(seed=0)
    else:
        model, tokenizer = load_model_and_tokenizer(opts.model, dtype=torch.float32)
    stream = load_benchmark("superni-kpig").stream(order="ST", seed=opts.seed)
    stage = opts.seen_tasks
    if stage >= len(stream.stages):
        raise SystemExit(f"--seen-tasks {stage}: the stream has {len(stream.stages)} stages")
    seen = stream.seen_before(stage)
    request = ReplayRequest(
        stage=stage,
        seen_tasks=seen,
        next_tasks=list(stream.stages[stage].tasks),
        candidates={t: stream.train[t] for t in seen},
        num_tasks=opts.replay_tasks,
        num_instances=opts.replay_instances,
        seed=opts.seed,
        tasks=stream.tasks,
    )
    collator = KPIGDataCollator(tokenizer, max_length=opts.max_length)
    scorer = ModelScorer(model, collator, batch_size=opts.score_batch_size, show_progress=True)
    strategy = get_replay_strategy("kpig")

    scorer.information_gain(request.sample(seen[0])[: opts.score_batch_size])  # warm-up
    began = time.perf_counter()
    choice = strategy.select(request, scorer)
    scoring = time.perf_counter() - began
    scored = sum(len(request.sample(t)) for t in seen)

    instances = stream.stage_instances(stage) + choice.instances
    steps_per_stage = math.ceil(len(instances) / opts.batch_size)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as workdir:
        args = KPIGConfig(
            output_dir=workdir,
            per_device_train_batch_size=opts.batch_size,
            max_steps=opts.train_steps + 1,
            learning_rate=2e-5,
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            logging_steps=1000,
            disable_tqdm=True,
            seed=opts.seed,
            max_length=opts.max_length,
            previous_model=opts.previous_model,
            use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = KPIGTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([i.to_dict() for i in instances]),
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )
        trainer.train()
    step = statistics.median(timer.steps[1:])  # the first step is the warm-up
    training = step * steps_per_stage
    paper_steps = math.ceil((PAPER_STAGE_INSTANCES + len(choice.instances)) / opts.batch_size)

    def share(train_seconds: float) -> float:
        return scoring / train_seconds

    return {
        "model": opts.model,
        "threads": opts.threads,
        "max_length": opts.max_length,
        "previous_model": opts.previous_model,
        "boundary_stage": stage + 1,
        "seen_tasks": len(seen),
        "M": opts.replay_tasks,
        "N": opts.replay_instances,
        "scored_instances": scored,
        "replayed": choice.tasks,
        "scoring_seconds": scoring,
        "scoring_seconds_per_instance": scoring / scored,
        "stage_task": stream.stages[stage].tasks[0],
        "stage_instances": len(instances),
        "stage_steps": steps_per_stage,
        "batch_size": opts.batch_size,
        "step_seconds_median": step,
        "step_seconds": timer.steps,
        "stage_training_seconds": training,
        "share": share(training),
        "paper_stage_instances": round(PAPER_STAGE_INSTANCES) + len(choice.instances),
        "paper_stage_training_seconds": step * paper_steps,
        "paper_share": share(step * paper_steps),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def markdown(r: dict) -> str:
    return "\n".join(
        [
            f"# Replay scoring cost ({r['model']}, {r['threads']} CPU threads, max_length {r['max_length']})",
            "",
            f"Boundary before stage {r['boundary_stage']} of the shipped SuperNI stream (ST order): "
            f"{r['seen_tasks']} seen tasks, M = {r['M']}, N = {r['N']}.",
            "",
            "| | value |",
            "|---|---:|",
            f"| instances scored (2 no-grad forwards each) | {r['scored_instances']} |",
            f"| scoring wall time | {r['scoring_seconds']:.1f} s ({r['scoring_seconds_per_instance']:.2f} s / instance) |",
            f"| stage {r['boundary_stage']} training set ({r['stage_task']} + replay) | {r['stage_instances']} instances, "
            f"{r['stage_steps']} steps of {r['batch_size']} |",
            f"| KPIG step (median of {len(r['step_seconds']) - 1}, previous model `{r['previous_model']}`) | "
            f"{r['step_seconds_median']:.2f} s |",
            f"| stage training (steps x median step) | {r['stage_training_seconds']:.0f} s |",
            f"| **scoring share of the stage** | **{100 * r['share']:.1f}%** |",
            f"| stage of the paper's size ({r['paper_stage_instances']} instances) | "
            f"{r['paper_stage_training_seconds']:.0f} s of training, scoring share **{100 * r['paper_share']:.1f}%** |",
            "",
            f"Replayed: {', '.join(r['replayed'])}.",
            "",
        ]
    )


def main(argv=None) -> None:
    opts = parse_args(argv)
    result = measure(opts)
    stem = Path(opts.out) if opts.out else RESULTS / ("replay_cost_cpu" + ("_tiny" if opts.model == "tiny" else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    from kpig_trainer.fileio import atomic_write_text

    atomic_write_text(f"{stem}.json", json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    atomic_write_text(f"{stem}.md", text)
    print(text)


if __name__ == "__main__":
    main()
