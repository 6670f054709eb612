"""The KPIG method: configuration, the paired collator and its batch contract, twins, the pure
functions (information gain, JSD), instance scoring, the teacher and its cache, the trainer."""

from kpig_trainer._lazy import lazy_exports

_EXPORTS = {
    "KPIGConfig": "kpig_trainer.kpig.config",
    "KPIGDataCollator": "kpig_trainer.kpig.collator",
    "batches_by_task": "kpig_trainer.kpig.collator",
    "Twin": "kpig_trainer.kpig.twins",
    "info_score": "kpig_trainer.kpig.info_gain",
    "information_gain": "kpig_trainer.kpig.info_gain",
    "information_gain_from_logits": "kpig_trainer.kpig.info_gain",
    "ig_temperature": "kpig_trainer.kpig.info_gain",
    "kpig_jsd": "kpig_trainer.kpig.losses",
    "TeacherContext": "kpig_trainer.kpig.teacher_context",
    "register_teacher_mode": "kpig_trainer.kpig.teacher",
    "KPIGTrainer": "kpig_trainer.kpig.trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
