"""How each run trained (precision, device), and the report's warnings where runs differ in it.

`train_summary.json` records each setting as a number, 1 or 0 per run (`bf16_autocast`,
`trained_on_gpu`), so that it reaches summary.csv like any metric. `precision=auto` and
`device=auto` resolve per machine, so runs of one suite can differ: a cluster node without a
GPU trains the gpu suite's jobs on its CPU, a CPU with AMX trains in bf16 where another trains
in fp32.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import polars as pl

from archbench.report.document import Paragraph
from archbench.report.tables import ComparisonRow, per_seed_values


@dataclass(frozen=True)
class SetupFlag:
    """One recorded 1-or-0 training setting: its metric, what it is, its two values' short names
    and phrases (for 1, then for 0), and how a user makes runs agree on it."""

    metric: str
    what: str
    names: tuple[str, str]
    phrases: tuple[str, str]
    advice: str

    def name(self, value: float) -> str:
        """The value's short name ('bf16', 'fp32', ...)."""
        return self.names[value != 1]

    def phrase(self, value: float) -> str:
        """The value as a phrase of a sentence ('in bf16', 'on the CPU', ...); NaN: unrecorded."""
        return f"({self.what} not recorded)" if math.isnan(value) else self.phrases[value != 1]


SETUP_FLAGS = (
    SetupFlag(
        "trained_on_gpu",
        "device",
        ("GPU", "CPU"),
        ("on a GPU", "on the CPU"),
        "device=auto trains on the CPU where torch finds no GPU, e.g. on a cluster node in a "
        "partition without GPUs: check the partition and the torch build on the nodes",
    ),
    SetupFlag(
        "bf16_autocast",
        "precision",
        ("bf16", "fp32"),
        ("in bf16", "in fp32"),
        "precision=auto resolves per machine, to bf16 autocast on a CUDA GPU with bf16 and on a "
        "CPU with AMX, fp32 elsewhere: set precision to fp32 or bf16 in the suite's train section",
    ),
)


def _recorded(summary: pl.DataFrame, flag: SetupFlag) -> dict[str, list[float]]:
    """{experiment: the flag's values over the seeds that recorded it}."""
    return {
        name: [v for v in by_seed.values() if math.isfinite(v)]
        for name, by_seed in per_seed_values(summary, flag.metric).items()
    }


def _share(flag: SetupFlag, values: list[float]) -> str:
    """'bf16 on all 3 seeds', 'CPU on all 1 seed' or 'bf16 on 2 of 3 seeds'."""
    n, ones = len(values), sum(value == 1 for value in values)
    if ones in (0, n):
        return f"{flag.name(1 if ones else 0)} on all {n} seed{'s' * (n != 1)}"
    return f"{flag.name(1)} on {ones} of {n} seeds"


def setup_warning(summary: pl.DataFrame, rows: list[ComparisonRow]) -> str | None:
    """The warning naming tested comparisons whose runs did not all train in the same precision
    or on the same kind of device (per seed, as recorded), or None. Runs that did not record a
    setting are not judged on it."""
    recorded = {flag: _recorded(summary, flag) for flag in SETUP_FLAGS}
    mixed, differing = [], []
    for row in rows:
        if row.result is None:
            continue
        row_side, base_side = [], []
        for flag, values in recorded.items():
            row_runs, base_runs = values.get(row.experiment, []), values.get(row.baseline, [])
            if row_runs and base_runs and len(set(row_runs) | set(base_runs)) > 1:
                row_side.append(_share(flag, row_runs))
                base_side.append(_share(flag, base_runs))
                differing.append(flag)
        if row_side:
            mixed.append(
                f"{row.experiment} vs {row.baseline} (row: {', '.join(row_side)}; "
                f"baseline: {', '.join(base_side)})"
            )
    if not mixed:
        return None
    flags = [flag for flag in SETUP_FLAGS if flag in differing]
    what = " and ".join(flag.what for flag in flags)
    advice = "; ".join(flag.advice for flag in flags)
    return (
        f"These comparisons pair runs that trained with a different {what}, so part of their Δ "
        f"may come from that rather than from the architecture ({advice}). Re-run them once "
        "they agree: " + "; ".join(mixed) + "."
    )


def setup_paragraph(summary: pl.DataFrame, experiments: list[str]) -> Paragraph | None:
    """One sentence on how the runs of `experiments` trained ('All 12 runs trained on a GPU in
    bf16.'; with several setups, a warning with each one's count and the runs outside the most
    common one), or None when no run recorded its setup."""
    values = {flag: per_seed_values(summary, flag.metric) for flag in SETUP_FLAGS}
    runs = summary.filter(pl.col("experiment").is_in(experiments)).select("experiment", "seed")
    setups = {
        (experiment, seed): " ".join(
            flag.phrase(by_experiment.get(experiment, {}).get(seed, math.nan))
            for flag, by_experiment in values.items()
        )
        for experiment, seed in sorted(set(runs.iter_rows()))
    }
    unrecorded = " ".join(flag.phrase(math.nan) for flag in SETUP_FLAGS)
    counts = Counter(setups.values())
    if not counts or set(counts) == {unrecorded}:
        return None
    if len(counts) == 1:
        ((setup, n),) = counts.items()
        return Paragraph(f"All {n} runs trained {setup}." if n > 1 else f"The run trained {setup}.")
    common = counts.most_common(1)[0][0]
    parts = [f"{counts[common]} runs trained {common}"]
    for setup in sorted(set(counts) - {common}):
        seeds: dict[str, list[str]] = {}
        for (experiment, seed), described in setups.items():
            if described == setup:
                seeds.setdefault(experiment, []).append(str(seed))
        named = "; ".join(f"{e} seed{'s' * (len(s) > 1)} {', '.join(s)}" for e, s in seeds.items())
        parts.append(f"{counts[setup]} {setup} ({named})")
    text = "Runs trained with different setups: " + "; ".join(parts) + "."
    return Paragraph(text, warning=True)
