"""One scoring pipeline for replay and evaluation: values against direct computation, the policy
for instances without a maskable key part, and the scoring collator."""

import pytest
import torch

from kpig_trainer.data import Instance
from kpig_trainer.evaluation.evaluate import information_gains
from kpig_trainer.kpig.collator import build_collator
from kpig_trainer.kpig.info_gain import information_gain
from kpig_trainer.kpig.scoring import ModelScorer, response_entropy, score_instances

INSTRUCTION = "Answer the question with yes or no. Keep the answer short."


def instance(k, task="t0", key_parts=("with yes or no",), instruction=INSTRUCTION):
    return Instance(
        f"{task}-{k}", task, instruction, f"question {k}?", ["yes" if k % 2 else "no"], key_parts=list(key_parts)
    )


def test_ig_equals_one_instance_at_a_time_and_is_none_without_a_maskable_key_part(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    collator = build_collator(tokenizer, scoring=True, max_length=256)
    instances = [
        instance(0),
        instance(1, key_parts=()),
        instance(2),
        instance(3, key_parts=("not in the text",)),
        instance(4, task="t1"),
    ]
    got = score_instances(model, instances, collator, kind="ig", alpha=0.3, batch_size=2)
    assert [g is None for g in got] == [False, True, False, True, False]
    for k in (0, 2, 4):
        assert got[k] == pytest.approx(information_gain(model, collator([instances[k]]), 0.3).item(), abs=1e-5)
    assert any(abs(got[k]) > 1e-6 for k in (0, 2, 4))


def test_entropy_scores_every_instance_as_a_direct_forward_does(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    collator = build_collator(tokenizer, scoring=True, max_length=256)
    instances = [instance(0), instance(1, key_parts=()), instance(2, task="t1")]
    got = score_instances(model, instances, collator, kind="entropy", batch_size=2)
    for k, item in enumerate(instances):
        batch = collator([item])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert got[k] == pytest.approx(response_entropy(logits, batch["labels"]).item(), abs=1e-4)


def test_unknown_kind_is_refused(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="kind must be one of"):
        score_instances(model, [instance(0)], build_collator(tokenizer), kind="loss")


def test_the_scoring_collator_shows_the_task_instruction_not_a_pool_variant(tiny_tokenizer):
    pools = {"t0": [{"instruction": "Reply only with yes or no, nothing else.", "key_parts": ["with yes or no"]}]}
    item = instance(0)
    plain = build_collator(tiny_tokenizer)([item])
    training = build_collator(tiny_tokenizer, instruction_pools=pools)([item])
    scoring = build_collator(tiny_tokenizer, scoring=True, instruction_pools=pools, with_masked=False)([item])
    assert not torch.equal(training["input_ids"], plain["input_ids"])
    for key in ("input_ids", "labels", "masked_input_ids", "masked_labels"):
        assert torch.equal(scoring[key], plain[key])


def test_replay_ig_and_reported_ig_are_one_quantity(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    pools = {"t0": [{"instruction": "Reply only with yes or no, nothing else.", "key_parts": ["with yes or no"]}]}
    instances = [instance(k) for k in range(4)] + [instance(k, task="t1") for k in range(3)]
    collator = build_collator(tokenizer, scoring=True, max_length=None, instruction_pools=pools)
    replay = ModelScorer(model, collator, batch_size=3, show_progress=False).information_gain(instances)
    reported = information_gains(model, tokenizer, instances, batch_size=2)
    assert replay == pytest.approx(reported, abs=1e-5)


def test_config_gives_the_defaults_and_options_win(tiny_tokenizer):
    class Config:
        mask_token, max_length, seed = "<mask>", 77, 5

    collator = build_collator(tiny_tokenizer, Config(), max_length=99)
    assert (collator.mask_token, collator.max_length, collator.seed) == ("<mask>", 99, 5)
    assert build_collator(tiny_tokenizer, scoring=True, with_masked=False).with_masked
