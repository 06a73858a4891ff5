"""Synthetic-task evaluation: answer accuracy, teacher-forced and greedy, and exact match.

For the validation instances of a synthetic data set (archbench.data.synthetic), with `<task>`
the task's name (mqar, path_star):

- `<task>_accuracy`: teacher-forced accuracy over the answer tokens, Zoology's MQAR metric: the
  argmax of the logits before each answer token, given the true instance up to there.
- `<task>_token_accuracy`: the same for greedy answers: the model decodes every answer token
  itself (argmax), in position order, from the prompt tokens and its own earlier answers. The
  non-answer tokens after an answer (MQAR's next queries) are the instance's own.
- `<task>_exact_match`: the fraction of instances whose greedy answers are all right.
- `task_eval_seconds`: wall time of the evaluation.

Path-star's answers are the last tokens of an instance, so its greedy answers are exactly the
greedy continuation of the prompt (`archbench.generate.generate` at temperature 0); the
teacher-forced accuracy there is the one that next-token training can game (every step but the
first from the centre is an edge lookup), the exact match the one that needs planning.

Decoding runs a batch of instances in lockstep: one forward per answer position (no cache, as
`archbench.generate`), whichever instances have an answer there take the model's choice.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from archbench.data import Instances, load_instances, load_meta
from archbench.errors import ConfigError, DataError
from archbench.evaluate.submodels import SUBMODELS, with_submodels
from archbench.generate import next_token
from archbench.io import write_json
from archbench.runs import load_run


@torch.no_grad()
def teacher_forced_hits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, L) bool: True at the answer positions whose token is the argmax of the logits at the
    position before, given the true tokens (n, L) up to there."""
    predicted = model(ids[:, :-1]).argmax(dim=-1)
    hits = torch.zeros_like(mask)
    hits[:, 1:] = (predicted == ids[:, 1:]) & mask[:, 1:]
    return hits


@torch.no_grad()
def greedy_answers(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`ids` (n, L) with every answer token (mask True) replaced by the model's greedy choice,
    decoded in position order from everything before it (earlier answers the model's own)."""
    decoded = ids.clone()
    for position in torch.nonzero(mask.any(dim=0)).flatten().tolist():
        choice = next_token(model(decoded[:, :position])[:, -1, :], 0.0).squeeze(1)
        decoded[:, position] = torch.where(mask[:, position], choice, decoded[:, position])
    return decoded


def score_instances(
    model: nn.Module,
    instances: Instances,
    task: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """`<task>_accuracy`, `<task>_token_accuracy` and `<task>_exact_match` of `model` on
    `instances` (see the module docstring), in batches of `batch_size` instances."""
    length = instances.ids.shape[1]
    if model.config.block_size < length - 1:
        raise ConfigError(
            f"the model's block_size={model.config.block_size} is shorter than the "
            f"{length - 1} tokens an instance feeds it"
        )
    if instances.mask[:, 0].any() or not instances.mask.any(axis=1).all():
        raise DataError("every instance needs an answer token, and none at position 0")
    model.eval()
    ids, mask = torch.from_numpy(instances.ids), torch.from_numpy(instances.mask)
    forced = greedy = exact = 0
    for chunk_ids, chunk_mask in zip(ids.split(batch_size), mask.split(batch_size), strict=True):
        chunk_ids, chunk_mask = chunk_ids.to(device), chunk_mask.to(device)
        forced += int(teacher_forced_hits(model, chunk_ids, chunk_mask).sum())
        right = (greedy_answers(model, chunk_ids, chunk_mask) == chunk_ids) | ~chunk_mask
        greedy += int((right & chunk_mask).sum())
        exact += int(right.all(dim=1).sum())
    answers = int(mask.sum())
    return {
        f"{task}_accuracy": forced / answers,
        f"{task}_token_accuracy": greedy / answers,
        f"{task}_exact_match": exact / len(ids),
    }


def evaluate_task(
    run_dir: Path,
    data_dir: Path,
    out_json: Path,
    limit: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Score a finished run on the first `limit` (all if None) validation instances of its
    synthetic data set and write the JSON of numbers to `out_json` (flat, plus each nested
    sub-model's own numbers under `submodels`, archbench.evaluate.submodels); returns it."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 (instances to score), got {limit}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    meta = load_meta(Path(data_dir))
    if "task" not in meta:
        raise ConfigError(
            f"data set '{meta['dataset']}' in {data_dir} is not a synthetic task: "
            "evaluate it with `archbench evaluate` (perplexity) instead"
        )
    instances = load_instances(Path(data_dir), "val")
    if limit is not None:
        instances = Instances(instances.ids[:limit], instances.mask[:limit])
    tick = time.perf_counter()
    model = load_run(Path(run_dir), device)
    metrics = with_submodels(  # nested sub-models (fractalformer) are scored on the same instances
        model, lambda scored: score_instances(scored, instances, meta["task"], batch_size, device)
    )
    metrics["task_eval_seconds"] = round(time.perf_counter() - tick, 3)
    scored = (metrics, *metrics.get(SUBMODELS, {}).values())
    numbers = [value for part in scored for value in part.values() if not isinstance(value, dict)]
    if not all(math.isfinite(value) for value in numbers):
        raise DataError(f"non-finite task metrics for {run_dir}: {metrics}")
    write_json(out_json, metrics)
    return metrics
