"""Shared building blocks: norms, rotary embeddings, attention, MLPs and the pre-norm block.

Every architecture in this package is assembled from these parts, so a difference in results
between two architectures comes from what they change, not from two versions of the same layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

# Targets equal to this count in no loss (torch's cross-entropy ignore_index): the training loop's
# mark for tokens outside a loss mask. Every architecture's loss, auxiliary parts included, skips
# them.
IGNORE_INDEX = -100
# Extra output heads (mtp, futureformer) keep their logits for the backward pass up to this many
# elements (64 MiB in fp32 each); larger ones are recomputed there by activation checkpointing,
# so that they do not multiply the baseline's largest activation. Recomputing small logits cost
# 16% of a compiled CPU step (docs/performance.md).
KEEP_LOGITS_ELEMENTS = 2**24
# Compiled for the CPU, causal attention over windows of at most this many positions runs through
# scaled_dot_product_attention's math backend (docs/performance.md: faster there than the CPU
# flash kernel at 64 and 128 positions, slower at 256).
CPU_MATH_ATTENTION_MAX_LEN = 128
# While `tally_recomputed_flops` is open: the FLOPs of the forward passes that activation
# checkpointing will run again in the backward pass, one entry per checkpointed call.
_recomputed_flops: list[int] | None = None


@contextlib.contextmanager
def tally_recomputed_flops() -> Iterator[list[int]]:
    """Yield a list to which every `recompute_in_backward` call made inside the context adds
    the FLOPs of its forward pass (torch's FlopCounterMode count): the work that the backward pass
    will do again, which a count of model FLOPs leaves out. Eager code only."""
    global _recomputed_flops
    outer, _recomputed_flops = _recomputed_flops, []
    try:
        yield _recomputed_flops
    finally:
        _recomputed_flops = outer


def recompute_in_backward(fn: Callable[..., object], *args: torch.Tensor) -> object:
    """fn(*args) under non-reentrant activation checkpointing: its intermediate tensors are not
    kept but recomputed in the backward pass. `fn` must draw no random numbers (no RNG state is
    saved for the recomputation)."""
    if _recomputed_flops is None:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)

    def tallied(*inputs: torch.Tensor) -> object:
        if _recomputed_flops is None:  # the recomputation itself, after the tally has closed
            return fn(*inputs)
        with FlopCounterMode(display=False) as counter:
            out = fn(*inputs)
        _recomputed_flops.append(counter.get_total_flops())
        return out

    return checkpoint(tallied, *args, use_reentrant=False, preserve_rng_state=False)


def rms_norm(dim: int) -> nn.Module:
    """RMSNorm over the last dimension (eps 1e-6)."""
    return nn.RMSNorm(dim, eps=1e-6)


def layer_norm(dim: int) -> nn.Module:
    """LayerNorm over the last dimension, without a bias."""
    return nn.LayerNorm(dim, bias=False)


NORMS: dict[str, Callable[[int], nn.Module]] = {"rmsnorm": rms_norm, "layernorm": layer_norm}


def make_norm(kind: str, dim: int) -> nn.Module:
    """The normalisation layer `kind` (a key of NORMS) over the last dimension of width `dim`."""
    return NORMS[kind](dim)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) for head width `head_dim`, positions 0 … max_len-1.

    Channel pairs (2i, 2i+1) of a query or key at position p are rotated by the angle
    p * base^(-2i/head_dim). Run eagerly, the rotation is one complex multiplication per pair
    (the pairs viewed as complex numbers), which on the CPU costs about half of the equivalent
    real arithmetic. Under `torch.compile` it is the real arithmetic, which inductor fuses into
    the neighbouring kernels (it generates no code for complex operators, so a complex multiply
    would run as a separate kernel between fused ones). Both compute the same rotation.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head width, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate `x` (…, T, head_dim) by positions 0 … T-1, or by `positions` (T,) if given."""
        rows = slice(x.shape[-2]) if positions is None else positions
        real = torch.promote_types(x.dtype, torch.float32)  # complex bf16 does not exist
        cos, sin = self.cos[rows].to(real), self.sin[rows].to(real)
        if torch.compiler.is_compiling():
            even, odd = x.to(real).unflatten(-1, (-1, 2)).unbind(-1)
            rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
            return rotated.flatten(-2).to(x.dtype)
        pairs = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal `scaled_dot_product_attention` of q (…, H, T, h) over k, v (…, H_kv, T, h).

    Under `torch.compile` on the CPU, windows of at most CPU_MATH_ATTENTION_MAX_LEN positions use
    the math backend, which inductor compiles to batched matrix products around one fused masked
    softmax: on short windows that beats the CPU flash kernel's per-head overhead. Eager runs and
    other devices keep torch's own kernel choice. Both compute the same attention.
    """
    math_backend = (
        torch.compiler.is_compiling()
        and q.device.type == "cpu"
        and q.shape[-2] <= CPU_MATH_ATTENTION_MAX_LEN
    )
    kernel = sdpa_kernel(SDPBackend.MATH) if math_backend else contextlib.nullcontext()
    with kernel:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=enable_gqa
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped key/value heads (GQA/MQA) and RoPE."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_heads: int,
        rope: RotaryEmbedding,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_head, self.n_kv_heads = n_head, n_kv_heads
        self.head_dim = d_model // n_head
        kv_width = n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_width, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.rope = rope
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend causally over x (B, T, d_model)."""
        b, t, c = x.shape
        kv_width = self.n_kv_heads * self.head_dim
        qk, v = self.qkv(x).split((c + kv_width, kv_width), dim=-1)
        # RoPE on queries and keys in one call, in (B, T, heads, head_dim) layout
        qk = self.rope(qk.view(b, t, self.n_head + self.n_kv_heads, self.head_dim).transpose(1, 2))
        q, k = qk.split((self.n_head, self.n_kv_heads), dim=1)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = causal_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GELUMLP(nn.Module):
    """Plain two-layer MLP with a GELU nonlinearity (GPT-2 style)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.down(F.gelu(self.up(x)))


MLPS: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "gelu": GELUMLP}


def mlp_hidden(kind: str, d_model: int, ratio: float) -> int:
    """Hidden width for an MLP kind: `ratio * d` for GELU; 2/3 of that for SwiGLU (equal params).

    The SwiGLU width is rounded up to a multiple of 8 for efficient matrix shapes.
    """
    hidden = ratio * d_model
    if kind == "swiglu":
        hidden = 8 * math.ceil(2 * hidden / 3 / 8)
    return max(1, int(round(hidden)))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, d_model: int, attn: nn.Module, mlp: nn.Module, norm: str, dropout: float = 0.0
    ):
        super().__init__()
        self.norm_attn = make_norm(norm, d_model)
        self.attn = attn
        self.norm_mlp = make_norm(norm, d_model)
        self.mlp = mlp
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to the residual stream x (B, T, d_model)."""
        x = x + self.dropout(self.attn(self.norm_attn(x)))
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


def init_weights(module: nn.Module, std: float, n_layer: int) -> None:
    """GPT-2 style init: N(0, std) for linear and embedding weights, zero biases, and output
    projections of residual branches (`proj`, `down`) scaled by 1/sqrt(2 * n_layer)."""
    residual_std = std / math.sqrt(2 * n_layer)
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            is_residual_out = name.endswith((".proj", ".down"))
            nn.init.normal_(sub.weight, 0.0, residual_std if is_residual_out else std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, 0.0, std)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (in float32 at least) of logits (B, T, V) against targets (B, T) over the
    targets that are not IGNORE_INDEX; 0 when none is left (F.cross_entropy's mean is NaN then)."""
    precision = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64
    total = F.cross_entropy(logits.flatten(0, 1).to(precision), targets.flatten(), reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class LanguageModel(nn.Module):
    """Base class: `forward(idx)` gives next-token logits; `loss` adds any auxiliary parts.

    Subclasses with auxiliary objectives override `loss`; evaluation only ever calls `forward`,
    so every architecture is scored by the same code.
    """

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training loss for (idx, targets) and a dict of its named parts (detached 0-d
        tensors)."""
        ce = next_token_loss(self(idx), targets)
        return ce, {"next_token": ce.detach()}
