"""Training-step throughput of every registered architecture against a parameter-matched baseline.

For each shape, every architecture in the registry (read at run time) is built with the shape's
`n_layer`, `n_head` and `d_model` and its own default options; one whose `n_layer` counts only
part of its blocks (futureformer's body, mtp's trunk) gets the `n_layer` that makes the shape's
number of blocks in all, as its baseline has. Its baseline is `gpt` at the same
shape with `mlp_ratio` chosen so that the parameter counts match (the plain `gpt` when they are
already within 0.5%). One step is what training does: forward and loss, backward, gradient
clipping and a fused AdamW update, on the training code path (`archbench.runtime`: bf16 autocast
and TF32 on CUDA; optionally `torch.compile` of the loss, as the gpu and default suites do).

All models of a shape are built first and then timed in alternation, `--rounds` times
`--steps` steps each after `--warmup` steps, so that a machine whose speed drifts (other jobs,
thermal limits) affects every model alike; each ratio to a baseline is the median of the
per-round ratios. Peak memory is the parameters, buffers and optimizer state plus the peak of
the tensors allocated during one step (tracked per tensor on the CPU, by the caching allocator
on CUDA). On CUDA the model FLOPs utilisation is the FLOPs torch counts for forward + backward
(causal attention counted as full attention) per second, over the device's dense bf16 peak.

`--nanogpt PATH` adds karpathy/nanoGPT's `model.py` (a copy you supply; it is not part of this
repository) at the same shape, compared with the `gpt` baseline in the same alternation.

`--profile DIR` then runs `--steps` more steps of each model under torch.profiler and writes the
ops that took the most time (GPU time on CUDA, CPU time otherwise) to DIR/<shape>-<model>.txt:
where a step's time goes, for a model slower than its baseline.

    python benchmarks/throughput.py                                  # tiny CPU shape, < 2 min
    python benchmarks/throughput.py --threads 2 --nanogpt ../nanoGPT/model.py
    python benchmarks/throughput.py --device cuda --compile          # all shapes on a GPU
    python benchmarks/throughput.py --archs hourglass --profile results/benchmarks/profiles
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from archbench.cli import positive_int
from archbench.errors import ConfigError
from archbench.models import ARCHITECTURES, build_model, make_config
from archbench.runtime import COMPILE_MODES, CUDA_GRAPH_MODES, Runtime, make_runtime
from archbench.train import TrainConfig, make_optimizer, measure_step_flops, seed_everything

ROOT = Path(__file__).resolve().parents[1]
# How a step is timed: wall-clock time, or the CPU time of this process, which on a machine shared
# with other jobs leaves out the time spent waiting for a core (with one torch thread it is the
# step's own compute; with several it is their sum).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
CPU_CLOCK_ONLY = "--clock cpu measures CPU work; GPU steps need --clock wall"
GRAPH_WARMUP_NEEDED = "--warmup must be at least 2: CUDA graphs are recorded on the second call"
CPU_CLOCK_ONE_THREAD = (
    "--clock cpu needs --threads 1: the process's CPU time adds up every thread's, spin-waits "
    "included"
)
WARMUP_NEEDED = (
    "--warmup must be at least 1: peak memory is measured once the optimizer state exists"
)
MATCH_TOLERANCE = 0.005  # relative parameter difference below which `gpt` itself is the baseline
PROFILE_ROWS = 30  # ops listed per profile
# How the extra nanoGPT entries run, as the summary under the table says it.
NANOGPT_RECIPES = {
    "nanoGPT eager": " run eagerly",
    "nanoGPT eager fp32": " run eagerly in fp32 (as its README trains on a CPU)",
}


@dataclass(frozen=True)
class Shape:
    """A model shape and batch to benchmark every architecture at."""

    name: str
    n_layer: int
    n_head: int
    d_model: int
    block_size: int
    batch_size: int
    vocab_size: int
    cuda_only: bool = False

    @property
    def options(self) -> dict[str, int]:
        """The shape options every architecture accepts."""
        return {"n_layer": self.n_layer, "n_head": self.n_head, "d_model": self.d_model}


SHAPES = {
    shape.name: shape
    for shape in (
        # The CPU shape, also the one nanoGPT was measured at (vocab: char-level + bytes).
        Shape("tiny", 4, 4, 128, block_size=64, batch_size=12, vocab_size=321),
        # The default CPU suite's training shape (configs/suites/default.yaml).
        Shape("cpu_suite", 4, 4, 128, block_size=128, batch_size=16, vocab_size=321),
        # nanoGPT's shakespeare_char config (the gpu suite's shape).
        Shape("shakespeare_char", 6, 6, 384, block_size=256, batch_size=64, vocab_size=321),
        # GPT-2 small (~124M parameters), GPU only.
        Shape(
            "gpt2", 12, 12, 768, block_size=1024, batch_size=16, vocab_size=50304, cuda_only=True
        ),
    )
}

# Dense bf16 peak TFLOP/s by the words of a device name, most specific first; --peak-tflops
# overrides.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)


@dataclass
class Candidate:
    """One model in the alternation: how to run its step, and what was measured."""

    label: str
    arch: str
    options: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # compiled if asked for
    raw_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # eager
    baseline: str | None
    n_params: int
    fp32: bool = False  # outside bf16 autocast even when the run uses it
    step_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None  # None: not measurable (CUDA graphs)
    flops_per_step: int = 0


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (CPU memory has no allocator stats).

    A storage an op returns that none of its inputs owns is new; it counts until it is freed,
    which a weak reference to the storage reports. In-place ops and views allocate nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        """Run the op, then count the storages it created."""
        out = func(*args, **(kwargs or {}))
        owned = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in owned or key in self._alive or size == 0:
                continue
            self.live += size
            self.peak = max(self.peak, self.live)
            self._alive[key] = weakref.ref(storage, lambda _, k=key, n=size: self._free(k, n))
        return out

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._alive.pop(key, None)


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def params_of(arch: str, shape: Shape, **options: Any) -> int:
    """Parameter count of `arch` at `shape`, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(
            arch, shape.vocab_size, shape.block_size, **{**shape.options, **options}
        )
    return count_params(model)


