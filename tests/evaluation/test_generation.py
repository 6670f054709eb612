"""Batched greedy generation: left padding, budgets, demonstrations, end tokens, PEFT."""

import copy

import pytest
import torch

from kpig_trainer.data import Constraints, Demonstration, Instance, Task, load_benchmark
from kpig_trainer.evaluation import generation
from kpig_trainer.evaluation.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    LABEL_MARGIN,
    build_prompts,
    generate_answers,
    max_new_tokens_for,
    stop_token_ids,
)

SEEN = "task1599_smcalflow_classification"
HELD_OUT = "task340_winomt_classification_gender_pro"


@pytest.fixture(scope="module")
def demo():
    return load_benchmark("demo").stream()


@pytest.fixture(scope="module")
def noisy_model(tiny_model_and_tokenizer):
    """The tiny Llama with larger random weights: the stock one only repeats its last token,
    which would make every comparison of outputs trivially true."""
    model, _ = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3, generator=generator)
    return model.eval()


def _tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _task(name="t", **constraints):
    examples = constraints.pop("examples", [])
    return Task(
        name,
        "cat",
        "Do it.",
        constraints=Constraints(**constraints),
        positive_examples=[Demonstration(i, o) for i, o in examples],
    )


def test_left_padding_matches_one_by_one(noisy_model, tiny_tokenizer, demo):
    instances = demo.test[SEEN][:4] + demo.test[HELD_OUT][:3]
    lengths = {len(i.input) for i in instances}
    assert len(lengths) > 2  # prompts of different lengths: the batch really is padded
    side = tiny_tokenizer.padding_side
    batched = generate_answers(
        noisy_model,
        tiny_tokenizer,
        instances,
        demo.tasks,
        batch_size=4,
        max_new_tokens=6,
        held_out=demo.held_out,
        show_progress=False,
    )
    single = [
        generate_answers(
            noisy_model,
            tiny_tokenizer,
            [i],
            demo.tasks,
            batch_size=1,
            max_new_tokens=6,
            held_out=demo.held_out,
            show_progress=False,
        )[0]
        for i in instances
    ]
    assert batched == single
    assert len(set(batched)) > 1 and all(batched)  # real, varied text
    assert tiny_tokenizer.padding_side == side  # tokenizer untouched
    again = generate_answers(
        noisy_model,
        tiny_tokenizer,
        instances,
        demo.tasks,
        batch_size=3,
        max_new_tokens=6,
        held_out=demo.held_out,
        show_progress=False,
    )
    assert again == batched  # deterministic, whatever the batch composition


def test_answers_keep_input_order_across_tasks(noisy_model, tiny_tokenizer, demo):
    instances = [demo.test[SEEN][0], demo.test[HELD_OUT][0], demo.test[SEEN][1]]
    mixed = generate_answers(
        noisy_model,
        tiny_tokenizer,
        instances,
        demo.tasks,
        max_new_tokens=4,
        held_out=demo.held_out,
        show_progress=False,
    )
    reordered = generate_answers(
        noisy_model,
        tiny_tokenizer,
        instances[::-1],
        demo.tasks,
        max_new_tokens=4,
        held_out=demo.held_out,
        show_progress=False,
    )
    assert mixed == reordered[::-1]


