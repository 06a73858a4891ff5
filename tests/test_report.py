"""Tests for archbench.report: aggregation into long tables, seed statistics and rendering."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from archbench.errors import ArchbenchError
from archbench.io import write_json, write_text
from archbench.report import RunRef, aggregate, mean_ci, read_curves, render_report, summarize
from archbench.report.render import (
    Table,
    curve_bands,
    escape_markdown,
    format_count,
    format_scientific,
    html_page,
    html_table,
    markdown_table,
)

T_975_2 = 4.302652729749462  # scipy.stats.t.ppf(0.975, 2), the 95% two-sided quantile for n = 3
HW_SD1_N3 = T_975_2 / math.sqrt(3)  # 2.4841 for values [1, 2, 3]

# experiment -> (arch, dataset, final val_loss per seed)
EXPERIMENTS = {
    "base": ("transformer", "tinystories", [1.0, 2.0, 3.0]),
    "wide": ("transformer_wide", "tinystories", [1.5, 1.6, 1.7]),
    "moe": ("moe", "enwik8", [1.2, 1.3, 1.4]),
    "solo": ("rnn", "enwik8", [2.5]),
}
STEPS = [0, 10, 20, 30, 40]
VAL_STEPS = {20, 40}


def _eval(experiment: str, val_loss: float) -> dict[str, float]:
    metrics = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_bpb": val_loss / math.log(2),
        "val_top1": 0.49,
        "val_top5": 0.80,
        "val_tokens": 111000,
        "val_bytes": 111000,
    }
    if experiment == "moe":
        del metrics["val_top5"]
    return metrics


def _train_summary(seed: int) -> dict[str, object]:
    return {
        "n_params": 812000,
        "n_params_non_embedding": 770000,
        "train_flops": 1.2e13,
        "train_tokens": 3072000,
        "train_steps": 1500,
        "train_seconds": 410.0 + seed,
        "train_tokens_per_s": 7480.0,
        "final_train_loss": 1.6,
        "device": "cpu",  # non-numeric: skipped
        "compiled": True,  # boolean: skipped
    }


def _metrics_csv(experiment: str, seed: int, val_loss: float) -> str:
    aux = experiment == "moe"
    header = "step,tokens,lr,train_loss,val_loss,elapsed_seconds,tokens_per_s"
    lines = [header + (",train_router" if aux else "")]
    for step in STEPS:
        val = f"{val_loss + (40 - step) / 100}" if step in VAL_STEPS else ""
        line = f"{step},{step * 2048},0.001,{3 - step / 100 + seed / 100},{val},{step / 10},7480"
        if aux:
            line += "," if step == 0 else f",{0.01 * step}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def make_runs(root: Path) -> list[RunRef]:
    """Write synthetic run directories under `root` and return their references."""
    runs = []
    for experiment, (arch, dataset, losses) in EXPERIMENTS.items():
        for seed, val_loss in enumerate(losses):
            run_dir = root / "results" / "test" / experiment / f"seed{seed}"
            write_json(run_dir / "eval.json", _eval(experiment, val_loss))
            write_json(run_dir / "train_summary.json", _train_summary(seed))
            leaked = experiment == "moe" and seed == 1
            write_json(run_dir / "leak_check.json", {"leak_check_passed": 0.0 if leaked else 1.0})
            write_text(run_dir / "metrics.csv", _metrics_csv(experiment, seed, val_loss))
            runs.append(RunRef(experiment, arch, dataset, seed, run_dir))
    return runs


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Aggregate and render the synthetic suite once for all rendering tests."""
    root = tmp_path_factory.mktemp("suite")
    runs = make_runs(root)
    summary_csv, curves_csv = root / "summary.csv", root / "curves.csv"
    aggregate(runs, summary_csv, curves_csv)
    paths = render_report(
        summary_csv, curves_csv, root / "report", "test", [{"name": "wide"}, {"name": "base"}]
    )
    return {
        "root": root,
        "runs": runs,
        "summary_csv": summary_csv,
        "curves_csv": curves_csv,
        "paths": paths,
        "md": (root / "report" / "index.md").read_text(encoding="utf-8"),
        "html": (root / "report" / "index.html").read_text(encoding="utf-8"),
    }


