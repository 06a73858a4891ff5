"""Held-out perplexity, bits-per-byte and teacher-forcing top-k accuracy.

The split is cut into consecutive windows of `block_size` tokens; every token after the first is
predicted exactly once, from the context since its window's start. Bits-per-byte divides the total
loss by the UTF-8 bytes of exactly the predicted tokens, so it is comparable across tokenizers:
bpb = total nats / (ln 2 * bytes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from archbench.errors import ArchbenchError, DataError


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Convert a summed loss in nats over text of `n_bytes` UTF-8 bytes to bits per byte."""
    return total_nats / (math.log(2) * n_bytes)


def _windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of consecutive windows covering targets 1..n_tokens-1 once each."""
    spans = []
    for start in range(0, n_tokens - 1, block_size):
        spans.append((start, min(block_size, n_tokens - 1 - start)))
    return spans


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    block_size: int,
    batch_size: int = 16,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Score `tokens` with `model`; return loss (nats/token), ppl, bpb, top-1/top-5 accuracy."""
    model.eval()
    tokens = np.asarray(tokens[: max_tokens + 1] if max_tokens else tokens, dtype=np.int64)
    if len(tokens) < 2:
        raise DataError(f"{len(tokens)} validation tokens: scoring needs at least 2")
    total_nats, n_targets, n_bytes, top1, top5 = 0.0, 0, 0, 0, 0
    spans = _windows(len(tokens), block_size)
    groups: dict[int, list[int]] = {}
    for start, length in spans:
        groups.setdefault(length, []).append(start)
    for length, starts in groups.items():
        index = np.asarray(starts)[:, None] + np.arange(length + 1)
        windows = torch.from_numpy(tokens[index])
        for chunk in windows.split(batch_size):
            chunk = chunk.to(device)
            logits = model(chunk[:, :-1]).float().flatten(0, 1)
            targets = chunk[:, 1:].flatten()
            # .item() gives a Python float (float64) on the host: MPS has no float64 tensors
            total_nats += F.cross_entropy(logits, targets, reduction="sum").item()
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = best == targets[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=-1).sum())
            n_targets += targets.numel()
            n_bytes += int(token_bytes[targets.cpu().numpy()].sum())
    loss = total_nats / n_targets
    if not math.isfinite(loss):  # the report's intervals would silently leave this seed out
        raise ArchbenchError(f"validation loss is {loss}: the model's logits are not finite")
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": bits_per_byte(total_nats, n_bytes),
        "val_top1": top1 / n_targets,
        "val_top5": top5 / n_targets,
        "val_tokens": n_targets,
        "val_bytes": n_bytes,
    }
