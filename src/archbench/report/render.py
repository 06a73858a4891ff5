"""Render a suite report: Markdown and HTML pages with tables and loss-curve figures."""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from archbench.errors import ArchbenchError
from archbench.io import atomic_path, write_text
from archbench.report.aggregate import read_curves, read_summary
from archbench.report.stats import summarize, t_half_width

CONFIDENCE = 0.95
MISSING = "—"
PALETTE = "colorblind"
SMOOTHING_POINTS = 25  # train-loss curves are smoothed to about this many independent points

Formatter = Callable[[float, float], str]


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells; the Markdown and HTML pages render the same one."""

    headers: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class FigureSpec:
    """One curve figure: the metric (also the file stem), its title and y-axis label."""

    metric: str
    title: str
    ylabel: str


FIGURES = (
    FigureSpec("val_loss", "Validation loss", "validation loss (nats/token)"),
    FigureSpec("train_loss", "Training loss", "training loss (nats/token)"),
)


def render_report(
    summary_csv: Path,
    curves_csv: Path,
    out_dir: Path,
    suite: str,
    experiments: list[dict] | None = None,
) -> list[Path]:
    """Write index.md, index.html and figures/<metric>.png under `out_dir`; return their paths.

    `experiments` describes the suite's rows in table order (name, arch, dataset, overrides,
    baseline, description); rows follow that order (experiments it omits come after it,
    sorted); without it they are sorted by name. An experiment in the order but absent from
    the data is an error.
    """
    out_dir = Path(out_dir)
    summary = read_summary(summary_csv)
    curves = read_curves(curves_csv)
    requested = [e["name"] for e in experiments] if experiments else None
    order = experiment_order(summary["experiment"].unique().to_list(), requested)
    figures = [_plot_curves(curves, spec, order, out_dir) for spec in FIGURES]
    main, per_seed = main_table(summary, order), per_seed_table(summary, order)
    warning = leak_warning(leak_status(summary, order))
    relative = [path.relative_to(out_dir).as_posix() for path in figures]
    pages = [
        (out_dir / "index.md", markdown_page(suite, main, per_seed, relative, warning)),
        (out_dir / "index.html", html_page(suite, main, per_seed, relative, warning)),
    ]
    for path, text in pages:
        write_text(path, text)
    return [path for path, _ in pages] + figures


def experiment_order(present: list[str], requested: list[str] | None) -> list[str]:
    """Order the experiments: `requested` first (unknown names are an error), the rest sorted."""
    if requested is None:
        return sorted(present)
    unknown = [name for name in requested if name not in present]
    if unknown:
        raise ArchbenchError(f"experiments without results: {unknown}")
    first = list(dict.fromkeys(requested))
    return first + sorted(set(present) - set(first))


# ---------------------------------------------------------------- number formatting


def format_interval(mean: float, half_width: float, decimals: int, scale: float = 1.0) -> str:
    """Format "mean ± half-width" with fixed decimals; only the mean without a finite interval."""
    if math.isnan(mean):
        return MISSING
    if math.isnan(half_width):
        return f"{mean * scale:.{decimals}f}"
    return f"{mean * scale:.{decimals}f} ± {half_width * scale:.{decimals}f}"


def format_count(value: float) -> str:
    """Format a parameter count in millions (or billions), e.g. 812000 -> "0.81M"."""
    if math.isnan(value):
        return MISSING
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    return f"{value / 1e6:.2f}M"


def format_scientific(value: float) -> str:
    """Format a large number compactly with two significant digits, e.g. 1.2e13."""
    if math.isnan(value):
        return MISSING
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _interval(decimals: int, scale: float = 1.0) -> Formatter:
    """A cell formatter for mean ± half-width."""
    return lambda mean, half_width: format_interval(mean, half_width, decimals, scale)


def _mean_only(format_value: Callable[[float], str]) -> Formatter:
    """A cell formatter that shows the mean only (for quantities that do not vary by seed)."""
    return lambda mean, _half_width: format_value(mean)


METRIC_COLUMNS: tuple[tuple[str, str, Formatter], ...] = (
    ("parameters", "n_params", _mean_only(format_count)),
    ("train FLOPs", "train_flops", _mean_only(format_scientific)),
    ("val loss", "val_loss", _interval(4)),
    ("val bpb", "val_bpb", _interval(4)),
    ("val ppl", "val_ppl", _interval(4)),
    ("top-1 (%)", "val_top1", _interval(3, scale=100.0)),
    ("top-5 (%)", "val_top5", _interval(3, scale=100.0)),
    ("train seconds", "train_seconds", _interval(1)),
    ("tokens/s", "train_tokens_per_s", _interval(0)),
)
PER_SEED_METRICS = ("val_loss", "val_bpb")


# ---------------------------------------------------------------- tables


def leak_status(summary: pl.DataFrame, order: list[str]) -> dict[str, str]:
    """Per experiment: 'pass', 'FAIL (k of n seeds)' from `leak_check_passed`, or MISSING."""
    checks = summary.filter(pl.col("metric") == "leak_check_passed")
    failed = dict(
        checks.group_by("experiment")
        .agg((pl.col("value") < 1).sum().alias("failed"), pl.len().alias("n"))
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
    """The warning paragraph naming experiments that failed the leak check, or None."""
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
        "the prefixes run alone. Their losses are not valid language-model scores and must not "
        "be compared with the others: " + "; ".join(failed) + "."
    )


def main_table(summary: pl.DataFrame, order: list[str]) -> Table:
    """One row per experiment: identity, seed count, size and mean ± half-width of metrics."""
    stats = summarize(summary, CONFIDENCE)
    cells = {
        (experiment, metric): (mean, half_width)
        for experiment, metric, mean, half_width in stats.select(
            "experiment", "metric", "mean", "half_width"
        ).iter_rows()
    }
    info = summary.group_by("experiment").agg(
        pl.col("arch").first(), pl.col("dataset").first(), pl.col("seed").n_unique()
    )
    identity = {row[0]: row[1:] for row in info.iter_rows()}
    leaks = leak_status(summary, order)
    rows = []
    for experiment in order:
        arch, dataset, seeds = identity[experiment]
        values = [
            fmt(*cells.get((experiment, metric), (math.nan, math.nan)))
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
    return Table(headers, rows)


def per_seed_table(summary: pl.DataFrame, order: list[str]) -> Table:
    """One row per experiment × seed with the raw validation metrics behind the means."""
    values = {
        (experiment, seed, metric): value
        for experiment, seed, metric, value in summary.filter(
            pl.col("metric").is_in(PER_SEED_METRICS)
        )
        .select("experiment", "seed", "metric", "value")
        .iter_rows()
    }
    seeds = summary.group_by("experiment").agg(pl.col("seed").unique().sort())
    seeds_of = dict(seeds.iter_rows())
    rows = [
        [
            experiment,
            str(seed),
            *(
                format_interval(values.get((experiment, seed, metric), math.nan), math.nan, 4)
                for metric in PER_SEED_METRICS
            ),
        ]
        for experiment in order
        for seed in seeds_of[experiment]
    ]
    return Table(["experiment", "seed", *PER_SEED_METRICS], rows)


# ---------------------------------------------------------------- pages


def _how_to_read() -> str:
    """The explanatory paragraph shared by both pages (plain text, no markup)."""
    percent = f"{CONFIDENCE:.0%}"
    return (
        f"Each metric cell shows the mean over the n seeds of an experiment ± the half-width "
        f"of a two-sided {percent} Student-t confidence interval for that mean; with n = 1 "
        f"there is no interval and only the value is shown. Lower loss, bits per byte (bpb) "
        f"and perplexity (ppl) are better; higher top-1/top-5 accuracy is better. Parameter "
        f"counts and training FLOPs are listed so that architectures can be compared at "
        f"matched size and compute. 'leak check' says whether every seed's checkpoint passed "
        f"the automatic future-leak test (logits at position t unchanged when later tokens "
        f"change; full-sequence logits equal to prefix logits). {MISSING} marks a metric that "
        f"was not recorded. The "
        f"curves show the mean across seeds with a band of ± the same t half-width (min–max "
        f"where fewer than two seeds logged a step)."
    )


def escape_markdown(text: str) -> str:
    """Escape text for a GitHub Markdown table cell.

    `|` is backslash-escaped, `&`, `<` and `>` become entities (so no raw HTML gets through)
    and line breaks become spaces.
    """
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """Render `table` as a GitHub pipe table."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(escape_markdown(cell) for cell in cells) + " |"

    rule = "|" + "|".join("---" for _ in table.headers) + "|"
    return "\n".join([line(table.headers), rule, *(line(row) for row in table.rows)])


