"""The previous-stage model (teacher) modes on their own: built from a TeacherContext (an
accelerator and a forward function), never from a Trainer; and the mode registry."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

from kpig_trainer.kpig.collator import KPIGDataCollator
from kpig_trainer.kpig.config import KPIGConfig
from kpig_trainer.kpig.info_gain import information_gain
from kpig_trainer.kpig.teacher import (
    PREVIOUS_ADAPTER,
    AdapterSnapshot,
    CachedTeacher,
    FrozenCopy,
    Teacher,
    TeacherContext,
    TeacherTargets,
    make_teacher,
    register_teacher_mode,
    teacher_modes,
)
from kpig_trainer.kpig.twins import TwinBatch, forward_twins
from kpig_trainer.testing import tiny_llama

ROWS = [
    {
        "id": f"r-{i}",
        "task": "sentiment",
        "instruction": "Classify the review as positive or negative. Answer in one word.",
        "input": f"Review number {i}: {'lovely' if i % 2 else 'awful'} food.",
        "outputs": ["positive" if i % 2 else "negative"],
        "key_parts": ["positive or negative", "one word"],
    }
    for i in range(6)
]


@pytest.fixture(scope="module")
def base():
    model, tokenizer = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharper distributions: IG far from 0
    return model, tokenizer


def args(tmp_path, **overrides):
    return KPIGConfig(
        **{
            "output_dir": str(tmp_path),
            "report_to": [],
            "use_cpu": True,
            "disable_tqdm": True,
            "per_device_eval_batch_size": 4,
            **overrides,
        }
    )


def context(model, tmp_path, collator=None, dataset=None, **overrides):
    config = args(tmp_path, **overrides)  # first: TrainingArguments resets accelerate's state
    return TeacherContext(
        accelerator=Accelerator(cpu=True),
        args=config,
        forward=lambda m, twins: forward_twins(m, twins, fuse=False),
        model=lambda: model,
        train_dataset=lambda: dataset,
        data_collator=lambda: collator,
        show_progress=False,
    )


def plain_logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def perturb(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def twin_batch(tokenizer, rows):
    inputs = KPIGDataCollator(tokenizer)(rows)
    return TwinBatch.from_inputs(inputs, response_only=False), inputs


def test_copy_mode_keeps_the_snapshot_until_the_next_one(base, tmp_path):
    model = copy.deepcopy(base[0])
    teacher = FrozenCopy(context(model, tmp_path))
    assert not teacher.ready
    teacher.snapshot()
    batch, inputs = twin_batch(base[1], ROWS[:4])
    before = plain_logits(copy.deepcopy(model), inputs["masked_input_ids"], inputs["masked_attention_mask"])
    perturb(model)  # training moves the model; the teacher must not move with it
    targets = teacher.targets(batch, "masked", with_info_gain=False)
    torch.testing.assert_close(targets.logits, before, atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in teacher.model.parameters())
    teacher.snapshot()  # a stage boundary: now the moved weights
    after = plain_logits(copy.deepcopy(model), inputs["masked_input_ids"], inputs["masked_attention_mask"])
    torch.testing.assert_close(teacher.targets(batch, "masked", False).logits, after, atol=1e-5, rtol=1e-5)
    # The IG it reports is the frozen model's own (equation 1, by the batch-level reference).
    ig = teacher.targets(batch, "masked", with_info_gain=True).info_gain
    torch.testing.assert_close(
        ig, information_gain(copy.deepcopy(model), inputs, 0.3, fuse_twins=False), atol=1e-5, rtol=1e-4
    )


def test_adapter_mode_answers_with_the_snapshot_adapter(base, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base[0]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    perturb(model, seed=2)  # a trained adapter, not the zero-initialised one
    teacher = AdapterSnapshot(context(model, tmp_path))
    teacher.snapshot()
    assert teacher.ready and PREVIOUS_ADAPTER in model.peft_config
    batch, inputs = twin_batch(base[1], ROWS[:4])
    before = plain_logits(copy.deepcopy(model), inputs["masked_input_ids"], inputs["masked_attention_mask"])
    perturb(model, seed=3)
    model.train()
    got = teacher.targets(batch, "masked", with_info_gain=False).logits
    torch.testing.assert_close(got, before, atol=1e-5, rtol=1e-5)
    assert model.active_adapter == "default" and model.training  # the training adapter is back
    teacher.release()
    assert PREVIOUS_ADAPTER not in model.peft_config


def test_cached_mode_stores_the_top_k_of_the_model_on_the_training_set(base, tmp_path):
    model = copy.deepcopy(base[0])
    collator = KPIGDataCollator(base[1])
    teacher = CachedTeacher(context(model, tmp_path, collator, ROWS, teacher_topk=5, ig_source="previous"))
    teacher.prepare()  # before any update: the cache is of M_{t-1}
    assert teacher.ready and teacher.directory == tmp_path / "kpig_teacher_cache"
    batch, inputs = twin_batch(base[1], ROWS[2:6])
    reference = copy.deepcopy(model)
    perturb(model)  # the cache must not follow the model
    targets = teacher.targets(batch, "masked", with_info_gain=True)
    # Independent expectation: log-softmax of a plain forward at the response positions, top 5.
    logits = plain_logits(reference, inputs["masked_input_ids"], inputs["masked_attention_mask"])
    labels = inputs["masked_labels"]
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    expected = torch.log_softmax(logits[rows, cols].double(), -1).topk(5, -1)
    torch.testing.assert_close(targets.topk_logprobs.double(), expected.values, atol=1e-4, rtol=1e-4)
    assert torch.equal(targets.topk_indices, expected.indices)
    torch.testing.assert_close(
        targets.info_gain, information_gain(reference, inputs, 0.3, fuse_twins=False), atol=1e-5, rtol=1e-4
    )


class ConstantTeacher(Teacher):
    """A custom mode: the teacher is the model's logits on the masked twin at snapshot time,
    remembered per batch by its ids (enough for a test of the registry)."""

    mode = "test-constant"

    def __init__(self, context):
        super().__init__(context)
        self.snapshots = 0

    @property
    def ready(self):
        return self.snapshots > 0

    def snapshot(self):
        self.snapshots += 1

    def targets(self, batch, jsd_twin, with_info_gain, strict=True):
        model = self.context.accelerator.unwrap_model(self.context.model())
        with torch.no_grad():
            logits = self.context.forward(model, [batch.twin(jsd_twin)])[0]
        return TeacherTargets(logits=logits.detach())


def test_a_registered_mode_is_a_valid_previous_model(base, tmp_path, monkeypatch):
    import kpig_trainer.kpig.teacher as teacher_module
    from kpig_trainer.kpig.trainer import KPIGTrainer

    monkeypatch.setattr(teacher_module, "_MODES", dict(teacher_module._MODES))  # registered for this test only

    with pytest.raises(ValueError, match="previous_model"):
        args(tmp_path, previous_model="test-constant")
    register_teacher_mode(ConstantTeacher)
    assert {"copy", "adapter", "cached", "test-constant"} <= set(teacher_modes())
    trainer = KPIGTrainer(
        copy.deepcopy(base[0]), args(tmp_path, previous_model="test-constant"), processing_class=base[1]
    )
    assert isinstance(trainer.teacher, ConstantTeacher) and trainer.teacher.snapshots == 1
    # The teacher saw the trainer's model through its context: same logits, JSD 0.
    batch = KPIGDataCollator(base[1])(ROWS[:4])
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    sums = trainer._metric_sums["train"]
    assert sums[2].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="registered: .*test-constant"):
        make_teacher("nope", context(base[0], tmp_path))
    with pytest.raises(TypeError, match="Teacher subclass"):
        register_teacher_mode(dict)
