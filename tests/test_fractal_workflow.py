"""FractalFormer sub-models as entries of the results and the report, and rows initialised from
other rows' checkpoints (`init_from`): validation, the DAG, exact copies and frozen blocks (also
across a resume), sub-model scores and leak checks, aggregation and the nesting-cost table."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_spec
from safetensors.torch import load_file

from archbench.data import load_meta, load_token_bytes, load_tokens
from archbench.errors import ConfigError
from archbench.evaluate.leakcheck import leak_check
from archbench.evaluate.perplexity import evaluate_perplexity
from archbench.evaluate.submodels import SUBMODELS, with_submodels
from archbench.experiments import load_experiments, load_suite, run_spec
from archbench.init_from import InitSource, initialise, parse_init_from
from archbench.io import write_json
from archbench.models import build_model
from archbench.models.fractalformer import FractalFormer, parse_submodel
from archbench.report.aggregate import RunRef, aggregate, read_summary
from archbench.report.render import render_report
from archbench.report.tables import per_seed_values
from archbench.runs import load_run
from archbench.train import make_train_config, train_run

ROOT = Path(__file__).resolve().parents[1]
ROW_SCHEMA = ROOT / "workflow/schemas/experiments.schema.yaml"
SUITE_SCHEMA = ROOT / "workflow/schemas/suite.schema.yaml"
HEADER = "name\tarch\tdataset\toverrides\tsuites\tbaseline\tinit_from\tsubmodel_baselines\n"
SUITE = """\
seeds: [0, 1]
model: {n_layer: 2, n_head: 2, d_model: 16}
train: {block_size: 16, batch_size: 4, token_budget: 768, warmup_steps: 2, eval_every: 4,
        eval_batches: 1, log_every: 2, checkpoint_every: 5, device: cpu}
