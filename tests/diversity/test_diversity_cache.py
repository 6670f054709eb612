"""JSONL pool store: atomic appends, torn-line repair, locking, and resuming interrupted runs."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from openai_stub import FakeLLM, StubServer

from kpig_trainer.data import DataError, Instance, Task
from kpig_trainer.diversity import DiversityClient, HeuristicBackend, diversify, load_pools, pool_path, read_pool
from kpig_trainer.diversity.cache import PoolFile

KEY_ENV = "KPIG_TEST_STUB_KEY"
DEFINITION = (
    "In this task, you are given a short story. Your job is to write a title for it. "
    "The title must have less than five words."
)


def make_task(name="story_titles"):
    return Task(
        name=name,
        category="Title Generation",
        definition=DEFINITION,
        key_parts=["write a title for it", "The title must have less than five words"],
        instances=[Instance("0", name, "", "Tom lost his dog. He found it.", ["Lost dog"])],
    )


def entry(k):
    return {
        "instruction": f"Instruction number {k}.",
        "key_parts": [f"number {k}"],
        "strategy": "test",
        "parent": None,
        "model": "m",
        "timestamp": "t",
    }


def lines_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_complete_pool(directory, task, size, before=""):
    """Exactly ``size`` unique entries, and the file still starts with what it held before."""
    text = pool_path(directory, task).read_text(encoding="utf-8")
    assert text.startswith(before)
    entries = lines_of(pool_path(directory, task))
    assert len(entries) == size
    assert len({e["instruction"] for e in entries}) == size
    assert entries[0]["strategy"] == "seed"


def test_append_writes_whole_lines(tmp_path):
    with PoolFile(tmp_path, "a/b task") as pool:
        for k in range(3):
            pool.append(entry(k))
        assert len(pool.entries) == 3
    path = pool_path(tmp_path, "a/b task")
    assert path.name == "a_b_task.jsonl"
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 3
    assert [e["task"] for e in lines_of(path)] == ["a/b task"] * 3
    assert list(load_pools(tmp_path)) == ["a/b task"]  # keyed by the entries' task, not the file name
    with pytest.raises(ValueError, match="key_parts"):
        PoolFile(tmp_path, "x").append({"instruction": "x", "key_parts": "not a list"})


def test_torn_last_line_is_dropped_with_a_warning_and_repaired(tmp_path, caplog):
    path = pool_path(tmp_path, "t")
    good = "".join(json.dumps({"task": "t", **entry(k)}) + "\n" for k in range(3))
    path.write_text(good + '{"task": "t", "instruction": "Instr', encoding="utf-8")
    assert len(load_pools(tmp_path)["t"]) == 3  # readers skip it ...
    assert path.read_text(encoding="utf-8").endswith('"Instr')  # ... without touching the file
    with caplog.at_level(logging.WARNING, logger="kpig_trainer.diversity.cache"):
        with PoolFile(tmp_path, "t") as pool:
            assert len(pool.entries) == 3
            pool.append(entry(3))
    assert "line 4 is incomplete or corrupt" in caplog.text
    assert path.read_text(encoding="utf-8") == good + json.dumps({"task": "t", **entry(3)}) + "\n"


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = pool_path(tmp_path, "t")
    path.write_text(json.dumps(entry(0)) + "\n" + json.dumps(entry(1)), encoding="utf-8")
    with PoolFile(tmp_path, "t") as pool:
        assert len(pool.entries) == 2
        pool.append(entry(2))
    assert [e["instruction"] for e in lines_of(path)] == [f"Instruction number {k}." for k in range(3)]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = pool_path(tmp_path, "t")
    path.write_text(json.dumps(entry(0)) + "\nnot json\n" + json.dumps(entry(1)) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t.jsonl: line 2: corrupt pool entry"):
        read_pool(path, repair=True)
    for _ in range(2):  # the failed open released its lock: the same error again, not "another run"
        with pytest.raises(DataError, match="corrupt pool entry"):
            PoolFile(tmp_path, "t")


def test_a_pool_has_one_writer_at_a_time(tmp_path):
    with PoolFile(tmp_path, "t"):
        with pytest.raises(DataError, match="another diversify run is writing"):
            PoolFile(tmp_path, "t")
    PoolFile(tmp_path, "t").close()  # free again


def test_pool_from_another_seed_is_refused(tmp_path):
    with PoolFile(tmp_path, "story_titles") as pool:
        pool.append({**entry(0), "strategy": "seed"})
    summary = diversify([make_task()], pool_size=3, cache_dir=tmp_path, progress=False)
    result = summary.tasks["story_titles"]
    assert result.status == "error" and "another seed instruction" in result.message


def test_resume_after_an_interrupt_never_duplicates_or_loses(tmp_path, monkeypatch):
    real_evolve = HeuristicBackend.evolve
    calls = {"n": 0}

    def evolve_then_crash(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_evolve(self, *args)

    monkeypatch.setattr(HeuristicBackend, "evolve", evolve_then_crash)
    with pytest.raises(KeyboardInterrupt):
        diversify([make_task()], pool_size=12, cache_dir=tmp_path, progress=False)
    before = pool_path(tmp_path, "story_titles").read_text(encoding="utf-8")
    kept = len(before.splitlines())
    assert 2 <= kept <= 7  # the seed and the accepted answers of the first 6 calls

    summary = diversify([make_task()], pool_size=12, cache_dir=tmp_path, progress=False)
    assert summary.tasks["story_titles"].existing == kept and summary.tasks["story_titles"].added == 12 - kept
    assert_complete_pool(tmp_path, "story_titles", 12, before)
    again = diversify([make_task()], pool_size=12, cache_dir=tmp_path, progress=False)
    assert again.tasks["story_titles"].added == 0 and again.tasks["story_titles"].attempts == 0
    assert_complete_pool(tmp_path, "story_titles", 12, before)


_CHILD = """
import sys
from kpig_trainer.data import Instance, Task
from kpig_trainer.diversity import DiversityClient, diversify
url, out, definition = sys.argv[1:4]
task = Task(name="story_titles", category="c", definition=definition,
            instances=[Instance("0", "story_titles", "", "a story", ["A title"])])
