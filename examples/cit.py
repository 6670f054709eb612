"""Continual instruction tuning, one command.

    accelerate launch examples/cit.py                          # the CPU demo (recipes/demo.yaml)
    accelerate launch examples/cit.py --recipe recipes/superni_st/kpig.yaml
    accelerate launch examples/cit.py --learning_rate 1e-5 --max_stages 2   # override any field

Runs every stage of the stream (replay, previous-model snapshot, training, evaluation,
checkpoint), prints a per-stage table and where the run's files are. Running the same command
again resumes where it stopped.
"""

import logging
import sys

from kpig_trainer.continual.runner import ContinualRunner
from kpig_trainer.distributed import end_distributed
from kpig_trainer.recipes import parse_run_args
from kpig_trainer.continual.table import stage_table


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    continual, training = parse_run_args(argv)
    runner = ContinualRunner(continual, training)
    state = runner.run()
    if training.process_index == 0:
        print()
        print(stage_table(state))
        print(f"\nrun directory: {runner.dir.root.resolve()}  (state.json, stages/, report files)")
    end_distributed()  # before the interpreter exits: a live gloo group can abort the process there
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
