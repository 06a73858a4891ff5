"""Data sets: config entries, verified raw text or generated synthetic tasks, lossless tokenizers
and prepared token files."""

from __future__ import annotations

from archbench.data.prepare import (
    MASK_FILES,
    load_instances,
    load_meta,
    load_meta_of,
    load_token_bytes,
    load_tokenizer,
    load_tokens,
    prepare_dataset,
    split_text,
    token_dtype,
)
from archbench.data.sources import (
    DatasetSpec,
    check_local_copy,
    default_cache_dir,
    load_text,
    parse_datasets,
    resolve_mirror,
)
from archbench.data.synthetic import TASKS, Instances, SyntheticSpec, check_seed, make_task
from archbench.data.tokenizers import (
    decode,
    encode,
    token_byte_lengths,
    train_tokenizer,
)

__all__ = [
    "MASK_FILES",
    "TASKS",
    "DatasetSpec",
    "Instances",
    "SyntheticSpec",
    "check_local_copy",
    "check_seed",
    "decode",
    "default_cache_dir",
    "encode",
    "load_instances",
    "load_meta",
    "load_meta_of",
    "load_text",
    "load_token_bytes",
    "load_tokenizer",
    "load_tokens",
    "make_task",
    "parse_datasets",
    "prepare_dataset",
    "resolve_mirror",
    "split_text",
    "token_byte_lengths",
    "token_dtype",
    "train_tokenizer",
]
