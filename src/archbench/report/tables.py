"""The report's tables: results over seeds, comparisons with baselines, ablation axes, the rest.

Every table is built from the long summary (one row per experiment × seed × metric) and returned
as a `Table` of formatted cells, so the Markdown and HTML pages show identical numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from archbench.report.axes import Axis
from archbench.report.document import Table
from archbench.report.stats import (
    ALPHA,
    MAX_SEEDS,
    PAIRED,
    POWER,
    WELCH,
    Comparison,
    compare,
    holm,
)

CONFIDENCE = 0.95
MISSING = "—"
PRIMARY = "val_loss"  # the metric of text rows' comparisons (nats/token; lower is better)
EXACT_MATCH = "_exact_match"  # suffix of a synthetic task's score (the task rows' comparisons)
NO_SCORE = "not tested: neither row has a val loss or a task's exact match"
SIZE_TOLERANCE = 0.05  # parameter counts further apart than this are not a fair comparison

Formatter = Callable[[float, float], str]
Cells = dict[tuple[str, str], tuple[float, float]]


# ---------------------------------------------------------------- number formatting


def format_interval(mean: float, half_width: float, decimals: int, scale: float = 1.0) -> str:
    """Format "mean ± half-width" with fixed decimals; only the mean without a finite interval."""
    if math.isnan(mean):
        return MISSING
    if math.isnan(half_width):
        return f"{mean * scale:.{decimals}f}"
    return f"{mean * scale:.{decimals}f} ± {half_width * scale:.{decimals}f}"


def format_count(value: float) -> str:
    """Format a count in millions, billions or (below 100k) thousands: 812000 -> "0.81M"."""
    if math.isnan(value):
        return MISSING
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    if value < 1e5:
        return f"{value / 1e3:.1f}k"
    return f"{value / 1e6:.2f}M"


def format_scientific(value: float) -> str:
    """Format a large number compactly with two significant digits, e.g. 1.2e13."""
    if math.isnan(value):
        return MISSING
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def decimals_off(value: float, threshold: float, decimals: int) -> int:
    """The fewest decimals, from `decimals` up to 6, at which `value` does not round onto
    `threshold`, so that a printed number never seems to sit on the wrong side of it."""
    while value != threshold and round(value, decimals) == threshold and decimals < 6:
        decimals += 1
    return decimals


# A comparison's verdict (its leading mark) -> the HTML class of its table row.
VERDICT_CLASSES = (("✔", "win"), ("✘", "loss"), ("EXCLUDED", "excluded"))


def verdict_class(verdict: str) -> str:
    """The HTML class of a comparison row with this verdict ("" for an inconclusive one)."""
    return next((name for mark, name in VERDICT_CLASSES if verdict.startswith(mark)), "")


def format_p(p: float) -> str:
    """A p-value: three decimals, scientific below 0.001, and more near ALPHA, so that the
    printed value never seems to contradict the verdict (0.0499 and 0.0504, not 0.050 twice)."""
    if math.isnan(p):
        return MISSING
    if p < 0.001:
        return format_scientific(p)
    return f"{p:.{decimals_off(p, ALPHA, 3)}f}"


def format_relative(ratio: float, decimals: int = 1, threshold: float = math.nan) -> str:
    """A ratio as a signed percentage difference, e.g. 1.041 -> "+4.1%"; with more decimals
    where the difference would round onto `threshold` (a fraction, e.g. 0.05)."""
    if math.isnan(ratio):
        return MISSING
    percent = (ratio - 1) * 100
    decimals = decimals_off(abs(percent), threshold * 100, decimals)
    return f"{percent:+.{decimals}f}%"


def format_seeds(n: float) -> str:
    """A seed count, "> MAX_SEEDS" for inf."""
    if math.isnan(n):
        return MISSING
    return f"> {MAX_SEEDS}" if math.isinf(n) else str(int(n))


def _interval(decimals: int, scale: float = 1.0) -> Formatter:
    """A cell formatter for mean ± half-width."""
    return lambda mean, half_width: format_interval(mean, half_width, decimals, scale)


def _mean_only(format_value: Callable[[float], str]) -> Formatter:
    """A cell formatter that shows the mean only (for quantities that do not vary by seed)."""
    return lambda mean, _half_width: format_value(mean)


METRIC_COLUMNS: tuple[tuple[str, str, Formatter], ...] = (
    ("parameters", "n_params", _mean_only(format_count)),
    ("train tokens", "train_tokens", _mean_only(format_count)),
    ("train FLOPs", "train_flops", _mean_only(format_scientific)),
    ("val loss", "val_loss", _interval(4)),
    ("best val loss", "best_val_loss", _interval(4)),
    ("best at step", "best_val_step", _interval(0)),
    ("val bpb", "val_bpb", _interval(4)),
    ("val ppl", "val_ppl", _interval(4)),
    ("top-1 (%)", "val_top1", _interval(3, scale=100.0)),
    ("top-5 (%)", "val_top5", _interval(3, scale=100.0)),
    ("train seconds", "train_seconds", _interval(1)),
    ("tokens/s", "train_tokens_per_s", _interval(0)),
)
PER_SEED_METRICS = ("val_loss", "val_bpb")
LM_EVAL_COLUMNS: tuple[tuple[str, str, Formatter], ...] = (
    ("BLiMP (%)", "blimp_overall", _interval(2, scale=100.0)),
    ("morphology (%)", "blimp_morphology", _interval(2, scale=100.0)),
    ("syntax (%)", "blimp_syntax", _interval(2, scale=100.0)),
    ("semantics (%)", "blimp_semantics", _interval(2, scale=100.0)),
    ("syntax-semantics (%)", "blimp_syntax_semantics", _interval(2, scale=100.0)),
    ("rolling bpb", "lm_eval_rolling_bpb", _interval(4)),
    ("BLiMP pairs", "blimp_pairs", _mean_only(format_count)),
)
# Bookkeeping numbers that are not scores: never listed under "other metrics".
BOOKKEEPING = frozenset(
    {
        "n_params_non_embedding",
        "flops_per_step",
        "train_steps",
        "final_val_loss",
        "torch_threads",
        "val_tokens",
        "val_bytes",
        "blimp_pairs",
    }
)


def metric_cells(stats: pl.DataFrame) -> Cells:
    """{(experiment, metric): (mean, half-width)} from `summarize`'s output."""
    return {
        (experiment, metric): (mean, half_width)
        for experiment, metric, mean, half_width in stats.select(
            "experiment", "metric", "mean", "half_width"
        ).iter_rows()
    }