client = DiversityClient(url, "stub-model", api_key_env="KPIG_TEST_STUB_KEY", timeout=60, max_attempts=1)
diversify([task], pool_size=10, client=client, cache_dir=out, progress=False)
"""


def test_resume_after_the_process_is_killed(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    release = threading.Event()
    fake = FakeLLM()

    def hang_at_8(prompt, n):  # the 8th request never answers until the child is dead
        if n == 8:
            release.wait(20)
        return fake(prompt, n)

    with StubServer(hang_at_8) as server:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, server.base_url, str(tmp_path), DEFINITION],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while server.requests < 8 and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.requests >= 8, child.stderr.read().decode() if child.poll() is not None else "timeout"
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            release.set()
            if child.poll() is None:
                child.kill()
            child.stderr.close()
    path = pool_path(tmp_path, "story_titles")
    before = path.read_text(encoding="utf-8")
    kept = len(lines_of(path))
    assert kept >= 3  # seed + accepted entries of the 7 answered requests

    # A crash in the middle of a write leaves a torn line: the resumed run repairs it.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"task": "story_titles", "instruction": "half a li')
    task = Task(
        name="story_titles",
        category="c",
        definition=DEFINITION,
        instances=[Instance("0", "story_titles", "", "a story", ["A title"])],
    )
    with StubServer(FakeLLM()) as server:
        client = DiversityClient(server.base_url, "stub-model", api_key_env=KEY_ENV, sleep=lambda s: None)
        summary = diversify([task], pool_size=10, client=client, cache_dir=tmp_path, progress=False)
    assert summary.tasks["story_titles"].existing == kept
    assert_complete_pool(tmp_path, "story_titles", 10, before)
    assert "half a li" not in path.read_text(encoding="utf-8")
