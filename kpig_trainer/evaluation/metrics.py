"""Per-example performance metrics for the KPIG evaluation protocol (paper section 3.4).

Every per-example metric has the signature ``f(prediction, references) -> float`` and returns
a value in [0, 1]. Where a task allows several reference answers, the best one counts (the
maximum over references), except BLEU, which uses sacrebleu's native multi-reference BLEU.

``score_example`` picks the metric from a task's annotation (``ACC``, ``F1``, ``ROUGE``,
``BLEU``, ``Match``, ``GPT``) and reports which metric it actually used.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from kpig_trainer.answers import normalize_answer, parse_bracketed_list, parse_items  # noqa: F401  (public here too)
from kpig_trainer.evaluation.constraints import as_constraints

if TYPE_CHECKING:
    from kpig_trainer.evaluation.judge import LLMJudge

__all__ = [
    "ExampleScore",
    "bleu",
    "corpus_bleu",
    "exact_match",
    "normalize_answer",
    "parse_bracketed_list",
    "parse_items",
    "rouge_l",
    "score_example",
    "set_f1",
    "set_match",
    "token_f1",
]


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """ACC: 1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def _tokens(text: str) -> list[str]:
    # SQuAD-style tokens, minus article removal: punctuation at token edges is dropped.
    tokens = (tok.strip(string.punctuation) for tok in normalize_answer(text).split())
    return [tok for tok in tokens if tok]


def _f1(pred: Counter, ref: Counter) -> float:
    if not pred and not ref:
        return 1.0
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD-style token F1 (bag of tokens), maximum over references.

    Tokens are the whitespace-split words of ``normalize_answer(text)`` with punctuation
    stripped from their edges. Two empty answers score 1.0; one empty answer scores 0.0.
    """
    pred = Counter(_tokens(prediction))
    return max((_f1(pred, Counter(_tokens(ref))) for ref in references), default=0.0)


def set_f1(prediction: str, references: Sequence[str], delimiter: str | None = None) -> float:
    """F1 over *sets* of items, for extraction / labelling outputs ("a, b, c").

    Items come from ``parse_items`` (a bracketed list, else split by ``delimiter``, default
    ``","``), each normalised with ``normalize_answer``; duplicates collapse. Maximum over
    references; two empty sets score 1.0.
    """
    pred = Counter(set(_flat_items(prediction, delimiter)))
    return max(
        (_f1(pred, Counter(set(_flat_items(ref, delimiter)))) for ref in references),
        default=0.0,
    )


# rouge-score's default tokenizer keeps only these characters (after lowercasing).
_ROUGE_TOKEN_CHAR = re.compile(r"[a-z0-9]")


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Building the scorer loads the Porter stemmer; do it once per process.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure from ``rouge-score`` (Porter stemmer on), maximum over references.

    rouge-score's tokenizer keeps only ASCII letters and digits, so two answers without any
    such character (``"."``, non-Latin text) would score 0 even when identical; for those
    we fall back to normalised exact match.
    """
    if prediction in references:  # identical token sequences: F = 1, skip the O(n*m) LCS
        return 1.0
    scorer = _rouge_scorer()
    best = 0.0
    for ref in references:
        score = scorer.score(ref, prediction)["rougeL"].fmeasure
        if score == 0.0 and not _ROUGE_TOKEN_CHAR.search(ref.lower()):  # no token to overlap
            score = exact_match(prediction, [ref])
        best = max(best, score)
    return best


@lru_cache(maxsize=1)
def _sentence_bleu_metric():
    from sacrebleu.metrics import BLEU

    # Same settings as sacrebleu.sentence_bleu (exp smoothing, effective order).
    return BLEU(effective_order=True)


def bleu(prediction: str, references: Sequence[str]) -> float:
    """Sentence BLEU from sacrebleu divided by 100 (so in [0, 1]).

    Uses sacrebleu's own multi-reference BLEU when several references are given (n-gram
    counts clipped by the maximum over references), as ``sacrebleu.sentence_bleu`` does.
    """
    if not references:
        return 0.0
    score = _sentence_bleu_metric().sentence_score(prediction, list(references)).score
    return min(score / 100, 1.0)  # float error can give 100.00000000000004


