"""Data-set config entries and finding a data set's raw text, with its sha256 always checked.

Where the text comes from (`load_text`):

1. a data mirror directory, if one is set: only ``MIRROR/<path>``, never the network;
2. else the gzip copy embedded in the package (``archbench/embedded/<embedded>``), if any;
3. else the download cache (``CACHE/<path>``), if the file there has the right checksum;
4. else ``url`` is downloaded into the cache (written atomically, only once verified).
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from archbench.data.synthetic import SyntheticSpec, parse_synthetic
from archbench.data.tokenizers import TOKENIZER_KINDS, check_vocab_size
from archbench.errors import ConfigError, DataError
from archbench.io import atomic_path
from archbench.options import number_from_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MIRROR_ENV = "ARCHBENCH_DATA_MIRROR"
CACHE_ENV = "ARCHBENCH_CACHE"
DOWNLOAD_TIMEOUT_S = 60

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_URL_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: where its raw text lives, its checksum and how to tokenize it."""

    name: str
    path: str  # relative path inside a mirror or cache dir, e.g. "tinyshakespeare/input.txt"
    sha256: str  # of the raw file bytes, 64 lowercase hex digits
    url: str | None = None  # http(s) or file:// download URL; None = not downloadable
    embedded: str | None = None  # gzip file name under archbench/embedded/, or None
    tokenizer: str = "char"  # "char" | "bpe"
    vocab_size: int | None = None  # bpe: required; char: optional cap on the total (>= 256)
    val_fraction: float = 0.1  # last fraction of the characters held out for validation

    def entry(self) -> dict[str, Any]:
        """The config entry that parses back to this spec (for `archbench prepare`)."""
        return {key: value for key, value in vars(self).items() if key != "name"}

    def content(self) -> dict[str, Any]:
        """The fields that decide the prepared data: the text's checksum and its tokenization
        (not where the verified bytes come from: url, path, embedded copy, mirror)."""
        return {key: getattr(self, key) for key in CONTENT_KEYS}


_KEYS = tuple(f.name for f in fields(DatasetSpec) if f.name != "name")
CONTENT_KEYS = ("sha256", "tokenizer", "vocab_size", "val_fraction")
_REQUIRED = ("path", "sha256")
_SYNTHETIC = "synthetic"  # the key that makes an entry a generated task (archbench.data.synthetic)


# --- config parsing ---------------------------------------------------------------------------


def parse_datasets(
    mapping: dict, source: str = "configs/config.yaml"
) -> dict[str, DatasetSpec | SyntheticSpec]:
    """Turn the config's `datasets:` section into specs (text, or synthetic when an entry has a
    `synthetic:` key); any problem raises ConfigError."""
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"{source}: datasets must be a mapping of name -> entry, got {type(mapping).__name__}"
        )
    return {name: _parse_entry(name, entry, source) for name, entry in mapping.items()}


def _parse_entry(name: Any, entry: Any, source: str) -> DatasetSpec | SyntheticSpec:
    """Validate one `datasets.<name>` entry."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{source}: data set name {name!r} must start with a letter or digit and contain "
            "only letters, digits, '_', '.' and '-'"
        )
    where = f"{source}: datasets.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{where}: expected a mapping with keys {', '.join(_KEYS)}, got {type(entry).__name__}"
        )
    if _SYNTHETIC in entry:
        return parse_synthetic(name, entry, where)
    for key in entry:
        if key not in _KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggestion(str(key))}")
    for key in _REQUIRED:
        if key not in entry:
            raise ConfigError(f"{where}: missing required key {key!r}")
    values = {
        key: _check_key(where, key, entry[key], check)
        for key, check in _CHECKS.items()
        if key in entry
    }
    kind = values.get("tokenizer", "char")
    vocab_check = partial(_vocab_size, kind)
    values["vocab_size"] = _check_key(where, "vocab_size", entry.get("vocab_size"), vocab_check)
    return DatasetSpec(name=name, **values)


def _suggestion(key: str) -> str:
    """' (did you mean X?)' for the closest valid key, or ''."""
    close = difflib.get_close_matches(key, (*_KEYS, _SYNTHETIC), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_key(where: str, key: str, value: Any, check: Callable[[Any], Any]) -> Any:
    """Run `check` on the value of `key`, turning its ConfigError into one naming entry and key."""
    try:
        return check(value)
    except ConfigError as err:
        raise ConfigError(f"{where}.{key}: {err}") from None


def _string(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"expected a non-empty string, got {value!r}")
    return value


def _path(value: Any) -> str:
    """A relative path that stays inside the mirror/cache directory."""
    path = PurePosixPath(_string(value))
    if path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ConfigError(f"must be a relative path inside the data mirror, got {value!r}")
    return value


def _sha256(value: Any) -> str:
    """64 hex digits, returned in lower case."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
        raise ConfigError(f"must be 64 hexadecimal characters, got {value!r}")
    return value.lower()


def _url(value: Any) -> str | None:
    """None or an http(s):// or file:// URL."""
    if value is None:
        return None
    scheme = urllib.parse.urlsplit(_string(value)).scheme
    if scheme not in _URL_SCHEMES:
        raise ConfigError(f"must be an http://, https:// or file:// URL, got {value!r}")
    return value


def _embedded(value: Any) -> str | None:
    """None or the name of a file shipped in archbench/embedded/."""
    if value is None:
        return None
    if "/" in _string(value) or "\\" in value or not _embedded_file(value).is_file():
        raise ConfigError(f"no embedded file {value!r} in the archbench package")
    return value


def _tokenizer(value: Any) -> str:
    """One of TOKENIZER_KINDS."""
    if value not in TOKENIZER_KINDS:
        raise ConfigError(f"must be one of {', '.join(TOKENIZER_KINDS)}, got {value!r}")
    return value


