"""Training one (experiment, seed): AdamW, warmup + cosine, clipping, validation, checkpoints.

Everything that decides the result is a function of the run spec and the seed: the model init
(`torch.manual_seed(seed)` before building), the data order (batch k of seed s is drawn from
`numpy.random.default_rng((s, k))`, so every row with the same seed sees the same batches), and
dropout (torch RNG state, saved in checkpoints). A run resumed from its last checkpoint therefore
ends with the same weights and metrics as one that never stopped: bit for bit on the CPU; on
CUDA, up to the kernels that have no deterministic version (attention's backward among them:
torch only warns about those).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

from archbench.checkpoint import (
    load_training_state,
    read_training_meta,
    save_training_state,
    save_weights,
)
from archbench.data import (
    Instances,
    check_seed,
    load_instances,
    load_meta,
    load_meta_of,
    load_tokens,
)
from archbench.errors import ArchbenchError, ConfigError
from archbench.init_from import initialise
from archbench.io import atomic_path, write_json
from archbench.models import get_architecture, make_config
from archbench.models.blocks import IGNORE_INDEX, tally_recomputed_flops
from archbench.options import coerce_all, option
from archbench.runtime import COMPILE_MODES, Runtime, fork_rng, make_runtime

LOSS_MASKS = ("answers", "all")
GRAD_NORM = "grad_norm"  # the total gradient norm before clipping, mean over a metrics row's steps
BASE_COLUMNS = (
    *("step", "tokens", "lr", "train_loss", "val_loss", GRAD_NORM),
    *("elapsed_seconds", "tokens_per_s"),
)
CHECKPOINT = "checkpoint.safetensors"
PARTIAL_LOG = "metrics.partial.csv"


class DivergedError(ArchbenchError):
    """A loss became NaN or infinite."""


class Preempted(ArchbenchError):
    """Training stopped on SIGTERM (e.g. a cluster preemption) after saving a checkpoint."""


class _StopRequest(contextlib.AbstractContextManager):
    """While active, SIGTERM sets `requested` instead of killing the process, so the training
    loop can finish its step and save a checkpoint (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping options (settable per suite and per row)."""

    block_size: int = option(128, "context length in tokens", min=2)
    batch_size: int = option(16, "sequences per optimizer step", min=1)
    token_budget: int = option(
        1_000_000, "training tokens; steps = budget // (batch * block)", min=1
    )
    lr: float = option(1e-3, "peak learning rate", min=0.0, min_exclusive=True)
    min_lr_ratio: float = option(
        0.1, "final / peak learning rate of the cosine decay", min=0.0, max=1.0
    )
    warmup_steps: int = option(100, "linear warmup steps", min=0)
    weight_decay: float = option(
        0.1,
        "AdamW weight decay on parameters of 2+ dimensions, as nanoGPT: weight matrices, "
        "embeddings and learned tables such as future attention's K_future/V_future slots; not "
        "on norm gains or biases (FutureFormer's bag_bias)",
        min=0.0,
    )
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=0.9999)
    beta2: float = option(0.95, "AdamW beta2", min=0.0, max=0.99999)
    grad_clip: float = option(
        1.0,
        "max global gradient norm (0 = no clipping) of the whole loss: auxiliary losses (mtp's "
        "heads, FutureFormer's spans, future attention's) add to the gradient, so such rows can "
        "be clipped more often than their baseline; metrics.csv logs the norm before clipping "
        "(grad_norm, mean over the steps of each row)",
        min=0.0,
    )
    eval_every: int = option(250, "validate every N steps (and after the last)", min=1)
    eval_batches: int = option(
        8,
        "batches in each periodic validation, of windows spread evenly over the val split "
        "(overlapping where it is short; the same for rows of one block and batch size)",
        min=1,
    )
    log_every: int = option(10, "write a metrics row every N steps", min=1)
    checkpoint_every: int = option(200, "save resumable state every N steps", min=1)
    device: str = option(
        "auto",
        "compute device (auto: cuda, then mps, then cpu)",
        choices=("auto", "cpu", "cuda", "mps"),
    )
    precision: str = option(
        "auto",
        "training precision (auto: bf16 autocast on a CUDA GPU with bf16 hardware, Ampere or "
        "newer, and on a CPU with AMX; fp32 elsewhere)",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = option(False, "torch.compile the training step's loss function")
    compile_mode: str = option(
        "default",
        "torch.compile's mode with compile=true (reduce-overhead, max-autotune: CUDA graphs on "
        "a GPU; the gpu suite trains with reduce-overhead)",
        choices=COMPILE_MODES,
    )
    loss_mask: str = option(
        "answers",
        "synthetic data sets only (text ignores it): targets in the loss, the answer tokens "
        "(answers) or every token (all)",
        choices=LOSS_MASKS,
    )
    init_freeze: bool = option(
        False, "keep the parts filled by the row's init_from cell frozen while the rest trains"
    )

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.batch_size * self.block_size

    @property
    def steps(self) -> int:
        """Number of optimizer steps the token budget pays for."""
        return self.token_budget // self.tokens_per_step

    def validate(self) -> None:
        """Check constraints between options; raise ConfigError naming them."""
        if self.steps < 1:
            raise ConfigError(
                f"token_budget={self.token_budget} is smaller than one batch "
                f"(batch_size * block_size = {self.tokens_per_step})"
            )


def make_train_config(values: dict[str, Any]) -> TrainConfig:
    """Validated TrainConfig from option values (strings or typed)."""
    config = TrainConfig(**coerce_all(TrainConfig, values, "training"))
    config.validate()
    return config


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup, then cosine decay that reaches
    min_lr_ratio * lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = config.steps - 1 - config.warmup_steps  # 0: one step after warmup, the last: floor
    progress = min(1.0, (step - config.warmup_steps) / span) if span > 0 else 1.0
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def batch_at(
    tokens: np.ndarray, seed: int, step: int, batch_size: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of the training stream for `seed`: random windows, a pure function of both."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size, endpoint=True)
    windows = torch.from_numpy(
        np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)
    )
    return windows[:, :-1], windows[:, 1:]


def instance_batch_at(
    instances: Instances, seed: int, step: int, batch_size: int, loss_mask: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of a synthetic training split for `seed`: whole instances drawn at random
    (a pure function of both, as `batch_at`), as `instance_pairs`."""
    rows = np.random.default_rng((seed, step)).integers(0, len(instances.ids), size=batch_size)
    return instance_pairs(instances, rows, loss_mask)


def instance_pairs(
    instances: Instances, rows: np.ndarray, loss_mask: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = ids[rows, :-1], y = ids[rows, 1:], with y = IGNORE_INDEX outside the answer tokens
    when loss_mask is "answers"."""
    ids = torch.from_numpy(instances.ids[rows])
    targets = ids[:, 1:].clone()
    if loss_mask == "answers":
        targets[~torch.from_numpy(instances.mask[rows, 1:])] = IGNORE_INDEX
    return ids[:, :-1], targets


@dataclass(frozen=True)
class TrainingData:
    """What a run reads: the training batch of (seed, step), the fixed validation batches and
    the tokens one step feeds the model."""

    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    tokens_per_step: int


def load_training_data(
    data_dir: Path, dataset: str, config: TrainConfig, model_config: Any
) -> TrainingData:
    """Random token windows of a text data set, or whole instances of a synthetic one (which
    must fit the block and give `model_config`'s auxiliary losses targets)."""
    if "instance_length" in load_meta(data_dir):
        return _instance_data(data_dir, dataset, config, model_config)
    return _window_data(data_dir, dataset, config)


def _window_data(data_dir: Path, dataset: str, config: TrainConfig) -> TrainingData:
    """Text: `batch_at` windows; validation on evenly spaced windows of the val split."""
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < config.block_size + 1:  # one window of inputs and its targets
            raise ConfigError(
                f"{split} split of '{dataset}' has {len(tokens)} tokens, fewer than "
                f"block_size + 1 = {config.block_size + 1}"
            )
    count = config.eval_batches * config.batch_size
    starts = np.linspace(0, len(val_tokens) - config.block_size - 1, count).astype(np.int64)
    windows = torch.from_numpy(
        np.asarray(val_tokens[starts[:, None] + np.arange(config.block_size + 1)], dtype=np.int64)
    )
    return TrainingData(
        batch=lambda seed, step: batch_at(
            train_tokens, seed, step, config.batch_size, config.block_size
        ),
        val_batches=[(w[:, :-1], w[:, 1:]) for w in windows.split(config.batch_size)],
        tokens_per_step=config.tokens_per_step,
    )


def check_instances_fit(
    dataset: str, instance_length: int, block_size: int, model_config: Any
) -> None:
    """Raise ConfigError unless `block_size` holds one instance of a synthetic data set (the
    model reads its first instance_length - 1 tokens), and the model's auxiliary losses have
    targets inside that window (`model_config.check_window`)."""
    if block_size < instance_length - 1:
        raise ConfigError(
            f"data set '{dataset}' has instances of {instance_length} tokens: block_size="
            f"{block_size} must be at least instance_length - 1 = {instance_length - 1}"
        )
    try:
        model_config.check_window(instance_length - 1)
    except ConfigError as err:
        raise ConfigError(
            f"data set '{dataset}' has instances of {instance_length} tokens: {err}"
        ) from None


def _instance_data(
    data_dir: Path, dataset: str, config: TrainConfig, model_config: Any
) -> TrainingData:
    """Synthetic: `instance_batch_at` batches; validation on the first eval_batches *
    batch_size val instances, masked alike."""
    train, val = load_instances(data_dir, "train"), load_instances(data_dir, "val")
    length = train.ids.shape[1]
    check_instances_fit(dataset, length, config.block_size, model_config)
    rows = np.arange(min(len(val.ids), config.eval_batches * config.batch_size))
    return TrainingData(
        batch=lambda seed, step: instance_batch_at(
            train, seed, step, config.batch_size, config.loss_mask
        ),
        val_batches=[
            instance_pairs(val, chunk, config.loss_mask)
            for chunk in np.array_split(rows, math.ceil(len(rows) / config.batch_size))
        ],
        tokens_per_step=config.batch_size * (length - 1),
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels (on CUDA, cuBLAS is
    deterministic only with a fixed workspace, set here unless the environment sets one)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only, as in nanoGPT.

    torch's fused kernel (one call per parameter group instead of a dozen) runs on every device
    archbench picks (CPU, CUDA, MPS); on the CPU it makes a step of the tiny shape about 3% faster
    than the default multi-tensor kernel (docs/performance.md).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total unique parameters and those outside the input embedding."""
    total = sum(p.numel() for p in model.parameters())
    embed = getattr(model, "embed", None)
    embedding = embed.weight.numel() if isinstance(embed, nn.Embedding) else 0
    return {"n_params": total, "n_params_non_embedding": total - embedding}


# torch's FLOP counter has no formula for the CPU's fused attention kernel: count it as the
# two matrix products it computes, as on other devices.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    ),
}


def _fused_attention_flops(counter: FlopCounterMode) -> int:
    """FLOPs `counter` attributed to fused attention kernels (the ops named *attention*)."""
    return sum(f for op, f in counter.get_flop_counts()["Global"].items() if "attention" in str(op))


def measure_step_flops(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
) -> int:
    """FLOPs of one training step of `loss_fn` (the loss of `model`'s parameters) on (x, y):
    torch's count of the forward and the backward pass (matrix products and attention, causal
    attention counted as full), with a fused attention kernel's backward counted as twice its
    forward, the gradient products it needs, as nanoGPT's estimate 6N + 12·L·d·T per token does:
    some kernels recompute the scores there, and that depends on the kernel, not the model.
    For the same reason the forward passes that activation checkpointing runs again in the
    backward pass (mtp's and futureformer's heads above KEEP_LOGITS_ELEMENTS logits) count once.
    RNG state is left as it was, and `model`'s gradients are cleared (set to None)."""
    with fork_rng(x.device):
        with (
            FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS) as forward,
            tally_recomputed_flops() as recomputed,
        ):
            loss = loss_fn(x, y)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    attention = _fused_attention_flops(forward)
    total = forward.get_total_flops() + backward.get_total_flops() - sum(recomputed)
    return int(total - _fused_attention_flops(backward) + 2 * attention)


def warm_up(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    model: nn.Module,
    runtime: Runtime,
    x: torch.Tensor,
    y: torch.Tensor,
) -> float:
    """Compile `loss_fn`'s forward and backward on one batch without training on it, and return
    the seconds that took, so that step timings (and tokens/s) leave compilation out. Two calls:
    with CUDA graphs (compile_mode reduce-overhead) the first runs the compiled code and the
    second records the graphs. Random state is left as it was, gradients are None. Each call
    starts without gradients, as a training step does: a backward pass that accumulated into the
    previous call's gradients, which CUDA graphs keep in their memory pool and overwrite on the
    next replay, is refused by torch."""
    tick = time.perf_counter()
    model.train()
    with fork_rng(runtime.device):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with runtime.autocast():
                loss, _ = loss_fn(runtime.put(x), runtime.put(y))
            loss.backward()
    model.zero_grad(set_to_none=True)
    runtime.synchronize()
    return time.perf_counter() - tick


@torch.no_grad()
def estimate_val_loss(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime
) -> float:
    """Mean next-token loss over the targets of fixed validation batches (IGNORE_INDEX skipped)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = runtime.put(x), runtime.put(y)
        with runtime.autocast():
            logits = model(x)
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), reduction="sum"
        ).item()
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total / count


def spec_fingerprint(
    spec: dict[str, Any], data_meta: dict[str, Any], config: TrainConfig, model_config: Any
) -> str:
    """Hash of everything that determines a run, to refuse resuming someone else's checkpoint:
    the spec, the data, and the effective training and model options (a spec names only the
    options it sets; the others are code defaults, which may change between versions)."""
    effective = {"train": dataclasses.asdict(config), "model": dataclasses.asdict(model_config)}
    blob = json.dumps({"spec": spec, "data": data_meta, **effective}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class MetricsLog:
    """The per-step metrics CSV, appended as training goes and truncated on resume."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns

    def restore(self, up_to_step: int) -> None:
        """Keep the rows up to `up_to_step` (the checkpoint's) and drop later ones."""
        rows = []
        if up_to_step > 0 and self.path.exists():
            with open(self.path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= up_to_step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to disk (fsync: a checkpoint saved after it, which is
        fsynced too, must never be ahead of the log after a machine crash)."""
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns).writerow(row)
            handle.flush()
            os.fsync(handle.fileno())

    def publish(self, path: Path) -> None:
        """Copy the finished log atomically to its final name."""
        with atomic_path(path) as tmp:
            tmp.write_bytes(self.path.read_bytes())


def train_run(
    spec: dict[str, Any],
    data_dir: Path,
    out_dir: Path,
    *,
    show_progress: bool = True,
    stop_after: int | None = None,
    init_dirs: Mapping[str, Path] | None = None,
) -> dict[str, Any] | None:
    """Train the run described by `spec` and write its outputs into `out_dir`.

    `spec` has keys experiment, arch, dataset, seed, model (options) and train (options), and
    `init_from` entries when the row starts from other rows' weights: `init_dirs` maps each
    entry's target to that source's run directory (archbench.init_from).
    Resumes from `out_dir/checkpoint.safetensors` when it belongs to the same spec and data.
    `stop_after=k` saves a checkpoint after step k and returns None (used to test resuming).
    Returns the training summary on completion.

    SIGTERM at any moment (a cluster preemption; Slurm's warning before the time limit) lets
    the current step, validation or file write finish, then saves the training state and raises
    Preempted. That holds during the last step and while the final outputs are written too: a
    job that Snakemake sees stopped counts as failed, its outputs are deleted, and the retry then
    writes them again from the saved state instead of training from step 0.
    """
    with _StopRequest() as stop:
        return _train(spec, data_dir, out_dir, stop, show_progress, stop_after, init_dirs)


def _train(
    spec: dict[str, Any],
    data_dir: Path,
    out_dir: Path,
    stop: _StopRequest,
    show_progress: bool,
    stop_after: int | None,
    init_dirs: Mapping[str, Path] | None,
) -> dict[str, Any] | None:
    """train_run's work, with SIGTERM turned into `stop.requested`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = make_train_config(spec["train"])
    if config.warmup_steps >= config.steps:
        print(
            f"archbench: warning: warmup_steps={config.warmup_steps} >= the run's "
            f"{config.steps} steps: the learning rate only warms up, it never decays",
            file=sys.stderr,
        )
    if config.compile_mode != "default" and not config.compile:
        print(
            f"archbench: warning: compile_mode={config.compile_mode} has no effect with "
            "compile=false",
            file=sys.stderr,
        )
    data_meta = load_meta_of(data_dir, spec["dataset"], f"experiment '{spec['experiment']}'")
    model_config = make_config(
        spec["arch"], data_meta["vocab_size"], config.block_size, **spec["model"]
    )
    data = load_training_data(data_dir, spec["dataset"], config, model_config)
    runtime = make_runtime(config.device, config.precision)
    seed = check_seed(spec["seed"], f"experiment '{spec['experiment']}' seed")
    seed_everything(seed)
    model = get_architecture(spec["arch"]).model_cls(model_config).to(runtime.device)
    frozen = initialise(
        model, spec["arch"], spec.get("init_from", []), init_dirs or {}, config.init_freeze
    )
    optimizer = make_optimizer(model, config)
    if frozen is not None:  # before resuming, so a resumed run keeps its blocks frozen too
        frozen.attach(optimizer)
    x0, y0 = data.batch(seed, 0)
    step_flops = measure_step_flops(
        lambda x, y: model.loss(x, y)[0], model, runtime.put(x0), runtime.put(y0)
    )
    with torch.no_grad(), fork_rng(runtime.device):
        _, parts0 = model.loss(runtime.put(x0[:1]), runtime.put(y0[:1]))
    loss_fn = runtime.compile(model.loss, config.compile_mode) if config.compile else model.loss
    compile_seconds = warm_up(loss_fn, model, runtime, x0, y0) if config.compile else 0.0
    columns = list(BASE_COLUMNS) + [f"train_{name}" for name in parts0]
    fingerprint = spec_fingerprint(spec, data_meta, config, model_config)

    log = MetricsLog(out_dir / PARTIAL_LOG, columns)
    progress = _resume(out_dir / CHECKPOINT, fingerprint, runtime, model, optimizer)
    progress.compile_seconds += compile_seconds
    log.restore(progress.step)

    bar = tqdm(
        total=config.steps,
        initial=progress.step,
        desc=f"{spec['experiment']} seed {seed}",
        disable=not show_progress,
        file=sys.stderr,
        mininterval=5.0,
        dynamic_ncols=True,
    )

    def save_state() -> None:
        save_training_state(
            out_dir / CHECKPOINT,
            model,
            optimizer,
            {
                "fingerprint": fingerprint,
                "runtime": runtime.label,
                "torch_threads": torch.get_num_threads(),
                "progress": asdict(progress),
            },
        )

    def preempted() -> Preempted:
        return Preempted(
            f"experiment '{spec['experiment']}' seed {seed}: stopped by SIGTERM after step "
            f"{progress.step}; its checkpoint is saved, run the job again to resume"
        )

    model.train()
    window = StepWindow()
    for step in range(progress.step, config.steps):
        window.open(step)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.batch(seed, step)
        with runtime.autocast():
            loss, parts = loss_fn(runtime.put(x), runtime.put(y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = gradient_norm(model, config.grad_clip)
        optimizer.step()
        window.add(loss, parts, grad_norm)
        bar.update(1)

        done = step + 1
        evaluating = done % config.eval_every == 0 or done == config.steps
        logging = done % config.log_every == 0 or evaluating
        stopping = done == stop_after or stop.requested
        saving = (done % config.checkpoint_every == 0 and done < config.steps) or stopping
        if not (logging or saving):
            continue
        runtime.synchronize()  # a GPU's forward, backward and update are still queued
        seconds = time.perf_counter() - window.started
        losses = window.close()
        check_finite(spec, losses)
        progress.add_steps(losses.rows, seconds)

        val_loss = None
        if evaluating:
            tick = time.perf_counter()
            val_loss = estimate_val_loss(model, data.val_batches, runtime)
            check_finite_val(spec, done, val_loss)
            progress.add_val(val_loss, time.perf_counter() - tick)
            bar.set_postfix(val=f"{val_loss:.3f}")
        if logging:
            log.append(progress.take_row(lr, val_loss, data.tokens_per_step))
        if saving:
            check_finite_weights(spec, done, model)
            save_state()
        if stopping:
            bar.close()
            if stop.requested:
                raise preempted()
            return None
    bar.close()

    summary = {
        **count_parameters(model),
        "train_flops": step_flops * config.steps,
        "flops_per_step": step_flops,
        "train_steps": config.steps,
        "train_tokens": config.steps * data.tokens_per_step,
        "train_seconds": round(progress.elapsed, 3),
        "eval_seconds": round(progress.val_seconds, 3),
        "compile_seconds": round(progress.compile_seconds, 3),
        "train_tokens_per_s": config.steps * data.tokens_per_step / max(progress.elapsed, 1e-9),
        "final_val_loss": progress.last_val,
        "best_val_loss": progress.best_val,
        "best_val_step": progress.best_val_step,
        "torch_threads": torch.get_num_threads(),
        "device": str(runtime.device),
        "precision": "bf16" if runtime.bf16 else "fp32",
        # the same as a number, so that summary.csv and the report's "other metrics" show it
        # (precision "auto" differs between machines: bf16 on CUDA and on CPUs with AMX)
        "bf16_autocast": float(runtime.bf16),
        "trained_on_gpu": float(runtime.device.type != "cpu"),  # (device "auto" differs too)
    }
    _write_outputs(out_dir, spec, data_meta, model, config, log, summary)
    if stop.requested:  # while the outputs were written: the retry writes them again
        save_state()
        raise preempted()
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    log.path.unlink(missing_ok=True)
    return summary


@dataclass
class Progress:
    """Where a run stands: steps done, wall time, last and lowest validation loss, and the
    window of training losses not yet written to the metrics log (saved in checkpoints, so a
    resumed run logs exactly what an uninterrupted one would)."""

    step: int = 0
    elapsed: float = 0.0  # in optimizer steps (validation and compilation are timed apart)
    val_seconds: float = 0.0
    compile_seconds: float = 0.0
    last_val: float = float("nan")
    best_val: float = float("nan")
    best_val_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    window_steps: int = 0
    window_time: float = 0.0

    def add_steps(self, rows: list[dict[str, float]], seconds: float) -> None:
        """Account for finished optimizer steps (their loss and loss parts, in order) that took
        `seconds` together."""
        for row in rows:
            for key, value in row.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.step += len(rows)
        self.window_steps += len(rows)
        self.window_time += seconds
        self.elapsed += seconds

    def add_val(self, val_loss: float, seconds: float) -> None:
        """Record a validation estimate taken after the current step, the seconds it took, and
        whether it is the lowest so far (on a small data set the model overfits long before the
        last step, and nanoGPT reports that minimum)."""
        self.last_val = val_loss
        self.val_seconds += seconds
        if math.isnan(self.best_val) or val_loss < self.best_val:
            self.best_val, self.best_val_step = val_loss, self.step

    def take_row(self, lr: float, val_loss: float | None, tokens_per_step: int) -> dict[str, Any]:
        """A metrics-log row averaging the window since the last row; starts a new window."""
        row = {key: total / self.window_steps for key, total in self.sums.items()}
        row.update(
            step=self.step,
            tokens=self.step * tokens_per_step,
            lr=lr,
            val_loss="" if val_loss is None else val_loss,
            elapsed_seconds=round(self.elapsed, 3),
            tokens_per_s=self.window_steps * tokens_per_step / self.window_time,
        )
        self.sums, self.window_steps, self.window_time = {}, 0, 0.0
        return row


def _resume(
    path: Path,
    fingerprint: str,
    runtime: Runtime,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Progress:
    """Load the checkpoint at `path` if it belongs to this run and return its progress. A
    checkpoint of this run written on another device type or precision is a ConfigError: one
    run must not mix them (device and precision "auto" resolve per machine). So is one written
    on the CPU with another number of torch threads, which sums in another order: the run
    would go on, but not bit for bit as an uninterrupted one."""
    # a job killed while writing a file atomically leaves its temporary copy (a checkpoint's, a
    # model's, a metrics log's); no other job writes into the run directory while this one runs
    for partial in path.parent.glob(".*.tmp"):
        partial.unlink()
    if not path.exists():
        return Progress()
    meta = read_training_meta(path)
    if meta.get("fingerprint") != fingerprint:
        print(
            f"archbench: ignoring {path}: it was written for a different spec or data",
            file=sys.stderr,
        )
        path.unlink()
        return Progress()
    if meta.get("runtime", runtime.label) != runtime.label:
        raise ConfigError(
            f"{path} was written on {meta['runtime']}, this job runs on {runtime.label}: resume "
            f"it on a machine like the first one (or set device/precision to match), or delete "
            f"the checkpoint to start the run over"
        )
    threads = torch.get_num_threads()
    if runtime.device.type == "cpu" and meta.get("torch_threads", threads) != threads:
        raise ConfigError(
            f"{path} was written with torch threads={meta['torch_threads']}, this job has "
            f"threads={threads}: a CPU run resumed with another thread count is not "
            f"bit-identical to an uninterrupted one. Resume it with {meta['torch_threads']} "
            f"(`--threads`, or Snakemake's `--set-threads train={meta['torch_threads']}` and "
            f"enough `--cores`), or delete the checkpoint to start the run over"
        )
    progress = Progress(**load_training_state(path, model, optimizer)["progress"])
    print(f"archbench: resuming from {path} at step {progress.step}", file=sys.stderr)
    return progress


class StepWindow:
    """The losses of the optimizer steps since the last read, kept where they were computed.

    Reading a value from a GPU waits for all its queued work, so the training loop reads the
    losses (and checks them) once per metrics row or checkpoint instead of once per step: the
    host can queue the next step while the device still computes this one, as nanoGPT's loop
    does. On the CPU nothing is queued and this only batches the reads.
    """

    def __init__(self) -> None:
        self.first_step = 0
        self.started = 0.0
        self._names: list[str] = []
        self._values: list[torch.Tensor] = []

    def open(self, step: int) -> None:
        """Start timing at `step` if no step is pending."""
        if not self._values:
            self.first_step, self.started = step, time.perf_counter()

    def add(
        self, loss: torch.Tensor, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor
    ) -> None:
        """Keep one step's total loss, named parts and gradient norm (no device sync)."""
        self._names = ["train_loss", *(f"train_{name}" for name in parts), GRAD_NORM]
        values = [loss, *parts.values(), grad_norm]
        self._values.append(torch.stack([value.detach().float() for value in values]))

    def close(self) -> StepLosses:
        """Read the pending steps' losses in one transfer and empty the window."""
        values = torch.stack(self._values).cpu().tolist()
        self._values = []
        return StepLosses(
            self.first_step, [dict(zip(self._names, row, strict=True)) for row in values]
        )


@dataclass(frozen=True)
class StepLosses:
    """Losses of consecutive optimizer steps, the first of them `first_step` (0-based)."""

    first_step: int
    rows: list[dict[str, float]]


def gradient_norm(model: nn.Module, grad_clip: float) -> torch.Tensor:
    """The total gradient norm before clipping, a tensor on the model's device; clips the
    gradients to `grad_clip` when it is positive."""
    if grad_clip > 0:
        return nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    return nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def check_finite(spec: dict[str, Any], losses: StepLosses) -> None:
    """Stop with an error naming experiment, seed, the first step whose loss or gradient norm
    is not finite and the diverged loss parts (a non-finite gradient makes the update's weights
    non-finite, so no checkpoint is written after it)."""
    for offset, row in enumerate(losses.rows):
        where = f"experiment '{spec['experiment']}' seed {spec['seed']}"
        step = losses.first_step + offset + 1
        if not math.isfinite(row["train_loss"]):
            parts = {
                name.removeprefix("train_"): value
                for name, value in row.items()
                if name.startswith("train_")
            }
            total = parts.pop("loss")
            bad = [name for name, value in parts.items() if not math.isfinite(value)] or ["total"]
            raise DivergedError(
                f"{where}: loss diverged at step {step} (non-finite part: {', '.join(bad)}; "
                f"total = {total})"
            )
        if not math.isfinite(row[GRAD_NORM]):
            raise DivergedError(
                f"{where}: the gradient norm at step {step} is {row[GRAD_NORM]} (the loss, "
                f"{row['train_loss']:.4f}, was finite): the update diverged"
            )


def check_finite_weights(spec: dict[str, Any], step: int, model: nn.Module) -> None:
    """Before a checkpoint: stop with an error naming the parameters that are not finite after
    `step` steps (an update can diverge on finite losses and gradients, e.g. in the optimizer)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DivergedError(
            f"experiment '{spec['experiment']}' seed {spec['seed']}: after step {step} "
            f"{len(bad)} parameter(s) are not finite ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); no checkpoint was written"
        )


def check_finite_val(spec: dict[str, Any], step: int, val_loss: float) -> None:
    """Stop with an error when the validation loss after `step` steps is not finite."""
    if not math.isfinite(val_loss):
        raise DivergedError(
            f"experiment '{spec['experiment']}' seed {spec['seed']}: validation loss after step "
            f"{step} is {val_loss}: the weights diverged"
        )


def _write_outputs(
    out_dir: Path,
    spec: dict[str, Any],
    data_meta: dict[str, Any],
    model: nn.Module,
    config: TrainConfig,
    log: MetricsLog,
    summary: dict[str, Any],
) -> None:
    """Write the final artefacts, each atomically."""
    model_config = dataclasses.asdict(model.config)
    vocab_size, block_size = model_config.pop("vocab_size"), model_config.pop("block_size")
    write_json(
        out_dir / "model_config.json",
        {
            "arch": spec["arch"],
            "vocab_size": vocab_size,
            "block_size": block_size,
            "options": model_config,
        },
    )
    write_json(
        out_dir / "train_config.json",
        {
            "experiment": spec["experiment"],
            "dataset": spec["dataset"],
            "data_meta": data_meta,  # evaluation checks that it reads the same preparation
            "seed": spec["seed"],
            **dataclasses.asdict(config),
        },
    )
    save_weights(model, out_dir / "model.safetensors")
    log.publish(out_dir / "metrics.csv")
    write_json(out_dir / "train_summary.json", summary)