def depth_options(arch: str, shape: Shape) -> dict[str, int]:
    """`{"n_layer": L - extra}` for an architecture whose n_layer counts only part of its blocks
    (futureformer's body, mtp's trunk: `extra_blocks()`), so that it has the shape's L blocks in
    all, as its `gpt` baseline has and as the experiments table pairs them; else {}."""
    extra = make_config(arch, shape.vocab_size, shape.block_size, **shape.options).extra_blocks()
    if not extra:
        return {}
    if shape.n_layer - extra < 1:
        raise ConfigError(
            f"it has {extra} blocks besides n_layer, and the shape has {shape.n_layer} in all"
        )
    return {"n_layer": shape.n_layer - extra}


def matched_mlp_ratio(shape: Shape, target: int) -> float:
    """The `mlp_ratio` whose `gpt` at `shape` has the parameter count closest to `target`."""
    lo, hi = 0.25, 64.0
    for _ in range(30):  # parameters grow with the MLP width: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params_of("gpt", shape, mlp_ratio=mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda r: abs(params_of("gpt", shape, mlp_ratio=r) - target))
    short = round(best, 4)  # a readable label, unless rounding crosses a width step
    same = params_of("gpt", shape, mlp_ratio=short) == params_of("gpt", shape, mlp_ratio=best)
    return short if same else best


def load_nanogpt(path: Path) -> Any:
    """Import a nanoGPT `model.py` from `path` as a module."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"throughput.py: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks its functions' module up by name
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Planned:
    """A model to build: its label in the results, architecture, options and baseline's label."""

    label: str
    arch: str  # a registered architecture, or "nanogpt"
    options: dict[str, Any]
    baseline: str | None
    eager: bool = False  # never torch.compile'd, even with --compile
    fp32: bool = False  # outside bf16 autocast even when the run uses it


