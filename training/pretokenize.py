"""Pre-tokenize an image–text dataset for CM3Leon pretraining, once: text BPE + VQ codes, and retrieved documents.

Training then never runs the VQ or faiss: `training/pretrain.py` reads the Arrow output with `Cm3LeonDataCollator`.
The library is `cm3leon_hf.pretokenized` (the output format, the skips, determinism).

Commands:

```bash
# The synthetic world's caption-image pairs with the shipped tiny processor
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize.py --synthetic_task text_to_image \
    --synthetic_rows 35000 --output_dir outputs/pretokenized/train

# ... with 3 retrieved documents per pair (the paper's strategy, 20% query dropout), from a memory bank built on the
# same rows (training/build_memory_bank.py --synthetic_task text_to_image --synthetic_rows 35000 ...)
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize.py --synthetic_task text_to_image \
    --synthetic_rows 35000 --memory_bank outputs/memory-bank --output_dir outputs/pretokenized/train-rag

# Any image-text dataset saved with `save_to_disk` (or a `datasets` name), one image column and one text column
HF_HUB_OFFLINE=1 PYTHONPATH=src python training/pretokenize.py --dataset path/to/pairs --split train \
    --image_column image --text_column caption --processor path/to/processor --max_length 4096 \
    --output_dir path/to/pretokenized

# Interrupted? Run the same command again: finished shards are kept. --overwrite starts over.
```

Flags are dataclass fields parsed with `trl.TrlParser`: `--config FILE.yaml` supplies any of them, and each takes
dashes or underscores (`--output-dir` = `--output_dir`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cm3leon_hf.pretokenized import MANIFEST_FILE, DataSourceArguments, load_source, pretokenize


@dataclass
class PretokenizeArguments:
    """Where the output goes, the processor, the retrieval and the run's settings."""

    output_dir: str = field(metadata={"help": "where the pre-tokenized data is written"})
    processor: str | None = field(
        default=None, metadata={"help": "a Cm3LeonProcessor directory (default: the shipped tiny one)"}
    )
    memory_bank: str | None = field(
        default=None, metadata={"help": "a memory bank built from the same dataset: retrieve"}
    )
    encoder: str | None = field(
        default=None, metadata={"help": "the bank's CLIP (default: the shipped synthetic CLIP)"}
    )
    num_retrieved_docs: int = field(default=3, metadata={"help": "documents kept per pair"})
    docs_per_modality: int = field(default=2, metadata={"help": "documents retrieved by text and by image"})
    query_dropout: float = field(default=0.2, metadata={"help": "share of the caption's words dropped in its query"})
    max_length: int | None = field(default=None, metadata={"help": "skip documents that cannot fit this context"})
    batch_size: int = field(default=64, metadata={"help": "pairs per processor call"})
    shard_size: int = field(default=10_000, metadata={"help": "rows per resumable shard"})
    threads: int = field(default=1, metadata={"help": "torch and faiss threads"})
    seed: int = field(default=0, metadata={"help": "the retrieval's seed"})
    overwrite: bool = field(default=False, metadata={"help": "delete what --output_dir holds and start over"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bar"})


def make_parser():
    from trl import TrlParser

    epilog = "--config FILE.yaml  a YAML file of any of these flags; flags given on the command line override it"
    return TrlParser((DataSourceArguments, PretokenizeArguments), description=__doc__.split("\n")[0], epilog=epilog)


def parse_args(argv=None) -> tuple[DataSourceArguments, PretokenizeArguments]:
    """The source and the run's arguments; a bad value exits with a message naming the flag."""
    parser = make_parser()
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:  # a flag's check (__post_init__), or a recipe key that is no flag
        parser.error(str(error))


def load_retriever(args: PretokenizeArguments):
    """The `Cm3LeonRetriever` over `--memory_bank` (None without one)."""
    if not args.memory_bank:
        return None
    import faiss
    from sentence_transformers import SentenceTransformer

    from cm3leon_hf.memory_bank import Cm3LeonMemoryBank
    from cm3leon_hf.pretrained import CLIP_PATH
    from cm3leon_hf.retriever import Cm3LeonRetriever

    faiss.omp_set_num_threads(args.threads)
    encoder = SentenceTransformer(str(args.encoder or CLIP_PATH))
    return Cm3LeonRetriever(Cm3LeonMemoryBank.load(args.memory_bank), encoder, query_dropout=args.query_dropout,
                            seed=args.seed)


def main(argv=None):
    source, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from cm3leon_hf import Cm3LeonProcessor
    from cm3leon_hf.pretrained import TINY_PATH

    dataset, text_column, image_column = load_source(source)
    processor = Cm3LeonProcessor.from_pretrained(args.processor or TINY_PATH)
    data = pretokenize(
        dataset, processor, args.output_dir, text_column=text_column, image_column=image_column,
        retriever=load_retriever(args), num_retrieved_docs=args.num_retrieved_docs,
        docs_per_modality=args.docs_per_modality, max_length=args.max_length, batch_size=args.batch_size,
        shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite, show_progress_bar=not args.no_progress,
    )
    manifest = json.loads((Path(args.output_dir) / MANIFEST_FILE).read_text())
    print(json.dumps({"output_dir": str(args.output_dir), "num_rows": len(data),
                      **{k: manifest[k] for k in ("num_examples", "num_skipped", "num_tokens")}}))
    return data


if __name__ == "__main__":
    main()
