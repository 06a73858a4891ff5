"""Tests for archbench.report: aggregation, seed statistics, tests against baselines, Holm,
power, ablation axes, figures, samples and the rendered pages (also in headless Chromium)."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from archbench.errors import ArchbenchError
from archbench.io import read_json, write_json, write_text
from archbench.report import (
    RunRef,
    ablation_axes,
    aggregate,
    compare,
    holm,
    mean_ci,
    minimum_detectable_effect,
    read_curves,
    read_samples,
    render_report,
    summarize,
)
from archbench.report.aggregate import CURVES_SCHEMA, read_summary
from archbench.report.document import (
    Paragraph,
    Preformatted,
    Section,
    Table,
    embedded_image,
    escape_markdown,
    html_page,
    html_table,
    markdown_fence,
    markdown_page,
    markdown_table,
)
from archbench.report.figures import (
    curve_bands,
    experiment_colours,
    pareto_front,
    plot_axis,
    plot_curves,
)
from archbench.report.setup import setup_paragraph, setup_warning
from archbench.report.stats import (
    ALPHA,
    PAIRED,
    WELCH,
    paired_test,
    seeds_needed,
    t_test_power,
    welch_test,
)
from archbench.report.tables import (
    MISSING,
    NO_SCORE,
    axis_score,
    axis_table,
    comparisons,
    format_count,
    format_p,
    format_relative,
    format_scientific,
    leak_status,
    main_table,
    metric_cells,
    metric_counts,
    other_metrics_table,
    per_seed_table,
    per_seed_values,
    size_mismatched,
    verdict_of,
)

ROOT = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = ROOT / "scripts" / "check_report_html.py"
T_975_2 = 4.302652729749462  # scipy.stats.t.ppf(0.975, 2), the 95% two-sided quantile for n = 3
HW_SD1_N3 = T_975_2 / math.sqrt(3)  # 2.4841 for values [1, 2, 3]
SUITE_DEFAULTS = {"tiny": {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 128}}

# name -> (arch, dataset, overrides, baseline, final val_loss per seed, parameter count)
ROWS: dict[str, tuple[str, str, dict[str, str], str | None, list[float], int]] = {
    "gpt": ("gpt", "tiny", {}, None, [1.70, 1.71, 1.69], 812_000),
    "gpt_gelu": ("gpt", "tiny", {"mlp": "gelu"}, "gpt", [1.60, 1.62, 1.58], 812_000),
    "gpt_mqa": ("gpt", "tiny", {"n_kv_heads": "1"}, "gpt", [1.705, 1.700, 1.702], 790_000),
    "gpt_l6": ("gpt", "tiny", {"n_layer": "6"}, "gpt", [1.80, 1.82, 1.81], 1_200_000),
    "leaky": ("future_attention", "tiny", {}, "gpt", [0.50, 0.52, 0.51], 830_000),
    "solo": ("rnn", "enwik8", {}, None, [2.5], 400_000),
}
LEAKY_SEED = 1
STEPS = [0, 10, 20, 30, 40]
VAL_STEPS = {20, 40}
NASTY = "a <b>&amp; `x` ``` | *y* _z_\x00\x1b[31m \u202eevil</pre><script>alert(1)</script>"


def _eval(val_loss: float) -> dict[str, float]:
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_bpb": val_loss / math.log(2),
        "val_top1": 0.49,
        "val_top5": 0.80,
        "val_tokens": 111000,
        "val_bytes": 111000,
    }


def _train_summary(seed: int, n_params: int) -> dict[str, object]:
    return {
        "n_params": n_params,
        "n_params_non_embedding": n_params - 42_000,
        "train_flops": 15 * n_params * 3_072_000,
        "train_tokens": 3_072_000,
        "train_steps": 1500,
        "train_seconds": 410.0 + seed,
        "train_tokens_per_s": 7480.0,
        "device": "cpu",  # non-numeric: skipped
        "compiled": True,  # boolean: skipped
    }


def _metrics_csv(name: str, seed: int, val_loss: float) -> str:
    aux = name == "leaky"
    header = "step,tokens,lr,train_loss,val_loss,elapsed_seconds,tokens_per_s,train_next_token"
    lines = [header + (",train_future" if aux else "")]
    for step in STEPS:
        val = f"{val_loss + (40 - step) / 100}" if step in VAL_STEPS else ""
        train = 3 - step / 100 + seed / 100
        line = f"{step},{step * 2048},0.001,{train},{val},{step / 10},7480,{train}"
        if aux:
            line += "," if step == 0 else f",{0.01 * step}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def make_runs(root: Path, samples: bool = True) -> list[RunRef]:
    """Write synthetic run directories of every kind of result under `root`."""
    runs = []
    for name, (arch, dataset, _, _, losses, n_params) in ROWS.items():
        for seed, val_loss in enumerate(losses):
            run_dir = root / "results" / "test" / name / f"seed{seed}"
            evaluation = _eval(val_loss)
            if arch == "gpt":  # lm-eval-style and BLiMP scores (fields, a paradigm, pairs)
                evaluation |= {"hellaswag_acc": 0.25 + seed / 100, "blimp_syntax": 0.6}
                evaluation |= {"blimp_morphology": 0.55 + 0.01 * seed, "blimp_overall": 0.58}
                evaluation |= {"blimp_adjunct_island": 0.7, "blimp_pairs": 67000}
            write_json(run_dir / "eval.json", evaluation)
            write_json(run_dir / "train_summary.json", _train_summary(seed, n_params))
            leaked = name == "leaky" and seed == LEAKY_SEED
            write_json(run_dir / "leak_check.json", {"leak_check_passed": 0.0 if leaked else 1.0})
            write_text(run_dir / "metrics.csv", _metrics_csv(name, seed, val_loss))
            if samples and seed == 0:
                text = NASTY if name == "gpt" else f"sampled by {name}"
                sample = {"prompt": "ROMEO:\n", "length": 20, "temperature": 0.8}
                sample |= {"top_k": 40, "sample_seed": 0, "greedy": f"greedy {name}"}
                sample["sampled"] = text
                if name == "leaky":
                    sample["submodels"] = {"L1.0": {"greedy": "small g", "sampled": "small s"}}
                write_json(run_dir / "samples.json", sample)
            runs.append(RunRef(name, arch, dataset, seed, run_dir))
    return runs


def experiment_rows(names: list[str] | None = None) -> list[dict]:
    """The `experiments` argument of render_report, as the workflow passes it."""
    return [
        {"name": name, "arch": arch, "dataset": dataset, "overrides": overrides,
         "baseline": baseline, "description": f"row {name} <with> | markup *chars*"}
        for name, (arch, dataset, overrides, baseline, _, _) in ROWS.items()
        if names is None or name in names
    ]  # fmt: skip


def _render(root: Path, out: Path) -> list[Path]:
    return render_report(
        root / "summary.csv",
        root / "curves.csv",
        out,
        "test",
        experiment_rows(),
        samples_json=root / "samples.json",
        defaults=SUITE_DEFAULTS,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Aggregate and render the synthetic suite once for all rendering tests."""
    root = tmp_path_factory.mktemp("suite")
    runs = make_runs(root)
    aggregate(runs, root / "summary.csv", root / "curves.csv", root / "samples.json")
    paths = _render(root, root / "report")
    return {
        "root": root,
        "runs": runs,
        "summary_csv": root / "summary.csv",
        "curves_csv": root / "curves.csv",
        "paths": paths,
        "md": (root / "report" / "index.md").read_text(encoding="utf-8"),
        "html": (root / "report" / "index.html").read_text(encoding="utf-8"),
    }


