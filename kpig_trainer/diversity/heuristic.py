"""Offline instruction diversity: a rule-based key-part extractor and template rewrites.

Used when no LLM endpoint is configured, so that the whole KPIG pipeline (pools, masking,
information gain) runs without any API. What it does:

* **Extraction** (:func:`extract_key_parts_heuristic`) splits the instruction into sentences
  and keeps the ones that steer the answer: a stated job ("Your job is to ...", "you should
  ...", kept from the verb on), an imperative sentence ("List all ...", "Answer with ..."),
  answer/format clauses ("answer with", "respond with", "output", "return", "generate",
  "classify", "must", "should"), quoted or capitalised label sets ('"Yes" or "No"',
  "E, C, and N"), format words (list, comma, JSON, number, yes/no) and length limits ("less
  than three words", "under 15 words", "at most 2 sentences"). Framing such as "In this
  task, you are given ..." is skipped.
* **Rewrites** (:func:`heuristic_rewrite`) keep every key part verbatim and change only the
  text around it: ``paraphrase`` swaps framing phrases ("Your job is to" / "You need to",
  "You are given" / "You will receive"), never inside a key part; ``reorder`` moves a
  non-anaphoric sentence to the front; ``preamble`` adds or changes a neutral opening or
  closing sentence; ``reasoning`` appends a hint to think step by step and answer only
  with the final answer.

Limits, honestly: the extractor works at sentence granularity, so it over-selects long
sentences (lower precision than a human's clause-sized spans) and misses key parts that
carry no surface cue, e.g. definitions of the labels ("A weakener is a statement that ...")
or descriptions of what the input's parts mean; :func:`evaluate_heuristic` measures this
against the hand-written key parts of the shipped benchmark. The rewrites are surface
variations of one instruction, not the concretizing / reasoning / constraint / breadth
evolution of the paper: they never make a key part more specific, add a real constraint or
invent a new framing. They teach the model that the framing around key parts varies, which
is part of what KPIG's diversity step is for, but pools built this way are much less diverse
than LLM-evolved ones. Everything is English-only.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping, Sequence

from kpig_trainer.data.masking import find_key_part_spans
from kpig_trainer.data.records import Task
from kpig_trainer.diversity.extract import validate_key_parts

__all__ = [
    "HEURISTIC_STRATEGIES",
    "HeuristicBackend",
    "evaluate_heuristic",
    "extract_key_parts_heuristic",
    "format_evaluation",
    "heuristic_rewrite",
    "split_sentences",
]

HEURISTIC_STRATEGIES = ("paraphrase", "reorder", "preamble", "reasoning")

# --- sentences -------------------------------------------------------------------------------
_ABBREVIATIONS = {"i.e.", "e.g.", "etc.", "vs.", "mr.", "mrs.", "dr.", "no.", "st.", "cf.", "approx."}
_NEXT = r"(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
_BOUNDARY = re.compile(rf"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))[ \t]+{_NEXT}|\n\s*")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` spans of the sentences of ``text`` (line breaks also end a sentence)."""
    spans, start = [], 0
    for boundary in _BOUNDARY.finditer(text):
        words = text[start : boundary.start()].split()
        if boundary.group().strip(" \t") == "" and words and words[-1].casefold() in _ABBREVIATIONS:
            continue  # "i.e. Statement 2" does not end a sentence
        if text[start : boundary.start()].strip():
            spans.append((start, boundary.start()))
        start = boundary.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return [_trim(text, s, e) for s, e in spans]


def _trim(text: str, start: int, end: int, chars: str = " \t\r\n") -> tuple[int, int]:
    while start < end and text[start] in chars:
        start += 1
    while end > start and text[end - 1] in chars:
        end -= 1
    return start, end


