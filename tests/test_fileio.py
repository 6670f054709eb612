"""Atomic writes: files and folders are replaced whole, and a failed write leaves the old one."""

import pytest

from kpig_trainer.fileio import append_line, atomic_write, atomic_write_json, replace_directory


def test_replace_directory_swaps_whole_folders(tmp_path):
    final = tmp_path / "model"
    for version in ("v1", "v2"):
        new = tmp_path / f"new-{version}"
        new.mkdir()
        (new / "weights").write_text(version)
        replace_directory(new, final)
        assert (final / "weights").read_text() == version and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the moved-aside copy is gone


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"stage": 1})

    def broken(tmp):
        open(tmp, "w").write("{half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == '{\n  "stage": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_append_line_creates_the_folder_and_keeps_whole_lines(tmp_path):
    path = tmp_path / "logs" / "events.jsonl"
    append_line(path, '{"a": 1}')
    append_line(path, '{"b": "é"}')
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
