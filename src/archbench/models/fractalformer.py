"""`fractalformer`: one decoder whose weights hold self-similar nested sub-models (seed 001,
evintunador/FractalFormer), each trained with its own loss and usable as a model of its own.

Shapes: B sequences of T tokens, vocabulary V; the full model has width d, n_head query heads of
width h = d / n_head (n_kv key/value heads of the same width), MLP hidden width f, n_layer blocks.

Sub-models. Level l < `levels` holds n_l = split**l sub-models; sub-model (l, j), j < n_l, is an
ordinary pre-norm decoder (the `gpt` baseline) of width d_l = d / n_l with the SAME head counts and
per-head width h_l = h / n_l, and hidden width f_l = f / n_l. Its weights are blocks of the big
tensors. Every sliced dimension of a big tensor is a sequence of equal groups (the heads of the
q/k/v output and of the projection input, the gate | up halves of a gated MLP, or one group), and
sub-model j owns the j-th of n_l equal slices of EVERY group:

    residual units   R_lj = [j d_l, (j+1) d_l)                    (norm scales, embedding columns)
    head i units          [i h + j h_l, i h + (j+1) h_l)           for each q, k and v head i
    hidden units          [j f_l, (j+1) f_l)                       (of the gate and of the up half)

and its weight matrix is W[own rows, own columns], laid out exactly as a standalone `gpt` of its
shape lays out its own (heads major). The children of (l, j) are (l+1, split*j + c), c < split:
their units partition the parent's, so their blocks lie on the diagonal of the parent's blocks.
Siblings share no weight; a parent is its children plus the off-diagonal blocks. Level 0 is the
whole model, which is exactly `gpt` (same modules, parameter names, shapes and initial weights).

Computation. A sub-model reads only its own blocks (strided views of the big tensors), so running
it costs its own size. RoPE and the attention scale 1/sqrt(h_l) use its own head width; its norms
normalise over its own d_l units. The sub-models of one level run side by side: activations are
(m, B, T, d_l) for m siblings, linear layers are matmuls batched over m with weights
(m, out_l, in_l), and attention folds m into the batch axis, (m * B, n_head, T, h_l).

Causality. Every sub-model is a causal decoder: attention uses the lower-triangular mask and all
else is position-wise; the residual exchanges below add states of the SAME position. So the logits
of every sub-model at position t depend on idx[:, :t+1] only; targets enter only the loss.

Residual variants (`residual`), with y_l = layer k applied to every level's residual x_l in
parallel, and x_l <- (below) after every layer, the last included, before the final norm:
- none: x_l = y_l. Sub-models are independent.
- upstream: x_l = y_l + up(y_{l+1}) for l < levels - 1: each parent's residual gets the
  concatenation of its children's residuals added. In the parent's layout that concatenation
  fills exactly the parent's units R_lj: up() regroups level l+1's (m, B, T, d_{l+1}) by parent.
  A sub-model depends on its descendants: running (l, j) runs its subtree, which lies inside its
  own blocks (its own parameter count; compute 1 + 1/split + ... of its size in the matmuls).
  `forward` (level 0) therefore runs every sub-model.
- downstream: x_l = y_l + down(y_{l-1}) for l > 0: the parent's residual is cut into split slices
  and slice c is added to child c's residual. A sub-model depends on its ancestors: running (l, j)
  runs its chain of ancestors up to the whole model, so a downstream sub-model has no standalone
  form (`extract_submodel` refuses) and costs the full model to run.
Both exchanges use the layer outputs before any exchange (all levels at once), as the seed's
unfinished upstream notebook does.

Loss. Every sub-model's next-token cross-entropy CE_lj over the full window; `parts` has
`next_token` (= CE_00, the full model) and one entry `L<l>.<j>` per sub-model. The total is
`loss_reduction`: sum (the seed's), mean (over all sub-models), or weighted:
sum over l of level_weights[l] * sum over j of CE_lj. The seed's training loop builds its tuple of
levels from the wrong loop (inside level i it enumerates the list of level WIDTHS, giving models
(0, 0), (1, 1) and (2, 2) at every level), so only 3 of its 7 sub-models are trained; here each
level's sub-models are all enumerated.

Departures from the seed: the suite's parts (no biases, no embedding norms, blocks.py RoPE, GPT
init), so that level 0 is the suite's baseline and differences come from the nesting alone.

Merging (the seed's ModelMerging): `merge_init` copies standalone checkpoints (`gpt`, or a
fractalformer with `submodel_config` shapes) into sub-model blocks and can freeze those blocks;
`parse_merge_targets` and `check_merge_source` validate the targets and sources of a row's
`init_from` cell (archbench.init_from), e.g. `L1.0=solo64,L1.1=solo64+100`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ConfigError
from archbench.models.blocks import (
    GELUMLP,
    IGNORE_INDEX,
    Block,
    CausalSelfAttention,
    LanguageModel,
    RotaryEmbedding,
    SwiGLU,
    causal_attention,
    init_weights,
    make_norm,
    mlp_hidden,
)
from archbench.models.gpt import GPTConfig
from archbench.options import option

SubModel = tuple[int, int]  # (level, index)


class GeGLU(SwiGLU):
    """Gated MLP with a GELU gate (the seed's MLP): down(gelu(gate(x)) * up(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate) * up)


MLP_MODULES: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "gelu": GELUMLP, "geglu": GeGLU}
GATED_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swiglu": F.silu,
    "geglu": F.gelu,
}


