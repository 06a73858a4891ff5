"""Tests for archbench.data: config entries, verified loading, tokenizers and prepared files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from archbench.data import (
    DatasetSpec,
    decode,
    default_cache_dir,
    encode,
    load_meta,
    load_text,
    load_token_bytes,
    load_tokenizer,
    load_tokens,
    parse_datasets,
    prepare_dataset,
    resolve_mirror,
    sources,
    split_text,
    token_byte_lengths,
    token_dtype,
    train_tokenizer,
)
from archbench.errors import ConfigError, DataError

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_CHARS = 1_115_394
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind\n" * 8
SMALL_TEXT = TRAIN_TEXT * 4 + "Ünïcødé only in val: 😀 𝔘 Ω\n"
PREPARED_FILES = ("train.bin", "val.bin", "tokenizer.json", "token_bytes.npy", "meta.json")


def sha256(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def spec_for(data: bytes, path: str = "small/input.txt", **kwargs: object) -> DatasetSpec:
    """A spec whose checksum matches `data`."""
    return DatasetSpec(name="small", path=path, sha256=sha256(data), **kwargs)


def write_mirror(root: Path, data: bytes, path: str = "small/input.txt") -> Path:
    """Create a mirror directory under `root` holding `data` at `path`."""
    target = root / "mirror" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return root / "mirror"


@functools.cache
def trained(kind: str, vocab_size: int | None):
    """Tokenizer of `kind` trained on TRAIN_TEXT (cached across hypothesis examples)."""
    return train_tokenizer(kind, TRAIN_TEXT, vocab_size)


# --- tokenizers -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "vocab_size"), [("char", None), ("char", 260), ("bpe", 300)])
@settings(deadline=None, max_examples=150)
@given(text=st.text())
@example(text="")
@example(text="😀 emoji, 𝔘 astral, \x00 nul, new\nline\r\n  spaces  ")
@example(text="<0x41> looks like a byte token")
def test_round_trip_is_lossless(kind: str, vocab_size: int | None, text: str) -> None:
    tok = trained(kind, vocab_size)
    ids = encode(tok, text)
    assert decode(tok, ids) == text
    assert int(token_byte_lengths(tok)[ids].sum()) == len(text.encode("utf-8"))


def test_char_vocab_is_sorted_characters_then_bytes() -> None:
    tok = train_tokenizer("char", "hello")
    assert tok.get_vocab_size() == 4 + 256
    assert encode(tok, "ehlo").tolist() == [0, 1, 2, 3]
    assert token_byte_lengths(tok).tolist() == [1] * 260
    assert encode(tok, "é").tolist() == [4 + 0xC3, 4 + 0xA9]  # byte fallback


def test_char_vocab_size_keeps_most_frequent_characters() -> None:
    tok = train_tokenizer("char", "cbbaaa", vocab_size=258)
    assert tok.get_vocab_size() == 258
    assert encode(tok, "ab").tolist() == [0, 1]
    assert len(encode(tok, "c")) == 1 and encode(tok, "c")[0] >= 2  # "c" is now a byte token
    tie = train_tokenizer("char", "ba", vocab_size=257)
    assert encode(tie, "a").tolist() == [0]  # ties go to the smaller code point


def test_bpe_respects_vocab_size_and_is_deterministic() -> None:
    first = train_tokenizer("bpe", SMALL_TEXT, vocab_size=300)
    second = train_tokenizer("bpe", SMALL_TEXT, vocab_size=300)
    assert first.get_vocab_size() <= 300
    assert first.to_str() == second.to_str()
    assert len(encode(first, SMALL_TEXT)) < len(SMALL_TEXT.encode("utf-8"))


@pytest.mark.parametrize(
    ("kind", "vocab_size"), [("word", None), ("bpe", None), ("char", 100), ("bpe", True)]
)
def test_bad_tokenizer_settings_are_config_errors(kind: str, vocab_size: object) -> None:
    with pytest.raises(ConfigError):
        train_tokenizer(kind, "text", vocab_size)


def test_char_encoding_of_tiny_shakespeare_is_fast(tmp_path: Path) -> None:
    spec = DatasetSpec(
        name="tinyshakespeare",
        path="tinyshakespeare/input.txt",
        sha256=TINY_SHAKESPEARE_SHA256,
        embedded="tinyshakespeare.txt.gz",
    )
    text = load_text(spec, cache_dir=tmp_path)
    tok = train_tokenizer("char", text)
    start = time.perf_counter()
    ids = encode(tok, text)
    assert time.perf_counter() - start < 5.0
    assert len(ids) == TINY_SHAKESPEARE_CHARS
    assert tok.get_vocab_size() == 65 + 256


# --- loading raw text -------------------------------------------------------------------------


def test_mirror_in_tmp_path(tmp_path: Path) -> None:
    data = SMALL_TEXT.encode("utf-8")
    mirror = write_mirror(tmp_path, data)
    assert load_text(spec_for(data), mirror=mirror) == SMALL_TEXT


def test_mirror_is_the_only_source_when_set(tmp_path: Path) -> None:
    spec = DatasetSpec(
        name="tinyshakespeare",
        path="tinyshakespeare/input.txt",
        sha256=TINY_SHAKESPEARE_SHA256,
        embedded="tinyshakespeare.txt.gz",
    )
    (tmp_path / "mirror").mkdir()
    with pytest.raises(DataError, match="not found") as info:
        load_text(spec, mirror=tmp_path / "mirror")
    assert str(tmp_path / "mirror" / "tinyshakespeare" / "input.txt") in str(info.value)


def test_checksum_mismatch_in_mirror_is_refused(tmp_path: Path) -> None:
    data = SMALL_TEXT.encode("utf-8")
    mirror = write_mirror(tmp_path, data + b"tampered")
    with pytest.raises(DataError, match="sha256 mismatch for data set small"):
        load_text(spec_for(data), mirror=mirror)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data mirror not present")
def test_shared_mirror_tiny_shakespeare() -> None:
    spec = DatasetSpec(
        name="tinyshakespeare", path="tinyshakespeare/input.txt", sha256=TINY_SHAKESPEARE_SHA256
    )
    assert len(load_text(spec, mirror=SHARED_DATA)) == TINY_SHAKESPEARE_CHARS


def test_embedded_copy_matches_tiny_shakespeare(tmp_path: Path) -> None:
    spec = DatasetSpec(
        name="tinyshakespeare",
        path="tinyshakespeare/input.txt",
        sha256=TINY_SHAKESPEARE_SHA256,
        embedded="tinyshakespeare.txt.gz",
    )
    text = load_text(spec, cache_dir=tmp_path)
    assert sha256(text.encode("utf-8")) == TINY_SHAKESPEARE_SHA256
    assert list(tmp_path.iterdir()) == []  # the embedded copy is not cached
    shared = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if shared.is_file():
        assert text == shared.read_text(encoding="utf-8")


def test_a_mirror_or_embedded_copy_never_touches_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec with a url too: the local copy is read, the url never opened."""

    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was used")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    data = SMALL_TEXT.encode("utf-8")
    url = "https://example.invalid/input.txt"
    assert load_text(spec_for(data, url=url), mirror=write_mirror(tmp_path, data)) == SMALL_TEXT
    embedded = DatasetSpec(
        name="tinyshakespeare",
        path="tinyshakespeare/input.txt",
        sha256=TINY_SHAKESPEARE_SHA256,
        embedded="tinyshakespeare.txt.gz",
        url=url,
    )
    assert len(load_text(embedded, cache_dir=tmp_path / "cache")) == TINY_SHAKESPEARE_CHARS


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (gzip.compress(b"other text\n"), "sha256 mismatch for data set small"),
        (gzip.compress(SMALL_TEXT.encode("utf-8"))[:-12], "embedded copy small.gz is corrupt"),
        (b"not gzip at all", "embedded copy small.gz is corrupt"),
    ],
)
def test_a_bad_embedded_copy_is_a_data_error(
    contents: bytes, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "small.gz").write_bytes(contents)
    monkeypatch.setattr(sources, "_embedded_file", lambda name: tmp_path / name)
    spec = spec_for(SMALL_TEXT.encode("utf-8"), embedded="small.gz")
    with pytest.raises(DataError, match=message):
        load_text(spec)