"""
# At the suite's shape (d 16, SwiGLU hidden 48), a levels=2 fractalformer's L1 sub-models have
# d 8 and hidden 24: `small` is exactly that shape.
SMALL = "levels=1 d_model=8 mlp_hidden=24"


def row(name: str, arch: str = "fractalformer", overrides: str = "", **cells: str) -> str:
    """One table line; cells: dataset, suites, baseline (default none: these tables have no
    gpt row to compare with), init_from, submodel_baselines."""
    columns = ("suites", "baseline", "init_from", "submodel_baselines")
    rest = [cells.get(c, "none" if c == "baseline" else "") for c in columns]
    return "\t".join([name, arch, cells.get("dataset", "chars"), overrides, *rest]) + "\n"


def load(tmp_path: Path, *rows: str):
    path = tmp_path / "experiments.tsv"
    path.write_text(HEADER + "".join(rows), encoding="utf-8")
    return {e.name: e for e in load_experiments(path, ROW_SCHEMA, ["chars", "bpe512"])}


def suite(tmp_path: Path, name: str = "tiny"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(SUITE, encoding="utf-8")
    return load_suite(path, SUITE_SCHEMA)


# ---- the init_from cell and its validation ---------------------------------------------------


def test_parse_init_from() -> None:
    assert parse_init_from("") == ()
    assert parse_init_from("L1.0=small, L1.1=small+100") == (
        InitSource("L1.0", "small", 0),
        InitSource("L1.1", "small", 100),
    )
    assert parse_init_from("model=gpt") == (InitSource("model", "gpt", 0),)
    for text, message in [
        ("L1.0:small", "not of the form target=row"),
        ("L1.0=small-1+", "not of the form"),
        ("=small", "not of the form"),
        ("L1.0=a,L1.0=b", "target 'L1.0' is initialised twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_init_from(text)


MERGED = "levels=2 init_freeze=true"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [row("merged", overrides=MERGED, init_from="L1.0=nope")],
            r"line 2 \(experiment 'merged'\), column 'init_from': no row named 'nope'",
        ),
        (
            [row("merged", overrides=MERGED, init_from="L1.0=merged")],
            r"experiment 'merged'\), column 'init_from': a row cannot name itself",
        ),
        (
            [row("a", "gpt", init_from="model=b"), row("b", "gpt", init_from="model=a")],
            r"line 2 \(experiment 'a'\), column 'init_from': rows initialise from each other in "
            r"a cycle: a -> b -> a",
        ),
        (
            [row("small", overrides=SMALL, dataset="bpe512"), row("m", init_from="L1.0=small")],
            r"\(experiment 'm'\), column 'init_from': row 'small' uses data set 'bpe512', not",
        ),
        (
            [row("merged", overrides=MERGED, init_from="L1.0=small;L1.1=small")],
            r"column 'init_from': 'L1.0=small;L1.1=small' is not of the form target=row",
        ),
        (
            [row("m", submodel_baselines="L1=nope")],
            r"\(experiment 'm'\), column 'submodel_baselines': no row named 'nope'",
        ),
        (
            [row("m", submodel_baselines="L0=x")],
            r"column 'submodel_baselines': L0 is the whole model",
        ),
    ],
)
def test_bad_rows_stop_at_load_naming_row_and_column(
    tmp_path: Path, rows: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, *rows)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (  # a source of the wrong shape
            [
                row("small", overrides="levels=1 d_model=16"),
                row("m", overrides=MERGED, init_from="L1.0=small"),
            ],
            r"experiment 'm' \(table line \d+\) in suite 'tiny', column 'init_from': target "
            r"L1.0: merge source for a level-1 sub-model: d_model is 16, needs 8",
        ),
        (
            [row("small", overrides=SMALL), row("m", overrides=MERGED, init_from="L2.0=small")],
            r"column 'init_from': no sub-model L2.0 with levels=2",
        ),
        (
            [row("small", overrides=SMALL), row("m", init_from="L1.0=small,L2.1=small+1")],
            r"column 'init_from': sub-models L2.1 and L1.0 overlap",
        ),
        (
            [
                row("small", overrides=SMALL, suites="other"),
                row("m", overrides=MERGED, init_from="L1.0=small"),
            ],
            r"column 'init_from': source row 'small' does not run in suite 'tiny'",
        ),
        (
            [row("m", overrides=MERGED)],
            r"experiment 'm' \(table line \d+\) in suite 'tiny', column 'init_from': "
            r"init_freeze=true needs rows",
        ),
        (
            [row("small", overrides=SMALL), row("g", "gpt", init_from="model=small")],
            r"experiment 'g'.*column 'init_from': source architecture 'fractalformer' is not 'gpt'",
        ),
        (
            [row("a", "gpt"), row("g", "gpt", init_from="L1.0=a")],
            r"'gpt' can only be initialised as a whole: target 'model' alone, not L1.0",
        ),
        (
            [row("a", "gpt"), row("g", "gpt", "init_freeze=true", init_from="model=a")],
            r"init_freeze=true would freeze the whole model",
        ),
        (
            [row("a", "gpt", "n_layer=3"), row("g", "gpt", init_from="model=a")],
            r"source shapes differ \(\d+ tensors\), e.g. the source has 'blocks.2.\S+' "
            r"\(.*\), this row has no such tensor",
        ),
        (
            [row("a", "gpt"), row("g", "gpt", "n_layer=5", init_from="model=a")],
            r"shapes differ \(\d+ tensors\), e.g. this row has 'blocks.2.\S+' \(.*\), the source "
            r"has no such tensor",
        ),
        (
            [row("a", "gpt"), row("g", "gpt", "mlp_ratio=3", init_from="model=a")],
            r"shapes differ \(4 tensors\), e.g. 'blocks.0.mlp.down.weight' is \(16, 48\), "
            r"needs \(16, 32\)",
        ),
        (
            [row("a", "gpt"), row("g", "gpt", submodel_baselines="L1=a")],
            r"experiment 'g'.*column 'submodel_baselines': this architecture has no nested",
        ),
        (
            [row("s"), row("m", overrides="levels=2", submodel_baselines="L2=s")],
            r"column 'submodel_baselines': no sub-model or level 'L2'.*has: L1, L1.0, L1.1",
        ),
        (
            [
                row("s"),
                row("m", overrides="levels=2 residual=downstream", submodel_baselines="L1=s"),
            ],
            r"column 'submodel_baselines': residual=downstream: every sub-model reads its "
            r"ancestors' residuals up to the whole model",
        ),
    ],
)
def test_bad_sources_stop_before_any_job_naming_row_and_column(
    tmp_path: Path, rows: list[str], message: str
) -> None:
    experiments, tiny = load(tmp_path, *rows), suite(tmp_path)
    with pytest.raises(ConfigError, match=message):
        for experiment in experiments.values():
            if experiment.runs_in(tiny.name):
                run_spec(experiment, tiny, 0)


def test_the_spec_holds_each_source_run_so_a_changed_source_reruns_the_row(tmp_path: Path) -> None:
    tiny = suite(tmp_path)
    cell = "L1.0=small,L1.1=small+100"
    rows = load(tmp_path, row("small", overrides=SMALL), row("m", overrides=MERGED, init_from=cell))
    spec = run_spec(rows["m"], tiny, 1)
    assert [(e["target"], e["experiment"], e["seed"]) for e in spec["init_from"]] == [
        ("L1.0", "small", 1),
        ("L1.1", "small", 101),
    ]
    assert spec["init_from"][1]["spec"] == run_spec(rows["small"], tiny, 101)
    assert spec["train"]["init_freeze"] is True
    edited = load(
        tmp_path,
        row("small", overrides=SMALL + " lr=0.01"),
        row("m", overrides=MERGED, init_from=cell),
    )
    assert run_spec(edited["m"], tiny, 1) != spec
    assert "init_from" not in run_spec(rows["small"], tiny, 1)  # rows without the cell: as before


# ---- training from other rows' weights --------------------------------------------------------


def small_spec(seed: int = 0) -> dict:
    spec = tiny_spec()
    spec.update(experiment="small", arch="fractalformer", seed=seed)
    spec["model"] = {"n_layer": 2, "n_head": 2, "d_model": 8, "levels": 1, "mlp_hidden": 24}
    return spec


def merged_spec(sources: dict[str, dict], freeze: bool = True) -> dict:
    spec = tiny_spec(init_freeze=freeze)
    spec.update(experiment="merged", arch="fractalformer")
    spec["model"] = {"n_layer": 2, "n_head": 2, "d_model": 16, "levels": 2}
    spec["init_from"] = [
        {"target": target, "experiment": s["experiment"], "seed": s["seed"], "spec": s}
        for target, s in sources.items()
    ]
    return spec


def test_merged_blocks_are_exact_copies_and_stay_frozen_also_after_a_resume(
    tiny_data: Path, tmp_path: Path
) -> None:
    sources = {"L1.0": small_spec(0), "L1.1": small_spec(7)}
    dirs = {t: tmp_path / f"small{s['seed']}" for t, s in sources.items()}
    for target, spec in sources.items():
        train_run(spec, tiny_data, dirs[target], show_progress=False)
    spec = merged_spec(sources)
    assert make_train_config(spec["train"]).weight_decay > 0  # decay alone moves frozen entries
    train_run(spec, tiny_data, tmp_path / "straight", show_progress=False, init_dirs=dirs)
    resumed = tmp_path / "resumed"
    train_run(spec, tiny_data, resumed, show_progress=False, init_dirs=dirs, stop_after=5)
    train_run(spec, tiny_data, resumed, show_progress=False, init_dirs=dirs)

    torch.manual_seed(0)  # the merged row's initial weights, as train_run draws them
    initial = build_model("fractalformer", load_meta(tiny_data)["vocab_size"], 16, **spec["model"])
    for run in ("straight", "resumed"):
        model = load_run(tmp_path / run)
        for (level, index), target in (((1, 0), "L1.0"), ((1, 1), "L1.1")):
            source = load_run(dirs[target]).state_dict()
            copied = model.extract_submodel(level, index).state_dict()
            assert all(torch.equal(copied[k], source[k]) for k in source), (run, target)
        name = "blocks.0.mlp.down.weight"  # an off-diagonal block: rows of L1.0, units of L1.1
        rows, hidden = slice(0, 8), slice(24, 48)
        assert not torch.equal(
            model.get_parameter(name)[rows, hidden], initial.get_parameter(name)[rows, hidden]
        )
    straight = load_file(tmp_path / "straight/model.safetensors")
    again = load_file(resumed / "model.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_without_freeze_the_copied_blocks_train(tiny_data: Path, tmp_path: Path) -> None:
    source = small_spec()
    train_run(source, tiny_data, tmp_path / "small", show_progress=False)
    dirs = {"L1.1": tmp_path / "small"}
    train_run(merged_spec({"L1.1": source}, freeze=False), tiny_data, tmp_path / "m",
              show_progress=False, init_dirs=dirs)  # fmt: skip
    trained = load_run(tmp_path / "m").extract_submodel(1, 1).state_dict()
    original = load_run(tmp_path / "small").state_dict()
    assert not torch.equal(
        trained["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"]
    )


def test_a_whole_model_warm_start_loads_every_weight(tiny_data: Path, tmp_path: Path) -> None:
    source = tiny_spec()
    train_run(source, tiny_data, tmp_path / "gpt", show_progress=False)
    torch.manual_seed(1)
    model = build_model("gpt", load_meta(tiny_data)["vocab_size"], 16, **source["model"])
    entry = {"target": "model", "experiment": "tiny", "seed": 0, "spec": source}
    assert initialise(model, "gpt", [entry], {"model": tmp_path / "gpt"}, freeze=False) is None
    trained = load_file(tmp_path / "gpt/model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)


def test_the_wrong_or_missing_source_run_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    source = small_spec()
    train_run(source, tiny_data, tmp_path / "small", show_progress=False)
    spec = merged_spec({"L1.0": dict(source, seed=3)})
    with pytest.raises(ConfigError, match=r"spec initialises \['L1.0'\], .* given for \[\]"):
        train_run(spec, tiny_data, tmp_path / "a", show_progress=False)
    with pytest.raises(ConfigError, match="holds experiment 'small' seed 0, not 'small' seed 3"):
        train_run(spec, tiny_data, tmp_path / "b", show_progress=False,
                  init_dirs={"L1.0": tmp_path / "small"})  # fmt: skip


# ---- every sub-model scored and leak-checked ------------------------------------------------


def fractal(cls: type = FractalFormer, vocab: int = 40, **options) -> FractalFormer:
    from archbench.models import make_config

    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_head": 2, "d_model": 16, **options}
    return cls(make_config("fractalformer", vocab, 16, **shape)).eval()


def test_every_submodel_is_scored_exactly_like_its_standalone_model(tiny_data: Path) -> None:
    model = fractal(vocab=load_meta(tiny_data)["vocab_size"])
    tokens, token_bytes = load_tokens(tiny_data, "val")[:400], load_token_bytes(tiny_data)

    def score(m):
        return evaluate_perplexity(m, tokens, token_bytes, block_size=16, batch_size=8)

    result = with_submodels(model, score, sizes=True)
    assert list(result[SUBMODELS]) == ["L1.0", "L1.1", "L2.0", "L2.1", "L2.2", "L2.3"]
    assert result["val_loss"] == score(model)["val_loss"]
    for name, metrics in result[SUBMODELS].items():
        alone = model.extract_submodel(
            *parse_submodel(name, model.config)
        )  # a separate decoder holding the blocks
        assert metrics["n_params"] == sum(p.numel() for p in alone.parameters())
        assert metrics["val_loss"] == pytest.approx(score(alone)["val_loss"], rel=1e-6)
        assert metrics["val_bpb"] == pytest.approx(score(alone)["val_bpb"], rel=1e-6)
    gpt = build_model("gpt", model.config.vocab_size, 16, n_layer=1)
    assert SUBMODELS not in with_submodels(gpt, score)


class LeakyL21(FractalFormer):
    """Sub-model L2.1 adds the next token's id to its logits: a leak in one sub-model only."""

    def forward_submodel(self, idx: torch.Tensor, level: int, index: int) -> torch.Tensor:
        logits = super().forward_submodel(idx, level, index)
        if (level, index) == (2, 1):
            logits = logits + torch.roll(idx, -1, dims=1)[..., None].to(logits.dtype)
        return logits


