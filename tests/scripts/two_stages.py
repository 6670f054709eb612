"""Two KPIG stages on the tiny model, for tests that launch it under accelerate (DDP, DeepSpeed).

    accelerate launch [config] tests/scripts/two_stages.py MODEL_DIR MODE OUT_JSON

Stage 1 trains 2 steps; stage 2 is a new KPIGTrainer on the trained model (the continual
runner's way), whose previous model is the stage-1 result. Rank r writes OUT_JSON.r: losses,
the logged JSD per step, and a checksum of the stage-2 teacher's weights where it has them.
"""

import json
import sys

import torch
from datasets import Dataset

from kpig_trainer.distributed import end_distributed, full_weights
from kpig_trainer.kpig.config import KPIGConfig
from kpig_trainer.kpig.trainer import KPIGTrainer
from kpig_trainer.models import load_model_and_tokenizer


def main(model_dir: str, mode: str, out: str) -> None:
    def config(steps: int) -> KPIGConfig:
        return KPIGConfig(
            output_dir=f"{out}.trainer",
            per_device_train_batch_size=2,
            max_steps=steps,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            previous_model=mode,
            max_length=64,
            seed=0,
        )

    args = config(2)  # before the model: under ZeRO-3 it is then loaded as shards (zero.Init)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    rows = [
        {
            "id": f"r{k}",
            "task": "t",
            "instruction": "Answer with yes or no only.",
            "input": f"text {k}",
            "outputs": ["yes" if k % 2 else "no"],
            "key_parts": ["yes or no"],
        }
        for k in range(16)
    ]
    data = Dataset.from_list(rows)
    first = KPIGTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    loss1 = first.train().training_loss
    second = KPIGTrainer(model=first.model, args=config(3), train_dataset=data, processing_class=tokenizer)
    teacher = second.teacher.model if mode == "copy" else None
    checksum = None
    if teacher is not None:
        inner = second.accelerator.unwrap_model(teacher)
        with full_weights(inner), full_weights(first.model):
            checksum = [float(sum(p.double().sum() for p in m.parameters())) for m in (inner, first.model)]
    loss2 = second.train().training_loss
    record = {
        "world": args.world_size,
        "deepspeed": second.is_deepspeed_enabled,
        "loss1": loss1,
        "loss2": loss2,
        "jsd": [h["jsd"] for h in second.state.log_history if "jsd" in h],
        "checksum": checksum,
    }
    with open(f"{out}.{args.process_index}", "w") as handle:
        json.dump(record, handle)
    end_distributed()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:4])
