"""LLM judge against a scripted OpenAI-compatible server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kpig_trainer.evaluation import JudgeError, LLMJudge, parse_verdict, score_example, score_task


class FakeEndpoint:
    """Serves POST /v1/chat/completions: "Yes." when the graded answer contains GOOD,
    "No, it is not." otherwise; HTTP 401 when ``reject`` is set. Records every request."""

    def __init__(self):
        self.requests = []
        self.reject = False
        self.script = []  # per-request overrides, consumed in order: ("status", code) | ("reply", text) | ("raw", bytes) | ("sleep", s)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                endpoint.requests.append({"path": self.path, "body": body, "auth": auth})
                if endpoint.reject:
                    return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                action = endpoint.script.pop(0) if endpoint.script else None
                if action and action[0] == "status":
                    return self._send(action[1], {"error": {"message": "scripted"}}, {"retry-after-ms": "10"})
                if action and action[0] == "raw":
                    return self._send_bytes(200, action[1])
                if action and action[0] == "sleep":
                    import time

                    time.sleep(action[1])
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                question = body["messages"][-1]["content"]
                answer = question.split("Answer to grade:", 1)[1]
                reply = "Yes." if "GOOD" in answer else "No, it is not."
                if action and action[0] == "reply":
                    reply = action[1]
                self._send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })  # fmt: skip

            def _send(self, status, payload, headers=None):
                self._send_bytes(status, json.dumps(payload).encode(), headers)

            def _send_bytes(self, status, data, headers=None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        serve = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        serve.daemon = True
        serve.start()


@pytest.fixture
def endpoint(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # never route loopback through a proxy
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    server = FakeEndpoint()
    yield server
    server.server.shutdown()
    server.server.server_close()


def make_judge(endpoint, **kwargs):
    kwargs.setdefault("max_retries", 0)
    return LLMJudge(base_url=endpoint.base_url, model="judge-model", api_key_env="TEST_JUDGE_KEY", **kwargs)


def test_verdicts_and_request_content(endpoint):
    judge = make_judge(endpoint)
    assert judge.available
    assert judge.judge("Fill in the blank.", "PersonX buys ___", "GOOD tickets", ["gifts"]) == 1.0
    assert judge.judge("Fill in the blank.", "PersonX buys ___", "purple", ["gifts"]) == 0.0
    first = endpoint.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    question = body["messages"][-1]["content"]
    for part in ("Fill in the blank.", "PersonX buys ___", "gifts", "GOOD tickets", "yes or no"):
        assert part in question or part in body["messages"][0]["content"]


def test_cache_hit_sends_no_second_request_and_survives_restarts(endpoint, tmp_path):
    cache = tmp_path / "judge" / "cache.jsonl"
    judge = make_judge(endpoint, cache_path=cache)
    assert judge.judge("Say a fruit.", "", "GOOD apple") == 1.0
    assert judge.judge("Say a fruit.", "", "GOOD apple") == 1.0
    assert len(endpoint.requests) == 1
    assert len(cache.read_text().splitlines()) == 1
    reloaded = make_judge(endpoint, cache_path=cache)
    assert reloaded.judge("Say a fruit.", "", "GOOD apple") == 1.0
    assert len(endpoint.requests) == 1  # answered from the file
    assert reloaded.judge("Say a fruit.", "", "brick") == 0.0  # a different answer is asked
    assert len(endpoint.requests) == 2
    other_model = LLMJudge(endpoint.base_url, model="other", api_key_env="TEST_JUDGE_KEY", cache_path=cache)
    other_model.judge("Say a fruit.", "", "GOOD apple")
    assert len(endpoint.requests) == 3  # the cache key includes the model


def test_corrupt_last_cache_line_is_dropped_with_a_warning(endpoint, tmp_path):
    cache = tmp_path / "cache.jsonl"
    make_judge(endpoint, cache_path=cache).judge("Say a fruit.", "", "GOOD apple")
    with open(cache, "a") as handle:
        handle.write('{"model": "judge-model", "prompt": "Say')  # a write cut short
    with pytest.warns(UserWarning, match="corrupt judge-cache line 2"):
        judge = make_judge(endpoint, cache_path=cache)
    assert judge.judge("Say a fruit.", "", "GOOD apple") == 1.0
    assert len(endpoint.requests) == 1
    judge.judge("Say a fruit.", "", "GOOD pear")
    lines = cache.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)  # no glued records


def test_401_raises_a_clear_error(endpoint):
    endpoint.reject = True
    judge = make_judge(endpoint, max_retries=2)
    with pytest.raises(JudgeError, match=r"rejected the API key from \$TEST_JUDGE_KEY \(HTTP 401\)"):
        judge.judge("Say a fruit.", "", "apple")
    assert len(endpoint.requests) == 1  # a 401 is not retried


def test_availability(monkeypatch):
    monkeypatch.delenv("UNSET_JUDGE_KEY", raising=False)
    assert not LLMJudge().available  # no base_url: the default stays offline
    assert not LLMJudge(base_url="http://127.0.0.1:9/v1", api_key_env="UNSET_JUDGE_KEY").available
    assert LLMJudge(base_url="http://127.0.0.1:9/v1", api_key_env=None).available
    with pytest.raises(RuntimeError, match="not available"):
        LLMJudge().judge("i", "x", "a")


def test_score_example_and_task_use_an_available_judge(endpoint):
    judge = make_judge(endpoint)
    task = {"metric": "GPT", "scope": "-", "max_words": 3}
    result = score_example("GOOD coat", ["jacket"], task, judge=judge, instruction="Name an object.")
    assert result == (1.0, "gpt", False)
    score = score_task("analogy", ["GOOD coat", "the sky"], [["coat"], ["coat"]], task, judge=judge)
    assert score.performance == 50.0 and score.metric_used == "gpt" and not score.fallback


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("yes", True),
        ("No", False),
        ("Yes.", True),
        ("**No**", False),
        ("yes, because it fits", True),
        ("The answer is yes.", True),
        ("Verdict: NO", False),
        ("It could be yes or no", None),
        ("maybe", None),
        ("", None),
        ("Nope", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_429_then_success_is_retried(endpoint):
    endpoint.script = [("status", 429), ("status", 503)]
    judge = make_judge(endpoint, max_retries=2)
    assert judge.judge("Say hi.", "", "GOOD hi") == 1.0
    assert len(endpoint.requests) == 3
    endpoint.script = [("status", 429)]
    with pytest.raises(JudgeError, match="failed"):
        make_judge(endpoint, max_retries=0).judge("Say hi.", "", "GOOD again")


def test_malformed_replies(endpoint):
    endpoint.script = [("reply", "Perhaps, hard to say")]
    judge = make_judge(endpoint)
    with pytest.warns(UserWarning):
        assert judge.judge("Say hi.", "", "GOOD hi") == 0.0
    assert judge.judge("Say hi.", "", "GOOD hi") == 1.0  # an unclear verdict is not cached
    endpoint.script = [("raw", b"this is not json")]
    with pytest.raises(JudgeError, match="failed"):
        judge.judge("Say hi.", "", "GOOD other")


def test_timeout_is_a_clear_error(endpoint):
    endpoint.script = [("sleep", 1.0)]
    with pytest.raises(JudgeError, match="(?i)timed out|timeout"):
        make_judge(endpoint, timeout=0.2).judge("Say hi.", "", "GOOD slow")