def corpus_bleu(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU from sacrebleu divided by 100; examples may have different numbers of
    references (missing ones are padded with ``None``, which sacrebleu ignores)."""
    import sacrebleu

    if len(predictions) != len(references_list):
        raise ValueError(f"{len(predictions)} predictions but {len(references_list)} reference lists")
    if not predictions:
        return math.nan
    width = max(len(refs) for refs in references_list)
    streams = [[refs[i] if i < len(refs) else None for refs in references_list] for i in range(width)]
    return min(sacrebleu.corpus_bleu(list(predictions), streams).score / 100, 1.0)


# ---------------------------------------------------------------------------------------
# Lists and delimiter-separated items (Match, set F1, format checks): parsed by
# kpig_trainer.answers.


def _canonical_item(item: Any) -> Any:
    """Normalise one item for comparison: nested lists become tuples (order kept inside),
    numbers compare by value ("1.0" == "1"), other text via ``normalize_answer``."""
    if isinstance(item, list):
        return tuple(_canonical_item(x) for x in item)
    text = normalize_answer(item)
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(number) if math.isfinite(number) else text


def _flat_items(text: str, delimiter: str | None) -> list:
    return [_canonical_item(item) for item in parse_items(text, delimiter)]


def set_match(prediction: str, references: Sequence[str], delimiter: str | None = None) -> float:
    """Match: 1.0 when the prediction's items equal some reference's items as a *multiset*
    (order ignored, duplicates counted), else 0.0.

    Multiset rather than set, because in the benchmark's Match tasks a repeated item is an
    error ("remove duplicates" must not keep ``7`` twice; a product list of ``[0, 0]`` is
    not ``[0]``). Items come from ``parse_items``; for a 2D list only the outer level is
    unordered, inner lists are compared in order. Numbers compare by value.
    """
    pred = Counter(_flat_items(prediction, delimiter))
    return float(any(pred == Counter(_flat_items(ref, delimiter)) for ref in references))


# ---------------------------------------------------------------------------------------
# Dispatch on the task's annotated metric.


class ExampleScore(NamedTuple):
    """One example's score: ``value`` in [0, 1], the ``metric`` function actually used
    (``"exact_match"``, ``"token_f1"``, ``"set_f1"``, ``"rouge_l"``, ``"bleu"``,
    ``"set_match"`` or ``"gpt"``) and whether it is a ``fallback`` for the annotated one."""

    value: float
    metric: str
    fallback: bool = False


_LIST_FORMATS = {"list", "2d_list", "split"}


def score_example(
    prediction: str,
    references: Sequence[str],
    constraints: Any,
    *,
    judge: LLMJudge | None = None,
    instruction: str | None = None,
    input_text: str | None = None,
) -> ExampleScore:
    """Score one prediction with the metric annotated for its task.

    ``constraints`` is a mapping or object with the annotation fields (see
    ``Constraints``). ACC -> ``exact_match``; F1 -> ``set_f1`` when the task has a
    list / split format or scope "In context" (extraction), else ``token_f1``; ROUGE ->
    ``rouge_l``; BLEU -> ``bleu``; Match -> ``set_match``; GPT -> the LLM ``judge`` when one
    is given and available, else ``rouge_l`` with ``fallback=True``.
    """

    task = as_constraints(constraints)
    spec = task.format_spec or {}
    delimiter = spec.get("delimiter") if spec.get("type") == "split" else None
    metric = task.metric
    if metric == "ACC":
        return ExampleScore(exact_match(prediction, references), "exact_match")
    if metric == "F1":
        if spec.get("type") in _LIST_FORMATS or task.scope == "In context":
            return ExampleScore(set_f1(prediction, references, delimiter), "set_f1")
        return ExampleScore(token_f1(prediction, references), "token_f1")
    if metric == "ROUGE":
        return ExampleScore(rouge_l(prediction, references), "rouge_l")
    if metric == "BLEU":
        return ExampleScore(bleu(prediction, references), "bleu")
    if metric == "Match":
        return ExampleScore(set_match(prediction, references, delimiter), "set_match")
    if metric == "GPT":
        if judge is not None and judge.available:
            verdict = judge.judge(instruction, input_text, prediction, references)
            return ExampleScore(verdict, "gpt")
        return ExampleScore(rouge_l(prediction, references), "rouge_l", fallback=True)
    raise ValueError(f"unknown metric {metric!r}; expected ACC, F1, ROUGE, BLEU, Match or GPT")