def metric_counts(stats: pl.DataFrame) -> dict[tuple[str, str], int]:
    """{(experiment, metric): how many seeds' values the mean is over} from `summarize`."""
    return {
        (experiment, metric): n
        for experiment, metric, n in stats.select("experiment", "metric", "n").iter_rows()
    }


def counted_cell(
    cells: Cells,
    counts: dict[tuple[str, str], int],
    experiment: str,
    metric: str,
    fmt: Formatter,
    seeds: int,
) -> str:
    """One metric cell formatted by `fmt`, with "(n=k)" added when its mean is over fewer than
    the experiment's `seeds` (a seed that did not record the value, or recorded NaN)."""
    text = fmt(*_cell(cells, experiment, metric))
    n = counts.get((experiment, metric), 0)
    return text if text == MISSING or n >= seeds else f"{text} (n={n})"


def _cell(cells: Cells, experiment: str, metric: str) -> tuple[float, float]:
    """(mean, half-width), NaN where not recorded."""
    return cells.get((experiment, metric), (math.nan, math.nan))


# ---------------------------------------------------------------- leak check


def leak_status(summary: pl.DataFrame, order: list[str]) -> dict[str, str]:
    """Per experiment: 'pass', 'FAIL (k of n seeds)' from `leak_check_passed`, or MISSING."""
    checks = summary.filter(pl.col("metric") == "leak_check_passed")
    failed = dict(
        checks.group_by("experiment")
        # a seed passes with exactly 1; NaN or an empty cell is a check that did not pass
        .agg(
            (pl.col("value") == 1).fill_null(False).not_().sum().alias("failed"),
            pl.len().alias("n"),
        )
        .select("experiment", pl.struct("failed", "n"))
        .iter_rows()
    )
    status = {}
    for experiment in order:
        counts = failed.get(experiment)
        if counts is None:
            status[experiment] = MISSING
        elif counts["failed"]:
            status[experiment] = f"FAIL ({counts['failed']} of {counts['n']} seeds)"
        else:
            status[experiment] = "pass"
    return status


