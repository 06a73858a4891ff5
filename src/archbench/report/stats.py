"""Statistics over seeds: t confidence intervals, tests against a baseline, Holm, and power.

Seeds are few (typically three), so every number here is exact for small samples: Student-t
intervals, Welch's and the paired t-test, Holm's step-down correction across a report's
comparisons, and power from the noncentral t distribution (not the normal approximation, which
at three seeds overstates what can be resolved by about a third).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import optimize
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


# ---------------------------------------------------------------- comparisons with a baseline

ALPHA = 0.05  # two-sided significance level after the Holm correction
POWER = 0.8  # the power at which minimum detectable effects and seed counts are quoted
MAX_SEEDS = 1000  # seed counts above this are reported as "more than MAX_SEEDS"
# A standard deviation of at most this fraction of the values' magnitude (at least 1) is float
# rounding, not seed-to-seed spread: metrics are float32 sums, and a frozen sub-model scored
# twice, or a constant per-seed shift, must not turn into p ~ 1e-30 on its last bits.
ROUNDING_SPREAD = 1e-6
PAIRED = "paired t"
WELCH = "Welch t"


@dataclass(frozen=True)
class Comparison:
    """A row against its baseline on one metric (row − baseline; NaN where undefined).

    `test` is the test whose p-value decides (PAIRED when both rows have the same seeds, at
    least two, or share at least three; else WELCH; "" when there are too few seeds);
    `p_welch` and `p_paired` are both kept. `mde` is the smallest |Δ| that test would detect
    with probability POWER at the level that `compare` was given, with the observed spread and
    seeds; `seeds_needed` is the seed count per row (pairs, when the paired test decides) at
    which the observed |Δ| would be detected with that power (inf when Δ = 0 or beyond
    MAX_SEEDS).
    """

    n_row: int
    n_base: int
    n_pairs: int
    delta: float
    half_width: float
    test: str
    p_value: float
    p_welch: float
    p_paired: float
    mde: float
    seeds_needed: float


def _finite(values: Iterable[float]) -> np.ndarray:
    """The finite values as a float array."""
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]


def rounding_spread(values: Iterable[float]) -> float:
    """The largest standard deviation of `values` (or of differences between them) that is
    float rounding rather than spread: ROUNDING_SPREAD × max(1, largest |value|)."""
    return ROUNDING_SPREAD * max([1.0, *(abs(v) for v in values)])


def welch_test(row: Iterable[float], base: Iterable[float]) -> tuple[float, float, float, float]:
    """Welch's unequal-variance t-test of mean(row) − mean(base).

    Returns (delta, p, standard error, Welch–Satterthwaite df); p, se and df are NaN with fewer
    than two values on either side, and p is NaN (se 0) when both sides have no spread beyond
    float rounding (`rounding_spread`).
    """
    a, b = _finite(row), _finite(base)
    delta = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if a.size < 2 or b.size < 2:
        return delta, math.nan, math.nan, math.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if max(a.std(ddof=1), b.std(ddof=1)) <= rounding_spread([*a, *b]):
        return delta, math.nan, 0.0, math.nan
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    p = 2.0 * float(sps.t.sf(abs(delta) / se, df))
    return delta, p, se, df


def paired_test(
    differences: Iterable[float], scale: float = 1.0
) -> tuple[float, float, float, float]:
    """Paired t-test on per-seed differences (row − baseline at the same seed).

    Returns (mean difference, p, standard error, df = n − 1); NaN where undefined (fewer than
    two pairs; p also, se 0, when the differences spread no more than float rounding of values
    of magnitude `scale`: `rounding_spread`).
    """
    d = _finite(differences)
    delta = float(d.mean()) if d.size else math.nan
    if d.size < 2:
        return delta, math.nan, math.nan, math.nan
    sd = float(d.std(ddof=1))
    if sd <= rounding_spread([scale]):
        return delta, math.nan, 0.0, math.nan
    se = sd / math.sqrt(d.size)
    df = d.size - 1
    return delta, 2.0 * float(sps.t.sf(abs(delta) / se, df)), se, df


def holm(p_values: Iterable[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order; NaN entries stay NaN and are
    not counted in the family.

    The k-th smallest of m p-values is multiplied by m − k + 1; adjusted values are made
    monotone (a running maximum) and capped at 1. Rejecting where adjusted p < alpha controls
    the family-wise error rate at alpha.
    """
    values = [float(p) for p in p_values]
    ranked = sorted((p, i) for i, p in enumerate(values) if not math.isnan(p))
    adjusted = [math.nan] * len(values)
    running = 0.0
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - k) * p))
        adjusted[i] = running
    return adjusted