@pytest.mark.parametrize("residual", ["none", "upstream", "downstream"])
def test_the_leak_check_covers_every_submodel(residual: str) -> None:
    tokens = np.arange(200) % 40

    def check(m):
        return leak_check(m, tokens, 16, 40, n_windows=2)

    honest = with_submodels(fractal(residual=residual), check)
    assert [r["leak_check_passed"] for r in honest[SUBMODELS].values()] == [1.0] * 6
    leaky = with_submodels(fractal(LeakyL21, residual=residual), check)
    assert leaky["leak_check_passed"] == 1.0  # the whole model reads no future token
    failed = [n for n, r in leaky[SUBMODELS].items() if not r["leak_check_passed"]]
    assert failed == ["L2.1"]


# ---- aggregation and the report -------------------------------------------------------------

# val loss by seed; frac/L1.0 - solo = 0.1, 0.2, 0.05: mean 0.116667, sd 0.0763763, so the paired
# 95% half-width is t(0.975, 2) * sd / sqrt(3) = 4.302653 * 0.0440959 = 0.189731.
VALUES = {
    "frac": [1.5, 1.6, 1.55],
    "frac/L1.0": [2.0, 2.2, 2.1],
    "frac/L1.1": [2.3, 2.2, 2.4],
    "solo": [1.9, 2.0, 2.05],
}


