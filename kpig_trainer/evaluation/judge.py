"""LLM judge for the GPT metric: is a short open-ended answer reasonable?

The paper asks GPT-4 whether answers to open-ended short-text tasks (commonsense, analogy,
fill-in-the-blank) are reasonable. ``LLMJudge`` asks any OpenAI-compatible chat endpoint
the same with our own prompt, for a one-word yes/no verdict, and caches verdicts on disk.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Sequence

from kpig_trainer.fileio import append_line

__all__ = ["JudgeError", "LLMJudge", "check_api_key", "parse_verdict"]

SYSTEM_PROMPT = (
    "You grade answers to short open-ended tasks. Decide whether the answer is a reasonable "
    "response to the task for the given input: it follows the instruction and is plausible "
    "given common sense. It need not match the example answers word for word. "
    "Reply with exactly one word: yes or no."
)


class JudgeError(RuntimeError):
    """The judge's endpoint refused or failed a request (after the client's retries)."""


def parse_verdict(reply: str) -> bool | None:
    """Read a yes/no verdict from a model reply; None when it is not clear.

    The first word decides ("Yes.", "**No**", "yes, because ..."); failing that, a reply
    that contains the word "yes" or the word "no" but not both decides (so "The answer is
    yes" works, "yes and no" does not).
    """
    words = re.findall(r"[a-z]+", reply.casefold())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0] == "yes"
    found = {word for word in words if word in ("yes", "no")}
    return (found == {"yes"}) if len(found) == 1 else None


def check_api_key(api_key_env: str | None, base_url: str, option: str = "api_key_env") -> None:
    """Raise ValueError, naming ``option``, when ``api_key_env`` names an unset (or empty)
    environment variable: a judge without its key would silently fall back to ROUGE-L."""
    if api_key_env and not os.environ.get(api_key_env):
        raise ValueError(
            f"{option}: the environment variable {api_key_env} is not set; export it with the key "
            f"of {base_url}, or set {option} to '' for an endpoint without a key"
        )


def _describe(label: str, text: str | None) -> str:
    return f"{label}:\n{text.strip() if text and text.strip() else '(none)'}"


class LLMJudge:
    """Judge answers with an OpenAI-compatible chat endpoint; verdicts are 1.0 or 0.0.

    Args:
        base_url: the endpoint, e.g. ``"http://127.0.0.1:8000/v1"``. None (the default)
            leaves the judge unavailable: the defaults never touch the network.
        model: model name sent to the endpoint.
        api_key_env: environment variable holding the API key. None for endpoints that
            need no key (a placeholder key is sent).
        cache_path: JSONL file of verdicts keyed by (model, prompt, answer); loaded on
            start, appended one line per new verdict. None: an in-memory cache only.
        temperature: sampling temperature (0 for repeatable verdicts).
        max_retries: retries of the ``openai`` client on transient errors (not on 401).
        timeout: seconds per request.

    ``available`` is False when no ``base_url`` is set, or ``api_key_env`` names an unset
    variable; ``score_example`` then falls back to ROUGE-L.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str = "gpt-4o",
        api_key_env: str | None = "OPENAI_API_KEY",
        cache_path: str | os.PathLike | None = None,
        temperature: float = 0.0,
        max_retries: int = 3,
        timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.temperature = temperature
        self.max_retries = max_retries
        self.timeout = timeout
        self._client = None
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str], float] = {}
        if self.cache_path is not None:
            self._load_cache()

    @property
    def available(self) -> bool:
        """True when an endpoint and (if one is required) its API key are configured."""
        has_key = self.api_key_env is None or bool(os.environ.get(self.api_key_env))
        return bool(self.base_url) and has_key

    @staticmethod
    def build_prompt(instruction: str | None, input_text: str | None, references: Sequence[str] | None = None) -> str:
        """The task part of the question (everything but the answer): the instruction, the
        input and, when given, example answers known to be acceptable."""
        parts = [_describe("Task instruction", instruction), _describe("Input", input_text)]
        if references:
            parts.append(_describe("Example acceptable answers", "\n".join(references)))
        return "\n\n".join(parts)

    def judge(
        self,
        instruction: str | None,
        input_text: str | None,
        answer: str,
        references: Sequence[str] | None = None,
    ) -> float:
        """1.0 when the endpoint says ``answer`` is reasonable, else 0.0 (an unclear reply
        counts as 0.0, with a warning, and is not cached). Raises ``JudgeError`` when the
        endpoint refuses (401) or fails, and RuntimeError when the judge is unavailable."""
        if not self.available:
            raise RuntimeError(
                "LLMJudge is not available: set base_url"
                + (f" and the {self.api_key_env} environment variable" if self.api_key_env else "")
            )
        prompt = self.build_prompt(instruction, input_text, references)
        key = (self.model, prompt, answer)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        reply = self._ask(f"{prompt}\n\n{_describe('Answer to grade', answer)}\n\nIs the answer reasonable?")
        verdict = parse_verdict(reply)
        if verdict is None:
            warnings.warn(f"LLM judge reply is neither yes nor no, counted as no: {reply[:200]!r}")
            return 0.0
        value = 1.0 if verdict else 0.0
        with self._lock:
            self._cache[key] = value
            record = {"model": self.model, "prompt": prompt, "answer": answer, "verdict": value}
            self._append({**record, "reply": reply})
        return value

    # -- endpoint ---------------------------------------------------------------------

    def _ask(self, question: str) -> str:
        import openai

        if self._client is None:
            api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
            self._client = openai.OpenAI(
                base_url=self.base_url,
                api_key=api_key or "no-key-needed",
                max_retries=self.max_retries,
                timeout=self.timeout,
            )
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question},
                ],
                temperature=self.temperature,
                max_tokens=5,
            )
        except openai.AuthenticationError as err:
            source = f"${self.api_key_env}" if self.api_key_env else "the placeholder key"
            raise JudgeError(
                f"LLM judge endpoint {self.base_url} rejected the API key from {source} "
                f"(HTTP 401); check the key or the base_url"
            ) from err
        except (openai.OpenAIError, ValueError) as err:  # ValueError: a reply body that is not JSON
            raise JudgeError(f"LLM judge request to {self.base_url} failed: {err}") from err
        return response.choices[0].message.content or ""

    # -- cache ------------------------------------------------------------------------

    def _load_cache(self) -> None:
        """Load verdicts; a corrupt last line (a write cut short) is dropped with a warning
        and cut from the file, so the next append starts on a fresh line."""
        path = self.cache_path
        if not path.exists():
            return
        data = path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (record["model"], record["prompt"], record["answer"])
                value = float(record["verdict"])
            except (ValueError, KeyError, TypeError):
                is_last = not any(rest.strip() for rest in lines[number:])
                warnings.warn(f"{path}: dropping corrupt judge-cache line {number}")
                if is_last:
                    with open(path, "r+b") as handle:
                        handle.truncate(start)
                    break
                continue
            self._cache[key] = value
        if data and not data.endswith(b"\n") and path.stat().st_size == len(data):
            with open(path, "ab") as handle:  # a valid last line without its newline
                handle.write(b"\n")

    def _append(self, record: dict) -> None:
        if self.cache_path is None:
            return
        append_line(self.cache_path, json.dumps(record, ensure_ascii=False))