# --- extraction ------------------------------------------------------------------------------
_NUMBER = r"(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|fifty|hundred)"
_GIVEN = re.compile(
    r"^(?:in this task,?\s*)?(?:you(?:'re| are| will be)?\s+(?:given|provided|shown|presented)|"
    r"given\b|this task (?:gives|provides))",
    re.I,
)
_JOB = re.compile(
    r"\b(?:(?:your|the) (?:job|task|goal|aim|objective) (?:here )?is to|you (?:are|will be) "
    r"(?:expected|asked|required|supposed) to|you (?:need|have|must|should|will need) to|"
    r"you (?:should|must)|please)\s+",
    re.I,
)
_DIRECTIVE = re.compile(
    r"^(?:please\s+)?(?:answer|output|return|respond|reply|generate|write|classify|"
    r"categori[sz]e|label|select|choose|pick|identify|detect|determine|decide|indicate|list|"
    r"count|find|give|provide|extract|translate|summari[sz]e|create|rewrite|convert|sort|remove|"
    r"compute|calculate|predict|rate|judge|mark|separate|make sure|ensure|avoid|"
    r"keep(?! in mind)|use|do not|don't|never|only)\b",
    re.I,
)
_ANSWER_CUE = re.compile(
    r"\b(?:answer(?:s|ed)? (?:with|using|by|in|must|should)|respond(?: with)?|"
    r"response should|reply with|output|return(?:ed)?|generate|classify|your answer|"
    r"the answer (?:must|should|is)|must|should|do not|don't|make sure|select from|"
    r"choose (?:from|between|one)|pick|in the form of)\b",
    re.I,
)
_OUTPUT_NOUN = re.compile(r"\b(?:answer|output|response|result|return|reply)", re.I)
_EXAMPLE = re.compile(r"^(?:for (?:example|instance)|e\.g\.|example)\b", re.I)
_FORMAT_WORD = re.compile(
    r"\b(?:list|comma|json|numbers?|numeric|integers?|yes/no|yes or no|true or false|"
    r"in brackets|separated by)\b",
    re.I,
)
_LENGTH = re.compile(
    rf"\b(?:less than|fewer than|under|at most|no more than|not exceed|maximum of|up to|"
    rf"exactly|at least) {_NUMBER}\s+(?:words?|sentences?|characters?|letters?|tokens?|items?)\b",
    re.I,
)
_Q = "[\"'\u201c\u2018`]"
_QUOTED_SET = re.compile(
    rf"{_Q}[^\"'\u201d\u2019`]{{1,40}}[\"'\u201d\u2019`]\s*(?:,|/|or|and)\s*"
    rf"(?:or\s+|and\s+)?{_Q}",
    re.I,
)
_CAPITAL_SET = re.compile(r"\b[A-Z][\w-]*(?:\s*,\s*[A-Z][\w-]*)*,?\s+(?:or|and)\s+[A-Z][\w-]*\b")
_LEADING_FILLER = re.compile(r"^(?:note that|also,?|then,?|remember that|keep in mind that|finally,?|and)\s+", re.I)


_LABEL_SOURCES = re.compile(
    rf"{_Q}(\w[^\"'\u201d\u2019`]{{0,28}}\w)[\"'\u201d\u2019`]|"
    r"\b(?:from|with|between|either)\s+(\w{3,})\s+(?:and|or)\s+(\w{3,})\b",
    re.I,
)
_NOT_LABELS = {"yes", "no", "true", "false", "none", "the", "and", "not", "one", "two", "both"}


def _labels(instruction: str) -> set[str]:
    """Words used as answer labels: quoted words and "from/with X and/or Y" pairs."""
    labels = set()
    for match in _LABEL_SOURCES.finditer(instruction):
        for word in filter(None, match.groups()):
            word = word.strip().casefold()
            if len(word) >= 4 and word not in _NOT_LABELS and " " not in word:
                labels.add(word)
    return labels


def _key_part_start(sentence: str, labels: set[str]) -> int | None:
    """Where the key part inside one sentence starts (it runs to the sentence's end), or None
    when the sentence does not steer the answer."""
    job = _JOB.search(sentence)
    if _GIVEN.match(sentence):
        if job:  # "In this task you will be given a list and you should remove ..."
            return job.end()
        after_comma = re.match(r"^given\b[^,]{0,150},\s*", sentence, re.I)
        if after_comma and _DIRECTIVE.match(sentence[after_comma.end() :]):
            return after_comma.end()  # "Given a comment, classify it ..."
        return None
    if _EXAMPLE.match(sentence):  # worked examples restate the rules for one case
        return None
    if job and job.start() < 40:  # "Your job is to detect the speaker."
        return job.end()
    words = set(re.findall(r"\w+", sentence.casefold()))
    if (
        job
        or _DIRECTIVE.match(sentence)
        or _ANSWER_CUE.search(sentence)
        or _LENGTH.search(sentence)
        or _QUOTED_SET.search(sentence)
        or words & labels  # the definition of a label
        or (_FORMAT_WORD.search(sentence) and _OUTPUT_NOUN.search(sentence))
        or (
            _CAPITAL_SET.search(sentence)
            and re.search(r"\b(?:answer|output|label|select|choose|form)", sentence, re.I)
        )
    ):
        filler = _LEADING_FILLER.match(sentence)
        return filler.end() if filler else 0
    return None


