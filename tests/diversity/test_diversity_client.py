"""DiversityClient: the real `openai` client against a scripted server on 127.0.0.1."""

import pytest
from openai_stub import Reply, StubServer

from kpig_trainer.diversity import (
    DiversityClient,
    DiversityError,
    EndpointError,
    EndpointUnavailable,
    RequestRejected,
    RunStopped,
)

KEY_ENV = "KPIG_TEST_STUB_KEY"


@pytest.fixture(autouse=True)
def stub_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def make_client(server, sleeps=None, **kwargs):
    """A client with backoff delays recorded instead of slept."""
    options = {
        "api_key_env": KEY_ENV,
        "timeout": 5.0,
        "max_attempts": 4,
        "backoff_base": 0.01,
        "sleep": (sleeps.append if sleeps is not None else lambda s: None),
        "seed": 0,
    }
    options.update(kwargs)
    return DiversityClient(server.base_url, "stub-model", **options)


def script(*replies):
    """Responder returning the given replies in order, then 'done'."""
    replies = list(replies)
    return lambda prompt, n: replies[n - 1] if n <= len(replies) else Reply("done")


def test_answer_and_token_counters():
    with StubServer(script(Reply("hello there"))) as server:
        client = make_client(server)
        assert client.chat("one two three") == "hello there"
        assert client.chat("four five") == "done"
    stats = client.stats()
    assert stats["requests"] == 2 and stats["retries"] == 0 and stats["failed_requests"] == 0
    assert stats["prompt_tokens"] == 3 + 2
    assert stats["completion_tokens"] == 2 + 1


def test_429_then_success_honours_retry_after():
    sleeps = []
    with StubServer(script(Reply(status=429, headers={"Retry-After": "7"}), Reply("ok"))) as server:
        client = make_client(server, sleeps)
        assert client.chat("hi") == "ok"
        assert server.requests == 2
    assert client.stats()["retries"] == 1
    assert sleeps == [pytest.approx(7.0)]  # the server's wait, not our 0.01 s backoff


def test_retry_after_ms_and_cap():
    sleeps = []
    replies = (
        Reply(status=429, headers={"retry-after-ms": "250"}),
        Reply(status=503, headers={"Retry-After": "9999"}),
        Reply("ok"),
    )
    with StubServer(script(*replies)) as server:
        assert make_client(server, sleeps, retry_after_max=3.0).chat("hi") == "ok"
    assert sleeps[0] == pytest.approx(0.25)
    assert sleeps[1] == pytest.approx(3.0)


def test_500s_are_retried_with_growing_backoff():
    sleeps = []
    with StubServer(script(Reply(status=500), Reply(status=502), Reply(status=500), Reply("finally"))) as server:
        client = make_client(server, sleeps, backoff_base=1.0, backoff_max=100.0)
        assert client.chat("hi") == "finally"
    assert client.stats()["retries"] == 3 and client.stats()["failed_requests"] == 3
    # attempt k waits base * 2**(k-1) scaled by a jitter factor in [0.5, 1]
    for k, delay in enumerate(sleeps, start=1):
        assert 0.5 * 2 ** (k - 1) <= delay <= 2 ** (k - 1)


def test_persistent_500_gives_up_and_stops_the_run():
    with StubServer(lambda prompt, n: Reply(status=500)) as server:
        client = make_client(server, max_attempts=3)
        with pytest.raises(EndpointUnavailable, match="after 3 attempts") as info:
            client.chat("hi")
        assert server.requests == 3
    assert server.base_url in str(info.value) and "rerun" in str(info.value)
    assert client.stopped
    with pytest.raises(RunStopped):
        client.chat("again")


def test_timeout_is_retried():
    with StubServer(script(Reply("late", delay=3.0), Reply("on time"))) as server:
        client = make_client(server, timeout=1.0)
        assert client.chat("hi") == "on time"
    assert client.stats()["retries"] == 1


def test_connection_error_is_retried_then_fatal():
    with StubServer(script()) as server:
        url = server.base_url
    client = DiversityClient(url, "m", api_key_env=KEY_ENV, max_attempts=2, sleep=lambda s: None)
    with pytest.raises(EndpointUnavailable, match="APIConnectionError"):
        client.chat("nobody listens")
    assert client.stats()["retries"] == 1


@pytest.mark.parametrize("status, hint", [(401, "key was refused"), (403, "no access"), (404, "unknown model")])
def test_auth_and_not_found_fail_at_once_with_a_clear_message(status, hint):
    with StubServer(lambda prompt, n: Reply(status=status, error="nope")) as server:
        client = make_client(server)
        with pytest.raises(EndpointError) as info:
            client.chat("hi")
        assert server.requests == 1  # never retried
    message = str(info.value)
    for part in (f"HTTP {status}", hint, server.base_url, "stub-model", KEY_ENV, "nope"):
        assert part in message
    assert client.stopped and client.stats()["retries"] == 0


def test_bad_request_is_not_retried_and_does_not_stop():
    with StubServer(script(Reply(status=400, error="context too long"), Reply("fine"))) as server:
        client = make_client(server)
        with pytest.raises(RequestRejected, match="context too long"):
            client.chat("hi")
        assert client.chat("hi") == "fine"
    assert not client.stopped and client.stats()["retries"] == 0


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(DiversityError, match=KEY_ENV):
        DiversityClient("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)
