"""Device-specific setup, kept in one place so the training loop reads the same everywhere.

On CUDA: TF32 matmuls, bf16 autocast and pinned host memory; on MPS and CPU plain
float32 unless bf16 is asked for (bf16 autocast works on the CPU too, which is how the GPU code
path is tested on machines without a GPU).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from archbench.errors import ConfigError

# What torch.compile's CPU backend (inductor) builds its kernels with: $CXX, else one of these.
CPP_COMPILERS = ("g++", "c++", "clang++")


def pick_device(name: str) -> torch.device:
    """Resolve 'auto' to the best available device (cuda, then mps, then cpu)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a run computes."""

    device: torch.device
    bf16: bool

    @property
    def is_cuda(self) -> bool:
        """Whether the device is a CUDA GPU."""
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast when enabled, else nothing."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            yield

    def compile(self, fn: Callable) -> Callable:
        """`torch.compile(fn)`, after checking that kernels can be built for this device.

        On the CPU, inductor writes C++ and needs a compiler; without one, torch fails only at
        the first step, with a long traceback, so this says so up front.
        """
        compilers = (os.environ.get("CXX", ""), *CPP_COMPILERS)
        if self.device.type == "cpu" and not any(c and shutil.which(c) for c in compilers):
            raise ConfigError(
                "compile=true on the CPU needs a C++ compiler (g++ or clang++, or $CXX): "
                "torch.compile builds its CPU kernels with it. Install one, or turn compilation "
                "off: `compile: false` in the suite's train section or compile=false in the row."
            )
        return torch.compile(fn)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a host tensor to the device (through pinned memory on CUDA)."""
        if self.is_cuda:
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


def make_runtime(device: str, precision: str) -> Runtime:
    """Pick the device and precision ('auto' = bf16 on CUDA, fp32 elsewhere); enable TF32."""
    chosen = pick_device(device)
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = precision == "bf16" or (precision == "auto" and chosen.type == "cuda")
    return Runtime(chosen, bf16)
