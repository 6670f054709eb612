"""Batched greedy generation of answers, with the same prompts as training.

Prompts come from :func:`kpig_trainer.data.prompts.format_prompt` (the chat template when the
tokenizer has one), so a model is evaluated on exactly the text layout it was trained on.
Held-out tasks get demonstrations (the task's first positive examples) in the context, the
KPIG paper's held-out protocol (two of them by default).

Decoding is greedy (``do_sample=False``, one beam), so answers are deterministic; rows are
LEFT-padded (built by hand: the tokenizer is never modified) and each row stops at the first
end token: the tokenizer's EOS, the model's generation-config EOS ids and the chat end-of-turn
tokens the tokenizer knows (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...).

The generation budget of each task comes from its annotated constraints; see
:func:`max_new_tokens_for`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from kpig_trainer.data.prompts import format_prompt, has_chat_template
from kpig_trainer.data.records import Instance, Task

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "END_OF_TURN_TOKENS",
    "LABEL_MARGIN",
    "MAX_NEW_TOKENS_CAP",
    "build_prompts",
    "demonstrations_for",
    "generate_answers",
    "max_new_tokens_for",
    "stop_token_ids",
]

DEFAULT_MAX_NEW_TOKENS = 64
"""Budget of a free-text task without word limit or labels (raised for long demonstrations)."""
LABEL_MARGIN = 8
"""Tokens allowed beyond the longest label of a classification task, so that answers such as
``"Agent."`` or ``"The speaker is the User"`` are seen (and scored as out of scope) whole."""
MAX_NEW_TOKENS_CAP = 512
"""No task's rule-derived budget exceeds this (an explicit value may)."""
MIN_TOKENS_PER_WORD = 2.0
"""Lower bound of the tokens-per-word ratio used to turn a word limit into tokens."""
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
"""Chat end-of-turn tokens: generation stops at any of these the tokenizer has as a special token."""


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def max_new_tokens_for(task: Task, tokenizer) -> int:
    """The generation budget of ``task``, in new tokens, from its annotated constraints.

    The budget must fit a correct answer and leave room to *see* a violation (a wordy answer
    needs more than the word limit), while staying small, because decoding dominates the cost
    of evaluation. The rule takes the largest of the budgets that apply:

    - **word limit** ``n`` (``format_spec`` ``{"type": "max_words", "n": n}``, else the wordy
      threshold ``constraints.max_words``): ``ceil(r * n) + 4`` tokens, where ``r`` is the
      largest tokens-per-word ratio of the task's positive-example outputs and labels under
      this tokenizer, at least 2 (:data:`MIN_TOKENS_PER_WORD`). ``r`` adapts the budget to
      answers such as number lists, whose "words" (``"72,"``) take several tokens. With
      ``r = 2`` this is ``2n + 4``.
    - **labels** (an ``In choice`` task): the longest label in tokens + :data:`LABEL_MARGIN`.
    - **free text** (neither applies): :data:`DEFAULT_MAX_NEW_TOKENS`, or twice the longest
      positive-example output + 4 when that is larger.

    The result is capped at :data:`MAX_NEW_TOKENS_CAP`. The test references are never used.
    """
    constraints = task.constraints
    spec = constraints.format_spec or {}
    word_limit = spec.get("n") if spec.get("type") == "max_words" else None
    word_limit = word_limit if word_limit is not None else constraints.max_words
    examples = [d.output for d in task.positive_examples if d.output.strip()]
    budgets = []
    if word_limit is not None:
        ratio = MIN_TOKENS_PER_WORD
        for text in [*examples, *constraints.labels]:
            ratio = max(ratio, _token_count(tokenizer, text) / max(1, len(text.split())))
        budgets.append(math.ceil(ratio * word_limit) + 4)
    if constraints.labels:
        budgets.append(max(_token_count(tokenizer, label) for label in constraints.labels) + LABEL_MARGIN)
    if not budgets:
        longest = max((_token_count(tokenizer, text) for text in examples), default=0)
        budgets.append(max(DEFAULT_MAX_NEW_TOKENS, 2 * longest + 4))
    return min(max(budgets), MAX_NEW_TOKENS_CAP)


def demonstrations_for(task: Task, count: int) -> list:
    """The first ``count`` positive examples of ``task`` (fewer if it has fewer)."""
    if count < 0:
        raise ValueError(f"the number of demonstrations must be >= 0, got {count}")
    return list(task.positive_examples[:count])


def _demonstration_count(
    task: str, demonstrations: int | Mapping[str, int], held_out: Collection[str], held_out_demonstrations: int
) -> int:
    if isinstance(demonstrations, Mapping) and task in demonstrations:
        return int(demonstrations[task])
    if task in held_out:
        return held_out_demonstrations
    return 0 if isinstance(demonstrations, Mapping) else int(demonstrations)


