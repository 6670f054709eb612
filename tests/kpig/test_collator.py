"""KPIGDataCollator: paired tokenization, labels, truncation, pools, datasets, IG contract."""

import logging
import pickle
import re
import time

import pytest
import torch

from kpig_trainer.data import Instance, instances_to_columns, masking
from kpig_trainer.data.prompts import format_prompt
from kpig_trainer.data.records import Task
from kpig_trainer.kpig.collator import KPIGDataCollator
from kpig_trainer.kpig.info_gain import information_gain
from kpig_trainer.kpig.losses import cross_entropy_loss
from kpig_trainer.testing import TINY_SPECIAL_TOKENS, tiny_tokenizer

INSTRUCTION = "Classify the sentiment of the review as positive or negative. Answer in one word."
KEY_PARTS = ["positive or negative", "one word"]


def make_instances():
    return [
        Instance("r1", "sentiment", INSTRUCTION, "The movie was wonderful.", ["positive"], KEY_PARTS),
        Instance(
            "r2", "sentiment", INSTRUCTION, "The food was cold, and the service was slow.", ["negative"], KEY_PARTS
        ),
        Instance(
            "q1",
            "qa",
            "Answer the question with yes or no.",
            "Is the sky blue on a clear day?",
            ["Yes, it is."],
            ["yes or no"],
        ),
        Instance(
            "s1",
            "summary",
            "Summarize the paragraph in one sentence.",
            "",
            ["The river flows through the old town."],
            ["one sentence"],
        ),
    ]


@pytest.fixture(scope="module", params=["chat", "plain"])
def tokenizer(request):
    return tiny_tokenizer(chat_template=request.param == "chat")


def response_ids(labels_row):
    return labels_row[labels_row != -100].tolist()


def real_ids(batch, b, prefix=""):
    return batch[f"{prefix}input_ids"][b][batch[f"{prefix}attention_mask"][b].bool()].tolist()


def test_labels_are_exactly_response_plus_eos(tokenizer):
    instances = make_instances()
    batch = KPIGDataCollator(tokenizer)(instances)
    for b, instance in enumerate(instances):
        for prefix in ("", "masked_"):
            labels = batch[f"{prefix}labels"][b]
            ids = response_ids(labels)
            assert tokenizer.decode(ids) == instance.output + tokenizer.eos_token
            # The response is one contiguous block that ends the real tokens.
            positions = (labels != -100).nonzero().flatten().tolist()
            length = int(batch[f"{prefix}attention_mask"][b].sum())
            assert positions == list(range(length - len(ids), length))
            assert batch[f"{prefix}input_ids"][b, positions].tolist() == ids


def test_prompt_tokens_are_the_shared_prompt_text(tokenizer):
    # The label boundary is exact: the prompt part is format_prompt's text tokenized alone.
    instance = make_instances()[0]
    batch = KPIGDataCollator(tokenizer, system_prompt="Be brief.")([instance])
    n_prompt = int((batch["labels"][0] == -100).sum())
    text = format_prompt(tokenizer, instance.instruction, instance.input, system_prompt="Be brief.")
    assert real_ids(batch, 0)[:n_prompt] == tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.chat_template is None:
        assert tokenizer.decode(real_ids(batch, 0)[:n_prompt]).endswith("\n\nOutput:\n")


def test_masked_twin_hides_key_parts_and_keeps_the_rest(tokenizer):
    instances = make_instances()
    batch = KPIGDataCollator(tokenizer)(instances)
    masked = tokenizer.decode(real_ids(batch, 0, "masked_"))
    full = tokenizer.decode(real_ids(batch, 0))
    assert "Classify the sentiment of the review as [MASK]. Answer in [MASK]." in masked
    assert INSTRUCTION in full and "[MASK]" not in full
    for b, instance in enumerate(instances):
        masked = tokenizer.decode(real_ids(batch, b, "masked_"))
        assert "[MASK]" in masked
        assert instance.input in masked
        for part in instance.key_parts:
            assert part.lower() not in masked.lower()


def test_twins_share_response_ids_with_different_prompt_lengths(tokenizer):
    instances = make_instances()
    batch = KPIGDataCollator(tokenizer)(instances)
    for b in range(len(instances)):
        assert response_ids(batch["labels"][b]) == response_ids(batch["masked_labels"][b])
        full_prompt = int((batch["labels"][b] == -100).sum() - (batch["attention_mask"][b] == 0).sum())
        masked_prompt = int((batch["masked_labels"][b] == -100).sum() - (batch["masked_attention_mask"][b] == 0).sum())
        assert full_prompt != masked_prompt
    assert batch["ids"] == ["r1", "r2", "q1", "s1"]
    assert batch["tasks"] == ["sentiment", "sentiment", "qa", "summary"]


