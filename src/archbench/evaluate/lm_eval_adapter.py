"""lm-evaluation-harness on archbench checkpoints: the `ArchbenchLM` adapter and `run_lm_eval`.

`ArchbenchLM` wraps a model whose `forward(idx)` maps token ids (B, T), T <= block_size, to
next-token logits (B, T, V), with the tokenizer of its prepared data directory:

- `loglikelihood((context, continuation))` -> (sum of the continuation tokens' log-probs, whether
  greedy decoding produces them: at each of their positions the token is the argmax, the first
  of the highest logits when several tie, as greedy generation picks it). The
  continuation's tokens are those of context + continuation after the context's (trailing spaces
  of the context move to the continuation, as in lm-eval's own models; if a token straddles the
  boundary, the continuation is encoded on its own). archbench vocabularies have no BOS/EOS
  token, so an empty context is replaced by `start_text` (default "\\n": the training text puts a
  line break before every line), the counterpart of the end-of-text token other models condition
  on.
- `loglikelihood_rolling(text)` -> total natural-log probability of the text given `start_text`.
- `generate_until((context, {"until": [...], "max_gen_toks": n}))` -> the greedy continuation,
  cut before the first stop string, at most n tokens (one forward pass per new token, over the
  last block_size tokens; only greedy decoding is supported).

Windows. A token sequence whose targets from index `first` on are to be scored is cut into
windows tokens[start:end]: inputs tokens[start:end-1] (at most block_size of them), targets
tokens[start+1:end], of which the last n are scored; every target is scored exactly once. The
first window starts at token 0 and scores up to block_size targets (after a context longer than a
block: the first target alone, behind a full block); each later window scores the next `stride`
targets after a full block of context. This is lm-eval's own rolling-window rule
(`lm_eval.utils.get_rolling_token_windows` with context_len = block_size - stride + 1).
stride = block_size (the default) gives consecutive non-overlapping windows, as lm-eval's models
use: those of `archbench.evaluate.perplexity`, except that the last one reaches back a full
block. A smaller stride is a sliding window in which every target sees at least
block_size - stride + 1 tokens, at about block_size / stride times the cost.

Batching. All windows of one call are sorted by length and cut into batches of batch_size
windows, right-padded (sorted, they hardly need padding): the models are causal, so padding after
a position leaves its logits unchanged. There is no Python work per token; per window only the
copy of its ids into the batch array.

Offline. HF_DATASETS_OFFLINE, HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set to 1 before
lm_eval (and through it `datasets`) is imported, and the flags of those libraries are forced on
even if they were imported earlier. The tasks (`archbench/evaluate/tasks`) read only local files.
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
os.environ.update(dict.fromkeys(OFFLINE_VARIABLES, "1"))  # read at import by the libraries below

import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import datasets  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from torch import nn  # noqa: E402

from archbench.data import load_meta, load_tokenizer, resolve_mirror  # noqa: E402
from archbench.errors import ConfigError  # noqa: E402
from archbench.evaluate.tasks import TASKS_DIR  # noqa: E402
from archbench.io import write_json  # noqa: E402
from archbench.runs import load_run  # noqa: E402
from archbench.runtime import pick_device  # noqa: E402

# Imported before this module, these libraries have read the variables already.
datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
huggingface_hub.constants.HF_HUB_OFFLINE = True


def _drop_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """Filter out lm-eval's hint on custom_dataset kwargs, logged once for each of 67 tasks."""
    return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_drop_custom_dataset_hint)

BLIMP_GROUP = "archbench_blimp"  # lm-eval's name of the BLiMP group in archbench/evaluate/tasks
BLIMP_TASK_PREFIX = f"{BLIMP_GROUP}_"  # and of each of its fields and paradigms
ROLLING_TASK = "archbench_rolling_ppl"
ENCODE_CHUNK = 1024  # texts per call of the tokenizer


def plan_windows(
    n_tokens: int, first: int, block_size: int, stride: int
) -> list[tuple[int, int, int]]:
    """Windows (start, end, n_scored) scoring targets first..n_tokens-1 once (module doc)."""
    windows = []
    pos = max(first, 1)  # token 0 has nothing to be predicted from
    # the first target with all the context a block holds: from token 0 (or, after a context
    # longer than a block, alone behind a full block)
    end = min(n_tokens, max(pos + 1, block_size + 1))
    while pos < n_tokens:
        windows.append((max(0, end - 1 - block_size), end, end - pos))
        pos, end = end, min(n_tokens, max(end + stride, block_size + 1))
    return windows


