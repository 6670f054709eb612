"""KPIGConfig: paper defaults, documentation of every field, validation, argument parsing."""

from __future__ import annotations

import dataclasses
import math

import pytest
from transformers import HfArgumentParser, TrainingArguments

import kpig_trainer.kpig.config as config_module
from kpig_trainer.kpig.config import KPIGConfig

KPIG_FIELDS = [
    f for f in dataclasses.fields(KPIGConfig) if f.name not in {g.name for g in dataclasses.fields(TrainingArguments)}
]


def make(**overrides):
    return KPIGConfig(output_dir="unused", report_to=[], **overrides)


def test_paper_defaults():
    # arXiv 2403.10056, section 4.1 (Sup-NatInst): alpha 0.3, lambda 0.02, M = N = 10, lr 2e-5, 1 epoch.
    cfg = make()
    assert (cfg.alpha, cfg.jsd_weight, cfg.replay_tasks, cfg.replay_instances) == (0.3, 0.02, 10, 10)
    assert (cfg.learning_rate, cfg.num_train_epochs) == (2e-5, 1.0)
    assert cfg.mask_token == "[MASK]"
    assert cfg.previous_model == "copy" and cfg.ig_source == "current"
    assert cfg.jsd_log_base == 2.0 and cfg.teacher_topk == 64 and cfg.teacher_cache_dir is None
    assert cfg.jsd_on == "masked" and cfg.use_temperature is True
    assert cfg.remove_unused_columns is False  # the collator needs the raw text columns
    assert cfg.twin_passes == "auto" and cfg.response_logits_only and not cfg.always_log_info_gain


def test_every_kpig_field_is_documented():
    names = {f.name for f in KPIG_FIELDS}
    assert {
        "alpha",
        "jsd_weight",
        "replay_tasks",
        "replay_instances",
        "mask_token",
        "previous_model",
        "ig_source",
        "jsd_log_base",
        "teacher_topk",
        "teacher_cache_dir",
        "jsd_on",
        "use_temperature",
        "max_length",
    } <= names
    overridden = ("learning_rate", "num_train_epochs", "remove_unused_columns")
    for f in KPIG_FIELDS + [f for f in dataclasses.fields(KPIGConfig) if f.name in overridden]:
        assert f.metadata.get("help"), f.name
        assert f"{f.name} (`" in KPIGConfig.__doc__, f"{f.name} missing from the class docstring"
    assert "temperature" in KPIGConfig.__doc__ and not any(f.name == "beta" for f in KPIG_FIELDS)


@pytest.mark.parametrize(
    "option, value",
    [
        ("alpha", -0.1),
        ("alpha", math.nan),
        ("jsd_weight", -1.0),
        ("jsd_weight", math.inf),
        ("jsd_log_base", 1.0),
        ("jsd_log_base", 0.0),
        ("jsd_on", "prompt"),
        ("ig_source", "teacher"),
        ("previous_model", "ema"),
        ("teacher_topk", 0),
        ("teacher_topk", 2.5),
        ("replay_tasks", -1),
        ("replay_instances", True),
        ("mask_token", ""),
        ("max_length", 0),
        ("twin_passes", "sometimes"),
    ],
)
def test_invalid_values_name_the_option(option, value):
    with pytest.raises(ValueError, match=rf"KPIGConfig\.{option} "):
        make(**{option: value})


def test_valid_edge_values():
    cfg = make(
        alpha=0.0,
        jsd_weight=0.0,
        jsd_log_base=math.e,
        replay_tasks=0,
        replay_instances=0,
        max_length=None,
        previous_model="cached",
        ig_source="previous",
        jsd_on="full",
        teacher_topk=1,
    )
    assert cfg.jsd_weight == 0.0 and cfg.max_length is None
    assert [make(twin_passes=p).twin_passes for p in ("fused", "separate", "sequential")] == [
        "fused",
        "separate",
        "sequential",
    ]


def test_adapter_mode_needs_peft(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_peft_available", lambda: False)
    with pytest.raises(ValueError, match="previous_model='adapter' needs the `peft` package"):
        make(previous_model="adapter")
    assert config_module.KPIGConfig is KPIGConfig


def test_parsed_from_the_command_line():
    (cfg,) = HfArgumentParser(KPIGConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--report_to",
            "none",
            "--previous_model",
            "cached",
            "--jsd_weight",
            "0.05",
            "--use_temperature",
            "false",
            "--jsd_on",
            "full",
        ]
    )
    assert (cfg.previous_model, cfg.jsd_weight, cfg.use_temperature, cfg.jsd_on) == ("cached", 0.05, False, "full")
    with pytest.raises(SystemExit):
        HfArgumentParser(KPIGConfig).parse_args_into_dataclasses(["--output_dir", "x", "--previous_model", "ema"])


def test_cpu_only_machines_join_a_multi_process_launch(monkeypatch):
    # Without use_cpu (or, under DeepSpeed, a gloo backend) transformers would run every launched
    # process alone as rank 0 of 1 on a machine without GPUs.
    monkeypatch.setattr(config_module, "_cpu_only_machine", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    plain = KPIGConfig(output_dir="out")
    assert plain.use_cpu and plain.ddp_backend is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    # transformers' own set-up of a DeepSpeed launch needs the launched processes; ours runs first
    monkeypatch.setattr(TrainingArguments, "__post_init__", lambda self: None)
    under_deepspeed = KPIGConfig(output_dir="out")
    assert under_deepspeed.ddp_backend == "gloo" and not under_deepspeed.use_cpu
    assert KPIGConfig(output_dir="out", ddp_backend="ccl").ddp_backend == "ccl"  # a user's choice stays
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setattr(config_module, "_cpu_only_machine", lambda: False)
    assert not KPIGConfig(output_dir="out").use_cpu  # a GPU machine: untouched