def plan(
    shape: Shape,
    archs: list[str],
    nanogpt: Path | None,
    compiled: bool = False,
    cpu_bf16: bool = False,
) -> list[Planned]:
    """The models to compare at `shape`: `gpt`, each architecture and its matched baseline, and
    nanoGPT if given; when `compiled` or in bf16 on the CPU (`cpu_bf16`), nanoGPT also as its
    README trains on a CPU: eagerly (`--compile=False`) and in fp32 (its train.py autocasts on
    CUDA only)."""
    base_params = params_of("gpt", shape)
    planned = [Planned("gpt", "gpt", {}, None)]
    for arch in archs:
        if arch == "gpt":
            continue
        try:
            options = depth_options(arch, shape)
            n = params_of(arch, shape, **options)
        except ConfigError as err:
            print(f"skipping {arch} at {shape.name}: {err}", file=sys.stderr)
            continue
        baseline = "gpt"
        if abs(n - base_params) > MATCH_TOLERANCE * base_params:
            ratio = matched_mlp_ratio(shape, n)
            baseline = f"gpt mlp_ratio={ratio:g}"
            if baseline not in {p.label for p in planned}:
                planned.append(Planned(baseline, "gpt", {"mlp_ratio": ratio}, None))
        label = " ".join([arch, *(f"{k}={v}" for k, v in options.items())])
        planned.append(Planned(label, arch, options, baseline))
    if nanogpt is not None:
        planned.append(Planned("nanoGPT", "nanogpt", {}, "gpt"))
        if compiled or cpu_bf16:
            label = "nanoGPT eager fp32" if cpu_bf16 else "nanoGPT eager"
            planned.append(Planned(label, "nanogpt", {}, "gpt", eager=True, fp32=cpu_bf16))
    return planned


def build(
    entry: Planned,
    shape: Shape,
    runtime: Runtime,
    nanogpt: Any,
    compile_loss: bool,
    compile_mode: str = "default",
) -> Candidate:
    """Instantiate one planned candidate on the device with its optimizer and loss function
    (compiled with torch.compile's `compile_mode` when `compile_loss`)."""
    if entry.arch == "nanogpt":
        config = nanogpt.GPTConfig(
            block_size=shape.block_size,
            vocab_size=shape.vocab_size,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            n_embd=shape.d_model,
            dropout=0.0,
            bias=False,  # nanoGPT's train.py default
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
            model = nanogpt.GPT(config).to(runtime.device)

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, y)[1]
    else:
        model = build_model(
            entry.arch, shape.vocab_size, shape.block_size, **{**shape.options, **entry.options}
        ).to(runtime.device)

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model.loss(x, y)[0]

    return Candidate(
        entry.label,
        entry.arch,
        entry.options,
        model,
        make_optimizer(model, TrainConfig()),
        runtime.compile(loss, compile_mode) if compile_loss and not entry.eager else loss,
        loss,
        entry.baseline,
        count_params(model),
        entry.fp32,
    )


def train_step(
    c: Candidate, x: torch.Tensor, y: torch.Tensor, runtime: Runtime, eager: bool = False
) -> None:
    """One optimizer step as training takes it (`eager`: without torch.compile)."""
    c.optimizer.zero_grad(set_to_none=True)
    with contextlib.nullcontext() if c.fp32 else runtime.autocast():
        loss = (c.raw_loss if eager else c.loss_fn)(x, y)
    loss.backward()
    nn.utils.clip_grad_norm_(c.model.parameters(), 1.0)
    c.optimizer.step()


