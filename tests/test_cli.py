"""The `archbench` command: listings, validation and one-line errors."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

import archbench
from archbench.cli import main
from archbench.runs import check_run_data
from archbench.train import train_run

ROOT = Path(__file__).resolve().parents[1]


def _project_copy(tmp_path: Path) -> Path:
    for name in ("configs", "workflow"):
        shutil.copytree(ROOT / name, tmp_path / name)
    return tmp_path


def test_options_lists_every_option_with_default(capsys: pytest.CaptureFixture) -> None:
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    assert "architecture `gpt`" in out and "training options" in out
    assert "| `n_kv_heads` | `0` |" in out and "swiglu \\| gelu" in out and "`token_budget`" in out


def test_version_names_the_package_and_torch(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == f"archbench {archbench.__version__} (torch {torch.__version__})\n"


def test_validate_accepts_the_repository_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", "--root", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert "suite smoke: 12 experiments x 2 seeds: ok" in out
    # smoke trains no parameter-matched baselines: validate says which comparisons it leaves out
    assert "do not run in suite smoke" in out and "futureformer -> gpt_m5" in out
    assert "do not run in suite default" not in out


def test_validate_outside_a_project_says_where_to_run_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["validate", "--root", str(tmp_path)]) == 2
    assert "is not an archbench project (no workflow/schemas)" in capsys.readouterr().err


def test_validate_refuses_a_misspelled_suite_in_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    table = _project_copy(tmp_path) / "configs/experiments.tsv"
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--spec", "{bad", "--data", "d", "--out", "o"],
            "argument --spec: not valid JSON",
        ),
        (
            ["evaluate", "--run", "r", "--data", "d", "--out", "o", "--threads", "0"],
            "0 is not >= 1",
        ),
        (
            ["evaluate", "--run", "r", "--data", "d", "--out", "o", "--max-tokens", "x"],
            "'x' is not",
        ),
        (
            [
                "lm-eval",
                "--run",
                "r",
                "--data",
                "d",
                "--out",
                "o",
                "--tasks",
                "blimp",
                "--limit",
                "0",
            ],
            "argument --limit: 0 is not >= 1",
        ),
        (["generate", "--run", "r", "--data", "d", "--top-k", "-1"], "--top-k: -1 is not >= 0"),
    ],
)
def test_malformed_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--spec", '{"experiment": "x", "arch": "gpt", "seed": 0, "model": {}}']
            + ["--data", "d", "--out", "o"],
            "--spec lacks dataset, train: a spec is a JSON object with the keys experiment, arch",
        ),
        (
            ["evaluate", "--run", "nowhere", "--data", "d", "--out", "o"],
            "nowhere is not a finished run directory (no model_config.json or model.safetensors)",
        ),
        (
            ["leakcheck", "--run", "r", "--data", "d", "--out", "o", "--device", "gpu0"],
            "device='gpu0' is not a device",
        ),
        (["generate", "--run", "r"], "r is not a finished run (no train_config.json)"),
        (
            ["generate", "--run", "r", "--data", "d", "--experiment", "gpt"],
            "either by --experiment",
        ),
        (["generate"], "name a run: --experiment NAME"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("path", "old", "new", "message"),
    [
        (
            "configs/config.yaml",
            "suite: default",
            "suite: defualt",
            "suite 'defualt' (did you mean 'default'?) has no file",
        ),
        (
            "configs/config.yaml",
            "suite: default",
            "suite: default\nseeds_typo: 1",
            "'seeds_typo' was unexpected) (did you mean 'seeds'?); known keys: suite, seeds,",
        ),
        (
            "configs/suites/gpu.yaml",
            "train_by_dataset:\n  mqar",
            "train_by_dataset:\n  mqarr",
            "mqarr",
        ),
        ("configs/config.yaml", "seeds: null", "seeds: [0, '0']", "seeds [0, 0]: a seed is listed"),
        (
            "configs/config.yaml",
            "experiments: configs/experiments.tsv",
            "experiments: nosuch.tsv",
            "no experiments table",
        ),
    ],
)
def test_validate_applies_the_workflows_config_checks(
    tmp_path: Path, path: str, old: str, new: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    root = _project_copy(tmp_path)
    text = (root / path).read_text(encoding="utf-8")
    assert old in text
    (root / path).write_text(text.replace(old, new, 1), encoding="utf-8")
    assert main(["validate", "--root", str(root)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--mirror", "--data-mirror"])
def test_lm_eval_takes_the_mirror_flag_that_prepare_takes(flag: str) -> None:
    from archbench.cli import build_parser

    common = ["--run", "r", "--data", "d", "--out", "o.json", "--tasks", "blimp"]
    args = build_parser().parse_args(["lm-eval", *common, flag, "/m"])
    assert args.mirror == "/m"
    assert build_parser().parse_args(["lm-eval", *common]).mirror is None


def test_json_arguments_can_come_from_a_file(tmp_path: Path) -> None:
    """The workflow passes long run lists as @file: inline they exceed Linux's 128 KiB limit on
    one argument."""
    from archbench.cli import json_value

    runs = [{"experiment": f"row{i}", "seed": i} for i in range(5000)]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs), encoding="utf-8")
    assert len(path.read_bytes()) > 131_072
    assert json_value(f"@{path}") == runs and json_value('{"a": 1}') == {"a": 1}
    with pytest.raises(argparse.ArgumentTypeError, match="cannot read"):
        json_value(f"@{tmp_path / 'missing.json'}")
    path.write_text("{", encoding="utf-8")
    with pytest.raises(argparse.ArgumentTypeError, match=f"not valid {path}"):
        json_value(f"@{path}")


@pytest.mark.parametrize("command", ["evaluate", "leakcheck", "sample", "lm-eval", "evaluate-task"])
def test_a_run_and_data_of_different_data_sets_are_refused(
    command: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Another data set's token ids mean other characters: scores on them would mean nothing."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text('{"dataset": "path_star"}', encoding="utf-8")
    args = [command, "--run", str(run), "--data", str(tiny_data), "--out", str(tmp_path / "o")]
    assert main([*args, *(["--tasks", "blimp"] if command == "lm-eval" else [])]) == 2
    err = capsys.readouterr().err
    assert f"run {run} belongs to data set 'path_star', but {tiny_data} holds 'tiny'" in err


def test_train_refuses_data_of_another_data_set(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = {**tiny_spec(), "dataset": "mqar"}
    args = ["train", "--spec", json.dumps(spec), "--data", str(tiny_data), "--out", str(tmp_path)]
    assert main([*args, "--no-progress"]) == 2
    assert "experiment 'tiny' belongs to data set 'mqar'" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`archbench options | head -3`: no BrokenPipeError traceback when the reader stops."""
    import subprocess
    import sys

    result = subprocess.run(
        f"{sys.executable} -m archbench options | head -3",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() and "Traceback" not in result.stderr, result.stderr


def test_snakemake_names_a_misspelled_config_key_in_one_line(tmp_path: Path) -> None:
    """Snakemake's own schema error prints the whole schema; the workflow's is one line."""
    project = _project_copy(tmp_path)
    shutil.copy(ROOT / "Snakefile", project)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", "suitee=smoke"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "key 'suitee': Additional properties are not allowed" in output
    assert "(did you mean 'suite'?)" in output and "Failed validating" not in output


def test_evaluate_refuses_a_synthetic_task_and_names_the_command_that_scores_it(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Perplexity over every token of a synthetic task (its random prompts too) would not compare
    with its training loss, which counts the answers only."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "instance_length": 25}))
    run = tmp_path / "run"
    train_run(tiny_spec(), tiny_data, run, show_progress=False)
    args = ["evaluate", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "e.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a synthetic task" in err and "archbench evaluate-task" in err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("command", ["evaluate", "leakcheck", "sample", "lm-eval", "evaluate-task"])
def test_a_run_and_another_preparation_of_its_data_set_are_refused(
    command: str, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The same data set prepared again with another validation fraction (or vocabulary, or
    source): the name matches, the token ids need not; entries added to meta.json are fine."""
    run, data = tmp_path / "run", tmp_path / "data"
    train_run(tiny_spec(), tiny_data, run, show_progress=False)
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "a_new_entry": 1}))
    check_run_data(run, data)
    (data / "meta.json").write_text(json.dumps({**meta, "val_fraction": 0.2}))
    args = [command, "--run", str(run), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, *(["--tasks", "blimp"] if command == "lm-eval" else [])]) == 2
    err = capsys.readouterr().err
    assert "trained on another preparation of data set 'tiny'" in err and "(val_fraction" in err


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ('{"a": 1}', "the run list must be a JSON list, not dict"),
        (
            "[1]",
            "run list entry 0: an object with keys experiment, arch, dataset, seed, run_dir "
            "expected",
        ),
        ('[{"bad": 1}]', "run list entry 0: 'experiment' missing or not a str"),
        (
            '[{"experiment": "g", "arch": "gpt", "dataset": "d", "seed": 0}]',
            "run list entry 0: 'run_dir' missing or not a str",
        ),
        (
            '[{"experiment": "g", "arch": "gpt", "dataset": "d", "seed": "0", "run_dir": "r"}]',
            "run list entry 0: 'seed' missing or not an int",
        ),
        (
            '[{"experiment": "g", "arch": "gpt", "dataset": "d", "seed": 0, "run_dir": "r", '
            '"result_files": "eval.json"}]',
            "run list entry 0: 'result_files' must be a list of file names",
        ),
    ],
)
def test_aggregate_names_a_malformed_run_list_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture, runs: str, message: str
) -> None:
    """A hand-written run list (README, "Run one job's command by hand") that lacks a key gets
    a one-line error naming the entry, not a KeyError traceback."""
    out = ["--summary", str(tmp_path / "s.csv"), "--curves", str(tmp_path / "c.csv")]
    assert main(["aggregate", "--runs", runs, *out]) == 2
    assert capsys.readouterr().err.strip() == f"archbench: error: {message}"
