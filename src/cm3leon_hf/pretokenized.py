"""Pre-tokenized image–text data for CM3Leon pretraining: text BPE + VQ codes and retrieved documents, computed once.

Training then never runs the VQ or faiss: `Cm3LeonDataCollator` reads the Arrow output (`cm3leon_hf.trainer`). The
command is `training/pretokenize.py`; `DataSourceArguments` and `load_source` choose the rows for it and for
`training/build_memory_bank.py`, so that the two read the same dataset.

Output (`output_dir/`): `data/`, a `datasets` Arrow dataset with **one row per source row, in source order**:
`source_index` (int64), `input_ids` (int32: the document `text <break> image`, no `<eos>`; empty for a skipped row)
and, with a memory bank, `retrieved_indices` (int64 rows of `data/` itself) and `retrieved_scores` (float32 CLIP
scores); `manifest.json` (the processor's vocabulary, the source, the skip counts by reason, the retrieval settings).
`load_pretokenized(output_dir)` returns the training rows (skipped rows left out) and the documents the indices
point to.

Choices:

- **The memory bank is the training set** (the paper does not say; RA-CM3 retrieved from its own training pairs): a
  bank row's `source_index` is a row of the same dataset, so retrieved documents are stored as row numbers (no copies:
  4× the tokens would otherwise be stored, CL §2.1) and the pair itself is excluded. A bank built from other rows is
  refused (its row count and a sample of its content hashes must match the dataset).
- **Skips, counted** in the manifest: a row without a caption or without an image (not a caption-image pair), and,
  with `max_length`, a document that cannot fit the context even alone (`len + 2` for its `<eos>` tokens).
- **Determinism**: batch `j`'s retrieval uses `numpy.random.default_rng([seed, j])`, so a resumed run writes what an
  uninterrupted one writes.

Example:

>>> from cm3leon_hf import Cm3LeonProcessor
>>> from cm3leon_hf.pretrained import TINY_PATH
>>> from cm3leon_hf.synthetic import build_task
>>> import tempfile
>>> pairs = build_task("text_to_image", num_train=4, num_validation=0, num_test=0, num_heldout=0)["train"]
>>> output_dir = tempfile.mkdtemp()
>>> _ = pretokenize(pairs, Cm3LeonProcessor.from_pretrained(TINY_PATH), output_dir, text_column="caption",
...                 image_column="images", show_progress_bar=False)
>>> examples, documents, manifest = load_pretokenized(output_dir)
>>> len(examples), manifest["num_skipped"]
(4, {'no_image': 0, 'no_text': 0, 'too_long': 0})
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, List, Value, load_from_disk

from .atomic import atomic_write_json, claim_output_directory, read_manifest
from .layout import document_text
from .memory_bank_encoding import one_image
from .sharded import build_in_shards, save_dataset_atomically

FORMAT_VERSION = 1
DATA_DIR = "data"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
SKIP_REASONS = ("no_text", "no_image", "too_long")


# ------------------------------------------------------------------------------------------------ the source rows


@dataclass
class DataSourceArguments:
    """Which image–text dataset to read: a `datasets` one (`dataset`) or a synthetic-world task (`synthetic_task`),
    exactly one of them. Flags of `training/pretokenize.py` and `training/build_memory_bank.py` (parsed with
    `trl.TrlParser`), so that both read the same rows; `load_source` loads them."""

    dataset: str | None = field(
        default=None, metadata={"help": "a directory saved with save_to_disk, a folder of pictures with a metadata.jsonl "
                                         "of captions (imagefolder), or a name for datasets.load_dataset"}
    )
    synthetic_task: str | None = field(
        default=None, metadata={"help": "a synthetic-world task (its `caption` and `images` columns)"}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "load_dataset configuration name"})
    split: str = field(default="train", metadata={"help": "the split of --dataset"})
    synthetic_rows: int = field(default=10_000, metadata={"help": "rows of the synthetic split"})
    synthetic_split: str = field(default="train", metadata={"help": "train, validation, test or heldout"})
    synthetic_seed: int = field(default=0, metadata={"help": "the synthetic world's seed"})
    text_column: str | None = field(
        default=None, metadata={"help": "default: text (caption for --synthetic_task)"}
    )
    image_column: str | None = field(
        default=None, metadata={"help": "default: image (images for --synthetic_task)"}
    )

    def __post_init__(self):
        if (self.dataset is None) == (self.synthetic_task is None):
            raise ValueError("exactly one of --dataset and --synthetic_task is required")


def load_source(args: DataSourceArguments) -> tuple[Dataset, str, str]:
    """`(dataset, text_column, image_column)` of `args`: the synthetic task's split (`synthetic_rows` rows of
    `synthetic_split`, columns `caption` and `images`), or `dataset` (a `save_to_disk` directory; a folder of files
    that `datasets.load_dataset` reads, such as an `imagefolder` of pictures with their captions in `metadata.jsonl`;
    or a dataset's name), columns `text` and `image`; `text_column`/`image_column` override the column names."""
    if args.synthetic_task:
        from .synthetic import build_task

        sizes = {f"num_{s}": 0 for s in ("train", "validation", "test", "heldout")}
        sizes[f"num_{args.synthetic_split}"] = args.synthetic_rows
        splits = build_task(args.synthetic_task, seed=args.synthetic_seed, **sizes)
        return splits[args.synthetic_split], args.text_column or "caption", args.image_column or "images"
    if os.path.isdir(args.dataset) and _saved_to_disk(args.dataset):
        dataset = datasets.load_from_disk(args.dataset)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[args.split]
    else:  # a name, or a folder of files: datasets infers the builder (imagefolder for pictures + metadata.jsonl)
        dataset = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
    return dataset, args.text_column or "text", args.image_column or "image"


def _saved_to_disk(folder: str) -> bool:
    """Whether `folder` was written by `save_to_disk` (a `Dataset` or a `DatasetDict`) rather than holding data files."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("state.json", "dataset_dict.json"))


# ------------------------------------------------------------------------------------------------ pre-tokenization


def _image_of(value):
    """A pair's image: the value, or the single element of a list (`None` when missing or empty)."""
    return one_image(value, "A caption-image pair")


def _check_bank(bank, dataset: Dataset, text_column: str, image_column: str, probes: int = 8) -> None:
    """Refuse a memory bank that was not built from `dataset` (row count, and the content hashes of a few rows)."""
    from .memory_bank import content_hash

    if bank.manifest["num_source_rows"] != len(dataset):
        raise ValueError(
            f"The memory bank was built from {bank.manifest['num_source_rows']} rows, the dataset has {len(dataset)}: "
            f"retrieved documents are stored as rows of the dataset, so the bank must be built from this dataset."
        )
    rows = np.linspace(0, len(bank) - 1, min(probes, len(bank))).astype(int).tolist()
    sources, hashes = bank.row_keys(rows)
    for source, stored in zip(sources, hashes):
        row = dataset[int(source)]
        if content_hash(row[text_column], _image_of(row[image_column])) != stored:
            raise ValueError(
                f"Memory-bank row with source_index {source} does not hold row {source} of the dataset (content "
                f"hashes differ): build the bank from this dataset, with text column {text_column!r} and image column "
                f"{image_column!r}."
            )


def _tokenize_shard(part: Dataset, start: int, processor, text_column, image_column, retriever, num_docs,
                    docs_per_modality, max_length, batch_size, seed, progress) -> tuple[Dataset, dict]:
    """One shard of `pretokenize`: rows `[start, start + len(part))` as ids (and retrieved rows), and its skips."""
    columns = {"source_index": [], "input_ids": []}
    if retriever is not None:
        columns.update(retrieved_indices=[], retrieved_scores=[])
    skipped = {"no_text": 0, "no_image": 0, "too_long": 0}
    for offset in range(0, len(part), batch_size):
        batch = part[offset : offset + batch_size]
        first = start + offset
        texts, images = batch[text_column], [_image_of(v) for v in batch[image_column]]
        valid = []
        for j, (text, image) in enumerate(zip(texts, images)):
            if not isinstance(text, str) or not text.strip():
                skipped["no_text"] += 1
            elif image is None:
                skipped["no_image"] += 1
            else:
                valid.append(j)
        ids = [[] for _ in texts]
        if valid:
            encoded = processor([document_text(texts[j]) for j in valid], images=[[images[j]] for j in valid],
                                prepend_eos=False, padding=False)["input_ids"]
            for j, row in zip(valid, encoded):
                if max_length is not None and len(row) + 2 > max_length:
                    skipped["too_long"] += 1
                else:
                    ids[j] = row
        columns["source_index"] += range(first, first + len(texts))
        columns["input_ids"] += ids
        if retriever is not None:
            rows, scores = [[] for _ in texts], [[] for _ in texts]
            keep = [j for j in valid if ids[j]]
            if keep:
                found = retriever.retrieve_for_training(
                    [texts[j] for j in keep], [images[j] for j in keep], num_docs=num_docs,
                    docs_per_modality=docs_per_modality, exclude=[[first + j] for j in keep],
                    generator=np.random.default_rng([seed, first // batch_size]),
                )
                for j, documents in zip(keep, found):
                    rows[j] = [d.source_index for d in documents]
                    scores[j] = [d.score for d in documents]
            columns["retrieved_indices"] += rows
            columns["retrieved_scores"] += scores
        progress.update(len(texts))
    features = {"source_index": Value("int64"), "input_ids": List(Value("int32"))}
    if retriever is not None:
        features.update(retrieved_indices=List(Value("int64")), retrieved_scores=List(Value("float32")))
    return Dataset.from_dict(columns, features=datasets.Features(features)), skipped


OUTPUTS = (DATA_DIR, SHARDS_DIR, MANIFEST_FILE)  # all that pre-tokenization writes in its output directory
SIGNATURE = ("format_version", "num_source_rows", "vocabulary")  # keys of its manifest and of its build.json


def claim_pretokenized_output(output_dir: Path, overwrite: bool, script: str) -> str:
    """Ready `output_dir` for a pre-tokenization (`pretokenize`, `sft_data.pretokenize_sft`) without deleting what it
    did not write: `atomic.claim_output_directory` with this format's outputs (`data/`, `shards/`, `manifest.json`).
    A non-empty folder that holds no pre-tokenized data is refused, with or without `overwrite`; `overwrite` removes
    only those outputs. `script` is the command whose `--overwrite` flag the messages name."""
    return claim_output_directory(
        output_dir, outputs=OUTPUTS.__contains__, signature=SIGNATURE, overwrite=overwrite,
        what="pre-tokenized data", command=f"pass overwrite=True (the `--overwrite` flag of {script})",
        manifest_file=MANIFEST_FILE, partial=SHARDS_DIR,
    )


def data_files(output_dir: Path) -> dict:
    """Size and sha256 of every file of `output_dir / data` (the manifest's `files`, checked by `load_pretokenized`
    as a memory bank's are: flipped or truncated bytes are found before training on them)."""
    from .memory_bank_checks import file_digests  # (lazily: it imports faiss)

    names = sorted(str(p.relative_to(output_dir)) for p in (output_dir / DATA_DIR).rglob("*") if p.is_file())
    return file_digests(output_dir, names)


def _check_pretokenize_inputs(dataset: Dataset, output_dir: Path, text_column: str, image_column: str,
                              batch_size: int, shard_size: int, overwrite: bool, max_length: int | None = None) -> None:
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive.")
    if max_length is not None and max_length < 3:
        raise ValueError(f"max_length ({max_length}) leaves no room for a document: a sample is at least its 2 <eos> "
                         f"tokens and one more.")
    if len(dataset) == 0:
        raise ValueError("Cannot pre-tokenize an empty dataset.")
    for role, column in (("text_column", text_column), ("image_column", image_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{role}={column!r} is not a column of the dataset (columns: {dataset.column_names}).")
    claim_pretokenized_output(output_dir, overwrite, "training/pretokenize.py")


def pretokenize(dataset: Dataset, processor, output_dir: str | os.PathLike, *, text_column: str = "text",
                image_column: str = "image", retriever=None, num_retrieved_docs: int = 3, docs_per_modality: int = 2,
                max_length: int | None = None, batch_size: int = 64, shard_size: int = 10_000, seed: int = 0,
                overwrite: bool = False, show_progress_bar: bool = True) -> Dataset:
    """Tokenize `dataset`'s caption-image pairs into `output_dir` and return the `data` dataset (the module docstring
    describes the output). Resumable: finished shards of an interrupted call with the same settings are kept.

    Args:
        dataset: rows with a text column and an image column (a PIL image, or a list holding one).
        processor: a `Cm3LeonProcessor`; each pair becomes `text <break> image` ids.
        retriever: a `Cm3LeonRetriever` over a memory bank built from `dataset`; adds `retrieved_indices`.
        num_retrieved_docs, docs_per_modality: `Cm3LeonRetriever.retrieve_for_training`'s `num_docs` and
            `docs_per_modality` (CL §2.1: two by text, two by image, three kept).
        max_length: skip (and count) documents longer than this context once laid out (`len + 2`).
        batch_size: pairs per processor call (and per retrieval generator).
        shard_size: rows per resumable shard.
        seed: the retrieval's seed (batch `j` draws from `numpy.random.default_rng([seed, j])`).
        overwrite: start over: remove what an earlier pre-tokenization wrote in `output_dir` (`data/`, `shards/`,
            `manifest.json`), nothing else. A non-empty folder that holds no pre-tokenized data is refused.
    """
    output_dir = Path(output_dir)
    _check_pretokenize_inputs(dataset, output_dir, text_column, image_column, batch_size, shard_size, overwrite,
                              max_length)
    if retriever is not None:
        _check_bank(retriever.bank, dataset, text_column, image_column)

    retrieval = None
    if retriever is not None:
        retrieval = {
            "memory_bank": str(retriever.bank.directory), "encoder": retriever.bank.manifest["encoder"]["name"],
            "num_docs": num_retrieved_docs, "docs_per_modality": docs_per_modality, "max_score": retriever.max_score,
            "query_dropout": retriever.query_dropout, "seed": seed,
        }
    settings = {
        "format_version": FORMAT_VERSION, "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "num_source_rows": len(dataset), "text_column": text_column, "image_column": image_column,
        "vocabulary": processor.model_config_fields(), "max_length": max_length, "batch_size": batch_size,
        "shard_size": shard_size, "retrieval": retrieval,
    }

    def encode(part, start, progress):
        return _tokenize_shard(part, start, processor, text_column, image_column, retriever, num_retrieved_docs,
                               docs_per_modality, max_length, batch_size, seed, progress)

    shards_dir = output_dir / SHARDS_DIR
    data, infos = build_in_shards(dataset, shards_dir, settings, encode, shard_size=shard_size,
                                  what="pre-tokenization", desc="pre-tokenizing", unit="pair",
                                  show_progress_bar=show_progress_bar)
    skipped = {reason: sum(info[reason] for info in infos) for reason in SKIP_REASONS}
    if sum(skipped.values()) == len(dataset):
        raise ValueError(
            f"Pre-tokenization kept no example: all {len(dataset)} rows were skipped (no text in {text_column!r}: "
            f"{skipped['no_text']}, no image in {image_column!r}: {skipped['no_image']}, longer than max_length="
            f"{max_length}: {skipped['too_long']}). Check --text_column and --image_column, or raise --max_length "
            f"(a caption-image document is its text, <break> and the image's codes, plus 2 <eos>)."
        )
    data = save_dataset_atomically(data, output_dir / DATA_DIR)
    lengths = pc.list_value_length(data.data.column("input_ids"))  # from the offsets, chunk by chunk
    manifest = {
        **{k: v for k, v in settings.items() if k not in ("batch_size", "shard_size")},
        "num_rows": len(data), "num_examples": int(pc.sum(pc.greater(lengths, 0)).as_py() or 0),
        "num_skipped": skipped, "num_tokens": int(pc.sum(lengths).as_py() or 0),
        "files": data_files(output_dir),
    }
    atomic_write_json(output_dir / MANIFEST_FILE, manifest)  # the commit point
    shutil.rmtree(shards_dir)
    return data


# ------------------------------------------------------------------------------------------------ loading


def _check_vocabulary(directory: Path, vocabulary: dict, processor) -> None:
    """Refuse data whose recorded vocabulary (`Cm3LeonProcessor.model_config_fields` when it was made) is not
    `processor`'s: its ids would mean other things. (`validate_model_config` checks the processor against a model.)"""
    expected = processor.model_config_fields()
    for name, value in vocabulary.items():
        if expected.get(name) != value:
            raise ValueError(
                f"The pre-tokenized data in {directory} was made with a processor whose `{name}` is {value!r}, but the "
                f"model's processor has {expected.get(name)!r}: its ids mean other things to this model. Pre-tokenize "
                f"again with the model's processor."
            )


def load_pretokenized(directory: str | os.PathLike, processor=None,
                      verify: bool | None = None) -> tuple[Dataset, Dataset, dict]:
    """`(examples, documents, manifest)` of a `pretokenize` output: `documents` is every row (what
    `retrieved_indices` point to), `examples` the rows that were not skipped (a `select` on `documents`, no copy).

    Args:
        directory: a `pretokenize` output directory.
        processor: the `Cm3LeonProcessor` the data will be trained with; when given, data made with another
            vocabulary (a different `model_config_fields`) is refused, naming the field.
        verify: check the data files against the sizes and sha256 digests of the manifest: sizes always, contents
            when the data is at most 1 GiB (`None`) or always (`True`); data written before the manifest recorded
            them is checked for loading only.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, "pre-tokenized data", "an unfinished run: re-run the command to resume",
                             format_version=FORMAT_VERSION, name="pre-tokenized", file_name=MANIFEST_FILE,
                             partial=SHARDS_DIR)
    if processor is not None:
        _check_vocabulary(directory, manifest["vocabulary"], processor)
    from .memory_bank_checks import check_files  # (lazily: it imports faiss)

    redo = "Pre-tokenize it again (the same command with --overwrite)."
    damaged = check_files(directory, manifest.get("files") or {}, verify)
    if damaged:
        raise ValueError(f"The pre-tokenized data in {directory} is damaged: {'; '.join(damaged)}. {redo}")
    try:
        documents = load_from_disk(str(directory / DATA_DIR))
        documents.data.column("input_ids")  # reads the Arrow files' schema: a truncated file fails here
    except Exception as error:  # noqa: BLE001 - datasets and pyarrow raise several kinds for a damaged directory
        raise ValueError(f"The pre-tokenized data in {directory}: {DATA_DIR}/ does not load ({type(error).__name__}: "
                         f"{error}). {redo}") from error
    if len(documents) != manifest["num_rows"]:
        raise ValueError(f"{directory}: {len(documents)} rows, the manifest says {manifest['num_rows']}. Redo it.")
    if manifest["num_examples"] == len(documents):  # nothing skipped: the examples are the rows
        return documents, documents, manifest
    # list lengths from the memory-mapped offsets, chunk by chunk (the token values are never read)
    lengths = pc.list_value_length(documents.data.column("input_ids"))
    keep = np.concatenate([np.flatnonzero(chunk.to_numpy(zero_copy_only=False) > 0) + offset for chunk, offset in
                           zip(lengths.chunks, np.cumsum([0, *(len(c) for c in lengths.chunks[:-1])]))])
    if len(keep) != manifest["num_examples"]:
        raise ValueError(f"{directory}: {len(keep)} examples, the manifest says {manifest['num_examples']}. Redo it.")
    return documents.select(keep), documents, manifest


__all__ = ["DataSourceArguments", "load_pretokenized", "load_source", "pretokenize"]
