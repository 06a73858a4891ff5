"""Summary statistics over seeds: means with two-sided Student-t confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import polars as pl
from scipy import stats as sps

from archbench.errors import ArchbenchError, ConfigError

SUMMARY_STATS_SCHEMA = pl.Schema(
    {
        "experiment": pl.String,
        "arch": pl.String,
        "dataset": pl.String,
        "metric": pl.String,
        "n": pl.Int64,
        "mean": pl.Float64,
        "sd": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "half_width": pl.Float64,
    }
)


def t_half_width(sd: float, n: int, confidence: float = 0.95) -> float:
    """Half-width of the two-sided t-interval for a mean of `n` values with sample sd `sd`."""
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n < 2:
        return math.nan
    quantile = float(sps.t.ppf(0.5 + confidence / 2.0, n - 1))
    return quantile * sd / math.sqrt(n)


def _describe(values: Iterable[float | None], confidence: float) -> tuple[float, float, float, int]:
    """Mean, sample sd, t half-width and count of the non-NaN, non-null values."""
    array = np.asarray(list(values), dtype=float)
    array = array[~np.isnan(array)]
    n = int(array.size)
    mean = float(array.mean()) if n else math.nan
    sd = float(array.std(ddof=1)) if n > 1 else math.nan
    return mean, sd, t_half_width(sd, n, confidence), n


def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> tuple[float, float, int]:
    """Return (mean, half-width of the two-sided t-interval, n), ignoring NaN and None.

    The half-width is NaN when fewer than two values remain; the mean is NaN when none do.
    """
    mean, _, half_width, n = _describe(values, confidence)
    return mean, half_width, n


def _check_one_arch_per_experiment(summary: pl.DataFrame) -> None:
    """Raise when an experiment's rows disagree on its architecture or data set."""
    counts = summary.group_by("experiment").agg(pl.col("arch", "dataset").n_unique())
    bad = counts.filter((pl.col("arch") > 1) | (pl.col("dataset") > 1))["experiment"]
    if len(bad):
        raise ArchbenchError(f"experiments with several arch/dataset values: {sorted(bad)}")


def summarize(summary: pl.DataFrame, confidence: float = 0.95) -> pl.DataFrame:
    """Reduce a long summary table (one row per experiment × seed × metric) over seeds.

    Returns one row per (experiment, metric), sorted by both, with columns experiment, arch,
    dataset, metric, n, mean, sd, ci_low, ci_high, half_width; NaN values are ignored.
    """
    missing = {"experiment", "arch", "dataset", "metric", "value"} - set(summary.columns)
    if missing:
        raise ArchbenchError(f"summary table lacks columns {sorted(missing)}")
    _check_one_arch_per_experiment(summary)
    keys = ["experiment", "arch", "dataset", "metric"]
    groups = summary.group_by(keys).agg(pl.col("value")).sort(keys)
    rows = []
    for experiment, arch, dataset, metric, values in groups.iter_rows():
        mean, sd, half_width, n = _describe(values, confidence)
        low, high = mean - half_width, mean + half_width
        rows.append((experiment, arch, dataset, metric, n, mean, sd, low, high, half_width))
    return pl.DataFrame(rows, schema=SUMMARY_STATS_SCHEMA, orient="row")
