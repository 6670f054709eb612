"""Instruction diversity (KPIG paper, section 3.2): key parts and evolved instruction pools.

``diversify(tasks, pool_size=31, client=...)`` grows one JSONL pool per task, through any
OpenAI-compatible endpoint (:class:`DiversityClient`) or, with ``client=None``, the offline
heuristic; ``load_pools(folder)`` reads them back in the shape the KPIG collator takes.
"""

from kpig_trainer.diversity.cache import load_pools, pool_path, read_pool
from kpig_trainer.diversity.client import (
    DiversityClient,
    DiversityError,
    EndpointError,
    EndpointUnavailable,
    RequestRejected,
    RunStopped,
)
from kpig_trainer.diversity.evolve import STRATEGIES, LLMBackend, clean_instruction
from kpig_trainer.diversity.extract import KeyPartParseError, parse_key_part_list, validate_key_parts
from kpig_trainer.diversity.heuristic import (
    HEURISTIC_STRATEGIES,
    HeuristicBackend,
    evaluate_heuristic,
    extract_key_parts_heuristic,
    heuristic_rewrite,
)
from kpig_trainer.diversity.pool import DiversitySummary, TaskResult, diversify, grow_pool, normalize_instruction
from kpig_trainer.diversity.prompts import PromptTemplates, load_templates
from kpig_trainer.diversity.shipped import SHIPPED_POOLS, SHIPPED_POOLS_DIR, load_run_pools

__all__ = [
    "DiversityClient",
    "DiversityError",
    "DiversitySummary",
    "EndpointError",
    "EndpointUnavailable",
    "HEURISTIC_STRATEGIES",
    "HeuristicBackend",
    "KeyPartParseError",
    "LLMBackend",
    "PromptTemplates",
    "RequestRejected",
    "RunStopped",
    "SHIPPED_POOLS",
    "SHIPPED_POOLS_DIR",
    "STRATEGIES",
    "TaskResult",
    "clean_instruction",
    "diversify",
    "evaluate_heuristic",
    "extract_key_parts_heuristic",
    "grow_pool",
    "heuristic_rewrite",
    "load_pools",
    "load_run_pools",
    "load_templates",
    "normalize_instruction",
    "parse_key_part_list",
    "pool_path",
    "read_pool",
    "validate_key_parts",
]
