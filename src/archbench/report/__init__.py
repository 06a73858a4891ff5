"""Aggregate run results into long tables, summarise them over seeds, and render the report."""

from __future__ import annotations

from archbench.report.aggregate import (
    RunRef,
    aggregate,
    collect_samples,
    read_curves,
    read_samples,
    read_summary,
)
from archbench.report.axes import Axis, ablation_axes
from archbench.report.render import render_report
from archbench.report.stats import compare, holm, mean_ci, minimum_detectable_effect, summarize

__all__ = [
    "Axis",
    "RunRef",
    "ablation_axes",
    "aggregate",
    "collect_samples",
    "compare",
    "holm",
    "mean_ci",
    "minimum_detectable_effect",
    "read_curves",
    "read_samples",
    "read_summary",
    "render_report",
    "summarize",
]
