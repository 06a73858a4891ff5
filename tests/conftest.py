"""Shared fixtures and checks: a tiny prepared data set, a tiny run spec, and the causality
check that every model runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from archbench.data import DatasetSpec, prepare_dataset
from archbench.models.blocks import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 40


def _runs_end_to_end(item: pytest.Item) -> bool:
    """Whether `item`'s module is marked slow as a whole (`pytestmark`): the files that run the
    workflow through Snakemake, minutes each."""
    marks = getattr(getattr(item, "module", None), "pytestmark", [])
    marks = marks if isinstance(marks, list) else [marks]
    return any(mark.name == "slow" for mark in marks)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n auto --dist loadfile`, the README's test command) hand out the
    test files in collection order instead of those with the most tests first, which started
    the few long end-to-end tests last, on one worker, after the other worker had run out of
    work."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The end-to-end files first (see pytest_configure), every other test in its order."""
    items.sort(key=lambda item: not _runs_end_to_end(item))


def copy_project(root: Path) -> Path:
    """A fresh copy of the Snakefile, workflow, configs and profiles link under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Snakefile", root)
    shutil.copytree(ROOT / "workflow", root / "workflow")
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copy(ROOT / "profiles", root / "profiles", follow_symlinks=False)
    return root


def smoke_snakemake(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run snakemake on the smoke suite in `project` with the interpreter running the tests,
    on the embedded data (no mirror)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("ARCHBENCH_DATA_MIRROR", None)  # the embedded default must be enough
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--config", "suite=smoke", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> None:
    """Tiny models run far faster on one thread, above all on a busy 2-core machine."""
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


def redrawn_after_each_position(vocab: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random sequence idx (block,) and a batch (block, block) whose row t is idx with its
    tokens after position t redrawn."""
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (block,), generator=generator)
    redrawn = torch.randint(0, vocab, (block, block), generator=generator)
    after = torch.arange(block)[None, :] > torch.arange(block)[:, None]  # row t: positions > t
    return idx, torch.where(after, redrawn, idx)


def assert_causal_at_every_position(model: torch.nn.Module, vocab: int, block: int) -> None:
    """Changing tokens after position t leaves `model`'s logits at positions <= t unchanged, for
    every t: row t of one batch is a sequence with its tokens after t redrawn, compared with the
    sequence itself run alone (so that a leak through the batch, e.g. a mean over its rows, does
    not cancel out). For a float64 model in eval mode (a leak moves logits by far more than the
    1e-12 allowed); the logits after t must change."""
    idx, batch = redrawn_after_each_position(vocab, block)
    assert all(not torch.equal(batch[t], idx) for t in range(block - 1))
    with torch.no_grad():
        logits = model(batch)
        reference = model(idx[None])[0]
    for t in range(block - 1):
        torch.testing.assert_close(
            logits[t, : t + 1], reference[: t + 1], rtol=0, atol=1e-12, msg=f"leak at t={t}"
        )
        assert not torch.allclose(logits[t, t + 1 :], reference[t + 1 :])


def assert_causal_in_training_mode(model: torch.nn.Module, vocab: int, block: int) -> None:
    """The same check as `assert_causal_at_every_position` for a float64 model in training mode,
    where dropout is active: both batches have the same shape and run after the same seed, so
    they draw the same dropout masks, and a leak that only dropout opens (e.g. attention that
    drops its causal mask when dropout_p > 0) shows as a difference at positions <= t."""
    idx, batch = redrawn_after_each_position(vocab, block)
    with torch.no_grad():
        torch.manual_seed(9)
        logits = model(batch)
        torch.manual_seed(9)
        reference = model(idx.expand(block, block).clone())
    for t in range(block - 1):
        torch.testing.assert_close(
            logits[t, : t + 1], reference[t, : t + 1], rtol=0, atol=1e-12, msg=f"leak at t={t}"
        )


# Loss parts whose targets are built from the tokens after each position by design: the real
# attention to the future that future_attention's heads learn to predict.
FUTURE_PARTS = {"future_attention": frozenset({"future"})}


def assert_loss_causal_in_training_mode(
    model: torch.nn.Module, arch: str, vocab: int, block: int
) -> None:
    """The training path itself (`model.loss`, which may run other code than `forward`) is
    causal: row t of one batch is a sequence with its tokens after t redrawn, row t of the other
    the sequence itself, both scored on the same targets at positions <= t only (the rest
    IGNORE_INDEX), in training mode after the same seed (same dropout masks). Every loss part
    must come out equal, except architecture `arch`'s FUTURE_PARTS."""
    future_parts = FUTURE_PARTS.get(arch, frozenset())
    idx, batch = redrawn_after_each_position(vocab, block)
    targets = torch.randint(0, vocab, (block, block), generator=torch.Generator().manual_seed(2))
    targets[torch.arange(block)[None, :] > torch.arange(block)[:, None]] = IGNORE_INDEX
    with torch.no_grad():
        torch.manual_seed(9)
        _, parts = model.loss(batch, targets)
        torch.manual_seed(9)
        _, reference = model.loss(idx.expand(block, block).clone(), targets)
    assert future_parts <= parts.keys()
    for name in parts.keys() - future_parts:
        torch.testing.assert_close(
            parts[name], reference[name], rtol=0, atol=1e-12, msg=f"loss part {name!r} leaks"
        )


def assert_deterministic(build: Callable[[], torch.nn.Module], vocab: int, block: int) -> None:
    """Two models from `build` (which seeds) give, in training mode after the same seed, the
    same loss, loss parts and gradients (dropout included)."""
    idx = torch.randint(0, vocab, (2, block), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, vocab, (2, block), generator=torch.Generator().manual_seed(4))
    runs = []
    for _ in range(2):
        model = build().train()
        torch.manual_seed(5)
        total, parts = model.loss(idx, targets)
        total.backward()
        runs.append((total, parts, [p.grad for p in model.parameters()]))
    (total_a, parts_a, grads_a), (total_b, parts_b, grads_b) = runs
    assert torch.equal(total_a, total_b)
    assert parts_a.keys() == parts_b.keys()
    assert all(torch.equal(parts_a[k], parts_b[k]) for k in parts_a)
    assert any(g is not None for g in grads_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
