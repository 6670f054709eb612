"""``python -m kpig_trainer.evaluation [eval|compare] ...``: the same as ``kpig eval`` /
``kpig compare``; without a subcommand the arguments are those of ``eval``."""

import sys

from kpig_trainer.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
