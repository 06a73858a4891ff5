"""Aggregate run results into long tables, summarise them over seeds, and render the report."""

from __future__ import annotations

from archbench.report.aggregate import RunRef, aggregate, read_curves, read_summary
from archbench.report.render import render_report
from archbench.report.stats import mean_ci, summarize

__all__ = [
    "RunRef",
    "aggregate",
    "mean_ci",
    "read_curves",
    "read_summary",
    "render_report",
    "summarize",
]
