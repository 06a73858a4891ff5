"""Data and scoring functions that the task YAML files reference as `!function utils.<name>`.

lm-eval loads this file by its path, next to the YAML files, and calls a task's
`custom_dataset` with the TaskManager's metadata (the `archbench_*` keys set by
`archbench.evaluate.lm_eval_adapter.run_lm_eval`) plus the task's `dataset_kwargs`.
Everything is read from local files: nothing here touches the network.

BLiMP (Warstadt et al., 2020; CC BY 4.0): 67 paradigms of 1,000 minimal pairs. A paradigm's
JSONL file comes from the data mirror (`MIRROR/blimp/<paradigm>.jsonl`) when one is given, else
from the archive embedded in the package (`archbench/embedded/blimp.tar.xz`); either way its
sha256 must match `archbench/embedded/blimp.sha256`. A pair is two loglikelihood requests with an
empty context, one per sentence, and scores 1 when the good sentence is the more likely, 0.5 on an
exact tie and 0 otherwise.

Held-out perplexity: the validation split of a prepared data directory, decoded back to text,
is one document for `loglikelihood_rolling`.
"""

from __future__ import annotations

import functools
import io
import json
import lzma
import tarfile
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import datasets

from archbench.data import decode, load_tokenizer, load_tokens
from archbench.data.blimp import blimp_checksums, check_blimp_digest, read_mirror_blimp
from archbench.errors import ConfigError, DataError

BLIMP_ARCHIVE = "blimp.tar.xz"
# principle_A_case_2 spells its field "syntax/semantics", the other files "syntax_semantics".
FIELD_ALIASES = {"syntax/semantics": "syntax_semantics"}


@functools.cache
def _embedded_blimp() -> dict[str, bytes]:
    """Bytes of every file in the embedded archive, by paradigm name (decompressed once, ~0.5 s)."""
    archive = resources.files("archbench") / "embedded" / BLIMP_ARCHIVE
    try:
        with tarfile.open(fileobj=io.BytesIO(archive.read_bytes()), mode="r:xz") as tar:
            return {
                PurePosixPath(member.name).stem: tar.extractfile(member).read()
                for member in tar.getmembers()
                if member.isfile()
            }
    except (OSError, EOFError, lzma.LZMAError, tarfile.TarError) as err:
        raise DataError(
            f"embedded BLiMP archive archbench/embedded/{BLIMP_ARCHIVE}: {err}"
        ) from err


def read_blimp(paradigm: str, mirror: Path | None = None) -> list[dict[str, Any]]:
    """The records of one BLiMP paradigm, from `mirror` or the embedded archive, sha256-checked."""
    sums = blimp_checksums()
    if paradigm not in sums:
        raise ConfigError(f"unknown BLiMP paradigm {paradigm!r}")
    if mirror is not None:
        raw, where = read_mirror_blimp(paradigm, mirror)
    else:
        raw, where = _embedded_blimp().get(paradigm), f"archbench/embedded/{BLIMP_ARCHIVE}"
        if raw is None:
            raise DataError(f"BLiMP paradigm {paradigm} is missing from {where}")
    check_blimp_digest(paradigm, raw, where, sums[paradigm])
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def blimp_dataset(
    paradigm: str, archbench_blimp_mirror: str = "", **_metadata: Any
) -> dict[str, datasets.Dataset]:
    """custom_dataset of a paradigm task: its pairs as the "test" split (in memory, no cache)."""
    records = read_blimp(paradigm, Path(archbench_blimp_mirror) if archbench_blimp_mirror else None)
    columns = {
        "sentence_good": [r["sentence_good"] for r in records],
        "sentence_bad": [r["sentence_bad"] for r in records],
        "field": [FIELD_ALIASES.get(r["field"], r["field"]) for r in records],
        "pairID": [r["pairID"] for r in records],
    }
    return {"test": datasets.Dataset.from_dict(columns)}


def blimp_context(doc: dict[str, Any]) -> str:
    """No context: each sentence is scored on its own (the model conditions on its start text)."""
    return ""


def blimp_choices(doc: dict[str, Any]) -> list[str]:
    """Choice 0 is the good sentence, choice 1 the bad one."""
    return [doc["sentence_good"], doc["sentence_bad"]]


def blimp_process_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict:
    """Accuracy of one pair: 1 if the good sentence is more likely, 0.5 on a tie, else 0.

    `results[i][0]` is the summed log-likelihood of choice i. lm-eval's built-in `acc` takes the
    argmax, which resolves a tie to choice 0: a model giving every sentence the same score would
    reach 100%. With the tie rule it scores exactly 50%.
    """
    good, bad = results[0][0], results[1][0]
    return {"acc": 1.0 if good > bad else 0.5 if good == bad else 0.0}


def heldout_dataset(
    archbench_data_dir: str, archbench_max_tokens: int = 0, **_metadata: Any
) -> dict[str, datasets.Dataset]:
    """custom_dataset of the rolling task: the validation split's text as one document.

    With `archbench_max_tokens` > 0 only the first max_tokens + 1 tokens are kept: the same text
    that `archbench.evaluate.perplexity` scores with its `max_tokens`, less the byte tokens of a
    character that the cut splits (decoded, they would become U+FFFD, 3 bytes of another text).
    """
    data_dir = Path(archbench_data_dir)
    tokenizer, ids = load_tokenizer(data_dir), load_tokens(data_dir, "val")
    if 0 < archbench_max_tokens < len(ids) - 1:
        text = _whole_characters(tokenizer, ids[: archbench_max_tokens + 1])
    else:
        text = decode(tokenizer, ids)
    return {"test": datasets.Dataset.from_dict({"text": [text]})}


def _whole_characters(tokenizer: Any, ids: Any) -> str:
    """The text of `ids` without the trailing byte tokens of a character cut off after them (a
    UTF-8 character has at most 4 bytes, so at most 3 are dropped)."""
    for end in range(len(ids), max(len(ids) - 4, 0), -1):
        text = decode(tokenizer, ids[:end])
        if not text.endswith("\ufffd"):
            return text
    return decode(tokenizer, ids)


def heldout_text(doc: dict[str, Any]) -> str:
    """The document scored by `loglikelihood_rolling`."""
    return doc["text"]