def _section(md: str, title: str) -> str:
    """The Markdown between heading `title` and the next level-2 heading."""
    return md.split(f"## {title}\n")[1].split("\n## ")[0]


def _table_row(md: str, title: str, first_cell: str) -> list[str]:
    """The cells of the row starting with `first_cell` in section `title`."""
    line = next(
        line for line in _section(md, title).splitlines() if line.startswith(f"| {first_cell} |")
    )
    return [cell.strip() for cell in line.strip("|").split(" | ")]


# ---------------------------------------------------------------- aggregate


def test_summary_csv_is_long_and_complete(report: dict) -> None:
    summary = pl.read_csv(report["summary_csv"])
    assert summary.columns == ["experiment", "arch", "dataset", "seed", "metric", "value"]
    # 7 eval + 7 numeric train metrics + 1 leak check per run; gpt rows add 6 scores
    n_runs = sum(len(row[4]) for row in ROWS.values())
    n_gpt_runs = sum(len(row[4]) for row in ROWS.values() if row[0] == "gpt")
    assert summary.height == 15 * n_runs + 6 * n_gpt_runs
    assert summary.filter(pl.col("metric").is_in(["device", "compiled"])).height == 0
    assert summary.equals(summary.sort("experiment", "seed", "metric"))
    gpt = summary.filter((pl.col("experiment") == "gpt") & (pl.col("metric") == "val_loss"))
    assert gpt["value"].to_list() == [1.70, 1.71, 1.69]


def test_curves_csv_is_long_without_empty_cells(report: dict) -> None:
    curves = read_curves(report["curves_csv"])
    assert curves.columns == ["experiment", "seed", "step", "tokens", "metric", "value"]
    assert curves["value"].null_count() == 0
    n_runs = sum(len(row[4]) for row in ROWS.values())
    # per run: 5 train_loss + 5 lr + 5 train_next_token + 2 val_loss; leaky: 4 train_future
    assert curves.height == n_runs * 17 + 3 * 4
    leaky = curves.filter(pl.col("experiment") == "leaky")
    assert set(leaky["metric"]) == {"train_loss", "val_loss", "lr", "train_next_token",
                                    "train_future"}  # fmt: skip
    assert curves.filter(pl.col("metric") == "val_loss")["step"].unique().sort().to_list() == [
        20,
        40,
    ]
    assert (curves["tokens"] == curves["step"] * 2048).all()
    assert curves.equals(curves.sort("experiment", "seed", "metric", "step"))


def test_aggregate_is_deterministic(report: dict, tmp_path: Path) -> None:
    runs = list(reversed(report["runs"]))
    aggregate(runs, tmp_path / "s.csv", tmp_path / "c.csv", tmp_path / "samples.json")
    assert (tmp_path / "s.csv").read_bytes() == report["summary_csv"].read_bytes()
    assert (tmp_path / "c.csv").read_bytes() == report["curves_csv"].read_bytes()
    samples = report["root"] / "samples.json"
    assert (tmp_path / "samples.json").read_bytes() == samples.read_bytes()


def test_aggregate_reads_logs_with_different_columns_and_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = make_runs(tmp_path, samples=False)
    monkeypatch.chdir(tmp_path)
    relative = [
        RunRef(r.experiment, r.arch, r.dataset, r.seed, r.run_dir.relative_to(tmp_path))
        for r in runs
    ]
    aggregate(relative, Path("s.csv"), Path("c.csv"))
    curves = read_curves(tmp_path / "c.csv")
    per_run = curves.group_by("experiment", "seed").len()
    assert per_run.height == len(runs)
    assert curves["experiment"].null_count() == 0


def test_collect_samples_keeps_each_experiments_first_seed(report: dict) -> None:
    entries = read_json(report["root"] / "samples.json")
    assert [(e["experiment"], e["seed"]) for e in entries] == sorted((name, 0) for name in ROWS)
    chosen = read_samples(report["root"] / "samples.json")
    assert chosen["gpt"]["sampled"] == NASTY and chosen["gpt"]["sample_seed"] == 0
    assert read_samples(None) == {}


