"""Pool growth through the real `openai` client and a scripted local server."""

import json

import pytest
from openai_stub import FakeLLM, Reply, StubServer, is_extraction, prompt_section

from kpig_trainer.data import Instance, Task
from kpig_trainer.diversity import DiversityClient, EndpointError, diversify, load_pools, pool_path

KEY_ENV = "KPIG_TEST_STUB_KEY"
ANNOTATED = Task(
    name="review_sentiment",
    category="Sentiment Analysis",
    definition="In this task, you are given a product review. Decide whether the review is positive. "
    'Answer with "Yes" or "No".',
    key_parts=["Decide whether the review is positive", 'Answer with "Yes" or "No"'],
    instances=[Instance(str(k), "review_sentiment", "", f"review {k}", ["Yes"]) for k in range(3)],
)


def plain_task(name):
    """A task without annotated key parts (its seed's key parts are extracted)."""
    definition = (
        f"You will read a sentence about {name}. Count the words in it. Reply with a single number and nothing else."
    )
    return Task(
        name=name, category="Counting", definition=definition, instances=[Instance("0", name, "", "a b c", ["3"])]
    )


@pytest.fixture(autouse=True)
def stub_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def client_for(server, **kwargs):
    options = {"api_key_env": KEY_ENV, "timeout": 5.0, "max_attempts": 3, "backoff_base": 0.0, "sleep": lambda s: None}
    options.update(kwargs)
    return DiversityClient(server.base_url, "stub-model", **options)


def read_lines(directory, task):
    return [json.loads(line) for line in pool_path(directory, task).read_text().splitlines()]


def test_pools_grow_to_size_with_valid_entries(tmp_path):
    tasks = [ANNOTATED, plain_task("cats"), plain_task("dogs")]
    with StubServer(FakeLLM()) as server:
        summary = diversify(
            tasks, pool_size=5, client=client_for(server), cache_dir=tmp_path, concurrency=2, progress=False
        )
    assert summary.complete and summary.model == "stub-model"
    assert summary.stats["requests"] == server.requests and summary.stats["retries"] == 0
    assert summary.stats["prompt_tokens"] > 0 and summary.stats["completion_tokens"] > 0
    pools = load_pools(tmp_path)
    assert set(pools) == {"review_sentiment", "cats", "dogs"}
    for task in tasks:
        entries = read_lines(tmp_path, task.name)
        assert len(entries) == 5 and summary.tasks[task.name].added == 5
        assert entries[0]["instruction"] == task.definition and entries[0]["strategy"] == "seed"
        assert entries[0]["parent"] is None
        assert len({e["instruction"] for e in entries}) == 5
        for index, entry in enumerate(entries[1:], start=1):
            assert 0 <= entry["parent"] < index and entry["model"] == "stub-model"
            assert entry["strategy"] in ("concretizing", "reasoning", "constraint", "breadth")
            assert entry["timestamp"] and entry["task"] == task.name
        for entry in entries:
            assert entry["key_parts"] and all(p in entry["instruction"] for p in entry["key_parts"])
        assert pools[task.name] == [{"instruction": e["instruction"], "key_parts": e["key_parts"]} for e in entries]
    seed = read_lines(tmp_path, "review_sentiment")[0]
    assert seed["key_parts"] == ANNOTATED.key_parts and seed["key_parts_by"] == "annotation"
    assert read_lines(tmp_path, "cats")[0]["key_parts_by"] == "stub-model"


def test_scripted_failures_are_rejected_counted_and_retried(tmp_path):
    """Invalid JSON, spans not in the instruction, empty answers, echoed markers, an unchanged
    instruction, a 429, a 500 and a timeout, in one run."""
    state = {"extract": 0, "evolve": 0}

    def script(prompt, n):
        if is_extraction(prompt):
            state["extract"] += 1
            if state["extract"] == 1:
                return Reply("I think the key parts are the counting bits.")  # invalid JSON
            if state["extract"] == 2:
                return Reply('```json\n["Count the words in it", "Summarise the sentence"]\n```')  # 1 bad span
            return None
        state["evolve"] += 1
        parent = prompt_section(prompt, "INSTRUCTION", "KEY PARTS")
        return {
            1: Reply(""),  # empty
            2: Reply(parent + '\n[KEY PARTS]\n["Count"]'),  # echoes the template
            3: Reply(f'"{parent}"'),  # unchanged (quoted)
            4: Reply(status=429, headers={"Retry-After": "0"}),  # retried
            6: Reply(status=500),  # retried
            8: Reply("late", delay=3.0),
        }.get(state["evolve"])  # timed out, retried

    with StubServer(FakeLLM(script)) as server:
        summary = diversify(
            [plain_task("birds")],
            pool_size=5,
            client=client_for(server, timeout=1.0),
            cache_dir=tmp_path,
            progress=False,
        )
    result = summary.tasks["birds"]
    assert result.status == "complete" and result.entries == 5
    assert dict(result.rejections) == {"empty": 1, "template_marker": 1, "unchanged": 1}
    assert summary.stats["invalid_json"] == 1
    assert summary.stats["key_parts_dropped"] == 1 and summary.stats["key_parts_dropped_not_in_instruction"] == 1
    assert summary.stats["retries"] == 3
    seed = read_lines(tmp_path, "birds")[0]
    assert seed["key_parts"] == ["Count the words in it"]
    for entry in read_lines(tmp_path, "birds"):
        assert "[KEY PARTS]" not in entry["instruction"] and entry["instruction"]


