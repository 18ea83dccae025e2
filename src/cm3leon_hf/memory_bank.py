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

Why not `datasets`' own faiss integration (`Dataset.add_faiss_index`, `get_nearest_examples`)? The search itself is
one `index.search` call either way; everything else here is what it lacks: it trains an IVF index on the *first*
`train_size` rows (a sorted or sharded dataset gives skewed centroids; we train on a seeded random sample), builds in
one pass with nothing to resume, keeps no record of the encoder that made the vectors, and saves the index without
the rows it belongs to or anything that would catch the two drifting apart. The rows themselves are a `datasets`
Arrow dataset, memory-mapped, and `Cm3LeonMemoryBank.load(...).index` is a plain faiss index that
`datasets.search.FaissIndex(custom_index=...)` can wrap.
"""

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from datasets import Dataset, List, Value, load_from_disk
from PIL import Image
from tqdm.auto import tqdm

from .atomic import replace_directory
from .sharded import atomic_write_json, build_in_shards, datasets_progress_bars_off, save_dataset_atomically

BANK_FORMAT_VERSION = 1
ROWS_DIR = "rows"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"

EMBEDDING_COLUMN = "embedding"
SOURCE_INDEX_COLUMN = "source_index"
CONTENT_HASH_COLUMN = "content_hash"
RESERVED_COLUMNS = (EMBEDDING_COLUMN, SOURCE_INDEX_COLUMN, CONTENT_HASH_COLUMN)

PROBE_TEXT = "a red circle above a blue square on a white background"
FINGERPRINT_MIN_COSINE = 0.999
FLAT_MAX_ROWS = 200_000
IVF_FLAT_MAX_ROWS = 10_000_000


def probe_image() -> Image.Image:
    """The fixed 64x64 RGB image whose embedding fingerprints an encoder (a colour gradient with a square)."""
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1).copy()
    pixels[16:48, 16:48] = (200, 30, 30)
    return Image.fromarray(pixels, mode="RGB")


def content_hash(text: str, image: Any) -> str:
    """sha1 of a document's content: its text and its image (PIL pixels, or a sequence of image ids).

    Two documents with equal text and pixel-identical images (or equal image ids) get the same hash; the retriever uses
    it to skip duplicates and the query pair itself.

    >>> from PIL import Image
    >>> a = content_hash("a red square", Image.new("RGB", (4, 4), (255, 0, 0)))
    >>> a == content_hash("a red square", Image.new("RGB", (4, 4), (255, 0, 0))), a == content_hash("a red square", [1, 2])
    (True, False)
    """
    digest = hashlib.sha1(text.encode("utf-8") + b"\0")
    if isinstance(image, Image.Image):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    else:
        digest.update(np.asarray(image, dtype=np.int64).tobytes())
    return digest.hexdigest()


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


def _encoder_name(encoder) -> str:
    """A Hub id as it is; a local directory by its last component (a bank moves between machines: the identity that
    counts is the probe embeddings, and an absolute path of the building machine means nothing elsewhere)."""
    first = encoder[0]
    model = getattr(first, "model", None) or getattr(first, "auto_model", None)
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(encoder).__name__)
    return Path(name).name if os.path.isabs(name) else name


def _encoder_dim(encoder) -> int:
    get_dim = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(get_dim())


def encoder_identity(encoder) -> dict:
    """The JSON-able identity of a sentence-transformers encoder: name, dimension and probe embeddings.

    Raises `ValueError` when the encoder does not encode both texts and images (a text-only model is not a CLIP).
    """
    modalities = set(getattr(encoder, "modalities", ()) or ())
    if not {"text", "image"} <= modalities:
        raise ValueError(
            f"The encoder must embed both texts and images into one space (a CLIP model); it supports "
            f"{sorted(modalities) or 'text only'}."
        )
    text = encoder.encode([PROBE_TEXT], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    image = encoder.encode([probe_image()], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return {
        "name": _encoder_name(encoder),
        "dim": _encoder_dim(encoder),
        "probe_text": PROBE_TEXT,
        "text_probe_embedding": [round(float(v), 6) for v in text[0]],
        "image_probe_embedding": [round(float(v), 6) for v in image[0]],
    }


def _same_encoder(identity: dict, other: dict) -> bool:
    if identity.get("dim") != other.get("dim"):
        return False
    for key in ("text_probe_embedding", "image_probe_embedding"):
        if float(np.dot(identity[key], other[key])) < FINGERPRINT_MIN_COSINE:
            return False
    return True


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


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
        dim = _encoder_dim(encoder)
        if dim != built_with["dim"]:
            raise ValueError(
                f"Encoder dimension mismatch: the bank was built with {built_with['name']!r} ({built_with['dim']}-d "
                f"embeddings) but the query encoder {_encoder_name(encoder)!r} gives {dim}-d embeddings."
            )
        if not _same_encoder(built_with, encoder_identity(encoder)):
            raise ValueError(
                f"Encoder mismatch: the bank was built with {built_with['name']!r} but the query encoder "
                f"{_encoder_name(encoder)!r} embeds the probe text/image differently (cosine < {FINGERPRINT_MIN_COSINE}); "
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
        save_directory = Path(save_directory)
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
        target = save_directory
        if overwrite and (save_directory / MANIFEST_FILE).exists():
            # Keep the old bank until the new one is complete: build beside it, then swap it in.
            save_directory = target.with_name(f".{target.name}.rebuild")
            if save_directory.exists():
                shutil.rmtree(save_directory)
        elif overwrite and save_directory.exists():  # an unfinished build: start over
            shutil.rmtree(save_directory)
        if (save_directory / MANIFEST_FILE).exists():
            raise ValueError(f"{save_directory} already holds a memory bank; pass overwrite=True to rebuild it.")

        identity = encoder_identity(encoder)
        dim = identity["dim"]
        shards_dir = save_directory / SHARDS_DIR
        settings = {
            "format_version": BANK_FORMAT_VERSION,
            "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
            "num_source_rows": len(dataset),
            "text_column": text_column,
            "image_column": image_column,
            "shard_size": shard_size,
            "encoder": identity,
        }
        def same_settings(previous: dict, current: dict) -> bool:
            previous, current = dict(previous), dict(current)
            return _same_encoder(previous.pop("encoder", {}), current.pop("encoder")) and previous == current

        def encode(part, start, progress):
            return cls._encode_shard(part, start, encoder, text_column, image_column, image_decoder, batch_size, dim,
                                     progress)

        rows, _ = build_in_shards(
            dataset, shards_dir, settings, encode, shard_size=shard_size, what="build", desc="memory bank", unit="doc", show_progress_bar=show_progress_bar,
            same_settings=same_settings,
        )
        if len(rows) == 0:
            raise ValueError(
                f"No mixed-modal rows: every row of the dataset lacks a text ({text_column!r}) or an image "
                f"({image_column!r})."
            )
        rows = save_dataset_atomically(rows, save_directory / ROWS_DIR)

        manifest = {
            "format_version": BANK_FORMAT_VERSION,
            "encoder": identity,
            "metric": "inner_product",
            "num_rows": len(rows),
            "num_source_rows": len(dataset),
            "num_skipped": len(dataset) - len(rows),
            "text_column": text_column,
            "image_column": image_column,
            "columns": rows.column_names,
            "rows_hash": _rows_hash(rows),
        }
        manifest.update(_write_index(rows, save_directory / INDEX_FILE, dim, index_factory, search_parameters,
                                     train_size, seed, show_progress_bar))
        manifest["files"] = _file_digests(save_directory, _bank_files(save_directory, manifest["index_file"]))
        atomic_write_json(save_directory / MANIFEST_FILE, manifest)
        shutil.rmtree(shards_dir)
        if save_directory != target:
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
        manifest.update(_write_index(self.dataset, new_file, self.dim, index_factory, search_parameters, train_size,
                                     seed, show_progress_bar))
        if "files" in manifest:
            files = {k: v for k, v in manifest["files"].items() if k != old_file.name}
            manifest["files"] = {**files, **_file_digests(self.directory, [new_file.name])}
        atomic_write_json(self.directory / MANIFEST_FILE, manifest)  # the commit point: the old index until here
        old_file.unlink()
        return type(self).load(self.directory)

    @staticmethod
    def _encode_shard(part, start, encoder, text_column, image_column, image_decoder, batch_size, dim, progress):
        kept, hashes, embeddings = [], [], []
        offset = 0
        for batch in part.iter(batch_size=batch_size):
            texts, images = batch[text_column], [_single_image(im, image_decoder) for im in batch[image_column]]
            keep = [
                j for j, (t, im) in enumerate(zip(texts, images))
                if isinstance(t, str) and t.strip() and im is not None
            ]
            if keep:
                texts = [texts[j] for j in keep]
                stored_images = [images[j] for j in keep]
                pixels = image_decoder(stored_images) if image_decoder is not None else stored_images
                text_emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False)
                image_emb = encoder.encode(pixels, batch_size=batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False)
                embeddings.append(_unit_rows((text_emb + image_emb) / 2).astype(np.float32))
                hashes.extend(content_hash(t, im) for t, im in zip(texts, stored_images))
                kept.extend(offset + j for j in keep)
            offset += len(images)
            progress.update(len(images))
        shard = part.select(kept).flatten_indices()
        shard = shard.add_column(SOURCE_INDEX_COLUMN, np.asarray(kept, dtype=np.int64) + start, feature=Value("int64"))
        shard = shard.add_column(CONTENT_HASH_COLUMN, hashes, feature=Value("string"))
        matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)
        return shard.add_column(EMBEDDING_COLUMN, list(matrix), feature=List(Value("float32"), length=dim))

    # -------------------------------------------------------------------------------------------------------- load
    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = False, verify: bool | None = None) -> "Cm3LeonMemoryBank":
        """Open a bank saved by `build`. `mmap=True` memory-maps the faiss index (`faiss.IO_FLAG_MMAP`); the Arrow rows
        are always memory-mapped. Raises `ValueError` when the directory is not a finished bank, when a file differs
        from the one the bank was built with, or when its index and rows disagree.

        Files are checked against the sizes and sha256 digests the manifest records: sizes always, contents for banks
        up to 1 GiB (`FULL_CHECK_BYTES`), or always with `verify=True` (`verify=False`: sizes only)."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.exists():
            unfinished = " (an unfinished build: re-run the build to resume)" if (directory / SHARDS_DIR).exists() else ""
            raise ValueError(f"{directory} is not a memory bank: {MANIFEST_FILE} is missing{unfinished}.")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"Memory bank {directory}: {MANIFEST_FILE} is not valid JSON ({error}). Rebuild it.") from error
        if not isinstance(manifest, dict) or manifest.get("format_version") != BANK_FORMAT_VERSION:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise ValueError(f"Unsupported memory bank format {version!r} in {directory}.")
        missing = [key for key in MANIFEST_KEYS if key not in manifest]
        if missing:
            raise ValueError(f"Memory bank {directory}: {MANIFEST_FILE} lacks {missing}. Rebuild it.")
        index_path = bank_file(directory, manifest["index_file"])
        damaged = _check_files(directory, manifest.get("files") or {}, verify)
        if damaged:
            raise ValueError(f"Memory bank {directory} is damaged: {'; '.join(damaged)}. Rebuild it.")
        try:
            rows = load_from_disk(str(directory / ROWS_DIR))
        except Exception as error:  # noqa: BLE001 - datasets raises several kinds for a damaged directory
            raise ValueError(f"Memory bank {directory}: its rows ({ROWS_DIR}/) do not load ({error}). Rebuild it.") from error
        try:
            index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP if mmap else 0)
        except RuntimeError as error:
            raise ValueError(f"Memory bank {directory}: its index {index_path.name} does not load (truncated or "
                             f"damaged). Rebuild it or re-index it.") from error
        problems = []
        if len(rows) == 0:
            problems.append("the bank has no rows")
        if not (index.ntotal == len(rows) == manifest["num_rows"] == manifest["ntotal"]):
            problems.append(f"index size {index.ntotal}, rows {len(rows)}, manifest {manifest['num_rows']}")
        if index.d != manifest["encoder"]["dim"]:
            problems.append(f"index dimension {index.d} != manifest dimension {manifest['encoder']['dim']}")
        if not problems and _rows_hash(rows) != manifest["rows_hash"]:
            problems.append("the rows are not those the index was built from (rows hash differs)")
        if not problems:
            if manifest.get("search_parameters"):
                faiss.ParameterSpace().set_index_parameters(index, manifest["search_parameters"])
            probe = manifest["index_probe"]
            scores, ids = index.search(_embeddings_of(rows, probe["rows"]), 1)
            found = ids[:, 0].tolist()
            # a different id is fine only if it is an exact duplicate of the recorded one (ties)
            same_ids = found == probe["ids"] or (min(found) >= 0 and np.allclose(
                _embeddings_of(rows, found), _embeddings_of(rows, probe["ids"]), atol=1e-6))
            if not same_ids or not np.allclose(scores[:, 0], probe["scores"], atol=1e-3):
                problems.append("the index is not the one built from these rows (probe search differs)")
        if problems:
            raise ValueError(f"Memory bank {directory} is inconsistent: {'; '.join(problems)}. Rebuild it.")
        return cls(rows, index, manifest, directory)


