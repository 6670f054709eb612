"""Prompt layout: chat template and plain template."""

import pytest

from kpig_trainer.data.prompts import PLAIN_TEMPLATE, format_message, format_prompt, has_chat_template
from kpig_trainer.data.records import Demonstration
from kpig_trainer.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer():
    return tiny_tokenizer(chat_template=False)


def test_chat_prompt_is_one_user_turn_ending_at_the_assistant_turn(tiny_tokenizer):
    prompt = format_prompt(tiny_tokenizer, "Say hi.", "to Bob")
    assert prompt == ("<|im_start|>user\nSay hi.\n\nInput: to Bob<|im_end|>\n<|im_start|>assistant\n")


def test_chat_prompt_with_system_turn_and_demonstrations(tiny_tokenizer):
    prompt = format_prompt(
        tiny_tokenizer,
        "Add one.",
        "3",
        demonstrations=[Demonstration("1", "2"), {"input": "5", "output": "6"}],
        system_prompt="Be brief.",
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nAdd one.\n\n"
        "Example input: 1\nExample output: 2\n\n"
        "Example input: 5\nExample output: 6\n\n"
        "Input: 3<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain_template_without_chat_template(plain_tokenizer):
    assert not has_chat_template(plain_tokenizer)
    assert format_prompt(plain_tokenizer, "Say hi.", "to Bob") == "Say hi.\n\nInput: to Bob\n\nOutput:\n"
    # An empty input leaves out the Input line.
    assert format_prompt(plain_tokenizer, "Say hi.") == "Say hi.\n\nOutput:\n"
    with_system = format_prompt(plain_tokenizer, "Say hi.", system_prompt="Be kind.")
    assert with_system == "Be kind.\n\nSay hi.\n\nOutput:\n"
    assert PLAIN_TEMPLATE.format(message="M") == "M\n\nOutput:\n"


def test_demonstration_forms_agree(plain_tokenizer):
    forms = [[Demonstration("a", "b")], [{"input": "a", "output": "b"}], [("a", "b")]]
    prompts = {format_prompt(plain_tokenizer, "Copy.", "c", demonstrations=d) for d in forms}
    assert prompts == {"Copy.\n\nExample input: a\nExample output: b\n\nInput: c\n\nOutput:\n"}


def test_plain_template_override_and_forcing(tiny_tokenizer, plain_tokenizer):
    alpaca = "### Instruction:\n{instruction}\n\n{examples}### Input:\n{input}\n\n### Response:\n"
    prompt = format_prompt(
        tiny_tokenizer, "Copy.", "c", demonstrations=[("a", "b")], plain_template=alpaca, use_chat_template=False
    )
    assert prompt == (
        "### Instruction:\nCopy.\n\nExample input: a\nExample output: b\n\n### Input:\nc\n\n### Response:\n"
    )
    with pytest.raises(ValueError, match="no chat_template"):
        format_prompt(plain_tokenizer, "Copy.", use_chat_template=True)


def test_format_message_layout():
    assert format_message("Do it.") == "Do it."
    assert format_message("Do it.", "x", demonstrations=[("i", "o")]) == (
        "Do it.\n\nExample input: i\nExample output: o\n\nInput: x"
    )
