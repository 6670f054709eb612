"""The instruction pools shipped with the benchmark: complete, keep the key parts, reproducible,
and fed to a run by ``instruction_pools: benchmark``."""

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from transformers import TrainerCallback

from kpig_trainer.benchmark.superni_kpig.build_pools import build_pools
from kpig_trainer.continual.runner import ContinualArguments, ContinualRunner
from kpig_trainer.data import load_benchmark
from kpig_trainer.data.masking import find_key_part_spans
from kpig_trainer.data.records import DataError
from kpig_trainer.diversity import SHIPPED_POOLS_DIR, load_pools, load_run_pools, normalize_instruction, shipped
from kpig_trainer.kpig.config import KPIGConfig
from kpig_trainer.train import parse_run_args

ROOT = Path(__file__).resolve().parents[2]
POOL_DIR = ROOT / "kpig_trainer" / "benchmark" / "superni_kpig" / "pools"
REBUILT = [
    "task1599_smcalflow_classification",
    "task1152_bard_analogical_reasoning_causation",
    "task1409_dart_text_generation",
]


@pytest.fixture(scope="module")
def benchmark():
    return load_benchmark("superni-kpig")


@pytest.fixture(scope="module")
def pools():
    return load_pools(POOL_DIR)


def test_every_benchmark_task_has_a_full_pool_seeded_with_its_definition(benchmark, pools):
    assert SHIPPED_POOLS_DIR.resolve() == POOL_DIR
    assert len(benchmark.tasks) == 101 and set(pools) == set(benchmark.tasks)
    files = sorted(p.name for p in POOL_DIR.iterdir())
    assert files == sorted([f"{name}.jsonl" for name in benchmark.tasks] + ["README.md"])
    for name, task in benchmark.tasks.items():
        pool = pools[name]
        assert len(pool) == 31, name  # the paper's pool size: the seed and 30 evolutions
        assert pool[0] == {"instruction": task.definition, "key_parts": list(task.key_parts)}, name
        assert len({normalize_instruction(e["instruction"]) for e in pool}) == 31, name  # no repeats
    size = sum(p.stat().st_size for p in POOL_DIR.glob("*.jsonl"))
    assert size < 4_000_000  # a few MB in the package
    assert not any(json.loads(line).get("timestamp") for p in POOL_DIR.glob("*.jsonl") for line in p.open())


def test_every_variant_keeps_every_key_part_of_its_task(benchmark, pools):
    checked = 0
    for name, task in benchmark.tasks.items():
        assert task.key_parts, f"{name}: no hand-written key parts to check against"
        for entry in pools[name]:
            text = entry["instruction"]
            assert find_key_part_spans(text, task.key_parts).unmatched == [], (name, text)
            assert all(part in text for part in task.key_parts), (name, text)  # verbatim, not only fuzzy
            assert find_key_part_spans(text, entry["key_parts"]).unmatched == [], (name, text)
            checked += 1
    assert checked == 101 * 31


def test_rebuilding_some_tasks_gives_the_shipped_bytes(tmp_path):
    written = build_pools(tmp_path, REBUILT)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.jsonl" for n in REBUILT)  # no temp files
    for name in REBUILT:
        assert written[name].read_bytes() == (POOL_DIR / f"{name}.jsonl").read_bytes(), name
    with pytest.raises(ValueError, match="unknown task"):
        build_pools(tmp_path, ["task000_not_in_the_benchmark"])


