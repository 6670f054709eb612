"""An OpenAI-compatible chat client with our own retry loop, counters and a shared stop switch.

Works with any server that speaks ``POST {base_url}/chat/completions`` (OpenAI, Azure's
OpenAI-compatible endpoint, vLLM, Ollama, llama.cpp, ...). The ``openai`` client is built with
``max_retries=0`` so that every retry goes through :meth:`DiversityClient.chat`, which

* retries 408/409/429/5xx answers, timeouts and connection errors with exponential backoff
  and jitter, at most ``max_attempts`` tries per request, and waits at least as long as the
  server's ``Retry-After`` (or ``retry-after-ms``) header asks;
* raises :class:`EndpointError` at once on 401/403/404 (bad key, no access, unknown model or
  wrong ``base_url``), naming the URL, the model and the key's environment variable, and trips
  the shared stop switch so that every other worker stops at its next request;
* counts requests, prompt/completion tokens and retries (thread-safe) for the final summary.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = [
    "DiversityClient",
    "DiversityError",
    "EndpointError",
    "EndpointUnavailable",
    "RequestRejected",
    "RunStopped",
]

_RETRY_STATUSES = frozenset({408, 409, 429})
_FATAL_STATUSES = {
    401: "the API key was refused",
    403: "the key has no access to this model",
    404: "unknown model or wrong base_url",
}


class DiversityError(RuntimeError):
    """Base class of the errors that stop instruction diversification.

    ``summary`` holds the :class:`~kpig_trainer.diversity.pool.DiversitySummary` of the run
    when :func:`~kpig_trainer.diversity.diversify` raised it (pools written so far are kept).
    """

    summary: Any = None


class EndpointError(DiversityError):
    """The endpoint refused the request for a reason retrying cannot fix (401/403/404)."""


class EndpointUnavailable(DiversityError):
    """A request still failed after every retry (rate limit, server errors, timeouts)."""


class RunStopped(DiversityError):
    """Raised in a worker after another worker hit a fatal error (the stop switch is on)."""


class RequestRejected(RuntimeError):
    """The server rejected one request (400, 422, ...): that attempt fails, the run goes on."""


@dataclass
class _Counters:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failed_requests: int = 0


def _retry_after(error: Exception) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``Retry-After`` seconds or date)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


class DiversityClient:
    """Chat-completions client for key-part extraction and instruction evolution.

    Args:
        base_url: the server's OpenAI-compatible root, e.g. ``https://api.openai.com/v1`` or
            ``http://localhost:8000/v1``.
        model: model name sent with every request.
        api_key_env: environment variable holding the key. Servers that ignore keys (vLLM,
            Ollama) still need it set to something, e.g. ``export OPENAI_API_KEY=EMPTY``.
        temperature: sampling temperature.
        timeout: seconds before one request counts as timed out (and is retried).
        max_attempts: tries per request, first one included.
        backoff_base / backoff_max: the wait before retry ``k`` is
            ``min(backoff_max, backoff_base * 2**(k-1))`` scaled by a random factor in
            ``[0.5, 1]``, and never less than the server's ``Retry-After`` (capped at
            ``retry_after_max``).
        max_tokens: optional cap on generated tokens.
        sleep: ``sleep(seconds)`` used between retries (tests pass a recorder); by default the
            wait ends early when the stop switch is tripped.
        openai_client: an already built ``openai.OpenAI`` (its own retries should be 0).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.7,
        timeout: float = 60.0,
        max_attempts: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        retry_after_max: float = 300.0,
        max_tokens: int | None = None,
        sleep: Callable[[float], None] | None = None,
        openai_client: Any = None,
        seed: int | None = None,
    ):
        if not model:
            raise DiversityError("a model name is needed for the LLM endpoint (--model)")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.max_tokens = max_tokens
        self._sleep = sleep
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._stop = threading.Event()
        self._fatal: DiversityError | None = None
        if openai_client is None:
            import openai

            key = os.environ.get(api_key_env)
            if key is None:
                raise DiversityError(
                    f"environment variable {api_key_env} is not set: put the API key for {base_url} "
                    f"there (or any placeholder such as EMPTY for a server that does not check keys), "
                    f"or choose another variable with --api-key-env"
                )
            openai_client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self._openai = openai_client

    # --- counters and the stop switch ------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Requests sent (retries included), tokens, retries and failed requests so far."""
        with self._lock:
            return dict(vars(self._counters))

    def stop(self, error: DiversityError | None = None) -> None:
        """Trip the stop switch: every later :meth:`chat` call raises :class:`RunStopped`."""
        with self._lock:
            if error is not None and self._fatal is None:
                self._fatal = error
        self._stop.set()

    def reset(self) -> None:
        """Clear the stop switch (``diversify`` does it when it starts, so a client can be reused)."""
        with self._lock:
            self._fatal = None
        self._stop.clear()

    @property
    def stopped(self) -> bool:
        """Whether the stop switch is on."""
        return self._stop.is_set()

    def _check_stopped(self) -> None:
        if self._stop.is_set():
            raise RunStopped(f"stopped: {self._fatal}" if self._fatal else "stopped")

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._counters, name, getattr(self._counters, name) + value)

    def _wait(self, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            self._stop.wait(seconds)  # returns early when another worker failed

    def _delay(self, attempt: int, error: Exception) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        delay *= 0.5 + 0.5 * self._random.random()
        asked = _retry_after(error)
        if asked is not None:
            delay = max(delay, min(asked, self.retry_after_max))
        return delay

    def _where(self) -> str:
        return f"base_url={self.base_url!r}, model={self.model!r}, key from ${self.api_key_env}"

    # --- the request -------------------------------------------------------------------------
    def chat(self, prompt: str) -> str:
        """Send one user message and return the assistant's text ('' when it has none).

        Raises:
            EndpointError: 401/403/404 (also trips the stop switch).
            EndpointUnavailable: still failing after ``max_attempts`` tries (also trips it).
            RunStopped: the stop switch was already on.
            RequestRejected: the server rejected this request (other 4xx); not retried.
        """
        import openai

        kwargs: dict[str, Any] = {
            "model": self.model,
            "temperature": self.temperature,
            "messages": [{"role": "user", "content": prompt}],
        }
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        for attempt in range(1, self.max_attempts + 1):
            self._check_stopped()
            self._count(requests=1)
            try:
                response = self._openai.chat.completions.create(**kwargs)
            except openai.APIStatusError as error:
                status = error.status_code
                if status in _FATAL_STATUSES:
                    self._count(failed_requests=1)
                    fatal = EndpointError(
                        f"HTTP {status} from the LLM endpoint ({_FATAL_STATUSES[status]}): {self._where()}. "
                        f"Server said: {error.message}"
                    )
                    self.stop(fatal)
                    raise fatal from error
                if status not in _RETRY_STATUSES and status < 500:
                    self._count(failed_requests=1)
                    raise RequestRejected(f"HTTP {status}: {error.message}") from error
                last: Exception = error
            except (openai.APITimeoutError, openai.APIConnectionError) as error:
                last = error
            else:
                usage = getattr(response, "usage", None)
                self._count(
                    prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                )
                choices = getattr(response, "choices", None) or []
                message = getattr(choices[0], "message", None) if choices else None
                return (getattr(message, "content", None) or "") if message is not None else ""
            self._count(failed_requests=1)
            if attempt == self.max_attempts:
                break
            delay = self._delay(attempt, last)
            self._count(retries=1)
            logger.info(
                "LLM request failed (%s: %s); retry %d/%d in %.1fs",
                type(last).__name__,
                last,
                attempt,
                self.max_attempts - 1,
                delay,
            )
            self._wait(delay)
        unavailable = EndpointUnavailable(
            f"the LLM endpoint still failed after {self.max_attempts} attempts "
            f"({type(last).__name__}: {last}); {self._where()}. Pools written so far are kept: "
            f"rerun the same command later to resume."
        )
        self.stop(unavailable)
        raise unavailable from last
