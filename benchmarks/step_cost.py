"""Step cost of KPIGTrainer against a plain transformers.Trainer (SFT), on CPU.

For each model (the tiny random Llama; SmolLM2-135M-Instruct unless ``--quick``) it measures:

* **time per training step** (``Trainer.training_step``: forward, loss, backward; no optimizer
  step) of plain SFT, SFT with LoRA, and KPIG in each previous-model mode, on the same batches
  of the shipped demo benchmark (4 instances of ~145 tokens). Median over repeated steps after
  warm-up; all configurations are timed round-robin in one process, so that load changes on a
  shared machine hit them alike;
* **the floor** of each KPIG mode: the passes a KPIG step cannot avoid, timed alone -- student
  forward+backward on the full instance, student forward+backward on the masked twin, and the
  teacher forward on the masked twin (``copy``, ``adapter``) or the cache lookup (``cached``) --
  with the trainer's own logits setting. ``KPIG step / floor`` is the trainer's overhead;
* **peak memory**: the RSS high-water mark (``VmHWM``; ``getrusage`` where there is no
  ``/proc``) of a fresh subprocess per configuration that runs ``trainer.train()`` for a few
  steps with AdamW.

Usage::

    python benchmarks/step_cost.py            # tiny + SmolLM2 (minutes), 2 threads
    python benchmarks/step_cost.py --quick    # tiny model only, few steps

Results: ``benchmarks/results/step_cost_cpu.{json,md}`` (``--quick``: ``step_cost_cpu_quick.*``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Spinning OpenMP threads distort timings badly on a shared machine (a 2-thread SmolLM2 step
# measured 4-7x slower with the default active wait); sleeping waits keep the ratios honest.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# name -> (trainer kind, options); "baseline" is the SFT run a KPIG mode is compared with.
CONFIGS = {
    "sft": {"kind": "sft", "lora": False},
    "sft-lora": {"kind": "sft", "lora": True},
    "copy": {"kind": "kpig", "lora": False, "previous_model": "copy", "baseline": "sft"},
    "cached": {"kind": "kpig", "lora": False, "previous_model": "cached", "baseline": "sft"},
    "adapter": {"kind": "kpig", "lora": True, "previous_model": "adapter", "baseline": "sft-lora"},
    "copy-separate": {
        "kind": "kpig",
        "lora": False,
        "previous_model": "copy",
        "baseline": "sft",
        "twin_passes": "separate",
    },
    "copy-fused": {"kind": "kpig", "lora": False, "previous_model": "copy", "baseline": "sft", "twin_passes": "fused"},
    "copy-all-logits": {
        "kind": "kpig",
        "lora": False,
        "previous_model": "copy",
        "baseline": "sft",
        "response_logits_only": False,
    },
}
BATCH_SIZE = 4
TARGET_LENGTH = (130, 160)  # tokens of the full instance: batches of 4 x ~145


# --------------------------------------------------------------------------------------------
# Set-up shared by the timing and memory workers
# --------------------------------------------------------------------------------------------


def load(model_name: str):
    import torch

    from kpig_trainer.models import load_model_and_tokenizer
    from kpig_trainer.testing import tiny_llama

    if model_name == "tiny":
        model, tokenizer = tiny_llama(seed=0)
    else:
        model, tokenizer = load_model_and_tokenizer(model_name, dtype=torch.float32)
    return model, tokenizer


def select_rows(tokenizer, count: int) -> list[dict]:
    """Demo-benchmark instances whose full prompt + response is ~145 tokens, mixed over tasks."""
    from kpig_trainer.data import load_benchmark
    from kpig_trainer.kpig.collator import KPIGDataCollator

    bench = load_benchmark("demo")
    collator = KPIGDataCollator(tokenizer, max_length=None)
    low, high = TARGET_LENGTH
    pools = []
    for name in bench.seen:
        rows = [i.to_dict() for i in bench.tasks[name].instances[:80]]
        pools.append([r for r in rows if low <= len(collator.tokenize(r)["input_ids"]) <= high])
    picked = []
    while len(picked) < count and any(pools):
        for pool in pools:
            if pool and len(picked) < count:
                picked.append(pool.pop(0))
    if len(picked) < count:
        raise RuntimeError(f"only {len(picked)} demo instances of {low}-{high} tokens")
    return picked


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def build_trainer(name: str, model, tokenizer, rows, workdir: str, max_steps: int = 1):
    from transformers import Trainer, TrainingArguments

    from kpig_trainer.kpig.collator import KPIGDataCollator
    from kpig_trainer.kpig.config import KPIGConfig
    from kpig_trainer.kpig.trainer import KPIGTrainer

    spec = CONFIGS[name]
    common = dict(
        output_dir=os.path.join(workdir, name),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=BATCH_SIZE,
        max_steps=max_steps,
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
        learning_rate=1e-5,
    )
    model = copy.deepcopy(model)
    if spec["kind"] == "sft":
        if spec["lora"]:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config())
        return Trainer(
            model,
            TrainingArguments(**common),
            train_dataset=rows,
            processing_class=tokenizer,
            data_collator=KPIGDataCollator(tokenizer, max_length=None, with_masked=False),
        )
    args = KPIGConfig(
        **common,
        previous_model=spec["previous_model"],
        max_length=None,
        response_logits_only=spec.get("response_logits_only", True),
        twin_passes=spec.get("twin_passes", "auto"),
    )
    return KPIGTrainer(
        model,
        args,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=lora_config() if spec["lora"] else None,
    )


# --------------------------------------------------------------------------------------------
# Timing worker (one process, round-robin over configurations)
# --------------------------------------------------------------------------------------------


def time_model(model_name: str, warmup: int, repeats: int, n_batches: int) -> dict:
    import torch

    from kpig_trainer.kpig.losses import cross_entropy_loss
    from kpig_trainer.kpig.twins import TwinBatch, forward_twins

    base, tokenizer = load(model_name)
    rows = select_rows(tokenizer, BATCH_SIZE * n_batches)
    workdir = tempfile.mkdtemp(prefix="kpig-step-cost-")
    trainers = {name: build_trainer(name, base, tokenizer, rows, workdir) for name in CONFIGS}
    trainers["cached"].teacher.prepare()  # the one-off cache build is not a step
    kpig_collator = trainers["copy"].data_collator
    sft_collator = trainers["sft"].data_collator
    batches = []
    for b in range(n_batches):
        chunk = rows[b * BATCH_SIZE : (b + 1) * BATCH_SIZE]
        kpig, sft = kpig_collator(chunk), sft_collator(chunk)
        num_items = torch.tensor(int((kpig["labels"][:, 1:] != -100).sum()))
        batches.append({"kpig": kpig, "sft": sft, "num_items": num_items})

    def step(name):
        trainer = trainers[name]
        key = "sft" if CONFIGS[name]["kind"] == "sft" else "kpig"

        def run(batch):
            trainer.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            trainer.training_step(trainer.model, dict(batch[key]), batch["num_items"])
            return time.perf_counter() - start

        return run

    def fwd_bwd(model, twin_name, response_only):
        def run(batch):
            model.zero_grad(set_to_none=True)
            model.train()
            start = time.perf_counter()
            twin = TwinBatch.from_inputs(batch["kpig"], response_only).twin(twin_name)
            logits = forward_twins(model, [twin], logits_to_keep=True)[0]
            cross_entropy_loss(logits, twin.frame_labels, batch["num_items"]).backward()
            return time.perf_counter() - start

        return run

    def teacher_fwd(model, response_only):
        def run(batch):
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                twin = TwinBatch.from_inputs(batch["kpig"], response_only).masked
                forward_twins(model, [twin], logits_to_keep=True)
            return time.perf_counter() - start

        return run

    def lookup(batch):
        cache = trainers["cached"].teacher.cache
        start = time.perf_counter()
        twin = TwinBatch.from_inputs(batch["kpig"], True).masked
        cache.lookup(batch["kpig"]["ids"], twin.response_counts().tolist(), twin.token_hashes(), twin.labels.device)
        return time.perf_counter() - start

    full_model = trainers["sft"].model
    lora_model = trainers["adapter"].model
    teacher = trainers["copy"].teacher.model
    passes = {
        "fb_full": fwd_bwd(full_model, "full", True),
        "fb_masked": fwd_bwd(full_model, "masked", True),
        "teacher_fwd": teacher_fwd(teacher, True),
        "fb_full_lora": fwd_bwd(lora_model, "full", True),
        "fb_masked_lora": fwd_bwd(lora_model, "masked", True),
        "teacher_fwd_lora": teacher_fwd(lora_model, True),
        "cache_lookup": lookup,
        "fb_full_all_logits": fwd_bwd(full_model, "full", False),
        "fb_masked_all_logits": fwd_bwd(full_model, "masked", False),
        "teacher_fwd_all_logits": teacher_fwd(teacher, False),
    }
    # Each KPIG step is timed next to its baseline and its floor passes, so that the per-round
    # ratios compare measurements taken under the same machine load.
    order = [
        "step:sft",
        "step:copy",
        "pass:fb_full",
        "pass:fb_masked",
        "pass:teacher_fwd",
        "step:cached",
        "pass:cache_lookup",
        "step:copy-separate",
        "step:copy-fused",
        "step:sft-lora",
        "step:adapter",
        "pass:fb_full_lora",
        "pass:fb_masked_lora",
        "pass:teacher_fwd_lora",
        "step:copy-all-logits",
        "pass:fb_full_all_logits",
        "pass:fb_masked_all_logits",
        "pass:teacher_fwd_all_logits",
    ]
    jobs = {f"step:{name}": step(name) for name in CONFIGS} | {f"pass:{k}": v for k, v in passes.items()}
    assert sorted(order) == sorted(jobs)
    samples = {key: [] for key in order}
    for r in range(warmup + repeats):
        batch = batches[r % n_batches]
        for key in order:
            seconds = jobs[key](batch)
            if r >= warmup:
                samples[key].append(seconds)
        print(f"[{model_name}] round {r + 1}/{warmup + repeats} done", file=sys.stderr, flush=True)
    lengths = [int(b["kpig"]["attention_mask"].sum(1).float().mean()) for b in batches]
    masked_lengths = [int(b["kpig"]["masked_attention_mask"].sum(1).float().mean()) for b in batches]
    responses = [int(b["num_items"]) / BATCH_SIZE for b in batches]
    return {
        "median_s": {key: statistics.median(v) for key, v in samples.items()},
        "samples_s": samples,
        "batch": {
            "size": BATCH_SIZE,
            "mean_full_tokens": statistics.mean(lengths),
            "mean_masked_tokens": statistics.mean(masked_lengths),
            "mean_response_tokens": statistics.mean(responses),
        },
    }


def floors(median: dict) -> dict:
    p = {k.split(":", 1)[1]: v for k, v in median.items() if k.startswith("pass:")}
    return {
        "copy": p["fb_full"] + p["fb_masked"] + p["teacher_fwd"],
        "cached": p["fb_full"] + p["fb_masked"] + p["cache_lookup"],
        "adapter": p["fb_full_lora"] + p["fb_masked_lora"] + p["teacher_fwd_lora"],
        "copy-separate": p["fb_full"] + p["fb_masked"] + p["teacher_fwd"],
        "copy-fused": p["fb_full"] + p["fb_masked"] + p["teacher_fwd"],
        "copy-all-logits": p["fb_full_all_logits"] + p["fb_masked_all_logits"] + p["teacher_fwd_all_logits"],
    }


# --------------------------------------------------------------------------------------------
# Memory worker (a fresh process per configuration)
# --------------------------------------------------------------------------------------------


def memory_worker(model_name: str, name: str, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    base, tokenizer = load(model_name)
    rows = select_rows(tokenizer, BATCH_SIZE * steps)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = build_trainer(name, base, tokenizer, rows, workdir, max_steps=steps)
        del base
        trainer.train()
    print(json.dumps({"config": name, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's RSS high-water mark.

    ``VmHWM`` of ``/proc/self/status`` where available: ``getrusage``'s ``ru_maxrss`` survives
    ``exec`` on Linux, so a worker started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay
# resident in its heap: RSS then also counts memory that is free for reuse. A fixed threshold
# returns every freed block of >= 128 KiB to the system, so the peak RSS tracks live memory.
ALLOCATORS = {"default": {}, "fixed_mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def measure_memory(model_name: str, steps: int, threads: int, names=None) -> dict:
    """``{allocator setting: {config: peak RSS in MiB}}``, one fresh process per measurement."""
    peaks = {setting: {} for setting in ALLOCATORS}
    for name in names or CONFIGS:
        for setting, env in ALLOCATORS.items():
            command = [
                sys.executable,
                __file__,
                "--memory-worker",
                name,
                "--model",
                model_name,
                "--memory-steps",
                str(steps),
                "--threads",
                str(threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **env})
            if done.returncode != 0:
                raise RuntimeError(f"memory worker {name} failed:\n{done.stderr[-3000:]}")
            peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]
            peaks[setting][name] = peak
            print(f"[{model_name}] peak RSS {name} ({setting}): {peak:.0f} MiB", file=sys.stderr, flush=True)
    return peaks


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summarise(timing: dict, peaks: dict) -> dict:
    """Median step times, and medians of the per-round ratios (step / baseline step, step / floor
    of the same round)."""
    samples = timing["samples_s"]
    rounds = len(samples["step:sft"])
    per_round_floors = [floors({k: v[i] for k, v in samples.items()}) for i in range(rounds)]
    rows = {}
    for name, spec in CONFIGS.items():
        steps = samples[f"step:{name}"]
        default, live = peaks.get("default", {}), peaks.get("fixed_mmap", {})
        row = {"step_s": statistics.median(steps), "peak_rss_mib": default.get(name), "peak_live_mib": live.get(name)}
        if spec["kind"] == "kpig":
            baseline = spec["baseline"]
            row.update(
                baseline=baseline,
                vs_sft=statistics.median(s / b for s, b in zip(steps, samples[f"step:{baseline}"])),
                floor_s=statistics.median(f[name] for f in per_round_floors),
                vs_floor=statistics.median(s / f[name] for s, f in zip(steps, per_round_floors)),
                memory_vs_sft=(default[name] / default[baseline]) if default else None,
                live_memory_vs_sft=(live[name] / live[baseline]) if live else None,
            )
        rows[name] = row
    return rows


def markdown(results: dict) -> str:
    lines = [
        "# KPIGTrainer step cost on CPU",
        "",
        f"Machine: {results['machine']}; torch threads: {results['threads']}; "
        f"{results['warmup']} warm-up + {results['repeats']} timed steps per configuration, round-robin; "
        f"peak RSS (`VmHWM`) of a fresh process per configuration that runs {results['memory_steps']} steps of "
        "`trainer.train()` (AdamW), with glibc's default allocator settings and with a fixed mmap "
        "threshold of 128 KiB (`MALLOC_MMAP_THRESHOLD_=131072`: freed tensors go back to the system "
        "at once, so the peak tracks live memory rather than heap the allocator keeps for reuse).",
        "",
        "A step is `Trainer.training_step` (forward, loss, backward). Times are medians; ratios are "
        "medians of per-round ratios (each KPIG step is timed next to its baseline step and its floor "
        "passes, so that a ratio compares timings taken under the same machine load). The floor of a mode is the sum of "
        "the passes a KPIG step cannot avoid, timed alone: student forward+backward on the full "
        "instance and on the masked twin, teacher forward on the masked twin (or the cache lookup). "
        "`sft` is a plain `transformers.Trainer`; `adapter` is compared with `sft-lora` (LoRA r=16, all "
        "linear layers), the other modes with `sft`. `copy-all-logits` is the `copy` mode with "
        "`response_logits_only=False` (logits at every position, as a plain forward computes them); "
        "`copy-separate` and `copy-fused` are the `copy` mode with `twin_passes` set to `separate` (two "
        "forwards, one backward) and `fused` (one forward of 2B rows, the masked twin right-padded to the "
        "full twin's length); the default, `auto`, is `sequential` on CPU (forward+backward of the full "
        "twin, then of the masked twin).",
        "",
    ]
    for model_name, data in results["models"].items():
        batch = data["batch"]
        lines += [
            f"## {model_name}",
            "",
            f"Batch: {batch['size']} instances, {batch['mean_full_tokens']:.0f} tokens (masked twin "
            f"{batch['mean_masked_tokens']:.0f}), {batch['mean_response_tokens']:.1f} response tokens on average.",
            "",
            "| config | step (s) | vs SFT | floor (s) | step / floor | peak RSS (MiB) | memory vs SFT "
            "| peak RSS, fixed mmap threshold (MiB) | memory vs SFT, fixed mmap threshold |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in data["summary"].items():

            def fmt(value, spec):
                return "" if value is None else format(value, spec)

            lines.append(
                f"| {name} | {row['step_s']:.3f} | {fmt(row.get('vs_sft'), '.2f')} | {fmt(row.get('floor_s'), '.3f')} "
                f"| {fmt(row.get('vs_floor'), '.2f')} | {fmt(row.get('peak_rss_mib'), '.0f')} "
                f"| {fmt(row.get('memory_vs_sft'), '.3f')} | {fmt(row.get('peak_live_mib'), '.0f')} "
                f"| {fmt(row.get('live_memory_vs_sft'), '.3f')} |"
            )
        passes = {k.split(":", 1)[1]: v for k, v in data["median_s"].items() if k.startswith("pass:")}
        lines += ["", "Passes timed alone (median, s): " + ", ".join(f"{k} {v:.3f}" for k, v in passes.items()), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, few steps")
    parser.add_argument("--models", nargs="+", default=None, help="default: tiny smollm2 (tiny with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batches", type=int, default=3, help="distinct batches cycled through")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--memory-configs", nargs="+", default=None, help="with --no-timing: configs to measure")
    parser.add_argument(
        "--reuse-timing", default=None, help="JSON of an earlier run: keep its timings, measure memory"
    )
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/step_cost_cpu)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.model, args.memory_worker, args.memory_steps, args.threads)
        return
    models = args.models or (["tiny"] if args.quick else ["tiny", "smollm2"])
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    memory_steps = 2 if args.quick else args.memory_steps
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "threads": args.threads,
        "warmup": warmup,
        "repeats": repeats,
        "memory_steps": memory_steps,
        "models": {},
    }
    earlier = json.loads(Path(args.reuse_timing).read_text()) if args.reuse_timing else None
    if earlier:
        results.update({k: earlier[k] for k in ("machine", "threads", "warmup", "repeats")})
    for model_name in models:
        # Memory first, while this process is still small (the workers are fresh processes).
        peaks = (
            {}
            if args.no_memory
            else measure_memory(
                model_name, memory_steps, args.threads, args.memory_configs if args.no_timing else None
            )
        )
        if earlier:
            timing = {k: earlier["models"][model_name][k] for k in ("median_s", "samples_s", "batch")}
        else:
            timing = None if args.no_timing else time_model(model_name, warmup, repeats, args.batches)
        if timing is None:
            print(json.dumps(peaks, indent=2))
            continue
        results["models"][model_name] = {**timing, "peak_rss_mib": peaks, "summary": summarise(timing, peaks)}
    if args.no_timing:
        return
    stem = Path(args.out) if args.out else RESULTS / ("step_cost_cpu_quick" if args.quick else "step_cost_cpu")
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
