"""Nested sub-models as entries of the results and the report: `<row>/L1.0`, `<row>/L2.3`, ...

An evaluation job of a model with nested sub-models (fractalformer) writes, under `submodels`
of its result file, one flat object of metrics per sub-model (archbench.evaluate.submodels). The
aggregator turns each into rows of summary.csv with the experiment `<row>/<sub-model>` (the
row's arch, data set and seed), so every table, interval and test treats a sub-model like any
experiment. The row's `submodel_baselines` cell (by level, `L1=solo64`, or by sub-model,
`L1.1=other`) names the model of the same size trained alone that each entry is compared with:
the nesting-cost table says what sharing weights inside the bigger model costs each sub-model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from archbench.errors import ArchbenchError
from archbench.evaluate.submodels import SUBMODELS
from archbench.report.document import Table
from archbench.report.stats import compare
from archbench.report.tables import (
    CONFIDENCE,
    MISSING,
    PRIMARY,
    Cells,
    ComparisonRow,
    format_count,
    format_interval,
    format_p,
    per_seed_values,
    verdict_class,
)

SEPARATOR = "/"
_LEVEL = re.compile(r"(L\d+)\.\d+")


def entry_name(row: str, submodel: str) -> str:
    """The experiment name of a row's sub-model in summary.csv and the report."""
    return f"{row}{SEPARATOR}{submodel}"


def split_entry(name: str) -> tuple[str, str] | None:
    """(row, sub-model) of a sub-model entry's name; None for a row's own name (row names
    cannot contain the separator)."""
    row, sep, submodel = name.partition(SEPARATOR)
    return (row, submodel) if sep else None


def submodel_results(result: Mapping[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """The `submodels` object of one result file's JSON object ({} without one); ArchbenchError
    naming the file when it is not an object of objects."""
    nested = result.get(SUBMODELS, {})
    if not isinstance(nested, dict) or not all(isinstance(v, dict) for v in nested.values()):
        raise ArchbenchError(f"corrupt result file {path}: '{SUBMODELS}' is not an object")
    return nested


def entries_after_rows(order: list[str]) -> list[str]:
    """`order` with every sub-model entry moved right after its row (entries of one row keep
    their order); entries whose row is absent stay where they were."""
    rows = {name for name in order if split_entry(name) is None}
    children: dict[str, list[str]] = {}
    for name in order:
        parts = split_entry(name)
        if parts and parts[0] in rows:
            children.setdefault(parts[0], []).append(name)
    placed = {child for group in children.values() for child in group}
    out = []
    for name in order:
        if name not in placed:
            out.append(name)
            out.extend(children.get(name, []))
    return out


def submodel_baseline(cell: Mapping[str, str], submodel: str) -> str | None:
    """The baseline row of `submodel` from a row's submodel_baselines {key: row}: its own
    name first (L1.1), then its level (L1)."""
    if submodel in cell:
        return cell[submodel]
    match = _LEVEL.fullmatch(submodel)
    return cell.get(match[1]) if match else None


def entry_baselines(rows: list[dict], order: list[str]) -> dict[str, str | None]:
    """{entry: baseline row} of every sub-model entry in `order`, from its row's
    `submodel_baselines` (None where the row names none)."""
    cells = {row["name"]: row.get("submodel_baselines") or {} for row in rows}
    baselines = {}
    for name in order:
        parts = split_entry(name)
        if parts:
            baselines[name] = submodel_baseline(cells.get(parts[0], {}), parts[1])
    return baselines


def nesting_cost_table(rows: list[ComparisonRow], summary: pl.DataFrame, cells: Cells) -> Table:
    """Per sub-model entry: its size and its solo baseline's, both scores, Δ val loss (the
    report's test, Holm-corrected with all its comparisons) and Δ bits-per-byte, with 95% CIs."""
    bpb = per_seed_values(summary, "val_bpb")
    out, classes = [], []
    for row in rows:
        delta_bpb = compare(bpb.get(row.experiment, {}), bpb.get(row.baseline, {}), CONFIDENCE)
        r = row.result
        out.append(
            [
                row.experiment,
                format_count(cells.get((row.experiment, "n_params"), (math.nan,))[0]),
                row.baseline,
                format_count(cells.get((row.baseline, "n_params"), (math.nan,))[0]),
                format_interval(*cells.get((row.experiment, PRIMARY), (math.nan, math.nan)), 4),
                format_interval(*cells.get((row.baseline, PRIMARY), (math.nan, math.nan)), 4),
                MISSING if r is None else format_interval(r.delta, r.half_width, 4),
                MISSING if r is None else format_interval(delta_bpb.delta, delta_bpb.half_width, 4),
                format_p(row.holm_p),
                row.verdict,
            ]
        )
        classes.append(verdict_class(row.verdict))
    headers = [
        "sub-model",
        "parameters",
        "trained alone",
        "its parameters",
        "val loss",
        "alone: val loss",
        "Δ val loss (95% CI)",
        "Δ val bpb (95% CI)",
        "Holm p",
        "verdict",
    ]
    return Table(headers, out, id="nesting-cost", row_classes=classes)


def nesting_notes(rows: list[dict]) -> list[str]:
    """How to read the nesting-cost table, and which rows were initialised from others."""
    notes = [
        "Every nested sub-model of a row is its own entry <row>/L<level>.<index>: it is scored "
        "alone on the same held-out windows (its own forward pass, its own parameter count) and "
        "leak-checked alone. Each is compared with a model of its shape trained alone (the "
        "row's submodel_baselines column): Δ = sub-model − alone, paired by seed; a positive "
        "Δ is what nesting costs it. The val-loss tests are Holm-corrected together with the "
        "report's other comparisons; the bits-per-byte interval is not corrected."
    ]
    merged = [row for row in rows if row.get("init_from")]
    if merged:
        notes.append(
            "Rows initialised from other rows' checkpoints (init_from): "
            + "; ".join(f"{row['name']} ({row['init_from']})" for row in merged)
            + ". A frozen sub-model copied from a row at the same seed equals that row exactly "
            "(Δ = 0 without spread); what merging buys the whole model is the row's comparison "
            "with its baseline under 'Comparisons with baselines'."
        )
    return notes