SETUP = ("bf16_autocast", "trained_on_gpu")  # the training setup a run records (1 or 0 each)


def fake_run(
    run_dir: Path, name: str, seed: int, nested: dict | None, setup: dict | None = None
) -> None:
    """A finished run directory with made-up numbers (`setup`: its recorded training setup, e.g.
    `bf16_autocast`, if any)."""
    run_dir.mkdir(parents=True)
    loss = VALUES[name][seed]
    train_summary = {"n_params": 9000.0, "train_tokens": 768}
    train_summary |= setup or {}
    write_json(run_dir / "train_summary.json", train_summary)
    evals = {"val_loss": loss, "val_bpb": loss * 1.5}
    leaks = {"leak_check_passed": 1.0}
    if nested:
        evals[SUBMODELS] = {
            sub: {
                "val_loss": VALUES[f"{name}/{sub}"][seed],
                "val_bpb": 1.5 * VALUES[f"{name}/{sub}"][seed],
                "n_params": 2500,
            }
            for sub in nested
        }
        leaks[SUBMODELS] = {sub: {"leak_check_passed": ok} for sub, ok in nested.items()}
    write_json(run_dir / "eval.json", evals)
    write_json(run_dir / "leak_check.json", leaks)
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "tokens", "lr", "train_loss", "val_loss", "elapsed_seconds"])
        writer.writerow([1, 64, 0.001, 3.0, loss, 0.1])


