"""Training: schedule, data order, determinism, resume, divergence and bookkeeping."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_spec
from safetensors.torch import load_file
from torch import nn

from archbench.checkpoint import (
    CorruptFileError,
    load_training_state,
    read_training_meta,
    save_training_state,
)
from archbench.errors import ConfigError
from archbench.io import read_json
from archbench.models import ARCHITECTURES, build_model, make_config
from archbench.models.blocks import tally_recomputed_flops
from archbench.runtime import Runtime, inductor_cpp_compiler, make_runtime, triton_c_compiler
from archbench.train import (
    CHECKPOINT,
    PARTIAL_LOG,
    DivergedError,
    Progress,
    StepWindow,
    TrainConfig,
    batch_at,
    check_finite,
    lr_at,
    make_optimizer,
    make_train_config,
    measure_step_flops,
    spec_fingerprint,
    train_run,
    warm_up,
)

# The gpu suite's train settings, which the tests below run on the CPU.
GPU_SUITE_TRAIN = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "configs/suites/gpu.yaml").read_text(encoding="utf-8")
)["train"]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:  # wall-clock columns differ between runs by nature
        del row["elapsed_seconds"], row["tokens_per_s"]
    return rows


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    config = make_train_config(
        {
            "block_size": 4,
            "batch_size": 1,
            "token_budget": 400,
            "lr": 1.0,
            "warmup_steps": 10,
            "min_lr_ratio": 0.1,
        }
    )
    assert config.steps == 100
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(54, config) > 0.55 > lr_at(55, config)  # halfway (step 54.5) through the cosine
    assert lr_at(99, config) == pytest.approx(0.1, abs=1e-12)  # the floor at the last step
    lrs = [lr_at(s, config) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    # one step after warmup: it is the last, so it is at the floor (it stayed at the peak)
    short = make_train_config({**config.__dict__, "token_budget": 44})
    assert short.steps == 11 and lr_at(9, short) == pytest.approx(1.0)
    assert lr_at(10, short) == pytest.approx(0.1, abs=1e-12)


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = batch_at(tokens, 7, 3, 4, 16)
    x2, y2 = batch_at(tokens, 7, 3, 4, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(batch_at(tokens, 8, 3, 4, 16)[0], x1)
    assert not torch.equal(batch_at(tokens, 7, 4, 4, 16)[0], x1)
    assert int(y1.max()) < 1000


def test_batch_windows_reach_both_ends_of_the_split_and_never_past_it() -> None:
    """Every window is block_size + 1 consecutive tokens inside the split; over many steps the
    first window start (0) and the last one (n - block_size - 1) both occur."""
    n, block = 40, 8
    tokens = np.arange(n, dtype=np.uint16)
    starts = set()
    for step in range(300):
        x, y = batch_at(tokens, 0, step, 16, block)
        assert torch.equal(x, x[:, :1] + torch.arange(block)) and torch.equal(y, x + 1)
        starts.update(x[:, 0].tolist())
    assert starts == set(range(n - block))  # 0 … n - block - 1: the last target is token n - 1


def test_token_budget_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"token_budget=100 is smaller than one batch \(.*= 128"):
        make_train_config({"block_size": 32, "batch_size": 4, "token_budget": 100})


def test_a_split_of_one_window_is_enough(tiny_data: Path, tmp_path: Path) -> None:
    """block_size + 1 tokens make one window (inputs and targets); one token fewer does not."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = read_json(data / "meta.json")
    val = np.fromfile(data / "val.bin", dtype=meta["dtype"])
    for length in (17, 16):  # block_size 16
        val[:length].tofile(data / "val.bin")
        (data / "meta.json").write_text(json.dumps({**meta, "n_val_tokens": length}))
        if length == 17:
            summary = train_run(tiny_spec(), data, tmp_path / "run", show_progress=False)
            assert math.isfinite(summary["final_val_loss"])
    with pytest.raises(
        ConfigError, match=r"val split of 'tiny' has 16 tokens, fewer than block_size \+ 1 = 17"
    ):
        train_run(tiny_spec(), data, tmp_path / "run16", show_progress=False)