def test_download_from_file_url_is_cached_and_verified(tmp_path: Path) -> None:
    data = SMALL_TEXT.encode("utf-8")
    remote = tmp_path / "remote" / "input.txt"
    remote.parent.mkdir()
    remote.write_bytes(data)
    spec = spec_for(data, url=remote.as_uri())
    cache = tmp_path / "cache"
    assert load_text(spec, cache_dir=cache) == SMALL_TEXT
    assert (cache / spec.path).read_bytes() == data
    remote.unlink()  # the second load must come from the cache
    assert load_text(spec, cache_dir=cache) == SMALL_TEXT


def test_download_with_wrong_contents_is_refused_and_not_cached(tmp_path: Path) -> None:
    remote = tmp_path / "remote.txt"
    remote.write_bytes(b"not the expected text")
    spec = spec_for(b"the expected text", url=remote.as_uri())
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_text(spec, cache_dir=cache)
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.parametrize("cached_bytes", [None, b"garbage"])
def test_without_a_url_the_error_says_what_the_cache_holds(
    tmp_path: Path, cached_bytes: bytes | None
) -> None:
    spec = spec_for(SMALL_TEXT.encode("utf-8"))
    cached = tmp_path / "cache" / spec.path
    if cached_bytes is not None:
        cached.parent.mkdir(parents=True)
        cached.write_bytes(cached_bytes)
    expected = "does not match its sha256 (delete it)" if cached_bytes else "is not in the cache"
    with pytest.raises(DataError, match=rf"{re.escape(expected)}.* and it has no url"):
        load_text(spec, cache_dir=tmp_path / "cache")