def derived_hidden(mlp: str, d_model: int, mlp_ratio: float) -> int:
    """The full model's MLP hidden width when mlp_hidden is 0: gpt's rule (geglu as swiglu)."""
    return mlp_hidden("gelu" if mlp == "gelu" else "swiglu", d_model, mlp_ratio)


@dataclass(frozen=True)
class FractalFormerConfig(GPTConfig):
    """The baseline's options (they shape the full model, level 0) plus the nesting."""

    mlp: str = option(
        "swiglu", "MLP type (geglu: the seed's GELU-gated MLP)", choices=tuple(MLP_MODULES)
    )
    mlp_hidden: int = option(
        0,
        "MLP hidden width of the full model (0 = from mlp and mlp_ratio, as in gpt)",
        min=0,
        unset_means=lambda get: derived_hidden(get("mlp"), get("d_model"), get("mlp_ratio")),
    )
    split: int = option(2, "children of every sub-model", min=2)
    levels: int = option(3, "nesting levels; level l holds split**l sub-models", min=1)
    residual: str = option(
        "none",
        "residual exchange between levels after each layer (see the module docstring)",
        choices=("none", "upstream", "downstream"),
    )
    loss_reduction: str = option(
        "sum",
        "total loss: sum or mean of the sub-models' losses, or weighted by level_weights",
        choices=("sum", "mean", "weighted"),
    )
    level_weights: str = option(
        "", "loss_reduction=weighted: comma-separated weight per level (empty: 1 each)"
    )

    @property
    def hidden(self) -> int:
        """MLP hidden width f of the full model."""
        return self.mlp_hidden or derived_hidden(self.mlp, self.d_model, self.mlp_ratio)

    def count(self, level: int) -> int:
        """Number of sub-models at `level`."""
        return self.split**level

    def width(self, level: int) -> int:
        """Residual width d_l of a sub-model at `level`."""
        return self.d_model // self.count(level)

    def head_width(self, level: int) -> int:
        """Per-head width h_l of a sub-model at `level`."""
        return self.d_model // self.n_head // self.count(level)

    def submodels(self) -> list[SubModel]:
        """Every (level, index), level by level."""
        return [(lv, j) for lv in range(self.levels) for j in range(self.count(lv))]

    def weights_per_level(self) -> tuple[float, ...]:
        """The parsed `level_weights` (1 for every level when empty)."""
        if not self.level_weights.strip():
            return (1.0,) * self.levels
        try:
            values = tuple(float(v) for v in self.level_weights.split(","))
        except ValueError:
            raise ConfigError(
                f"option 'level_weights': {self.level_weights!r} is not a comma-separated list "
                "of numbers"
            ) from None
        if len(values) != self.levels:
            raise ConfigError(
                f"option 'level_weights': {len(values)} weights given for levels={self.levels}"
            )
        if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
            raise ConfigError(
                f"option 'level_weights': {self.level_weights!r} must be finite, >= 0 and not "
                "all zero"
            )
        return values

    def submodel_loss_weights(self) -> list[float]:
        """Weight of each sub-model's loss in the total, in `submodels()` order."""
        n_models = len(self.submodels())
        if self.loss_reduction == "mean":
            return [1.0 / n_models] * n_models
        per_level = self.weights_per_level()
        return [per_level[lv] for lv, _ in self.submodels()]

    def check_standalone_submodels(self) -> None:
        """ConfigError unless each sub-model computes what a model of its size alone could:
        with residual=downstream every sub-model reads its chain of ancestors up to the whole
        model, so no model of its size trained alone is a fair comparison."""
        if self.residual == "downstream":
            raise ConfigError(
                "residual=downstream: every sub-model reads its ancestors' residuals up to the "
                "whole model (its size is the whole model's), so no model of its shape trained "
                "alone is a fair baseline for it; compare the whole model (column baseline)"
            )

    def submodel_config(self, level: int) -> FractalFormerConfig:
        """Config of a plain decoder (levels=1) with exactly the shapes of a `level` sub-model:
        the standalone baseline of that size, and the shape a merge source must have."""
        return replace(
            self,
            d_model=self.width(level),
            mlp_hidden=self.hidden // self.count(level),
            levels=1,
            residual="none",
            loss_reduction="sum",
            level_weights="",
        )

    def validate(self) -> None:
        """Check constraints between options; raise ConfigError naming the options."""
        super().validate()
        deepest = self.count(self.levels - 1)
        head = self.d_model // self.n_head
        nesting = f"split**(levels-1) = {self.split}**{self.levels - 1} = {deepest}"
        if head % deepest:
            raise ConfigError(
                f"head width d_model/n_head={head} is not divisible by {nesting}: every "
                "sub-model needs a whole number of units per head"
            )
        if (head // deepest) % 2:
            raise ConfigError(
                f"head width of the deepest sub-models, d_model/n_head/split**(levels-1) = "
                f"{head // deepest}, must be even for RoPE"
            )
        if self.hidden % deepest:
            raise ConfigError(
                f"MLP hidden width {self.hidden} (from mlp_hidden, or mlp and mlp_ratio) is not "
                f"divisible by {nesting}"
            )
        self.weights_per_level()
        if self.level_weights.strip() and self.loss_reduction != "weighted":
            raise ConfigError(
                f"option 'level_weights' is used only with loss_reduction=weighted, not "
                f"loss_reduction={self.loss_reduction}"
            )


def owned_units(size: int, groups: int, n: int, device: torch.device) -> torch.Tensor:
    """Indices (n, size // n) of the units of a dimension owned by each of n sibling sub-models.

    The dimension holds `groups` equal groups (heads, the gate | up halves, or 1); row j lists,
    group by group, the j-th of the n equal slices of every group. Built per call (about
    10 µs, under 1% of a step): a cache would hand tensors made under `torch.inference_mode`
    (evaluation) to a later training step, which cannot save them for backward.
    """
    width = size // (groups * n)
    units = torch.arange(size, device=device).view(groups, n, width).transpose(0, 1)
    return units.reshape(n, size // n)


@dataclass(frozen=True)
class Siblings:
    """Sub-models start, ..., stop - 1 of a level that holds n sub-models, run side by side."""

    n: int
    start: int
    stop: int

    def index(
        self, shape: torch.Size, groups: tuple[int | None, ...], device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """Advanced index of their blocks of a tensor of `shape`: `tensor[index]` has shape
        (m, *block) with m = stop - start. `groups[k]` is the group count of dimension k, or None
        for a dimension that is not sliced (the vocabulary)."""
        m, parts = self.stop - self.start, []
        for axis, (size, group) in enumerate(zip(shape, groups, strict=True)):
            if group is None:
                units = torch.arange(size, device=device).expand(m, size)
            else:
                units = owned_units(size, group, self.n, device)[self.start : self.stop]
            view = [m] + [1] * len(shape)
            view[axis + 1] = -1
            parts.append(units.view(view))
        return tuple(parts)

    def take(self, tensor: torch.Tensor, groups: tuple[int | None, ...]) -> torch.Tensor:
        """Their blocks of `tensor`, stacked: (m, *block); the same values as
        `tensor[self.index(...)]`, read through a strided view instead of a gather.

        Each sliced dimension is viewed as (groups, n, width); the sub-models' axis n is moved to
        the front, or, for a matrix sliced on both sides, taken as the diagonal of the two n axes
        (sub-model j owns slice j of both). The only copy is the final reshape, whose backward is
        a strided write; the gather's backward was an index_put (docs/performance.md).
        """
        if self.n == 1:
            return tensor.unsqueeze(0)
        view, n_axes, block = [], [], []
        for size, group in zip(tensor.shape, groups, strict=True):
            if group is None:
                view.append(size)
                block.append(size)
            else:
                n_axes.append(len(view) + 1)
                view += [group, self.n, size // (group * self.n)]
                block.append(size // self.n)
        blocks = tensor.view(view)
        if len(n_axes) == 2:
            blocks = blocks.diagonal(dim1=n_axes[0], dim2=n_axes[1]).movedim(-1, 0)
        else:
            (axis,) = n_axes
            blocks = blocks.movedim(axis, 0)
        return blocks[self.start : self.stop].reshape(self.stop - self.start, *block)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (m, B, T, in) times each sub-model's weight (m, out, in) -> (m, B, T, out)."""
    if weight.shape[0] == 1:
        return F.linear(x, weight[0])
    m, b, t, _ = x.shape
    return torch.bmm(x.view(m, b * t, -1), weight.transpose(1, 2)).view(m, b, t, -1)


def _norm(x: torch.Tensor, module: nn.Module, siblings: Siblings) -> torch.Tensor:
    """The RMSNorm / LayerNorm `module` restricted to each sub-model's units of x (m, B, T, d_l)."""
    width = x.shape[-1]
    if isinstance(module, nn.RMSNorm):
        normed = F.rms_norm(x, (width,), eps=module.eps)
    else:
        normed = F.layer_norm(x, (width,), eps=module.eps)
    return normed * siblings.take(module.weight, (1,))[:, None, None]


class FractalFormer(LanguageModel):
    """A `gpt` decoder whose weights hold split**l sub-models at every level l < levels."""

    def __init__(self, config: FractalFormerConfig):
        super().__init__()
        self.config = config
        c = config
        # The same modules, in the same order, as GPT: parameter names, shapes and initial weights
        # are those of `gpt`, so checkpoints move between the two. The computation is below.
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.ropes = nn.ModuleList(
            RotaryEmbedding(c.head_width(level), c.block_size, c.rope_base)
            for level in range(c.levels)
        )
        self.blocks = nn.ModuleList(
            Block(
                c.d_model,
                CausalSelfAttention(c.d_model, c.n_head, c.kv_heads, self.ropes[0], c.dropout),
                MLP_MODULES[c.mlp](c.d_model, c.hidden),
                c.norm,
                c.dropout,
            )
            for _ in range(c.n_layer)
        )
        self.norm_out = make_norm(c.norm, c.d_model)
        self.unembed = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, c.init_std, c.n_layer)
        if c.tie_embeddings:
            self.unembed.weight = self.embed.weight

    # ---- which units of each parameter a sub-model owns --------------------------------------

    def parameter_groups(self, name: str) -> tuple[int | None, ...]:
        """Group count of each dimension of parameter `name` (None: not sliced)."""
        c = self.config
        kind = ".".join(name.split(".")[-2:])
        layouts: dict[str, tuple[int | None, ...]] = {
            "embed.weight": (None, 1),
            "unembed.weight": (None, 1),
            "qkv.weight": (c.n_head + 2 * c.kv_heads, 1),
            "proj.weight": (1, c.n_head),
            "gate_up.weight": (2, 1),
            "up.weight": (1, 1),
            "down.weight": (1, 1),
            "norm_attn.weight": (1,),
            "norm_mlp.weight": (1,),
            "norm_out.weight": (1,),
        }
        if kind not in layouts:
            raise KeyError(f"no sub-model layout for parameter '{name}'")
        return layouts[kind]

    def submodel_index(self, name: str, level: int, index: int) -> tuple[torch.Tensor, ...]:
        """Advanced index of sub-model (level, index)'s block of parameter `name`: reading
        `param[idx]` gives its weight, shaped as in the standalone model (with a leading 1)."""
        self._check_submodel(level, index)
        param = self.get_parameter(name)
        siblings = Siblings(self.config.count(level), index, index + 1)
        return siblings.index(param.shape, self.parameter_groups(name), param.device)

    def submodel_parameter_count(self, level: int) -> int:
        """Parameters that one sub-model at `level` reads: its own blocks (its standalone
        model's count), or with residual=downstream, below level 0, the whole model's (it runs
        its chain of ancestors up to the whole model)."""
        if self.config.residual == "downstream" and level > 0:
            return sum(p.numel() for p in self.parameters())
        n = self.config.count(level)
        return sum(
            p.numel() // n ** sum(g is not None for g in self.parameter_groups(name))
            for name, p in self.named_parameters()
        )

    # ---- the computation ----------------------------------------------------------------------

    def _check_submodel(self, level: int, index: int) -> None:
        c = self.config
        if not 0 <= level < c.levels or not 0 <= index < c.count(level):
            raise ValueError(
                f"no sub-model L{level}.{index}: levels 0..{c.levels - 1}, level l has "
                f"split**l = {c.split}**l sub-models"
            )

    def _plan(self, level: int, index: int) -> dict[int, Siblings]:
        """The sub-models to run, per level, to compute sub-model (level, index)."""
        c, s = self.config, self.config.split
        if c.residual == "upstream":  # its subtree
            return {
                lv: Siblings(
                    c.count(lv), index * s ** (lv - level), (index + 1) * s ** (lv - level)
                )
                for lv in range(level, c.levels)
            }
        if c.residual == "downstream":  # its chain of ancestors
            return {
                lv: Siblings(
                    c.count(lv), index // s ** (level - lv), index // s ** (level - lv) + 1
                )
                for lv in range(level + 1)
            }
        return {level: Siblings(c.count(level), index, index + 1)}

    def _attention(
        self, x: torch.Tensor, attn: CausalSelfAttention, siblings: Siblings, level: int
    ) -> torch.Tensor:
        """Causal self-attention of each sub-model over x (m, B, T, d_l)."""
        c = self.config
        m, b, t, _ = x.shape
        width = c.head_width(level)
        qkv = _linear(x, siblings.take(attn.qkv.weight, (c.n_head + 2 * c.kv_heads, 1)))
        q, k, v = qkv.split((c.n_head * width, c.kv_heads * width, c.kv_heads * width), dim=-1)
        # The sub-models become batch entries of one attention call: (m * B, heads, T, h_l).
        q = q.reshape(m * b, t, c.n_head, width).transpose(1, 2)
        k = k.reshape(m * b, t, c.kv_heads, width).transpose(1, 2)
        v = v.reshape(m * b, t, c.kv_heads, width).transpose(1, 2)
        rope = self.ropes[level]
        y = causal_attention(
            rope(q),
            rope(k),
            v,
            dropout_p=c.dropout if self.training else 0.0,
            enable_gqa=c.kv_heads != c.n_head,
        )
        y = y.transpose(1, 2).reshape(m, b, t, c.n_head * width)
        return _linear(y, siblings.take(attn.proj.weight, (1, c.n_head)))

    def _mlp(self, x: torch.Tensor, mlp: nn.Module, siblings: Siblings) -> torch.Tensor:
        """Each sub-model's MLP on x (m, B, T, d_l), with its slice of the hidden units."""
        down = siblings.take(mlp.down.weight, (1, 1))
        if self.config.mlp == "gelu":
            return _linear(F.gelu(_linear(x, siblings.take(mlp.up.weight, (1, 1)))), down)
        gate, up = _linear(x, siblings.take(mlp.gate_up.weight, (2, 1))).chunk(2, dim=-1)
        return _linear(GATED_ACTIVATIONS[self.config.mlp](gate) * up, down)

    def _layer(self, block: Block, x: torch.Tensor, siblings: Siblings, level: int) -> torch.Tensor:
        """Pre-norm block `block` as each sub-model computes it, on x (m, B, T, d_l)."""
        p = self.config.dropout
        h = self._attention(_norm(x, block.norm_attn, siblings), block.attn, siblings, level)
        x = x + F.dropout(h, p, self.training)
        h = self._mlp(_norm(x, block.norm_mlp, siblings), block.mlp, siblings)
        return x + F.dropout(h, p, self.training)

    def _exchange(
        self, y: dict[int, torch.Tensor], plan: dict[int, Siblings]
    ) -> dict[int, torch.Tensor]:
        """Residual exchange between levels after a layer (`residual`; module docstring)."""
        mode = self.config.residual
        if mode == "none":
            return y
        out = {}
        split = self.config.split
        for level, state in y.items():
            m, b, t, width = state.shape
            if mode == "upstream" and level + 1 in y:  # children's residuals, concatenated
                children = y[level + 1].view(m, split, b, t, -1)
                state = state + children.permute(0, 2, 3, 1, 4).reshape(m, b, t, width)
            if mode == "downstream" and level - 1 in y:  # the parent's residual, cut in slices
                parents = y[level - 1]
                slices = parents.view(*parents.shape[:3], split, width).permute(0, 3, 1, 2, 4)
                first = plan[level].start - plan[level - 1].start * split
                state = state + slices.reshape(-1, b, t, width)[first : first + m]
            out[level] = state
        return out

    def _logits(self, idx: torch.Tensor, plan: dict[int, Siblings]) -> dict[int, torch.Tensor]:
        """Logits (m, B, T, V) of the sub-models in `plan`, level by level."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        x = {  # (m, V, d_l) embedding columns, looked up: (m, B, T, d_l)
            level: s.take(self.embed.weight, (None, 1))[:, idx] for level, s in plan.items()
        }
        for block in self.blocks:
            x = self._exchange(
                {level: self._layer(block, x[level], s, level) for level, s in plan.items()}, plan
            )
        unembed = self.unembed.weight
        return {
            level: _linear(_norm(x[level], self.norm_out, s), s.take(unembed, (None, 1)))
            for level, s in plan.items()
        }

    def forward_submodel(self, idx: torch.Tensor, level: int, index: int) -> torch.Tensor:
        """Next-token logits (B, T, V) of sub-model (level, index) for idx (B, T), computing only
        it (and, with a residual exchange, the sub-models it reads: module docstring)."""
        self._check_submodel(level, index)
        return self._logits(idx, self._plan(level, index))[level][0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) of the full model (level 0) for idx (B, T)."""
        return self.forward_submodel(idx, 0, 0)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Every sub-model's cross-entropy, combined by `loss_reduction`; parts L<l>.<j>."""
        c = self.config
        plan = {lv: Siblings(c.count(lv), 0, c.count(lv)) for lv in range(c.levels)}
        losses = []
        kept = (targets != IGNORE_INDEX).sum().clamp(min=1)
        for level, logits in self._logits(idx, plan).items():
            n = c.count(level)
            precision = torch.promote_types(logits.dtype, torch.float32)  # float32 at least
            per_token = F.cross_entropy(
                logits.flatten(0, 2).to(precision),
                targets.expand(n, -1, -1).flatten(),
                reduction="none",
            )
            losses.append(per_token.view(n, -1).sum(dim=1) / kept)
        losses = torch.cat(losses)
        weights = torch.tensor(c.submodel_loss_weights(), dtype=losses.dtype, device=losses.device)
        parts = {"next_token": losses[0].detach()}
        for submodel, value in zip(c.submodels(), losses, strict=True):
            parts[submodel_name(*submodel)] = value.detach()
        return (weights * losses).sum(), parts

    # ---- sub-models as models of their own -----------------------------------------------------

    def extract_submodel(self, level: int, index: int) -> FractalFormer:
        """A standalone copy of sub-model (level, index) whose `forward` equals
        `forward_submodel(idx, level, index)`: a plain decoder (levels=1) with its weights, or for
        residual=upstream its subtree (a fractalformer with levels - level levels)."""
        self._check_submodel(level, index)
        c = self.config
        if c.residual == "downstream" and level > 0:
            raise ValueError(
                "residual=downstream: a sub-model reads its ancestors' residuals, so it has no "
                "standalone form; use forward_submodel or SubModelView"
            )
        config = c.submodel_config(level)
        if c.residual == "upstream" and level < c.levels - 1:
            weights = c.weights_per_level()[level:] if c.level_weights.strip() else ()
            config = replace(
                config,
                levels=c.levels - level,
                residual="upstream",
                loss_reduction=c.loss_reduction,
                level_weights=",".join(str(w) for w in weights),
            )
        standalone = FractalFormer(config).to(self.embed.weight)
        with torch.no_grad():
            for name, param in standalone.named_parameters():
                block = self.get_parameter(name)[self.submodel_index(name, level, index)]
                param.copy_(block[0])
        return standalone.train(self.training)


class SubModelView(LanguageModel):
    """Sub-model (level, index) of `model` as a model: `forward` is `model.forward_submodel`.

    Shares the weights (no copy) and works for every residual variant, so evaluation code that
    calls `model(idx)` scores a sub-model unchanged. `parameters()` are the whole model's: report
    `model.submodel_parameter_count(level)` as its size.
    """

    def __init__(self, model: FractalFormer, level: int, index: int):
        super().__init__()
        model._check_submodel(level, index)
        self.model, self.level, self.index = model, level, index
        self.config = model.config

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, V) of the sub-model."""
        return self.model.forward_submodel(idx, self.level, self.index)


def submodel_name(level: int, index: int) -> str:
    """The name of a sub-model in loss parts and results: 'L<level>.<index>'."""
    return f"L{level}.{index}"


def parse_submodel(name: str, config: FractalFormerConfig) -> SubModel:
    """(level, index) of a sub-model name 'L<level>.<index>' that exists in `config`."""
    match = re.fullmatch(r"L(\d+)\.(\d+)", name.strip())
    if not match:
        raise ConfigError(f"'{name}' is not a sub-model name of the form L<level>.<index>")
    level, index = int(match[1]), int(match[2])
    if level >= config.levels or index >= config.count(level):
        raise ConfigError(
            f"no sub-model {name} with levels={config.levels}, split={config.split}: level l has "
            f"split**l sub-models"
        )
    return level, index


def _contains(outer: SubModel, inner: SubModel, split: int) -> bool:
    """Whether sub-model `inner` lies inside `outer` (is it, or one of its descendants)."""
    depth = inner[0] - outer[0]
    return depth >= 0 and inner[1] // split**depth == outer[1]


def parse_merge_targets(names: list[str], config: FractalFormerConfig) -> list[SubModel]:
    """The sub-models named 'L<level>.<index>' (the targets of an `init_from` cell), checked to
    exist in `config` and not to overlap (no target inside another)."""
    targets: list[SubModel] = []
    for name in names:
        submodel = parse_submodel(name, config)
        for other in targets:
            if _contains(other, submodel, config.split) or _contains(submodel, other, config.split):
                raise ConfigError(
                    f"sub-models {submodel_name(*submodel)} and {submodel_name(*other)} overlap "
                    "(one contains the other)"
                )
        targets.append(submodel)
    return targets


def check_merge_target(config: FractalFormerConfig, level: int) -> None:
    """Raise ConfigError unless a level-`level` sub-model of `config` is a plain decoder that a
    standalone model can fill: not one that reads other sub-models' residuals."""
    reads_others = (config.residual == "downstream" and level > 0) or (
        config.residual == "upstream" and level < config.levels - 1
    )
    if reads_others:
        raise ConfigError(
            f"merge target: with residual={config.residual}, a level-{level} sub-model reads other "
            "sub-models' residuals, so no trained standalone model computes what it computes; "
            "merge with residual=none (or, with upstream, into the last level only)"
        )


def check_merge_source(
    config: FractalFormerConfig, level: int, source_arch: str, source: GPTConfig
) -> None:
    """Raise ConfigError unless a trained `source_arch` model with config `source` can be placed
    as a sub-model at `level` of `config`: same computation (a plain decoder) and same shapes."""
    check_merge_target(config, level)
    if source_arch not in ("gpt", "fractalformer"):
        raise ConfigError(f"merge source: architecture '{source_arch}' is not gpt or fractalformer")
    if isinstance(source, FractalFormerConfig) and source.levels > 1 and source.residual != "none":
        raise ConfigError(
            f"merge source: a fractalformer with residual={source.residual} and levels > 1 is not "
            "a plain decoder"
        )
    target = config.submodel_config(level)
    source_hidden = (
        source.hidden
        if isinstance(source, FractalFormerConfig)
        else mlp_hidden(source.mlp, source.d_model, source.mlp_ratio)
    )
    wanted = {
        "vocab_size": (target.vocab_size, source.vocab_size),
        "n_layer": (target.n_layer, source.n_layer),
        "n_head": (target.n_head, source.n_head),
        "n_kv_heads": (target.kv_heads, source.kv_heads),
        "d_model": (target.d_model, source.d_model),
        "mlp": (target.mlp, source.mlp),
        "MLP hidden width": (target.hidden, source_hidden),
        "norm": (target.norm, source.norm),
        "rope_base": (target.rope_base, source.rope_base),
    }
    for name, (want, got) in wanted.items():
        if want != got:
            raise ConfigError(
                f"merge source for a level-{level} sub-model: {name} is {got}, needs {want}"
            )
    if config.tie_embeddings and not source.tie_embeddings:
        raise ConfigError(
            "merge source has untied embeddings but the model ties them (tie_embeddings=true)"
        )


class FrozenBlocks:
    """Blocks of parameters held at their current values while the rest of each tensor trains.

    A block of a bigger tensor cannot be frozen with requires_grad, so two things are done:
    - a gradient hook zeroes the frozen entries of each gradient, so they never enter AdamW's
      moments or the clipping norm;
    - AdamW's decoupled weight decay (p <- p - lr * wd * p) still moves every entry of a tensor
      in a decayed group whatever its gradient, so `attach(optimizer)` re-writes the frozen
      entries from a saved copy after every optimizer step. Call it once the optimizer exists.
    """

    def __init__(self, masks: list[tuple[nn.Parameter, torch.Tensor]]):
        self.entries = [(param, mask, param.detach().clone()) for param, mask in masks]
        for param, mask in masks:
            param.register_hook(functools.partial(_zero_masked, mask=mask))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the frozen entries after every step of `optimizer`."""
        optimizer.register_step_post_hook(lambda *_: self.restore())

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back into the frozen entries."""
        for param, mask, saved in self.entries:
            mask = mask.to(param.device)
            param.copy_(torch.where(mask, saved.to(param.device), param))


def _zero_masked(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(mask.to(grad.device), 0.0)


def merge_init(
    model: FractalFormer,
    sources: Mapping[SubModel, Mapping[str, torch.Tensor]],
    freeze: bool,
) -> FrozenBlocks | None:
    """Copy standalone checkpoints into sub-model blocks; optionally freeze those blocks.

    `sources` maps (level, index) to the state dict of a plain decoder with the shapes of
    `model.config.submodel_config(level)` (a `gpt` or fractalformer state dict; names as in
    `gpt`). Every parameter of the model takes the source's tensor in that sub-model's block; the
    rest keeps its initial value. With `freeze`, returns the FrozenBlocks to `attach` to the
    optimizer. Raises ConfigError on overlapping sub-models, a target that reads other
    sub-models' residuals (check_merge_target), missing keys or wrong shapes.
    """
    split = model.config.split
    for a in sources:
        model._check_submodel(*a)
        check_merge_target(model.config, a[0])
        for b in sources:
            if a != b and _contains(a, b, split):
                raise ConfigError(f"merge: {submodel_name(*a)} contains {submodel_name(*b)}")
    masks: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for (level, index), state in sources.items():
            where = f"merge source for {submodel_name(level, index)}"
            unexpected = set(state) - set(model.state_dict())
            missing = set(params) - set(state)
            if unexpected or missing:
                raise ConfigError(
                    f"{where}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}"
                )
            if model.config.tie_embeddings and not torch.equal(
                state.get("unembed.weight", state["embed.weight"]), state["embed.weight"]
            ):
                raise ConfigError(f"{where}: untied embeddings cannot fill a tied model")
            for name, param in params.items():
                block = model.submodel_index(name, level, index)
                expected = param[block].shape[1:]
                if state[name].shape != expected:
                    raise ConfigError(
                        f"{where}: '{name}' has shape {tuple(state[name].shape)}, the sub-model "
                        f"needs {tuple(expected)} (see FractalFormerConfig.submodel_config)"
                    )
                param[block] = state[name].to(param).unsqueeze(0)
                mask = masks.setdefault(name, torch.zeros_like(param, dtype=torch.bool))
                mask[block] = True
    if not freeze:
        return None
    return FrozenBlocks([(params[name], mask) for name, mask in masks.items()])