def test_max_new_tokens_rule(tiny_tokenizer):
    tok = tiny_tokenizer
    labels = _task(metric="ACC", scope="In choice", labels=("User", "Agent"))
    assert max_new_tokens_for(labels, tok) == max(_tokens(tok, "User"), _tokens(tok, "Agent")) + LABEL_MARGIN
    # Word limit with plain-word demonstrations: 2 tokens per word -> 2n + 4.
    words = _task(metric="ROUGE", format_spec={"type": "max_words", "n": 5}, examples=[("x", "a")])
    assert max_new_tokens_for(words, tok) == 2 * 5 + 4
    # The wordy threshold counts as a word limit too.
    assert max_new_tokens_for(_task(metric="ROUGE", max_words=7), tok) == 2 * 7 + 4
    # Number lists take several tokens per word: the ratio of the demonstration decides.
    demo_output = "[1234, 5678, 9012]"
    ratio = _tokens(tok, demo_output) / 3
    assert ratio > 2
    numbers = _task(metric="Match", max_words=10, examples=[("x", demo_output)])
    assert max_new_tokens_for(numbers, tok) == -(-ratio * 10 // 1) + 4
    # Labels and a word limit: the larger budget.
    both = _task(metric="ACC", scope="In choice", labels=("yes", "no"), max_words=30)
    assert max_new_tokens_for(both, tok) == 2 * 30 + 4
    # Free text: the default, or twice the longest demonstration + 4.
    assert max_new_tokens_for(_task(metric="ROUGE"), tok) == DEFAULT_MAX_NEW_TOKENS
    long_output = "word " * 60
    long = _task(metric="ROUGE", examples=[("x", long_output)])
    assert max_new_tokens_for(long, tok) == 2 * _tokens(tok, long_output) + 4
    # Capped.
    assert max_new_tokens_for(_task(metric="ROUGE", max_words=10_000), tok) == generation.MAX_NEW_TOKENS_CAP


def test_explicit_budget_overrides_the_rule(monkeypatch, noisy_model, tiny_tokenizer, demo):
    seen = []
    original = noisy_model.generate

    def spy(**kwargs):
        seen.append(kwargs["generation_config"].max_new_tokens)
        return original(**kwargs)

    monkeypatch.setattr(noisy_model, "generate", spy)
    instances = [demo.test[SEEN][0], demo.test[HELD_OUT][0]]
    generate_answers(noisy_model, tiny_tokenizer, instances, demo.tasks, max_new_tokens={SEEN: 3}, show_progress=False)
    assert seen == [3, max_new_tokens_for(demo.tasks[HELD_OUT], tiny_tokenizer)]
    seen.clear()
    generate_answers(noisy_model, tiny_tokenizer, instances, demo.tasks, max_new_tokens=2, show_progress=False)
    assert seen == [2, 2]


def test_held_out_prompt_has_two_demonstrations(tiny_tokenizer, demo):
    held, seen = demo.tasks[HELD_OUT], demo.tasks[SEEN]
    assert len(held.positive_examples) >= 3
    prompts = build_prompts(
        tiny_tokenizer, [demo.test[HELD_OUT][0], demo.test[SEEN][0]], demo.tasks, held_out=demo.held_out
    )
    for example in held.positive_examples[:2]:
        assert f"Example input: {example.input}\nExample output: {example.output}" in prompts[0]
    assert held.positive_examples[2].input not in prompts[0]
    assert "Example input:" not in prompts[1]
    assert seen.positive_examples[0].input not in prompts[1]
    # Off for held-out, on for a seen task through the mapping.
    prompts = build_prompts(
        tiny_tokenizer,
        [demo.test[HELD_OUT][0], demo.test[SEEN][0]],
        demo.tasks,
        held_out=demo.held_out,
        held_out_demonstrations=0,
        demonstrations={SEEN: 1},
    )
    assert "Example input:" not in prompts[0]
    assert prompts[1].count("Example input:") == 1


def test_generate_answers_sends_the_demonstration_prompts(monkeypatch, noisy_model, tiny_tokenizer, demo):
    calls = []
    real = generation.format_prompt

    def spy(tokenizer, instruction, input="", **kwargs):
        calls.append((input, len(kwargs.get("demonstrations", ()))))
        return real(tokenizer, instruction, input, **kwargs)

    monkeypatch.setattr(generation, "format_prompt", spy)
    instances = [demo.test[SEEN][0], demo.test[HELD_OUT][0]]
    generate_answers(
        noisy_model,
        tiny_tokenizer,
        instances,
        demo.tasks,
        held_out=demo.held_out,
        max_new_tokens=1,
        show_progress=False,
    )
    assert calls == [(instances[0].input, 0), (instances[1].input, 2)]


class _ScriptedModel(torch.nn.Module):
    """Returns fixed continuations, to test cutting at end tokens and decoding."""

    def __init__(self, continuations, generation_config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations
        self.generation_config = generation_config

    def generate(self, input_ids, attention_mask, generation_config):
        self.last_config = generation_config
        self.last_inputs = (input_ids, attention_mask)
        new = torch.tensor(self.continuations[: input_ids.shape[0]])
        return torch.cat([input_ids, new], dim=1)


def test_stops_at_the_first_end_token_and_strips(tiny_model_and_tokenizer, demo):
    model, tok = tiny_model_and_tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = ids(" User"), ids("Agent")
    width = max(len(a), len(b)) + 3
    rows = [a + [eos] + ids("x") + [pad] * (width - len(a) - 2), b + [pad] * (width - len(b))]
    rows = [r[:width] + [pad] * (width - len(r)) for r in rows]
    scripted = _ScriptedModel(rows, copy.deepcopy(model.generation_config))
    short, long = demo.test[SEEN][0], max(demo.test[SEEN], key=lambda i: len(i.input))
    answers = generate_answers(scripted, tok, [long, short], demo.tasks, show_progress=False)
    assert answers == ["User", "Agent"]
    config = scripted.last_config
    assert config.do_sample is False and config.num_beams == 1
    assert eos in config.eos_token_id
    input_ids, attention = scripted.last_inputs
    assert attention[1, 0] == 0 and attention[1, -1] == 1  # the shorter row is padded on the LEFT
    assert input_ids[1, 0] == pad


def test_stop_token_ids_include_chat_end_of_turn(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(model, tok)


def test_peft_model(noisy_model, tiny_tokenizer, demo):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        copy.deepcopy(noisy_model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    instances = demo.test[SEEN][:2] + demo.test[HELD_OUT][:1]
    kwargs = dict(max_new_tokens=5, held_out=demo.held_out, show_progress=False)
    base = generate_answers(noisy_model, tiny_tokenizer, instances, demo.tasks, **kwargs)
    # A fresh LoRA adapter is the identity (B = 0): same answers through the PEFT wrapper.
    assert generate_answers(lora, tiny_tokenizer, instances, demo.tasks, **kwargs) == base
    lora.train()
    generate_answers(lora, tiny_tokenizer, instances[:1], demo.tasks, **kwargs)
    assert lora.training  # mode restored


def test_bad_arguments(noisy_model, tiny_tokenizer, demo):
    assert generate_answers(noisy_model, tiny_tokenizer, [], demo.tasks) == []
    stray = Instance("x", "unknown_task", "Do it.", "in", ["out"])
    with pytest.raises(KeyError, match="unknown_task"):
        generate_answers(noisy_model, tiny_tokenizer, [stray], demo.tasks)
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(noisy_model, tiny_tokenizer, demo.test[SEEN][:1], demo.tasks, batch_size=0)