def state_bytes(c: Candidate) -> int:
    """Bytes of parameters, buffers and optimizer state: what lives between steps."""
    tensors = [*c.model.parameters(), *c.model.buffers()]
    tensors += [t for s in c.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(unique.values())


def measure_memory(c: Candidate, x: torch.Tensor, y: torch.Tensor, runtime: Runtime) -> int:
    """Peak bytes of one training step, state included (after a warm-up step: the optimizer's
    state must exist already, or the step's transient memory would count it twice)."""
    c.optimizer.zero_grad(set_to_none=True)  # the step's gradients count as transient memory
    if runtime.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(c, x, y, runtime)
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - before
    else:  # compiled code allocates out of the tracker's sight: measure the eager step
        with PeakTensorBytes() as tracker:
            train_step(c, x, y, runtime, eager=True)
        transient = tracker.peak
    return state_bytes(c) + transient


def memory_is_measurable(c: Candidate, runtime: Runtime, compile_mode: str | None) -> bool:
    """False for a model replayed as CUDA graphs: their memory pool is allocated while the graphs
    are recorded, in the warm-up, so a replayed step's allocator peak leaves out its activations."""
    compiled = c.loss_fn is not c.raw_loss
    return not (runtime.is_cuda and compiled and compile_mode in CUDA_GRAPH_MODES)


def alternation(models: list[Any], round_: int) -> list[Any]:
    """The order of `models` in timing round `round_`: rotated by one place every two rounds, so
    that each starts a round in turn, and reversed in odd rounds, so that of two neighbours each
    runs right after the other equally often."""
    k = round_ // 2 % len(models)
    order = models[k:] + models[:k]
    return order[::-1] if round_ % 2 else order


def run_shape(
    shape: Shape, args: argparse.Namespace, runtime: Runtime, nanogpt: Any
) -> list[dict[str, Any]]:
    """Build every candidate of `shape`, then time them in alternation; returns result rows."""
    seed_everything(args.seed)  # as training: its seed and its deterministic-kernel mode
    x, y = (
        torch.randint(0, shape.vocab_size, (shape.batch_size, shape.block_size)).to(runtime.device)
        for _ in range(2)
    )
    cpu_bf16 = runtime.bf16 and runtime.device.type == "cpu"
    planned = plan(shape, args.archs, args.nanogpt, args.compile, cpu_bf16)
    if args.compile:
        # Every candidate's loss is the same Python function over another model, and each one is
        # a recompilation of it: past dynamo's limit (8) the rest would silently run eagerly.
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(8, 2 * len(planned))
    candidates = [
        build(entry, shape, runtime, nanogpt, args.compile, args.compile_mode or "default")
        for entry in planned
    ]
    for c in candidates:
        for _ in range(args.warmup):
            train_step(c, x, y, runtime)
        if memory_is_measurable(c, runtime, args.compile_mode):
            c.peak_bytes = measure_memory(c, x, y, runtime)
        if runtime.is_cuda:
            c.flops_per_step = measure_step_flops(c.raw_loss, c.model, x, y)
        print(f"  {shape.name}: {c.label} ready ({c.n_params:,} parameters)", file=sys.stderr)
    for round_ in range(args.rounds):
        for c in alternation(candidates, round_):
            runtime.synchronize()
            tick = CLOCKS[args.clock]()
            for _ in range(args.steps):
                train_step(c, x, y, runtime)
            runtime.synchronize()
            c.step_times.append((CLOCKS[args.clock]() - tick) / args.steps)
    if args.profile:
        for c in candidates:
            name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{shape.name}-{c.label}")
            write_profile(c, x, y, runtime, args.steps, args.profile / f"{name}.txt")
    return summarize(shape, candidates, runtime, args.peak_tflops)


def write_profile(
    c: Candidate, x: torch.Tensor, y: torch.Tensor, runtime: Runtime, steps: int, path: Path
) -> None:
    """Profile `steps` training steps of `c`; write its most expensive ops as a table to `path`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runtime.is_cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            train_step(c, x, y, runtime)
        runtime.synchronize()
    sort_by = "self_device_time_total" if runtime.is_cuda else "self_cpu_time_total"
    table = profiler.key_averages().table(
        sort_by=sort_by, row_limit=PROFILE_ROWS, max_name_column_width=70
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{c.label}: {steps} training steps, sorted by {sort_by}\n{table}",
        encoding="utf-8",
    )
    print(f"  profile: {path}", file=sys.stderr)


def summarize(
    shape: Shape, candidates: list[Candidate], runtime: Runtime, peak_tflops: float | None
) -> list[dict[str, Any]]:
    """One result row per candidate."""
    by_label = {c.label: c for c in candidates}
    tokens = shape.batch_size * shape.block_size
    rows = []
    for c in candidates:
        step = statistics.median(c.step_times)
        row = {
            "shape": shape.name,
            "model": c.label,
            "arch": c.arch,
            "options": " ".join(f"{k}={v}" for k, v in c.options.items()),
            "baseline": c.baseline or "",
            "n_params": c.n_params,
            "n_layer": shape.n_layer,
            "n_head": shape.n_head,
            "d_model": shape.d_model,
            "block_size": shape.block_size,
            "batch_size": shape.batch_size,
            "step_ms": round(1000 * step, 2),
            "step_ms_min": round(1000 * min(c.step_times), 2),
            "step_ms_max": round(1000 * max(c.step_times), 2),
            "tokens_per_s": round(tokens / step),
            "time_vs_baseline": "",
            "time_vs_baseline_min": "",
            "time_vs_baseline_max": "",
            "peak_mib": "" if c.peak_bytes is None else round(c.peak_bytes / 2**20, 1),
            "mfu": "",
        }
        if c.baseline:
            base = by_label[c.baseline].step_times
            ratios = [t / b for t, b in zip(c.step_times, base, strict=True)]
            row["time_vs_baseline"] = round(statistics.median(ratios), 3)
            row["time_vs_baseline_min"] = round(min(ratios), 3)
            row["time_vs_baseline_max"] = round(max(ratios), 3)
        if runtime.is_cuda and peak_tflops:
            row["mfu"] = round(c.flops_per_step / step / (peak_tflops * 1e12), 3)
        rows.append(row)
    return rows


def device_peak_tflops(runtime: Runtime, override: float | None) -> float | None:
    """Dense bf16 peak of the CUDA device, from --peak-tflops or the table above; the table
    only for bf16 runs (an fp32 run's MFU against the bf16 peak would understate it several
    times over: give its peak with --peak-tflops)."""
    if override or not runtime.is_cuda or not runtime.bf16:
        return override
    name = torch.cuda.get_device_name(runtime.device)
    return next(
        (peak for key, peak in BF16_PEAK_TFLOPS if re.search(rf"\b{re.escape(key)}\b", name)),
        None,
    )


def machine_description(
    runtime: Runtime, clock: str, compiled: bool, compile_mode: str | None = None
) -> list[str]:
    """Machine, versions and commit, for the header of the Markdown output."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError):  # no git on the machine
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    device = str(runtime.device)
    if runtime.is_cuda:
        device += f" ({torch.cuda.get_device_name(runtime.device)})"
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs; {platform.system()} "
        f"{platform.release()}",
        f"- device: {device}; torch threads: {torch.get_num_threads()}; "
        f"precision: {'bf16 autocast' if runtime.bf16 else 'fp32'}; step clock: {clock}; "
        f"torch.compile: {compile_description(compiled, compile_mode)}",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}; "
        f"archbench commit {commit or 'unknown'}",
        "- command: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`",
    ]