def html_table(table: Table) -> str:
    """Render `table` as an HTML table; every cell is HTML-escaped."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table.headers)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table.rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def markdown_page(
    suite: str, main: Table, per_seed: Table, figures: list[str], warning: str | None = None
) -> str:
    """The whole report as Markdown; `figures` are image paths relative to the page."""
    images = [
        f"![{escape_markdown(spec.title)}]({path})"
        for spec, path in zip(FIGURES, figures, strict=True)
    ]
    parts = [
        f"# archbench report — suite {escape_markdown(suite)}",
        "## How to read this report",
        _how_to_read(),
        *([f"## ⚠ Future leak detected\n\n**{escape_markdown(warning)}**"] if warning else []),
        "## Results",
        markdown_table(main),
        "## Curves",
        *images,
        "## Per-seed values",
        markdown_table(per_seed),
    ]
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 80rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; }
th { background: #f2f2f2; }
td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child { text-align: left; }
img { max-width: 100%; height: auto; }
.warning { color: #a50000; }
"""


def html_page(
    suite: str, main: Table, per_seed: Table, figures: list[str], warning: str | None = None
) -> str:
    """The whole report as one self-contained HTML page (inline CSS, relative image paths)."""
    title = html.escape(f"archbench report — suite {suite}")
    images = "\n".join(
        f'<figure><img src="{html.escape(path)}" alt="{html.escape(spec.title)}"></figure>'
        for spec, path in zip(FIGURES, figures, strict=True)
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{title}</h1>
<h2>How to read this report</h2>
<p>{html.escape(_how_to_read())}</p>
{_html_warning(warning)}<h2>Results</h2>
{html_table(main)}
<h2>Curves</h2>
{images}
<h2>Per-seed values</h2>
{html_table(per_seed)}
</body>
</html>
"""


def _html_warning(warning: str | None) -> str:
    """The leak warning as an HTML section, or nothing."""
    if warning is None:
        return ""
    return (
        f'<h2 class="warning">⚠ Future leak detected</h2>\n'
        f'<p class="warning"><strong>{html.escape(warning)}</strong></p>\n'
    )


# ---------------------------------------------------------------- figures


def smoothing_window(curves: pl.DataFrame, metric: str) -> int:
    """Rolling-mean window giving the longest run's `metric` curve ~SMOOTHING_POINTS points."""
    lengths = curves.filter(pl.col("metric") == metric).group_by("experiment", "seed").len()
    longest = int(lengths["len"].max() or 0)
    return max(1, longest // SMOOTHING_POINTS)


def curve_bands(curves: pl.DataFrame, metric: str, window: int = 1) -> pl.DataFrame:
    """Per experiment and step: mean over seeds and a band (mean ± t half-width, or min–max
    where fewer than two seeds logged the step), after a per-seed trailing rolling mean of
    `window` logged steps. NaN values are ignored. Columns: experiment, step, tokens, n,
    mean, low, high; sorted by experiment and step.
    """
    points = (
        curves.filter((pl.col("metric") == metric) & pl.col("value").is_not_nan())
        .sort("experiment", "seed", "step")
        .with_columns(
            pl.col("value").rolling_mean(window, min_samples=1).over("experiment", "seed")
        )
        .group_by("experiment", "step")
        .agg(
            pl.col("tokens").mean(),
            pl.len().alias("n"),
            pl.col("value").mean().alias("mean"),
            pl.col("value").std().alias("sd"),
            pl.col("value").min().alias("min"),
            pl.col("value").max().alias("max"),
        )
        .sort("experiment", "step")
    )
    half = [t_half_width(sd, n, CONFIDENCE) for sd, n in points.select("sd", "n").iter_rows()]
    band = pl.Series("half", half, dtype=pl.Float64)
    two = pl.col("n") >= 2
    return points.with_columns(band).select(
        "experiment",
        "step",
        "tokens",
        "n",
        "mean",
        pl.when(two).then(pl.col("mean") - pl.col("half")).otherwise("min").alias("low"),
        pl.when(two).then(pl.col("mean") + pl.col("half")).otherwise("max").alias("high"),
    )


def _plot_curves(curves: pl.DataFrame, spec: FigureSpec, order: list[str], out_dir: Path) -> Path:
    """Draw one curve figure (one colour per experiment, fixed by `order`) and save it."""
    window = smoothing_window(curves, spec.metric) if spec.metric == "train_loss" else 1
    bands = curve_bands(curves, spec.metric, window)
    title = spec.title + (f" (rolling mean over {window} logged steps)" if window > 1 else "")
    colours = dict(zip(order, sns.color_palette(PALETTE, n_colors=len(order)), strict=True))
    path = out_dir / "figures" / f"{spec.metric}.png"
    with sns.axes_style("whitegrid"):
        figure = Figure(figsize=(8, 4.8), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for experiment in order:
            band = bands.filter(pl.col("experiment") == experiment)
            if band.height:
                tokens = band["tokens"].to_numpy()
                colour = colours[experiment]
                axes.plot(tokens, band["mean"].to_numpy(), color=colour, label=experiment)
                low, high = band["low"].to_numpy(), band["high"].to_numpy()
                axes.fill_between(tokens, low, high, color=colour, alpha=0.2)
        if bands.height:
            axes.legend(title="experiment", fontsize="small")
            axes.xaxis.set_major_formatter(EngFormatter())
        else:
            axes.text(0.5, 0.5, "no data recorded", ha="center", transform=axes.transAxes)
        axes.set(title=title, xlabel="training tokens", ylabel=spec.ylabel)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=110)
    return path