def build_prompts(
    tokenizer,
    instances: Sequence[Instance],
    tasks: Mapping[str, Task],
    *,
    demonstrations: int | Mapping[str, int] = 0,
    held_out: Collection[str] = (),
    held_out_demonstrations: int = 2,
    system_prompt: str | None = None,
) -> list[str]:
    """The prompt text of each instance, as :func:`generate_answers` sends it.

    Each instance's own ``instruction`` is used (so a probe may swap it). ``demonstrations``
    is a count for every task or a ``{task: count}`` mapping; tasks in ``held_out`` get
    ``held_out_demonstrations`` unless the mapping names them.
    """
    prompts = []
    for instance in instances:
        task = tasks[instance.task]
        count = _demonstration_count(instance.task, demonstrations, held_out, held_out_demonstrations)
        prompts.append(
            format_prompt(
                tokenizer,
                instance.instruction,
                instance.input,
                demonstrations=demonstrations_for(task, count),
                system_prompt=system_prompt,
            )
        )
    return prompts


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the model's generation-config EOS
    id(s), and the chat end-of-turn tokens (:data:`END_OF_TURN_TOKENS`) the tokenizer has."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int) and item >= 0 and item not in ids:
                ids.append(item)

    add(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None)
    if config is not None:
        add(config.eos_token_id)
    special = set(getattr(tokenizer, "all_special_tokens", ())) | set(
        getattr(tokenizer, "added_tokens_encoder", {}) or {}
    )
    for token in END_OF_TURN_TOKENS:
        if token in special:
            add(tokenizer.convert_tokens_to_ids(token))
    if not ids:
        raise ValueError(
            "no end token: the tokenizer has no eos_token and the model's generation config no eos_token_id"
        )
    return ids


def _leading_special_ids(tokenizer) -> list[int]:
    """Special ids the tokenizer puts before a text (e.g. BOS), as the training collator adds."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return special[:start]
    return []


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _generation_config(model, max_new_tokens: int, stop_ids: list[int], pad_id: int):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    # Greedy: clear sampling knobs a checkpoint may ship, so no "unused flag" warning fires.
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(config, name):
            setattr(config, name, None)
    config.do_sample = False
    config.num_beams = 1
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.eos_token_id = stop_ids
    config.pad_token_id = pad_id
    return config


def _cut(ids: list[int], stop_ids: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position]
    return ids


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    instances: Sequence[Instance],
    tasks: Mapping[str, Task],
    *,
    batch_size: int = 8,
    max_new_tokens: int | Mapping[str, int] | None = None,
    demonstrations: int | Mapping[str, int] = 0,
    held_out: Collection[str] = (),
    held_out_demonstrations: int = 2,
    system_prompt: str | None = None,
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers of ``model`` to ``instances``, in the order given.

    Args:
        model: a ``transformers`` causal LM, or a PEFT model wrapping one.
        tokenizer: its tokenizer (left unchanged: rows are left-padded by hand).
        instances: what to answer; each instance's ``instruction`` and ``input`` form the prompt.
        tasks: the tasks by name (constraints for the budget, positive examples for
            demonstrations).
        batch_size: rows per ``generate`` call. Batches hold one task each (one budget) and
            rows of similar prompt length (sorted, longest first), to waste little padding.
        max_new_tokens: ``None`` for the per-task rule of :func:`max_new_tokens_for`; an int for
            every task; a ``{task: int}`` mapping (tasks it omits use the rule).
        demonstrations, held_out, held_out_demonstrations: demonstrations in the context (see
            :func:`build_prompts`); held-out tasks get 2 by default, the paper's protocol.
        system_prompt: a system turn, as in training (``None``: none of ours).
        show_progress: a ``tqdm`` bar over instances.

    Returns:
        The decoded new tokens of each instance, up to the first end token, stripped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not instances:
        return []
    unknown = sorted({i.task for i in instances} - set(tasks))
    if unknown:
        raise KeyError(f"instances name task(s) missing from `tasks`: {unknown}")
    from tqdm.auto import tqdm

    prompts = build_prompts(
        tokenizer,
        instances,
        tasks,
        demonstrations=demonstrations,
        held_out=held_out,
        held_out_demonstrations=held_out_demonstrations,
        system_prompt=system_prompt,
    )
    prefix = [] if has_chat_template(tokenizer) else _leading_special_ids(tokenizer)
    encoded = [prefix + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    budgets: dict[str, int] = {}
    for name in dict.fromkeys(i.task for i in instances):
        if isinstance(max_new_tokens, int):
            budgets[name] = max_new_tokens
        elif isinstance(max_new_tokens, Mapping) and name in max_new_tokens:
            budgets[name] = int(max_new_tokens[name])
        else:
            budgets[name] = max_new_tokens_for(tasks[name], tokenizer)

    batches = []
    for name in budgets:
        rows = sorted((k for k, i in enumerate(instances) if i.task == name), key=lambda k: (-len(encoded[k]), k))
        batches.extend((name, rows[s : s + batch_size]) for s in range(0, len(rows), batch_size))

    device = _model_device(model)
    answers: list[str | None] = [None] * len(instances)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(instances), desc="generating", unit="answer", disable=not show_progress) as bar:
            for name, rows in batches:
                width = max(len(encoded[k]) for k in rows)
                input_ids = torch.tensor([[pad_id] * (width - len(encoded[k])) + encoded[k] for k in rows])
                attention = torch.tensor([[0] * (width - len(encoded[k])) + [1] * len(encoded[k]) for k in rows])
                config = _generation_config(model, budgets[name], stop_ids, pad_id)
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=config,
                )
                stop = set(stop_ids)
                for row, sequence in zip(rows, output[:, width:].tolist()):
                    answers[row] = tokenizer.decode(_cut(sequence, stop), skip_special_tokens=True).strip()
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return answers  # type: ignore[return-value]