def test_benchmark_option_resolves_to_the_shipped_pools_in_the_paper_recipe(tmp_path, pools):
    continual, training = parse_run_args(
        [
            "--recipe",
            str(ROOT / "recipes" / "superni_st" / "kpig.yaml"),
            "--bf16",
            "false",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert continual.instruction_pools == "benchmark"
    runner = ContinualRunner(continual, training)  # no model is loaded before run()
    assert len(runner.stream.seen) == 74
    assert runner.instruction_pools == pools


def test_benchmark_option_is_refused_for_own_tasks():
    with pytest.raises(DataError, match=r"instruction_pools='benchmark'.*tasks='my/tasks.jsonl'.*kpig diversify"):
        ContinualArguments(tasks="my/tasks.jsonl", instruction_pools="benchmark")
    with pytest.raises(DataError, match=r"instruction_pools='benchmark'.*tasks="):
        parse_run_args(
            [
                "--recipe",
                str(ROOT / "recipes" / "domain" / "kpig.yaml"),
                "--bf16",
                "false",
                "--instruction_pools",
                "benchmark",
            ]
        )
    with pytest.raises(DataError, match=r"instruction_pools='benchmark'.*own tasks"):
        load_run_pools("benchmark", ["a"], custom_tasks="my/tasks.jsonl")


def test_a_trained_task_without_a_shipped_pool_is_an_error(tmp_path, monkeypatch):
    kept = "task1599_smcalflow_classification"
    shutil.copy(POOL_DIR / f"{kept}.jsonl", tmp_path)
    monkeypatch.setattr(shipped, "SHIPPED_POOLS_DIR", tmp_path)
    assert set(load_run_pools("benchmark", [kept])) == {kept}
    missing = "task1600_smcalflow_sentence_generation"
    with pytest.raises(DataError, match=rf"instruction_pools='benchmark'.*no pool for 1 task.*{missing}.*build_pools"):
        load_run_pools("benchmark", [kept, missing])


def test_own_pool_folders_are_checked_too(tmp_path, caplog):
    with pytest.raises(DataError, match=r"instruction_pools='.*nowhere': folder not found"):
        load_run_pools(str(tmp_path / "nowhere"), ["a"])
    shutil.copy(POOL_DIR / f"{REBUILT[0]}.jsonl", tmp_path)
    with caplog.at_level(logging.WARNING, logger="kpig_trainer.diversity.shipped"):
        own = load_run_pools(str(tmp_path), [REBUILT[0], "other_task"])
    assert set(own) == {REBUILT[0]} and "no pool for 1 task(s)" in caplog.text
    assert load_run_pools(None, ["a"]) is None and load_run_pools("", ["a"]) is None


class WatchStage(TrainerCallback):
    """Records what each stage's trainer trains with: a collated batch and its teacher cache."""

    def __init__(self):
        self.stages = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        rows = list(train_dataloader.dataset)
        self.stages.append({"collator": train_dataloader.collate_fn, "rows": rows})

    def on_train_end(self, args, state, control, **kwargs):
        index = Path(args.output_dir) / "kpig_teacher_cache" / "part-00000.index.json"
        self.stages[-1]["cache"] = json.loads(index.read_text())


@pytest.mark.slow
def test_a_kpig_run_trains_on_shipped_variants_with_the_cached_previous_models_ig(
    tmp_path, tmp_path_factory, monkeypatch, caplog, tiny_tokenizer, pools
):
    monkeypatch.setenv("KPIG_CACHE", str(tmp_path_factory.getbasetemp() / "kpig-cache"))
    watch = WatchStage()
    continual = ContinualArguments(
        model_name_or_path="tiny-llama",
        benchmark="demo",
        instruction_pools="benchmark",
        max_stages=2,
        max_train_instances=6,
        max_test_instances=2,
        evaluate=False,
    )
    training = KPIGConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        replay_tasks=1,
        replay_instances=2,
        max_length=1024,
        previous_model="cached",
        ig_source="previous",
    )
    runner = ContinualRunner(continual, training, callbacks=[watch])
    with caplog.at_level(logging.WARNING, logger="kpig_trainer"):
        state = runner.run()
    assert state.completed == 2 and len(watch.stages) == 2
    drawn = Counter()
    for stage in watch.stages:
        collator = stage["collator"]
        assert collator.instruction_pools == pools
        batch = collator(stage["rows"][:4])
        for k, row in enumerate(stage["rows"][:4]):
            instruction, key_parts = collator.instruction_for(row)
            pool = [e["instruction"] for e in pools[row["task"]]]
            assert instruction in pool  # a variant of its task's shipped pool ...
            drawn[instruction == row["instruction"]] += 1
            prompt = tiny_tokenizer.decode(batch["input_ids"][k], skip_special_tokens=True)
            assert instruction in prompt  # ... is what the model is shown
        # ig_source previous with a cached teacher: the cache holds the previous model's IG.
        meta, entries = stage["cache"]["meta"], stage["cache"]["entries"]
        assert meta["has_info_gain"] is True and len(entries) == len(stage["rows"])
        assert all(isinstance(entry[2], float) for entry in entries.values())
    assert drawn[False] > 0  # the variants, not only the seed instruction, are trained on
    # The cache was built on the same variants as the training step sees (no stale twins).
    assert "differ from the ones the teacher cache was built on" not in caplog.text
