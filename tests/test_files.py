"""write_atomic: a reader sees the old file or the new one, never half of one."""

import os

import pytest

from minilm.files import write_atomic


def test_writes_text_and_bytes_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    write_atomic(path, "ünïcode\n")
    assert path.read_text(encoding="utf-8") == "ünïcode\n"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_failed_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_atomic(path, "new\n" * 1000)
    assert path.read_text() == "old\n"