def extract_key_parts_heuristic(instruction: str) -> list[str]:
    """Key parts of ``instruction`` by the rules of the module docstring (exact substrings)."""
    parts, labels = [], _labels(instruction)
    for start, end in split_sentences(instruction):
        offset = _key_part_start(instruction[start:end], labels)
        if offset is None:
            continue
        s, e = _trim(instruction, start + offset, end, " \t\r\n.;:")
        if e - s >= 3:
            parts.append(instruction[s:e])
    return validate_key_parts(instruction, parts).kept


# --- rewrites --------------------------------------------------------------------------------
_PREAMBLES = (
    "Read the task description below before you start.",
    "Here is a task for you.",
    "Please work on the following task.",
    "The following describes what you need to do.",
    "Take a moment to go through these directions.",
    "Consider the task described next.",
    "Below is a description of your task.",
    "Your assignment is described below.",
    "Here are the directions for this task.",
    "The task is explained in what follows.",
)
_CLOSINGS = (  # neutral: they add no requirement that an answer could break
    "Keep the requirements above in mind.",
    "Make sure your response follows the directions above.",
    "Check your answer against these directions before giving it.",
    "Read the input carefully before you answer.",
    "Follow these directions closely.",
    "Pay attention to every detail of the directions.",
)
_REASONING = (
    "Think the task through step by step before answering, then give only the final answer in the required form.",
    "Work out the answer one step at a time, but write only the final answer.",
    "First look closely at the input, then apply the directions above, and reply with the answer alone.",
    "Reason about the input in small steps first; your reply should contain only the answer.",
)
_FRAMING_GROUPS = (
    (
        "In this task, you are given",
        "In this task, you're given",
        "In this task you are given",
        "In this task, you will be given",
        "In this task you will be given",
        "You are given",
        "You're given",
        "You will be given",
        "You are provided with",
        "You will receive",
        "This task gives you",
    ),
    (
        "Your job is to",
        "Your task is to",
        "The task is to",
        "You are expected to",
        "You need to",
        "You have to",
        "You are asked to",
        "You should",
    ),
)
_FRAMING = re.compile(
    "|".join(re.escape(p) for p in sorted({p for g in _FRAMING_GROUPS for p in g}, key=len, reverse=True)), re.I
)
_ANAPHORIC = re.compile(
    r"^(?:this|that|these|those|it|its|they|their|them|otherwise|however|then|also|so|thus|"
    r"therefore|hence|such|but|and|or|both|each|for (?:example|instance)|note|similarly|here)\b"
    r"|\b(?:above|below|previous|following|aforementioned|respectively)\b",
    re.I,
)


def _strip_additions(text: str) -> tuple[str, str, str]:
    """Split off an opening and a closing sentence that our rewrites added: (opening, core, closing)."""
    opening = next((p for p in _PREAMBLES if text.startswith(p + " ")), "")
    core = text[len(opening) :].lstrip() if opening else text
    closing = next((c for c in _CLOSINGS + _REASONING if core.endswith(" " + c)), "")
    core = core[: len(core) - len(closing)].rstrip() if closing else core
    return opening, core, closing


def _other(options: Sequence[str], current: str, rng: random.Random, allow_empty: bool = False) -> str:
    choices = [o for o in options if o != current] + ([""] if allow_empty and current else [])
    return rng.choice(choices)


