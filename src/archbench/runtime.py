"""Device-specific setup, kept in one place so the training loop reads the same everywhere.

On CUDA: pinned host memory, and on GPUs with bf16 hardware bf16 autocast with TF32 matmuls. On a
CPU with AMX (bf16 matrix hardware) bf16 autocast too; on MPS and other CPUs plain float32 unless
bf16 is asked for (bf16 autocast works on any CPU, which is how the GPU code path is tested without
a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from archbench.errors import ConfigError

# torch.compile's modes; in the two named in CUDA_GRAPH_MODES inductor replays CUDA graphs on a
# GPU, which removes the per-kernel launch cost of small models (nothing changes on the CPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# Whether this torch build can use a device type, for the ones that are not always there.
DEVICE_AVAILABLE: dict[str, Callable[[], bool]] = {
    "cuda": torch.cuda.is_available,
    "mps": torch.backends.mps.is_available,
}


def pick_device(name: str) -> torch.device:
    """Resolve 'auto' to the best available device (cuda, then mps, then cpu); a named device
    that this machine or torch build cannot use is a ConfigError."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(
                f"device={name!r} is not a device: use auto, cpu, cuda or mps"
            ) from None
        if not DEVICE_AVAILABLE.get(device.type, lambda: True)():
            raise ConfigError(
                f"device={name}, but this machine or torch build ({torch.__version__}) cannot "
                f"use {device.type}; use device=auto (picks cuda, then mps, then cpu) or cpu"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A context that restores the random state of the CPU and of `device` on exit."""
    devices = [] if device.type == "cpu" else [device]
    return torch.random.fork_rng(devices=devices, device_type=device.type)


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a run computes."""

    device: torch.device
    bf16: bool

    @property
    def label(self) -> str:
        """The device type and precision, e.g. "cuda bf16" (a checkpoint records it)."""
        return f"{self.device.type} {'bf16' if self.bf16 else 'fp32'}"

    @property
    def is_cuda(self) -> bool:
        """Whether the device is a CUDA GPU."""
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast when enabled, else nothing."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            yield

    def compile(self, fn: Callable, mode: str = "default") -> Callable:
        """`torch.compile(fn, mode=mode)`, after checking that kernels can be built for this
        device (`mode`: one of COMPILE_MODES).

        On the CPU, inductor writes C++ and needs a C++ compiler; on CUDA, Triton builds each
        kernel's launcher with a C compiler. Without one, torch fails only at the first step,
        with a long traceback, so this says so up front.
        """
        off = (
            "Install one, or turn compilation off: `compile: false` in the suite's train section "
            "or compile=false in the row."
        )
        if self.device.type == "cpu" and not shutil.which(compiler := inductor_cpp_compiler()):
            raise ConfigError(
                f"compile=true on the CPU needs a C++ compiler, and inductor's ({compiler}, from "
                f"$CXX or else the platform's default) is not found: "
                f"torch.compile builds its CPU kernels with it. {off}"
            )
        if self.is_cuda and not triton_c_compiler():
            raise ConfigError(
                "compile=true on CUDA needs a C compiler ($CC, gcc or clang), and none is found: "
                f"Triton builds the launcher of every compiled GPU kernel with it. {off}"
            )
        compiled = torch.compile(fn, mode=mode)
        if mode not in CUDA_GRAPH_MODES:
            return compiled

        @functools.wraps(fn)
        def new_step(*args: Any, **kwargs: Any) -> Any:
            # Each call starts a training step: the graphs may reuse the memory of the previous
            # step's outputs, which the caller has consumed (losses copied, gradients applied).
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args, **kwargs)

        return new_step

    def synchronize(self) -> None:
        """Wait for the device's queued work (GPU kernels run asynchronously), so that a clock
        read afterwards includes it; nothing to wait for on the CPU."""
        if self.device.type != "cpu":
            torch.get_device_module(self.device).synchronize()  # (mps takes no device)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a host tensor to the device (through pinned memory on CUDA)."""
        if self.is_cuda:
            # pinned memory keeps a slice's strides, and CUDA then copies through a pageable
            # contiguous buffer: make it contiguous first, so the pinned one is what is sent
            return tensor.contiguous().pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


def inductor_cpp_compiler() -> str:
    """The C++ compiler that torch.compile's CPU kernels are built with: $CXX if set, else g++
    (clang++ on macOS), as inductor's `config.cpp.cxx` picks it."""
    return os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


def triton_c_compiler() -> str | None:
    """The C compiler Triton builds its CUDA kernel launchers with, as it looks for one on Linux:
    $CC if set (and found), else gcc, else clang; None when there is none."""
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else shutil.which("gcc") or shutil.which("clang")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), where oneDNN multiplies
    bf16 matrices in hardware. (torch exposes the check only as a private function; a build
    without it counts as no AMX.)"""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products in hardware: a CUDA GPU of the Ampere
    generation or newer, or a CPU with AMX. Elsewhere bf16 is emulated or converted: slower than
    fp32 (9% on an AMD EPYC with AVX512-BF16 but no AMX), and on older GPUs torch.compile leaves
    bf16 graphs eager (docs/performance.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_amx()


def make_runtime(device: str, precision: str) -> Runtime:
    """Pick the device and precision ('auto' = bf16 autocast where the device has bf16 hardware
    (native_bf16), fp32 elsewhere). On CUDA with bf16, the float32 matmuls outside autocast use
    TF32; `precision: fp32` keeps them in full fp32."""
    chosen = pick_device(device)
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16(chosen))
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bf16
        torch.backends.cudnn.allow_tf32 = bf16
    return Runtime(chosen, bf16)
