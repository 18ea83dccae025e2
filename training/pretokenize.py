"""Pre-tokenize an image–text dataset for CM3Leon pretraining, once: text BPE + VQ codes, and retrieved documents.

Training then never runs the VQ or faiss: `training/pretrain.py` reads the Arrow output with `Cm3LeonDataCollator`.

Commands:

```bash
# The synthetic world's caption-image pairs with the shipped tiny processor
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize.py --synthetic-task text_to_image \
    --synthetic-rows 35000 --output-dir outputs/pretokenized/train

# ... with 3 retrieved documents per pair (the paper's strategy, 20% query dropout), from a memory bank built on the
# same rows (training/build_memory_bank.py --synthetic-task text_to_image --synthetic-rows 35000 ...)
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize.py --synthetic-task text_to_image \
    --synthetic-rows 35000 --memory-bank outputs/memory-bank --output-dir outputs/pretokenized/train-rag

# Any image-text dataset saved with `save_to_disk` (or a `datasets` name), one image column and one text column
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize.py --dataset path/to/pairs --split train \
    --image-column image --text-column caption --processor path/to/processor --max-length 4096 \
    --output-dir path/to/pretokenized

# Interrupted? Run the same command again: finished shards are kept. --overwrite starts over.
```

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
  with `--max-length`, a document that cannot fit the context even alone (`len + 2` for its `<eos>` tokens).
- **Determinism**: batch `j`'s retrieval uses `numpy.random.default_rng([seed, j])`, so a resumed run writes what an
  uninterrupted one writes.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, List, Value, load_from_disk

from cm3leon_hf.layout import document_text
from cm3leon_hf.sharded import atomic_write_json, build_in_shards, save_dataset_atomically

FORMAT_VERSION = 1
DATA_DIR = "data"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"


def check_vocabulary(manifest: dict, config) -> None:
    """Raise a `ValueError` naming the field when pre-tokenized data was made for another vocabulary than `config`'s."""
    for field, value in manifest["vocabulary"].items():
        if getattr(config, field, None) != value:
            raise ValueError(
                f"The pre-tokenized data was made with a processor whose `{field}` is {value!r}, but the model config "
                f"has {getattr(config, field, None)!r}: its ids mean other things to this model. Pre-tokenize again "
                f"with the model's processor."
            )


def _image_of(value):
    """A pair's image: the value, or the single element of a list (`None` when missing or empty)."""
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise ValueError(f"A caption-image pair has one image; a row of the image column holds {len(value)}.")
        return value[0] if value else None
    return value


def _check_bank(bank, dataset: Dataset, text_column: str, image_column: str, probes: int = 8) -> None:
    from cm3leon_hf.memory_bank import content_hash

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


