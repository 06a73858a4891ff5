"""Nested sub-models as models of their own, so every evaluation also scores each of them.

A fractalformer run holds split**l sub-models at every level l; each is a language model in its
own right (`SubModelView`: `forward` gives that sub-model's next-token logits, computing what it
reads). The perplexity, leak-check and synthetic-task jobs run their scoring function on the
whole model and on every sub-model (lm-eval scores the whole model only), and write the
sub-models' results into the same JSON object under `SUBMODELS`:

    {"val_loss": ..., ..., "submodels": {"L1.0": {"val_loss": ..., "n_params": ...}, ...}}

so the aggregator can list each as its own entry `<row>/L1.0` (`archbench.report.submodels`).
Architectures without nested sub-models give no such key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

SUBMODELS = "submodels"


def nested_submodels(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """{name: (model view, parameter count)} of every sub-model below the whole model, level
    by level ('L1.0', 'L1.1', 'L2.0', ...); {} for a model without `forward_submodel`."""
    if not hasattr(model, "forward_submodel"):
        return {}
    from archbench.models.fractalformer import SubModelView, submodel_name

    return {
        submodel_name(level, index): (
            SubModelView(model, level, index),
            model.submodel_parameter_count(level),
        )
        for level, index in model.config.submodels()
        if level > 0
    }


def with_submodels(
    model: nn.Module, score: Callable[[nn.Module], dict[str, Any]], sizes: bool = False
) -> dict[str, Any]:
    """`score(model)`, plus `score` of every nested sub-model under SUBMODELS (each with its
    `n_params` when `sizes`); just `score(model)` for a model without sub-models."""
    result = score(model)
    nested = nested_submodels(model)
    if nested:
        result[SUBMODELS] = {
            name: {**score(view), **({"n_params": count} if sizes else {})}
            for name, (view, count) in nested.items()
        }
    return result