def test_corrupt_sample_file_is_named(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    bad = runs[0].run_dir / "samples.json"
    write_json(bad, {"prompt": "x"})
    with pytest.raises(ArchbenchError, match="corrupt sample file.*samples.json"):
        aggregate(runs, tmp_path / "s.csv", tmp_path / "c.csv", tmp_path / "samples.json")


def test_missing_eval_json_names_the_file(tmp_path: Path) -> None:
    runs = make_runs(tmp_path, samples=False)
    missing = runs[4].run_dir / "eval.json"
    missing.unlink()
    with pytest.raises(ArchbenchError, match="missing result file.*eval.json") as info:
        aggregate(runs, tmp_path / "s.csv", tmp_path / "c.csv")
    assert str(missing) in str(info.value)
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("train_summary.json", "{not json", "corrupt result file.*train_summary.json"),
        ("eval.json", "[1, 2]", "eval.json: expected a JSON object"),
        ("metrics.csv", "step,tokens,lr,train_loss\n0,0,0.1,3\n", r"metrics.csv.*\['val_loss'\]"),
        ("metrics.csv", "step,tokens,lr,train_loss,val_loss\n0,0,x,3,\n", "metrics.csv"),
        ("metrics.csv", "", "metrics.csv"),
    ],
)
def test_corrupt_files_raise(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    runs = make_runs(tmp_path, samples=False)
    (runs[3].run_dir / name).write_text(content, encoding="utf-8")
    with pytest.raises(ArchbenchError, match=pattern) as info:
        aggregate(runs, tmp_path / "s.csv", tmp_path / "c.csv")
    assert str(runs[3].run_dir) in str(info.value)


def test_duplicate_runs_raise(tmp_path: Path) -> None:
    runs = make_runs(tmp_path, samples=False)
    with pytest.raises(ArchbenchError, match="more than once"):
        aggregate([*runs, runs[0]], tmp_path / "s.csv", tmp_path / "c.csv")


# ---------------------------------------------------------------- summary statistics


def test_mean_ci_matches_hand_computed_t_interval() -> None:
    mean, half_width, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half_width == pytest.approx(HW_SD1_N3, rel=1e-12)
    assert half_width == pytest.approx(2.4841, abs=1e-4)
    assert mean_ci([1.0, float("nan"), 2.0, None, 3.0]) == (mean, half_width, 3)
    assert mean_ci([1.0, 2.0, 3.0], confidence=0.9)[1] < half_width


def test_mean_ci_single_and_empty() -> None:
    mean, half_width, n = mean_ci([1.5])
    assert (mean, n) == (1.5, 1)
    assert math.isnan(half_width)
    mean, half_width, n = mean_ci([float("nan")])
    assert n == 0 and math.isnan(mean) and math.isnan(half_width)


def test_mean_ci_rejects_bad_confidence() -> None:
    with pytest.raises(ArchbenchError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.0)


def _long(values: dict[str, list[float]], metric: str = "val_loss") -> pl.DataFrame:
    rows = [(e, "a", "d", s, metric, v) for e, vs in values.items() for s, v in enumerate(vs)]
    return pl.DataFrame(
        rows, schema=["experiment", "arch", "dataset", "seed", "metric", "value"], orient="row"
    )


def test_summarize_known_means_and_intervals() -> None:
    stats = summarize(_long({"x": [1.0, 2.0, 3.0], "y": [4.0, 4.0, 4.0, 4.0], "z": [7.0]}))
    assert stats.columns == ["experiment", "arch", "dataset", "metric", "n", "mean", "sd",
                             "ci_low", "ci_high", "half_width"]  # fmt: skip
    x, y, z = stats.iter_rows(named=True)
    assert (x["n"], x["mean"], x["sd"]) == (3, 2.0, 1.0)
    assert (x["ci_low"], x["ci_high"]) == pytest.approx((2.0 - HW_SD1_N3, 2.0 + HW_SD1_N3))
    assert (y["mean"], y["sd"], y["half_width"]) == (4.0, 0.0, 0.0)
    assert z["n"] == 1 and math.isnan(z["half_width"])


def test_summarize_of_the_fixture(report: dict) -> None:
    stats = summarize(pl.read_csv(report["summary_csv"]))
    row = stats.filter((pl.col("experiment") == "gpt_gelu") & (pl.col("metric") == "val_loss"))
    assert row["mean"].item() == pytest.approx(1.60)
    assert row["half_width"].item() == pytest.approx(T_975_2 * 0.02 / math.sqrt(3))


def test_summarize_rejects_inconsistent_arch() -> None:
    summary = pl.DataFrame(
        {
            "experiment": ["a", "a"],
            "arch": ["x", "y"],
            "dataset": ["d", "d"],
            "seed": [0, 1],
            "metric": ["val_loss", "val_loss"],
            "value": [1.0, 2.0],
        }
    )
    with pytest.raises(ArchbenchError, match="several arch"):
        summarize(summary)


def test_curve_bands_use_t_interval_or_min_max(report: dict) -> None:
    bands = curve_bands(read_curves(report["curves_csv"]), "val_loss")
    gpt = bands.filter((pl.col("experiment") == "gpt") & (pl.col("step") == 40)).row(0, named=True)
    assert (gpt["n"], gpt["tokens"]) == (3, 40 * 2048)
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert (gpt["low"], gpt["high"]) == pytest.approx((1.70 - half, 1.70 + half))
    solo = bands.filter(pl.col("experiment") == "solo")
    assert (solo["low"] == solo["mean"]).all() and (solo["high"] == solo["mean"]).all()


# ---------------------------------------------------------------- tests, Holm, power


def test_welch_and_paired_tests_match_scipy() -> None:
    row, base = [1.60, 1.62, 1.58, 1.61], [1.70, 1.71, 1.69]
    delta, p, se, df = welch_test(row, base)
    expected = sps.ttest_ind(row, base, equal_var=False)
    assert delta == pytest.approx(np.mean(row) - np.mean(base))
    assert p == pytest.approx(expected.pvalue, rel=1e-10)
    assert df == pytest.approx(expected.df, rel=1e-10)
    differences = [r - b for r, b in zip(row, base, strict=False)]
    delta, p, se, df = paired_test(differences)
    assert p == pytest.approx(sps.ttest_rel(row[:3], base).pvalue, rel=1e-10)
    assert df == 2 and se == pytest.approx(np.std(differences, ddof=1) / math.sqrt(3))


def test_compare_pairs_by_seed_and_falls_back_to_welch() -> None:
    base = {0: 1.70, 1: 1.75, 2: 1.65}
    row = {seed: value - 0.01 for seed, value in base.items()}  # same shift on every seed
    row[1] += 0.001
    paired = compare(row, base)
    assert paired.test == PAIRED and paired.n_pairs == 3
    assert paired.p_value == paired.p_paired < 0.01 < 0.5 < paired.p_welch  # pairing removes spread
    unpaired = compare({5: 1.69, 6: 1.74, 7: 1.64}, base)
    assert unpaired.test == WELCH and unpaired.n_pairs == 0
    assert unpaired.p_value == unpaired.p_welch and math.isnan(unpaired.p_paired)
    single = compare({0: 1.6}, base)
    assert single.test == "" and math.isnan(single.p_value) and math.isnan(single.mde)
    assert single.delta == pytest.approx(1.6 - 1.70)


def test_holm_on_a_known_case() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.5, float("nan"), 0.02])  # NaN is not part of the family
    assert adjusted[0] == pytest.approx(0.5) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.04)
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 0.8 * 2 capped at 1; monotone
    assert holm([]) == []


def test_power_reproduces_the_issues_numbers() -> None:
    """sd 0.011 over 3 seeds per row: the normal approximation says ~0.025 nats; the exact
    t-based answer is larger, 0.0338 (Welch, df 4)."""
    sd, n = 0.011, 3
    se = sd * math.sqrt(2 / n)
    normal = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * se
    assert normal == pytest.approx(0.025, abs=5e-4)
    exact = minimum_detectable_effect(se, 2 * n - 2)
    assert exact == pytest.approx(0.0338, abs=1e-4)
    assert t_test_power(exact, se, 2 * n - 2) == pytest.approx(0.8)
    assert seeds_needed(0.025, sd, paired=False) == 5
    assert seeds_needed(exact * 1.001, sd, paired=False) == 3
    assert seeds_needed(0.01, sd, paired=False) == 21
    assert seeds_needed(1e-5, sd, paired=False) == math.inf
    assert math.isnan(minimum_detectable_effect(0.0, 4))


def test_pareto_front() -> None:
    points = [(1.0, 3.0, "a"), (2.0, 2.0, "b"), (3.0, 2.5, "c"), (4.0, 1.0, "d")]
    assert pareto_front([*points, (5.0, math.nan, "e")]) == ["a", "b", "d"]


# ---------------------------------------------------------------- ablation axes


