"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

``StubServer(responder)`` serves ``POST /v1/chat/completions`` from a thread. For every request
the ``responder(prompt, n)`` callable (``n`` counts requests from 1) returns a :class:`Reply`:
a status, a body (the text of the assistant message for a 200, or a JSON error object), extra
headers and an optional delay before answering (to provoke client timeouts). Requests are
recorded in ``server.prompts``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    """One scripted answer."""

    content: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    error: str | None = None


def completion_body(content: str, prompt: str) -> dict:
    """A minimal chat.completion object with usage figures (whitespace token counts)."""
    prompt_tokens, completion_tokens = len(prompt.split()), len(content.split())
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "stub-model",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class StubServer:
    """Threaded HTTP server; use as a context manager. ``base_url`` ends with ``/v1``."""

    def __init__(self, responder: Callable[[str, int], Reply]):
        self.responder = responder
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                prompt = "\n".join(m.get("content") or "" for m in body.get("messages", []))
                with stub.lock:
                    stub.prompts.append(prompt)
                    n = len(stub.prompts)
                reply = stub.responder(prompt, n)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status == 200:
                    payload = completion_body(reply.content, prompt)
                else:
                    payload = {
                        "error": {
                            "message": reply.error or f"stub error {reply.status}",
                            "type": "stub",
                            "code": str(reply.status),
                        }
                    }
                self._send(reply.status, payload, reply.headers)

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return len(self.prompts)

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- a well-behaved fake LLM that understands kpig's shipped templates -------------------------

_SECTION = r"\[{name}\]\n(.*?)\n\[{next}\]"


def prompt_section(prompt: str, name: str, following: str) -> str:
    """Text of the last ``[NAME]`` section of a prompt (the real one, after the few-shot demo)."""
    found = re.findall(_SECTION.format(name=re.escape(name), next=re.escape(following)), prompt, re.S)
    return found[-1] if found else ""


def is_extraction(prompt: str) -> bool:
    """Key-part extraction prompts end with the ``[KEY PARTS]`` answer slot."""
    return prompt.rstrip().endswith("[KEY PARTS]")


def sentence_key_parts(instruction: str, limit: int = 2) -> list[str]:
    """The last ``limit`` sentences of an instruction (without the final period): always found."""
    sentences = [s.strip().rstrip(".") for s in re.split(r"(?<=[.!?])\s+", instruction) if s.strip()]
    return sentences[-limit:]


class FakeLLM:
    """Answers extraction prompts with sentences of the instruction and evolution prompts with
    the instruction plus a numbered new sentence (so every answer is unique and keeps key parts).
    ``override(prompt, n)`` may return a :class:`Reply` to script a request instead."""

    def __init__(self, override: Callable[[str, int], Reply | None] | None = None):
        self.override = override
        self.evolutions = 0
        self.lock = threading.Lock()

    def __call__(self, prompt: str, n: int) -> Reply:
        if self.override is not None:
            scripted = self.override(prompt, n)
            if scripted is not None:
                return scripted
        if is_extraction(prompt):
            instruction = prompt_section(prompt, "INSTRUCTION", "INPUT")
            return Reply(json.dumps(sentence_key_parts(instruction)))
        instruction = prompt_section(prompt, "INSTRUCTION", "KEY PARTS")
        with self.lock:
            self.evolutions += 1
            k = self.evolutions
        return Reply(f"{instruction} Extra requirement number {k}: stay concise.")