def test_corrupt_cached_file_is_downloaded_again(tmp_path: Path) -> None:
    data = SMALL_TEXT.encode("utf-8")
    remote = tmp_path / "remote.txt"
    remote.write_bytes(data)
    spec = spec_for(data, url=remote.as_uri())
    cached = tmp_path / "cache" / spec.path
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"garbage")
    assert load_text(spec, cache_dir=tmp_path / "cache") == SMALL_TEXT
    assert cached.read_bytes() == data


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1,000 bytes and sends 5, as a connection cut mid-download does."""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        """Quiet."""


def test_a_download_cut_short_is_a_data_error(tmp_path: Path) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _TruncatingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/input.txt"
        with pytest.raises(DataError, match="could not download .*IncompleteRead"):
            load_text(spec_for(b"x", url=url), cache_dir=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing cached


def test_unavailable_and_failed_downloads_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not available"):
        load_text(spec_for(b"x"), cache_dir=tmp_path)
    missing = spec_for(b"x", url=(tmp_path / "missing.txt").as_uri())
    with pytest.raises(DataError, match="could not download"):
        load_text(missing, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "is empty"), (b"abc\xff\xfedef", "not valid UTF-8.*byte offset 3")],
)
def test_empty_and_non_utf8_files_are_data_errors(
    tmp_path: Path, data: bytes, message: str
) -> None:
    mirror = write_mirror(tmp_path, data)
    with pytest.raises(DataError, match=message):
        load_text(spec_for(data), mirror=mirror)


def test_resolve_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = tmp_path / "env"
    from_env.mkdir()
    monkeypatch.delenv("ARCHBENCH_DATA_MIRROR", raising=False)
    assert resolve_mirror(None) is None
    assert resolve_mirror("") is None
    monkeypatch.setenv("ARCHBENCH_DATA_MIRROR", str(from_env))
    assert resolve_mirror(None) == from_env.resolve()
    assert resolve_mirror(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(DataError, match="not an existing directory"):
        resolve_mirror(str(tmp_path / "nope"))


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ARCHBENCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "archbench"


# --- config entries ---------------------------------------------------------------------------

VALID_ENTRY = {"path": "small/input.txt", "sha256": "AB" * 32}


def test_parse_datasets_accepts_valid_entries() -> None:
    specs = parse_datasets(
        {
            "small": VALID_ENTRY,
            "shakespeare-bpe": {
                "path": "tinyshakespeare/input.txt",
                "sha256": TINY_SHAKESPEARE_SHA256,
                "url": "https://example.org/input.txt",
                "embedded": "tinyshakespeare.txt.gz",
                "tokenizer": "bpe",
                "vocab_size": 512,
                "val_fraction": 0.05,
            },
        }
    )
    assert specs["small"] == DatasetSpec(name="small", path="small/input.txt", sha256="ab" * 32)
    assert specs["shakespeare-bpe"].tokenizer == "bpe"
    assert specs["shakespeare-bpe"].vocab_size == 512


def test_numbers_given_as_text_parse_as_numbers() -> None:
    """`snakemake --config 'datasets={...}'` passes a data set's nested values as strings."""
    specs = parse_datasets(
        {
            "text": {**VALID_ENTRY, "tokenizer": "bpe", "vocab_size": "512", "val_fraction": "0.2"},
            "task": {"synthetic": "mqar", "seed": "3", "n_pairs": "4"},
        }
    )
    assert (specs["text"].vocab_size, specs["text"].val_fraction) == (512, 0.2)
    assert specs["task"].seed == 3
    with pytest.raises(ConfigError, match="val_fraction: must be a number strictly between"):
        parse_datasets({"text": {**VALID_ENTRY, "val_fraction": "a fifth"}})


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"sha265": "ab" * 32}, "unknown key 'sha265' (did you mean 'sha256'?)"),
        ({"path": None}, "datasets.small.path"),
        ({"path": "/etc/passwd"}, "datasets.small.path"),
        ({"path": "../outside.txt"}, "datasets.small.path"),
        ({"sha256": "abc"}, "datasets.small.sha256"),
        ({"sha256": 123}, "datasets.small.sha256"),
        ({"url": "ftp://example.org/x"}, "datasets.small.url"),
        ({"embedded": "missing.txt.gz"}, "datasets.small.embedded"),
        ({"tokenizer": "word"}, "datasets.small.tokenizer"),
        ({"tokenizer": "bpe"}, "datasets.small.vocab_size"),
        ({"vocab_size": "three hundred"}, "datasets.small.vocab_size"),
        ({"vocab_size": 100}, "datasets.small.vocab_size"),
        ({"val_fraction": 0}, "datasets.small.val_fraction"),
        ({"val_fraction": 1.0}, "datasets.small.val_fraction"),
        ({"val_fraction": "a tenth"}, "datasets.small.val_fraction"),
        ({"val_fraction": True}, "datasets.small.val_fraction"),
    ],
)
def test_bad_entries_are_config_errors_naming_the_key(change: dict, needle: str) -> None:
    entry = {**VALID_ENTRY, **change}
    with pytest.raises(ConfigError) as info:
        parse_datasets({"small": entry}, source="test.yaml")
    assert str(info.value).startswith("test.yaml: ")
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("mapping", "needle"),
    [
        ({"small": {"sha256": "ab" * 32}}, "missing required key 'path'"),
        ({"small": ["not", "a", "mapping"]}, "datasets.small: expected a mapping"),
        ({"bad name": VALID_ENTRY}, "data set name 'bad name'"),
        (["small"], "datasets must be a mapping"),
    ],
)
def test_bad_sections_are_config_errors(mapping: object, needle: str) -> None:
    with pytest.raises(ConfigError, match="test.yaml") as info:
        parse_datasets(mapping, source="test.yaml")
    assert needle in str(info.value)


