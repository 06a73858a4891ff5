"""Render a suite report: report/<suite>/index.md, index.html and figures/*.png.

The pages say, for every experiment, its mean ± 95% CI over seeds; for every row with a baseline,
whether its difference is real (paired or Welch t-test, Holm-corrected across the report) and how
large a difference these seeds could detect at all; for every ablation axis found in the table, a
figure and a small table; then Pareto fronts, auxiliary-loss curves, BLiMP by field when present,
and a generated sample per experiment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from archbench.errors import ArchbenchError
from archbench.io import write_text
from archbench.report.aggregate import read_curves, read_samples, read_summary
from archbench.report.axes import Axis, ablation_axes
from archbench.report.document import (
    Image,
    Paragraph,
    Preformatted,
    Section,
    html_page,
    markdown_page,
)
from archbench.report.figures import (
    FigureFile,
    experiment_colours,
    plot_aux,
    plot_axis,
    plot_blimp,
    plot_curves,
    plot_pareto,
)
from archbench.report.setup import setup_paragraph, setup_warning
from archbench.report.stats import ALPHA, MAX_SEEDS, PAIRED, POWER, WELCH, summarize
from archbench.report.submodels import (
    entries_after_rows,
    entry_baselines,
    nesting_cost_table,
    nesting_notes,
    split_entry,
)
from archbench.report.tables import (
    CONFIDENCE,
    MISSING,
    SIZE_TOLERANCE,
    axis_score,
    axis_table,
    comparison_table,
    comparisons,
    experiments_table,
    leak_status,
    leak_warning,
    lm_eval_table,
    main_table,
    metric_cells,
    metric_counts,
    other_metrics_table,
    per_seed_table,
    per_seed_values,
    power_summary,
)


def render_report(
    summary_csv: Path,
    curves_csv: Path,
    out_dir: Path,
    suite: str,
    experiments: list[dict] | None = None,
    samples_json: Path | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write index.md, index.html and figures/*.png under `out_dir`; return their paths.

    `experiments` describes the suite's rows in table order (name, arch, dataset, overrides,
    baseline, description); rows follow that order (experiments it omits come after it,
    sorted); without it they are sorted by name and nothing is compared. An experiment in the
    order but absent from the data is an error. `samples_json` is the file written by
    `collect_samples`; `defaults` the option values rows start from, by data set (the suite's
    model and train sections with its train_by_dataset applied), used to place rows without an
    override on their ablation axes.
    """
    out_dir = Path(out_dir)
    summary = read_summary(summary_csv)
    curves = read_curves(curves_csv)
    rows = list(experiments or [])
    order = experiment_order(summary["experiment"].unique().to_list(), [e["name"] for e in rows])
    order = entries_after_rows(order)  # a row's sub-model entries (<row>/L1.0, ...) follow it
    identity = _identity(summary)
    _check_rows(rows, identity)
    rows = [
        {"arch": identity[e["name"]][0], "dataset": identity[e["name"]][1], "overrides": {}, **e}
        for e in rows
    ]
    stats = summarize(summary, CONFIDENCE)
    cells, counts = metric_cells(stats), metric_counts(stats)
    seeds = {
        name: n
        for name, n in summary.group_by("experiment").agg(pl.col("seed").n_unique()).iter_rows()
    }
    leaks = leak_status(summary, order)
    excluded = {name for name, state in leaks.items() if state.startswith("FAIL")}
    baselines = {e["name"]: e.get("baseline") for e in rows} | entry_baselines(rows, order)
    compared = comparisons(summary, order, baselines, leaks)  # one Holm family for the report
    nested = [c for c in compared if split_entry(c.experiment)]
    compared = [c for c in compared if not split_entry(c.experiment)]
    axes = ablation_axes(rows, defaults)
    curve_figures, axis_figures, extra_figures = _draw_figures(
        summary, curves, stats, order, identity, axes, excluded, out_dir / "figures"
    )
    sections = [
        Section("How to read this report", [Paragraph(text) for text in how_to_read()]),
        *_leak_section(leaks),
        *([Section("Experiments", [experiments_table(rows)])] if rows else []),
        _results_section(summary, order, cells, counts, leaks),
        _comparison_section(compared, cells, summary),
        *_nesting_section(nested, order, rows, summary, cells),
        *_axis_sections(axes, axis_figures, cells, counts, leaks, seeds, out_dir),
        Section("Curves", [_image(f, out_dir) for f in curve_figures + extra_figures]),
        *_sample_sections(read_samples(samples_json), order),
        *_lm_eval_section(stats, order, seeds),
        *_other_metrics_section(stats, order, seeds),
        Section("Per-seed values", [per_seed_table(summary, order)]),
    ]
    title = f"archbench report — suite {suite}"
    pages = [
        (out_dir / "index.md", markdown_page(title, sections)),
        (out_dir / "index.html", html_page(title, sections, out_dir)),
    ]
    for path, text in pages:
        write_text(path, text)
    figures = [*curve_figures, *axis_figures, *extra_figures]
    return [path for path, _ in pages] + [figure.path for figure in figures]


