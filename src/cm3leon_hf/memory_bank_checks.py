"""Is a memory bank the one that was built? The checks `Cm3LeonMemoryBank.load` runs before it trusts a directory.

A bank's manifest records the size and sha256 of every file, a hash of a sample of its rows and a probe search of its
index (`memory_bank_index.index_matches_rows`). Loading compares them: sizes always, contents for banks up to
`FULL_CHECK_BYTES` (or with `verify=True`), then the index against the rows. A manifest may name only files inside
the bank's own directory (`bank_file`).
"""

import hashlib
from pathlib import Path

import numpy as np
from datasets import Dataset

from .memory_bank_encoding import CONTENT_HASH_COLUMN, EMBEDDING_COLUMN, SOURCE_INDEX_COLUMN
from .memory_bank_index import index_matches_rows, probe_rows

FULL_CHECK_BYTES = 1 << 30  # banks up to 1 GiB are hashed whole at every load; larger ones with `verify=True`


def bank_file(directory: Path, name) -> Path:
    """`directory / name` for a file name read from a manifest, refused unless it names a file directly inside the
    bank: a manifest must not make the bank read or delete files elsewhere (`"../other/index.faiss"`, `"/etc/x"`)."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"Memory bank {directory}: its manifest names the file {name!r}, which is not a file of the "
                         f"bank's own directory. Refusing to use it.")
    return directory / name


def file_digests(directory: Path, names: list[str]) -> dict:
    """Size and sha256 of each file (relative names), streamed in 1 MiB blocks."""
    digests = {}
    for name in names:
        digest = hashlib.sha256()
        with open(directory / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[name] = {"size": (directory / name).stat().st_size, "sha256": digest.hexdigest()}
    return digests


def check_files(directory: Path, recorded: dict, verify: bool | None) -> list[str]:
    """What differs from the files the bank was built with: sizes always; contents (sha256) when `verify`, or when
    `verify` is None and the bank is at most `FULL_CHECK_BYTES`."""
    problems = []
    for name, expected in recorded.items():
        path = directory / name
        if Path(name).is_absolute() or not path.resolve().is_relative_to(directory.resolve()):
            problems.append(f"{name} is outside the bank")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {expected['size']}")
    if problems:
        return problems
    if verify or (verify is None and sum(e["size"] for e in recorded.values()) <= FULL_CHECK_BYTES):
        actual = file_digests(directory, list(recorded))
        problems += [f"{name} differs from the file it was built with (sha256)" for name in recorded
                     if actual[name]["sha256"] != recorded[name]["sha256"]]
    return problems


def rows_hash(rows: Dataset) -> str:
    """sha256 of the row count, the column names and up to 256 evenly spaced rows (ids, content hash, embedding)."""
    digest = hashlib.sha256(f"{len(rows)}|{','.join(rows.column_names)}".encode())
    sample = probe_rows(len(rows), count=256)
    view = rows.with_format("numpy", columns=[SOURCE_INDEX_COLUMN, EMBEDDING_COLUMN])[sample]
    digest.update(np.asarray(view[SOURCE_INDEX_COLUMN], dtype=np.int64).tobytes())
    digest.update(np.asarray(view[EMBEDDING_COLUMN], dtype=np.float32).tobytes())
    digest.update("".join(rows.select(sample)[CONTENT_HASH_COLUMN]).encode())
    return digest.hexdigest()


def consistency_problems(rows: Dataset, index, manifest: dict) -> list[str]:
    """How `rows`, `index` and `manifest` disagree (empty when they agree): sizes, dimension, the rows hash, and the
    probe search (which also sets the manifest's search parameters on `index`)."""
    problems = []
    if len(rows) == 0:
        problems.append("the bank has no rows")
    if not (index.ntotal == len(rows) == manifest["num_rows"] == manifest["ntotal"]):
        problems.append(f"index size {index.ntotal}, rows {len(rows)}, manifest {manifest['num_rows']}")
    if index.d != manifest["encoder"]["dim"]:
        problems.append(f"index dimension {index.d} != manifest dimension {manifest['encoder']['dim']}")
    if not problems and rows_hash(rows) != manifest["rows_hash"]:
        problems.append("the rows are not those the index was built from (rows hash differs)")
    if not problems and not index_matches_rows(index, rows, manifest):
        problems.append("the index is not the one built from these rows (probe search differs)")
    return problems