def _paraphrase(core: str, key_parts: Sequence[str], rng: random.Random) -> str:
    matches = _swappable(core, key_parts)
    if not matches:
        return core
    forced = rng.randrange(len(matches))
    pieces, cursor = [], 0
    for k, match in enumerate(matches):
        if k != forced and rng.random() < 0.4:
            continue
        phrase = match.group()
        group = next(g for g in _FRAMING_GROUPS if phrase.casefold() in (p.casefold() for p in g))
        # Sentence-initial phrases only: "In this task, ..." must not land mid-sentence.
        initial = [p for p in group if not p.startswith("In this task") or match.start() == 0]
        new = _other([p for p in initial if p.casefold() != phrase.casefold()] or [phrase], phrase, rng)
        new = new[0].upper() + new[1:] if phrase[0].isupper() else new[0].lower() + new[1:]
        pieces += [core[cursor : match.start()], new]
        cursor = match.end()
    return "".join(pieces) + core[cursor:]


def _swappable(core: str, key_parts: Sequence[str]) -> list[re.Match]:
    protected = find_key_part_spans(core, key_parts).spans if key_parts else []
    return [m for m in _FRAMING.finditer(core) if not any(m.start() < e and s < m.end() for s, e in protected)]


def _movable(core: str, key_parts: Sequence[str]) -> list[int]:
    """Sentences that can move to the front: not the first, not anaphoric, not cutting a key part."""
    if "\n" in core:  # layout (lists, tables) would be destroyed
        return []
    protected = find_key_part_spans(core, key_parts).spans if key_parts else []
    spans = split_sentences(core)
    cut = lambda s, e: any(ps < e and pe > s and (ps < s or pe > e) for ps, pe in protected)  # noqa: E731
    return [k for k, (s, e) in enumerate(spans) if k > 0 and not _ANAPHORIC.search(core[s:e]) and not cut(s, e)]


def _reorder(core: str, key_parts: Sequence[str], rng: random.Random) -> str:
    movable = _movable(core, key_parts)
    if not movable:
        return core
    spans = split_sentences(core)
    pick = rng.choice(movable)
    sentences = [core[s:e] for s, e in spans]
    moved = sentences.pop(pick)
    moved = moved if moved[-1:] in ".!?\"')" else moved + "."
    return " ".join([moved, *sentences])


def heuristic_rewrite(instruction: str, key_parts: Sequence[str], strategy: str, rng: random.Random) -> str:
    """A variant of ``instruction`` that keeps every key part verbatim (see the module docstring).

    ``strategy`` is one of :data:`HEURISTIC_STRATEGIES`. A strategy that cannot change this
    instruction (nothing to swap or move) returns it unchanged; the pool rejects that answer
    (``"unchanged"``) and draws again, so every entry's ``strategy`` says what was done.
    """
    if strategy not in HEURISTIC_STRATEGIES:
        raise ValueError(f"unknown offline strategy {strategy!r}; choose from {HEURISTIC_STRATEGIES}")
    opening, core, closing = _strip_additions(instruction.strip())
    if strategy == "paraphrase":
        core = _paraphrase(core, key_parts, rng)
    elif strategy == "reorder":
        core = _reorder(core, key_parts, rng)
    elif strategy == "reasoning":
        closing = _other(_REASONING, closing, rng)
    elif rng.random() < 0.7:  # preamble: change the opening, sometimes the closing instead
        opening = _other(_PREAMBLES, opening, rng, allow_empty=True)
    else:
        closing = _other(_CLOSINGS, closing, rng, allow_empty=True)
    return " ".join(p for p in (opening, core, closing) if p)


class HeuristicBackend:
    """The offline backend of :func:`~kpig_trainer.diversity.diversify` (no requests, no tokens)."""

    name = "heuristic"
    strategies = HEURISTIC_STRATEGIES

    def keeps_key_parts(self, strategy: str) -> bool:
        """Every offline rewrite keeps the parent's key parts verbatim."""
        return True

    def strategies_for(self, instruction: str, key_parts: Sequence[str]) -> list[str]:
        """The strategies that can change this instruction (nothing to swap: no paraphrase)."""
        core = _strip_additions(instruction.strip())[1]
        return [
            s
            for s in self.strategies
            if (s != "paraphrase" or _swappable(core, key_parts)) and (s != "reorder" or _movable(core, key_parts))
        ]

    def extract(self, instruction: str, example: tuple[str, str]) -> list[str]:
        """Key parts of ``instruction`` by :func:`extract_key_parts_heuristic`, ignoring the
        neutral sentences our own rewrites add ("Make sure your response follows ...")."""
        return extract_key_parts_heuristic(_strip_additions(instruction.strip())[1])

    def evolve(
        self, strategy: str, instruction: str, key_parts: Sequence[str], example: tuple[str, str], rng: random.Random
    ) -> str:
        """One rewrite of ``instruction`` by :func:`heuristic_rewrite`."""
        return heuristic_rewrite(instruction, key_parts, strategy, rng)

    def stats(self) -> dict[str, int]:
        """No endpoint, nothing to count."""
        return {}