def _draw_figures(
    summary: pl.DataFrame,
    curves: pl.DataFrame,
    stats: pl.DataFrame,
    order: list[str],
    identity: dict[str, tuple[str, str]],
    axes: list[Axis],
    excluded: set[str],
    figures_dir: Path,
) -> tuple[list[FigureFile], list[FigureFile], list[FigureFile]]:
    """Draw every figure: (loss curves, one per ablation axis, Pareto / auxiliary / BLiMP)."""
    colours = experiment_colours(order)
    cells = metric_cells(stats)
    datasets = {e: identity[e][1] for e in order}
    curve_figures = [
        plot_curves(curves, "val_loss", datasets, colours, figures_dir / "val_loss.png",
                    "Validation loss (periodic estimate on eval_batches windows)",
                    "validation loss (nats/token)"),
        plot_curves(curves, "train_loss", datasets, colours, figures_dir / "train_loss.png",
                    "Training loss (total, including auxiliary parts)",
                    "training loss (nats/token)"),
    ]  # fmt: skip
    axis_figures = []
    for index, axis in enumerate(axes):
        metric = axis_score(axis, cells).metric
        axis_figures.append(
            plot_axis(axis, metric, per_seed_values(summary, metric), cells, curves, colours,
                      excluded, figures_dir / f"axis{index:02d}-{axis.slug}.png")
        )  # fmt: skip
    extra = [plot_pareto(cells, datasets, order, colours, excluded, figures_dir / "pareto.png")]
    for arch in dict.fromkeys(identity[e][0] for e in order):
        rows = [e for e in order if identity[e][0] == arch]
        extra.append(
            plot_aux(curves, arch, rows, colours, figures_dir / f"aux-{safe_name(arch)}.png")
        )
    extra.append(plot_blimp(stats, order, figures_dir / "blimp.png"))
    return curve_figures, axis_figures, [f for f in extra if f is not None]


def experiment_order(present: list[str], requested: list[str] | None) -> list[str]:
    """Order the experiments: `requested` first (unknown names are an error), the rest sorted."""
    if not requested:
        return sorted(present)
    unknown = [name for name in requested if name not in present]
    if unknown:
        raise ArchbenchError(f"experiments without results: {unknown}")
    first = list(dict.fromkeys(requested))
    return first + sorted(set(present) - set(first))


def _identity(summary: pl.DataFrame) -> dict[str, tuple[str, str]]:
    """{experiment: (arch, dataset)} from the results."""
    info = summary.group_by("experiment").agg(pl.col("arch").first(), pl.col("dataset").first())
    return {name: (arch, dataset) for name, arch, dataset in info.iter_rows()}


def _check_rows(rows: list[dict], identity: dict[str, tuple[str, str]]) -> None:
    """Raise when a row's declared arch or data set disagrees with its results."""
    for row in rows:
        found = identity.get(row["name"])
        for index, key in enumerate(("arch", "dataset")):
            if found and key in row and row[key] != found[index]:
                raise ArchbenchError(
                    f"experiment '{row['name']}': the table says {key} '{row[key]}', its "
                    f"results say '{found[index]}'"
                )


