"""The throughput benchmark script runs end to end and writes what docs/performance.md quotes."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn

from archbench.errors import ConfigError
from archbench.models import build_model
from archbench.models.blocks import Block
from archbench.models.futureformer import FutureSightBlock
from archbench.runtime import make_runtime

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"
# nanoGPT's model.py interface, for --nanogpt (the real file is not part of this repository)
NANOGPT_STANDIN = """
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from archbench.models import build_model


@dataclass
class GPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool


class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = build_model(
            "gpt", config.vocab_size, config.block_size, n_layer=config.n_layer,
            n_head=config.n_head, d_model=config.n_embd, mlp="gelu", norm="layernorm",
        )

    def forward(self, idx, targets):
        logits = self.model(idx)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
"""


def run_benchmark(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """One round of one step per model at the tiny shape (seconds, not a measurement)."""
    command = [sys.executable, str(SCRIPT), "--threads", "1", "--warmup", "1", "--steps", "1"]
    command += ["--rounds", "2", "--csv", str(tmp_path / "out.csv")]
    command += ["--markdown", str(tmp_path / "out.md"), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_throughput_writes_rows_against_a_parameter_matched_baseline(
    tmp_path: Path, clock: str
) -> None:
    result = run_benchmark(tmp_path, "--archs", "gpt,future_attention", "--clock", clock)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"gpt", "future_attention", "gpt mlp_ratio=4.5"}
    arch, matched = rows["future_attention"], rows["gpt mlp_ratio=4.5"]
    assert arch["baseline"] == "gpt mlp_ratio=4.5"
    assert abs(int(arch["n_params"]) / int(matched["n_params"]) - 1) < 0.005
    for row in rows.values():
        n_params, step_ms = int(row["n_params"]), float(row["step_ms"])
        assert step_ms > 0 and float(row["tokens_per_s"]) == pytest.approx(
            768 / (step_ms / 1000), rel=0.01
        )
        assert float(row["peak_mib"]) * 2**20 > 4 * 4 * n_params  # weights, grads, AdamW moments
    assert float(arch["time_vs_baseline"]) > 0
    assert f"step clock: {clock}" in (tmp_path / "out.md").read_text()


def test_throughput_refuses_a_cpu_clock_on_a_gpu(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path, "--archs", "gpt", "--clock", "cpu", "--device", "cuda")
    assert result.returncode == 2 and "--clock cpu" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--shapes", "tinny"), "unknown shapes ['tinny']; choose from tiny,"),
        (("--nanogpt", "/nonexistent/model.py"), "--nanogpt /nonexistent/model.py: no such file"),
        (("--shapes", "gpt2", "--device", "cpu"), "no shape to run on cpu"),
        (("--warmup", "0"), "--warmup must be at least 1"),
        (("--clock", "cpu", "--threads", "2"), "--clock cpu needs --threads 1"),
        (("--compile-mode", "reduce-overhead"), "--warmup must be at least 2"),
        (("--rounds", "0"), "argument --rounds: 0 is not >= 1"),
        (("--steps", "-1"), "argument --steps: -1 is not >= 1"),
        (("--threads", "0"), "argument --threads: 0 is not >= 1"),
    ],
)
def test_throughput_names_bad_arguments(tmp_path: Path, args: tuple, message: str) -> None:
    result = run_benchmark(tmp_path, "--archs", "gpt", *args)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_compiled_benchmark_also_times_nanogpt_eagerly(tmp_path: Path) -> None:
    """With --compile, nanoGPT runs compiled and, as its README trains on the CPU, eagerly."""
    nanogpt = tmp_path / "model.py"
    nanogpt.write_text(NANOGPT_STANDIN, encoding="utf-8")
    result = run_benchmark(
        tmp_path, "--archs", "gpt", "--compile", "--precision", "fp32", "--nanogpt", str(nanogpt)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"gpt", "nanoGPT", "nanoGPT eager"}
    assert {rows[name]["baseline"] for name in ("nanoGPT", "nanoGPT eager")} == {"gpt"}
    table = (tmp_path / "out.md").read_text()
    assert "as fast as nanoGPT's `model.py` run eagerly" in table
    assert "torch.compile: yes" in table


def test_a_bf16_cpu_benchmark_also_times_nanogpt_as_it_trains_on_a_cpu(tmp_path: Path) -> None:
    """nanoGPT's train.py autocasts on CUDA only: in a bf16 CPU run it is also timed in fp32."""
    nanogpt = tmp_path / "model.py"
    nanogpt.write_text(NANOGPT_STANDIN, encoding="utf-8")
    result = run_benchmark(
        tmp_path, "--archs", "gpt", "--precision", "bf16", "--nanogpt", str(nanogpt)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out.csv", newline="") as handle:
        assert {row["model"] for row in csv.DictReader(handle)} == {
            "gpt", "nanoGPT", "nanoGPT eager fp32"
        }  # fmt: skip
    table = (tmp_path / "out.md").read_text()
    assert "precision: bf16 autocast" in table
    assert "as fast as nanoGPT's `model.py` run eagerly in fp32" in table


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_the_fp32_nanogpt_entry_runs_outside_autocast(
    throughput: ModuleType, cpu_bf16: bool
) -> None:
    nanogpt = Path("model.py")
    planned = throughput.plan(throughput.SHAPES["tiny"], [], nanogpt, False, cpu_bf16)
    entries = {p.label: p for p in planned}
    assert ("nanoGPT eager fp32" in entries) is cpu_bf16
    assert all(p.fp32 == (p.label == "nanoGPT eager fp32") for p in entries.values())
    model = nn.Linear(2, 2)
    seen = []

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        return model(x).sum()

    runtime = make_runtime("cpu", "bf16")
    for fp32 in (False, True):
        c = throughput.Candidate(
            "m", "gpt", {}, model, torch.optim.SGD(model.parameters()), loss, loss, None, 6, fp32
        )
        throughput.train_step(c, torch.ones(1, 2), torch.ones(1, 2), runtime)
    assert seen == [True, False]


def test_compile_mode_implies_compile_and_is_named_in_the_header(tmp_path: Path) -> None:
    """--compile-mode compiles every loss in that mode and says so in the table's header."""
    result = run_benchmark(tmp_path, "--archs", "gpt", "--compile-mode", "default")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile: yes, mode default" in (tmp_path / "out.md").read_text()


def test_unknown_compile_mode_is_refused_with_the_choices(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path, "--compile-mode", "fastest")
    assert result.returncode == 2
    assert "reduce-overhead" in result.stderr


def test_profile_writes_each_models_most_expensive_ops(tmp_path: Path) -> None:
    """--profile writes one op table per model, named after shape and model, with the matmuls."""
    result = run_benchmark(tmp_path, "--archs", "mtp", "--profile", str(tmp_path / "profiles"))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out.csv", newline="") as handle:
        models = [row["model"] for row in csv.DictReader(handle)]
    files = sorted(path.name for path in (tmp_path / "profiles").iterdir())
    expected = sorted(f"tiny-{model.replace(' ', '_')}.txt" for model in models)
    assert files == expected and len(files) >= 2
    for name in files:
        text = (tmp_path / "profiles" / name).read_text()
        assert "1 training steps, sorted by self_cpu_time_total" in text.splitlines()[0]
        assert "aten::mm" in text and "aten::_fused_adamw_" in text


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    """The benchmark script as a module (benchmarks/ is not a package), loaded once."""
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_architecture_has_the_shapes_number_of_blocks(throughput: ModuleType) -> None:
    """futureformer's n_layer counts its body and mtp's its trunk: at a shape of 4 layers they
    are built with 2 of them, so that each has 4 blocks in all, as its `gpt` baseline has."""
    shape = throughput.SHAPES["tiny"]
    planned = {
        p.arch: p for p in throughput.plan(shape, ["futureformer", "mtp", "hourglass"], None)
    }
    assert planned["futureformer"].options == {"n_layer": 2}
    assert planned["futureformer"].label == "futureformer n_layer=2"
    assert planned["mtp"].options == {"n_layer": 2} and planned["mtp"].baseline == "gpt"
    assert planned["hourglass"].options == {}
    for arch in ("futureformer", "mtp"):
        with torch.device("meta"):
            model = build_model(arch, 321, 64, **{**shape.options, **planned[arch].options})
        blocks = [m for m in model.modules() if isinstance(m, (Block, FutureSightBlock))]
        assert len(blocks) == shape.n_layer


def test_a_shape_too_shallow_for_an_architecture_skips_it(throughput: ModuleType) -> None:
    shallow = throughput.Shape("shallow", 2, 2, 32, block_size=16, batch_size=2, vocab_size=50)
    with pytest.raises(ConfigError, match="2 blocks besides n_layer, and the shape has 2 in all"):
        throughput.depth_options("mtp", shallow)
    assert [p.arch for p in throughput.plan(shallow, ["mtp"], None)] == ["gpt"]


@pytest.mark.parametrize(
    ("is_cuda", "mode", "compiled", "measured"),
    [
        (True, "reduce-overhead", True, False),
        (True, "max-autotune", True, False),
        (True, "reduce-overhead", False, True),  # nanoGPT eager in the same run
        (True, "default", True, True),
        (True, None, True, True),
        (False, "reduce-overhead", True, True),  # no CUDA graphs on the CPU
    ],
)
def test_peak_memory_is_left_out_only_for_models_replayed_as_cuda_graphs(
    throughput: ModuleType, is_cuda: bool, mode: str | None, compiled: bool, measured: bool
) -> None:
    def raw_loss(x, y):
        return x

    candidate = SimpleNamespace(
        raw_loss=raw_loss, loss_fn=(lambda x, y: x) if compiled else raw_loss
    )
    runtime = SimpleNamespace(is_cuda=is_cuda)
    assert throughput.memory_is_measurable(candidate, runtime, mode) is measured


def test_a_blank_peak_memory_is_explained_under_the_table(throughput: ModuleType) -> None:
    row = {"shape": "s", "model": "gpt", "arch": "gpt", "n_params": 10**6, "step_ms": 5.0}
    row |= {"tokens_per_s": 1000, "baseline": "", "time_vs_baseline": "", "mfu": ""}
    blank = throughput.markdown([row | {"peak_mib": ""}], [])
    measured = throughput.markdown([row | {"peak_mib": 12.5}], [])
    assert "Peak memory is blank for models replayed as CUDA graphs" in blank
    assert "| s | gpt | 1.00M | 5.0 | 1,000 |  |  |  |" in blank
    assert "CUDA graphs" not in measured and "| 12.5 |" in measured


def test_cuda_peak_memory_is_read_after_the_last_gradients_are_freed(
    throughput: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the step's peak is counted from what is allocated before it: were the warm-up's
    gradients still held then, the step's own gradients would cancel out of its peak."""
    import contextlib

    import torch

    model = torch.nn.Linear(4, 4)
    candidate = SimpleNamespace(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        loss_fn=lambda x, y: torch.nn.functional.mse_loss(model(x), y),
        fp32=False,
    )
    runtime = SimpleNamespace(is_cuda=True, autocast=contextlib.nullcontext)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    throughput.train_step(candidate, x, y, runtime)  # the warm-up leaves gradients behind
    grads_held_when_read: list[bool] = []

    def memory_allocated() -> int:
        grads_held_when_read.append(any(p.grad is not None for p in model.parameters()))
        return 0

    monkeypatch.setattr(torch.cuda, "memory_allocated", memory_allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    throughput.measure_memory(candidate, x, y, runtime)
    assert grads_held_when_read == [False]


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA RTX A1000", None),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Some Future GPU", None),
    ],
)
def test_mfu_peak_is_the_devices_own(
    throughput: ModuleType, monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None
) -> None:
    """A device name that contains another's (L40 holds L4, H100 NVL holds H100) gets its own
    peak, not the first fragment it contains."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    runtime = SimpleNamespace(is_cuda=True, device="cuda", bf16=True)
    assert throughput.device_peak_tflops(runtime, None) == peak
    fp32 = SimpleNamespace(is_cuda=True, device="cuda", bf16=False)  # the table holds bf16 peaks
    assert throughput.device_peak_tflops(fp32, None) is None
    assert throughput.device_peak_tflops(fp32, 60.0) == 60.0


def test_alternation_starts_each_model_in_turn_and_balances_who_follows_whom(
    throughput: ModuleType,
) -> None:
    models = ["a", "b", "c", "d"]
    orders = [throughput.alternation(models, r) for r in range(8)]
    assert all(sorted(order) == models for order in orders)
    assert {order[0] for order in orders} == set(models)
    follows = [
        sum(order.index(first) + 1 == order.index(then) for order in orders)
        for first, then in (("a", "b"), ("b", "a"))
    ]
    assert follows[0] == follows[1] > 0


def test_matched_mlp_ratio_gives_the_closest_parameter_count(throughput: ModuleType) -> None:
    """No other SwiGLU width (the ratio moves it in steps of 8) comes closer to the target."""
    shape = throughput.SHAPES["tiny"]
    target = throughput.params_of("futureformer", shape, n_layer=2)
    ratio = throughput.matched_mlp_ratio(shape, target)
    best = abs(throughput.params_of("gpt", shape, mlp_ratio=ratio) - target)
    step = 3 * 8 / 2 / shape.d_model  # one step of 8 hidden units, in mlp_ratio
    for other in (ratio - step, ratio + step):
        assert best <= abs(throughput.params_of("gpt", shape, mlp_ratio=other) - target)
