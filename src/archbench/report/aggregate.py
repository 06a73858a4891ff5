"""Collect per-run result files into two long-format tables: summary.csv and curves.csv."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from archbench.errors import ArchbenchError
from archbench.io import atomic_path, read_json
from archbench.runs import RESULT_FILES

SUMMARY_SCHEMA = pl.Schema(
    {
        "experiment": pl.String,
        "arch": pl.String,
        "dataset": pl.String,
        "seed": pl.Int64,
        "metric": pl.String,
        "value": pl.Float64,
    }
)
CURVES_SCHEMA = pl.Schema(
    {
        "experiment": pl.String,
        "seed": pl.Int64,
        "step": pl.Int64,
        "tokens": pl.Int64,
        "metric": pl.String,
        "value": pl.Float64,
    }
)
CURVE_METRICS = ("train_loss", "val_loss", "lr")
_CURVE_INDEX = ["step", "tokens"]
_AUX_PREFIX = "train_"


@dataclass(frozen=True)
class RunRef:
    """One finished training run: its experiment row, seed and result directory."""

    experiment: str
    arch: str
    dataset: str
    seed: int
    run_dir: Path


def aggregate(runs: list[RunRef], summary_csv: Path, curves_csv: Path) -> None:
    """Write summary.csv (final metrics) and curves.csv (logged curves) for `runs`, long format.

    summary.csv: experiment, arch, dataset, seed, metric, value, from the RESULT_FILES of
    each run. curves.csv: experiment, seed, step, tokens, metric, value, from
    metrics.csv (train_loss, val_loss, lr and train_<aux> columns; empty cells dropped).
    Both are sorted by experiment, seed, metric (and step). A missing or corrupt input file
    raises ArchbenchError naming it.
    """
    if not runs:
        raise ArchbenchError("no runs to aggregate")
    _check_unique(runs)
    summary = pl.concat([_summary_rows(run) for run in runs])
    curves = pl.concat([_curve_rows(run) for run in runs])
    _write_csv(summary.sort(["experiment", "seed", "metric"], maintain_order=True), summary_csv)
    curves = curves.sort(["experiment", "seed", "metric", "step"], maintain_order=True)
    _write_csv(curves, curves_csv)


def read_summary(path: Path) -> pl.DataFrame:
    """Read a summary.csv written by `aggregate`, checking its columns and types."""
    return _read_table(Path(path), SUMMARY_SCHEMA)


def read_curves(path: Path) -> pl.DataFrame:
    """Read a curves.csv written by `aggregate`, checking its columns and types."""
    return _read_table(Path(path), CURVES_SCHEMA)


def _check_unique(runs: list[RunRef]) -> None:
    """Raise when two runs claim the same (experiment, seed)."""
    counts = Counter((run.experiment, run.seed) for run in runs)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    if duplicates:
        raise ArchbenchError(f"runs listed more than once (experiment, seed): {duplicates}")


def _require_file(path: Path) -> None:
    """Raise ArchbenchError when a result file is absent."""
    if not path.is_file():
        raise ArchbenchError(f"missing result file: {path}")


def _read_numbers(path: Path) -> dict[str, float]:
    """Read a flat JSON object and keep its numeric values (booleans and others are skipped)."""
    _require_file(path)
    try:
        obj = read_json(path)
    except (OSError, ValueError) as exc:
        raise ArchbenchError(f"corrupt result file {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ArchbenchError(f"corrupt result file {path}: expected a JSON object")
    return {
        str(key): float(value)
        for key, value in obj.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _summary_rows(run: RunRef) -> pl.DataFrame:
    """Long rows for the result files (RESULT_FILES) of one run."""
    metrics: dict[str, float] = {}
    for name in RESULT_FILES:
        numbers = _read_numbers(run.run_dir / name)
        clash = sorted(metrics.keys() & numbers.keys())
        if clash:
            raise ArchbenchError(f"{run.run_dir}: metrics {clash} appear in two result files")
        metrics |= numbers
    size = len(metrics)
    columns = {
        "experiment": [run.experiment] * size,
        "arch": [run.arch] * size,
        "dataset": [run.dataset] * size,
        "seed": [run.seed] * size,
        "metric": list(metrics),
        "value": list(metrics.values()),
    }
    return pl.DataFrame(columns, schema=SUMMARY_SCHEMA)


def _curve_columns(header: list[str], path: Path) -> list[str]:
    """The metric columns of a metrics.csv header; raise if a required column is absent."""
    missing = [name for name in (*_CURVE_INDEX, *CURVE_METRICS) if name not in header]
    if missing:
        raise ArchbenchError(f"corrupt result file {path}: missing columns {missing}")
    aux = [name for name in header if name.startswith(_AUX_PREFIX) and name not in CURVE_METRICS]
    return [*CURVE_METRICS, *aux]


def _curve_rows(run: RunRef) -> pl.DataFrame:
    """Long rows for one run's metrics.csv, without empty cells."""
    path = run.run_dir / "metrics.csv"
    _require_file(path)
    try:
        header = pl.scan_csv(path, infer_schema=False).collect_schema().names()
        metrics = _curve_columns(header, path)
        numeric = {name: pl.Float64 for name in (*_CURVE_INDEX, *metrics)}
        return (
            pl.scan_csv(path, infer_schema=False, schema_overrides=numeric)
            .select(*_CURVE_INDEX, *metrics)
            .unpivot(index=_CURVE_INDEX, variable_name="metric", value_name="value")
            .drop_nulls("value")
            .select(
                pl.lit(run.experiment, dtype=pl.String).alias("experiment"),
                pl.lit(run.seed, dtype=pl.Int64).alias("seed"),
                pl.col(_CURVE_INDEX).cast(pl.Int64),
                "metric",
                "value",
            )
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ArchbenchError(f"corrupt result file {path}: {exc}") from exc


def _write_csv(frame: pl.DataFrame, path: Path) -> None:
    """Atomically write `frame` as CSV."""
    with atomic_path(path) as tmp:
        frame.write_csv(tmp)


def _read_table(path: Path, schema: pl.Schema) -> pl.DataFrame:
    """Read a CSV whose header must equal `schema`'s names, cast to its types."""
    _require_file(path)
    try:
        frame = pl.read_csv(path, infer_schema=False)
        if frame.columns != list(schema):
            raise ArchbenchError(f"{path}: expected columns {list(schema)}, found {frame.columns}")
        return frame.cast(schema)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise ArchbenchError(f"corrupt table {path}: {exc}") from exc