def leak_warning(status: dict[str, str]) -> str | None:
    """The warning naming experiments that failed the leak check, or None."""
    failed = [
        f"{name} ({state.removeprefix('FAIL (').rstrip(')')})"
        for name, state in status.items()
        if state.startswith("FAIL")
    ]
    if not failed:
        return None
    return (
        "These experiments failed the automatic future-leak check: their logits at position t "
        "changed when tokens after t changed, or the full-sequence logits differ from those of "
        "the prefixes run alone. Their losses are not valid language-model scores; they are "
        "excluded from every comparison, ablation view and Pareto front: " + "; ".join(failed) + "."
    )


# ---------------------------------------------------------------- tables


def experiments_table(rows: list[dict]) -> Table:
    """The suite's rows as declared: name, arch, data set, overrides, baseline, init_from,
    sub-model baselines, description."""
    return Table(
        [
            *("experiment", "arch", "dataset", "overrides", "baseline"),
            *("init from", "sub-model baselines", "description"),
        ],
        [
            [
                row["name"],
                row.get("arch", MISSING),
                row.get("dataset", MISSING),
                " ".join(f"{k}={v}" for k, v in (row.get("overrides") or {}).items()),
                row.get("baseline") or MISSING,
                row.get("init_from") or "",
                ",".join(f"{k}={v}" for k, v in (row.get("submodel_baselines") or {}).items()),
                row.get("description") or "",
            ]
            for row in rows
        ],
        id="experiments",
    )


def main_table(
    summary: pl.DataFrame,
    order: list[str],
    cells: Cells,
    counts: dict[tuple[str, str], int],
    leaks: dict[str, str],
) -> Table:
    """One row per experiment: identity, seed count, size and mean ± half-width of metrics (a
    mean over fewer seeds than the row's says its n: `counted_cell`)."""
    info = summary.group_by("experiment").agg(
        pl.col("arch").first(), pl.col("dataset").first(), pl.col("seed").n_unique()
    )
    identity = {row[0]: row[1:] for row in info.iter_rows()}
    rows = []
    for experiment in order:
        arch, dataset, seeds = identity[experiment]
        values = [
            counted_cell(cells, counts, experiment, metric, fmt, seeds)
            for _, metric, fmt in METRIC_COLUMNS
        ]
        rows.append([experiment, arch, dataset, str(seeds), leaks[experiment], *values])
    headers = [
        "experiment",
        "arch",
        "dataset",
        "seeds (n)",
        "leak check",
        *(h for h, _, _ in METRIC_COLUMNS),
    ]
    classes = ["excluded" if leaks[e].startswith("FAIL") else "" for e in order]
    return Table(headers, rows, id="results", row_classes=classes)


def per_seed_values(summary: pl.DataFrame, metric: str) -> dict[str, dict[int, float]]:
    """{experiment: {seed: value}} of one metric (an empty cell counts as NaN)."""
    values: dict[str, dict[int, float]] = {}
    for experiment, seed, value in (
        summary.filter(pl.col("metric") == metric).select("experiment", "seed", "value").iter_rows()
    ):
        values.setdefault(experiment, {})[seed] = math.nan if value is None else value
    return values


def per_seed_table(summary: pl.DataFrame, order: list[str]) -> Table:
    """One row per experiment × seed with the raw values behind the means: validation loss and
    bpb, and a synthetic-task row's exact match (the score its comparisons use)."""
    values = {metric: per_seed_values(summary, metric) for metric in PER_SEED_METRICS}
    exact = summary.filter(pl.col("metric").str.ends_with(EXACT_MATCH))
    task_values = {
        (experiment, seed): value
        for experiment, seed, value in exact.select("experiment", "seed", "value").iter_rows()
    }
    seeds_of = dict(summary.group_by("experiment").agg(pl.col("seed").unique().sort()).iter_rows())
    rows = [
        [
            experiment,
            str(seed),
            *(
                format_interval(values[m].get(experiment, {}).get(seed, math.nan), math.nan, 4)
                for m in PER_SEED_METRICS
            ),
            format_interval(task_values.get((experiment, seed), math.nan), math.nan, 3),
        ]
        for experiment in order
        for seed in seeds_of[experiment]
    ]
    headers = ["experiment", "seed", *PER_SEED_METRICS, "task exact match"]
    return Table(headers, rows, id="per-seed")