def compile_description(compiled: bool, mode: str | None) -> str:
    """Whether (and in which mode) the losses were compiled, for the output's header."""
    if not compiled:
        return "no"
    return f"yes{f', mode {mode}' if mode else ''} (but not the models labelled eager)"


# How a result row's non-empty value of a column is written in the Markdown table (others: as is).
CELL_FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "n_params": lambda row: f"{row['n_params'] / 1e6:.2f}M",
    "tokens_per_s": lambda row: f"{row['tokens_per_s']:,}",
    "time_vs_baseline": lambda row: (
        f"{row['time_vs_baseline']:.2f}× ({row['time_vs_baseline_min']:.2f}–"
        f"{row['time_vs_baseline_max']:.2f})"
    ),
    "mfu": lambda row: f"{100 * row['mfu']:.1f}%",
}


def markdown(rows: list[dict[str, Any]], header: list[str]) -> str:
    """The results as a Markdown table under the machine description."""
    columns = [
        ("shape", "shape"),
        ("model", "model"),
        ("n_params", "params"),
        ("step_ms", "step ms"),
        ("tokens_per_s", "tokens/s"),
        ("baseline", "baseline"),
        ("time_vs_baseline", "time / baseline"),
        ("peak_mib", "peak MiB"),
    ]
    if any(row["mfu"] != "" for row in rows):
        columns.append(("mfu", "MFU"))
    lines = [*header, "", "| " + " | ".join(title for _, title in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [
            str(row[key]) if row[key] == "" or key not in CELL_FORMATS else CELL_FORMATS[key](row)
            for key, _ in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row["time_vs_baseline"] != "" for row in rows):
        lines.append(
            "\n'time / baseline' is the median over rounds of the ratio of the two models' step "
            "times in the same round (range: the rounds' extremes), not the ratio of the 'step "
            "ms' medians."
        )
    if any(row["peak_mib"] == "" for row in rows):
        lines.append(
            "\nPeak memory is blank for models replayed as CUDA graphs: their memory pool is "
            "allocated when the graphs are recorded, outside a timed step."
        )
    nano = [row for row in rows if row["arch"] == "nanogpt"]
    for row in nano:
        against = "nanoGPT's `model.py`" + NANOGPT_RECIPES.get(row["model"], "")
        lines.append(
            f"\nAt `{row['shape']}`: the `gpt` baseline trains "
            f"{row['time_vs_baseline']:.2f}× as fast as {against} "
            f"(per-round range {row['time_vs_baseline_min']:.2f}–"
            f"{row['time_vs_baseline_max']:.2f})."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default: tiny; all on CUDA)"
    )
    parser.add_argument(
        "--archs", help="comma-separated registered architectures (default: all of them)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile every loss")
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile's mode (implies --compile; reduce-overhead: CUDA graphs)",
    )
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--warmup", type=int, help="untimed steps per model (default 5; 10 with --compile)"
    )
    parser.add_argument("--rounds", type=positive_int, default=5, help="alternation rounds")
    parser.add_argument(
        "--steps", type=positive_int, default=4, help="timed steps per model and round"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nanogpt", type=Path, help="a copy of karpathy/nanoGPT's model.py")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="device peak TFLOP/s at the run's precision, for the MFU (default: the bf16 table)",
    )
    parser.add_argument(
        "--csv", type=Path, default=ROOT / "results/benchmarks/throughput.csv", help="CSV output"
    )
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="also profile --steps steps per model; tables go to this folder",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=tuple(CLOCKS),
        help="time steps by wall clock, or by this process's CPU time (a busy CPU machine)",
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device not in ("auto", "cpu"):
        parser.error(CPU_CLOCK_ONLY)
    if args.clock == "cpu" and args.threads != 1:
        parser.error(CPU_CLOCK_ONE_THREAD)
    args.compile = args.compile or args.compile_mode is not None
    args.archs = args.archs.split(",") if args.archs else sorted(ARCHITECTURES)
    if args.warmup is None:
        args.warmup = 10 if args.compile else 5
    if args.warmup < 1:
        parser.error(WARMUP_NEEDED)
    if args.compile_mode in CUDA_GRAPH_MODES and args.warmup < 2:
        parser.error(f"--compile-mode {args.compile_mode}: {GRAPH_WARMUP_NEEDED}")
    unknown = sorted(set(args.archs) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown architectures {unknown}; registered: {sorted(ARCHITECTURES)}")
    unknown = sorted(set(args.shapes.split(",") if args.shapes else ()) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    if args.nanogpt and not args.nanogpt.is_file():
        parser.error(f"--nanogpt {args.nanogpt}: no such file")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; print the Markdown table and write the CSV."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = make_runtime(args.device, args.precision)
    if args.clock == "cpu" and runtime.device.type != "cpu":
        sys.exit(f"throughput.py: error: {CPU_CLOCK_ONLY} (auto picked {runtime.device})")
    names = args.shapes.split(",") if args.shapes else ["tiny"]
    if not args.shapes and runtime.is_cuda:
        names = list(SHAPES)
    shapes = [SHAPES[name] for name in names]
    skipped = [s.name for s in shapes if s.cuda_only and not runtime.is_cuda]
    if skipped:
        print(f"skipping the CUDA-only shapes {skipped} on {runtime.device}", file=sys.stderr)
    args.peak_tflops = device_peak_tflops(runtime, args.peak_tflops)
    nanogpt = load_nanogpt(args.nanogpt) if args.nanogpt else None
    rows = []
    for shape in shapes:
        if shape.name not in skipped:
            rows += run_shape(shape, args, runtime, nanogpt)
    if not rows:
        sys.exit(f"throughput.py: error: no shape to run on {runtime.device}")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = machine_description(runtime, args.clock, args.compile, args.compile_mode)
    table = markdown(rows, header)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    print(table)
    print(f"CSV: {args.csv}", file=sys.stderr)


if __name__ == "__main__":
    main()