def t_test_power(effect: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided level-`alpha` t-test with standard error `se` and `df` degrees of
    freedom against a true difference `effect` (exact, via the noncentral t distribution)."""
    critical = float(sps.t.ppf(1.0 - alpha / 2.0, df))
    noncentrality = abs(effect) / se
    upper = float(sps.nct.sf(critical, df, noncentrality))
    lower = float(sps.nct.cdf(-critical, df, noncentrality))  # < alpha/2; NaN on underflow
    return upper + (0.0 if math.isnan(lower) else lower)


def minimum_detectable_effect(
    se: float, df: float, alpha: float = ALPHA, power: float = POWER
) -> float:
    """The smallest |difference| a two-sided t-test (`se`, `df`) detects with `power`.

    NaN when se or df is not a positive finite number.
    """
    if not (math.isfinite(se) and se > 0 and math.isfinite(df) and df > 0):
        return math.nan
    upper = 1.0
    while t_test_power(upper, 1.0, df, alpha) < power:
        upper *= 2.0
    nc = optimize.brentq(lambda x: t_test_power(x, 1.0, df, alpha) - power, 0.0, upper)
    return float(nc) * se


def seeds_needed(
    effect: float,
    sd: float,
    paired: bool,
    alpha: float = ALPHA,
    power: float = POWER,
    sd_base: float | None = None,
) -> float:
    """Seeds per row for a t-test to detect `effect` with `power`; inf beyond MAX_SEEDS.

    Paired: `sd` is the sd of per-seed differences, se = sd/√n, df = n − 1. Unpaired (Welch):
    `sd` is the row's per-run sd and `sd_base` the baseline's (default: the same), se =
    √((sd² + sd_base²)/n), and df the Welch–Satterthwaite df at n seeds each, which is 2n − 2
    when the two are equal and falls to n − 1 when one dominates. NaN without a finite positive
    spread or a finite effect; inf when effect is 0.
    """
    row_var = sd**2
    base_var = row_var if sd_base is None else sd_base**2
    if not (math.isfinite(row_var + base_var) and row_var + base_var > 0):
        return math.nan
    if not math.isfinite(effect):
        return math.nan
    if effect == 0:
        return math.inf
    welch_df_share = (row_var + base_var) ** 2 / (row_var**2 + base_var**2)  # df / (n − 1)

    def enough(n: int) -> bool:
        if paired:
            return t_test_power(effect, sd / math.sqrt(n), n - 1, alpha) >= power
        se = math.sqrt((row_var + base_var) / n)
        return t_test_power(effect, se, welch_df_share * (n - 1), alpha) >= power

    if not enough(MAX_SEEDS):
        return math.inf
    low, high = 1, MAX_SEEDS  # enough(high) holds; find the smallest such n
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return float(high)


def compare(
    row: dict[int, float],
    base: dict[int, float],
    confidence: float = 0.95,
    alpha: float | None = ALPHA,
) -> Comparison:
    """Compare a row's per-seed values with its baseline's (both keyed by seed).

    The same seed gives both rows the same data order, so when both rows have the same seeds
    (at least two), or share at least three, the paired t-test on per-seed differences decides;
    otherwise Welch's test on all seeds: with only two pairs out of more seeds, a df-1 paired
    test would throw the other seeds away. Welch also decides when every pair differs by the
    same amount up to float rounding (the paired test is then undefined, se 0).
    `half_width` is the t half-width of Δ from the deciding test's se and df. `mde` and
    `seeds_needed` are at level `alpha` (a corrected level where a family of tests decides);
    alpha None leaves them NaN (a quick pass for the p-values only).
    """
    row = {s: v for s, v in row.items() if math.isfinite(v)}
    base = {s: v for s, v in base.items() if math.isfinite(v)}
    shared = sorted(row.keys() & base.keys())
    differences = [row[s] - base[s] for s in shared]
    welch = welch_test(row.values(), base.values())
    paired = paired_test(differences, scale=max(map(abs, [*row.values(), *base.values(), 0.0])))
    pairable = len(shared) >= 3 or (len(shared) == 2 and row.keys() == base.keys())
    spread_base = None
    if pairable and paired[2] > 0:
        test, (delta, p, se, df) = PAIRED, paired
        spread = float(np.std(differences, ddof=1))
    elif len(row) >= 2 and len(base) >= 2:
        test, (delta, p, se, df) = WELCH, welch
        spread, spread_base = (float(np.std(list(v.values()), ddof=1)) for v in (row, base))
    else:
        test, (delta, p, se, df), spread = "", welch, math.nan
    quantile = float(sps.t.ppf(0.5 + confidence / 2.0, df)) if df == df else math.nan
    power = bool(test) and alpha is not None
    return Comparison(
        n_row=len(row),
        n_base=len(base),
        n_pairs=len(shared),
        delta=delta,
        half_width=quantile * se if test else math.nan,
        test=test,
        p_value=p if test else math.nan,
        p_welch=welch[1],
        p_paired=paired[1],
        mde=minimum_detectable_effect(se, df, alpha) if power else math.nan,
        seeds_needed=(
            seeds_needed(delta, spread, test == PAIRED, alpha, sd_base=spread_base)
            if power
            else math.nan
        ),
    )
