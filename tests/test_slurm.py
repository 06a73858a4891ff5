"""The SLURM profile (workflow/profiles/slurm): it names every rule and every rule's resources
resolve in a dry run; on a real single-node cluster (workflow/profiles/slurm/local-cluster.sh)
the smoke suite run through snakemake-executor-plugin-slurm gives exactly the metrics of a local
run, and a training job sent SIGTERM by SLURM is retried and resumes from its checkpoint.

The cluster tests are slow (on 2 busy cores: ~14 min for the smoke suite, a local run then ~40
SLURM jobs; ~2 min for the SIGTERM test). They run when a SLURM node is up
(`local-cluster.sh status`), or with ARCHBENCH_TEST_SLURM=1, which starts the local cluster
(root, Debian) and stops it afterwards.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yte
from conftest import add_kill_test, copy_project

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "workflow/profiles/slurm"
LOCAL_CLUSTER = PROFILE / "local-cluster.sh"
# The rules whose jobs request `gpu=1` in the gpu suite.
COMPUTE_RULES = {"train", "evaluate_perplexity", "leak_check", "lm_eval", "evaluate_task"}
TIMING = ("time", "seconds", "tokens_per_s")
# Without an accounting database `sacct` fails and the executor would never see a job finish.
LOCAL_CLUSTER_ARGS = (
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "5",
)

needs_plugin = pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[cluster]')",
)


def _rule_blocks() -> dict[str, str]:
    """{rule name: its text up to the next top-level statement} of every rule of the workflow."""
    sources = [ROOT / "Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))]
    text = "\n".join(path.read_text(encoding="utf-8") for path in sources)
    return dict(re.findall(r"^rule (\w+):\n((?:[ \t].*\n|\n)*)", text, re.MULTILINE))


def workflow_rules() -> set[str]:
    """Every rule that the executor submits as a job: not `all`, which only collects targets
    (no rule runs in Snakemake's own process: `localrule` is used nowhere)."""
    assert not any("localrule" in block for block in _rule_blocks().values())
    return set(_rule_blocks()) - {"all"}


def snakemake_command(*args: str, suite: str = "smoke") -> list[str]:
    """The snakemake command line for `suite`."""
    return [sys.executable, "-m", "snakemake", "--config", f"suite={suite}", *args]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without ARCHBENCH_SLURM_* settings or a data mirror, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ARCHBENCH_SLURM_") and k != "ARCHBENCH_DATA_MIRROR"
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, **(extra or {})}


