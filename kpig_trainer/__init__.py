"""kpig-trainer: continual instruction tuning with Key-part Information Gain (KPIG).

Public names are imported lazily, so ``import kpig_trainer`` stays cheap and the CLI starts fast.
"""

from __future__ import annotations

from kpig_trainer._lazy import lazy_exports

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
    "KPIGDataCollator": "kpig_trainer.kpig.collator",
    "format_prompt": "kpig_trainer.data.prompts",
    # KPIG math
    "info_score": "kpig_trainer.kpig.info_gain",
    "information_gain": "kpig_trainer.kpig.info_gain",
    "ig_temperature": "kpig_trainer.kpig.info_gain",
    "kpig_jsd": "kpig_trainer.kpig.losses",
    # training
    "KPIGConfig": "kpig_trainer.kpig.config",
    "KPIGTrainer": "kpig_trainer.kpig.trainer",
    "ReplayCallback": "kpig_trainer.continual.callbacks",
    "ReplayRequest": "kpig_trainer.continual.replay",
    "ReplayStrategy": "kpig_trainer.continual.replay",
    "get_replay_strategy": "kpig_trainer.continual.replay",
    "register_replay_strategy": "kpig_trainer.continual.replay",
    "ContinualArguments": "kpig_trainer.continual.arguments",
    "ContinualRunner": "kpig_trainer.continual.runner",
    "ContinualMethod": "kpig_trainer.continual.methods",
    "register_method": "kpig_trainer.continual.methods",
    "register_teacher_mode": "kpig_trainer.kpig.teacher",
    # evaluation, diversity, selection
    "evaluate_tasks": "kpig_trainer.evaluation.evaluate",
    "ContinualMatrix": "kpig_trainer.evaluation.matrix",
    "diversify": "kpig_trainer.diversity",
    "load_pools": "kpig_trainer.diversity",
    "InstructionSelector": "kpig_trainer.selection.selector",
    "align_embedder": "kpig_trainer.selection.align",
    # models, distributed runs
    "end_distributed": "kpig_trainer.distributed",
    "ModelNotFoundError": "kpig_trainer.models",
    "load_model_and_tokenizer": "kpig_trainer.models",
    "load_sentence_embedder": "kpig_trainer.models",
    "tiny_llama": "kpig_trainer.testing",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