def lm_eval_table(stats: pl.DataFrame, order: list[str], seeds: dict[str, int]) -> Table | None:
    """BLiMP accuracy (overall and by field) and the harness's rolling bits-per-byte, mean ±
    half-width (with n where fewer than the experiment's `seeds`), one row per experiment that
    has them; None when no run recorded any."""
    metrics = {metric for _, metric, _ in LM_EVAL_COLUMNS}
    present = stats.filter(pl.col("metric").is_in(list(metrics)))
    if not present.height:
        return None
    cells, counts = metric_cells(present), metric_counts(present)
    rows = [
        [
            e,
            *(
                counted_cell(cells, counts, e, metric, fmt, seeds[e])
                for _, metric, fmt in LM_EVAL_COLUMNS
            ),
        ]
        for e in order
        if e in set(present["experiment"])
    ]
    return Table(["experiment", *(h for h, _, _ in LM_EVAL_COLUMNS)], rows, id="lm-eval")


def other_metrics_table(
    stats: pl.DataFrame, order: list[str], seeds: dict[str, int]
) -> Table | None:
    """Mean ± half-width of every metric not shown elsewhere (synthetic tasks, lm-eval extras,
    ...): one row per metric, one column per experiment, "(n=k)" on a mean over fewer than the
    experiment's `seeds`; None if none. The 67 per-paradigm BLiMP accuracies stay in summary.csv
    only."""
    shown = {metric for _, metric, _ in (*METRIC_COLUMNS, *LM_EVAL_COLUMNS)} | BOOKKEEPING
    rest = stats.filter(
        ~pl.col("metric").is_in(list(shown))
        & ~pl.col("metric").str.starts_with("leak_")
        & ~pl.col("metric").str.starts_with("blimp_")
    )
    if not rest.height:
        return None
    cells, counts = metric_cells(rest), metric_counts(rest)
    columns = [e for e in order if e in set(rest["experiment"])]
    rows = [
        [metric, *(counted_cell(cells, counts, e, metric, _interval(4), seeds[e]) for e in columns)]
        for metric in sorted(set(rest["metric"]))
    ]
    return Table(["metric", *columns], rows, id="other-metrics")


# ---------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Score:
    """The metric a row and its baseline are compared on, and which way is better."""

    metric: str
    lower_is_better: bool
    decimals: int


VAL_LOSS = Score(PRIMARY, lower_is_better=True, decimals=4)


def score_of(metrics: set[str]) -> Score | None:
    """What a pair with these metrics is compared on: val loss (text rows), else a synthetic
    task's exact match (higher is better); None when they have neither."""
    if PRIMARY in metrics:
        return VAL_LOSS
    exact = sorted(m for m in metrics if m.endswith(EXACT_MATCH))
    return Score(exact[0], lower_is_better=False, decimals=3) if exact else None


SeedPair = tuple[dict[int, float], dict[int, float]]  # per-seed values of a row and its baseline


@dataclass(frozen=True)
class ComparisonRow:
    """A row against its baseline on `score`: the test (None if not run), Holm p and verdict."""

    experiment: str
    baseline: str
    result: Comparison | None
    holm_p: float
    verdict: str
    score: Score | None = VAL_LOSS


def verdict_of(result: Comparison, holm_p: float, score: Score = VAL_LOSS) -> str:
    """ "✔ significantly better", "✘ significantly worse", "within noise", or why untested."""
    if not result.test:
        return "not tested: needs ≥ 2 seeds of both rows"
    if math.isnan(holm_p):
        return "not tested: no seed-to-seed spread to test"
    if holm_p >= ALPHA:
        return "within noise"
    better = result.delta < 0 if score.lower_is_better else result.delta > 0
    return "✔ significantly better" if better else "✘ significantly worse"


