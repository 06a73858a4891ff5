"""Collect per-run result files into long-format tables (summary.csv, curves.csv) and samples.

The curves of all runs are read as one lazy polars query (one scan per metrics.csv, concatenated,
unpivoted and sorted in a single parallel collect); 1,000 runs take about a second or two
(benchmarks/aggregate_speed.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from archbench.errors import ArchbenchError
from archbench.io import atomic_path, read_json, write_json
from archbench.report.setup import SETUP_FLAGS
from archbench.report.submodels import entry_name, submodel_results
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
SAMPLES_FILE = "samples.json"
SAMPLE_TEXT_KEYS = ("prompt", "greedy", "sampled")


@dataclass(frozen=True)
class RunRef:
    """One finished training run: its experiment row, seed and result directory."""

    experiment: str
    arch: str
    dataset: str
    seed: int
    run_dir: Path
    result_files: tuple[str, ...] = RESULT_FILES  # flat JSON files of metrics in run_dir


RUN_KEYS = {"experiment": str, "arch": str, "dataset": str, "seed": int, "run_dir": str}


def run_refs(entries: object) -> list[RunRef]:
    """RunRefs from a decoded run list (results/<suite>/runs.json): a list of objects with the
    keys of RUN_KEYS and, optionally, `result_files` (a list of file names); an ArchbenchError
    names the first entry that is not."""
    if not isinstance(entries, list):
        raise ArchbenchError(f"the run list must be a JSON list, not {type(entries).__name__}")
    refs = []
    for i, entry in enumerate(entries):
        where = f"run list entry {i}"
        if not isinstance(entry, dict):
            raise ArchbenchError(f"{where}: an object with keys {', '.join(RUN_KEYS)} expected")
        for key, kind in RUN_KEYS.items():
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                article = "an" if kind is int else "a"
                raise ArchbenchError(f"{where}: '{key}' missing or not {article} {kind.__name__}")
        files = entry.get("result_files", list(RESULT_FILES))
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ArchbenchError(f"{where}: 'result_files' must be a list of file names")
        refs.append(
            RunRef(
                entry["experiment"],
                entry["arch"],
                entry["dataset"],
                entry["seed"],
                Path(entry["run_dir"]),
                tuple(files),
            )
        )
    return refs


def aggregate(
    runs: list[RunRef], summary_csv: Path, curves_csv: Path, samples_json: Path | None = None
) -> None:
    """Write summary.csv (final metrics) and curves.csv (logged curves) for `runs`, long format.

    summary.csv: experiment, arch, dataset, seed, metric, value, from the result files of
    each run (`RunRef.result_files`). curves.csv: experiment, seed, step, tokens, metric,
    value, from metrics.csv (train_loss, val_loss, lr and train_<aux> columns; empty cells dropped).
    Both are sorted by experiment, seed, metric (and step). With `samples_json`, the
    samples.json of every run that has one is collected there (see `collect_samples`).
    A missing or corrupt input file raises ArchbenchError naming it.
    """
    if not runs:
        raise ArchbenchError("no runs to aggregate")
    _check_unique(runs)
    summary = pl.concat([_summary_rows(run) for run in runs])
    curves = _collect_curves(runs)
    if samples_json is not None:
        collect_samples(runs, Path(samples_json))
    _write_csv(summary.sort(["experiment", "seed", "metric"], maintain_order=True), summary_csv)
    _write_csv(curves, curves_csv)


def collect_samples(runs: list[RunRef], out_json: Path) -> None:
    """Write one JSON list of the runs' generated samples (runs without samples.json skipped).

    Each entry is the run's samples.json object (written by `archbench.generate.write_samples`)
    with `experiment` and `seed` added; entries are sorted by experiment and seed.
    """
    entries = []
    for run in sorted(runs, key=lambda r: (r.experiment, r.seed)):
        path = run.run_dir / SAMPLES_FILE
        if not path.is_file():
            continue
        try:
            sample = read_json(path)
        except (OSError, ValueError) as exc:
            raise ArchbenchError(f"corrupt sample file {path}: {exc}") from exc
        if not isinstance(sample, dict) or not all(
            isinstance(sample.get(key), str) for key in SAMPLE_TEXT_KEYS
        ):
            raise ArchbenchError(
                f"corrupt sample file {path}: expected an object with text fields "
                f"{list(SAMPLE_TEXT_KEYS)}"
            )
        entries.append({**sample, "experiment": run.experiment, "seed": run.seed})
    write_json(out_json, entries)


def read_samples(path: Path | None) -> dict[str, dict]:
    """The sample of each experiment from a file written by `collect_samples` (lowest seed).

    Returns {} when `path` is None.
    """
    if path is None:
        return {}
    path = Path(path)
    _require_file(path)
    try:
        entries = read_json(path)
    except (OSError, ValueError) as exc:
        raise ArchbenchError(f"corrupt samples file {path}: {exc}") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ArchbenchError(f"corrupt samples file {path}: expected a list of objects")
    chosen: dict[str, dict] = {}
    for entry in sorted(entries, key=lambda e: (str(e.get("experiment")), e.get("seed", 0))):
        chosen.setdefault(str(entry.get("experiment")), entry)
    return chosen


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


def _read_result(path: Path) -> dict[str, Any]:
    """A result file's JSON object; ArchbenchError naming the file when absent or corrupt."""
    _require_file(path)
    try:
        obj = read_json(path)
    except (OSError, ValueError) as exc:
        raise ArchbenchError(f"corrupt result file {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ArchbenchError(f"corrupt result file {path}: expected a JSON object")
    return obj


def _numbers(obj: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a JSON object (booleans, strings and nested objects skipped)."""
    return {
        str(key): float(value)
        for key, value in obj.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _add_metrics(into: dict[str, float], numbers: dict[str, float], where: str) -> None:
    """Merge `numbers` into `into`; ArchbenchError when a metric is already there."""
    clash = sorted(into.keys() & numbers.keys())
    if clash:
        raise ArchbenchError(f"{where}: metrics {clash} appear in two result files")
    into |= numbers


def _summary_rows(run: RunRef) -> pl.DataFrame:
    """Long rows for the result files of one run, plus one entry `<experiment>/<sub-model>` per
    nested sub-model found under `submodels` in them (archbench.report.submodels), which also
    gets the run's setup flags (`bf16_autocast`, `trained_on_gpu`). Each file is read once."""
    entries: dict[str, dict[str, float]] = {run.experiment: {}}
    for name in run.result_files:
        path = run.run_dir / name
        result = _read_result(path)
        _add_metrics(entries[run.experiment], _numbers(result), str(run.run_dir))
        for submodel, values in submodel_results(result, path).items():
            entry = entries.setdefault(entry_name(run.experiment, submodel), {})
            _add_metrics(entry, _numbers(values), f"{run.run_dir}, sub-model {submodel}")
    for flag in SETUP_FLAGS:  # a sub-model trained in its run's precision, on its device
        value = entries[run.experiment].get(flag.metric)
        if value is not None:
            for metrics in entries.values():
                metrics.setdefault(flag.metric, value)
    return pl.concat([_long_rows(run, name, numbers) for name, numbers in entries.items()])


def _long_rows(run: RunRef, experiment: str, metrics: dict[str, float]) -> pl.DataFrame:
    """Long rows of one entry's metrics (the run's experiment or one of its sub-models)."""
    size = len(metrics)
    columns = {
        "experiment": [experiment] * size,
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


def _curve_header(run: RunRef) -> list[str]:
    """The header of one run's metrics.csv; raise ArchbenchError if it is missing or unreadable."""
    path = run.run_dir / "metrics.csv"
    _require_file(path)
    try:
        with open(path, encoding="utf-8") as handle:
            line = handle.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArchbenchError(f"corrupt result file {path}: {exc}") from exc
    header = line.rstrip("\r\n").split(",") if line.strip() else []
    if not header:
        raise ArchbenchError(f"corrupt result file {path}: empty file")
    return header


def _scan_curves(paths: list[Path], header: list[str], keys: pl.DataFrame) -> pl.LazyFrame:
    """The lazy query of long curve rows for metrics logs that share one `header`.

    All files are scanned together; `keys` maps each file's path to its experiment and seed.
    """
    metrics = _curve_columns(header, paths[0])
    numeric = {name: pl.Float64 for name in (*_CURVE_INDEX, *metrics)}
    return (
        pl.scan_csv(paths, infer_schema=False, schema_overrides=numeric, include_file_paths="path")
        .select("path", *_CURVE_INDEX, *metrics)
        .unpivot(index=["path", *_CURVE_INDEX], variable_name="metric", value_name="value")
        .drop_nulls("value")
        .join(keys.lazy(), on="path", how="left")
        .select("experiment", "seed", pl.col(_CURVE_INDEX).cast(pl.Int64), "metric", "value")
    )


def _collect_curves(runs: list[RunRef]) -> pl.DataFrame:
    """Read every run's metrics.csv in one lazy query (one multi-file scan per distinct header).

    When the combined query fails, each log is read alone to name the corrupt file.
    """
    groups: dict[tuple[str, ...], list[RunRef]] = {}
    for run in runs:
        groups.setdefault(tuple(_curve_header(run)), []).append(run)
    keys = pl.DataFrame(
        {
            "path": [str(run.run_dir / "metrics.csv") for run in runs],
            "experiment": [run.experiment for run in runs],
            "seed": [run.seed for run in runs],
        },
        schema={"path": pl.String, "experiment": pl.String, "seed": pl.Int64},
    )
    queries = {
        header: _scan_curves([run.run_dir / "metrics.csv" for run in group], list(header), keys)
        for header, group in groups.items()
    }
    try:
        curves = (
            pl.concat(list(queries.values()))
            .sort(["experiment", "seed", "metric", "step"], maintain_order=True)
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError):
        pass
    else:
        if curves["experiment"].null_count():
            raise ArchbenchError("internal error: a metrics log was not matched to its run")
        return curves
    for header, group in groups.items():
        for run in group:
            path = run.run_dir / "metrics.csv"
            try:
                _scan_curves([path], list(header), keys).collect()
            except (pl.exceptions.PolarsError, OSError) as exc:
                raise ArchbenchError(f"corrupt result file {path}: {exc}") from exc
    raise ArchbenchError("reading the metrics logs failed, but no single log fails alone")


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
