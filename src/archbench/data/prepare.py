"""Tokenize a data set once into a directory shared by all training jobs, and read it back.

Split: the first ``n - round(n * val_fraction)`` characters of the text are the train split, the
remaining ``round(n * val_fraction)`` characters the validation split (no shuffling, so the split
is the same everywhere). The tokenizer is trained on the train split only; characters that occur
only in the validation split are encoded through byte fallback / byte-level tokens.

A prepared directory holds train.bin and val.bin (raw token ids, ``ndarray.tofile``, dtype from
meta.json), tokenizer.json, token_bytes.npy (UTF-8 bytes per token id) and meta.json. Every file
is written atomically and meta.json last, so a directory with a meta.json is complete.

A synthetic data set (archbench.data.synthetic) is generated instead of split: its splits are
whole instances of `instance_length` tokens laid end to end, with the same files plus
train_mask.bin and val_mask.bin (one byte per token, 1 on answer tokens), and meta.json adds
`task`, `instance_length`, the data `seed`, the task's `knobs` and `n_val_in_train` (validation
instances whose problem, `SyntheticTask.problems`, a training instance also poses; preparation
warns when there are any);
`sha256` is the digest of the generated ids and masks, and `train_bytes` / `val_bytes` count the
symbols' bytes without the spaces that decoding puts between them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from archbench.data.sources import DatasetSpec, load_text
from archbench.data.synthetic import Instances, SyntheticSpec
from archbench.data.tokenizers import encode, token_byte_lengths, train_tokenizer
from archbench.errors import ConfigError, DataError
from archbench.io import atomic_path, read_json, write_json

SPLITS = ("train", "val")
META_KEYS = (
    "dataset",
    "tokenizer",
    "vocab_size",
    "dtype",
    "n_train_tokens",
    "n_val_tokens",
    "train_bytes",
    "val_bytes",
    "sha256",
    "val_fraction",
)
MASK_FILES = {split: f"{split}_mask.bin" for split in SPLITS}


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the first and the last round(len * val_fraction) characters of `text`."""
    n_val = round(len(text) * val_fraction)
    if n_val == 0 or n_val == len(text):
        raise DataError(
            f"text of {len(text)} characters is too short to split with val_fraction={val_fraction}"
        )
    return text[: len(text) - n_val], text[len(text) - n_val :]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare_dataset(
    spec: DatasetSpec | SyntheticSpec,
    out_dir: Path,
    mirror: Path | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Load, split and tokenize `spec` (or generate it, if synthetic) into `out_dir`; returns the
    meta dict (also meta.json)."""
    if isinstance(spec, SyntheticSpec):
        return prepare_synthetic(spec, out_dir)
    out_dir = Path(out_dir)
    (out_dir / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until the end
    train_text, val_text = split_text(load_text(spec, mirror, cache_dir), spec.val_fraction)
    tok = train_tokenizer(spec.tokenizer, train_text, spec.vocab_size)
    dtype = token_dtype(tok.get_vocab_size())
    train_ids = encode(tok, train_text).astype(dtype)
    val_ids = encode(tok, val_text).astype(dtype)
    _write_array(out_dir / "train.bin", train_ids)
    _write_array(out_dir / "val.bin", val_ids)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    with atomic_path(out_dir / "token_bytes.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, token_byte_lengths(tok), allow_pickle=False)
    meta = {
        "dataset": spec.name,
        "tokenizer": spec.tokenizer,
        "vocab_size": tok.get_vocab_size(),
        "dtype": dtype.name,
        "n_train_tokens": len(train_ids),
        "n_val_tokens": len(val_ids),
        "train_bytes": len(train_text.encode("utf-8")),
        "val_bytes": len(val_text.encode("utf-8")),
        "sha256": spec.sha256,
        "val_fraction": spec.val_fraction,
    }
    write_json(out_dir / "meta.json", meta)
    return meta


def prepare_synthetic(spec: SyntheticSpec, out_dir: Path) -> dict:
    """Generate both splits of a synthetic data set into `out_dir` (see module docstring)."""
    out_dir = Path(out_dir)
    (out_dir / "meta.json").unlink(missing_ok=True)
    task = spec.task()
    tok = task.tokenizer()
    dtype = token_dtype(tok.get_vocab_size())
    lengths = token_byte_lengths(tok)
    digest = hashlib.sha256()
    meta = {"dataset": spec.name, "tokenizer": "symbols", "vocab_size": tok.get_vocab_size()}
    splits = {split: task.generate(spec.seed, split) for split in SPLITS}
    for split, generated in splits.items():
        ids, mask = generated.ids.astype(dtype).ravel(), generated.mask.astype(np.uint8).ravel()
        _write_array(out_dir / f"{split}.bin", ids)
        _write_array(out_dir / MASK_FILES[split], mask)
        digest.update(ids.tobytes() + mask.tobytes())
        meta[f"n_{split}_tokens"] = len(ids)
        meta[f"{split}_bytes"] = int(lengths[ids].sum())
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    with atomic_path(out_dir / "token_bytes.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, lengths, allow_pickle=False)
    meta.update(
        dtype=dtype.name,
        sha256=digest.hexdigest(),
        val_fraction=task.n_val / (task.n_train + task.n_val),
        task=spec.synthetic,
        instance_length=task.instance_length(),
        seed=spec.seed,
        knobs=task.knobs(),
        n_val_in_train=count_seen(task.problems(splits["val"]), task.problems(splits["train"])),
    )
    if meta["n_val_in_train"]:
        print(
            f"archbench: warning: {meta['n_val_in_train']} of {task.n_val} validation "
            f"instances of '{spec.name}' pose a problem that its training split also poses "
            "(same pairs and queries, or same edges and goal, in any listed order), so "
            "validation accuracy partly measures memorisation; make the instances more varied "
            "(the task's knobs) or draw fewer",
            file=sys.stderr,
        )
    write_json(out_dir / "meta.json", meta)
    return meta


def count_seen(instances: np.ndarray, seen: np.ndarray) -> int:
    """How many rows of `instances` (n, L) equal some row of `seen` (m, L)."""
    known = {row.tobytes() for row in seen}
    return sum(row.tobytes() in known for row in instances)


def _write_array(path: Path, ids: np.ndarray) -> None:
    """Atomically write `ids` as raw bytes (native byte order, no header)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        ids.tofile(handle)


def load_meta(data_dir: Path) -> dict:
    """meta.json of a prepared directory; DataError if missing, unreadable or incomplete."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found: the data set has not been prepared in {data_dir}")
    try:
        meta = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is unreadable: {err}") from err
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise DataError(f"{path} is missing keys: {', '.join(missing)}")
    return meta


def load_meta_of(data_dir: Path, dataset: str, user: str) -> dict:
    """meta.json of `data_dir`, which must hold the data set `dataset` that `user` (e.g. "run
    results/default/gpt/seed0") was made for: a DataError names both otherwise (another data
    set's token ids mean other characters, and scores on them mean nothing)."""
    meta = load_meta(data_dir)
    if meta.get("dataset") != dataset:
        raise DataError(
            f"{user} belongs to data set '{dataset}', but {data_dir} holds "
            f"'{meta.get('dataset')}': pass --data results/data/{dataset}"
        )
    return meta


def load_tokens(data_dir: Path, split: str) -> np.memmap:
    """Read-only memmap of the token ids of `split` ("train" or "val"), length-checked."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"n_{split}_tokens"] * dtype.itemsize
    actual = path.stat().st_size if path.is_file() else None
    if actual != expected:
        raise DataError(
            f"{path} is truncated or corrupt: expected {expected} bytes "
            f"({meta[f'n_{split}_tokens']} {dtype.name} tokens), found "
            f"{'no file' if actual is None else f'{actual} bytes'}"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def load_instances(data_dir: Path, split: str) -> Instances:
    """Token ids (n, L) and answer mask (n, L) of `split` of a prepared synthetic data set."""
    meta = load_meta(data_dir)
    if "instance_length" not in meta:
        raise DataError(
            f"data set {meta['dataset']} in {data_dir} is not synthetic: it has no instances"
        )
    ids = load_tokens(data_dir, split)
    path = Path(data_dir) / MASK_FILES[split]
    actual = path.stat().st_size if path.is_file() else None
    if actual != len(ids):
        raise DataError(
            f"{path} is truncated or corrupt: expected {len(ids)} bytes (one per token), found "
            f"{'no file' if actual is None else f'{actual} bytes'}"
        )
    shape = (-1, meta["instance_length"])
    mask = np.fromfile(path, dtype=np.uint8).astype(bool)
    return Instances(np.asarray(ids, dtype=np.int64).reshape(shape), mask.reshape(shape))


def load_tokenizer(data_dir: Path) -> Tokenizer:
    """The tokenizer saved in a prepared directory."""
    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path} not found: the data set has not been prepared in {data_dir}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{path} is not a valid tokenizer file: {err}") from err


def load_token_bytes(data_dir: Path) -> np.ndarray:
    """UTF-8 byte length of every token id (int64 [vocab_size]) of a prepared directory."""
    path = Path(data_dir) / "token_bytes.npy"
    vocab_size = load_meta(data_dir)["vocab_size"]
    try:
        lengths = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is missing or corrupt: {err}") from err
    if lengths.shape != (vocab_size,):
        raise DataError(f"{path} has shape {lengths.shape}, expected ({vocab_size},)")
    return lengths