def snakemake(
    project: Path,
    *args: str,
    suite: str = "smoke",
    env: dict[str, str] | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Run snakemake on `suite` in `project`; ARCHBENCH_SLURM_* settings only from `env`."""
    return subprocess.run(
        snakemake_command(*args, suite=suite),
        cwd=project,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def planned_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry run prints, but `all`'s."""
    jobs = []
    for block in re.split(r"^\[.*\]$", output, flags=re.MULTILINE):
        rule = re.search(r"^rule (\w+):", block, re.MULTILINE)
        resources = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if rule and resources and rule[1] != "all":
            pairs = (item.split("=", 1) for item in resources[1].split(", "))
            jobs.append((rule[1], dict(pairs)))
    return jobs


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project for dry runs."""
    return copy_project(tmp_path_factory.mktemp("slurm") / "project")


def test_profile_sets_resources_for_every_rule() -> None:
    with open(PROFILE / "config.yaml", encoding="utf-8") as handle:
        profile = yte.process_yaml(handle, require_use_yte=True)
    assert set(profile["set-resources"]) == workflow_rules()
    for rule, resources in profile["set-resources"].items():
        assert {"runtime", "mem_mb"} <= set(resources), rule


@needs_plugin
@pytest.mark.parametrize(("flag", "suite"), [("--profile", "smoke"), ("--workflow-profile", "gpu")])
def test_dry_run_resolves_every_rules_resources(project: Path, flag: str, suite: str) -> None:
    result = snakemake(project, flag, str(PROFILE), "--dry-run", suite=suite)
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = planned_resources(result.stdout + result.stderr)
    assert {rule for rule, _ in jobs} == workflow_rules()
    for rule, resources in jobs:
        assert int(resources["mem_mb"]) >= 1000, (rule, resources)
        assert int(resources["runtime"]) >= 10, (rule, resources)
        unset = {"slurm_partition", "slurm_account", "gres", "constraint"}
        assert not unset & set(resources), (rule, resources)
        # The plugin turns `gpu=1` into `--gpus=1`: only the gpu suite's computing jobs ask.
        wants_gpu = suite == "gpu" and rule in COMPUTE_RULES
        assert int(resources.get("gpu", 0)) == wants_gpu, (rule, resources)
        if rule == "train":
            assert resources["runtime"] == "240" and resources["mem_mb"] == "8000"
            assert resources["slurm_extra"] == "--signal=TERM@120"


@needs_plugin
def test_cluster_settings_come_from_the_environment(project: Path) -> None:
    env = {
        "ARCHBENCH_SLURM_PARTITION": "all",  # a Python builtin's name: must stay a string
        "ARCHBENCH_SLURM_ACCOUNT": "proj42",
        "ARCHBENCH_SLURM_GPU_PARTITION": "gpu",
        "ARCHBENCH_SLURM_GPU_GRES": "shard:1",
        "ARCHBENCH_SLURM_GPU_CONSTRAINT": "a100&nvlink",
        "ARCHBENCH_SLURM_TRAIN_RUNTIME": "90",
        "ARCHBENCH_SLURM_TRAIN_MEM_MB": "16000",
    }
    result = snakemake(
        project, "--workflow-profile", str(PROFILE), "--dry-run", suite="gpu", env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    jobs = planned_resources(result.stdout + result.stderr)
    assert {rule for rule, _ in jobs} == workflow_rules()
    for rule, resources in jobs:
        assert resources["slurm_account"] == "proj42"
        if rule in COMPUTE_RULES:  # the shard replaces `--gpus=1`
            assert resources["slurm_partition"] == "gpu"
            assert resources["gres"] == "shard:1" and resources["gpu"] == "0"
            assert resources["constraint"] == "a100&nvlink"
        else:
            assert resources["slurm_partition"] == "all"
            assert not {"gres", "constraint"} & set(resources)
        if rule == "train":
            assert (resources["runtime"], resources["mem_mb"]) == ("90", "16000")


@needs_plugin
@pytest.mark.parametrize(
    "variable", ["ARCHBENCH_SLURM_TRAIN_RUNTIME", "ARCHBENCH_SLURM_TRAIN_MEM_MB"]
)
def test_a_limit_that_is_not_a_whole_number_is_named(project: Path, variable: str) -> None:
    result = snakemake(
        project, "--workflow-profile", str(PROFILE), "--dry-run", env={variable: "4h"}
    )
    assert result.returncode != 0
    assert f"{variable}='4h' must be a whole number" in result.stderr
    assert "usage:" not in result.stderr  # the message alone, not Snakemake's argument help


def cluster_is_up() -> bool:
    """Whether `local-cluster.sh status` finds a usable SLURM node."""
    if shutil.which("sinfo") is None:
        return False
    status = subprocess.run([LOCAL_CLUSTER, "status"], capture_output=True, timeout=60)
    return status.returncode == 0


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    """A usable SLURM node: the one already up, or a local one started (and stopped) here."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed")
    if cluster_is_up():
        yield
        return
    if os.environ.get("ARCHBENCH_TEST_SLURM") != "1":
        pytest.skip("no SLURM node is up (set ARCHBENCH_TEST_SLURM=1 to start a local one)")
    subprocess.run([LOCAL_CLUSTER, "start"], check=True, timeout=600)
    try:
        yield
    finally:
        subprocess.run([LOCAL_CLUSTER, "stop"], check=True, timeout=120)


