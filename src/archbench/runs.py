"""A finished run directory: its result files, and its model loaded back from safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from archbench.checkpoint import load_weights
from archbench.data import load_meta_of
from archbench.errors import DataError
from archbench.io import read_json
from archbench.models import build_model

# Flat JSON objects of numbers in a finished run directory, one per job that writes metrics (a
# synthetic-task run's eval.json holds the task's scores, a text run's its perplexity).
RESULT_FILES = ("train_summary.json", "eval.json", "leak_check.json")


def lm_eval_result(task_group: str) -> str:
    """File name, in a run directory, of the flat JSON that one lm-eval task group writes."""
    return f"lm_eval_{task_group}.json"


def check_run_data(run_dir: Path, data_dir: Path) -> None:
    """DataError unless `data_dir` holds the data set that the run in `run_dir` trained on, as
    its train_config.json records (a run directory without one is not checked): the same name
    and, for runs that recorded it, the same preparation (every meta.json entry the run saw, e.g.
    vocabulary, validation fraction, source digest, is unchanged)."""
    config_path = run_dir / "train_config.json"
    if not config_path.is_file():
        return
    recorded = read_json(config_path)
    dataset = recorded.get("dataset")
    if not dataset:
        return
    meta = load_meta_of(data_dir, dataset, f"run {run_dir}")
    trained_on = recorded.get("data_meta", {})
    changed = sorted(k for k, v in trained_on.items() if k in meta and meta[k] != v)
    if changed:
        raise DataError(
            f"run {run_dir} trained on another preparation of data set '{dataset}' than "
            f"{data_dir} holds ({', '.join(changed)} differ): its token ids may mean other "
            "text; evaluate it on the data it trained on, or train it again"
        )


def load_run(run_dir: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a finished run from `model_config.json` and `model.safetensors`."""
    missing = [n for n in ("model_config.json", "model.safetensors") if not (run_dir / n).is_file()]
    if missing:
        raise DataError(
            f"{run_dir} is not a finished run directory (no {' or '.join(missing)}); "
            "train the run first"
        )
    config = read_json(run_dir / "model_config.json")
    model = build_model(
        config["arch"], config["vocab_size"], config["block_size"], **config["options"]
    )
    load_weights(model, run_dir / "model.safetensors")
    return model.to(device).eval()
