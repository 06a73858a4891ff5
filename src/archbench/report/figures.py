"""Report figures: loss curves with seed bands, ablation axes, Pareto fronts, BLiMP, aux losses.

One style everywhere (seaborn "whitegrid", the colour-blind palette, one colour per experiment
fixed by the table order); figures are drawn on matplotlib's Agg canvas without pyplot, so
rendering is thread-safe, headless and byte-for-byte deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, NullFormatter

from archbench.io import atomic_path
from archbench.report.axes import Axis
from archbench.report.stats import t_half_width
from archbench.report.tables import CONFIDENCE, Cells

PALETTE = "colorblind"
SMOOTHING_POINTS = 25  # train-loss curves are smoothed to about this many independent points
DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
PARETO_X = (
    ("n_params", "parameters"),
    ("train_flops", "training FLOPs"),
    ("train_seconds", "training wall time (s)"),
)
PARETO_Y = "val_bpb"
BLIMP_PREFIX = "blimp_"
BLIMP_FIELDS = ("morphology", "syntax", "semantics", "syntax_semantics")
NOT_AUX = ("train_loss", "train_next_token")  # train_<part> columns that are not auxiliary


@dataclass(frozen=True)
class FigureFile:
    """A written figure: its path, title and caption (for the pages and `snakemake --report`)."""

    path: Path
    title: str
    caption: str


Colours = dict[str, tuple[float, float, float]]


def experiment_colours(order: list[str]) -> Colours:
    """One colour per experiment, fixed by table order across all figures: colour-blind-safe
    up to the palette's 10 colours, evenly spaced hues beyond (a palette would repeat)."""
    n = max(1, len(order))
    palette = PALETTE if n <= len(sns.color_palette(PALETTE)) else "husl"
    return dict(zip(order, sns.color_palette(palette, n_colors=n), strict=False))


