"""The README's option tables are the ones `archbench options` prints today."""

from __future__ import annotations

from pathlib import Path

import pytest

from archbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_options_table_is_current(capsys: pytest.CaptureFixture) -> None:
    main(["options"])
    table = capsys.readouterr().out.strip()
    assert table in (ROOT / "README.md").read_text(encoding="utf-8"), (
        "README is out of date: paste the output of `archbench options` into it"
    )