# --- prepared data ----------------------------------------------------------------------------


def prepare_small(root: Path, out: str, **kwargs: object) -> dict:
    """Prepare SMALL_TEXT (val_fraction 0.25) from a mirror under `root` into root/out."""
    data = SMALL_TEXT.encode("utf-8")
    spec = spec_for(data, val_fraction=0.25, **kwargs)
    return prepare_dataset(spec, root / out, mirror=write_mirror(root, data))


@pytest.mark.parametrize(("kind", "vocab_size"), [("char", None), ("bpe", 300)])
def test_prepare_dataset(tmp_path: Path, kind: str, vocab_size: int | None) -> None:
    meta = prepare_small(tmp_path, "a", tokenizer=kind, vocab_size=vocab_size)
    assert prepare_small(tmp_path, "b", tokenizer=kind, vocab_size=vocab_size) == meta
    for name in PREPARED_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(PREPARED_FILES)

    train_text, val_text = split_text(SMALL_TEXT, 0.25)
    assert train_text + val_text == SMALL_TEXT
    assert len(val_text) == round(len(SMALL_TEXT) * 0.25)
    assert load_meta(tmp_path / "a") == meta
    assert meta["dtype"] == "uint16"
    assert meta["tokenizer"] == kind

    tok = load_tokenizer(tmp_path / "a")
    token_bytes = load_token_bytes(tmp_path / "a")
    assert token_byte_lengths(tok).tolist() == token_bytes.tolist()
    for split, text in (("train", train_text), ("val", val_text)):
        ids = load_tokens(tmp_path / "a", split)
        assert ids.dtype == np.uint16 and not ids.flags.writeable
        assert len(ids) == meta[f"n_{split}_tokens"]
        assert decode(tok, ids) == text
        assert meta[f"{split}_bytes"] == int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_tokenizer_is_trained_on_train_split_only(tmp_path: Path) -> None:
    prepare_small(tmp_path, "out")
    vocab = load_tokenizer(tmp_path / "out").get_vocab()
    assert "T" in vocab and "😀" not in vocab  # "😀" only occurs in the validation split