def power_level(p_values: list[float]) -> float:
    """The level of the power figures: ALPHA / m, m the tested comparisons (finite p-values).
    Holm's step-down never asks more of a p-value than this, so a difference detected at this
    level stays significant after the correction."""
    return ALPHA / max(1, sum(math.isfinite(p) for p in p_values))


def comparisons(
    summary: pl.DataFrame,
    order: list[str],
    baselines: dict[str, str | None],
    leaks: dict[str, str],
) -> list[ComparisonRow]:
    """Compare every row that has a baseline, with Holm across the whole report: text rows on
    val loss, synthetic-task rows on their task's exact match (`score_of`).

    Rows (or baselines) that failed the leak check are excluded and say so; a baseline that is
    not in this suite's results is reported, not an error. The power figures are at Holm's
    strictest level, ALPHA / m for m tested comparisons (`power_level`): a difference found at
    that level is significant after the correction too.
    """
    metrics = {
        name: set(found)
        for name, found in summary.group_by("experiment").agg(pl.col("metric").unique()).iter_rows()
    }
    pending: list[tuple[str, str, SeedPair | None, str, Score | None]] = []
    for experiment in order:
        baseline = baselines.get(experiment)
        if not baseline:
            continue
        score = score_of(metrics.get(experiment, set()) | metrics.get(baseline, set()))
        if baseline not in leaks:
            why = "baseline not in this suite's results"
        elif leaks[experiment].startswith("FAIL"):
            why = "EXCLUDED: failed the leak check"
        elif leaks[baseline].startswith("FAIL"):
            why = "EXCLUDED: baseline failed the leak check"
        elif score is None:
            why = NO_SCORE
        else:
            values = per_seed_values(summary, score.metric)
            pair = (values.get(experiment, {}), values.get(baseline, {}))
            pending.append((experiment, baseline, pair, "", score))
            continue
        pending.append((experiment, baseline, None, why, score))
    p_values = [
        compare(*pair, CONFIDENCE, alpha=None).p_value if pair else math.nan
        for _, _, pair, _, _ in pending
    ]
    adjusted = holm(p_values)
    level = power_level(p_values)
    rows = []
    for (e, b, pair, why, score), p in zip(pending, adjusted, strict=True):
        r = compare(*pair, CONFIDENCE, alpha=level) if pair else None
        rows.append(
            ComparisonRow(e, b, r, p, verdict_of(r, p, score) if r is not None else why, score)
        )
    return rows


def _against_baseline(cells: Cells, row: ComparisonRow, metric: str) -> tuple[float, float]:
    """(the row's mean of `metric`, its ratio to the baseline's mean; NaN if unknown)."""
    value, base = (_cell(cells, name, metric)[0] for name in (row.experiment, row.baseline))
    return value, (value / base if base else math.nan)


def size_mismatched(size_ratio: float) -> bool:
    """Whether a row's parameter count is more than SIZE_TOLERANCE away from its baseline's
    (`size_ratio` = row / baseline); exactly at the tolerance, up to float rounding, is not."""
    off = abs(size_ratio - 1)
    return off > SIZE_TOLERANCE and not math.isclose(off, SIZE_TOLERANCE)