def _axes_summary(experiments: list[dict]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    return [
        (axis.key, " ".join(axis.fixed), [(p.experiment, p.label) for p in axis.points])
        for axis in ablation_axes(experiments, SUITE_DEFAULTS)
    ]


def _row(name: str, arch: str = "gpt", dataset: str = "tiny", **overrides: str) -> dict:
    return {"name": name, "arch": arch, "dataset": dataset, "overrides": overrides}


def test_ablation_axes_group_rows_differing_in_one_key() -> None:
    rows = [
        _row("base"),
        _row("gelu", mlp="gelu"),
        _row("kv1", n_kv_heads="1"),
        _row("kv2", n_kv_heads="2"),
        _row("kv0", n_kv_heads="0"),  # equals the default: same value as base
        _row("gelu_kv1", mlp="gelu", n_kv_heads="1"),
        _row("l2", n_layer="2"),
        _row("other_data", dataset="other", mlp="gelu"),
        _row("mtp", arch="mtp", n_future="2"),
    ]
    assert _axes_summary(rows) == [
        ("mlp", "", [("base", "swiglu (default)"), ("gelu", "gelu"), ("kv0", "swiglu (default)")]),
        ("mlp", "n_kv_heads=1", [("kv1", "swiglu (default)"), ("gelu_kv1", "gelu")]),
        # 0 stands for n_head (4): it is placed there, and says so
        (
            "n_kv_heads",
            "",
            [("kv1", "1"), ("kv2", "2"), ("base", "0 = 4 (default)"), ("kv0", "0 = 4")],
        ),  # fmt: skip
        ("n_kv_heads", "mlp=gelu", [("gelu_kv1", "1"), ("gelu", "0 = 4 (default)")]),
        ("n_layer", "", [("l2", "2"), ("base", "4 (default)"), ("kv0", "4 (default)")]),
    ]


def test_a_new_row_with_a_new_value_joins_its_axis() -> None:
    rows = [_row("fa", "future_attention"), _row("fa32", "future_attention", future_dim="32")]
    (axis,) = ablation_axes(rows)
    assert axis.numeric and [p.value for p in axis.points] == [32, 127]  # 0 = block_size - 1
    (axis,) = ablation_axes([*rows, _row("fa8", "future_attention", future_dim="8")])
    assert [p.experiment for p in axis.points] == ["fa8", "fa32", "fa"]
    assert axis.title == "future_attention on tiny: future_dim"
    (axis,) = ablation_axes(rows, {"tiny": {"block_size": 64}})  # the suite's block size
    assert [p.label for p in axis.points] == ["32", "0 = 63 (default)"]


def test_rows_take_the_defaults_of_their_own_data_set() -> None:
    """A suite's train_by_dataset values are the defaults of that data set's rows only: a row
    that spells out its data set's value is the same point as one that leaves it out."""
    rows = [
        _row("q", dataset="mqar"),
        _row("q_same", dataset="mqar", token_budget="5000"),
        _row("q_big", dataset="mqar", token_budget="9000"),
        _row("t", dataset="tiny"),
        _row("t_5000", dataset="tiny", token_budget="5000"),
    ]
    defaults = {"mqar": {"token_budget": 5000}, "tiny": {"token_budget": 2000}}
    mqar, tiny = ablation_axes(rows, defaults)
    with pytest.raises(ArchbenchError, match=r"defaults are by data set.*\['token_budget'\] hold"):
        ablation_axes(rows, {"token_budget": 5000})  # the flat form of before 5e872f3
    assert [(p.experiment, p.label) for p in mqar.points] == [
        ("q", "5000 (default)"),
        ("q_same", "5000"),
        ("q_big", "9000"),
    ]
    assert [(p.experiment, p.label) for p in tiny.points] == [
        ("t", "2000 (default)"),
        ("t_5000", "5000"),
    ]


def test_stand_in_zeros_resolve_from_the_rows_own_options_and_init_from_splits_axes() -> None:
    rows = [
        _row("f", "fractalformer", mlp_ratio="2"),
        _row("f96", "fractalformer", mlp_ratio="2", mlp_hidden="96"),
    ]
    (axis,) = ablation_axes(rows, {"tiny": {"d_model": 64}})
    # gpt's SwiGLU rule: 2/3 of mlp_ratio * d_model, rounded up to a multiple of 8
    assert [p.label for p in axis.points] == ["0 = 88 (default)", "96"]
    warm = {**_row("f_warm", "fractalformer", mlp_ratio="2", mlp_hidden="96"), "init_from": "x"}
    (axis,) = ablation_axes([*rows, warm], {"tiny": {"d_model": 64}})
    assert [p.experiment for p in axis.points] == ["f", "f96"]  # f_warm trained otherwise
    hourglass = [_row("h", "hourglass"), _row("h2", "hourglass", widths="64,32")]
    (axis,) = ablation_axes([*hourglass, _row("h0", "hourglass", widths="")])
    assert [p.label for p in axis.points] == ["(empty) = 128,128 (default)", "64,32",
                                              "(empty) = 128,128"]  # fmt: skip
    (axis,) = ablation_axes(hourglass, {"tiny": {"d_model": 64, "latents": "4"}})
    assert axis.points[0].label == "(empty) = 64 (default)"


def test_ablation_axes_of_training_options_and_unknown_architectures() -> None:
    rows = [_row("a"), _row("b", lr="0.003"), _row("c", lr="3e-3")]
    (axis,) = ablation_axes(rows)
    assert axis.key == "lr" and [p.label for p in axis.points] == ["0.001 (default)", "0.003",
                                                                   "0.003"]  # fmt: skip
    unknown = [_row("r1", "rnn"), _row("r2", "rnn", cell="gru"), _row("r3", "rnn", cell="lstm")]
    (axis,) = ablation_axes(unknown)
    assert [p.label for p in axis.points] == ["(default)", "gru", "lstm"] and not axis.numeric


# ---------------------------------------------------------------- render


def test_render_writes_pages_and_png_figures(report: dict) -> None:
    out = report["root"] / "report"
    names = [path.relative_to(out).as_posix() for path in report["paths"]]
    assert names[:4] == ["index.md", "index.html", "figures/val_loss.png",
                         "figures/train_loss.png"]  # fmt: skip
    assert names[4:] == [
        "figures/axis00-gpt_tiny_mlp.png",
        "figures/axis01-gpt_tiny_n_kv_heads.png",
        "figures/axis02-gpt_tiny_n_layer.png",
        "figures/pareto.png",
        "figures/aux-future_attention.png",
        "figures/blimp.png",
    ]
    for path in report["paths"][2:]:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
        name = path.relative_to(out).as_posix()
        assert f'src="{embedded_image(path)}"' in report["html"] and f"]({name})" in report["md"]
    assert report["html"].count('<img src="data:image/png;base64,') == len(report["paths"][2:])


def test_render_is_deterministic(report: dict, tmp_path: Path) -> None:
    paths = _render(report["root"], tmp_path)
    for again, first in zip(paths, report["paths"], strict=True):
        assert again.read_bytes() == first.read_bytes(), again.name


def test_report_tables_show_the_same_numbers(report: dict) -> None:
    md, page = report["md"], report["html"]
    assert md.startswith("# archbench report — suite test\n")
    assert "<title>archbench report — suite test</title>" in page
    hw = T_975_2 * 0.01 / math.sqrt(3)
    for text in (md, page):
        assert "How to read this report" in text and "Per-seed values" in text
        assert f"1.7000 ± {hw:.4f}" in text  # gpt val_loss
        assert "49.000 ± 0.000" in text and "0.81M" in text and "3.07M" in text
        for experiment in ("gpt", "gpt\\_gelu" if text is md else "gpt_gelu", "solo"):
            assert experiment in text
    row = _table_row(md, "Results", "solo")
    assert row[3] == "1" and row[8] == "2.5000"  # one seed: no interval


def test_report_follows_experiment_order(report: dict) -> None:
    results = _section(report["md"], "Results")
    rows = [line.split(" | ")[0][2:] for line in results.splitlines() if line.startswith("| ")]
    assert rows == ["experiment", "gpt", "gpt\\_gelu", "gpt\\_mqa", "gpt\\_l6", "leaky", "solo"]


def test_comparisons_mark_wins_losses_noise_and_size(report: dict) -> None:
    md = report["md"]
    header = _table_row(md, "Comparisons with baselines", "experiment")
    column = {name: i for i, name in enumerate(header)}
    gelu = _table_row(md, "Comparisons with baselines", "gpt\\_gelu")
    mqa = _table_row(md, "Comparisons with baselines", "gpt\\_mqa")
    deep = _table_row(md, "Comparisons with baselines", "gpt\\_l6")
    leaky = _table_row(md, "Comparisons with baselines", "leaky")
    assert gelu[column["verdict"]] == "✔ significantly better"
    assert deep[column["verdict"]] == "✘ significantly worse"
    assert mqa[column["verdict"]] == "within noise"
    assert leaky[column["verdict"]] == "EXCLUDED: failed the leak check"
    assert gelu[column["deciding test"]] == "paired t"
    # gelu: differences -0.10, -0.09, -0.11 -> paired p = 0.0027; Holm over 3 tests
    p_gelu = sps.ttest_rel([1.60, 1.62, 1.58], [1.70, 1.71, 1.69]).pvalue
    assert gelu[column["p (paired t)"]] == f"{p_gelu:.3f}"
    assert gelu[column["Δ (95% CI, not Holm-adjusted)"]].startswith("-0.1000 ± ")
    assert gelu[column["compared on"]] == "val\\_loss"
    assert deep[column["size"]] == "⚠ not size-matched (+47.78% parameters)"
    assert mqa[column["size"]] == "matched" and mqa[column["parameters (vs baseline)"]] == (
        "0.79M (-2.7%)"
    )
    assert "Power: " in md and "'Within noise' does not mean 'no effect'" in md
    assert 'class="win"' in report["html"] and 'class="loss"' in report["html"]


def test_holm_is_applied_across_the_reports_comparisons(report: dict) -> None:
    md = report["md"]
    header = _table_row(md, "Comparisons with baselines", "experiment")
    column = {name: i for i, name in enumerate(header)}
    names = ["gpt\\_gelu", "gpt\\_mqa", "gpt\\_l6"]
    rows = [_table_row(md, "Comparisons with baselines", name) for name in names]
    base = ROWS["gpt"][4]
    raw = [sps.ttest_rel(ROWS[n.replace("\\", "")][4], base).pvalue for n in names]
    for row, adjusted in zip(rows, holm(raw), strict=True):
        assert row[column["Holm p"]] == format_p(adjusted)


def test_ablation_views_have_a_table_and_a_figure_per_axis(report: dict) -> None:
    md = report["md"]
    views = md.split("## Ablation views\n")[1].split("\n## Curves")[0]
    assert "3 ablation axes" in views
    assert "### gpt on tiny: n\\_layer" in views
    assert "| 4 (default) | gpt |" in views and "| 6 | gpt\\_l6 |" in views
    assert "| gelu | gpt\\_gelu |" in views
    assert "](figures/axis02-gpt_tiny_n_layer.png)" in views


def test_leak_check_failures_are_excluded_loudly(report: dict) -> None:
    for page in (report["md"], report["html"]):
        assert "Future leak detected" in page
        assert "leaky (1 of 3 seeds)" in page
        assert "FAIL (1 of 3 seeds)" in page
        assert "excluded from every comparison" in page
    assert "Left out (failed the leak check): leaky." in report["md"]


def test_other_metrics_and_samples_are_shown(report: dict) -> None:
    md = report["md"]
    other = _section(md, "Other metrics")
    assert "| metric | gpt | gpt\\_gelu | gpt\\_mqa | gpt\\_l6 |\n" in other
    assert "| hellaswag\\_acc | 0.2600 ± 0.0248 | 0.2600 ± 0.0248 |" in other
    assert "blimp" not in other  # BLiMP has its own section; paradigms stay in summary.csv
    lm_eval = _section(md, "lm-eval")
    assert "| experiment | BLiMP (%) | morphology (%) | syntax (%) |" in lm_eval
    # morphology 0.55, 0.56, 0.57 over three seeds: 56.00 ± t(0.975, 2) * 1.0 / sqrt(3)
    assert "| gpt | 58.00 ± 0.00 | 56.00 ± 2.48 | 60.00 ± 0.00 | — | — | — | 67.0k |" in lm_eval
    samples = md.split("## Samples\n")[1].split("\n## ")[0]
    assert "### gpt\\_gelu (seed 0)" in samples and "sampled by gpt_gelu" in samples
    assert "greedy gpt\\_mqa" not in samples  # verbatim inside a code fence, not escaped
    assert "ROMEO:\ngreedy gpt_mqa" in samples
    assert "sub-model L1.0, greedy:\n\n```text\nROMEO:\nsmall g\n```" in samples


def test_samples_are_escaped_in_html_and_markdown(report: dict) -> None:
    md, page = report["md"], report["html"]
    assert "<script>" not in page and "\x00" not in page and "\u202e" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "⟨U+0000⟩⟨U+001B⟩[31m ⟨U+202E⟩evil" in page
    fenced = md.split("### gpt (seed 0)")[1].split("###")[0]
    assert "\n````text\nROMEO:\na <b>&amp; `x` ``` | *y* _z_⟨U+0000⟩" in fenced  # 4-tick fence
    assert "\x00" not in md and "\u202e" not in md
    description = "row gpt &lt;with&gt; \\| markup \\*chars\\*"
    assert description in md and "row gpt &lt;with&gt; | markup *chars*" in page


def test_unknown_experiment_in_order_raises(report: dict, tmp_path: Path) -> None:
    with pytest.raises(ArchbenchError, match="nope"):
        render_report(
            report["summary_csv"], report["curves_csv"], tmp_path, "t", [{"name": "nope"}]
        )


def test_declared_arch_must_match_results(report: dict, tmp_path: Path) -> None:
    rows = experiment_rows()
    rows[0] = {**rows[0], "arch": "mtp"}
    with pytest.raises(ArchbenchError, match="'gpt'.*table says arch 'mtp'"):
        render_report(report["summary_csv"], report["curves_csv"], tmp_path, "t", rows)


def test_minimal_report_without_metadata_or_samples(tmp_path: Path) -> None:
    runs = [r for r in make_runs(tmp_path, samples=False) if r.experiment in ("gpt", "solo")]
    aggregate(runs, tmp_path / "s.csv", tmp_path / "c.csv")
    paths = render_report(tmp_path / "s.csv", tmp_path / "c.csv", tmp_path / "r", "mini")
    names = [p.name for p in paths]
    assert names == ["index.md", "index.html", "val_loss.png", "train_loss.png", "pareto.png",
                     "blimp.png"]  # fmt: skip
    md = paths[0].read_text(encoding="utf-8")
    assert "No row declares a baseline" in md and "## Samples" not in md
    assert "## Ablation views" not in md and "## Experiments" not in md


def test_escaping_of_special_characters() -> None:
    nasty = "a<b & c|d"
    assert escape_markdown(nasty) == "a&lt;b &amp; c\\|d"
    assert escape_markdown("x_y *z* `q` [l](u)\n2") == "x\\_y \\*z\\* \\`q\\` \\[l\\](u) 2"
    table = Table(["h|x"], [[nasty]])
    assert markdown_table(table).splitlines() == ["| h\\|x |", "|---|", "| a&lt;b &amp; c\\|d |"]
    assert "<td>a&lt;b &amp; c|d</td>" in html_table(table)
    sections = [Section("t<i>", [Paragraph("p <b>"), table, Preformatted("l", "</pre>")])]
    page = html_page("s<&", sections, Path("unused"))
    assert "<h1>s&lt;&amp;</h1>" in page and "a<b" not in page and "<b>" not in page
    assert '<pre class="sample">&lt;/pre&gt;</pre>' in page
    md = markdown_page("s<&", sections)
    assert md.startswith("# s\\<\\&\n") and "## t\\<i\\>" in md and "p \\<b\\>" in md
    assert markdown_fence("``` x ````") == "`````text\n``` x ````\n`````"


def test_number_formats() -> None:
    assert format_count(812000) == "0.81M"
    assert format_count(1.5e9) == "1.50B"
    assert format_count(35_472) == "35.5k"
    assert format_scientific(1.2e13) == "1.2e13"
    assert format_scientific(3.0e-4) == "3.0e-4"
    assert format_p(0.01234) == "0.012" and format_p(0.00012) == "1.2e-4"
    assert (format_p(0.0499), format_p(0.0504), format_p(0.0556)) == ("0.0499", "0.0504", "0.056")
    assert (format_p(0.04996), format_p(0.05004), format_p(0.05)) == ("0.04996", "0.05004", "0.050")
    assert format_relative(1.041) == "+4.1%" and format_relative(0.9) == "-10.0%"
    # a size flag (beyond 5%) never prints as exactly 5%
    assert format_relative(1.05004, 2, 0.05) == "+5.004%"
    assert format_relative(1.0512, 2, 0.05) == "+5.12%"
    assert format_relative(1.0504, 1, 0.05) == "+5.04%"  # the parameters cell: not "+5.0%"


def test_a_leak_check_that_is_not_a_number_or_missing_is_not_a_pass() -> None:
    summary = pl.DataFrame(
        {
            "experiment": ["ok", "ok", "nan", "nan", "empty"],
            "metric": ["leak_check_passed"] * 5,
            "value": [1.0, 1.0, math.nan, 1.0, None],
        }
    )
    status = leak_status(summary, ["ok", "nan", "empty", "unchecked"])
    assert status["ok"] == "pass"
    assert status["nan"].startswith("FAIL (1 of 2")
    assert status["empty"].startswith("FAIL (1 of 1")
    assert status["unchecked"] != "pass"


def test_an_empty_value_cell_is_a_missing_value_not_a_crash() -> None:
    summary = pl.DataFrame(
        {"experiment": ["a", "a"], "seed": [0, 1], "metric": ["val_loss"] * 2, "value": [1.5, None]}
    )
    values = per_seed_values(summary, "val_loss")
    assert values["a"][0] == 1.5 and math.isnan(values["a"][1])


def test_a_mean_over_fewer_than_the_rows_seeds_says_its_n() -> None:
    summary = pl.DataFrame(
        {
            "experiment": ["a"] * 6,
            "arch": ["gpt"] * 6,
            "dataset": ["d"] * 6,
            "seed": [0, 1, 2] * 2,
            "metric": ["val_loss"] * 3 + ["val_bpb"] * 3,
            "value": [1.0, 1.2, 1.4, 2.0, math.nan, 2.2],
        }
    )
    stats = summarize(summary)
    table = main_table(summary, ["a"], metric_cells(stats), metric_counts(stats), {"a": "pass"})
    row = dict(zip(table.headers, table.rows[0], strict=True))
    assert row["seeds (n)"] == "3"
    assert row["val loss"].startswith("1.2000 ±") and "(n=" not in row["val loss"]
    assert row["val bpb"].startswith("2.1000 ±") and row["val bpb"].endswith(" (n=2)")
    assert row["val ppl"] == MISSING  # not recorded at all: no n to give


def test_other_metrics_and_axis_tables_say_the_n_of_a_mean_over_fewer_seeds() -> None:
    """A synthetic task's exact match (what task rows are compared on) averaged over fewer
    seeds than its row has is marked in the other-metrics table and on the row's axis."""
    metric = "mqar_exact_match"
    summary = _task_summary(metric, [0.60, math.nan, 0.52], [0.50, 0.60, 0.40])
    summary = summary.with_columns(arch=pl.lit("gpt"), dataset=pl.lit("mqar")).with_columns(
        pl.col("experiment").str.strip_prefix("task_")
    )
    stats = summarize(summary)
    seeds = {"row": 3, "base": 3}
    table = other_metrics_table(stats, ["row", "base"], seeds)
    assert table is not None
    cells = dict(zip(table.headers, next(r for r in table.rows if r[0] == metric), strict=True))
    assert cells["row"].endswith(" (n=2)") and "(n=" not in cells["base"]
    rows = [
        {"name": "base", "arch": "gpt", "dataset": "mqar", "overrides": {}},
        {"name": "row", "arch": "gpt", "dataset": "mqar", "overrides": {"n_layer": 5}},
    ]
    (axis,) = ablation_axes(rows, {"mqar": {"n_layer": 4}})
    table = axis_table(axis, metric_cells(stats), metric_counts(stats), {}, seeds)
    by_name = {row[1]: row[3] for row in table.rows}
    assert by_name["row"].endswith(" (n=2)") and "(n=" not in by_name["base"]


# ---------------------------------------------------------------- headless browser


def _check_html(page: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK_SCRIPT), str(page), "--table", "results",
         "--table", "comparisons"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")),
    reason="headless Chromium is not installed (Debian: apt-get install chromium)",
)
def test_html_report_renders_in_headless_chromium(report: dict, tmp_path: Path) -> None:
    done = _check_html(report["root"] / "report" / "index.html")
    assert done.returncode == 0, done.stderr
    assert "8 images loaded" in done.stdout and "#results (6 rows)" in done.stdout
    broken = tmp_path / "broken"
    shutil.copytree(report["root"] / "report", broken)
    shutil.rmtree(broken / "figures")  # the page embeds its figures: it needs no other file
    done = _check_html(broken / "index.html")
    assert done.returncode == 0, done.stderr
    page = (broken / "index.html").read_text(encoding="utf-8").replace('id="comparisons"', "")
    pareto = embedded_image(report["root"] / "report" / "figures" / "pareto.png")
    damaged = page.replace(pareto, "data:image/png;base64,bm90IGEgcG5n")
    damaged += '<img src="figures/missing.png" alt="x">'
    (broken / "index.html").write_text(damaged, encoding="utf-8")
    done = _check_html(broken / "index.html")
    assert done.returncode == 1
    assert "broken image: embedded image 'Pareto" in done.stderr
    assert "broken image: figures/missing.png" in done.stderr
    assert "missing table: #comparisons" in done.stderr


