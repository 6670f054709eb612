"""The ``kpig`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from kpig_trainer.data.records import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kpig", description="Continual instruction tuning with KPIG.")
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed here for `kpig --help`; main() hands its arguments to kpig_trainer.train untouched.
    commands.add_parser(
        "train", help="run (or resume) a continual stream from a recipe; `kpig train --help`", add_help=False
    )

    data = commands.add_parser("data", help="inspect tasks and streams")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    from kpig_trainer.data import summary

    summary_parser = data_commands.add_parser("summary", help="tasks, categories, stage plan and instance counts")
    summary.add_arguments(summary_parser)
    summary_parser.set_defaults(handler=summary.run)

    # Each subsystem registers its own subcommands.
    from kpig_trainer.diversity.cli import register_cli as register_diversity

    register_diversity(commands)
    from kpig_trainer.selection.cli import register_cli as register_selection

    register_selection(commands)
    from kpig_trainer.evaluation.cli import register_cli as register_evaluation

    register_evaluation(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from kpig_trainer.train import main as train

        return train(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
