"""Shared fixtures: a tiny prepared data set and a tiny run spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from archbench.data import DatasetSpec, prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 40


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> None:
    """Tiny models run far faster on one thread, above all on a busy 2-core machine."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A char-tokenized data directory prepared from a small text, via a local mirror."""
    import hashlib

    root = tmp_path_factory.mktemp("data")
    mirror = root / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    raw = TEXT.encode()
    (mirror / "tiny" / "input.txt").write_bytes(raw)
    spec = DatasetSpec(name="tiny", path="tiny/input.txt", sha256=hashlib.sha256(raw).hexdigest())
    out = root / "prepared"
    prepare_dataset(spec, out, mirror=mirror)
    return out


def tiny_spec(**train: object) -> dict:
    """A run spec for a 2-layer model trained for a few steps on `tiny_data`."""
    return {
        "experiment": "tiny",
        "arch": "gpt",
        "dataset": "tiny",
        "seed": 0,
        "model": {"n_layer": 2, "n_head": 2, "d_model": 16},
        "train": {
            "block_size": 16,
            "batch_size": 4,
            "token_budget": 16 * 4 * 12,
            "warmup_steps": 2,
            "eval_every": 4,
            "eval_batches": 1,
            "log_every": 2,
            "checkpoint_every": 5,
            "device": "cpu",
            **train,
        },
    }


KILL_SUITE = """\
seeds: [0]
threads: 1
model: {n_layer: 2, n_head: 2, d_model: 64}
train: {block_size: 64, batch_size: 16, token_budget: 614400, warmup_steps: 5, eval_every: 1000,
        eval_batches: 2, log_every: 50, checkpoint_every: 50}
eval: {batch_size: 64, max_tokens: 2048}
"""


def add_kill_test(project: Path) -> Path:
    """Give a project copy the suite `killtest` (one training job long enough to be killed) and
    a one-row table `killtest.tsv` (row `victim`); returns the table's path."""
    (project / "configs/suites/killtest.yaml").write_text(KILL_SUITE)
    table = project / "killtest.tsv"
    table.write_text("name\tarch\tdataset\nvictim\tgpt\tshakespeare_char\n")
    return table
