"""Workflow checks on a fresh copy of the project (no smoke run needed first): bad input stops
before any job, every command fits in one argument, and a killed training job resumes. A file
apart from test_workflow.py, whose smoke run takes minutes, so that the two run side by side."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import add_kill_test, copy_project, smoke_snakemake
from safetensors.torch import load_file

from archbench.experiments import load_experiments, load_suite, run_spec
from archbench.runtime import pick_device

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the workflow and configs."""
    return copy_project(tmp_path_factory.mktemp("project"))


def test_a_large_suites_commands_fit_in_one_argument(project: Path) -> None:
    """Every shell command of the ablations suite at 10 seeds stays under Linux's 128 KiB limit
    on one argument (bash -c gets the whole command as one): the run list goes as a file."""
    seeds = "seeds=[" + ",".join(map(str, range(10))) + "]"
    dry = smoke_snakemake(project, "suite=ablations", seeds, "--dry-run", "--printshellcmds")
    assert dry.returncode == 0, dry.stderr[-4000:]
    commands = [line for line in dry.stdout.splitlines() if " -m archbench " in line]
    assert any(" aggregate --runs @results/ablations/runs.json " in c for c in commands)
    assert max(len(c.encode()) for c in commands) < 131_072


def test_a_bad_row_stops_before_any_job(project: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tsv"
    text = (project / "configs/experiments.tsv").read_text(encoding="utf-8")
    broken.write_text(text + "oops\tgpt\tshakespeare_char\tn_layer=-1\t\t\n", encoding="utf-8")
    result = smoke_snakemake(project, f"experiments={broken}", "--dry-run")
    assert result.returncode != 0
    line = len(text.splitlines()) + 1
    assert re.search(
        rf"line {line} \(experiment 'oops'\), column 'overrides': option "
        r"'n_layer': -1 is out of range",
        result.stderr + result.stdout,
    )


def test_kill_9_of_a_training_job_then_same_command_resumes(project: Path, tmp_path: Path) -> None:
    table = add_kill_test(project)
    args = ["--config", "suite=killtest", f"experiments={table}"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    process = subprocess.Popen(
        command,
        cwd=project,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = project / "results/killtest/victim/seed0"
    deadline = time.monotonic() + 300
    while not (run / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    trainers = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if "train" in p.cmdline() and "archbench" in p.cmdline()
    ]
    assert len(trainers) == 1, "no training job to kill"
    trainers[0].send_signal(signal.SIGKILL)
    assert process.wait(timeout=120) != 0  # snakemake reports the failed job and stops
    assert not (run / "model.safetensors").exists(), "training finished before the kill"

    rerun = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "resuming from" in (run / "train.log").read_text()

    experiment = load_experiments(
        table, project / "workflow/schemas/experiments.schema.yaml", ["shakespeare_char"]
    )[0]
    suite = load_suite(
        project / "configs/suites/killtest.yaml", project / "workflow/schemas/suite.schema.yaml"
    )
    reference = tmp_path / "reference"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "archbench",
            "train",
            "--spec",
            json.dumps(run_spec(experiment, suite, 0)),
            "--data",
            str(project / "results/data/shakespeare_char"),
            "--out",
            str(reference),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    a, b = load_file(reference / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = subprocess.run(
        [*command, "--dry-run"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_corrupt_data_file_stops_before_any_job(project: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror" / "tinyshakespeare"
    mirror.mkdir(parents=True)
    (mirror / "input.txt").write_text("not the real text\n")
    result = smoke_snakemake(project, f"data_mirror={mirror.parent}", "--dry-run")
    assert result.returncode != 0
    assert "sha256 mismatch for data set shakespeare_char" in result.stdout + result.stderr
    # the right text, but no BLiMP for the lm_eval jobs: also refused before any job
    with gzip.open(ROOT / "src/archbench/embedded/tinyshakespeare.txt.gz") as text:
        (mirror / "input.txt").write_bytes(text.read())
    result = smoke_snakemake(project, f"data_mirror={mirror.parent}", "--dry-run")
    assert result.returncode != 0
    assert "not found in the data mirror" in result.stdout + result.stderr
    assert "BLiMP paradigm" in result.stdout + result.stderr


@pytest.mark.skipif(
    pick_device("auto").type != "cpu", reason="this machine has a GPU: the warning is for none"
)
def test_a_gpu_suite_on_a_machine_without_a_gpu_warns_before_its_jobs(tmp_path: Path) -> None:
    """Run by this machine itself, the gpu suite would train on the CPU for hours: Snakemake
    says so when it starts; a CPU suite does not. (Only the data jobs run here.)"""
    warning = "archbench: warning: suite 'gpu' is meant for a GPU"
    for suite in ("smoke", "gpu"):
        started = smoke_snakemake(
            copy_project(tmp_path / suite), f"suite={suite}", "--until", "prepare_data"
        )
        assert started.returncode == 0, started.stderr[-4000:]
        assert (warning in started.stderr) == (suite == "gpu")