class ArchbenchLM(LM):
    """An lm-eval model backed by an archbench model and its tokenizer (see the module doc)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        stride: int | None = None,
        start_text: str = "\n",
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        self.block_size: int = model.config.block_size
        stride = self.block_size if stride is None else stride
        if not 1 <= stride <= self.block_size:
            raise ConfigError(
                f"stride must be between 1 and block_size={self.block_size}, got {stride}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_gen_toks < 1:
            raise ConfigError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stride = stride
        self.start_ids = self._encode([start_text])[0]
        if not self.start_ids:
            raise ConfigError(f"start_text {start_text!r} encodes to no tokens")
        self.max_gen_toks = max_gen_toks
        self.model_seconds = 0.0  # wall time in forward passes and scoring, for the report

    # --- lm-eval interface ------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """(log-prob of the continuation given the context, greedy?) for each request."""
        pairs = [_move_trailing_space(*req.args) for req in requests]
        unique = list(dict.fromkeys(context for context, _ in pairs))  # often all the same
        encoded = dict(zip(unique, self._encode(unique), strict=True))
        contexts = [encoded[context] for context, _ in pairs]
        wholes = self._encode([context + continuation for context, continuation in pairs])
        sequences, firsts = [], []
        for context_ids, whole, (_, continuation) in zip(contexts, wholes, pairs, strict=True):
            if not context_ids:
                context_ids, continuation_ids = self.start_ids, whole
            elif whole[: len(context_ids)] == context_ids:
                continuation_ids = whole[len(context_ids) :]
            else:  # a token merges across the boundary: encode the continuation on its own
                continuation_ids = self._encode([continuation])[0]
            sequences.append(context_ids + continuation_ids)
            firsts.append(len(context_ids))
        return self._score(sequences, firsts)

    def loglikelihood_rolling(self, requests: Sequence[Instance]) -> list[float]:
        """Total log-prob of each whole text given `start_text`, in windows of block_size."""
        texts = self._encode([req.args[0] for req in requests])
        first = len(self.start_ids)
        scores = self._score([self.start_ids + ids for ids in texts], [first] * len(texts))
        return [total for total, _ in scores]

    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Greedy continuation of each context, up to its stop strings or max_gen_toks tokens."""
        contexts = self._encode([req.args[0] for req in requests])
        settings = [self._generation_settings(req.args[1]) for req in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(contexts[i]))
        outputs = [""] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            texts = self._greedy(
                [contexts[i] or self.start_ids for i in batch], [settings[i] for i in batch]
            )
            for i, text in zip(batch, texts, strict=True):
                outputs[i] = text
        return outputs

    # --- internals --------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded in chunks (an Encoding is far bigger than its ids)."""
        ids = []
        for start in range(0, len(texts), ENCODE_CHUNK):
            chunk = self.tokenizer.encode_batch(
                texts[start : start + ENCODE_CHUNK], add_special_tokens=False
            )
            ids += [encoding.ids for encoding in chunk]
        return ids

    def _decode(self, ids: list[int]) -> str:
        """Text of a token id list."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows right-padded with token 0 as a (B, L) tensor on the device, and their lengths."""
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
        return torch.from_numpy(ids).to(self._device), torch.from_numpy(lengths).to(self._device)

    def _score(self, sequences: list[list[int]], firsts: list[int]) -> list[tuple[float, bool]]:
        """(sum of log-probs of targets first.., all of them greedy?) for each sequence. Equal
        requests are scored once, so they get bit-identical results (a BLiMP pair of two equal
        sentences is a tie, whichever batch padding each would have landed in)."""
        unique: dict[tuple[tuple[int, ...], int], int] = {}
        slots = [
            unique.setdefault((tuple(sequence), first), len(unique))
            for sequence, first in zip(sequences, firsts, strict=True)
        ]
        scores = self._score_unique([list(key) for key, _ in unique], [f for _, f in unique])
        return [scores[slot] for slot in slots]

    @torch.inference_mode()
    def _score_unique(
        self, sequences: list[list[int]], firsts: list[int]
    ) -> list[tuple[float, bool]]:
        """`_score` without the deduplication: every sequence in length-sorted batches."""
        windows = [  # (sequence index, start, end, n_scored)
            (i, *window)
            for i, (sequence, first) in enumerate(zip(sequences, firsts, strict=True))
            for window in plan_windows(len(sequence), first, self.block_size, self.stride)
        ]
        windows.sort(key=lambda w: w[1] - w[2])  # longest first
        totals = np.zeros(len(sequences), dtype=np.float64)
        greedy = np.ones(len(sequences), dtype=bool)
        started = time.perf_counter()
        for first_window in range(0, len(windows), self.batch_size):
            chosen = windows[first_window : first_window + self.batch_size]
            ids, lengths = self._padded([sequences[i][start:end] for i, start, end, _ in chosen])
            inputs, targets, n_inputs = ids[:, :-1], ids[:, 1:], lengths - 1
            logits = self.model(inputs)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            best = logits.amax(-1)
            target_logits = logits.gather(-1, targets[..., None])[..., 0]
            log_probs = target_logits - best - (logits - best[..., None]).exp().sum(-1).log()
            n_scored = torch.tensor([n for *_, n in chosen], device=self._device)
            positions = torch.arange(inputs.shape[1], device=self._device)
            scored = (positions >= (n_inputs - n_scored)[:, None]) & (positions < n_inputs[:, None])
            # summed in float64 on the host (MPS has no float64 tensors)
            sums = torch.where(scored, log_probs, 0.0).cpu().double().sum(-1)
            hits = ((logits.argmax(-1) == targets) | ~scored).all(-1)  # argmax, as generated
            index = np.fromiter((i for i, *_ in chosen), dtype=np.int64, count=len(chosen))
            np.add.at(totals, index, sums.numpy())
            np.logical_and.at(greedy, index, hits.cpu().numpy())
        self.model_seconds += time.perf_counter() - started
        return [(float(t), bool(g)) for t, g in zip(totals, greedy, strict=True)]

    def _generation_settings(self, kwargs: dict[str, Any]) -> tuple[list[str], int]:
        """(stop strings, max new tokens) from a request's generation kwargs; greedy only."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise ConfigError("ArchbenchLM supports only greedy decoding (do_sample=False)")
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        return [stop for stop in until if stop], max_new

    @torch.inference_mode()
    def _greedy(
        self, contexts: list[list[int]], settings: list[tuple[list[str], int]]
    ) -> list[str]:
        """Greedy generation for one batch of contexts, each with its own stop strings and limit."""
        sequences = [list(context) for context in contexts]
        new_ids: list[list[int]] = [[] for _ in contexts]
        texts = [""] * len(contexts)
        active = [i for i, (_, max_new) in enumerate(settings) if max_new > 0]
        started = time.perf_counter()
        while active:
            ids, lengths = self._padded([sequences[i][-self.block_size :] for i in active])
            rows = torch.arange(len(active), device=self._device)
            next_ids = self.model(ids)[rows, lengths - 1].argmax(-1).tolist()
            still_active = []
            for i, token in zip(active, next_ids, strict=True):
                sequences[i].append(token)
                new_ids[i].append(token)
                text = self._decode(new_ids[i])
                until, max_new = settings[i]
                cuts = [text.find(stop) for stop in until if stop in text]
                if cuts:
                    texts[i] = text[: min(cuts)]
                elif len(new_ids[i]) >= max_new:
                    texts[i] = text
                else:
                    still_active.append(i)
            active = still_active
        self.model_seconds += time.perf_counter() - started
        return texts


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the continuation (lm-eval's convention)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def run_lm_eval(
    run_dir: Path,
    data_dir: Path,
    tasks: str,
    out_json: Path,
    batch_size: int = 64,
    limit: int | None = None,
    device: str = "cpu",
    *,
    stride: int | None = None,
    max_tokens: int | None = None,
    data_mirror: str | None = None,
) -> dict[str, float]:
    """Evaluate the checkpoint in `run_dir` on one task group; write `out_json` and return it.

    The JSON is a flat object of numbers (see `evaluate_lm`) plus lm_eval_<tasks>_seconds, the
    wall time of the whole call. `device` may be "auto"; `data_mirror` falls back to
    $ARCHBENCH_DATA_MIRROR (`archbench.data.resolve_mirror`).
    """
    _task_group(tasks)  # before loading anything
    if "instance_length" in load_meta(Path(data_dir)):
        raise ConfigError(
            f"{data_dir} holds a synthetic task: lm-eval's tasks are English text; score the run "
            f"with `archbench evaluate-task`"
        )
    started = time.perf_counter()
    chosen = pick_device(device)
    lm = ArchbenchLM(
        load_run(Path(run_dir), chosen),
        load_tokenizer(Path(data_dir)),
        batch_size=batch_size,
        device=chosen,
        stride=stride,
    )
    metrics = evaluate_lm(
        lm, tasks, data_dir, limit=limit, max_tokens=max_tokens, mirror=resolve_mirror(data_mirror)
    )
    metrics[f"lm_eval_{tasks}_seconds"] = time.perf_counter() - started
    write_json(out_json, metrics)
    return metrics


def evaluate_lm(
    lm: ArchbenchLM,
    tasks: str,
    data_dir: Path,
    limit: int | None = None,
    max_tokens: int | None = None,
    mirror: Path | None = None,
) -> dict[str, float]:
    """Run task group `tasks` through lm-eval's TaskManager with the local tasks only.

    "blimp" gives blimp_<paradigm> (accuracy with the tie rule), blimp_<field> and blimp_overall
    (means over paradigms) and blimp_pairs; `limit` caps the pairs per paradigm, read from
    `mirror` if given, else from the embedded copy. "rolling_ppl" gives lm_eval_rolling_bpb,
    lm_eval_word_perplexity and lm_eval_byte_perplexity of the validation split of `data_dir`
    (its first max_tokens + 1 tokens if given). Both add lm_eval_<tasks>_model_seconds.
    """
    group = _task_group(tasks)
    manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,  # indexing lm-eval's ~14,000 built-in task files takes ~30 s
        metadata={
            "archbench_blimp_mirror": str(mirror or ""),
            "archbench_data_dir": str(Path(data_dir).resolve()),
            "archbench_max_tokens": max_tokens or 0,
        },
    )
    model_seconds = lm.model_seconds
    results = simple_evaluate(
        model=lm,
        tasks=[group.lm_eval_name],
        task_manager=manager,
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
    )
    metrics = group.metrics(results)
    metrics[f"lm_eval_{tasks}_model_seconds"] = lm.model_seconds - model_seconds
    return metrics


def _task_group(tasks: str) -> TaskGroup:
    """Task group `tasks` of TASK_GROUPS; ConfigError naming the choices if unknown."""
    if tasks not in TASK_GROUPS:
        raise ConfigError(
            f"unknown lm-eval task group {tasks!r}; choose one of {', '.join(TASK_GROUPS)}"
        )
    return TASK_GROUPS[tasks]


def _blimp_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Accuracy per paradigm, mean per field and over all paradigms, and the number of pairs."""
    scores = results["results"]
    subtasks = results["group_subtasks"]
    metrics: dict[str, float] = {}
    paradigms = []
    for field in subtasks[BLIMP_GROUP]:
        field_accuracies = [scores[task]["acc,none"] for task in subtasks[field]]
        metrics[f"blimp_{field.removeprefix(BLIMP_TASK_PREFIX)}"] = float(np.mean(field_accuracies))
        paradigms += subtasks[field]
    for task in paradigms:
        metrics[f"blimp_{task.removeprefix(BLIMP_TASK_PREFIX)}"] = float(scores[task]["acc,none"])
    metrics["blimp_overall"] = float(np.mean([scores[task]["acc,none"] for task in paradigms]))
    metrics["blimp_pairs"] = float(
        sum(results["n-samples"][task]["effective"] for task in paradigms)
    )
    return metrics


def _rolling_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Bits per byte, word and byte perplexity of the held-out split."""
    scores = results["results"][ROLLING_TASK]
    return {
        "lm_eval_rolling_bpb": float(scores["bits_per_byte,none"]),
        "lm_eval_word_perplexity": float(scores["word_perplexity,none"]),
        "lm_eval_byte_perplexity": float(scores["byte_perplexity,none"]),
    }


class TaskGroup(NamedTuple):
    """A task group of `archbench lm-eval`: its lm-eval group or task in archbench/evaluate/tasks
    and how its numbers are read from lm-eval's results."""

    lm_eval_name: str
    metrics: Callable[[dict[str, Any]], dict[str, float]]


# The task groups of `archbench lm-eval --tasks`, by name.
TASK_GROUPS = {
    "blimp": TaskGroup(BLIMP_GROUP, _blimp_metrics),
    "rolling_ppl": TaskGroup(ROLLING_TASK, _rolling_metrics),
}