def pretokenize(dataset: Dataset, processor, output_dir: str | os.PathLike, *, text_column: str = "text",
                image_column: str = "image", retriever=None, num_retrieved_docs: int = 3, docs_per_modality: int = 2,
                max_length: int | None = None, batch_size: int = 64, shard_size: int = 10_000, seed: int = 0,
                overwrite: bool = False, show_progress_bar: bool = True) -> Dataset:
    """Tokenize `dataset`'s caption-image pairs into `output_dir` (resumable; see the module docstring) and return the
    `data` dataset.

    Args:
        dataset: rows with a text column and an image column (a PIL image, or a list holding one).
        processor: a `Cm3LeonProcessor`; each pair becomes `text <break> image` ids.
        retriever: a `Cm3LeonRetriever` over a memory bank built from `dataset`; adds `retrieved_indices`.
        num_retrieved_docs, docs_per_modality: `Cm3LeonRetriever.retrieve_for_training`'s `num_docs` and
            `docs_per_modality` (CL §2.1: two by text, two by image, three kept).
        max_length: skip (and count) documents longer than this context once laid out (`len + 2`).
        shard_size: rows per resumable shard.
    """
    output_dir = Path(output_dir)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive.")
    if len(dataset) == 0:
        raise ValueError("Cannot pre-tokenize an empty dataset.")
    for role, column in (("text_column", text_column), ("image_column", image_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{role}={column!r} is not a column of the dataset (columns: {dataset.column_names}).")
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    if (output_dir / MANIFEST_FILE).exists():
        raise ValueError(f"{output_dir} already holds pre-tokenized data; pass overwrite=True to redo it.")
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
    skipped = {reason: sum(info[reason] for info in infos) for reason in ("no_text", "no_image", "too_long")}
    data = save_dataset_atomically(data, output_dir / DATA_DIR)
    lengths = pc.list_value_length(data.data.column("input_ids"))  # from the offsets, chunk by chunk
    manifest = {
        **{k: v for k, v in settings.items() if k not in ("batch_size", "shard_size")},
        "num_rows": len(data), "num_examples": int(pc.sum(pc.greater(lengths, 0)).as_py() or 0),
        "num_skipped": skipped, "num_tokens": int(pc.sum(lengths).as_py() or 0),
    }
    atomic_write_json(output_dir / MANIFEST_FILE, manifest)  # the commit point
    shutil.rmtree(shards_dir)
    return data


def load_pretokenized(directory: str | os.PathLike) -> tuple[Dataset, Dataset, dict]:
    """`(examples, documents, manifest)` of a `pretokenize` output: `documents` is every row (what
    `retrieved_indices` point to), `examples` the rows that were not skipped (a `select` on `documents`, no copy)."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).exists():
        unfinished = " (an unfinished run: re-run the command to resume)" if (directory / SHARDS_DIR).exists() else ""
        raise ValueError(f"{directory} is not pre-tokenized data: {MANIFEST_FILE} is missing{unfinished}.")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"Unsupported pre-tokenized format {manifest.get('format_version')!r} in {directory}.")
    documents = load_from_disk(str(directory / DATA_DIR))
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


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose an image-text dataset (shared with build_memory_bank.py, so both read the same rows)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a directory saved with save_to_disk, or a name for datasets.load_dataset")
    source.add_argument("--synthetic-task", help="a synthetic-world task (its `caption` and `images` columns)")
    parser.add_argument("--dataset-config", default=None, help="load_dataset configuration name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--synthetic-rows", type=int, default=10_000, help="rows of the synthetic split")
    parser.add_argument("--synthetic-split", default="train", help="train, validation, test or heldout")
    parser.add_argument("--synthetic-seed", type=int, default=0)
    parser.add_argument("--text-column", default=None, help="default: text (caption for --synthetic-task)")
    parser.add_argument("--image-column", default=None, help="default: image (images for --synthetic-task)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--processor", default=None, help="a Cm3LeonProcessor directory (default: the shipped tiny one)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--memory-bank", default=None, help="a memory bank built from the same dataset: retrieve")
    parser.add_argument("--encoder", default=None, help="the bank's CLIP (default: the shipped synthetic CLIP)")
    parser.add_argument("--num-retrieved-docs", type=int, default=3)
    parser.add_argument("--docs-per-modality", type=int, default=2)
    parser.add_argument("--query-dropout", type=float, default=0.2)
    parser.add_argument("--max-length", type=int, default=None, help="skip documents that cannot fit this context")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10_000, help="rows per resumable shard")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def load_source(args) -> tuple[Dataset, str, str]:
    if args.synthetic_task:
        from cm3leon_hf.synthetic import build_task

        sizes = {f"num_{s}": 0 for s in ("train", "validation", "test", "heldout")}
        sizes[f"num_{args.synthetic_split}"] = args.synthetic_rows
        splits = build_task(args.synthetic_task, seed=args.synthetic_seed, **sizes)
        return splits[args.synthetic_split], args.text_column or "caption", args.image_column or "images"
    if os.path.isdir(args.dataset):
        dataset = datasets.load_from_disk(args.dataset)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[args.split]
    else:
        dataset = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
    return dataset, args.text_column or "text", args.image_column or "image"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from cm3leon_hf import Cm3LeonProcessor
    from cm3leon_hf.pretrained import CLIP_PATH, TINY_PATH

    dataset, text_column, image_column = load_source(args)
    processor = Cm3LeonProcessor.from_pretrained(args.processor or TINY_PATH)
    retriever = None
    if args.memory_bank:
        import faiss
        from sentence_transformers import SentenceTransformer

        from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
        from cm3leon_hf.retriever import Cm3LeonRetriever

        faiss.omp_set_num_threads(args.threads)
        encoder = SentenceTransformer(str(args.encoder or CLIP_PATH))
        retriever = Cm3LeonRetriever(Cm3LeonMemoryBank.load(args.memory_bank), encoder,
                                     query_dropout=args.query_dropout, seed=args.seed)
    data = pretokenize(
        dataset, processor, args.output_dir, text_column=text_column, image_column=image_column, retriever=retriever,
        num_retrieved_docs=args.num_retrieved_docs, docs_per_modality=args.docs_per_modality,
        max_length=args.max_length, batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed,
        overwrite=args.overwrite, show_progress_bar=not args.no_progress,
    )
    manifest = json.loads((Path(args.output_dir) / MANIFEST_FILE).read_text())
    print(json.dumps({"output_dir": str(args.output_dir), "num_rows": len(data),
                      **{k: manifest[k] for k in ("num_examples", "num_skipped", "num_tokens")}}))
    return data


if __name__ == "__main__":
    main()
