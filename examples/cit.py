"""Continual instruction tuning, one command: the same entry point as ``kpig train``.

    accelerate launch examples/cit.py                          # the CPU demo
    accelerate launch examples/cit.py --config recipes/superni_st/kpig.yaml
    accelerate launch examples/cit.py --learning_rate 1e-5 --max_stages 2   # override any field

Runs every stage of the stream (replay, teacher snapshot, training, evaluation, checkpoint),
prints a per-stage table and where the run's files are. Running the same command again resumes
where it stopped.
"""

import sys

from kpig_trainer.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
