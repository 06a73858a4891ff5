"""Fault injection: killed jobs, corrupt and untrusted files, arbitrary input."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import archbench.train as train_module
from archbench.checkpoint import CorruptFileError
from archbench.errors import ConfigError
from archbench.experiments import parse_overrides, split_overrides
from archbench.models import ARCHITECTURES, build_model
from archbench.runs import load_run
from archbench.train import CHECKPOINT, Preempted, train_run

ROOT = Path(__file__).resolve().parents[1]


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_never_unpickled(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_run(tiny_spec(), tiny_data, run, show_progress=False)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker))
    (run / "model.safetensors").write_bytes(payload)
    with pytest.raises(CorruptFileError, match="cannot load weights"):
        load_run(run)
    resumable = tmp_path / "resumable"
    resumable.mkdir()
    (resumable / CHECKPOINT).write_bytes(payload)
    with pytest.raises(CorruptFileError, match="cannot read checkpoint"):
        train_run(tiny_spec(), tiny_data, resumable, show_progress=False)
    assert not marker.exists()


def test_source_never_unpickles() -> None:
    risky = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle=True")
    offenders = [str(p) for p in (ROOT / "src").rglob("*.py") if risky.search(p.read_text())]
    assert offenders == []


def test_truncated_weights_are_detected(tiny_data: Path, tmp_path: Path) -> None:
    train_run(tiny_spec(), tiny_data, tmp_path, show_progress=False)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CorruptFileError):
        load_run(tmp_path)


def _train_command(spec: dict, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "archbench",
        "train",
        "--spec",
        json.dumps(spec),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
    ]


def hash_seed(seed: int) -> dict[str, str]:
    """This process's environment with Python's string-hash seed set to `seed`."""
    return {**os.environ, "PYTHONHASHSEED": str(seed)}


@pytest.mark.slow
def test_kill_9_then_rerun_ends_identical_to_an_uninterrupted_run(
    tiny_data: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(token_budget=16 * 4 * 400, checkpoint_every=25, eval_every=100)
    spec["model"]["dropout"] = 0.1
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # each process hashes strings differently: an order or a seed taken from hash() would show
    subprocess.run(
        _train_command(spec, tiny_data, straight), check=True, capture_output=True, env=hash_seed(1)
    )
    rng = np.random.default_rng(int(time.time()))
    process = subprocess.Popen(
        _train_command(spec, tiny_data, killed), stderr=subprocess.PIPE, env=hash_seed(2)
    )
    deadline = time.monotonic() + 120
    while not (killed / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))  # a random step after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    result = subprocess.run(
        _train_command(spec, tiny_data, killed),
        capture_output=True,
        text=True,
        check=True,
        env=hash_seed(3),
    )
    assert "resuming from" in result.stderr
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rows(run: Path) -> list[list[str]]:
        lines = (run / "metrics.csv").read_text().splitlines()
        return [line.split(",")[:5] for line in lines]  # without wall-clock columns

    assert rows(killed) == rows(straight)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_override_strings_parse_or_raise_config_error(text: str) -> None:
    try:
        parsed = parse_overrides(text)
        split_overrides("gpt", parsed)
    except ConfigError:
        return
    assert all(key.isidentifier() for key in parsed)


@settings(max_examples=25, deadline=None)
@given(arch=st.sampled_from(sorted(ARCHITECTURES)), length=st.integers(2, 24), data=st.data())
def test_causality_at_random_lengths_and_points(arch: str, length: int, data) -> None:
    t = data.draw(st.integers(0, length - 2))
    torch.manual_seed(0)
    model = build_model(arch, 23, 24, n_layer=2, n_head=2, d_model=16).double().eval()
    idx = torch.from_numpy(
        np.asarray(data.draw(st.lists(st.integers(0, 22), min_size=length, max_size=length)))
    )[None]
    changed = idx.clone()
    changed[0, t + 1 :] = (changed[0, t + 1 :] + 1) % 23
    with torch.no_grad():
        assert torch.equal(model(idx)[:, : t + 1], model(changed)[:, : t + 1])


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_then_resumes_identically(
    tiny_data: Path, tmp_path: Path
) -> None:
    """A cluster preemption (SIGTERM) saves a checkpoint at once and exits with 143."""
    spec = tiny_spec(token_budget=16 * 4 * 400, checkpoint_every=1000, eval_every=100)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    subprocess.run(_train_command(spec, tiny_data, straight), check=True, capture_output=True)
    process = subprocess.Popen(
        _train_command(spec, tiny_data, stopped), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    partial = stopped / "metrics.partial.csv"
    while (not partial.exists() or partial.stat().st_size < 200) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM after step" in err
    assert (stopped / CHECKPOINT).exists() and not (stopped / "model.safetensors").exists()
    subprocess.run(_train_command(spec, tiny_data, stopped), check=True, capture_output=True)
    a, b = load_file(straight / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _metric_rows(run: Path) -> list[list[str]]:
    """metrics.csv without its wall-clock columns."""
    return [line.split(",")[:5] for line in (run / "metrics.csv").read_text().splitlines()]


# Where a SIGTERM arrives: (function of archbench.train it arrives in, which call of it).
SIGTERM_MOMENTS = {
    "before the first step": ("measure_step_flops", 1),
    "in the final validation": ("estimate_val_loss", 3),  # after steps 4, 8 and 12 (the last)
    "while the outputs are written": ("save_weights", 1),
}


@pytest.mark.parametrize("moment", sorted(SIGTERM_MOMENTS))
def test_a_sigterm_at_any_moment_saves_the_state_and_the_rerun_ends_identical(
    moment: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also at the last step and while the outputs are written: Snakemake deletes the outputs of
    a job stopped by SIGTERM, so the rerun must find a checkpoint to write them from, not train
    from step 0 (nor lose the steps since the last periodic checkpoint)."""
    spec = tiny_spec(checkpoint_every=1000)  # 12 steps, no periodic checkpoint
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    expected = train_run(spec, tiny_data, straight, show_progress=False)
    name, at_call = SIGTERM_MOMENTS[moment]
    original, calls = getattr(train_module, name), []

    def interrupted(*args, **kwargs):
        calls.append(name)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, name, interrupted)
    with pytest.raises(Preempted, match="stopped by SIGTERM"):
        train_run(spec, tiny_data, stopped, show_progress=False)
    monkeypatch.undo()
    assert (stopped / CHECKPOINT).exists()
    resumed = train_run(spec, tiny_data, stopped, show_progress=False)
    assert not (stopped / CHECKPOINT).exists()
    a, b = load_file(straight / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metric_rows(stopped) == _metric_rows(straight)
    assert resumed["final_val_loss"] == expected["final_val_loss"]
