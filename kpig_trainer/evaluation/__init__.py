"""Scoring for continual instruction tuning: metrics, constraint violations, P/V-score."""

from .constraints import (
    as_constraints,
    is_out_of_scope,
    is_wordy,
    is_wrong_format,
    violations,
)
from .judge import JudgeError, LLMJudge, parse_verdict
from .metrics import (
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
from .scores import TaskScore, p_score, score_task, v_score, v_score_paper, violation_rates

# Generation, evaluation, the continual matrix, probes and reports are imported on first
# use, so that importing the metrics (or `kpig compare`) does not import torch.
_LAZY = {
    "EvalResult": "evaluate", "evaluate_stream_stage": "evaluate", "evaluate_tasks": "evaluate",
    "information_gains": "evaluate", "generate_answers": "generation", "max_new_tokens_for": "generation",
    "ContinualMatrix": "matrix", "StageRecord": "matrix", "instruction_variant_probe": "probes",
    "load_probe": "probes", "misleading_constraint_probe": "probes", "run_probe": "probes",
    "compare_markdown": "report", "read_report": "report", "write_report": "report",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
