"""The checked plan of one suite: every check that the workflow runs before its first job.

`plan_suite` is what both the Snakefile (`workflow/rules/common.smk`) and `archbench validate` call,
so the two cannot drift apart: the data sets, the suite, its rows of the experiments table, the
seeds and the validated run spec of every (experiment, seed) job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archbench.data import DatasetSpec, SyntheticSpec, parse_datasets
from archbench.experiments import (
    Experiment,
    Suite,
    check_run_fits_data,
    check_suite_datasets,
    check_suite_names,
    load_experiments,
    load_suite,
    run_seeds,
    run_spec,
    suite_rows,
)

SUITES_DIR = Path("configs/suites")


@dataclass(frozen=True)
class SuitePlan:
    """What a suite runs: its rows by name (table order), seeds and each job's run spec."""

    datasets: dict[str, DatasetSpec | SyntheticSpec]
    suite: Suite
    experiments: dict[str, Experiment]
    seeds: list[int]
    specs: dict[tuple[str, int], dict[str, Any]]

    def absent_baselines(self) -> list[tuple[str, str]]:
        """(row, baseline) for each baseline or sub-model baseline that does not run in this
        suite: the report lists those comparisons as not made."""
        return [
            (e.name, baseline)
            for e in self.experiments.values()
            for baseline in dict.fromkeys([e.baseline, *e.submodel_baselines.values()])
            if baseline and baseline not in self.experiments
        ]


def plan_suite(
    root: Path,
    config: dict[str, Any],
    schemas: Path,
    suite: str | None = None,
    config_source: str = "configs/config.yaml",
) -> SuitePlan:
    """Load and check the suite `suite` (default: the config's) with the experiments table and
    data sets that `config` (the workflow's config, schema-checked) names, paths relative to
    `root`. The config's `seeds` apply to the config's own suite; another suite runs its own.
    ConfigError (or DataError) on the first problem, naming its file and row."""
    name = suite or config["suite"]
    datasets = parse_datasets(config["datasets"], source=f"{config_source} (datasets)")
    suite_spec = load_suite(root / SUITES_DIR / f"{name}.yaml", schemas / "suite.schema.yaml")
    check_suite_datasets(suite_spec, datasets)
    table_path = root / config["experiments"]
    table = load_experiments(table_path, schemas / "experiments.schema.yaml", datasets)
    check_suite_names(table_path, table, root / SUITES_DIR)
    experiments = {e.name: e for e in suite_rows(table, suite_spec)}
    seeds = run_seeds(config.get("seeds") if name == config["suite"] else None, suite_spec)
    specs = {
        (row, seed): run_spec(e, suite_spec, seed)
        for row, e in experiments.items()
        for seed in seeds
    }
    for (row, _), spec in specs.items():  # a synthetic block holds an instance
        check_run_fits_data(experiments[row], spec, suite_spec.name, datasets)
    return SuitePlan(datasets, suite_spec, experiments, seeds, specs)