def test_large_vocabulary_uses_uint32(tmp_path: Path) -> None:
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    text = "".join(map(chr, range(0x10000, 0x10000 + 65_400))) * 2
    data = text.encode("utf-8")
    spec = spec_for(data, val_fraction=0.5)
    meta = prepare_dataset(spec, tmp_path / "out", mirror=write_mirror(tmp_path, data))
    assert meta["vocab_size"] == 65_400 + 256 and meta["dtype"] == "uint32"
    assert load_tokens(tmp_path / "out", "val").dtype == np.uint32


def test_truncated_tokens_are_detected(tmp_path: Path) -> None:
    prepare_small(tmp_path, "out")
    path = tmp_path / "out" / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_tokens(tmp_path / "out", "train")
    with pytest.raises(ConfigError, match="unknown split"):
        load_tokens(tmp_path / "out", "test")


def test_failed_prepare_leaves_no_meta(tmp_path: Path) -> None:
    prepare_small(tmp_path, "out")
    bad = DatasetSpec(name="small", path="small/input.txt", sha256="0" * 64)
    with pytest.raises(DataError, match="sha256 mismatch"):
        prepare_dataset(bad, tmp_path / "out", mirror=tmp_path / "mirror")
    with pytest.raises(DataError, match="not been prepared"):
        load_meta(tmp_path / "out")


def test_text_too_short_to_split() -> None:
    with pytest.raises(DataError, match="too short"):
        split_text("abc", 0.1)