def test_right_padding_and_attention_masks(tokenizer):
    instances = make_instances()
    collator = KPIGDataCollator(tokenizer)
    batch = collator(instances)
    singles = [collator([instance]) for instance in instances]
    for prefix in ("", "masked_"):
        ids, mask, labels = (batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "labels"))
        lengths = [singles[b][f"{prefix}input_ids"].shape[1] for b in range(len(instances))]
        assert ids.shape == mask.shape == labels.shape == (len(instances), max(lengths))
        for b, length in enumerate(lengths):
            assert mask[b].tolist() == [1] * length + [0] * (ids.shape[1] - length)
            assert ids[b, :length].tolist() == singles[b][f"{prefix}input_ids"][0].tolist()
            assert (ids[b, length:] == tokenizer.pad_token_id).all()
            assert (labels[b, length:] == -100).all()
    padded = KPIGDataCollator(tokenizer, pad_to_multiple_of=16)(instances)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["masked_input_ids"].shape[1] % 16 == 0
    assert torch.equal(padded["input_ids"][:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_truncation_shortens_the_input_and_keeps_the_response(tokenizer):
    long_input = " ".join(f"Sentence number {i} talks about the river." for i in range(60))
    instance = Instance(
        "long", "qa", "Answer the question with yes or no.", long_input, ["Yes, the river flows."], ["yes or no"]
    )
    collator = KPIGDataCollator(tokenizer, max_length=80)
    batch = collator([instance, make_instances()[0]])
    for prefix in ("", "masked_"):
        ids = real_ids(batch, 0, prefix)
        assert len(ids) <= 80
        response = tokenizer.decode(response_ids(batch[f"{prefix}labels"][0]))
        assert response == "Yes, the river flows." + tokenizer.eos_token
        text = tokenizer.decode(ids)
        kept_input = re.search(r"Input: (.*?)(<\|im_end\|>|\n\nOutput:)", text, re.S).group(1)
        assert 0 < len(kept_input) < len(long_input) and long_input.startswith(kept_input)
    # Both twins keep the same input prefix, and the instruction stays whole.
    assert "Answer the question with yes or no." in tokenizer.decode(real_ids(batch, 0))
    full_input = tokenizer.decode(real_ids(batch, 0)).split("Input: ")[1]
    masked_input = tokenizer.decode(real_ids(batch, 0, "masked_")).split("Input: ")[1]
    assert full_input == masked_input
    # The longer twin uses (almost) the whole budget: the cut is not needlessly deep.
    assert max(len(real_ids(batch, 0)), len(real_ids(batch, 0, "masked_"))) >= 78
    assert collator.counts["input_truncated"] == 1 and collator.counts["skipped"] == 0


def test_truncation_shortens_the_instruction_when_the_input_is_not_enough(tokenizer):
    instruction = "Answer the question with yes or no. " + "Read the text carefully before you answer. " * 20
    instance = Instance("i", "qa", instruction, "Is it?", ["Yes."], ["yes or no"])
    collator = KPIGDataCollator(tokenizer, max_length=60)
    batch = collator([instance])
    for prefix in ("", "masked_"):
        assert len(real_ids(batch, 0, prefix)) <= 60
        response = tokenizer.decode(response_ids(batch[f"{prefix}labels"][0]))
        assert response == "Yes." + tokenizer.eos_token
    full = tokenizer.decode(real_ids(batch, 0))
    assert "Answer the question with yes or no. Read the text" in full and "Input:" not in full
    assert collator.counts["instruction_truncated"] == 1


def test_overlong_response_errors_or_is_skipped_with_one_log_line(tokenizer, caplog):
    long_output = "The answer is very long. " * 40
    bad = [Instance(f"bad{i}", "essay", "Write.", "x", [long_output], []) for i in range(2)]
    good = make_instances()
    with pytest.raises(ValueError, match=r"task 'essay': instance 'bad0'"):
        KPIGDataCollator(tokenizer, max_length=64)(good + bad)
    collator = KPIGDataCollator(tokenizer, max_length=64, on_overlong="skip")
    with caplog.at_level(logging.WARNING, logger="kpig_trainer.kpig.collator"):
        batch = collator([bad[0], *good, bad[1]])
    assert batch["ids"] == [i.id for i in good]
    assert collator.counts["skipped"] == 2
    records = [r for r in caplog.records if r.name == "kpig_trainer.kpig.collator"]
    assert len(records) == 1 and "skipped 2" in records[0].getMessage()
    with pytest.raises(ValueError, match="all 2 instances"):
        collator(bad)


def test_pool_sampling_is_deterministic_and_covers_the_pool(tiny_tokenizer):
    pools = {
        "sentiment": [
            {"instruction": f"Variant {k}: label the review as good or bad.", "key_parts": ["good or bad"]}
            for k in range(4)
        ]
    }
    instances = [Instance(f"id{n}", "sentiment", INSTRUCTION, "Fine.", ["good"], KEY_PARTS) for n in range(200)]
    first = KPIGDataCollator(tiny_tokenizer, instruction_pools=pools, seed=3)
    # A fresh process (pickled collator) draws the same variants, whatever the order.
    again = pickle.loads(pickle.dumps(KPIGDataCollator(tiny_tokenizer, instruction_pools=pools, seed=3)))
    other_seed = KPIGDataCollator(tiny_tokenizer, instruction_pools=pools, seed=4)
    chosen = [first.instruction_for(i)[0] for i in instances]
    assert chosen == [again.instruction_for(i)[0] for i in reversed(instances)][::-1]
    assert len(set(chosen)) == 4
    assert chosen != [other_seed.instruction_for(i)[0] for i in instances]
    # The batch shows the drawn variant in the full twin and its masked form in the twin.
    batch = first(instances[:3])
    for b in range(3):
        assert chosen[b] in tiny_tokenizer.decode(real_ids(batch, b))
        masked = tiny_tokenizer.decode(real_ids(batch, b, "masked_"))
        assert chosen[b].replace("good or bad", "[MASK]") in masked
    # A task without a pool keeps the instance's own instruction and key parts.
    qa = make_instances()[2]
    assert first.instruction_for(qa) == (qa.instruction, qa.key_parts)


def test_pretokenized_rows_match_raw_rows(tokenizer):
    from datasets import Dataset

    instances = make_instances()
    tasks = {name: Task(name, "cat", "def") for name in {i.task for i in instances}}
    dataset = Dataset.from_dict(instances_to_columns(instances, tasks, stage=0))
    collator = KPIGDataCollator(tokenizer, max_length=48)  # short enough to truncate some rows
    expected = collator(list(dataset))
    single = dataset.map(collator.tokenize)
    batched = dataset.map(collator.tokenize, batched=True, batch_size=3, remove_columns=dataset.column_names)
    assert set(batched.column_names) == {"input_ids", "labels", "masked_input_ids", "masked_labels", "id", "task"}
    for rows in (list(single), list(batched), [i.to_dict() for i in instances], instances):
        got = collator(rows)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value


def test_batched_map_drops_skipped_rows(tiny_tokenizer):
    from datasets import Dataset

    rows = [i.to_dict() for i in make_instances()]
    rows.append({**rows[0], "id": "huge", "outputs": ["word " * 200]})
    dataset = Dataset.from_list(rows)
    collator = KPIGDataCollator(tiny_tokenizer, max_length=64, on_overlong="skip")
    tokenized = dataset.map(collator.tokenize, batched=True, remove_columns=dataset.column_names)
    assert tokenized["id"] == ["r1", "r2", "q1", "s1"]
    assert collator(list(tokenized))["ids"] == ["r1", "r2", "q1", "s1"]


def test_output_column_and_plain_sft_batch(tokenizer):
    instances = make_instances()
    rows = [{k: v for k, v in i.to_dict().items() if k != "outputs"} | {"output": i.output} for i in instances]
    paired = KPIGDataCollator(tokenizer)(rows)
    plain = KPIGDataCollator(tokenizer, with_masked=False)(instances)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    for key in plain:
        assert torch.equal(plain[key], paired[key])


def _bos_adding_tokenizer(chat_template):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    bos = backend.token_to_id(TINY_SPECIAL_TOKENS["bos_token"])
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        **TINY_SPECIAL_TOKENS,
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
        None,
    ],
)
def test_exactly_one_bos(template):
    # The tokenizer adds BOS on encode; the template (if any) writes one too.
    tokenizer = _bos_adding_tokenizer(template)
    bos = tokenizer.bos_token_id
    assert tokenizer("hi")["input_ids"][0] == bos
    batch = KPIGDataCollator(tokenizer)(make_instances())
    for b in range(4):
        for prefix in ("", "masked_"):
            ids = real_ids(batch, b, prefix)
            assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


