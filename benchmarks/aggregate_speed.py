"""Time `archbench.report.aggregate` on 1,000 synthetic runs' result files and metrics logs.

The issue's target: aggregating 1,000 runs stays under 10 s. Each synthetic run looks like one of
the default CPU suite (1,000 steps logged every 10, validation every 250) with the three result
files and the training log's columns; a third of the runs log two auxiliary-loss columns, as
`futureformer` does.

    python benchmarks/aggregate_speed.py [--runs 1000] [--steps 1000] [--log-every 10]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from archbench.report.aggregate import RunRef, aggregate
from archbench.train import BASE_COLUMNS, GRAD_NORM

SEEDS = 10


def write_run(run_dir: Path, index: int, steps: int, log_every: int, rng: random.Random) -> None:
    """One synthetic finished run: train_summary.json, eval.json, leak_check.json, metrics.csv."""
    run_dir.mkdir(parents=True)
    loss = 1.7 + rng.gauss(0.0, 0.01)
    summary = {"n_params": 812_000, "train_flops": 1.2e13, "train_seconds": 400.0 + index}
    evaluation = {"val_loss": loss, "val_bpb": loss / 0.693, "val_top1": 0.5, "val_top5": 0.8}
    for name, obj in (
        ("train_summary.json", summary),
        ("eval.json", evaluation),
        ("leak_check.json", {"leak_check_passed": 1.0}),
    ):
        (run_dir / name).write_text(json.dumps(obj), encoding="utf-8")
    columns = [*BASE_COLUMNS, "train_next_token"]
    if index % 3 == 0:  # futureformer's two span losses
        columns += ["train_span_1", "train_span_2"]
    lines = [",".join(columns)]
    for step in range(log_every, steps + 1, log_every):
        train = 4.0 / (1 + step / 100) + rng.random() * 0.01
        values = {
            "step": step,
            "tokens": step * 2048,
            "lr": 0.002,
            "train_loss": f"{train:.6f}",
            "val_loss": f"{train + 0.05:.6f}" if step % 250 == 0 else "",
            GRAD_NORM: f"{0.5 + rng.random():.6f}",
            "elapsed_seconds": f"{step * 0.4:.3f}",
            "tokens_per_s": 5120,
            "train_next_token": f"{train:.6f}",
            "train_span_1": f"{train / 10:.6f}",
            "train_span_2": f"{train * 1.1:.6f}",
        }
        lines.append(",".join(str(values[column]) for column in columns))
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    """Write the synthetic runs into a temporary directory, aggregate them and print the time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = []
        for index in range(args.runs):
            experiment, seed = f"exp{index // SEEDS:03d}", index % SEEDS
            run_dir = root / experiment / f"seed{seed}"
            write_run(run_dir, index, args.steps, args.log_every, rng)
            runs.append(RunRef(experiment, "gpt", "shakespeare_char", seed, run_dir))
        start = time.perf_counter()
        aggregate(runs, root / "summary.csv", root / "curves.csv")
        elapsed = time.perf_counter() - start
        curves_mb = (root / "curves.csv").stat().st_size / 1e6
    print(
        f"aggregated {args.runs} runs ({args.steps // args.log_every} logged steps each, "
        f"curves.csv {curves_mb:.1f} MB) in {elapsed:.2f} s (target: < 10 s)"
    )


if __name__ == "__main__":
    main()
