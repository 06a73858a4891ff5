"""Device-specific setup, kept in one place so the training loop reads the same everywhere.

On CUDA: TF32 matmuls, bf16 autocast, fused AdamW and pinned host memory; on MPS and CPU plain
float32 unless bf16 is asked for (bf16 autocast works on the CPU too, which is how the GPU code
path is tested on machines without a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


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
