"""Prompt text of an instance: everything the model sees before its response starts.

Training (:class:`kpig_trainer.kpig.collator.KPIGDataCollator`) and generation at evaluation
time both build prompts here, so the two see the same text.

The *message* is the same in both modes::

    {instruction}

    Example input: {demonstration input}      (one pair per demonstration, if any)
    Example output: {demonstration output}

    Input: {input}                            (left out when the input is empty)

* With a chat template, the message is the content of one user turn (after an optional system
  turn), rendered by ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``, so the
  text ends where the assistant's answer begins.
* Without one, the message is placed in :data:`PLAIN_TEMPLATE` (or a template of yours).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PLAIN_TEMPLATE", "format_message", "format_prompt", "has_chat_template"]

PLAIN_TEMPLATE = "{message}\n\nOutput:\n"
"""Prompt of a tokenizer without chat template. ``str.format`` fields: ``{message}`` (the
instruction, demonstrations and input laid out as in the module docstring), and, for templates
of your own, ``{instruction}``, ``{examples}`` (the demonstration block followed by a blank
line, ``""`` without demonstrations) and ``{input}``. It ends with a line break so that the
response's first token is not glued to the ``Output:`` marker."""


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template that :func:`format_prompt` will use."""
    return bool(getattr(tokenizer, "chat_template", None))


def _demonstration_pair(demonstration: Any) -> tuple[str, str]:
    """``(input, output)`` of a Demonstration, a mapping or a 2-sequence."""
    if isinstance(demonstration, Mapping):
        return str(demonstration["input"]), str(demonstration["output"])
    if hasattr(demonstration, "input") and hasattr(demonstration, "output"):
        return str(demonstration.input), str(demonstration.output)
    given_input, given_output = demonstration
    return str(given_input), str(given_output)


def _examples_block(demonstrations: Sequence[Any]) -> str:
    pairs = [_demonstration_pair(d) for d in demonstrations]
    return "\n\n".join(f"Example input: {i}\nExample output: {o}" for i, o in pairs)


def format_message(instruction: str, input: str = "", *, demonstrations: Sequence[Any] = ()) -> str:
    """The user message: instruction, demonstrations and input (layout in the module docstring).

    Args:
        instruction: the task instruction (or its masked twin).
        input: the instance's context; an empty input leaves out the ``Input:`` line.
        demonstrations: worked examples, each a :class:`~kpig_trainer.data.Demonstration`, a
            mapping with ``input`` and ``output`` keys or an ``(input, output)`` pair.
    """
    sections = [instruction]
    if demonstrations:
        sections.append(_examples_block(demonstrations))
    if input:
        sections.append(f"Input: {input}")
    return "\n\n".join(sections)


def format_prompt(
    tokenizer,
    instruction: str,
    input: str = "",
    *,
    demonstrations: Sequence[Any] = (),
    system_prompt: str | None = None,
    plain_template: str | None = None,
    use_chat_template: bool | None = None,
) -> str:
    """The prompt text up to where the response starts.

    Args:
        tokenizer: a ``transformers`` tokenizer; its chat template, if any, lays out the turns.
        instruction: the task instruction (or its masked twin).
        input: the instance's context (may be empty).
        demonstrations: worked examples shown between instruction and input (see
            :func:`format_message`).
        system_prompt: content of a system turn placed before the user turn (chat template),
            or a first paragraph before the message (plain template). ``None``: none of ours
            (a chat template may still add its own default system turn, as SmolLM2's does).
        plain_template: ``str.format`` template used without chat template; default
            :data:`PLAIN_TEMPLATE`, whose docstring lists the fields.
        use_chat_template: ``None`` uses the chat template when the tokenizer has one;
            ``False`` forces the plain template (e.g. a base model whose tokenizer ships a
            template it was never trained on); ``True`` requires a chat template.

    Returns:
        The prompt text. Tokenize it with ``add_special_tokens=False`` when a chat template
        rendered it (the template writes its own special tokens).
    """
    message = format_message(instruction, input, demonstrations=demonstrations)
    chat = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if chat:
        if not has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True, but the tokenizer has no chat_template")
        turns = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        turns.append({"role": "user", "content": message})
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    template = PLAIN_TEMPLATE if plain_template is None else plain_template
    examples = _examples_block(demonstrations) + "\n\n" if demonstrations else ""
    prompt = template.format(message=message, instruction=instruction, input=input, examples=examples)
    return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
