"""The architecture registry: names → (config dataclass, model class), and `build_model`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from archbench.errors import ConfigError
from archbench.models.fractalformer import FractalFormer, FractalFormerConfig
from archbench.models.future_attention import FutureAttentionConfig, FutureAttentionTransformer
from archbench.models.futureformer import FutureFormer, FutureFormerConfig
from archbench.models.gpt import GPT, GPTConfig
from archbench.models.hourglass import Hourglass, HourglassConfig
from archbench.models.mtp import MTP, MTPConfig
from archbench.options import Option, coerce_all, options_of, suggest


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its config dataclass, model class and a one-line summary."""

    name: str
    config_cls: type
    model_cls: type[nn.Module]
    summary: str


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            "futureformer",
            FutureFormerConfig,
            FutureFormer,
            "body, then future-sight levels that cross-attend to the model's own predictions "
            "of farther token spans",
        ),
        Architecture(
            "gpt", GPTConfig, GPT, "baseline pre-norm decoder: RMSNorm, RoPE, SwiGLU, GQA"
        ),
        Architecture(
            "fractalformer",
            FractalFormerConfig,
            FractalFormer,
            "FractalFormer (seed 001): split**l nested sub-models per level, each trained by "
            "its own loss and runnable alone",
        ),
        Architecture(
            "future_attention",
            FutureAttentionConfig,
            FutureAttentionTransformer,
            "future attention (seed 002): heads also attend to learned future slots, "
            "trained to match the masked attention output",
        ),
        Architecture(
            "hourglass",
            HourglassConfig,
            Hourglass,
            "hourglass (seed 003): grouped compression to latents, multi-channel latent "
            "attention, repeat/attention upsampling",
        ),
        Architecture(
            "mtp",
            MTPConfig,
            MTP,
            "multi-token prediction (Gloeckle et al. 2024): shared "
            "trunk, n one-block heads predicting t+1..t+n, shared unembedding",
        ),
    )
}


# The baseline architecture: a row with an empty `baseline` cell is compared with its data set's
# first row of this architecture.
BASELINE_ARCH = "gpt"


def get_architecture(arch: str) -> Architecture:
    """Look up a registered architecture; unknown names get a suggestion."""
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture '{arch}'{suggest(arch, ARCHITECTURES)}; registered: "
            + ", ".join(sorted(ARCHITECTURES))
        )
    return ARCHITECTURES[arch]


def list_options(arch: str) -> dict[str, Option]:
    """The options of `arch` with their types, defaults, allowed values and help."""
    return options_of(get_architecture(arch).config_cls)


def make_config(arch: str, vocab_size: int, block_size: int, **overrides: Any) -> Any:
    """Build and validate the config of `arch`; overrides may be strings (from a table) or typed."""
    spec = get_architecture(arch)
    if vocab_size < 1 or block_size < 1:
        raise ConfigError(f"vocab_size and block_size must be >= 1, got {vocab_size}, {block_size}")
    typed = coerce_all(spec.config_cls, overrides, f"architecture '{arch}'")
    config = spec.config_cls(vocab_size=vocab_size, block_size=block_size, **typed)
    config.validate()
    return config


def build_model(arch: str, vocab_size: int, block_size: int, **overrides: Any) -> nn.Module:
    """Instantiate architecture `arch`; `forward(idx)` returns logits (B, T, vocab_size)."""
    config = make_config(arch, vocab_size, block_size, **overrides)
    return get_architecture(arch).model_cls(config)
