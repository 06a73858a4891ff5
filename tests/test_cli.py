"""The `archbench` command: listings, validation and one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from archbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_options_lists_every_option_with_default(capsys: pytest.CaptureFixture) -> None:
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    assert "architecture `gpt`" in out and "training options" in out
    assert "| `n_kv_heads` | `0` |" in out and "swiglu \\| gelu" in out and "`token_budget`" in out


def test_validate_accepts_the_repository_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", "--root", str(ROOT)]) == 0
    assert "suite smoke:" in capsys.readouterr().out


def test_validate_refuses_a_misspelled_suite_in_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name in ("configs", "workflow"):
        shutil.copytree(ROOT / name, tmp_path / name)
    table = tmp_path / "configs/experiments.tsv"
    lines = table.read_text(encoding="utf-8").splitlines(keepends=True)
    row = next(i for i, line in enumerate(lines) if line.startswith("gpt_mqa\t"))
    lines[row] = lines[row].replace("\tsmoke,ablations,", "\tsmoke,ablation,", 1)
    table.write_text("".join(lines), encoding="utf-8")
    assert main(["validate", "--root", str(tmp_path)]) == 2
    assert "column 'suites': unknown suite 'ablation' (did you mean" in capsys.readouterr().err


def test_user_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["options", "gptt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "archbench: error: unknown architecture 'gptt' (did you mean 'gpt'?); registered: "
    )
    assert "registered: " in err and ", gpt, " in err
    assert "\n" not in err


def test_prepare_train_evaluate_by_hand(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    import json

    from conftest import tiny_spec

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--spec",
                json.dumps(tiny_spec()),
                "--data",
                str(tiny_data),
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(run),
                "--data",
                str(tiny_data),
                "--out",
                str(run / "eval.json"),
            ]
        )
        == 0
    )
    metrics = json.loads((run / "eval.json").read_text())
    assert 0 < metrics["val_bpb"] < 10 and metrics["val_tokens"] > 0