def quality_metrics(project: Path) -> dict[tuple[str, str, str], float]:
    """{(experiment, seed, metric): value} of summary.csv without the timing metrics."""
    with open(project / "results/smoke/summary.csv", newline="") as handle:
        return {
            (row["experiment"], row["seed"], row["metric"]): float(row["value"])
            for row in csv.DictReader(handle)
            if not any(word in row["metric"] for word in TIMING)
        }


@pytest.mark.slow
def test_smoke_suite_through_slurm_matches_a_local_run(slurm_cluster: None, tmp_path: Path) -> None:
    local = copy_project(tmp_path / "local")
    result = snakemake(local, "--cores", "2", timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]

    cluster = copy_project(tmp_path / "cluster")
    result = snakemake(
        cluster, "--workflow-profile", str(PROFILE), *LOCAL_CLUSTER_ARGS, timeout=2400
    )
    assert result.returncode == 0, result.stderr[-4000:]
    submitted = re.findall(r"submitted with SLURM jobid \d+", result.stdout + result.stderr)
    assert len(submitted) >= len(workflow_rules())

    expected, got = quality_metrics(local), quality_metrics(cluster)
    runs = {(experiment, seed) for experiment, seed, _ in expected}
    scored = {  # text runs have a val loss, synthetic-task runs an exact match
        (experiment, seed)
        for experiment, seed, metric in expected
        if metric == "val_loss" or metric.endswith("_exact_match")
    }
    assert len(runs) >= 4 and scored == runs
    assert got == expected
    assert (cluster / "report/smoke/index.html").stat().st_size > 0


def running_train_job() -> str | None:
    """SLURM id of a running `train` job of the executor (its comment names the rule)."""
    listing = subprocess.run(
        ["squeue", "--noheader", "--states=RUNNING", "--format=%i %k"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    ids = [line.split()[0] for line in listing.splitlines() if "rule_train" in line]
    return ids[0] if ids else None


@pytest.mark.slow
def test_sigterm_from_slurm_checkpoints_and_the_retry_resumes(
    slurm_cluster: None, tmp_path: Path
) -> None:
    project = copy_project(tmp_path / "project")
    add_kill_test(project)
    # no periodic checkpoint before the end: a resume can only be from the one SIGTERM saves
    suite = project / "configs/suites/killtest.yaml"
    suite.write_text(suite.read_text().replace("checkpoint_every: 50", "checkpoint_every: 1000"))
    command = snakemake_command(
        "experiments=killtest.tsv",
        "--workflow-profile",
        str(PROFILE),
        *LOCAL_CLUSTER_ARGS,
        suite="killtest",
    )
    run = project / "results/killtest/victim/seed0"
    with open(tmp_path / "snakemake.log", "w") as log:
        process = subprocess.Popen(command, cwd=project, env=clean_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 600
            job = None
            while time.monotonic() < deadline and process.poll() is None:
                partial = run / "metrics.partial.csv"  # two logged rows: well into training
                if partial.exists() and len(partial.read_text().splitlines()) >= 3:
                    job = running_train_job()
                    if job:
                        break
                time.sleep(0.5)
            assert job, "the training job never ran"
            # As at preemption or `--signal=TERM@120`: SIGTERM to the job's steps.
            subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=60)
            assert process.wait(timeout=900) == 0, (tmp_path / "snakemake.log").read_text()[-4000:]
        finally:
            if process.poll() is None:
                process.kill()
    train_log = (run / "train.log").read_text()
    resumed = re.search(r"resuming from \S+ at step (\d+)", train_log)
    assert resumed and 0 < int(resumed[1]) < 600, train_log[-2000:]
    assert json.loads((run / "train_summary.json").read_text())["train_steps"] == 600
    assert not (run / "checkpoint.safetensors").exists()
