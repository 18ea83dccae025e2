"""The memory bank of CM3Leon's retrieval: mixed-modal documents in Arrow with CLIP embeddings, and a faiss index.

CM3Leon (CL §2.1) prepends documents retrieved from a memory bank of image-text pairs to every training
example and, optionally, to inference prompts (FID 10.82 → 5.78 → 4.88 with 0 / 1 / 2 documents, CL Table 1). The
retriever (`retriever.py`) is a frozen CLIP bi-encoder: a document is encoded as the normalised mean of its
normalised text and image embeddings; a query is a text or an image; relevance is the inner product (cosine) of unit
vectors, searched with faiss (maximum inner product search). This module stores the documents and searches them.

```
 datasets.Dataset (text, image | image ids, any extra columns)
   │  Cm3LeonMemoryBank.build(dataset, encoder, directory)          text batch → encoder, image batch → encoder
   ▼
 directory/
   rows/            datasets.Dataset.save_to_disk: the mixed-modal source rows + source_index, content_hash, embedding
   index.faiss      faiss.write_index: inner-product index over the `embedding` column, faiss id = row position
                    (`reindex` writes index-<random>.faiss; the manifest's `index_file` names the live one)
   manifest.json    encoder identity, dimension, metric, index factory, search parameters, counts, consistency hashes
   (shards/         only while building: finished shards of rows+embeddings, so that a re-run resumes)
   │
   ▼  Cm3LeonMemoryBank.load(directory).search(unit query embeddings, k) → (scores, rows)
 Cm3LeonRetriever(bank, encoder)      retriever.py: the paper's retrieval strategy, retrieval-augmented prompts
```

Choices the paper leaves open, made here (each one is tested in `tests/test_retrieval*.py`):

- **Storage.** Embeddings are stored twice: as a float32 `embedding` column (fixed-size list) of the Arrow rows, memory-
  mapped, and inside the faiss index. The Arrow copy is the source of truth: candidates found by a (possibly lossy,
  e.g. PQ) index are re-scored exactly from it, so the 0.9 threshold and the ranking always use exact CLIP scores, and
  another index can be built later without re-encoding. No pickle anywhere: Arrow, faiss's own format and JSON.
- **Mixed-modal documents only.** Rows whose text is missing/blank or whose image is missing are not put in the bank at
  all (counted in the manifest as `num_skipped`), so every faiss id is a usable document.
- **Consistency.** Every file is written to a temporary name and renamed. `load` refuses a directory whose index and
  rows disagree: index size vs row count, the dimension, a hash of a sample of rows (embeddings, ids, content hashes),
  and a probe search whose ids and scores must match those recorded at build time.
- **Encoder identity.** The manifest records the encoder's name, dimension and its embeddings of a fixed probe text and
  probe image; querying with an encoder of another dimension, or whose probe embeddings differ (cosine < 0.999), is an
  error.
- **Default index** by bank size (`default_index_factory`, justified by `bench/retrieval.py`, see `bench/RESULTS.md`).

This module is the bank itself (its layout, `build`, `load`, `search`); its parts live beside it:
`memory_bank_encoding.py` (documents into rows: embeddings, content hashes, the encoder's identity),
`memory_bank_index.py` (the faiss index: default factory, building, the probe search) and `memory_bank_checks.py`
(what `load` checks: file digests, the rows hash, index against rows). Their public names are importable from here.

Why not `datasets`' own faiss integration (`Dataset.add_faiss_index`, `get_nearest_examples`)? The search itself is
one `index.search` call either way; everything else here is what it lacks: it trains an IVF index on the *first*
`train_size` rows (a sorted or sharded dataset gives skewed centroids; we train on a seeded random sample), builds in
one pass with nothing to resume, keeps no record of the encoder that made the vectors, and saves the index without
the rows it belongs to or anything that would catch the two drifting apart. The rows themselves are a `datasets`
Arrow dataset, memory-mapped, and `Cm3LeonMemoryBank.load(...).index` is a plain faiss index that
`datasets.search.FaissIndex(custom_index=...)` can wrap.
"""

import functools
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
from datasets import Dataset, load_from_disk
from PIL import Image

