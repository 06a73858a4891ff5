"""archbench.io: atomic writes, and a write that leaves an unchanged file (and its mtime) alone."""

from __future__ import annotations

import os
from pathlib import Path

from archbench.io import write_text, write_text_if_changed


def test_a_file_is_rewritten_only_when_its_text_changes(tmp_path: Path) -> None:
    """The workflow's run lists drive jobs by their modification time: same text, same mtime."""
    path = tmp_path / "results" / "runs.json"
    assert write_text_if_changed(path, "[1]\n") and path.read_text() == "[1]\n"
    os.utime(path, (1_000_000, 1_000_000))
    assert not write_text_if_changed(path, "[1]\n")
    assert path.stat().st_mtime == 1_000_000
    assert write_text_if_changed(path, "[1, 2]\n") and path.read_text() == "[1, 2]\n"
    assert path.stat().st_mtime > 1_000_000


def test_an_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
