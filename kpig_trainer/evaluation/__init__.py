"""Scoring for continual instruction tuning: metrics, constraint violations, P/V-score."""

from kpig_trainer._lazy import lazy_exports
from kpig_trainer.evaluation.constraints import (
    as_constraints,
    is_out_of_scope,
    is_wordy,
    is_wrong_format,
    violations,
)
from kpig_trainer.evaluation.judge import JudgeError, LLMJudge, parse_verdict
from kpig_trainer.evaluation.metrics import (
    ExampleScore,
    bleu,
    corpus_bleu,
    exact_match,
    normalize_answer,
    parse_bracketed_list,
    parse_items,
    rouge_l,
    score_example,
    set_f1,
    set_match,
    token_f1,
)
from kpig_trainer.evaluation.scores import TaskScore, p_score, score_task, v_score, v_score_paper, violation_rates

# Generation, evaluation, the continual matrix, probes and reports are imported on first
# use, so that importing the metrics (or `kpig compare`) does not import torch.
_LAZY = {
    "EvalResult": "kpig_trainer.evaluation.evaluate",
    "evaluate_stream_stage": "kpig_trainer.evaluation.evaluate",
    "evaluate_tasks": "kpig_trainer.evaluation.evaluate",
    "information_gains": "kpig_trainer.evaluation.evaluate",
    "generate_answers": "kpig_trainer.evaluation.generation",
    "max_new_tokens_for": "kpig_trainer.evaluation.generation",
    "ContinualMatrix": "kpig_trainer.evaluation.matrix",
    "StageRecord": "kpig_trainer.evaluation.matrix",
    "instruction_variant_probe": "kpig_trainer.evaluation.probes",
    "load_probe": "kpig_trainer.evaluation.probes",
    "misleading_constraint_probe": "kpig_trainer.evaluation.probes",
    "run_probe": "kpig_trainer.evaluation.probes",
    "compare_markdown": "kpig_trainer.evaluation.report",
    "read_report": "kpig_trainer.evaluation.report",
    "write_report": "kpig_trainer.evaluation.report",
}


__all__ = [
    "ContinualMatrix",
    "EvalResult",
    "ExampleScore",
    "JudgeError",
    "LLMJudge",
    "TaskScore",
    "as_constraints",
    "bleu",
    "corpus_bleu",
    "evaluate_stream_stage",
    "evaluate_tasks",
    "exact_match",
    "generate_answers",
    "information_gains",
    "instruction_variant_probe",
    "is_out_of_scope",
    "is_wordy",
    "load_probe",
    "max_new_tokens_for",
    "misleading_constraint_probe",
    "is_wrong_format",
    "normalize_answer",
    "p_score",
    "parse_bracketed_list",
    "parse_items",
    "parse_verdict",
    "read_report",
    "run_probe",
    "rouge_l",
    "score_example",
    "score_task",
    "set_f1",
    "set_match",
    "StageRecord",
    "token_f1",
    "v_score",
    "v_score_paper",
    "violation_rates",
    "violations",
    "compare_markdown",
    "write_report",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