@contextmanager
def _canvas(
    path: Path, ncols: int = 1, size: tuple[float, float] = (8, 4.8), nrows: int = 1
) -> Iterator[list]:
    """Yield a grid of axes (row by row) in the report style; save the PNG to `path` afterwards."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8):
        figure = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(figure)
        yield list(figure.subplots(nrows, ncols, squeeze=False).flat)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)


def _no_data(axes: Axes, text: str = "no data recorded") -> None:
    """Mark an empty panel."""
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)


# ---------------------------------------------------------------- curves


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


def _draw_bands(
    axes: Axes, curves: pl.DataFrame, metric: str, experiments: list[str], colours: Colours
) -> int:
    """Draw mean curves with seed bands of `experiments`; return the smoothing window used."""
    window = smoothing_window(curves, metric) if metric != "val_loss" else 1
    bands = curve_bands(curves.filter(pl.col("experiment").is_in(experiments)), metric, window)
    for experiment in experiments:
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
        _no_data(axes)
    axes.set_xlabel("training tokens")
    return window


def _smoothing_note(window: int) -> str:
    """Caption text for a rolling mean."""
    return (
        f" Smoothed with a trailing rolling mean over {window} logged steps." if window > 1 else ""
    )


def plot_curves(
    curves: pl.DataFrame,
    metric: str,
    datasets: dict[str, str],
    colours: Colours,
    path: Path,
    title: str,
    ylabel: str,
) -> FigureFile:
    """One curve figure of `metric` for the experiments of `datasets` ({experiment: data set},
    in table order): mean over seeds with a band, one panel per data set, since losses on
    different data sets (and tokenizers) are not on one scale."""
    groups: dict[str, list[str]] = {}
    for experiment, dataset in datasets.items():
        groups.setdefault(dataset, []).append(experiment)
    ncols = min(3, len(groups))
    nrows = max(1, math.ceil(len(groups) / ncols)) if groups else 1
    size = (8, 4.8) if ncols <= 1 else (5.5 * ncols, 4.2 * nrows)
    with _canvas(path, max(1, ncols), size, nrows) as panels:
        windows = {1}
        for axes, (dataset, experiments) in zip(panels, groups.items(), strict=False):
            windows.add(_draw_bands(axes, curves, metric, experiments, colours))
            axes.set(title=f"data set {dataset}" if len(groups) > 1 else title, ylabel=ylabel)
        if not groups:
            _no_data(panels[0])
        for axes in panels[len(groups) :]:
            axes.set_visible(False)
    caption = (
        f"{title} against training tokens: the mean over seeds as a line and a 95% t-interval "
        f"over seeds as the band (min–max where fewer than two seeds logged a step)."
        + (" One panel per data set." if len(groups) > 1 else "")
        + _smoothing_note(max(windows))
    )
    return FigureFile(path, title, caption)


def aux_metrics(curves: pl.DataFrame, experiments: list[str]) -> list[str]:
    """The auxiliary-loss curves `experiments` logged: train_<part> metrics other than the total
    and the next-token part, sorted."""
    logged = curves.filter(
        pl.col("experiment").is_in(experiments) & pl.col("metric").str.starts_with("train_")
    )
    return sorted(name for name in logged["metric"].unique() if name not in NOT_AUX)


def plot_aux(
    curves: pl.DataFrame, arch: str, experiments: list[str], colours: Colours, path: Path
) -> FigureFile | None:
    """One panel per auxiliary loss of architecture `arch` (for example its future loss or every
    sub-model's loss), one line per experiment with seed bands; None if it logs none."""
    metrics = aux_metrics(curves, experiments)
    if not metrics:
        return None
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    with _canvas(path, ncols, (5.0 * ncols, 3.6 * nrows), nrows) as panels:
        windows = set()
        for axes, metric in zip(panels, metrics, strict=False):
            logged = curves.filter(pl.col("metric") == metric)["experiment"].unique()
            shown = [e for e in experiments if e in set(logged)]
            windows.add(_draw_bands(axes, curves, metric, shown, colours))
            axes.set(title=metric, ylabel=f"{metric} (training)")
        for axes in panels[len(metrics) :]:
            axes.set_visible(False)
    caption = (
        f"Auxiliary training losses of the {arch} rows (loss parts other than the total and the "
        f"next-token loss), mean over seeds with a 95% t-interval band."
        + _smoothing_note(max(windows))
    )
    return FigureFile(path, f"Auxiliary losses: {arch}", caption)


# ---------------------------------------------------------------- ablation axes


def plot_axis(
    axis: Axis,
    metric: str,
    per_seed: dict[str, dict[int, float]],
    cells: Cells,
    curves: pl.DataFrame,
    colours: Colours,
    excluded: set[str],
    path: Path,
) -> FigureFile:
    """Left: `metric` (per_seed holds its values) against the axis value (mean ± 95% CI, seeds
    as dots). Right: the rows' validation curves with seed bands. Rows in `excluded` (failed
    leak check) are left out."""
    points = [p for p in axis.points if p.experiment not in excluded]
    numeric = axis.numeric
    with _canvas(path, ncols=2, size=(11, 4.4)) as (left, right):
        for index, point in enumerate(points):
            x = float(point.value) if numeric else float(index)
            mean, half = cells.get((point.experiment, metric), (math.nan, math.nan))
            colour = colours[point.experiment]
            seeds = sorted(per_seed.get(point.experiment, {}).values())
            left.scatter([x] * len(seeds), seeds, color=colour, alpha=0.45, s=14, linewidths=0)
            left.errorbar(
                [x],
                [mean],
                yerr=[[0.0 if math.isnan(half) else half]] * 2,
                fmt="o",
                color=colour,
                capsize=4,
                markersize=6,
            )
        if numeric:
            values = [float(p.value) for p in points]
            left.set_xticks(values, [p.label for p in points])
            if values and min(values) > 0 and max(values) / min(values) >= 100:
                left.set_xscale("log")
        else:
            left.set_xticks(range(len(points)), [p.label for p in points])
        left.tick_params(axis="x", labelrotation=30 if not numeric else 0)
        if not any((p.experiment, metric) in cells for p in points):
            _no_data(left)
        left.set(title=f"{metric} by {axis.key}", xlabel=axis.key, ylabel=metric)
        _draw_bands(right, curves, "val_loss", [p.experiment for p in points], colours)
        right.set(title="validation loss curves", ylabel="val_loss")
    left_out = [p.experiment for p in axis.points if p.experiment in excluded]
    caption = (
        f"Ablation axis {axis.title}. Left: final {metric.replace('_', ' ')} for each value of "
        f"{axis.key} (mean over seeds with a 95% t-interval; dots are single seeds). Right: "
        f"the periodic validation estimate during training (eval_batches windows; the left "
        f"panel scores the split), mean over seeds with a 95% t-interval band."
        + (f" Left out (failed the leak check): {', '.join(left_out)}." if left_out else "")
    )
    return FigureFile(path, f"Ablation: {axis.title}", caption)


# ---------------------------------------------------------------- Pareto fronts


def pareto_front(points: list[tuple[float, float, str]]) -> list[str]:
    """Names of the points not dominated by another with both x and y at most as large (and one
    smaller), in increasing x. NaN points are ignored."""
    front, best = [], math.inf
    for _, y, name in sorted(p for p in points if not (math.isnan(p[0]) or math.isnan(p[1]))):
        if y < best:
            front.append(name)
            best = y
    return front


def plot_pareto(
    cells: Cells,
    datasets: dict[str, str],
    order: list[str],
    colours: Colours,
    excluded: set[str],
    path: Path,
) -> FigureFile:
    """Bits per byte against parameters, training FLOPs and wall time, with each data set's
    Pareto front (lower-left is better)."""
    names = [e for e in order if e not in excluded]
    markers = {
        d: MARKERS[i % len(MARKERS)]
        for i, d in enumerate(dict.fromkeys(datasets[e] for e in names))
    }
    with _canvas(path, ncols=len(PARETO_X), size=(15, 4.8)) as panels:
        for axes, (metric, label) in zip(panels, PARETO_X, strict=True):
            drawn = []
            for name in names:
                x, x_half = cells.get((name, metric), (math.nan, math.nan))
                y, y_half = cells.get((name, PARETO_Y), (math.nan, math.nan))
                if math.isnan(x) or math.isnan(y) or x <= 0:
                    continue
                drawn.append((x, y, name))
                axes.errorbar(
                    [x],
                    [y],
                    xerr=None if math.isnan(x_half) else [[x_half], [x_half]],
                    yerr=None if math.isnan(y_half) else [[y_half], [y_half]],
                    fmt=markers[datasets[name]],
                    color=colours[name],
                    capsize=3,
                )
                axes.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
            for dataset in markers:
                front = pareto_front([p for p in drawn if datasets[p[2]] == dataset])
                xy = {n: (x, y) for x, y, n in drawn}
                if len(front) > 1:
                    xs, ys = zip(*(xy[n] for n in front), strict=True)
                    axes.step(xs, ys, where="post", color="0.4", linestyle="--", linewidth=1)
            if drawn:
                _number_axis(axes, [x for x, _, _ in drawn])
            else:
                _no_data(axes)
            axes.set(title=f"{PARETO_Y} vs {label}", xlabel=label, ylabel=f"{PARETO_Y} (bits/byte)")
        if len(markers) > 1:
            handles = [
                panels[0].scatter([], [], marker=m, color="0.3", label=d)
                for d, m in markers.items()
            ]
            panels[0].legend(handles=handles, title="dataset", fontsize="small")
    caption = (
        "Validation bits per byte against parameters, training FLOPs and training wall time "
        "(log scale when a decade or more apart), one point per experiment with 95% t-intervals "
        "over seeds; the dashed "
        "staircase joins each data set's Pareto-optimal rows (nothing is both smaller/cheaper "
        "and better)."
        + (f" Left out (failed the leak check): {', '.join(sorted(excluded))}." if excluded else "")
    )
    return FigureFile(path, "Pareto fronts: bits per byte against size, compute and time", caption)


def _number_axis(axes: Axes, values: list[float]) -> None:
    """Log-scale the x axis when `values` span a decade or more; engineering tick labels."""
    if min(values) > 0 and max(values) / min(values) >= 10:
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.xaxis.set_major_formatter(EngFormatter())


# ---------------------------------------------------------------- BLiMP


def plot_blimp(stats: pl.DataFrame, order: list[str], path: Path) -> FigureFile | None:
    """Heat map of mean BLiMP accuracy by field (metrics blimp_<field> for the four BLiMP
    fields, and blimp_overall), one row per experiment; None when no field was recorded."""
    names = [f"{BLIMP_PREFIX}{field}" for field in (*BLIMP_FIELDS, "overall")]
    blimp = stats.filter(pl.col("metric").is_in(names))
    if not blimp.height:
        return None
    fields = [m for m in names if m in set(blimp["metric"])]
    rows = [e for e in order if e in set(blimp["experiment"])]
    means = {(e, m): v for e, m, v in blimp.select("experiment", "metric", "mean").iter_rows()}
    grid = np.array([[means.get((e, m), math.nan) for m in fields] for e in rows])
    labels = [m.removeprefix(BLIMP_PREFIX) for m in fields]
    width = 4.0 + 1.2 * len(fields)
    with _canvas(path, size=(width, 1.5 + 0.4 * len(rows))) as (axes,):
        sns.heatmap(
            grid,
            ax=axes,
            cmap="viridis",
            annot=True,
            fmt=".2f",
            xticklabels=labels,
            yticklabels=rows,
            cbar_kws={"label": "accuracy"},
        )
        axes.tick_params(axis="y", labelrotation=0)
        axes.set(title="BLiMP accuracy by field (mean over seeds)", xlabel="field")
    caption = (
        "BLiMP accuracy by linguistic field and overall (mean over seeds; chance is 0.5), one "
        "row per experiment. Accuracy per paradigm is in summary.csv."
    )
    return FigureFile(path, "BLiMP accuracy by field", caption)