def _task_summary(metric: str, row: list[float], base: list[float]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "experiment": ["task_row"] * 3 + ["task_base"] * 3,
            "seed": [0, 1, 2] * 2,
            "metric": [metric] * 6,
            "value": row + base,
        }
    )


def test_task_rows_are_compared_on_exact_match_higher_is_better() -> None:
    """A synthetic-task row has no val loss: it is compared on its task's exact match, where a
    positive Δ is the better direction."""
    leaks = {"task_row": "pass", "task_base": "pass"}
    summary = _task_summary("path_star_exact_match", [0.60, 0.71, 0.52], [0.50, 0.60, 0.40])
    (row,) = comparisons(summary, ["task_base", "task_row"], {"task_row": "task_base"}, leaks)
    assert row.score.metric == "path_star_exact_match" and not row.score.lower_is_better
    assert row.result.test == "paired t" and row.result.delta == pytest.approx(0.11)
    assert row.verdict == "✔ significantly better"  # differences 0.10, 0.11, 0.12: p = 0.0038
    worse = _task_summary("path_star_exact_match", [0.40, 0.49, 0.28], [0.50, 0.60, 0.40])
    (row,) = comparisons(worse, ["task_base", "task_row"], {"task_row": "task_base"}, leaks)
    assert row.verdict == "✘ significantly worse"


