"""The Snakemake workflow end to end on the smoke suite, in a temporary copy of the project."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from conftest import copy_project, smoke_snakemake

NEW_ROW = "gpt_kv1_gelu\tgpt\tshakespeare_char\tn_kv_heads=1 mlp=gelu\tsmoke\t\tnew row\n"

pytestmark = pytest.mark.slow


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = dry_run_output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the workflow and configs that has run the smoke suite once."""
    root = copy_project(tmp_path_factory.mktemp("project"))
    planned = smoke_snakemake(root, "--dry-run")
    # rerun-incomplete and the other local defaults apply without a flag
    assert "workflow specific profile profiles/default" in planned.stderr
    counts = job_counts(planned.stdout + planned.stderr)
    assert counts["prepare_data"] == 1  # every row shares one tokenized copy of the data
    assert counts["prepare_synthetic"] == 2  # MQAR and path-star
    assert counts["evaluate_task"] == 4  # one baseline row per synthetic task, two seeds
    assert counts["train"] == counts["leak_check"] == counts["evaluate_perplexity"] + 4
    assert counts["evaluate_perplexity"] >= 2
    assert counts["lm_eval"] == 2 * counts["evaluate_perplexity"]  # BLiMP, rolling ppl per run
    result = smoke_snakemake(root)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def test_smoke_suite_produces_results_and_report(project: Path) -> None:
    with open(project / "results/smoke/summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"experiment", "seed", "metric", "value"} <= set(rows[0])
    synthetic = {"gpt_mqar", "gpt_path_star"}
    experiments = {r["experiment"] for r in rows}
    assert {"gpt", "gpt_mqa", "gpt_gelu"} | synthetic <= experiments
    text = experiments - synthetic
    val_bpb = [float(r["value"]) for r in rows if r["metric"] == "val_bpb"]
    assert len(val_bpb) == len(text) * 2 and all(0 < v < 10 for v in val_bpb)
    for experiment, task in (("gpt_mqar", "mqar"), ("gpt_path_star", "path_star")):
        for metric in (f"{task}_accuracy", f"{task}_token_accuracy", f"{task}_exact_match"):
            values = [
                float(r["value"])
                for r in rows
                if r["experiment"] == experiment and r["metric"] == metric
            ]
            assert len(values) == 2 and all(0 <= v <= 1 for v in values), metric
    assert any("seconds" in r["metric"] or "tokens_per_s" in r["metric"] for r in rows)
    for experiment in ("gpt", "gpt_mqar", "gpt_path_star"):  # DESIGN.md: every run has eval.json
        run = project / "results/smoke" / experiment / "seed0"
        for name in ("model.safetensors", "model_config.json", "metrics.csv", "eval.json"):
            assert (run / name).stat().st_size > 0
    assert "mqar_exact_match" in json.loads(
        (project / "results/smoke/gpt_mqar/seed1/eval.json").read_text()
    )
    assert not list((project / "results/smoke").glob("*/seed*/task.json"))
    passed = [float(r["value"]) for r in rows if r["metric"] == "leak_check_passed"]
    assert passed == [1.0] * len(experiments) * 2
    rows_run = {e for e in text if "/" not in e}  # sub-model entries (fractal/L1.0) are no runs
    assert {"fractal/L1.0", "fractal/L2.3"} <= text - rows_run
    for metric in ("blimp_overall", "blimp_morphology", "lm_eval_rolling_bpb"):
        values = [float(r["value"]) for r in rows if r["metric"] == metric]
        assert len(values) == len(rows_run) * 2 and all(0 <= v < 10 for v in values), metric
    for name in ("index.md", "index.html", "figures/val_loss.png"):
        assert (project / "report/smoke" / name).stat().st_size > 0
    html = (project / "report/smoke/index.html").read_text()
    assert "gpt_mqa" in html and "path_star_exact_match" in html


def test_snakemakes_report_holds_the_report_page_figures_and_data(project: Path) -> None:
    out = project / "snakemake-report.html"
    result = smoke_snakemake(project, "--report", str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    page = out.read_text(encoding="utf-8")
    for mime, name in (("text/html", "index.html"), ("image/png", "val_loss.png"),
                       ("text/csv", "summary.csv"), ("text/csv", "curves.csv")):  # fmt: skip
        assert f"data:{mime};charset=utf8;filename={name};base64," in page, name
    # archbench's page inside it shows its figures without the figures/ directory beside it
    ours = (project / "report/smoke/index.html").read_text(encoding="utf-8")
    assert ours.count('<img src="data:image/png;base64,') == len(
        list((project / "report/smoke/figures").glob("*.png"))
    )


def test_the_report_gets_each_data_sets_defaults(project: Path) -> None:
    """defaults.json holds, by data set, the suite's model and train values (train_by_dataset
    applied) that the report places rows without an override by."""
    defaults = json.loads((project / "results/smoke/defaults.json").read_text())
    assert set(defaults) == {"shakespeare_char", "mqar", "path_star"}
    for values in defaults.values():
        assert values["d_model"] == 32 and values["token_budget"] == 10240


def test_nothing_reruns_when_nothing_changed(project: Path) -> None:
    result = smoke_snakemake(project, "--dry-run")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_data_sets_new_source_reruns_nothing(project: Path, tmp_path: Path) -> None:
    """A data set's url (or path, or embedded copy) says where its verified bytes come from, not
    what they are: changing it must not re-prepare the data and retrain every row on it."""
    source = 'datasets={"shakespeare_char": {"url": "https://example.org/elsewhere.txt"}}'
    result = smoke_snakemake(project, source, "--dry-run")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Nothing to be done" in result.stdout + result.stderr
    # an override of what the data is (its split; from a file, as --config gives strings) does
    override = tmp_path / "split.yaml"
    override.write_text("datasets:\n  shakespeare_char:\n    val_fraction: 0.2\n")
    changed = smoke_snakemake(project, "--configfile", str(override), "--dry-run")
    assert changed.returncode == 0, changed.stderr[-4000:]
    assert job_counts(changed.stdout + changed.stderr)["prepare_data"] == 1


@pytest.mark.parametrize(
    ("old", "new", "reruns", "keeps"),
    [
        ("blimp_limit: 2", "blimp_limit: 3", "lm_eval_blimp.json", "lm_eval_rolling_ppl.json"),
        (
            "rolling_max_tokens: 4096",
            "rolling_max_tokens: 2048",
            "lm_eval_rolling_ppl.json",
            "lm_eval_blimp.json",
        ),
    ],
)
def test_an_lm_eval_size_reruns_only_the_task_it_sizes(
    project: Path, old: str, new: str, reruns: str, keeps: str
) -> None:
    suite = project / "configs/suites/smoke.yaml"
    text = suite.read_text(encoding="utf-8")
    assert old in text
    try:
        suite.write_text(text.replace(old, new), encoding="utf-8")
        dry = smoke_snakemake(project, "--dry-run")
    finally:
        suite.write_text(text, encoding="utf-8")
    assert dry.returncode == 0, dry.stderr[-4000:]
    outputs = " ".join(re.findall(r"^\s*output: (.*)$", dry.stdout, re.MULTILINE))
    assert reruns in outputs and keeps not in outputs
    assert "train" not in job_counts(dry.stdout + dry.stderr)


def test_seeds_from_the_command_line_add_only_the_new_seeds_runs(project: Path) -> None:
    dry = smoke_snakemake(project, "seeds=[0,1,2]", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-4000:]
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts["train"] >= 3 and "seed=2" in dry.stdout
    assert "seed=0" not in dry.stdout and "seed=1" not in dry.stdout


def test_a_new_row_schedules_only_its_own_jobs_and_reaches_the_report(project: Path) -> None:
    """Also under the README's `--rerun-triggers mtime input code` (which ignores params): the
    run list that `aggregate` reads gains the new row when Snakemake reads the workflow."""
    with open(project / "configs/experiments.tsv", "a", encoding="utf-8") as handle:
        handle.write(NEW_ROW)
    expected = {
        "train": 2,
        "evaluate_perplexity": 2,
        "leak_check": 2,
        "lm_eval": 4,
        "sample": 1,
        "aggregate": 1,
        "report": 1,
        "all": 1,
    }
    triggers = ("--rerun-triggers", "mtime", "input", "code")
    for flags in ((), triggers):
        dry = smoke_snakemake(project, "--dry-run", *flags)
        assert dry.returncode == 0, dry.stderr[-4000:]
        assert job_counts(dry.stdout + dry.stderr) == expected, flags
        assert "gpt_kv1_gelu" in dry.stdout and "experiment=gpt_mqa" not in dry.stdout
    runs = json.loads((project / "results/smoke/runs.json").read_text())
    assert {run["experiment"] for run in runs} >= {"gpt_kv1_gelu", "gpt"}
    result = smoke_snakemake(project, *triggers)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gpt_kv1_gelu" in (project / "report/smoke/index.html").read_text()
    assert "gpt\\_kv1\\_gelu" in (project / "report/smoke/index.md").read_text()
