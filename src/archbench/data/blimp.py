"""BLiMP's files: the sha256 of every paradigm, and the check of a data mirror's copies.

Kept apart from the lm-eval task code (which imports `datasets`) so that the workflow can check a
mirror's BLiMP before any job runs, as it does for the text data sets.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path, PurePosixPath

from archbench.errors import DataError

BLIMP_CHECKSUMS = "blimp.sha256"


def blimp_checksums() -> dict[str, str]:
    """sha256 of every BLiMP paradigm file, by paradigm name (`archbench/embedded/blimp.sha256`)."""
    text = (resources.files("archbench") / "embedded" / BLIMP_CHECKSUMS).read_text("utf-8")
    sums = {}
    for line in text.splitlines():
        digest, path = line.split()
        sums[PurePosixPath(path).stem] = digest
    return sums


def read_mirror_blimp(paradigm: str, mirror: Path) -> tuple[bytes, str]:
    """The bytes of `mirror`/blimp/<paradigm>.jsonl and its path; DataError if it is missing."""
    path = Path(mirror) / "blimp" / f"{paradigm}.jsonl"
    if not path.is_file():
        raise DataError(f"BLiMP paradigm {paradigm}: {path} not found in the data mirror")
    return path.read_bytes(), str(path)


def check_blimp_digest(paradigm: str, raw: bytes, where: str, expected: str) -> None:
    """DataError unless `raw` (read from `where`) has the paradigm's sha256."""
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected:
        raise DataError(
            f"sha256 mismatch for BLiMP paradigm {paradigm} ({where}): "
            f"expected {expected}, got {digest}"
        )


def check_blimp_mirror(mirror: Path) -> None:
    """Every BLiMP paradigm is in `mirror`/blimp with its sha256 (a DataError names the first
    that is not), so a mirror without BLiMP stops the workflow before training, not after."""
    for paradigm, expected in blimp_checksums().items():
        raw, where = read_mirror_blimp(paradigm, mirror)
        check_blimp_digest(paradigm, raw, where, expected)
