"""kpig-trainer: continual instruction tuning with Key-part Information Gain (KPIG).

Public names are imported lazily, so ``import kpig_trainer`` stays cheap and the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "Constraints": "kpig_trainer.data",
    "DataError": "kpig_trainer.data",
    "Instance": "kpig_trainer.data",
    "Task": "kpig_trainer.data",
    "Stream": "kpig_trainer.data",
    "build_stream": "kpig_trainer.data",
    "load_benchmark": "kpig_trainer.data",
    "load_dataset_tasks": "kpig_trainer.data",
    "load_jsonl_tasks": "kpig_trainer.data",
    "load_superni_tasks": "kpig_trainer.data",
    "load_tasks": "kpig_trainer.data",
    "mask_key_parts": "kpig_trainer.data.masking",
    "KPIGDataCollator": "kpig_trainer.data.collator",
    "format_prompt": "kpig_trainer.data.prompts",
    # KPIG math
    "info_score": "kpig_trainer.info_gain",
    "information_gain": "kpig_trainer.info_gain",
    "ig_temperature": "kpig_trainer.info_gain",
    "kpig_jsd": "kpig_trainer.losses",
    # training
    "KPIGConfig": "kpig_trainer.config",
    "KPIGTrainer": "kpig_trainer.trainer",
    "ReplayCallback": "kpig_trainer.callbacks",
    "ReplayRequest": "kpig_trainer.replay",
    "ReplayStrategy": "kpig_trainer.replay",
    "get_replay_strategy": "kpig_trainer.replay",
    "register_replay_strategy": "kpig_trainer.replay",
    "ContinualArguments": "kpig_trainer.continual_config",
    "ContinualRunner": "kpig_trainer.continual",
    "ContinualMethod": "kpig_trainer.methods",
    "register_method": "kpig_trainer.methods",
    "register_teacher_mode": "kpig_trainer.teacher",
    # evaluation, diversity, selection
    "evaluate_tasks": "kpig_trainer.evaluation.evaluate",
    "ContinualMatrix": "kpig_trainer.evaluation.matrix",
    "diversify": "kpig_trainer.diversity",
    "load_pools": "kpig_trainer.diversity",
    "InstructionSelector": "kpig_trainer.selection",
    "align_embedder": "kpig_trainer.selection_align",
    # models, distributed runs
    "end_distributed": "kpig_trainer.distributed",
    "ModelNotFoundError": "kpig_trainer.models",
    "load_model_and_tokenizer": "kpig_trainer.models",
    "load_sentence_embedder": "kpig_trainer.models",
    "tiny_llama": "kpig_trainer.models",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kpig_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
