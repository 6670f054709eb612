"""Instruction pools from `diversify` feed the collator: instances train on pool variants."""

from collections import Counter

from kpig_trainer.data import load_benchmark
from kpig_trainer.diversity import diversify, load_pools
from kpig_trainer.kpig.collator import KPIGDataCollator


def test_offline_pools_are_sampled_and_masked_by_the_collator(tmp_path, tiny_tokenizer):
    bench = load_benchmark("demo")
    names = ["task1599_smcalflow_classification", "task044_essential_terms_identifying_essential_words"]
    summary = diversify({n: bench.tasks[n] for n in names}, pool_size=4, cache_dir=tmp_path, progress=False)
    assert summary.complete
    pools = load_pools(tmp_path)
    assert {n: len(pools[n]) for n in names} == {n: 4 for n in names}
    collator = KPIGDataCollator(tiny_tokenizer, max_length=512, instruction_pools=pools, seed=0)
    instances = bench.tasks[names[0]].instances[:40]
    drawn = Counter(collator.instruction_for(i)[0] for i in instances)
    variants = {entry["instruction"] for entry in pools[names[0]]}
    assert set(drawn) <= variants and len(drawn) > 1  # several variants in use, all from the pool
    batch = collator(instances[:4])
    for row in range(4):
        instruction, key_parts = collator.instruction_for(instances[row])
        masked = tiny_tokenizer.decode(batch["masked_input_ids"][row], skip_special_tokens=True)
        assert "[MASK]" in masked
        for part in key_parts:
            assert part.lower() not in masked.lower()