def test_a_pair_with_neither_score_is_untested_and_says_why() -> None:
    summary = _task_summary("mqar_accuracy", [0.5, 0.4, 0.6], [0.5, 0.5, 0.5])
    leaks = {"task_row": "pass", "task_base": "pass"}
    (row,) = comparisons(summary, ["task_base", "task_row"], {"task_row": "task_base"}, leaks)
    assert row.result is None and row.verdict == NO_SCORE


def test_power_figures_are_at_holms_strictest_level() -> None:
    """With m tested comparisons the detectable Δ and seed counts are quoted at ALPHA / m: a
    difference found there stays significant after Holm's correction."""
    seeds = [0, 1, 2]
    values = {"base": [1.50, 1.52, 1.49], "a": [1.45, 1.49, 1.43], "b": [1.51, 1.50, 1.50]}
    values["c"] = [1.40, 1.41, 1.42]
    summary = pl.DataFrame(
        {
            "experiment": [name for name in values for _ in seeds],
            "seed": seeds * len(values),
            "metric": ["val_loss"] * 3 * len(values),
            "value": [v for name in values for v in values[name]],
        }
    )
    rows = comparisons(
        summary, list(values), {n: "base" for n in "abc"}, dict.fromkeys(values, "pass")
    )
    base = dict(zip(seeds, values["base"], strict=True))
    for row in rows:
        mine = dict(zip(seeds, values[row.experiment], strict=True))
        strict, loose = compare(mine, base, alpha=0.05 / 3), compare(mine, base)
        assert row.result.mde == pytest.approx(strict.mde) and strict.mde > 1.5 * loose.mde
        assert row.result.seeds_needed == strict.seeds_needed >= loose.seeds_needed
    assert math.isnan(compare(mine, base, alpha=None).mde)