def safe_name(text: str) -> str:
    """`text` reduced to a file-name-safe form."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _image(figure: FigureFile, out_dir: Path) -> Image:
    """A page image for a written figure (path relative to the page)."""
    return Image(figure.path.relative_to(out_dir).as_posix(), figure.title, figure.caption)


# ---------------------------------------------------------------- sections


def how_to_read() -> list[str]:
    """The explanatory paragraphs at the top of both pages (plain text)."""
    percent = f"{CONFIDENCE:.0%}"
    return [
        f"Results: each metric cell is the mean over the n seeds of an experiment ± the half-width"
        f" of a two-sided {percent} Student-t confidence interval for that mean (n = 1: the value "
        f"alone); a mean over fewer of the row's seeds, where a seed did not record the value, "
        f"says its n, e.g. '(n=2)'. Lower loss, bits per byte (bpb) and perplexity (ppl) are "
        f"better; higher top-1/top-5 accuracy is better. 'val loss' is the final checkpoint's on "
        f"the validation split (all of it, unless the suite's eval.max_tokens caps it, as the "
        f"smoke suite does); 'best val loss' and 'best at step' are the lowest of the estimates "
        f"taken during training (a few evenly spaced validation batches every eval_every steps, in"
        f" the training precision: bf16 on a GPU and on a CPU with AMX, as each run's "
        f"train_summary.json records) and when: on a small data set a model can "
        f"overfit before its last step, and nanoGPT reports that minimum. Parameters, training "
        f"tokens, FLOPs and wall time stand beside the scores because comparisons are only fair at"
        f" matched size and compute. 'train FLOPs' is torch's FLOP count (FlopCounterMode: matrix "
        f"products and attention, causal attention counted as full, a fused attention backward "
        f"as twice its forward) of one forward and backward pass on the first batch, times the "
        f"number of steps: for the baseline, nanoGPT's 6N + 12·L·d·T per token. Element-wise "
        f"work, the optimizer and evaluation are not in it. 'leak check' says whether every "
        f"seed's checkpoint passed the automatic future-leak test; rows that failed are excluded "
        f"from every comparison. {MISSING} marks a value that was not recorded. Entries named "
        f"<row>/L<level>.<index> are a row's nested sub-models, each scored alone (see "
        f"'Nesting cost').",
        f"Comparisons: each row with a baseline is compared on validation loss (Δ = row − "
        f"baseline, negative is better), a synthetic-task row on its task's exact match (positive "
        f"is better); 'compared on' names the metric. Every seed gives every row the same data "
        f"order, so rows are paired by seed and the {PAIRED}-test on per-seed differences decides "
        f"when both rows have the same seeds (at least two) or share at least three; otherwise "
        f"{WELCH}-test (unequal variances) on all seeds decides, as it does when every shared "
        f"seed differs by the same amount up to float rounding (the paired test is then "
        f"undefined). "
        f"Both p-values are listed and the 'deciding test' column names the one used; the paired "
        f"Δ is over the shared seeds ('pairs'), so it can differ from the difference of the row "
        f"means when some seeds are missing. Its 95% CI is not Holm-adjusted. Holm's "
        f"correction across all comparisons of this report keeps the chance of any false "
        f"'significant' at {ALPHA:.0%}: a row is 'significantly better/worse' only when its Holm p"
        f" < {ALPHA}, else 'within noise'. Rows whose parameter count differs from the baseline's "
        f"by more than {SIZE_TOLERANCE:.0%} are flagged as not size-matched.",
        f"Power: 'detectable Δ' is the smallest true difference the deciding test would find "
        f"with {POWER:.0%} probability at these seeds and the observed spread (exact, from the "
        f"noncentral t distribution), at level {ALPHA}/m for the m tested comparisons: Holm's "
        f"strictest threshold, so a difference found there is significant after the correction "
        f"too. A row 'within noise' may still differ by up to about its detectable Δ. 'seeds "
        f"to detect this Δ' is how many seeds per row (pairs, where the paired test decides) "
        f"would find the observed Δ with {POWER:.0%} power at the same level, with the deciding "
        f"test's spread and degrees of freedom (> {MAX_SEEDS}: practically never).",
        "Ablation views: rows with the same architecture and data set that differ in exactly "
        "one option form an axis (rows warm-started from different checkpoints never do); "
        "each axis has a table, the final validation loss (a task row's exact match) against "
        "the option's value (mean with 95% CI, dots = seeds) and the rows' validation curves. A "
        "0 that stands for a value derived from other options is placed at that value and "
        "labelled so: n_kv_heads '0 = 4' with 4 heads. "
        "Curves show the mean over seeds with a 95% t-interval band (min–max where fewer than "
        "two seeds logged a step). Samples are continuations of a fixed prompt by the first "
        "seed's checkpoint, greedy and sampled, shown verbatim.",
    ]


def _leak_section(leaks: dict[str, str]) -> list[Section]:
    """The loud warning about failed leak checks, if any."""
    warning = leak_warning(leaks)
    if warning is None:
        return []
    return [Section("Future leak detected", [Paragraph(warning, warning=True)], warning=True)]


def _results_section(
    summary: pl.DataFrame,
    order: list[str],
    cells: dict,
    counts: dict[tuple[str, str], int],
    leaks: dict[str, str],
) -> Section:
    """How the runs trained (device, precision), then every experiment's metrics over seeds."""
    setup = setup_paragraph(summary, [e for e in order if not split_entry(e)])
    table = main_table(summary, order, cells, counts, leaks)
    return Section("Results", [setup, table] if setup else [table])