# ---------------------------------------------------------------- aggregate


def test_summary_csv_is_long_and_complete(report: dict) -> None:
    summary = pl.read_csv(report["summary_csv"])
    assert summary.columns == ["experiment", "arch", "dataset", "seed", "metric", "value"]
    # 7 eval + 8 numeric train metrics + 1 leak check per run; moe lacks val_top5; 10 runs
    assert summary.height == 3 * 16 + 3 * 16 + 3 * 15 + 1 * 16
    assert summary.filter(pl.col("metric").is_in(["device", "compiled"])).height == 0
    assert summary.equals(summary.sort("experiment", "seed", "metric"))
    base = summary.filter((pl.col("experiment") == "base") & (pl.col("metric") == "val_loss"))
    assert base["value"].to_list() == [1.0, 2.0, 3.0]


def test_curves_csv_is_long_without_empty_cells(report: dict) -> None:
    curves = read_curves(report["curves_csv"])
    assert curves.columns == ["experiment", "seed", "step", "tokens", "metric", "value"]
    assert curves["value"].null_count() == 0
    # per run: 5 train_loss + 5 lr + 2 val_loss; moe adds 4 non-empty train_router cells
    assert curves.height == 10 * 12 + 3 * 4
    moe = curves.filter(pl.col("experiment") == "moe")
    assert set(moe["metric"]) == {"train_loss", "val_loss", "lr", "train_router"}
    assert curves.filter(pl.col("metric") == "val_loss")["step"].unique().sort().to_list() == [
        20,
        40,
    ]
    assert (curves["tokens"] == curves["step"] * 2048).all()


def test_aggregate_is_deterministic(report: dict, tmp_path: Path) -> None:
    aggregate(list(reversed(report["runs"])), tmp_path / "s.csv", tmp_path / "c.csv")
    assert (tmp_path / "s.csv").read_bytes() == report["summary_csv"].read_bytes()
    assert (tmp_path / "c.csv").read_bytes() == report["curves_csv"].read_bytes()