def fake_suite(root: Path, setups: dict[str, dict] | None = None) -> list[RunRef]:
    """Runs of a fractalformer row 'frac' (sub-model L1.0 passes the leak check, L1.1 fails)
    and a row 'solo', 3 seeds each, aggregated under `root`; `setups`: each row's recorded
    training setup (none recorded without it)."""
    runs = []
    for name, nested in (("frac", {"L1.0": 1.0, "L1.1": 0.0}), ("solo", None)):
        for seed in range(3):
            run_dir = root / name / f"seed{seed}"
            fake_run(run_dir, name, seed, nested, (setups or {}).get(name))
            runs.append(RunRef(name, "fractalformer", "chars", seed, run_dir))
    aggregate(runs, root / "summary.csv", root / "curves.csv")
    return runs


def render_fake_suite(root: Path) -> str:
    """Render fake_suite's report ('frac' with sub-model baseline L1 = 'solo'): index.md."""
    rows = [
        {"name": "frac", "arch": "fractalformer", "dataset": "chars",
         "submodel_baselines": {"L1": "solo"}, "init_from": ""},
        {"name": "solo", "arch": "fractalformer", "dataset": "chars"},
    ]  # fmt: skip
    render_report(root / "summary.csv", root / "curves.csv", root / "report", "t", rows)
    return (root / "report/index.md").read_text()


def test_submodels_are_entries_of_the_summary_and_the_report(tmp_path: Path) -> None:
    fake_suite(tmp_path)
    summary = read_summary(tmp_path / "summary.csv")
    entry = summary.filter(summary["experiment"] == "frac/L1.0")
    values = {(m, s): v for m, s, v in entry.select("metric", "seed", "value").iter_rows()}
    assert values[("val_loss", 2)] == 2.1 and values[("n_params", 0)] == 2500
    assert values[("leak_check_passed", 1)] == 1.0
    assert set(entry["arch"]) == {"fractalformer"} and set(entry["dataset"]) == {"chars"}
    assert "bf16_autocast" not in set(summary["metric"])  # not recorded: not made up

    page = render_fake_suite(tmp_path)
    results = page.split("## Results", 1)[1].split("\n## ", 1)[0]
    order = re.findall(r"^\| (\S+) \| fractalformer", results, re.MULTILINE)
    assert order == ["frac", "frac/L1.0", "frac/L1.1", "solo"]
    assert re.search(r"^\| frac/L1\.1 \| .*FAIL \(3 of 3 seeds\)", results, re.MULTILINE)
    nesting = page.split("## Nesting cost", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in nesting.splitlines() if x.startswith("| frac/L1.0 |"))
    assert "| 2.5k | solo | 9.0k |" in line
    assert "0.1167 ± 0.1897" in line  # hand-computed paired interval (VALUES)
    assert "0.1750 ± 0.2846" in line  # bpb = 1.5 x loss, so its interval is 1.5 times as wide
    failed = next(x for x in nesting.splitlines() if x.startswith("| frac/L1.1 |"))
    assert "EXCLUDED: failed the leak check" in failed
    comparisons = page.split("## Comparisons with baselines", 1)[1].split("\n## ", 1)[0]
    assert "frac/L1.0" not in comparisons  # sub-models are compared in their own section