def test_breadth_must_keep_the_key_parts(tmp_path):
    calls = {"n": 0}

    def script(prompt, n):
        assert not is_extraction(prompt), "breadth reuses the parent's key parts: no extraction request"
        calls["n"] += 1
        if calls["n"] == 1:
            return Reply("Read the review and tell me how the customer feels, using Yes or No.")
        return None

    with StubServer(FakeLLM(script)) as server:
        summary = diversify(
            [ANNOTATED],
            pool_size=3,
            client=client_for(server),
            cache_dir=tmp_path,
            strategies=["breadth"],
            progress=False,
        )
    assert summary.tasks["review_sentiment"].rejections == {"lost_key_part": 1}
    for entry in read_lines(tmp_path, "review_sentiment"):
        assert entry["key_parts"] == ANNOTATED.key_parts


def test_no_key_parts_in_the_evolved_instruction_is_rejected(tmp_path):
    state = {"extract": 0}

    def script(prompt, n):
        if is_extraction(prompt):
            state["extract"] += 1
            if state["extract"] <= 2:  # both extraction attempts of the first evolved instruction
                return Reply('["a span that is nowhere"]')
        return None

    with StubServer(FakeLLM(script)) as server:
        summary = diversify(
            [ANNOTATED],
            pool_size=3,
            client=client_for(server),
            cache_dir=tmp_path,
            strategies=["constraint"],
            progress=False,
        )
    assert summary.tasks["review_sentiment"].rejections == {"no_key_parts": 1}
    assert summary.tasks["review_sentiment"].status == "complete"


def test_attempts_are_bounded_when_the_endpoint_repeats_itself(tmp_path):
    def script(prompt, n):
        return None if is_extraction(prompt) else Reply("Count the words. Reply with a number.")

    with StubServer(FakeLLM(script)) as server:
        summary = diversify(
            [plain_task("fish")],
            pool_size=6,
            client=client_for(server),
            cache_dir=tmp_path,
            strategies=["constraint"],
            max_attempts_per_entry=2,
            progress=False,
        )
        requests = server.requests
    result = summary.tasks["fish"]
    assert result.status == "incomplete" and not summary.complete
    assert result.attempts == 2 * 5 and result.entries == 2  # the seed and one accepted answer
    # the same answer again: "unchanged" when its parent is that answer, else "duplicate"
    assert sum(result.rejections.values()) == 9 and set(result.rejections) <= {"duplicate", "unchanged"}
    assert "gave up after 10 attempts with 2/6 entries" in result.message
    assert requests <= 1 + 10 + 1  # seed extraction, 10 evolutions, 1 extraction of the accepted one


def test_401_stops_all_workers_and_the_run_resumes(tmp_path):
    tasks = [plain_task(f"topic{k}") for k in range(4)]

    seen = {"topic0": 0}
    fake = FakeLLM()

    def script(prompt, n):
        if "topic0" in prompt:
            seen["topic0"] += 1
            return Reply(status=401, error="invalid api key") if seen["topic0"] >= 3 else None
        reply = fake(prompt, n)  # the other tasks are slow, so they are mid-pool at the 401
        reply.delay = 0.05
        return reply

    with StubServer(FakeLLM(script)) as server:
        with pytest.raises(EndpointError, match="HTTP 401") as info:
            diversify(tasks, pool_size=8, client=client_for(server), cache_dir=tmp_path, concurrency=4, progress=False)
    assert seen["topic0"] == 3  # the 401 is not retried
    summary = info.value.summary
    assert summary.tasks["topic0"].status == "error" and "invalid api key" in summary.tasks["topic0"].message
    for task in tasks[1:]:  # stopped by the switch, not by a 401 of their own
        assert summary.tasks[task.name].status == "stopped"
        assert summary.tasks[task.name].entries < 8
    before = {t.name: pool_path(tmp_path, t.name).read_text() for t in tasks}
    for task in tasks:
        assert len(read_lines(tmp_path, task.name)) == summary.tasks[task.name].entries

    with StubServer(FakeLLM()) as server:
        client = client_for(server)
        client.stop()  # a client stopped by an earlier run (Ctrl-C) is usable again
        summary = diversify(tasks, pool_size=8, client=client, cache_dir=tmp_path, progress=False)
        assert summary.stats["requests"] == server.requests
        again = diversify(tasks, pool_size=9, client=client, cache_dir=tmp_path, progress=False)
        assert again.stats["requests"] == server.requests - summary.stats["requests"]  # this run's share
    assert summary.complete and again.complete
    for task in tasks:
        text = pool_path(tmp_path, task.name).read_text()
        assert text.startswith(before[task.name])  # nothing lost or rewritten
        entries = read_lines(tmp_path, task.name)
        assert len(entries) == 9 and len({e["instruction"] for e in entries}) == 9
        assert summary.tasks[task.name].existing == len(before[task.name].splitlines())
        assert summary.tasks[task.name].entries == 8 and again.tasks[task.name].added == 1