def test_training_writes_every_output(tiny_data: Path, tmp_path: Path) -> None:
    summary = train_run(tiny_spec(), tiny_data, tmp_path, show_progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "model.safetensors",
        "model_config.json",
        "train_config.json",
        "metrics.csv",
        "train_summary.json",
    } <= names
    assert CHECKPOINT not in names and "metrics.partial.csv" not in names
    assert summary == read_json(tmp_path / "train_summary.json")
    assert summary["train_steps"] == 12 and summary["train_tokens"] == 12 * 64
    vocab = read_json(tiny_data / "meta.json")["vocab_size"]
    model = build_model("gpt", vocab, 16, n_layer=2, n_head=2, d_model=16)
    assert summary["n_params"] == sum(p.numel() for p in model.parameters())
    assert summary["n_params_non_embedding"] == summary["n_params"] - vocab * 16
    rows = read_metrics(tmp_path)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert [r["val_loss"] != "" for r in rows] == [False, True, False, True, False, True]
    assert all(math.isfinite(float(r["train_next_token"])) for r in rows)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    logged = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"] != ""}
    assert summary["final_val_loss"] == logged[12]
    assert summary["best_val_loss"] == min(logged.values())
    assert logged[summary["best_val_step"]] == summary["best_val_loss"]


