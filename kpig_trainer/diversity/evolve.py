"""The LLM backend: key-part extraction and the four evolution strategies of KPIG (section 3.2).

* ``concretizing``: replace general concepts inside the key parts by more specific ones;
* ``reasoning``: ask explicitly for multi-step reasoning where the key parts allow it;
* ``constraint``: add one more constraint (10 to 20 words at most);
* ``breadth``: a rarer instruction of the same domain and similar length whose key parts are
  unchanged. Its key parts are the parent's, located in the new text (no extraction call);
  an answer that lost one is rejected by the pool's validation.

The first three change the key parts, so the new instruction's key parts are extracted again
with the ``extract`` template. Prompts come from :mod:`kpig_trainer.diversity.prompts`.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections import Counter
from typing import Sequence

from kpig_trainer.diversity.client import DiversityClient
from kpig_trainer.diversity.extract import KeyPartParseError, parse_key_part_list, validate_key_parts
from kpig_trainer.diversity.prompts import EVOLUTION_STRATEGIES, EXTRACT, PromptTemplates, load_templates

logger = logging.getLogger(__name__)

__all__ = ["LLMBackend", "STRATEGIES", "clean_instruction"]

STRATEGIES = EVOLUTION_STRATEGIES
_FENCED = re.compile(r"^```[a-zA-Z]*\s*\n(.*?)\n?```$", re.S)
_LEAD_IN = re.compile(r"^(?:sure|certainly|okay|ok|here(?:'s| is| are))\b[^\n]{0,100}:\s*\n", re.I)
_QUOTE_PAIRS = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}


def clean_instruction(text: str) -> str:
    """Undo the usual wrapping of a model's answer: a chatty lead-in line, a code fence,
    quotes around the whole text. Anything else (markers, prose) is left for validation."""
    text = text.strip()
    text = _LEAD_IN.sub("", text, count=1).strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1] and text.count(text[0]) == 1 + (text[0] == text[-1]):
        text = text[1:-1].strip()
    return text


class LLMBackend:
    """Extraction and evolution through an OpenAI-compatible endpoint.

    Args:
        client: the :class:`DiversityClient` (its counters feed the summary).
        templates: prompt templates (default: ours, see :func:`load_templates`).
        extract_attempts: extraction requests per instruction before giving up (an answer
            that cannot be parsed, or whose spans all miss the instruction, is asked again).
    """

    strategies = STRATEGIES

    def __init__(
        self, client: DiversityClient, templates: PromptTemplates | None = None, *, extract_attempts: int = 2
    ):
        self.client = client
        self.templates = templates or load_templates()
        self.extract_attempts = max(1, extract_attempts)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    @property
    def name(self) -> str:
        """The model name, recorded in every pool entry it produced."""
        return self.client.model

    def keeps_key_parts(self, strategy: str) -> bool:
        """Breadth keeps the parent's key parts; the other strategies change them."""
        return strategy == "breadth"

    def _count(self, key: str, value: int = 1) -> None:
        with self._lock:
            self._counts[key] += value

    def stats(self) -> dict[str, int]:
        """Client counters plus extraction counters (``invalid_json``, ``key_parts_dropped``, ...)."""
        with self._lock:
            counts = dict(self._counts)
        return {**self.client.stats(), **counts}

    def extract(self, instruction: str, example: tuple[str, str]) -> list[str]:
        """Key parts of ``instruction`` (exact substrings); ``[]`` when every attempt failed.

        Raises:
            RequestRejected: the server refused the request (not retried: same prompt).
        """
        prompt = self.templates.render(EXTRACT, instruction=instruction, input=example[0], output=example[1])
        for attempt in range(1, self.extract_attempts + 1):
            self._count("extraction_requests")
            answer = self.client.chat(prompt)
            try:
                candidates = parse_key_part_list(answer)
            except KeyPartParseError as error:
                self._count("invalid_json")
                logger.warning("attempt %d: %s", attempt, error)
                continue
            checked = validate_key_parts(instruction, candidates)
            for _, reason in checked.dropped:
                self._count(f"key_parts_dropped_{reason}")
            self._count("key_parts_dropped", len(checked.dropped))
            if checked.kept:
                return checked.kept
            logger.warning("attempt %d: no proposed key part occurs in the instruction: %r", attempt, candidates)
        return []

    def evolve(
        self, strategy: str, instruction: str, key_parts: Sequence[str], example: tuple[str, str], rng: random.Random
    ) -> str:
        """One evolved instruction, cleaned but not yet validated.

        Raises:
            RequestRejected: the server refused this request (the pool counts a rejection).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
        prompt = self.templates.render(
            strategy, instruction=instruction, key_parts=key_parts, input=example[0], output=example[1]
        )
        return clean_instruction(self.client.chat(prompt))
