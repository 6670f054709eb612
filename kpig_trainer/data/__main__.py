"""``python -m kpig_trainer.data summary ...``: the same as ``kpig data summary``."""

import sys

from kpig_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