def test_missing_eval_json_names_the_file(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
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
    runs = make_runs(tmp_path)
    (runs[0].run_dir / name).write_text(content, encoding="utf-8")
    with pytest.raises(ArchbenchError, match=pattern):
        aggregate(runs, tmp_path / "s.csv", tmp_path / "c.csv")


def test_duplicate_runs_raise(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    with pytest.raises(ArchbenchError, match="more than once"):
        aggregate([*runs, runs[0]], tmp_path / "s.csv", tmp_path / "c.csv")


# ---------------------------------------------------------------- stats


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


def test_summarize_one_row_per_experiment_and_metric(report: dict) -> None:
    summary = pl.read_csv(report["summary_csv"])
    stats = summarize(summary)
    assert stats.columns == [
        "experiment",
        "arch",
        "dataset",
        "metric",
        "n",
        "mean",
        "sd",
        "ci_low",
        "ci_high",
        "half_width",
    ]
    assert stats.height == summary.select("experiment", "metric").unique().height
    base = stats.filter((pl.col("experiment") == "base") & (pl.col("metric") == "val_loss")).row(
        0, named=True
    )
    assert (base["arch"], base["dataset"], base["n"]) == ("transformer", "tinystories", 3)
    assert base["mean"] == pytest.approx(2.0)
    assert base["sd"] == pytest.approx(1.0)
    assert base["ci_low"] == pytest.approx(2.0 - HW_SD1_N3)
    assert base["ci_high"] == pytest.approx(2.0 + HW_SD1_N3)
    solo = stats.filter((pl.col("experiment") == "solo") & (pl.col("metric") == "val_loss"))
    assert solo["n"].item() == 1 and math.isnan(solo["half_width"].item())


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
    base = bands.filter((pl.col("experiment") == "base") & (pl.col("step") == 40)).row(
        0, named=True
    )
    assert (base["n"], base["tokens"]) == (3, 40 * 2048)
    assert base["low"] == pytest.approx(2.0 - HW_SD1_N3)
    assert base["high"] == pytest.approx(2.0 + HW_SD1_N3)
    solo = bands.filter(pl.col("experiment") == "solo")
    assert (solo["low"] == solo["mean"]).all() and (solo["high"] == solo["mean"]).all()


# ---------------------------------------------------------------- render


def test_render_writes_pages_and_png_figures(report: dict) -> None:
    out = report["root"] / "report"
    expected = ["index.md", "index.html", "figures/val_loss.png", "figures/train_loss.png"]
    assert report["paths"] == [out / name for name in expected]
    for path in report["paths"][2:]:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert 'src="figures/val_loss.png"' in report["html"]
    assert "](figures/train_loss.png)" in report["md"]


def test_render_is_deterministic(report: dict, tmp_path: Path) -> None:
    paths = render_report(
        report["summary_csv"],
        report["curves_csv"],
        tmp_path,
        "test",
        [{"name": "wide"}, {"name": "base"}],
    )
    for again, first in zip(paths, report["paths"], strict=True):
        assert again.read_bytes() == first.read_bytes()


def test_report_tables_show_the_same_numbers(report: dict) -> None:
    md, page = report["md"], report["html"]
    assert md.startswith("# archbench report — suite test\n")
    assert "<title>archbench report — suite test</title>" in page
    for text in (md, page):
        assert "How to read this report" in text and "Per-seed values" in text
        assert "2.0000 ± 2.4841" in text  # base val_loss
        assert "1.6000 ± 0.2484" in text  # wide val_loss
        assert "49.000 ± 0.000" in text and "0.81M" in text and "1.2e13" in text
        for experiment in EXPERIMENTS:
            assert experiment in text
    row = next(line for line in md.splitlines() if line.startswith("| solo |"))
    assert "| 1 |" in row and "| 2.5000 |" in row and "±" not in row.split("|")[8]
    moe = next(line for line in md.splitlines() if line.startswith("| moe |"))
    assert moe.split(" | ")[11] == "—"  # moe has no val_top5


def test_report_follows_experiment_order(report: dict) -> None:
    results = report["md"].split("## Results")[1].split("## Curves")[0]
    rows = [line.split(" | ")[0][2:] for line in results.splitlines() if line.startswith("| ")]
    assert rows == ["experiment", "wide", "base", "moe", "solo"]


def test_per_seed_section_lists_every_run(report: dict) -> None:
    per_seed = report["md"].split("## Per-seed values")[1]
    assert "| base | 2 | 3.0000 | 4.3281 |" in per_seed
    assert sum(line.startswith("| ") for line in per_seed.splitlines()) == 1 + 10


def test_unknown_experiment_in_order_raises(report: dict, tmp_path: Path) -> None:
    with pytest.raises(ArchbenchError, match="nope"):
        render_report(
            report["summary_csv"], report["curves_csv"], tmp_path, "t", [{"name": "nope"}]
        )


def test_escaping_of_special_characters() -> None:
    nasty = "a<b & c|d"
    assert escape_markdown(nasty) == "a&lt;b &amp; c\\|d"
    table = Table(["h|x"], [[nasty]])
    assert markdown_table(table).splitlines() == ["| h\\|x |", "|---|", "| a&lt;b &amp; c\\|d |"]
    assert "<td>a&lt;b &amp; c|d</td>" in html_table(table)
    page = html_page("s<&", table, table, ["figures/val_loss.png", "figures/train_loss.png"])
    assert "suite s&lt;&amp;</h1>" in page and "a<b" not in page


def test_number_formats() -> None:
    assert format_count(812000) == "0.81M"
    assert format_count(1.5e9) == "1.50B"
    assert format_scientific(1.2e13) == "1.2e13"
    assert format_scientific(3.0e-4) == "3.0e-4"


def test_leak_check_failures_are_marked_and_explained(report: dict) -> None:
    for page in (report["md"], report["html"]):
        assert "Future leak detected" in page
        assert "moe (1 of 3 seeds)" in page
        assert "FAIL (1 of 3 seeds)" in page
        assert page.count("| pass |") == 3 or page.count("<td>pass</td>") == 3