from .atomic import atomic_write_json, claim_output_directory, read_json_object, read_manifest, replace_directory
from .memory_bank_checks import FULL_CHECK_BYTES, bank_file, check_files, consistency_problems, file_digests, rows_hash
from .memory_bank_encoding import (
    CONTENT_HASH_COLUMN,
    EMBEDDING_COLUMN,
    FINGERPRINT_MIN_COSINE,
    PROBE_TEXT,
    RESERVED_COLUMNS,
    SOURCE_INDEX_COLUMN,
    content_hash,
    encode_shard,
    encoder_dim,
    encoder_identity,
    encoder_name,
    probe_image,
    same_encoder,
)
from .memory_bank_index import FLAT_MAX_ROWS, IVF_FLAT_MAX_ROWS, default_index_factory, read_index, write_index
from .sharded import build_in_shards, datasets_progress_bars_off, save_dataset_atomically

BANK_FORMAT_VERSION = 1
ROWS_DIR = "rows"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
MANIFEST_KEYS = ("encoder", "num_rows", "ntotal", "index_file", "rows_hash", "index_probe", "text_column", "image_column")

__all__ = [
    "BANK_FORMAT_VERSION", "CONTENT_HASH_COLUMN", "EMBEDDING_COLUMN", "FINGERPRINT_MIN_COSINE", "FLAT_MAX_ROWS",
    "FULL_CHECK_BYTES", "INDEX_FILE", "IVF_FLAT_MAX_ROWS", "MANIFEST_FILE", "MANIFEST_KEYS", "PROBE_TEXT",
    "RESERVED_COLUMNS", "ROWS_DIR", "SHARDS_DIR", "SOURCE_INDEX_COLUMN", "Cm3LeonMemoryBank", "bank_file",
    "content_hash", "default_index_factory", "encoder_identity", "probe_image",
]  # fmt: skip