# --- evaluation against hand-written key parts ----------------------------------------------
def _covered(instruction: str, parts: Sequence[str]) -> set[int]:
    spans = find_key_part_spans(instruction, list(parts)).spans if parts else []
    return {k for s, e in spans for k in range(s, e) if not instruction[k].isspace()}


def _prf(overlap: int, predicted: int, gold: int) -> dict[str, float]:
    p = overlap / predicted if predicted else 0.0
    r = overlap / gold if gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def evaluate_heuristic(
    tasks: Mapping[str, Task] | Sequence[Task], extractor=extract_key_parts_heuristic
) -> dict[str, Any]:
    """Character-level span overlap of ``extractor`` with the tasks' hand-written key parts.

    For each task with annotated key parts, the predicted and gold spans are located in the
    definition (:func:`~kpig_trainer.data.masking.find_key_part_spans`) and turned into sets
    of non-space character positions. Precision is ``|pred & gold| / |pred|``, recall
    ``|pred & gold| / |gold|``. ``micro`` pools the characters of all tasks, ``macro``
    averages the per-task figures; ``whole_definition`` is the trivial baseline that predicts
    the whole definition; ``gold_spans_hit`` is the share of gold key parts that overlap a
    prediction at all.
    """
    tasks = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    rows, totals, base, hit, n_gold = [], [0, 0, 0], [0, 0], 0, 0
    for task in tasks:
        if not task.key_parts:
            continue
        text = task.definition
        gold, predicted = _covered(text, task.key_parts), _covered(text, extractor(text))
        overlap = len(gold & predicted)
        rows.append(
            {
                "task": task.name,
                "gold_chars": len(gold),
                "pred_chars": len(predicted),
                "overlap": overlap,
                **_prf(overlap, len(predicted), len(gold)),
            }
        )
        totals = [totals[0] + overlap, totals[1] + len(predicted), totals[2] + len(gold)]
        all_chars = _covered(text, [text])
        base = [base[0] + len(gold), base[1] + len(all_chars)]
        for part in task.key_parts:
            n_gold += 1
            hit += bool(_covered(text, [part]) & predicted)
    count = len(rows) or 1
    macro = {k: sum(r[k] for r in rows) / count for k in ("precision", "recall", "f1")}
    return {
        "tasks": rows,
        "evaluated": len(rows),
        "skipped": len(tasks) - len(rows),
        "micro": _prf(*totals),
        "macro": macro,
        "whole_definition": _prf(base[0], base[1], base[0]),
        "gold_spans_hit": hit / n_gold if n_gold else 0.0,
    }


def format_evaluation(result: Mapping[str, Any], per_task: bool = True) -> str:
    """Plain-text report of :func:`evaluate_heuristic`."""
    lines = []
    if per_task:
        width = max([len(r["task"]) for r in result["tasks"]] + [4])
        lines.append(f"{'task':<{width}}  precision  recall  gold  pred")
        for r in result["tasks"]:
            lines.append(
                f"{r['task']:<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  "
                f"{r['gold_chars']:4d}  {r['pred_chars']:4d}"
            )
        lines.append("")
    for name in ("micro", "macro", "whole_definition"):
        m = result[name]
        lines.append(f"{name:>16}: precision {m['precision']:.3f}  recall {m['recall']:.3f}  f1 {m['f1']:.3f}")
    lines.append(
        f"{'gold spans hit':>16}: {result['gold_spans_hit']:.3f}  "
        f"({result['evaluated']} tasks with key parts, {result['skipped']} without)"
    )
    return "\n".join(lines)