def read_metrics_with_timing(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_best_val_is_the_lowest_estimate_and_its_step() -> None:
    """nanoGPT's shakespeare_char reference (~1.47) is the lowest val loss of the run: the model
    overfits long before its last step, so the final estimate alone would hide it."""
    progress = Progress()
    for step, val in ((250, 1.7), (500, 1.5), (750, 1.6), (1000, 1.5)):
        progress.step = step
        progress.add_val(val, 0.25)
    assert (progress.last_val, progress.best_val, progress.best_val_step) == (1.5, 1.5, 500)
    assert (progress.val_seconds, progress.elapsed) == (1.0, 0.0)  # steps are timed apart


def test_train_seconds_leave_out_validation_and_checkpoints(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a clock that jumps 100 s in every validation and 1000 s in every checkpoint save,
    the optimizer steps' time must contain neither jump, and eval_seconds only the first."""
    import archbench.train as train

    offset = [0.0]
    real_clock, real_val, real_save = (
        time.perf_counter,
        train.estimate_val_loss,
        train.save_training_state,
    )

    def jump(seconds: float, fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            offset[0] += seconds
            return result

        return wrapped

    monkeypatch.setattr(train.time, "perf_counter", lambda: real_clock() + offset[0])
    monkeypatch.setattr(train, "estimate_val_loss", jump(100.0, real_val))
    monkeypatch.setattr(train, "save_training_state", jump(1000.0, real_save))
    summary = train_run(tiny_spec(), tiny_data, tmp_path, show_progress=False)
    n_evals = 3  # tiny_spec: 12 steps, eval_every 4
    assert summary["train_seconds"] < 100
    assert n_evals * 100 <= summary["eval_seconds"] < n_evals * 100 + 100
    rows = read_metrics_with_timing(tmp_path)
    assert all(float(r["elapsed_seconds"]) < 100 for r in rows)


def test_same_seed_gives_identical_weights_and_metrics(tiny_data: Path, tmp_path: Path) -> None:
    spec = tiny_spec()
    spec["model"]["dropout"] = 0.1
    for name in ("a", "b"):
        train_run(spec, tiny_data, tmp_path / name, show_progress=False)
    weights_a, weights_b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    other = dict(spec, seed=1)
    train_run(other, tiny_data, tmp_path / "c", show_progress=False)
    assert read_metrics(tmp_path / "c") != read_metrics(tmp_path / "a")


@pytest.mark.parametrize("stop_after", [3, 5, 7])
def test_resume_matches_an_uninterrupted_run(
    tiny_data: Path, tmp_path: Path, stop_after: int, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tiny_spec()
    spec["model"]["dropout"] = 0.1  # exercises the saved RNG state too
    train_run(spec, tiny_data, tmp_path / "straight", show_progress=False)
    interrupted = tmp_path / "interrupted"
    assert (
        train_run(spec, tiny_data, interrupted, show_progress=False, stop_after=stop_after) is None
    )
    assert (interrupted / CHECKPOINT).exists() and not (interrupted / "metrics.csv").exists()
    assert "resuming" not in capsys.readouterr().err
    train_run(spec, tiny_data, interrupted, show_progress=False)
    assert f"resuming from {interrupted / CHECKPOINT} at step {stop_after}" in (
        capsys.readouterr().err
    )
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert read_metrics(interrupted) == read_metrics(tmp_path / "straight")


def test_a_compiled_run_resumes_identically(tiny_data: Path, tmp_path: Path) -> None:
    """With torch.compile, the warm-up that compiles before the first step (in every process,
    so also in the resumed one) changes neither the random state nor the weights."""
    spec = tiny_spec(compile=True)
    spec["model"]["dropout"] = 0.1
    straight = train_run(spec, tiny_data, tmp_path / "straight", show_progress=False)
    train_run(spec, tiny_data, tmp_path / "resumed", show_progress=False, stop_after=5)
    resumed = train_run(spec, tiny_data, tmp_path / "resumed", show_progress=False)
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "straight")
    # in one process the later runs reuse the first's compiled code, so their warm-ups are short
    assert straight["compile_seconds"] > 0 and resumed["compile_seconds"] > 0


def test_checkpoint_of_another_spec_is_not_resumed(tiny_data: Path, tmp_path: Path) -> None:
    train_run(tiny_spec(), tiny_data, tmp_path, show_progress=False, stop_after=5)
    train_run(tiny_spec(lr=5e-3), tiny_data, tmp_path / "fresh", show_progress=False)
    train_run(tiny_spec(lr=5e-3), tiny_data, tmp_path, show_progress=False)
    assert read_metrics(tmp_path) == read_metrics(tmp_path / "fresh")


def test_truncated_checkpoint_is_an_error(tiny_data: Path, tmp_path: Path) -> None:
    train_run(tiny_spec(), tiny_data, tmp_path, show_progress=False, stop_after=5)
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=r"cannot read checkpoint .*\(delete it to train"):
        train_run(tiny_spec(), tiny_data, tmp_path, show_progress=False)


def test_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path: Path) -> None:
    written = build_model("gpt", 64, 16, n_layer=1, n_head=2, d_model=16)
    save_training_state(tmp_path / CHECKPOINT, written, make_optimizer(written, TrainConfig()), {})
    other = build_model("gpt", 64, 16, n_layer=2, n_head=2, d_model=16)
    with pytest.raises(CorruptFileError, match="does not fit this run's model.*delete it"):
        load_training_state(tmp_path / CHECKPOINT, other, make_optimizer(other, TrainConfig()))


@pytest.mark.parametrize("drop", ["rng.torch", "meta", "optim.0.exp_avg"])
def test_checkpoint_missing_an_entry_is_a_clear_error(tmp_path: Path, drop: str) -> None:
    """A lost entry, or an optimizer slot under a malformed key, is a CorruptFileError."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = build_model("gpt", 64, 16, n_layer=1, n_head=2, d_model=16)
    optimizer = make_optimizer(model, TrainConfig())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    path = tmp_path / CHECKPOINT
    save_training_state(path, model, optimizer, {"progress": {}})
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    save_file(
        {k.replace("optim.0.", "optim.zero.") if k == drop else k: v for k, v in tensors.items()}
        if drop.startswith("optim.")
        else {k: v for k, v in tensors.items() if k != drop},
        str(path),
        {k: v for k, v in header.items() if k != drop},
    )
    with pytest.raises(CorruptFileError, match="does not fit this run's model.*delete it"):
        load_training_state(path, model, make_optimizer(model, TrainConfig()))


@pytest.mark.parametrize("name", [CHECKPOINT, "model.safetensors", "metrics.csv", PARTIAL_LOG])
def test_a_file_left_half_written_is_removed(tiny_data: Path, tmp_path: Path, name: str) -> None:
    partial = tmp_path / f".{name}.x1y2.tmp"
    partial.write_bytes(b"cut off by kill -9")
    train_run(tiny_spec(), tiny_data, tmp_path, show_progress=False)
    assert not partial.exists()


def test_a_changed_default_makes_a_checkpoint_someone_elses() -> None:
    """A spec names only the options it sets: a default that changes between versions must still
    change the fingerprint, or a checkpoint would resume under other options."""
    spec, meta = tiny_spec(), {"vocab_size": 65}
    model_config = make_config("gpt", 65, 16, n_layer=1, n_head=2, d_model=16)
    config = TrainConfig()
    same = spec_fingerprint(spec, meta, config, model_config)
    assert same == spec_fingerprint(spec, meta, TrainConfig(), model_config)
    assert same != spec_fingerprint(spec, meta, replace(config, weight_decay=0.5), model_config)
    other_model = replace(model_config, norm="layernorm")
    assert same != spec_fingerprint(spec, meta, config, other_model)


def test_step_window_reads_pending_steps_in_order_and_names_the_first_diverged_one() -> None:
    window = StepWindow()
    for step, (total, part) in enumerate([(2.0, 1.5), (float("nan"), float("inf")), (3.0, 2.0)], 7):
        window.open(step)  # only the first open of a window starts it
        parts = {"next_token": torch.tensor(1.0), "future": torch.tensor(part)}
        window.add(torch.tensor(total), parts, torch.tensor(0.5))
    losses = window.close()
    assert losses.first_step == 7
    assert [row["train_loss"] for row in losses.rows][0::2] == [2.0, 3.0]
    assert losses.rows[0] == {
        "train_loss": 2.0,
        "train_next_token": 1.0,
        "train_future": 1.5,
        "grad_norm": 0.5,
    }
    with pytest.raises(
        DivergedError,
        match=r"'tiny' seed 3: loss diverged at step 9 "
        r"\(non-finite part: future; total = nan\)",
    ):
        check_finite({"experiment": "tiny", "seed": 3}, losses)
    window.open(10)
    window.add(torch.tensor(1.0), {}, torch.tensor(float("inf")))
    losses = window.close()
    assert losses.first_step == 10
    with pytest.raises(DivergedError, match=r"gradient norm at step 11 is inf"):
        check_finite({"experiment": "tiny", "seed": 3}, losses)


def test_divergence_names_experiment_seed_step_and_part(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DivergedError,
        match=r"'tiny' seed 0: (loss diverged at step \d+ \(non-finite part: next_token|"
        r"the gradient norm at step \d+ is (nan|inf))",
    ):
        train_run(
            tiny_spec(lr=1e6, grad_clip=0.0, warmup_steps=0),
            tiny_data,
            tmp_path,
            show_progress=False,
        )
    assert not (tmp_path / "model.safetensors").exists()


def test_a_checkpoint_from_another_device_or_precision_is_not_resumed(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """precision "auto" is fp32 on a CPU without AMX and bf16 on a GPU: a run preempted on one
    kind of machine and requeued on another must not continue in the other precision."""
    import archbench.runtime as runtime_module
    import archbench.train as train_module

    monkeypatch.setattr(runtime_module, "cpu_has_amx", lambda: False)
    spec = tiny_spec(precision="auto")
    assert train_run(spec, tiny_data, tmp_path, show_progress=False, stop_after=5) is None
    assert read_training_meta(tmp_path / CHECKPOINT)["runtime"] == "cpu fp32"
    monkeypatch.setattr(
        train_module, "make_runtime", lambda device, precision: Runtime(torch.device("cpu"), True)
    )
    with pytest.raises(ConfigError, match=r"written on cpu fp32, this job runs on cpu bf16"):
        train_run(spec, tiny_data, tmp_path, show_progress=False)
    assert (tmp_path / CHECKPOINT).exists()


def test_a_cpu_checkpoint_from_another_thread_count_is_not_resumed(
    tiny_data: Path, tmp_path: Path
) -> None:
    """Matrix products sum in another order with another thread count: a run resumed so would
    differ from an uninterrupted one by rounding, so it is refused with the count to use."""
    spec = tiny_spec()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert train_run(spec, tiny_data, tmp_path, show_progress=False, stop_after=5) is None
        assert read_training_meta(tmp_path / CHECKPOINT)["torch_threads"] == 1
        torch.set_num_threads(2)
        with pytest.raises(
            ConfigError, match=r"threads=1, this job has threads=2.*--set-threads train=1"
        ):
            train_run(spec, tiny_data, tmp_path, show_progress=False)
        assert (tmp_path / CHECKPOINT).exists()
        torch.set_num_threads(1)
        assert train_run(spec, tiny_data, tmp_path, show_progress=False) is not None
    finally:
        torch.set_num_threads(before)


def _diverging_optimizer(monkeypatch: pytest.MonkeyPatch, at_step: int, where: str) -> None:
    """Make the first parameter's gradient infinite at 1-based `at_step`: in the backward pass
    (`where="backward"`, a finite loss with a non-finite gradient) or just before the update
    (`where="update"`, after the gradient norm was taken)."""
    import archbench.train as train_module

    make = train_module.make_optimizer

    def patched(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        optimizer, first = make(model, config), next(model.parameters())
        updates = [0]  # optimizer steps begun

        def in_backward(grad: torch.Tensor) -> torch.Tensor:
            poisoned = where == "backward" and updates[0] == at_step - 1
            return grad.fill_(math.inf) if poisoned else grad

        def before_update(*_: object) -> None:
            updates[0] += 1
            if where == "update" and updates[0] == at_step:
                first.grad.fill_(math.inf)

        first.register_hook(in_backward)
        optimizer.register_step_pre_hook(before_update)
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", patched)


def test_a_non_finite_gradient_stops_training_before_any_checkpoint_holds_it(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _diverging_optimizer(monkeypatch, at_step=5, where="backward")
    spec = tiny_spec(log_every=2, eval_every=4, checkpoint_every=5, grad_clip=0.0)
    with pytest.raises(DivergedError, match=r"gradient norm at step 5 is inf"):
        train_run(spec, tiny_data, tmp_path, show_progress=False)
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("at_step", [5, 12])  # before a checkpoint; the last step (final outputs)
def test_weights_that_diverge_in_the_update_are_never_saved(
    at_step: int, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _diverging_optimizer(monkeypatch, at_step=at_step, where="update")
    spec = tiny_spec(log_every=2, eval_every=4, checkpoint_every=5)
    assert make_train_config(spec["train"]).steps == 12
    with pytest.raises(DivergedError, match=r"not finite|validation loss after step 12 is nan"):
        train_run(spec, tiny_data, tmp_path, show_progress=False)
    assert not (tmp_path / "model.safetensors").exists()
    saved = load_file(tmp_path / CHECKPOINT) if at_step > 5 else {}  # steps 5, 10: before it
    assert (tmp_path / CHECKPOINT).exists() == bool(saved)
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())


def test_step_flops_of_gpt_are_nanogpts_estimate_exactly() -> None:
    """6 FLOPs per token per matrix weight (forward, and twice that backward) plus 12·L·d·T per
    token of full attention: nanoGPT's estimate, counted exactly; the CPU's fused attention
    kernel is counted, and its backward recomputation is not."""
    model = build_model("gpt", 64, 32, n_layer=2, n_head=2, d_model=64)
    x = torch.randint(0, 64, (4, 32))
    tokens = x.numel()
    flops = measure_step_flops(lambda a, b: model.loss(a, b)[0], model, x, x)
    matrix_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 12 * 2 * 64 * 32 * tokens  # 12 · L · d · T per token
    assert flops == 6 * matrix_weights * tokens + attention
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("seed", [-1, 2**32, "0", True])
def test_a_seed_outside_one_32_bit_word_is_refused(seed: object, tiny_data: Path, tmp_path: Path):
    """Batch streams are keyed (seed, step); a seed of two words would alias another's."""
    spec = {**tiny_spec(), "seed": seed}
    with pytest.raises(ConfigError, match=r"experiment 'tiny' seed: must be an integer from 0"):
        train_run(spec, tiny_data, tmp_path, show_progress=False)


@pytest.mark.parametrize("arch", ["futureformer", "mtp"])
def test_step_flops_leave_out_the_heads_recomputed_under_checkpointing(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extra heads above KEEP_LOGITS_ELEMENTS logits run their forward pass again in the backward
    pass; that is the same model doing the same step, so the count must not change."""
    model = build_model(arch, 64, 32, n_layer=2, n_head=2, d_model=64)
    x = torch.randint(0, 64, (4, 32))

    def count() -> int:
        return measure_step_flops(lambda a, b: model.loss(a, b)[0], model, x, x)

    kept = count()
    module = importlib.import_module(f"archbench.models.{arch}")
    monkeypatch.setattr(module, "KEEP_LOGITS_ELEMENTS", 0)
    monkeypatch.setattr(module, "HEAD_CHUNK_ROWS", 50, raising=False)  # futureformer: 3 chunks
    with tally_recomputed_flops() as recomputed:  # checkpointing is in use: 9 or 2 calls
        model.loss(x, x)[0].backward()
    model.zero_grad(set_to_none=True)
    assert len(recomputed) == (3 * 3 if arch == "futureformer" else 2)
    assert count() == kept


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_summary_records_the_precision_as_a_number_too(
    precision: str, tiny_data: Path, tmp_path: Path
) -> None:
    """precision "auto" resolves per machine; as a number it reaches summary.csv and the report."""
    summary = train_run(tiny_spec(precision=precision), tiny_data, tmp_path, show_progress=False)
    assert summary["precision"] == precision
    assert summary["bf16_autocast"] == (1.0 if precision == "bf16" else 0.0)
    assert summary["device"] == "cpu" and summary["trained_on_gpu"] == 0.0


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_trains_with_the_gpu_suites_settings_on_the_cpu(
    arch: str, tiny_data: Path, tmp_path: Path
) -> None:
    """Every architecture trains with the gpu suite's precision and dropout (bf16 autocast, 0.2)
    on the CPU, with finite losses; the compiled variant is checked for `gpt` below. The
    CUDA-only lines (pinned memory, TF32, the GPU's random state) do not run here."""
    spec = tiny_spec(precision="bf16")
    spec["arch"], spec["model"]["dropout"] = arch, 0.2
    summary = train_run(spec, tiny_data, tmp_path, show_progress=False)
    assert summary["precision"] == "bf16" and math.isfinite(summary["final_val_loss"])


@pytest.mark.skipif(
    os.environ.get("ARCHBENCH_TEST_COMPILE_ALL") != "1",
    reason="compiles every architecture (5 min on 2 cores with a cold compile cache): set "
    "ARCHBENCH_TEST_COMPILE_ALL=1",
)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_trains_compiled_with_the_gpu_suites_settings_on_the_cpu(
    arch: str, tiny_data: Path, tmp_path: Path
) -> None:
    """As above with torch.compile, as the gpu suite trains (`gpt` alone runs in CI below)."""
    spec = tiny_spec(precision="bf16", compile=True, compile_mode=GPU_SUITE_TRAIN["compile_mode"])
    spec["arch"], spec["model"]["dropout"] = arch, 0.2
    summary = train_run(spec, tiny_data, tmp_path, show_progress=False)
    assert summary["compile_seconds"] > 0 and math.isfinite(summary["final_val_loss"])


def test_compiling_on_a_cpu_without_a_cxx_compiler_is_a_clear_error(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("archbench.runtime.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*compile: false"):
        train_run(tiny_spec(compile=True, device="cpu"), tiny_data, tmp_path, show_progress=False)


def test_the_compiler_check_looks_for_the_one_inductor_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inductor builds with $CXX when it is set (else g++ on Linux): another compiler on the
    PATH does not help it."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    runtime = Runtime(torch.device("cpu"), False)
    with pytest.raises(ConfigError, match=r"inductor's \(/nonexistent/g\+\+, from \$CXX"):
        runtime.compile(lambda x: x)
    monkeypatch.delenv("CXX")
    assert inductor_cpp_compiler() == "g++"


def test_compiling_for_cuda_checks_for_tritons_c_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton builds its kernel launchers with $CC, else gcc, else clang; the check needs no GPU
    (it runs before torch.compile, which is never reached here)."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    runtime = Runtime(torch.device("cuda"), True)
    with pytest.raises(ConfigError, match=r"compile=true on CUDA needs a C compiler"):
        runtime.compile(lambda x: x)
    monkeypatch.delenv("CC")
    assert triton_c_compiler() == shutil.which("gcc")


def compile_recorder(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Replace torch.compile by the identity and count CUDA-graph step marks; returns the
    modes asked for and the marks."""
    seen: dict[str, list] = {"modes": [], "marks": []}

    def fake_compile(fn, mode=None):
        seen["modes"].append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(
        torch.compiler, "cudagraph_mark_step_begin", lambda: seen["marks"].append(1)
    )
    return seen


@pytest.mark.parametrize(("mode", "marks_steps"), [("default", False), ("reduce-overhead", True)])
def test_compile_mode_reaches_torch_compile_and_cuda_graphs_mark_every_step(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, marks_steps: bool
) -> None:
    """compile_mode is torch.compile's mode; in a CUDA-graph mode every call of the loss (the
    warm-up's two calls and each step) first tells torch that a new step begins, so that the
    graphs may reuse the memory of the previous step's outputs. The weights are those of an
    eager run."""
    seen = compile_recorder(monkeypatch)
    spec = tiny_spec(compile=True, compile_mode=mode)
    summary = train_run(spec, tiny_data, tmp_path / mode, show_progress=False)
    assert seen["modes"] == [mode]
    assert len(seen["marks"]) == (2 + summary["train_steps"] if marks_steps else 0)
    train_run(tiny_spec(), tiny_data, tmp_path / "eager", show_progress=False)
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in (mode, "eager"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cuda_graph_compile_mode_trains_on_the_cpu_as_the_default_mode(
    tiny_data: Path, tmp_path: Path
) -> None:
    """Really compiled: on the CPU inductor has no CUDA graphs to replay, so reduce-overhead
    builds the default mode's kernels and the two runs end with the same weights and metrics
    (this checks the mode and the per-step marks against torch itself, not a stand-in)."""
    for mode in ("default", "reduce-overhead"):
        train_run(
            tiny_spec(compile=True, compile_mode=mode),
            tiny_data,
            tmp_path / mode,
            show_progress=False,
        )
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("default", "reduce-overhead"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "default") == read_metrics(tmp_path / "reduce-overhead")


def test_unknown_compile_mode_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="compile_mode.*reduce-overhead"):
        make_train_config({"compile_mode": "fastest"})


def test_compile_mode_without_compile_warns(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train_run(tiny_spec(compile_mode="reduce-overhead"), tiny_data, tmp_path, show_progress=False)
    assert (
        "compile_mode=reduce-overhead has no effect with compile=false" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_compiled_bf16_training_matches_eager_closely(tiny_data: Path, tmp_path: Path) -> None:
    """torch.compile (as in the gpu suite) on the CPU gives the eager run's losses."""
    eager = train_run(
        tiny_spec(precision="bf16"), tiny_data, tmp_path / "eager", show_progress=False
    )
    compiled = train_run(
        tiny_spec(precision="bf16", compile=True, compile_mode=GPU_SUITE_TRAIN["compile_mode"]),
        tiny_data,
        tmp_path / "compiled",
        show_progress=False,
    )
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=0.05)
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] == 0


def test_warm_up_leaves_weights_gradients_and_random_state_as_they_were() -> None:
    model = build_model("gpt", 64, 16, n_layer=1, n_head=2, d_model=16, dropout=0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 16))
    rng = torch.get_rng_state()
    assert warm_up(model.loss, model, make_runtime("cpu", "fp32"), x, x) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_warm_up_calls_the_loss_twice_so_cuda_graphs_are_recorded_before_timing() -> None:
    """...each time without gradients: CUDA graphs overwrite the previous replay's gradients,
    and torch refuses a backward pass that would accumulate into them."""
    model = build_model("gpt", 64, 16, n_layer=1, n_head=2, d_model=16)
    calls = []

    def counted_loss(x: torch.Tensor, y: torch.Tensor):
        calls.append(all(p.grad is None for p in model.parameters()))
        return model.loss(x, y)

    x = torch.randint(0, 64, (2, 16))
    warm_up(counted_loss, model, make_runtime("cpu", "fp32"), x, x)
    assert calls == [True, True]


@pytest.mark.parametrize(("native_bf16", "bf16"), [(True, True), (False, False)])
def test_auto_precision_is_bf16_only_on_gpus_with_bf16_hardware(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, bf16: bool
) -> None:
    """Before Ampere (V100, T4) bf16 is emulated and torch.compile leaves bf16 graphs eager."""
    import archbench.runtime as runtime_module

    supported = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        supported.append(including_emulation)
        return native_bf16 or including_emulation

    monkeypatch.setattr(runtime_module, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert make_runtime("auto", "auto").bf16 is bf16
        assert supported == [False]
        assert make_runtime("auto", "bf16").bf16 and not make_runtime("auto", "fp32").bf16
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_on_the_cpu_is_bf16_only_with_amx(
    monkeypatch: pytest.MonkeyPatch, amx: bool
) -> None:
    """AMX multiplies bf16 matrices in hardware (the default suite trained 1.66x as fast in bf16
    there); other CPUs convert, and ran bf16 autocast slower than fp32 (docs/performance.md)."""
    import archbench.runtime as runtime_module

    monkeypatch.setattr(runtime_module, "cpu_has_amx", lambda: amx)
    runtime = make_runtime("cpu", "auto")
    assert runtime.bf16 is amx and runtime.label == f"cpu {'bf16' if amx else 'fp32'}"
    assert make_runtime("cpu", "bf16").bf16 and not make_runtime("cpu", "fp32").bf16


def test_a_device_this_machine_cannot_use_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device=cuda, but this machine or torch build"):
        make_runtime("cuda", "auto")