class Cm3LeonMemoryBank:
    """A memory bank of mixed-modal documents: Arrow rows with CLIP embeddings + a faiss inner-product index.

    Build one with `Cm3LeonMemoryBank.build(dataset, encoder, directory)` (resumable; see `training/build_memory_bank.py`)
    and open it with `Cm3LeonMemoryBank.load(directory)`. The row dataset keeps every source column (images, `image_ids`,
    `input_ids`, anything else) and adds `source_index` (int64, row of the source dataset), `content_hash` (str) and
    `embedding` (float32, shape `(dim,)`, unit norm). faiss id `i` is row `i`.

    Example:

    ```python
    >>> import tempfile
    >>> from sentence_transformers import SentenceTransformer
    >>> from cm3leon_hf.pretrained import CLIP_PATH
    >>> from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    >>> from cm3leon_hf.synthetic import build_task
    >>> encoder = SentenceTransformer(str(CLIP_PATH))  # the synthetic world's CLIP, shipped with the package
    >>> pairs = build_task("text_to_image", num_train=200, num_validation=0, num_test=0, num_heldout=0)["train"]
    >>> directory = tempfile.mkdtemp() + "/bank"
    >>> _ = Cm3LeonMemoryBank.build(pairs, encoder, directory, text_column="caption", image_column="images",
    ...                             show_progress_bar=False)
    >>> bank = Cm3LeonMemoryBank.load(directory)
    >>> scores, rows = bank.search(encoder.encode(["a red star at the top left"]), k=10)
    >>> len(bank), scores.shape, rows.dtype
    (200, (1, 10), dtype('int64'))

    ```
    """

    def __init__(self, dataset: Dataset, index: faiss.Index, manifest: dict, directory: Path | None = None):
        self.dataset = dataset
        self.index = index
        self.manifest = manifest
        self.directory = directory
        self._embeddings = dataset.with_format("numpy", columns=[EMBEDDING_COLUMN])
        self._documents = dataset.remove_columns([EMBEDDING_COLUMN])
        self._keys = dataset.select_columns([SOURCE_INDEX_COLUMN, CONTENT_HASH_COLUMN])
        if manifest.get("search_parameters"):
            self.set_search_parameters(manifest["search_parameters"])

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    def set_search_parameters(self, parameters: str) -> None:
        """Set faiss search parameters, e.g. `"nprobe=32"` (IVF) or `"efSearch=128"` (HNSW)."""
        faiss.ParameterSpace().set_index_parameters(self.index, parameters)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` rows by index score for unit `queries` of shape `(num_queries, dim)`.

        Returns `(scores, rows)` of shape `(num_queries, k)`; approximate indexes may return fewer than `k` hits,
        padded with row `-1`.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (num_queries, {self.dim}), got {queries.shape}.")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        finite = np.isfinite(queries).all(axis=1)
        if not finite.all():  # faiss would answer row -1 with score -3.4e38 for them
            raise ValueError(f"Query embeddings {np.flatnonzero(~finite).tolist()[:8]} hold NaN or inf: the encoder "
                             f"produced no usable embedding for them.")
        return self.index.search(queries, k)

    def embeddings(self, rows: Sequence[int]) -> np.ndarray:
        """Exact stored embeddings of `rows`, float32 of shape `(len(rows), dim)`."""
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._embeddings[[int(r) for r in rows]][EMBEDDING_COLUMN].astype(np.float32, copy=False)

    def row_keys(self, rows: Sequence[int]) -> tuple[list[int], list[str]]:
        """`source_index` and `content_hash` of `rows` (two lists), without decoding images."""
        if len(rows) == 0:
            return [], []
        keys = self._keys[[int(r) for r in rows]]
        return keys[SOURCE_INDEX_COLUMN], keys[CONTENT_HASH_COLUMN]

    def documents(self, rows: Sequence[int]) -> list[dict]:
        """The bank rows `rows` without their embedding, as a list of dicts (images decoded to PIL)."""
        if len(rows) == 0:
            return []
        batch = self._documents[[int(r) for r in rows]]
        return [dict(zip(batch, values)) for values in zip(*batch.values())]

    def check_encoder(self, encoder) -> None:
        """Raise `ValueError` unless `encoder` is the encoder the bank was built with (dimension and probe embeddings)."""
        built_with = self.manifest["encoder"]
        dim = encoder_dim(encoder)
        if dim != built_with["dim"]:
            raise ValueError(
                f"Encoder dimension mismatch: the bank was built with {built_with['name']!r} ({built_with['dim']}-d "
                f"embeddings) but the query encoder {encoder_name(encoder)!r} gives {dim}-d embeddings."
            )
        if not same_encoder(built_with, encoder_identity(encoder)):
            raise ValueError(
                f"Encoder mismatch: the bank was built with {built_with['name']!r} but the query encoder "
                f"{encoder_name(encoder)!r} embeds the probe text/image differently (cosine < {FINGERPRINT_MIN_COSINE}); "
                "query a bank with the encoder that built it."
            )

    # ------------------------------------------------------------------------------------------------------- build
    @classmethod
    @datasets_progress_bars_off()
    def build(
        cls,
        dataset: Dataset,
        encoder,
        save_directory: str | os.PathLike,
        *,
        text_column: str = "text",
        image_column: str = "image",
        image_decoder: Callable[[list], list[Image.Image]] | None = None,
        index_factory: str | None = None,
        search_parameters: str | None = None,
        train_size: int | None = None,
        batch_size: int = 64,
        shard_size: int = 10_000,
        overwrite: bool = False,
        show_progress_bar: bool = True,
        seed: int = 0,
    ) -> "Cm3LeonMemoryBank":
        """Encode `dataset` into a memory bank saved in `save_directory`, and return it loaded.

        Args:
            dataset (`datasets.Dataset`): the documents. `text_column` holds strings; `image_column` holds PIL images
                (a `datasets.Image` column) or, with `image_decoder`, pre-tokenized image ids. Every column is kept.
            encoder (`sentence_transformers.SentenceTransformer`): a CLIP-like model embedding texts and images into one
                space. Texts and images are encoded in separate calls of `batch_size` items.
            image_decoder (`callable`, *optional*): maps a list of `image_column` values (e.g. VQ ids) to PIL images for
                the encoder, e.g. the image tokenizer's `decode_image_tokens`.
            index_factory (`str`, *optional*): faiss factory string (`"Flat"`, `"HNSW32"`, `"IVF4096,PQ64x4fs"` …), built
                with the inner-product metric. Defaults to `default_index_factory(num_rows, dim)`.
            search_parameters (`str`, *optional*): faiss parameters stored in the manifest and set at load
                (`"nprobe=16"`); defaults to those of `default_index_factory` for IVF indexes, `efSearch=64` for HNSW.
            train_size (`int`, *optional*): rows sampled (seeded) to train an index that needs training; defaults to
                `min(num_rows, max(64 * nlist, 65_536))` for IVF, 65,536 otherwise.
            shard_size (`int`): rows per resumable shard; a re-run skips the shards already on disk.
            overwrite (`bool`): rebuild an existing bank (the old one stays until the new one is complete, then is
                swapped out in one step) or start an unfinished build over. Without it, an
                existing bank is an error and an unfinished build with the same settings resumes: the same dataset
                (its `datasets` fingerprint, stable for a dataset loaded from disk or generated with a cache; an
                in-memory dataset made anew gets a new one), columns, shard size and encoder.
        """
        target = Path(save_directory)
        _check_build_arguments(dataset, text_column, image_column, batch_size, shard_size)
        save_directory = _build_directory(target, overwrite)
        identity = encoder_identity(encoder)
        encode = functools.partial(encode_shard, encoder=encoder, text_column=text_column, image_column=image_column,
                                   image_decoder=image_decoder, batch_size=batch_size, dim=identity["dim"])
        rows = _encode_rows(dataset, encode, save_directory / SHARDS_DIR, identity, text_column, image_column,
                            shard_size, show_progress_bar)
        rows = save_dataset_atomically(rows, save_directory / ROWS_DIR)
        manifest = _rows_manifest(rows, len(dataset), identity, text_column, image_column)
        manifest.update(write_index(rows, save_directory / INDEX_FILE, identity["dim"], index_factory,
                                    search_parameters, train_size, seed, show_progress_bar))
        manifest["files"] = file_digests(save_directory, _bank_files(save_directory, manifest["index_file"]))
        atomic_write_json(save_directory / MANIFEST_FILE, manifest)  # the commit point
        shutil.rmtree(save_directory / SHARDS_DIR)
        if save_directory != target:
            _keep_other_files(target, save_directory)
            replace_directory(save_directory, target)
        return cls.load(target)

    def reindex(self, index_factory: str, *, search_parameters: str | None = None, train_size: int | None = None,
                seed: int = 0, show_progress_bar: bool = True) -> "Cm3LeonMemoryBank":
        """Replace the bank's faiss index by a new `index_factory` index built from the stored embeddings (no
        re-encoding) and return the bank loaded again. The new index goes to a new file and the manifest is renamed
        over the old one: an interrupted re-index leaves the old, consistent bank.

        Example: `bank = Cm3LeonMemoryBank.load("bank").reindex("IVF256,PQ32x4fs", search_parameters="nprobe=16")`.
        """
        if self.directory is None:
            raise ValueError("Only a saved bank can be re-indexed.")
        old_file = bank_file(self.directory, self.manifest["index_file"])
        new_file = self.directory / f"index-{uuid.uuid4().hex[:12]}.faiss"
        manifest = dict(self.manifest)
        manifest.update(write_index(self.dataset, new_file, self.dim, index_factory, search_parameters, train_size,
                                    seed, show_progress_bar))
        if "files" in manifest:
            files = {k: v for k, v in manifest["files"].items() if k != old_file.name}
            manifest["files"] = {**files, **file_digests(self.directory, [new_file.name])}
        atomic_write_json(self.directory / MANIFEST_FILE, manifest)  # the commit point: the old index until here
        old_file.unlink()
        return type(self).load(self.directory)

    # -------------------------------------------------------------------------------------------------------- load
    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = False, verify: bool | None = None) -> "Cm3LeonMemoryBank":
        """Open a bank saved by `build`. `mmap=True` memory-maps the faiss index (`faiss.IO_FLAG_MMAP`); the Arrow rows
        are always memory-mapped. Raises `ValueError` when the directory is not a finished bank, when a file differs
        from the one the bank was built with, or when its index and rows disagree.

        Files are checked against the sizes and sha256 digests the manifest records: sizes always, contents for banks
        up to 1 GiB (`FULL_CHECK_BYTES`), or always with `verify=True` (`verify=False`: sizes only)."""
        directory = Path(directory)
        manifest = read_manifest(directory, "a memory bank", "an unfinished build: re-run the build to resume",
                                 format_version=BANK_FORMAT_VERSION, name="memory bank", required=MANIFEST_KEYS,
                                 file_name=MANIFEST_FILE, partial=SHARDS_DIR)
        index_path = bank_file(directory, manifest["index_file"])
        damaged = check_files(directory, manifest.get("files") or {}, verify)
        if damaged:
            raise ValueError(f"Memory bank {directory} is damaged: {'; '.join(damaged)}. Rebuild it.")
        try:
            rows = load_from_disk(str(directory / ROWS_DIR))
        except Exception as error:  # noqa: BLE001 - datasets raises several kinds for a damaged directory
            raise ValueError(f"Memory bank {directory}: its rows ({ROWS_DIR}/) do not load ({error}). Rebuild it.") from error
        index = read_index(index_path, directory, mmap)
        problems = consistency_problems(rows, index, manifest)
        if problems:
            raise ValueError(f"Memory bank {directory} is inconsistent: {'; '.join(problems)}. Rebuild it.")
        return cls(rows, index, manifest, directory)


# ------------------------------------------------------------------------------------------------- the build's steps


def _check_build_arguments(dataset: Dataset, text_column: str, image_column: str, batch_size, shard_size) -> None:
    """Refuse, before any work, what `build` cannot turn into a bank."""
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if len(dataset) == 0:
        raise ValueError("Cannot build a memory bank from an empty dataset.")
    for role, column in (("text_column", text_column), ("image_column", image_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"{role}={column!r} is not a column of the dataset (columns: {dataset.column_names})."
            )
    reserved = [c for c in RESERVED_COLUMNS if c in dataset.column_names]
    if reserved:
        raise ValueError(f"Columns {reserved} are reserved for the memory bank; rename them in the dataset.")


BUILD_SIGNATURE = ("format_version", "num_source_rows", "encoder")  # keys of a bank's manifest and of its build.json


def _is_bank_output(name: str) -> bool:
    """A top-level entry that `build` (or `reindex`) writes in a bank's directory."""
    return name in (ROWS_DIR, SHARDS_DIR, MANIFEST_FILE, INDEX_FILE) or (
        name.startswith("index-") and name.endswith(".faiss"))


def _build_directory(target: Path, overwrite: bool) -> Path:
    """Where to build the bank at `target`: `target` itself, or, to rebuild a finished bank (`overwrite`), the sibling
    `.<name>.rebuild`, swapped in when complete so that the old bank stays until then. Refuses a finished bank without
    `overwrite` and, with or without it, a non-empty folder that is not a bank (`claim_output_directory`: nothing the
    build did not write is deleted); clears an unfinished build's own files with `overwrite`."""
    manifest = read_json_object(target / MANIFEST_FILE)
    if overwrite and manifest is not None and all(key in manifest for key in BUILD_SIGNATURE):
        # Keep the old bank until the new one is complete: build beside it, then swap it in.
        save_directory = target.with_name(f".{target.name}.rebuild")
        if save_directory.exists():
            shutil.rmtree(save_directory)
        return save_directory
    claim_output_directory(
        target, outputs=_is_bank_output, signature=BUILD_SIGNATURE, overwrite=overwrite, what="a memory bank",
        command="pass overwrite=True (the `--overwrite` flag of training/build_memory_bank.py)",
        manifest_file=MANIFEST_FILE, partial=SHARDS_DIR,
    )
    return target


def _keep_other_files(old: Path, new: Path) -> None:
    """Hard-link (or copy) into the rebuilt bank `new` the top-level entries of `old` that a build does not write
    (a user's notes beside the bank), so that swapping `new` in removes only the old bank's own files."""
    def link(source, destination):
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)

    for entry in old.iterdir():
        if _is_bank_output(entry.name) or entry.name.startswith(".") or (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link)
        else:
            link(entry, new / entry.name)


def _same_build_settings(previous: dict, current: dict) -> bool:
    """An unfinished build resumes with settings equal to its own, the encoder compared by its probe embeddings."""
    previous, current = dict(previous), dict(current)
    return same_encoder(previous.pop("encoder", {}), current.pop("encoder")) and previous == current


def _encode_rows(dataset, encode, shards_dir, identity, text_column, image_column, shard_size, show_progress_bar):
    """The bank's rows: `dataset`'s mixed-modal rows with their embeddings, encoded shard by shard into `shards_dir`
    (`encode`: `encode_shard` bound to the encoder), so that a re-run with the same settings resumes."""
    settings = {
        "format_version": BANK_FORMAT_VERSION,
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "num_source_rows": len(dataset),
        "text_column": text_column,
        "image_column": image_column,
        "shard_size": shard_size,
        "encoder": identity,
    }
    rows, _ = build_in_shards(
        dataset, shards_dir, settings, encode, shard_size=shard_size, what="build", desc="memory bank", unit="doc",
        show_progress_bar=show_progress_bar, same_settings=_same_build_settings,
    )
    if len(rows) == 0:
        raise ValueError(
            f"No mixed-modal rows: every row of the dataset lacks a text ({text_column!r}) or an image "
            f"({image_column!r})."
        )
    return rows


def _rows_manifest(rows: Dataset, num_source_rows: int, identity: dict, text_column: str, image_column: str) -> dict:
    """The manifest's entries about the rows (the index adds its own, then the file digests)."""
    return {
        "format_version": BANK_FORMAT_VERSION,
        "encoder": identity,
        "metric": "inner_product",
        "num_rows": len(rows),
        "num_source_rows": num_source_rows,
        "num_skipped": num_source_rows - len(rows),
        "text_column": text_column,
        "image_column": image_column,
        "columns": rows.column_names,
        "rows_hash": rows_hash(rows),
    }


def _bank_files(directory: Path, index_file: str) -> list[str]:
    rows = sorted(str(p.relative_to(directory)) for p in (directory / ROWS_DIR).rglob("*") if p.is_file())
    return [*rows, index_file]