def comparison_table(rows: list[ComparisonRow], cells: Cells) -> Table:
    """The comparisons with size, compute, Δ, both tests, Holm p, verdict and power."""
    out, classes = [], []
    for row in rows:
        params, size_ratio = _against_baseline(cells, row, "n_params")
        flops, flops_ratio = _against_baseline(cells, row, "train_flops")
        if math.isnan(size_ratio):
            fair = MISSING
        elif size_mismatched(size_ratio):
            difference = format_relative(size_ratio, 2, SIZE_TOLERANCE)
            fair = f"⚠ not size-matched ({difference} parameters)"
        else:
            fair = "matched"
        r, score = row.result, row.score or VAL_LOSS
        digits = score.decimals
        out.append(
            [
                row.experiment,
                row.baseline,
                f"{format_count(params)} ({format_relative(size_ratio, 1, SIZE_TOLERANCE)})",
                f"{format_scientific(flops)} ({format_relative(flops_ratio)})",
                fair,
                score.metric if row.score else MISSING,
                format_interval(*_cell(cells, row.experiment, score.metric), digits),
                format_interval(*_cell(cells, row.baseline, score.metric), digits),
                MISSING if r is None else f"{r.n_row}/{r.n_base} ({r.n_pairs})",
                MISSING if r is None else format_interval(r.delta, r.half_width, digits),
                MISSING if r is None else format_p(r.p_paired),
                MISSING if r is None else format_p(r.p_welch),
                (r.test if r is not None and r.test else MISSING),
                format_p(row.holm_p),
                row.verdict,
                MISSING if r is None else format_interval(r.mde, math.nan, digits),
                MISSING if r is None else format_seeds(r.seeds_needed),
            ]
        )
        classes.append(verdict_class(row.verdict))
    headers = [
        "experiment",
        "baseline",
        "parameters (vs baseline)",
        "train FLOPs (vs baseline)",
        "size",
        "compared on",
        "row",
        "baseline row",
        "seeds row/baseline (pairs)",
        "Δ (95% CI, not Holm-adjusted)",
        f"p ({PAIRED})",
        f"p ({WELCH})",
        "deciding test",
        "Holm p",
        "verdict",
        f"detectable Δ ({POWER:.0%} power, level {ALPHA}/m)",
        f"seeds to detect this Δ (level {ALPHA}/m)",
    ]
    return Table(headers, out, id="comparisons", row_classes=classes)


def power_summary(rows: list[ComparisonRow]) -> str | None:
    """A paragraph on what these seeds can resolve in val loss, or None when nothing was
    tested on it."""
    tested = [
        r
        for r in rows
        if r.score == VAL_LOSS and r.result is not None and not math.isnan(r.result.mde)
    ]
    if not tested:
        return None
    mdes = sorted(r.result.mde for r in tested)
    median = statistics.median(mdes)
    significant = sum(r.verdict.startswith(("✔", "✘")) for r in tested)
    return (
        f"Power: with the seeds used and the observed seed-to-seed spread, the smallest "
        f"difference in validation loss that these tests detect with {POWER:.0%} probability "
        f"after the Holm correction ranges from {mdes[0]:.4f} to {mdes[-1]:.4f} nats (median "
        f"{median:.4f}). {significant} of {len(tested)} tested differences are significant "
        f"after the correction. 'Within noise' does not mean 'no effect': a true difference "
        f"smaller than a row's detectable Δ is found with less than {POWER:.0%} probability at "
        f"these seeds — the last column says how many seeds each observed Δ would need."
    )


def axis_score(axis: Axis, cells: Cells) -> Score:
    """What an axis's rows are scored on: val loss for text rows, a synthetic task's exact match
    for task rows (`score_of`; val loss when they have neither)."""
    names = {p.experiment for p in axis.points}
    return score_of({metric for experiment, metric in cells if experiment in names}) or VAL_LOSS


def axis_table(
    axis: Axis,
    cells: Cells,
    counts: dict[tuple[str, str], int],
    leaks: dict[str, str],
    seeds: dict[str, int],
) -> Table:
    """One ablation axis: each value's row with its seeds, scores, size and compute (text rows:
    val loss and bpb; task rows: the task's exact match; "(n=k)" on a score over fewer than the
    row's seeds)."""
    score = axis_score(axis, cells)
    metrics = ["val_loss", "val_bpb"] if score == VAL_LOSS else [score.metric]
    fmt = _interval(score.decimals)
    rows = [
        [
            point.label,
            point.experiment,
            str(seeds.get(point.experiment, 0)),
            *(
                counted_cell(
                    cells, counts, point.experiment, m, fmt, seeds.get(point.experiment, 0)
                )
                for m in metrics
            ),
            format_count(_cell(cells, point.experiment, "n_params")[0]),
            format_scientific(_cell(cells, point.experiment, "train_flops")[0]),
            leaks.get(point.experiment, MISSING),
        ]
        for point in axis.points
    ]
    classes = [
        "excluded" if leaks.get(p.experiment, "").startswith("FAIL") else "" for p in axis.points
    ]
    headers = [
        *(axis.key, "experiment", "seeds (n)"),
        *(m.replace("_", " ") for m in metrics),
        *("parameters", "train FLOPs", "leak check"),
    ]
    return Table(headers, rows, id=f"axis-{axis.slug}", row_classes=classes)
