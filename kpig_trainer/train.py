"""``kpig train``: a continual run from one recipe, on one CPU or many GPUs.

    kpig train                                              # the CPU demo (shipped in the package)
    kpig train --config recipes/superni_st/kpig.yaml        # a recipe file
    kpig train --config my.yaml --learning_rate 1e-5        # flags override the recipe
    accelerate launch -m kpig_trainer.train --config my.yaml

A recipe is a YAML mapping of option names: any field of
:class:`~kpig_trainer.continual.arguments.ContinualArguments` (with TRL's ``ModelConfig`` model
and LoRA options), of :class:`~kpig_trainer.kpig.config.KPIGConfig`, plus

* ``base: other.yaml``: start from another recipe (a path relative to this one); this file's
  keys override it.
* ``env: {NAME: value}``: environment variables to set before the run, as TRL's recipes do.

Parsing is TRL's (:class:`trl.TrlParser`); ``--recipe`` is an alias of ``--config``. Running the
same command again resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from kpig_trainer.continual.arguments import ContinualArguments
from kpig_trainer.kpig.config import KPIGConfig

__all__ = ["DEFAULT_RECIPE", "main", "parse_run_args", "read_recipe"]

DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"
"""The CPU demo recipe, shipped inside the package."""

_CONFIG_FLAGS = ("--config", "--recipe")


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's options, with its ``base:`` chain resolved and every key checked.

    Raises:
        ValueError: the file is missing or malformed, a key names no option (the message names
            the file and the keys), or recipes include each other.
    """
    path = Path(path).resolve()
    if path in _chain:
        raise ValueError(f"{path}: recipes include each other: {' -> '.join(map(str, _chain + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ValueError(f"{path}: recipe not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: malformed YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of option names to values")
    base = data.pop("base", None)
    env = data.get("env", {})
    if not isinstance(env, dict):
        raise ValueError(f"{path}: env is a mapping of environment variable names to values")
    known = {f.name for cls in (ContinualArguments, KPIGConfig) for f in dataclasses.fields(cls) if f.init} | {"env"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; see `kpig train --help`")
    if base is None:
        return data
    inherited = read_recipe(path.parent / base, _chain + (path,))
    merged = {**inherited, **data}
    if "env" in inherited or "env" in data:
        merged["env"] = {**inherited.get("env", {}), **env}
    return merged


def _split_config(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    rest, config, args = [], None, list(argv)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=")
        if flag in _CONFIG_FLAGS:
            if not eq:
                if not args:
                    raise SystemExit(f"kpig train: {flag} needs a recipe file")
                value = args.pop(0)
            config = value
        else:
            rest.append(arg)
    return config, rest


def parse_run_args(
    argv: Sequence[str] | None = None, default_recipe: str | Path | None = DEFAULT_RECIPE
) -> tuple[ContinualArguments, KPIGConfig]:
    """``(ContinualArguments, KPIGConfig)`` from ``--config FILE`` (default: the demo) and flags.

    The recipe's ``env`` variables are set in ``os.environ`` before the options are built.
    """
    from trl import TrlParser

    config, rest = _split_config(sys.argv[1:] if argv is None else argv)
    parser = TrlParser(
        (ContinualArguments, KPIGConfig),
        prog="kpig train",
        description="Continual instruction tuning from a recipe; flags override its options.",
    )
    parser.add_argument(
        "--config",
        "--recipe",
        dest="config",
        default=None,
        help="YAML recipe (default: the CPU demo shipped in the package); flags override it",
    )
    recipe = config or default_recipe
    if recipe:
        options = read_recipe(recipe)
        for name, value in options.pop("env", {}).items():
            os.environ[name] = str(value)
        unused = parser.set_defaults_with_config(**options)
        if unused:  # read_recipe checked the names; this would be a field the parser lacks
            raise ValueError(f"{recipe}: options the parser does not know: {unused}")
    continual, training, *_ = parser.parse_args_into_dataclasses(args=rest)  # _: the --config namespace
    return continual, training


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the recipe's stream; print the stage table and the run directory."""
    from kpig_trainer.continual.runner import ContinualRunner
    from kpig_trainer.continual.table import stage_table
    from kpig_trainer.distributed import end_distributed

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
    sys.exit(main())