def _vocab_size(kind: str, value: Any) -> int | None:
    """None (char only) or an integer >= 256."""
    value = number_from_text(value, int)
    check_vocab_size(kind, value)
    return value


def _val_fraction(value: Any) -> float:
    """A number strictly between 0 and 1."""
    value = number_from_text(value, float)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


# vocab_size is checked after these, once the tokenizer kind is known.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "path": _path,
    "sha256": _sha256,
    "url": _url,
    "embedded": _embedded,
    "tokenizer": _tokenizer,
    "val_fraction": _val_fraction,
}


# --- locating the text ------------------------------------------------------------------------


def resolve_mirror(value: str | None) -> Path | None:
    """The data mirror directory: `value` (config data_mirror) if set, else $ARCHBENCH_DATA_MIRROR.

    Both unset or empty means no mirror (None). A mirror that is not a directory is a DataError.
    """
    origin = "data_mirror" if value else MIRROR_ENV
    chosen = str(value or os.environ.get(MIRROR_ENV, ""))
    if not chosen.strip():
        return None
    mirror = Path(chosen).expanduser().resolve()
    if not mirror.is_dir():
        raise DataError(f"data mirror {mirror} (from {origin}) is not an existing directory")
    return mirror


def default_cache_dir() -> Path:
    """Download cache: $ARCHBENCH_CACHE if set, else ~/.cache/archbench."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "archbench").expanduser()


def load_text(spec: DatasetSpec, mirror: Path | None = None, cache_dir: Path | None = None) -> str:
    """The data set's text, from the mirror, embedded copy, cache or URL (see module doc).

    Raises DataError if the file is missing, empty, fails its sha256 check or is not UTF-8.
    """
    if mirror is not None:
        where = Path(mirror) / spec.path
        raw = _read_mirror_file(spec, where)
    elif spec.embedded is not None:
        where = f"embedded copy archbench/embedded/{spec.embedded}"
        raw = _read_embedded(spec)
    else:
        where = Path(cache_dir if cache_dir is not None else default_cache_dir()) / spec.path
        raw = _read_cached(spec, where)
        if raw is None:
            raw = _download(spec, where)
    _verify(spec, raw, where)
    return _decode(spec, raw, where)


def check_local_copy(spec: DatasetSpec | SyntheticSpec, mirror: Path | None = None) -> bool:
    """Verify the mirror or embedded copy that `load_text` would read, without any network.

    Raises the same DataError as `load_text` (missing, empty, sha256 mismatch, not UTF-8), so a
    bad data file stops a workflow before any job starts. Returns False (nothing checked) when
    the text would come from the download cache or the network, or the data set is synthetic
    (generated, nothing to read).
    """
    if isinstance(spec, SyntheticSpec) or (mirror is None and spec.embedded is None):
        return False
    load_text(spec, mirror)
    return True


def _read_mirror_file(spec: DatasetSpec, path: Path) -> bytes:
    """Bytes of the mirror copy; a missing file is a DataError naming the full path."""
    if not path.is_file():
        raise DataError(f"data set {spec.name}: {path} not found in the data mirror")
    return path.read_bytes()


def _embedded_file(name: str) -> Traversable:
    """The packaged file archbench/embedded/<name>."""
    return resources.files("archbench") / "embedded" / name


def _read_embedded(spec: DatasetSpec) -> bytes:
    """Uncompressed bytes of the data set's embedded gzip copy."""
    resource = _embedded_file(spec.embedded)
    if not resource.is_file():
        raise DataError(f"data set {spec.name}: embedded copy {spec.embedded} is missing")
    try:
        return gzip.decompress(resource.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"data set {spec.name}: embedded copy {spec.embedded} is corrupt: {err}"
        ) from err


def _read_cached(spec: DatasetSpec, path: Path) -> bytes | None:
    """Bytes of the cached copy if present with the right checksum, else None."""
    if not path.is_file():
        return None
    raw = path.read_bytes()
    return raw if hashlib.sha256(raw).hexdigest() == spec.sha256 else None


def _download(spec: DatasetSpec, path: Path) -> bytes:
    """Fetch spec.url, verify it and only then store it at `path` (atomically)."""
    if spec.url is None:
        cached = (
            f"its cached copy {path} does not match its sha256 (delete it)"
            if path.is_file()
            else f"it is not in the cache ({path})"
        )
        raise DataError(
            f"data set {spec.name} is not available: no data mirror is set (data_mirror=DIR or "
            f"{MIRROR_ENV}), it has no embedded copy, {cached} and it has no url"
        )
    try:
        with urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            raw = response.read()
    # URLError and HTTPError are OSErrors; a body cut short is http.client.IncompleteRead
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise DataError(f"could not download data set {spec.name} from {spec.url}: {err}") from err
    _verify(spec, raw, spec.url)
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
    return raw


def _verify(spec: DatasetSpec, raw: bytes, where: object) -> None:
    """DataError unless `raw` is non-empty and has the spec's sha256."""
    if not raw:
        raise DataError(f"data set {spec.name} ({where}) is empty")
    actual = hashlib.sha256(raw).hexdigest()
    if actual != spec.sha256:
        raise DataError(
            f"sha256 mismatch for data set {spec.name} ({where}): "
            f"expected {spec.sha256}, got {actual}"
        )


def _decode(spec: DatasetSpec, raw: bytes, where: object) -> str:
    """`raw` as UTF-8; invalid bytes are a DataError naming the byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"data set {spec.name} ({where}) is not valid UTF-8: {err.reason} "
            f"at byte offset {err.start}"
        ) from None