def test_an_axis_of_task_rows_is_scored_on_exact_match(tmp_path: Path) -> None:
    """Task rows have no val loss: their axis table and figure show the task's exact match."""
    rows = [
        {"name": "gpt_path", "arch": "gpt", "dataset": "path_star", "overrides": {}},
        {"name": "gpt_l5_path", "arch": "gpt", "dataset": "path_star", "overrides": {"n_layer": 5}},
    ]
    (axis,) = ablation_axes(rows, {"path_star": {"n_layer": 4}})
    metric = "path_star_exact_match"
    cells = {("gpt_path", metric): (0.25, 0.1), ("gpt_l5_path", metric): (0.5, 0.2)}
    assert axis_score(axis, cells).metric == metric
    table = axis_table(axis, cells, {}, {"gpt_path": "pass", "gpt_l5_path": "pass"}, {})
    assert "path star exact match" in table.headers and "val loss" not in table.headers
    assert [row[3] for row in table.rows] == ["0.250 ± 0.100", "0.500 ± 0.200"]
    per_seed = {"gpt_path": {0: 0.2, 1: 0.3}, "gpt_l5_path": {0: 0.4, 1: 0.6}}
    curves = pl.DataFrame(schema=CURVES_SCHEMA)
    figure = plot_axis(axis, metric, per_seed, cells, curves, {"gpt_path": "C0",
                       "gpt_l5_path": "C1"}, set(), tmp_path / "axis.png")  # fmt: skip
    assert figure.path.is_file() and "final path star exact match" in figure.caption


def test_per_seed_table_shows_a_task_rows_exact_match() -> None:
    summary = _task_summary("path_star_exact_match", [0.60, 0.71, 0.52], [0.50, 0.60, 0.40])
    table = per_seed_table(summary, ["task_base", "task_row"])
    assert table.headers[-1] == "task exact match"
    assert [row[-1] for row in table.rows] == ["0.500", "0.600", "0.400", "0.600", "0.710", "0.520"]
    assert {row[2] for row in table.rows} == {"—"}  # no val loss on a task


@pytest.mark.parametrize("n", [3, 10, 14, 77])
def test_every_experiment_gets_its_own_colour(n: int) -> None:
    colours = experiment_colours([f"row{i}" for i in range(n)])
    assert len(colours) == n and len(set(colours.values())) == n


def _png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR width


def test_loss_curves_of_different_data_sets_get_their_own_panels(tmp_path: Path) -> None:
    """Losses on different data sets are not on one scale: one panel per data set."""
    curves = pl.DataFrame(
        [
            {"experiment": e, "seed": s, "step": step, "tokens": 100 * step, "metric": "val_loss",
             "value": base - 0.1 * step + 0.01 * s}
            for e, base in (("gpt", 4.0), ("mtp", 3.9), ("gpt_task", 1.0))
            for s in (0, 1)
            for step in range(4)
        ],
        schema=CURVES_SCHEMA,
    )  # fmt: skip
    colours = experiment_colours(["gpt", "mtp", "gpt_task"])
    one_set = {"gpt": "text", "mtp": "text"}
    one = plot_curves(curves, "val_loss", one_set, colours, tmp_path / "one.png", "Val", "nats")
    two_sets = {**one_set, "gpt_task": "task"}
    two = plot_curves(curves, "val_loss", two_sets, colours, tmp_path / "two.png", "Val", "nats")
    assert "panel" not in one.caption and "One panel per data set." in two.caption
    assert _png_width(two.path) > 1.2 * _png_width(one.path)


def test_a_size_exactly_at_the_tolerance_is_matched() -> None:
    assert not size_mismatched(105_000 / 100_000) and not size_mismatched(36_750 / 35_000)
    assert not size_mismatched(95_000 / 100_000) and not size_mismatched(1.0)
    assert size_mismatched(105_001 / 100_000) and size_mismatched(94_999 / 100_000)


