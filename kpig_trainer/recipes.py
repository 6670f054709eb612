"""Recipes: one YAML file of flat keys sets any field of ContinualArguments and KPIGConfig;
command-line flags override it (``--learning_rate 1e-5``), as alignment-handbook recipes do."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

from kpig_trainer.kpig.config import KPIGConfig
from kpig_trainer.continual.arguments import ContinualArguments

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a recipe and check every key names a field.

    A recipe may start from another one: ``base: ../superni_st/kpig.yaml`` (relative to the
    recipe) loads that first, and this file's keys override it.
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
    known = {f.name for cls in (ContinualArguments, KPIGConfig) for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; see `python examples/cit.py --help`")
    if base is None:
        return data
    return {**read_recipe(path.parent / base, _chain + (path,)), **data}


def parse_run_args(argv: Sequence[str] | None = None, default_recipe: str | Path | None = DEFAULT_RECIPE):
    """``(ContinualArguments, KPIGConfig)`` from ``--recipe FILE`` (default: the demo) and flags."""
    import argparse

    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    known, rest = pre.parse_known_args(argv)
    recipe = known.recipe or default_recipe
    parser = HfArgumentParser((ContinualArguments, KPIGConfig))
    parser.add_argument("--recipe", default=None, help="YAML recipe (default: recipes/demo.yaml); flags override it")
    if recipe:
        parser.set_defaults(**read_recipe(recipe))
    continual, training, _ = parser.parse_args_into_dataclasses(args=list(rest), return_remaining_strings=False)
    return continual, training