def test_no_bos_added_when_the_tokenizer_adds_none():
    tokenizer = tiny_tokenizer(chat_template=False)
    batch = KPIGDataCollator(tokenizer)(make_instances())
    assert tokenizer.bos_token_id not in batch["input_ids"].tolist()[0]


def test_empty_key_parts_twin_equals_original_and_logs_once(tiny_tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(masking, "_empty_key_parts_logged", False)
    instances = [Instance(f"e{n}", "t", INSTRUCTION, f"Review {n}.", ["ok"], []) for n in range(5)]
    instances.append(Instance("other", "t", "Say ok.", "x", ["ok"], []))
    collator = KPIGDataCollator(tiny_tokenizer)
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            batch = collator(instances)
    assert torch.equal(batch["input_ids"], batch["masked_input_ids"])
    assert torch.equal(batch["labels"], batch["masked_labels"])
    assert sum("no key parts" in r.getMessage() for r in caplog.records) == 1


def test_per_token_mask_keeps_about_the_length(tiny_tokenizer):
    instances = make_instances()[:1]
    one = KPIGDataCollator(tiny_tokenizer)(instances)
    many = KPIGDataCollator(tiny_tokenizer, per_token_mask=True)(instances)
    masked = tiny_tokenizer.decode(real_ids(many, 0, "masked_")).split("Input:")[0]
    assert "Classify the sentiment of the review as [MASK][MASK]" in masked
    assert masked.count("[MASK]") > 2 and "positive" not in masked
    assert many["masked_input_ids"].shape[1] > one["masked_input_ids"].shape[1]


def test_eos_token_option_and_validation(tiny_tokenizer):
    batch = KPIGDataCollator(tiny_tokenizer, eos_token="<pad>")(make_instances()[:1])
    assert response_ids(batch["labels"][0])[-1] == tiny_tokenizer.pad_token_id
    with pytest.raises(ValueError, match="on_overlong"):
        KPIGDataCollator(tiny_tokenizer, on_overlong="drop")
    with pytest.raises(ValueError, match="not a token"):
        KPIGDataCollator(tiny_tokenizer, eos_token="<no such token>")


def test_batch_feeds_information_gain_and_cross_entropy(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    instances = make_instances()
    instances.append(Instance("z", "t", "Say ok.", "now", ["ok"], []))
    batch = KPIGDataCollator(tokenizer)(instances)
    ig = information_gain(model, batch, alpha=0.3)
    assert ig.shape == (5,) and torch.isfinite(ig).all()
    assert (ig[:4] != 0).all()
    with torch.no_grad():
        for prefix in ("", "masked_"):
            logits = model(
                input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"]
            ).logits
            loss = cross_entropy_loss(logits, batch[f"{prefix}labels"])
            assert torch.isfinite(loss) and loss > 0
    # Empty key parts: both twins are the same tokens, so the IG is exactly zero.
    empty = [Instance(i.id, i.task, i.instruction, i.input, i.outputs, []) for i in make_instances()]
    ig_empty = information_gain(model, KPIGDataCollator(tokenizer)(empty), alpha=0.3)
    assert torch.equal(ig_empty, torch.zeros(4))


@pytest.mark.slow
def test_smollm2_tokenizer():
    from transformers import AutoTokenizer

    from kpig_trainer.models import ensure_smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2_checkpoint())
    instances = make_instances() * 2
    collator = KPIGDataCollator(tokenizer)
    batch = collator(instances)
    for b, instance in enumerate(instances):
        for prefix in ("", "masked_"):
            ids = real_ids(batch, b, prefix)
            assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
            response = tokenizer.decode(response_ids(batch[f"{prefix}labels"][b]))
            assert response == instance.output + "<|im_end|>"
        masked = tokenizer.decode(real_ids(batch, b, "masked_"))
        assert "[MASK]" in masked and all(p not in masked for p in instance.key_parts)
        assert response_ids(batch["labels"][b]) == response_ids(batch["masked_labels"][b])
    # Speed: 8 prompts of a few hundred tokens each, collated in milliseconds.
    context = " ".join(f"Sentence {i} of a long review about the film and its actors." for i in range(25))
    long_batch = [
        Instance(f"l{n}", "sentiment", INSTRUCTION, context + f" {n}", ["positive"], KEY_PARTS) for n in range(8)
    ]
    collator(long_batch)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        collator(long_batch)
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[2] < 0.1, timings