def test_sub_models_carry_their_runs_setup_into_the_nesting_warning(tmp_path: Path) -> None:
    """A sub-model entry trained in its run's precision, on its run's device: it gets the run's
    `bf16_autocast` and `trained_on_gpu`, and the nesting section warns when its baseline
    trained in another precision or on another kind of device."""
    frac, solo = {"bf16_autocast": 1.0, "trained_on_gpu": 1.0}, dict.fromkeys(SETUP, 0.0)
    fake_suite(tmp_path, setups={"frac": frac, "solo": solo})
    summary = read_summary(tmp_path / "summary.csv")
    for metric in SETUP:
        by_seed = per_seed_values(summary, metric)
        values = {name: set(values.values()) for name, values in by_seed.items()}
        assert values == {"frac": {1.0}, "frac/L1.0": {1.0}, "frac/L1.1": {1.0}, "solo": {0.0}}
    nesting = render_fake_suite(tmp_path).split("## Nesting cost", 1)[1].split("\n## ", 1)[0]
    assert (
        "frac/L1.0 vs solo (row: GPU on all 3 seeds, bf16 on all 3 seeds; baseline: CPU on all "
        "3 seeds, fp32 on all 3 seeds)" in nesting
    )
    assert "frac/L1.1 vs" not in nesting  # failed its leak check: not compared, not named


# ---- the DAG -------------------------------------------------------------------------------

DAG_TABLE = HEADER + "".join(
    [
        row("small", overrides="levels=1 d_model=16 mlp_hidden=44"),
        row("merged", overrides=MERGED, init_from="L1.0=small,L1.1=small+100",
            submodel_baselines="L1=small"),
    ]
).replace("\tchars\t", "\tshakespeare_char\t")  # fmt: skip


def test_the_merged_rows_training_waits_for_its_sources(tmp_path: Path) -> None:
    for name in ("Snakefile", "workflow", "configs", "profiles"):
        source = ROOT / name
        copy_tree = shutil.copytree if source.is_dir() else shutil.copy
        copy_tree(source, tmp_path / name)
    (tmp_path / "dag.tsv").write_text(DAG_TABLE, encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("ARCHBENCH_DATA_MIRROR", None)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--dry-run", "-p", "--cores", "1", "--config",
         "suite=smoke", "experiments=dag.tsv", "--until",
         "results/smoke/merged/seed0/model.safetensors"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\n(?=rule \w+:)", result.stdout):
        wildcards = re.search(r"wildcards: experiment=(\w+), seed=(\d+)", block)
        if block.startswith("rule train:") and wildcards:
            jobs[(wildcards[1], int(wildcards[2]))] = block
    assert set(jobs) == {("small", 0), ("small", 100), ("merged", 0)}
    inputs = re.search(r"input: (.*)", jobs[("merged", 0)])[1]
    assert "results/smoke/small/seed0/model.safetensors" in inputs
    assert "results/smoke/small/seed100/model.safetensors" in inputs
    assert "--init L1.1=results/smoke/small/seed100" in jobs[("merged", 0)]


def test_the_repository_rows_describe_their_sources_and_sub_model_baselines() -> None:
    datasets = yaml.safe_load((ROOT / "configs/config.yaml").read_text())["datasets"]
    rows = {e.name: e for e in load_experiments(ROOT / "configs/experiments.tsv", ROW_SCHEMA,
                                                datasets)}  # fmt: skip
    described = json.loads(json.dumps(rows["fractal_merged"].describe()))  # as the workflow passes
    assert described["init_from"] == "L1.0=solo64,L1.1=solo64+100"
    assert described["submodel_baselines"] == {"L1": "solo64"}
    assert rows["fractal"].describe()["submodel_baselines"] == {"L1": "solo64", "L2": "solo32"}
