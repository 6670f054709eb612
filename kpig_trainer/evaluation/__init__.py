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
from .scores import TaskScore, p_score, score_task, v_score, violation_rates

__all__ = [
    "ExampleScore",
    "JudgeError",
    "LLMJudge",
    "TaskScore",
    "as_constraints",
    "bleu",
    "corpus_bleu",
    "exact_match",
    "is_out_of_scope",
    "is_wordy",
    "is_wrong_format",
    "normalize_answer",
    "p_score",
    "parse_bracketed_list",
    "parse_items",
    "parse_verdict",
    "rouge_l",
    "score_example",
    "score_task",
    "set_f1",
    "set_match",
    "token_f1",
    "v_score",
    "violation_rates",
    "violations",
]
