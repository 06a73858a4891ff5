"""Lossless tokenizers built on the HF `tokenizers` library and saved as tokenizer.json.

Two kinds:

- ``char``: one token per distinct character of the training text (ids 0..n-1, characters in
  code-point order), followed by 256 byte-fallback tokens ``<0x00>``..``<0xFF>``. A character
  that is not in the vocabulary is encoded as the bytes of its UTF-8 form, so any text round-trips.
- ``bpe``: byte-level BPE (GPT-2 style byte alphabet, no prefix space), trained on the text.

Both vocabularies contain all 256 bytes, so the smallest valid ``vocab_size`` is 256.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from numpy.typing import ArrayLike
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from archbench.errors import ConfigError

TOKENIZER_KINDS = ("char", "bpe")
MIN_VOCAB_SIZE = 256
MAX_VOCAB_SIZE = 2**32  # token ids must fit in uint32

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def check_vocab_size(kind: str, vocab_size: object) -> None:
    """Raise ConfigError (message without context) unless `vocab_size` suits tokenizer `kind`."""
    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
    if vocab_size is None:
        if kind == "bpe":
            raise ConfigError("vocab_size is required for the bpe tokenizer")
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size must be between {MIN_VOCAB_SIZE} (the 256 byte tokens) and "
            f"{MAX_VOCAB_SIZE}, got {vocab_size}"
        )


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Build a `kind` ("char" or "bpe") tokenizer from `text`; deterministic for equal inputs."""
    check_vocab_size(kind, vocab_size)
    if kind == "char":
        return _char_tokenizer(text, vocab_size)
    return _bpe_tokenizer(text, vocab_size)


def _char_tokenizer(text: str, vocab_size: int | None) -> Tokenizer:
    """Characters of `text` (the most frequent ones if capped) plus 256 byte-fallback tokens."""
    counts = Counter(text)
    chars = sorted(counts)
    if vocab_size is not None and len(chars) > vocab_size - 256:
        by_frequency = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        chars = sorted(char for char, _ in by_frequency[: vocab_size - 256])
    vocab = {char: i for i, char in enumerate(chars)}
    vocab.update({f"<0x{byte:02X}>": len(chars) + byte for byte in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on `text` with at most `vocab_size` tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """Number of UTF-8 bytes each token id decodes to, as int64 [vocab_size].

    Summed over the ids of an encoded text this gives the text's UTF-8 length, which turns a
    per-token loss into bits per byte. Not so for the synthetic tasks' word-level tokenizer:
    decoding puts a space between its symbols, which no token counts (bits per byte is not
    computed for synthetic tasks).
    """
    vocab = tok.get_vocab()
    lengths = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    for token, idx in vocab.items():
        lengths[idx] = _token_bytes(token, byte_level)
    return lengths


def _token_bytes(token: str, byte_level: bool) -> int:
    """UTF-8 length of one token: byte-level symbols and byte-fallback tokens are one byte."""
    if byte_level:
        return len(token)
    if _BYTE_TOKEN.fullmatch(token):
        return 1
    return len(token.encode("utf-8"))


def encode(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` as an int64 array."""
    return np.asarray(tok.encode(text).ids, dtype=np.int64)


def decode(tok: Tokenizer, ids: ArrayLike) -> str:
    """Text of a token id sequence (list or array); the exact inverse of `encode`."""
    return tok.decode(np.asarray(ids, dtype=np.int64).tolist(), skip_special_tokens=False)