def _comparison_section(compared: list, cells: dict, summary: pl.DataFrame) -> Section:
    """Comparisons with baselines (after a warning if a row and its baseline trained in
    different precisions or on different devices), the power summary, or why there are none."""
    if not compared:
        text = "No row declares a baseline in this suite, so nothing is compared."
        return Section("Comparisons with baselines", [Paragraph(text)])
    warning = setup_warning(summary, compared)
    blocks: list = [Paragraph(warning, warning=True)] if warning else []
    blocks.append(comparison_table(compared, cells))
    power = power_summary(compared)
    if power:
        blocks.append(Paragraph(power))
    return Section("Comparisons with baselines", blocks)


def _nesting_section(
    nested: list, order: list[str], rows: list[dict], summary: pl.DataFrame, cells: dict
) -> list[Section]:
    """The nesting-cost table of the sub-model entries, if the results have any."""
    if not any(split_entry(name) for name in order):
        return []
    blocks: list = [Paragraph(text) for text in nesting_notes(rows)]
    warning = setup_warning(summary, nested)
    if warning:
        blocks.append(Paragraph(warning, warning=True))
    if nested:
        blocks.append(nesting_cost_table(nested, summary, cells))
    else:
        blocks.append(Paragraph("No row names sub-model baselines (column submodel_baselines)."))
    return [Section("Nesting cost: sub-models against models of their size trained alone", blocks)]


def _axis_sections(
    axes: list[Axis],
    figures: list[FigureFile],
    cells: dict,
    counts: dict[tuple[str, str], int],
    leaks: dict[str, str],
    seeds: dict[str, int],
    out_dir: Path,
) -> list[Section]:
    """An overview section and one sub-section (table + figure) per ablation axis."""
    if not axes:
        return []
    intro = Paragraph(
        f"{len(axes)} ablation axes were found in the experiments table (rows of one "
        f"architecture and data set that differ in exactly one option)."
    )
    return [
        Section("Ablation views", [intro]),
        *(
            Section(
                axis.title,
                [axis_table(axis, cells, counts, leaks, seeds), _image(figure, out_dir)],
                3,
            )
            for axis, figure in zip(axes, figures, strict=True)
        ),
    ]


def _sample_sections(samples: dict[str, dict], order: list[str]) -> list[Section]:
    """One generated sample per experiment (greedy and sampled), verbatim."""
    present = [name for name in order if name in samples]
    if not present:
        return []
    first = samples[present[0]]
    intro = Paragraph(
        f"Each experiment's first seed continues the prompt {first.get('prompt', '')!r} by "
        f"{first.get('length', '?')} tokens through the same forward pass that evaluation "
        f"scores: greedy (most likely token) and sampled (temperature "
        f"{first.get('temperature', '?')}, top-k {first.get('top_k', '?')}, sampling seed "
        f"{first.get('sample_seed', '?')})."
    )
    sections = [Section("Samples", [intro])]
    for name in present:
        sample = samples[name]
        prompt = str(sample.get("prompt", ""))
        sources = [("", sample), *((f"sub-model {k}, ", v) for k, v in _nested(sample))]
        blocks = [
            Preformatted(f"{source}{kind}:", prompt + str(texts.get(kind, "")))
            for source, texts in sources
            for kind in ("greedy", "sampled")
        ]
        sections.append(Section(f"{name} (seed {sample.get('seed', '?')})", blocks, level=3))
    return sections


def _nested(sample: dict) -> list[tuple[str, dict]]:
    """The (name, texts) of a sample's sub-models, if it has any."""
    nested = sample.get("submodels")
    if not isinstance(nested, dict):
        return []
    return [(str(k), v) for k, v in nested.items() if isinstance(v, dict)]


def _lm_eval_section(stats: pl.DataFrame, order: list[str], seeds: dict[str, int]) -> list[Section]:
    """BLiMP by field and the harness's rolling bits-per-byte, if any run has them."""
    table = lm_eval_table(stats, order, seeds)
    if table is None:
        return []
    intro = Paragraph(
        "lm-evaluation-harness, offline, on every checkpoint: BLiMP accuracy (a pair counts 1 "
        "when the grammatical sentence is more likely, 0.5 on a tie; chance is 50%) overall and "
        "by linguistic field, over the pairs per paradigm that the suite sets (their total in "
        'the column "BLiMP pairs"); '
        "and rolling-window bits-per-byte of the held-out split through the harness, which "
        'should agree with "val bpb" above. Mean ± 95% t-interval over seeds; per-paradigm '
        "accuracies are in summary.csv."
    )
    return [Section("lm-eval", [intro, table])]


def _other_metrics_section(
    stats: pl.DataFrame, order: list[str], seeds: dict[str, int]
) -> list[Section]:
    """Every other recorded metric (lm-eval extras, synthetic tasks), if any."""
    table = other_metrics_table(stats, order, seeds)
    return [Section("Other metrics", [table])] if table else []