MANIFEST_KEYS = ("encoder", "num_rows", "ntotal", "index_file", "rows_hash", "index_probe", "text_column", "image_column")


def bank_file(directory: Path, name) -> Path:
    """`directory / name` for a file name read from a manifest, refused unless it names a file directly inside the
    bank: a manifest must not make the bank read or delete files elsewhere (`"../other/index.faiss"`, `"/etc/x"`)."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"Memory bank {directory}: its manifest names the file {name!r}, which is not a file of the "
                         f"bank's own directory. Refusing to use it.")
    return directory / name


def _write_index(rows, path, dim, index_factory, search_parameters, train_size, seed, show_progress_bar) -> dict:
    """Build the faiss index of `rows`' embeddings, write it atomically to `path`; return its manifest entries.

    The factory defaults to `default_index_factory`; search parameters default to the factory's defaults for IVF
    (nprobe = nlist / 64) and `efSearch=64` for HNSW. An index that needs training is trained on a seeded sample of
    `train_size` rows (default `max(64 * nlist, 65_536)`, capped at the bank size).
    """
    default_factory, default_parameters = default_index_factory(len(rows), dim)
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
    if not index.is_trained:
        if train_size is None:
            nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 0
            train_size = max(64 * nlist, 65_536)
        sample = np.random.default_rng(seed).choice(len(rows), size=min(len(rows), train_size), replace=False)
        index.train(_embeddings_of(rows, np.sort(sample).tolist()))
    view = rows.with_format("numpy", columns=[EMBEDDING_COLUMN])
    chunk = 65_536
    for batch in tqdm(view.iter(batch_size=chunk), total=math.ceil(len(rows) / chunk), desc="faiss index",
                      disable=not show_progress_bar):
        index.add(np.ascontiguousarray(batch[EMBEDDING_COLUMN], dtype=np.float32))
    if search_parameters:
        faiss.ParameterSpace().set_index_parameters(index, search_parameters)
    index_tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(index_tmp))
    os.replace(index_tmp, path)
    probe_rows = _probe_rows(len(rows))
    probe_scores, probe_ids = index.search(_embeddings_of(rows, probe_rows), 1)
    return {
        "index_file": path.name,
        "index_factory": factory,
        "search_parameters": search_parameters,
        "ntotal": int(index.ntotal),
        "index_probe": {"rows": probe_rows, "scores": [round(float(s), 6) for s in probe_scores[:, 0]],
                        "ids": [int(i) for i in probe_ids[:, 0]]},
    }


def _single_image(value, image_decoder):
    """A row's image: the value itself, or the one element of a list of images (`None` when missing/empty).

    Image ids (with `image_decoder`) are a list of ints, so only PIL lists are unwrapped; an empty id list is missing.
    """
    if value is None:
        return None
    if image_decoder is not None:
        return value if len(value) > 0 and not isinstance(value[0], (list, tuple)) else _one(value)
    if isinstance(value, (list, tuple)):
        return _one(value)
    return value


def _one(values):
    if len(values) > 1:
        raise ValueError(f"A memory-bank document has one image; a row of the image column holds {len(values)}.")
    return values[0] if values else None


def _embeddings_of(rows: Dataset, indices: Sequence[int]) -> np.ndarray:
    view = rows.with_format("numpy", columns=[EMBEDDING_COLUMN])
    return np.ascontiguousarray(view[list(indices)][EMBEDDING_COLUMN], dtype=np.float32)


def _probe_rows(num_rows: int, count: int = 16) -> list[int]:
    return sorted({int(i) for i in np.linspace(0, num_rows - 1, num=min(count, num_rows))})


FULL_CHECK_BYTES = 1 << 30  # banks up to 1 GiB are hashed whole at every load; larger ones with `verify=True`


def _file_digests(directory: Path, names: list[str]) -> dict:
    """Size and sha256 of each file (relative names), streamed in 1 MiB blocks."""
    digests = {}
    for name in names:
        digest = hashlib.sha256()
        with open(directory / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digests[name] = {"size": (directory / name).stat().st_size, "sha256": digest.hexdigest()}
    return digests


def _bank_files(directory: Path, index_file: str) -> list[str]:
    rows = sorted(str(p.relative_to(directory)) for p in (directory / ROWS_DIR).rglob("*") if p.is_file())
    return [*rows, index_file]


def _check_files(directory: Path, recorded: dict, verify: bool | None) -> list[str]:
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
        actual = _file_digests(directory, list(recorded))
        problems += [f"{name} differs from the file it was built with (sha256)" for name in recorded
                     if actual[name]["sha256"] != recorded[name]["sha256"]]
    return problems


def _rows_hash(rows: Dataset) -> str:
    """sha256 of the row count, the column names and up to 256 evenly spaced rows (ids, content hash, embedding)."""
    digest = hashlib.sha256(f"{len(rows)}|{','.join(rows.column_names)}".encode())
    sample = _probe_rows(len(rows), count=256)
    view = rows.with_format("numpy", columns=[SOURCE_INDEX_COLUMN, EMBEDDING_COLUMN])[sample]
    digest.update(np.asarray(view[SOURCE_INDEX_COLUMN], dtype=np.int64).tobytes())
    digest.update(np.asarray(view[EMBEDDING_COLUMN], dtype=np.float32).tobytes())
    digest.update("".join(rows.select(sample)[CONTENT_HASH_COLUMN]).encode())
    return digest.hexdigest()
