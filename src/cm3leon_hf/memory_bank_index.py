"""The memory bank's faiss index: which index for a bank's size, building it from the stored embeddings, writing it
atomically, and the probe search that ties an index to the rows it was built from (`memory_bank.py` stores both).

The index is an inner-product index over the rows' `embedding` column, faiss id = row position. An index that needs
training is trained on a seeded random sample of rows (not `datasets`' first `train_size` rows, which give skewed
centroids on a sorted or sharded dataset).
"""

import math
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

from .atomic import atomic_file
from .memory_bank_encoding import EMBEDDING_COLUMN

FLAT_MAX_ROWS = 200_000
IVF_FLAT_MAX_ROWS = 10_000_000


def default_index_factory(num_rows: int, dim: int) -> tuple[str, str]:
    """faiss factory string and default search parameters for a bank of `num_rows` unit vectors of size `dim`.

    Chosen with `bench/retrieval.py` (figures in `bench/RESULTS.md`, 2-core CPU):

    - below 200k rows, `"Flat"`: exact, nothing to train; at 100k a batched query costs ~6 ms.
    - up to 10M rows, `"IVF{nlist},Flat"` with nlist = 2**round(log2(sqrt(n))) and nprobe = nlist / 64: at 1M clustered
      vectors IVF1024 with nprobe=16 has recall@10 0.98 at 22x Flat's queries/s. Same memory as Flat (4·dim B/row).
    - above, `"IVF{nlist},SQ8"` (8-bit scalar codes, dim bytes/row: a quarter of Flat): at 1M clustered vectors
      recall@10 0.955 at 30x Flat (nprobe=16), and 0.96-0.99 on the synthetic world's CLIP bank, where 4-bit fast-scan
      PQ codes (`PQ{dim/8}x4fs`, 32x smaller than Flat) reach 0.58-0.69, and 0.18 at 1M; PQ needs exact re-ranking
      (`,RFlat`) to be usable, which keeps the full vectors in RAM.
      Users with memory to spare may prefer `HNSW32` (best recall per query, slowest to build).

    >>> default_index_factory(50_000, 512)
    ('Flat', '')
    >>> default_index_factory(1_000_000, 512)
    ('IVF1024,Flat', 'nprobe=16')
    >>> default_index_factory(50_000_000, 512)
    ('IVF8192,SQ8', 'nprobe=128')
    """
    if num_rows < FLAT_MAX_ROWS:
        return "Flat", ""
    nlist = 2 ** round(math.log2(math.sqrt(num_rows)))
    nprobe = f"nprobe={max(1, nlist // 64)}"
    if num_rows <= IVF_FLAT_MAX_ROWS:
        return f"IVF{nlist},Flat", nprobe
    return f"IVF{nlist},SQ8", nprobe


def write_index(rows, path, dim, index_factory, search_parameters, train_size, seed, show_progress_bar) -> dict:
    """Build the faiss index of `rows`' embeddings, write it atomically to `path`; return its manifest entries.

    The factory defaults to `default_index_factory`; search parameters default to the factory's defaults for IVF
    (nprobe = nlist / 64) and `efSearch=64` for HNSW. An index that needs training is trained on a seeded sample of
    `train_size` rows (default `max(64 * nlist, 65_536)`, capped at the bank size).
    """
    index, factory, search_parameters = _new_index(len(rows), dim, index_factory, search_parameters)
    _fill_index(index, rows, factory, train_size, seed, show_progress_bar)
    if search_parameters:
        faiss.ParameterSpace().set_index_parameters(index, search_parameters)
    with atomic_file(path) as tmp:
        faiss.write_index(index, str(tmp))
    probed = probe_rows(len(rows))
    probe_scores, probe_ids = index.search(embeddings_of(rows, probed), 1)
    return {
        "index_file": path.name,
        "index_factory": factory,
        "search_parameters": search_parameters,
        "ntotal": int(index.ntotal),
        "index_probe": {"rows": probed, "scores": [round(float(s), 6) for s in probe_scores[:, 0]],
                        "ids": [int(i) for i in probe_ids[:, 0]]},
    }


def _new_index(num_rows: int, dim: int, index_factory: str | None, search_parameters: str | None):
    """An empty inner-product index of `index_factory` (default: `default_index_factory`), the factory string and the
    search parameters to use with it."""
    default_factory, default_parameters = default_index_factory(num_rows, dim)
    factory = index_factory or default_factory
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"Invalid faiss index_factory {factory!r}: {error}") from error
    if search_parameters is None:
        if index_factory is None:
            search_parameters = default_parameters
        elif "IVF" in factory:
            search_parameters = f"nprobe={max(1, faiss.extract_index_ivf(index).nlist // 64)}"
        elif "HNSW" in factory:
            search_parameters = "efSearch=64"
        else:
            search_parameters = ""
    return index, factory, search_parameters


def _fill_index(index, rows: Dataset, factory: str, train_size: int | None, seed: int, show_progress_bar: bool) -> None:
    """Train `index` where it needs it (on a seeded sample of rows), then add every row's embedding in order."""
    if not index.is_trained:
        if train_size is None:
            nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 0
            train_size = max(64 * nlist, 65_536)
        sample = np.random.default_rng(seed).choice(len(rows), size=min(len(rows), train_size), replace=False)
        index.train(embeddings_of(rows, np.sort(sample).tolist()))
    view = rows.with_format("numpy", columns=[EMBEDDING_COLUMN])
    chunk = 65_536
    for batch in tqdm(view.iter(batch_size=chunk), total=math.ceil(len(rows) / chunk), desc="faiss index",
                      disable=not show_progress_bar):
        index.add(np.ascontiguousarray(batch[EMBEDDING_COLUMN], dtype=np.float32))


def read_index(path: Path, directory: Path, mmap: bool):
    """`faiss.read_index`, with an error that names the bank."""
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except RuntimeError as error:
        raise ValueError(f"Memory bank {directory}: its index {path.name} does not load (truncated or "
                         f"damaged). Rebuild it or re-index it.") from error


def index_matches_rows(index, rows: Dataset, manifest: dict) -> bool:
    """Whether `index` is the one built from `rows`: the probe search recorded at build time finds the same rows (or
    exact duplicates of them: ties) with the same scores. Sets the manifest's search parameters on `index`."""
    if manifest.get("search_parameters"):
        faiss.ParameterSpace().set_index_parameters(index, manifest["search_parameters"])
    probe = manifest["index_probe"]
    scores, ids = index.search(embeddings_of(rows, probe["rows"]), 1)
    found = ids[:, 0].tolist()
    # a different id is fine only if it is an exact duplicate of the recorded one (ties)
    same_ids = found == probe["ids"] or (min(found) >= 0 and np.allclose(
        embeddings_of(rows, found), embeddings_of(rows, probe["ids"]), atol=1e-6))
    return same_ids and np.allclose(scores[:, 0], probe["scores"], atol=1e-3)


def embeddings_of(rows: Dataset, indices: Sequence[int]) -> np.ndarray:
    """The stored embeddings of `rows[indices]`, float32 `(len(indices), dim)`, contiguous (as faiss takes them)."""
    view = rows.with_format("numpy", columns=[EMBEDDING_COLUMN])
    return np.ascontiguousarray(view[list(indices)][EMBEDDING_COLUMN], dtype=np.float32)


def probe_rows(num_rows: int, count: int = 16) -> list[int]:
    """`count` evenly spaced rows (fewer in a smaller bank): the index probe, and the sample `rows_hash` hashes."""
    return sorted({int(i) for i in np.linspace(0, num_rows - 1, num=min(count, num_rows))})