def test_equal_differences_on_every_seed_fall_back_to_welch() -> None:
    row, base = {0: 0.5, 1: 0.25, 2: 0.75}, {0: 0.25, 1: 0.0, 2: 0.5}
    result = compare(row, base)
    assert result.test == WELCH and math.isnan(result.p_paired)
    assert result.p_value == pytest.approx(
        sps.ttest_ind(list(row.values()), list(base.values()), equal_var=False).pvalue
    )
    assert result.delta == pytest.approx(0.25) and result.mde > 0
    constant = compare({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert math.isnan(constant.p_value)  # no spread at all: nothing to test


def test_seed_counts_under_welch_use_its_degrees_of_freedom() -> None:
    """Where Welch decides, the seed count uses the Welch–Satterthwaite df of the two rows'
    spreads, as the test and the detectable Δ do: a Δ within noise at 3 seeds never reads as
    detectable at 3 (with 2n − 2 df it did: 3 seeds for this Δ of 0.22 against an MDE of 0.33)."""
    row, base = {0: 3.32, 1: 3.3201, 2: 3.3199}, {3: 3.00, 4: 3.10, 5: 3.20}
    result = compare(row, base)
    assert result.test == WELCH and result.p_value > ALPHA and result.mde > result.delta
    assert result.seeds_needed == 4
    sd = 0.02
    for effect in (0.01, 0.03, 0.1):
        same = seeds_needed(effect, sd, paired=False)
        assert seeds_needed(effect, sd, paired=False, sd_base=sd) == same
        # one row without spread: se = sd/√n and df = n − 1, the paired test's formulas
        assert seeds_needed(effect, sd, paired=False, sd_base=0.0) == seeds_needed(
            effect, sd, paired=True
        )
        assert seeds_needed(effect, 0.0, paired=False, sd_base=sd) == seeds_needed(
            effect, sd, paired=True
        )


def test_a_spread_within_float_rounding_is_no_spread() -> None:
    """A constant per-seed shift is tested by Welch whether or not rounding left its last bits
    unequal, and the same scores up to float32 noise are not 'significantly' different."""
    for base in ({0: 2.9, 1: 3.7, 2: 4.1}, {0: 2.9, 1: 3.0, 2: 3.1}):
        exact = compare({s: v + 0.25 for s, v in base.items()}, base)  # 0.25: exact in binary
        rounded = compare({s: round(v + 0.1, 10) for s, v in base.items()}, base)
        assert exact.test == rounded.test == WELCH
        assert rounded.p_value == pytest.approx(
            sps.ttest_ind(
                [v + 0.1 for v in base.values()], list(base.values()), equal_var=False
            ).pvalue
        )
    base = {0: 2.91234567, 1: 3.04567891, 2: 3.15012345}
    row = {0: 2.91234581, 1: 3.04567901, 2: 3.15012362}  # one model scored twice
    noise = compare(row, base)
    assert noise.test == WELCH and noise.p_value > 0.99
    assert verdict_of(noise, noise.p_value) == "within noise"
    flat = compare({0: 1.0, 1: 1.0 + 1e-9, 2: 1.0}, {0: 0.5, 1: 0.5, 2: 0.5 - 1e-9})
    assert math.isnan(flat.p_value)  # both rows flat up to rounding: nothing to test


def test_two_pairs_out_of_more_seeds_leave_the_decision_to_welch() -> None:
    """One missing baseline seed must not reduce the test to a df-1 paired test on the other
    two pairs; two pairs decide when they are all the seeds, three pairs always."""
    missing = compare({0: 3.00, 1: 3.02, 2: 3.01}, {0: 3.10, 1: 3.09})
    assert missing.test == WELCH and missing.n_pairs == 2 and missing.p_value < 0.01
    assert missing.p_value == pytest.approx(
        sps.ttest_ind([3.00, 3.02, 3.01], [3.10, 3.09], equal_var=False).pvalue
    )
    assert compare({0: 3.00, 1: 3.02}, {0: 3.10, 1: 3.09}).test == PAIRED
    three_of_four = compare({0: 3.0, 1: 3.02, 2: 3.01, 3: 3.03}, {0: 3.1, 1: 3.09, 2: 3.12})
    assert three_of_four.test == PAIRED and three_of_four.n_pairs == 3


def test_comparisons_between_precisions_or_devices_are_named_in_a_warning() -> None:
    """A tested pair whose runs did not all train in the same precision (`bf16_autocast` per
    seed) or on the same kind of device (`trained_on_gpu`) is named with what differs; pairs
    alike, and runs that did not record it, are not."""
    val_loss = {
        "base": [1.50, 1.52, 1.49],
        "bf16_row": [1.45, 1.49, 1.43],
        "mixed_row": [1.51, 1.50, 1.50],
        "fp32_row": [1.40, 1.41, 1.42],
        "unrecorded": [1.40, 1.41, 1.42],
        "cpu_row": [1.40, 1.43, 1.42],
    }
    bf16 = {name: [0.0, 0.0, 0.0] for name in ("base", "fp32_row", "cpu_row")}
    bf16 |= {"bf16_row": [1.0, 1.0, 1.0], "mixed_row": [1.0, 0.0, 1.0]}
    gpu = dict.fromkeys(bf16, [1.0, 1.0, 1.0]) | {"cpu_row": [1.0, 0.0, 1.0]}
    summary = pl.concat(
        [_long(val_loss), _long(bf16, "bf16_autocast"), _long(gpu, "trained_on_gpu")]
    )
    order = list(val_loss)
    leaks = dict.fromkeys(order, "pass")
    baselines = {name: "base" for name in order[1:]}
    warning = setup_warning(summary, comparisons(summary, order, baselines, leaks))
    assert warning is not None
    assert "bf16_row vs base (row: bf16 on all 3 seeds; baseline: fp32 on all 3 seeds)" in warning
    assert "mixed_row vs base (row: bf16 on 2 of 3 seeds; baseline: fp32 on all 3 seeds)" in warning
    assert "cpu_row vs base (row: GPU on 2 of 3 seeds; baseline: GPU on all 3 seeds)" in warning
    assert "with a different device and precision" in warning
    assert "fp32_row" not in warning and "unrecorded" not in warning
    alike = summary.filter(~pl.col("experiment").is_in(["bf16_row", "mixed_row", "cpu_row"]))
    assert setup_warning(alike, comparisons(alike, order, baselines, leaks)) is None
    devices_only = summary.filter(~pl.col("experiment").is_in(["bf16_row", "mixed_row"]))
    warning = setup_warning(devices_only, comparisons(devices_only, order, baselines, leaks))
    assert warning is not None and "with a different device," in warning
    assert "precision=auto" not in warning and "device=auto" in warning


def test_the_setup_warning_comes_before_the_comparisons(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    for run in runs:
        path = run.run_dir / "train_summary.json"
        write_json(path, read_json(path) | {"bf16_autocast": float(run.experiment == "gpt_gelu")})
    aggregate(runs, tmp_path / "summary.csv", tmp_path / "curves.csv", tmp_path / "samples.json")
    _render(tmp_path, tmp_path / "report")
    section = _section((tmp_path / "report" / "index.md").read_text(), "Comparisons with baselines")
    warning = "gpt\\_gelu vs gpt (row: bf16 on all 3 seeds; baseline: fp32 on all 3 seeds)"
    assert warning in section and section.index(warning) < section.index("| gpt\\_gelu")
    assert "gpt\\_mqa vs gpt" not in section


def test_the_results_say_how_the_runs_trained_and_name_the_odd_ones(tmp_path: Path) -> None:
    """One sentence when every run trained alike; a warning naming the runs outside the most
    common setup otherwise (a gpu suite job that landed on a node without a GPU)."""
    runs = make_runs(tmp_path)
    for run in runs:
        path = run.run_dir / "train_summary.json"
        odd = run.experiment == "gpt_gelu" and run.seed > 0
        setup = {"bf16_autocast": 1.0, "trained_on_gpu": 0.0 if odd else 1.0}
        write_json(path, read_json(path) | setup)
    aggregate(runs, tmp_path / "summary.csv", tmp_path / "curves.csv", tmp_path / "samples.json")
    _render(tmp_path, tmp_path / "report")
    section = _section((tmp_path / "report" / "index.md").read_text(), "Results")
    n = len(runs)
    assert (
        f"**⚠ Runs trained with different setups: {n - 2} runs trained on a GPU in bf16; 2 on "
        "the CPU in bf16 (gpt\\_gelu seeds 1, 2).**" in section
    )
    summary = read_summary(tmp_path / "summary.csv")
    rows = [run.experiment for run in runs if run.experiment != "gpt_gelu"]
    alike = setup_paragraph(summary, rows)
    assert alike is not None and not alike.warning
    assert alike.text == f"All {n - 3} runs trained on a GPU in bf16."
    unrecorded = summary.filter(~pl.col("metric").is_in(["bf16_autocast", "trained_on_gpu"]))
    assert setup_paragraph(unrecorded, rows) is None  # runs of an older archbench: no claim
